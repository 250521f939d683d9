"""`nfsplice http` in the lab: real clients (curl, raw sockets), a scripted origin that
misbehaves on demand, nginx; spliced and copied (--no-splice) side by side.

Bodies are checked by sha256 against what the origin sent; the proxy's access log
says which were spliced; faults must leave the client with a visibly truncated message.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from netns_lab.origins import (BAD_CASES, NginxOrigin, ScriptedOrigin, expected_length, expected_sha256,
                               parse_response, raw_exchange, raw_request, stream_bytes)
from netns_lab.topology import Lab
from tests.splicer import REPO, instance_stats, proxy_sockets, raw_rules, socket_counters
from tests.test_http1 import FIELD_CASES, HEAD_CASES, REQ_START, REQUEST_ONLY

pytestmark = pytest.mark.root

SPLICED, COPIED, FORWARD = 8080, 8081, 3128
PROXY = "198.18.1.1"


class HTTPProxyProc:
    """`nfsplice http` in the proxy namespace; PORT None: the listeners come from --config."""

    def __init__(self, lab, port: int | None, *args: str, instance: str):
        self.lab, self.port, self.instance = lab, port, instance
        self.dir = tempfile.mkdtemp(prefix=f"nfsplice-{instance}-")
        self.access = os.path.join(self.dir, "access.log")
        ready = os.path.join(self.dir, "ready")
        self.log = open(os.path.join(self.dir, "stderr.log"), "w")
        listen = ["--listen", f"{PROXY}:{port}"] if port is not None else []
        # The tests splice from 64 KiB on, chunked bodies whatever their chunk sizes (the
        # defaults, 2 MiB and 8 MiB chunks, are what pays off in CPU; the tests want many
        # spliced bodies of every size and framing); ARGS may override them.
        argv = [sys.executable, "-m", "nfsplice", "http", "--splice-threshold", "64KiB", "--splice-chunk", "0",
                *listen, "--instance", instance,
                "--ready-file", ready, "--access-log", self.access, "--linger", "1", *args]
        self.proc = lab.popen(lab.proxy, *argv, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.exists(ready):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text()
            time.sleep(0.05)

    def text(self) -> str:
        with open(os.path.join(self.dir, "stderr.log")) as f:
            return f.read()[-3000:]

    def access_lines(self) -> list[str]:
        try:
            with open(self.access) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def access_line(self, needle: str, timeout: float = 5.0) -> str:
        """The last access-log line containing NEEDLE (the proxy logs a spliced
        response once the hand-off is done, which can be after the client has it all)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [l for l in self.access_lines() if needle in l]
            if lines or time.monotonic() > deadline:
                assert lines, f"no access-log line with {needle!r}"
                return lines[-1]
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)
        return self.proc.returncode


def access_fields(line: str) -> dict:
    """An access-log line's fields (HTTPProxy's Exchange.line, after the logger's prefix)."""
    words = line.split()
    i = next(i for i, w in enumerate(words) if w.startswith("cache=")) - 7
    client, method, target, status, bytes_in, bytes_out, mode = words[i:i + 7]
    return {"method": method, "target": target, "status": int(status), "in": int(bytes_in),
            "out": int(bytes_out), "mode": mode, "rest": " ".join(words[i + 7:])}


def stop_all(lab, procs) -> None:
    """Stop every HTTPProxyProc of PROCS: each must exit 0 and leave no rule."""
    codes = {p.instance: p.stop() for p in procs}
    assert set(codes.values()) == {0}, codes
    assert "NFSPLICE" not in raw_rules(lab)


@pytest.fixture(scope="module")
def env():
    with Lab("hpx") as lab, ScriptedOrigin(lab) as so, NginxOrigin(lab) as ngx:
        spliced = HTTPProxyProc(lab, SPLICED, "--upstream", f"http://{so.addr}:{so.port}", "--queue", "0",
                                "--ports", "61000-61999", instance="hpx-spliced")
        copied = HTTPProxyProc(lab, COPIED, "--upstream", f"http://{so.addr}:{so.port}", "--no-splice",
                               "--ports", "62000-62499", instance="hpx-copied")
        forward = HTTPProxyProc(lab, FORWARD, "--queue", "4", "--ports", "62500-62999",
                                "--connect-ports", "443,8001", instance="hpx-forward")
        try:
            yield lab, so, ngx, {SPLICED: spliced, COPIED: copied, FORWARD: forward}
        finally:
            stop_all(lab, (spliced, copied, forward))


def curl(lab, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return lab.run(lab.client, "curl", "-sS", "--max-time", "30", *args, check=False, timeout=timeout)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


BODIES = ["/len/0", "/len/1", "/len/1000", "/len/65535", "/len/65536", "/len/1048576", "/len/16777216",
          "/chunked/300000/4096?trailer=1", "/chunked/1000/7", "/close/500000"]


@pytest.mark.parametrize("port", [SPLICED, COPIED])
@pytest.mark.parametrize("path", BODIES)
def test_bodies_exact(env, port, path):
    lab, so, _ngx, procs = env
    r = curl(lab, "-o", "-", f"http://{PROXY}:{port}{path}")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == expected_length(path) and sha(r.stdout) == expected_sha256(path)
    line = procs[port].access_line(f" GET {path} ")
    n = expected_length(path)
    want = "spliced" if port == SPLICED and (n >= 65536 or path.startswith("/close")) else "copied"
    assert " 200 " in line, line
    if port == SPLICED and want == "spliced" and n < 4 << 20 and not path.startswith("/close"):
        # A body of a few MiB may have arrived whole before the engine held the pair
        # (the socket buffers hold that much): then the proxy delivered it itself, and
        # the log says "copied".  16 MiB never fits.
        assert " spliced " in line or " copied " in line, line
    else:
        assert f" {want} " in line, line


def test_small_response_goes_out_in_one_write(env):
    """A body that arrives with its head (the scripted origin sends both in one write)
    leaves in the same write as the forwarded head: one segment to the client, not
    two (with TCP_NODELAY each send is a segment).  Bodies exact, counted (the --no-splice
    listener takes the same path, its process counting in a stats file of its own)."""
    lab, _so, _ngx, procs = env
    port, instance = SPLICED, "hpx-spliced"
    before = instance_stats(instance, time.time()).get("http.one_write_responses", 0)
    n = 5
    args = []
    for i in range(n):
        args += ["-o", "-", f"http://{PROXY}:{port}/len/1000?one={i}"]
    r = curl(lab, *args)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == 1000 * n
    assert all(sha(r.stdout[i * 1000:(i + 1) * 1000]) == expected_sha256("/len/1000") for i in range(n))
    after = instance_stats(instance, time.time()).get("http.one_write_responses", 0)
    assert after - before == n, (before, after)


@pytest.mark.parametrize("port", [SPLICED, COPIED])
def test_keepalive_sequence_of_mixed_sizes(env, port):
    """One client connection, responses of mixed sizes: the next response's head is
    never taken for body (every body exact), and the connection carries them all, the
    spliced ones too (both sockets are rebuilt after a spliced body)."""
    lab, so, _ngx, procs = env
    # (16 MiB never reaches the proxy whole before the hand-off: spliced for sure.)
    paths = ["/len/100", "/len/2000", "/len/300000", "/len/10", "/chunked/70000/1000", "/len/16777216?mixed=1",
             "/len/5"]
    args = []
    for p in paths:
        args += ["-o", "-", f"http://{PROXY}:{port}{p}"]
    r = curl(lab, "-w", "%{num_connects}", *args)
    assert r.returncode == 0, r.stderr
    off = 0
    counts = []
    for p in paths:
        n = expected_length(p)
        assert sha(r.stdout[off:off + n]) == expected_sha256(p), p
        counts.append(r.stdout[off + n:off + n + 1])
        off += n + 1
    assert off == len(r.stdout)
    assert counts == [b"1"] + [b"0"] * (len(paths) - 1), counts       # one connection for all
    line = procs[port].access_line(" GET /len/16777216?mixed=1 ")
    assert (" spliced " if port == SPLICED else " copied ") in line, line


def test_keepalive_survives_spliced_bodies(env):
    """After a spliced body the proxy rebuilds its two sockets (TCP_REPAIR) and goes on:
    one client connection and one origin connection carry every request."""
    lab, so, _ngx, procs = env
    so.clear_log()
    # (The stalls keep those bodies from reaching the proxy whole before the hand-off,
    # which a resumed connection's open windows otherwise allow: they are spliced.)
    paths = ["/stall/2000000/65536/1", "/len/10", "/len/1048576", "/len/5000", "/stall/3000000/65536/1"]
    args = []
    for p in paths:
        args += ["-o", "-", f"http://{PROXY}:{SPLICED}{p}"]
    r = curl(lab, "-w", "%{num_connects}", *args)
    assert r.returncode == 0, r.stderr
    off = 0
    counts = []
    for p in paths:
        n = expected_length(p)
        assert sha(r.stdout[off:off + n]) == expected_sha256(p), p
        counts.append(r.stdout[off + n:off + n + 1])
        off += n + 1
    assert counts == [b"1", b"0", b"0", b"0", b"0"], counts      # one connection for all
    conns = {(q["conn"]) for q in so.requests()}
    seqs = [q["seq"] for q in so.requests()]     # (a pooled connection has served others before)
    assert len(conns) == 1 and seqs == list(range(seqs[0], seqs[0] + 5)), so.requests()
    for p in ("/stall/2000000/65536/1", "/stall/3000000/65536/1"):
        assert " spliced " in procs[SPLICED].access_line(f" GET {p} ")
    line = procs[SPLICED].access_line(" GET /len/1048576 ")
    assert " spliced " in line or " copied " in line, line


def test_extra_bytes_after_body_never_forwarded(env):
    lab, so, _ngx, _procs = env
    for port, n in ((SPLICED, 200000), (COPIED, 200000), (SPLICED, 1000)):
        req = f"GET /extra/{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        res = raw_request(lab, req, addr=PROXY, port=port, idle=2.0)
        resp = res.response()
        assert resp.status == 200
        # The body, exactly: the 100 bytes the origin sent after it never reach the client.
        assert res.data[resp.head_len:] == stream_bytes(n), (port, n, res.data[-120:])
    # The copied path does not take the garbage for the next response either: the next
    # request on that client connection gets a fresh upstream connection and a real answer.
    res = raw_exchange(lab, [b"GET /extra/500 HTTP/1.1\r\nHost: x\r\n\r\n", ("recv", 1),
                             ("sleep", 0.3), b"GET /len/700 HTTP/1.1\r\nHost: x\r\n\r\n"],
                       addr=PROXY, port=COPIED, idle=1.5)
    first = res.response()
    second = res.response(first.head_len + 500)
    assert second.status == 200 and int(second.get("content-length")) == 700, res.data[-300:]


@pytest.mark.parametrize("port", [SPLICED, COPIED])
@pytest.mark.parametrize("path", ["/truncate/1048576/300000", "/truncate/2000/1000", "/reset/1048576/200000",
                                  "/truncate-chunked/100000"])
def test_upstream_fault_leaves_client_truncated(env, port, path):
    """A truncated or reset upstream body never looks complete to the client."""
    lab, so, _ngx, _procs = env
    r = curl(lab, "-o", "-", f"http://{PROXY}:{port}{path}")
    assert r.returncode != 0, "curl took a truncated body for a complete one"
    assert len(r.stdout) < 1048576


@pytest.mark.parametrize("port", [SPLICED, COPIED])
def test_upstream_reset_mid_close_delimited_body_resets_the_client(env, port):
    """A close-delimited body ends only with the origin's FIN: when the origin resets
    instead, the client gets a reset too (a FIN would make the cut body look complete),
    and only a prefix of the body.  Both log the exchange aborted (the spliced one when
    the engine forgets the pair)."""
    lab, _so, _ngx, procs = env
    n = 4 << 20
    path = f"/reset-close/{n}"
    res = raw_request(lab, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), addr=PROXY, port=port, idle=5.0)
    resp = res.response()
    assert resp.status == 200 and resp.get("content-length") is None and resp.get("transfer-encoding") is None
    body = res.data[resp.head_len:]
    assert res.end == "reset", (res.end, len(body))
    assert len(body) <= n and body == stream_bytes(len(body))
    f = access_fields(procs[port].access_line(f" GET {path} "))
    assert f["mode"] == ("spliced" if port == SPLICED else "copied") and " aborted (" in f["rest"], f
    if port == SPLICED:
        # The origin resets once all it sent is acknowledged (through the splice, by
        # the client): the engine forwarded every byte, and the line counts them.
        assert len(body) == n and f["out"] == len(res.data), (f, len(res.data))
    else:
        # The bytes the proxy wrote before the reset (the client may have lost the
        # last of them to the reset that ended its connection).
        assert f["out"] >= len(res.data) > resp.head_len, (f, len(res.data))


BAD_IN_BODY = {"bad-chunk-size", "chunk-missing-crlf", "chunk-size-overflow"}


@pytest.mark.parametrize("port", [SPLICED, COPIED])
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_responses(env, case, port):
    """A bad response head is answered 502; a framing error inside a chunked body, found
    after the head went out, ends the client connection with a reset (never a complete-
    looking message); an obs-fold in a response head is unfolded (RFC 9112 5.2)."""
    lab, so, _ngx, _procs = env
    r = curl(lab, "-o", "/dev/null", "-D", "-", "-w", "%{http_code}", f"http://{PROXY}:{port}/bad/{case}")
    out = r.stdout.decode(errors="replace")
    if case in BAD_IN_BODY:
        assert r.returncode != 0 and out.startswith("HTTP/1.1 200"), (case, out, r.stderr)
    elif case == "obs-fold":
        assert r.returncode == 0 and "X-Folded: first second" in out, out
    else:
        assert out.endswith("502"), (case, out, r.stderr)
        # ... and the client connection closes after the 502 (a kept-alive request would
        # otherwise wait for the idle timeout).
        res = raw_request(lab, f"GET /bad/{case} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), addr=PROXY, port=port,
                          idle=2.0)
        assert res.response().status == 502 and res.end in ("eof", "reset"), (res.end, res.data[:300])


# The malformed chunked bodies of the response catalogue, as request bodies; and a chunk
# extension over the limit (http1.Limits.max_chunk_ext, 1024 bytes).
BAD_CHUNKED_BODIES = {case: BAD_CASES[case].raw.split(b"\r\n\r\n", 1)[1] for case in BAD_IN_BODY}
BAD_CHUNKED_BODIES["chunk-ext-too-long"] = b"5;" + b"e" * 1100 + b"\r\nhello\r\n0\r\n\r\n"
# Five valid chunks of 60,000 bytes: past the splice threshold (64 KiB), so on the
# splicing listener the bad bytes sent after them arrive when the engine has the pair.
GOOD_CHUNKS = b"".join(b"%x\r\n" % 60000 + stream_bytes(60000, offset=60000 * i) + b"\r\n" for i in range(5))


@pytest.mark.parametrize("port", [SPLICED, COPIED])
@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("case", sorted(BAD_CHUNKED_BODIES))
def test_bad_chunked_request_body(env, case, size, port):
    """A malformed chunked request body, at once or after 300,000 good bytes.  The head
    went to the origin already (the proxy forwards it before reading the body).  Found
    by the proxy in what it copies (a small body; any body on the copying listener):
    400 and the connection closed.  Found by the engine (the rest of a large body is
    spliced): a RST to both sides, so the client sees a reset and no answer.  Either
    way the origin never receives a complete-looking body, and nothing is left."""
    lab, so, _ngx, procs = env
    target = f"/echo?discard=1&case={case}&size={size}&port={port}"
    head = f"POST {target} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    before = instance_stats("hpx-spliced", time.time())
    res = raw_exchange(lab, [head + (GOOD_CHUNKS if size == "large" else b""), ("sleep", 0.5),
                             BAD_CHUNKED_BODIES[case]], addr=PROXY, port=port, idle=3.0)
    after = assert_nothing_left(lab, procs, port)
    if port == SPLICED and size == "large":
        assert res.end == "reset" and res.data == b"", (res.end, res.data[:300])
        assert grew(before, after, "pairs.reset_by_engine.chunked_malformed") == 1
        assert " spliced " in procs[port].access_line(f" POST {target} ")
    else:
        assert res.response().status == 400 and res.end in ("eof", "reset"), (res.end, res.data[:300])
        assert " 400 " in procs[port].access_line(f" POST {target} ")
    got = [q for q in so.requests() if q["target"] == target]
    assert all(q["body_length"] is None for q in got), got


BAD_REQUESTS = {
    "cl-te": (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    "obs-fold": (b"GET /len/1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n 2\r\n\r\n", 400),
    "no-host": (b"GET /len/1 HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (b"GET /len/1 HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    "space-colon": (b"GET /len/1 HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    "unknown-te": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: foo, chunked\r\n\r\n", 501),
    "te-in-1.0": (b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "http-2.0": (b"GET /len/1 HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    "bad-line": (b"GET  /len/1 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "huge-head": (b"GET /len/1 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n", 431),
    "nul": (b"GET /len/1 HTTP/1.1\r\nHost: x\r\nX-N: a\x00b\r\n\r\n", 400),
}


@pytest.mark.parametrize("port", [SPLICED, COPIED])
@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_requests_refused(env, name, port):
    lab, so, _ngx, procs = env
    req, status = BAD_REQUESTS[name]
    before = len(so.events()), len(procs[port].access_lines())
    res = raw_request(lab, req, addr=PROXY, port=port, idle=2.0)
    assert res.response().status == status, res.data[:200]
    assert res.end in ("eof", "reset")
    assert_not_forwarded(so, procs[port], before, 1)


def assert_not_forwarded(so, proc, before: tuple[int, int], n: int) -> None:
    """The N requests refused since BEFORE (origin events, access-log lines) went to no
    upstream: the origin logged nothing (it logs a request once its body is read, and
    a head it refuses), and the proxy's N access-log lines name no upstream (the
    origin's log cannot show a head whose body never came)."""
    assert so.events()[before[0]:] == [], "a refused request reached the origin"
    lines = proc.access_lines()[before[1]:]
    assert len(lines) == n and all(" upstream=- " in l for l in lines), lines


# Every bad request head of http1's unit catalogue (tests/test_http1.py), as a whole head.
REQUEST_CATALOGUE = ([(name, REQ_START + extra + b"\r\n", status) for name, extra, status in FIELD_CASES]
                     + [(name, head, status) for name, head, status, _response in HEAD_CASES] + REQUEST_ONLY)


@pytest.mark.parametrize("port", [SPLICED, COPIED])
def test_request_catalogue_refused(env, port):
    """Each case of the catalogue on its own connection: answered with the status the
    unit test expects of the parser (400; 501 for a coding it does not know, 505 for a
    version, 414 and 431 for what is too long), the connection closed after it, and not
    a byte of it forwarded.  (Eight clients at a time: the 101 cases one by one would
    hold the lab for a minute.)"""
    lab, so, _ngx, procs = env
    before = len(so.events()), len(procs[port].access_lines())

    def refused(case):
        name, head, status = case
        res = raw_request(lab, head, addr=PROXY, port=port, idle=2.0)
        try:
            got = res.response().status
        except ValueError:
            got = res.data[:80]
        return (name, got, res.end) if (got, res.end) not in ((status, "eof"), (status, "reset")) else None

    with ThreadPoolExecutor(8) as pool:
        wrong = [w for w in pool.map(refused, REQUEST_CATALOGUE) if w is not None]
    assert not wrong, wrong
    assert_not_forwarded(so, procs[port], before, len(REQUEST_CATALOGUE))


def test_forwarded_head_is_normalised(env):
    lab, so, _ngx, _procs = env
    req = (b"GET /len/10 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
           b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nX-Keep: yes\r\n"
           b"X-Forwarded-For: 203.0.113.9\r\n\r\n")
    res = raw_request(lab, req, addr=PROXY, port=SPLICED, idle=1.0)
    assert res.response().status == 200
    got = so.requests()[-1]
    names = {n.lower() for n, _ in got["headers"]}
    assert not names & {"x-hop", "keep-alive", "proxy-connection", "te"}, got["headers"]
    assert "x-keep" in names
    hdr = {n.lower(): v for n, v in got["headers"]}
    assert hdr["via"].endswith("nfsplice")
    assert hdr["x-forwarded-for"] == "203.0.113.9, 198.18.1.2"


def test_expect_continue_upload_copied_exact(env):
    lab, so, _ngx, _procs = env
    body = os.urandom(1 << 20)
    path = os.path.join(tempfile.mkdtemp(), "up.bin")
    with open(path, "wb") as f:
        f.write(body)
    r = curl(lab, "-D", "-", "-o", "/dev/null", "-H", "Expect: 100-continue", "--data-binary", f"@{path}",
             f"http://{PROXY}:{SPLICED}/echo?discard=1")
    assert r.returncode == 0, r.stderr
    assert f"x-body-sha256: {sha(body)}" in r.stdout.decode().lower()


def test_connect_tunnel_spliced_to_tls_origin(env):
    lab, so, _ngx, procs = env
    d = tempfile.mkdtemp()
    key, cert = os.path.join(d, "k.pem"), os.path.join(d, "c.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=origin",
                    "-keyout", key, "-out", cert, "-days", "1"], check=True, capture_output=True)
    srv = lab.popen(lab.origin, "openssl", "s_server", "-accept", "198.18.2.2:443", "-cert", cert, "-key", key,
                    "-www", "-quiet", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        r = curl(lab, "-k", "-x", f"http://{PROXY}:{FORWARD}", "https://198.18.2.2/")
        assert r.returncode == 0, r.stderr
        assert b"s_server" in r.stdout or b"Ciphers" in r.stdout
        line = procs[FORWARD].access_line(" CONNECT ")
        assert " 200 " in line
        # A port not allowed is refused.
        r = curl(lab, "-k", "-x", f"http://{PROXY}:{FORWARD}", "https://198.18.2.2:8443/")
        assert r.returncode != 0
        assert " 403 " in procs[FORWARD].access_line(" CONNECT 198.18.2.2:8443 ")
    finally:
        srv.terminate()
        srv.wait(5)


def test_forward_proxy_absolute_form(env):
    lab, so, ngx, procs = env
    want = ngx.add_file("f.bin", 3 << 20, seed=9)
    r = curl(lab, "-x", f"http://{PROXY}:{FORWARD}", "-o", "-", f"http://{ngx.addr}:{ngx.port}/f.bin")
    assert r.returncode == 0 and sha(r.stdout) == want, r.stderr
    assert " spliced " in procs[FORWARD].access_line("/f.bin ")


@pytest.mark.parametrize("port", [SPLICED, COPIED])
def test_upgrade_101_turns_into_a_tunnel(env, port):
    """After a 101 both directions are raw (spliced or copied); the access line says
    which, with the tunnel's bytes: in, what the client sent after its request head;
    out, everything it received (the 101 head and the echo).  The splicing listener's
    engine counts the pair."""
    lab, so, _ngx, procs = env
    before = instance_stats("hpx-spliced", time.time())
    target = f"/upgrade?tunnel={port}"
    req = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n".encode()
    payload = os.urandom(1 << 20)
    res = raw_exchange(lab, [req, ("until", b"\r\n\r\n"), ("send", payload), ("recv", 0), ("shutdown",)],
                       addr=PROXY, port=port, idle=2.0)
    resp = res.response()
    assert resp.status == 101
    assert res.data[resp.head_len:] == payload and res.end == "eof"
    f = access_fields(procs[port].access_line(f" GET {target} "))
    want = "spliced" if port == SPLICED else "copied"
    assert (f["status"], f["mode"], f["in"], f["out"]) == (101, want, len(payload), len(res.data)), f
    assert "aborted" not in f["rest"], f
    after = instance_stats("hpx-spliced", time.time())
    assert grew(before, after, "http.spliced") == (port == SPLICED), socket_counters(after)


def test_close_delimited_spliced_body_logged_with_its_bytes(env):
    """A body until the origin's close, spliced: its bytes are the engine's, and the
    line (written when the engine forgets the pair) counts them all."""
    lab, _so, _ngx, procs = env
    path = f"/close/{3 << 20}"
    res = raw_request(lab, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), addr=PROXY, port=SPLICED)
    resp = res.response()
    assert res.end == "eof" and res.data[resp.head_len:] == stream_bytes(3 << 20)
    f = access_fields(procs[SPLICED].access_line(f" GET {path} "))
    assert (f["status"], f["mode"], f["in"], f["out"]) == (200, "spliced", 0, len(res.data)), f
    assert "aborted" not in f["rest"], f


CONNECT_COPIED = 3129


@pytest.mark.parametrize("port", [FORWARD, CONNECT_COPIED])
def test_connect_tunnel_logged_with_mode_and_bytes(env, port):
    """CONNECT to the scripted origin (port 8001 is allowed), then HTTP through the
    tunnel: the access line is written when the tunnel ends, says spliced or copied,
    and counts in the bytes the client sent through it, out everything it received."""
    lab, so, _ngx, procs = env
    proc = None
    if port == CONNECT_COPIED:
        proc = HTTPProxyProc(lab, port, "--no-splice", "--ports", "60500-60999", "--connect-ports", "8001",
                             instance="hpx-connect-copied")
    try:
        target = f"{so.addr}:{so.port}"
        inner = f"GET /len/{3 << 20}?connect={port} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        steps = [f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode(), ("until", b"\r\n\r\n"),
                 ("send", inner)]
        res = raw_exchange(lab, steps, addr=PROXY, port=port, idle=3.0)
        assert res.response().status == 200 and res.end == "eof", res.data[:300]
        rest = res.data[res.response().head_len:]
        inner_resp = parse_response(rest)
        assert rest[inner_resp.head_len:] == stream_bytes(3 << 20)
        f = access_fields((proc or procs[port]).access_line(f" CONNECT {target} "))
        want = "spliced" if port == FORWARD else "copied"
        assert (f["status"], f["mode"], f["in"], f["out"]) == (200, want, len(inner), len(res.data)), f
        assert "aborted" not in f["rest"], f
    finally:
        if proc is not None:
            assert proc.stop() == 0, proc.text()


@pytest.mark.parametrize("port", [SPLICED, COPIED])
def test_unasked_101_answered_502(env, port):
    """A 101 to a request that did not ask to upgrade: the origin would switch
    protocols under a client that expects HTTP.  Nothing went to the client yet: a
    502, and nothing of the origin's bytes after the 101."""
    lab, so, _ngx, procs = env
    target = f"/upgrade?force=1&port={port}"
    res = raw_exchange(lab, [f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), ("sleep", 0.3), b"ping"],
                       addr=PROXY, port=port, idle=2.0)
    assert res.response().status == 502 and res.end in ("eof", "reset"), res.data[:300]
    assert b"101" not in res.data.split(b"\r\n")[0] and b"ping" not in res.data, res.data
    assert [q["target"] for q in so.requests()].count(target) == 1
    f = access_fields(procs[port].access_line(f" GET {target} "))
    assert f["status"] == 502 and "did not ask to upgrade" in f["rest"], f


def test_connect_to_reverse_proxy_refused_405(env):
    """A reverse proxy's listener does not open tunnels: 405, and the origin never
    hears of it."""
    lab, so, _ngx, procs = env
    before = len(so.requests())
    target = f"{so.addr}:{so.port}"
    res = raw_request(lab, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nping".encode(),
                      addr=PROXY, port=SPLICED, idle=2.0)
    assert res.response().status == 405 and res.end in ("eof", "reset"), res.data[:300]
    assert len(so.requests()) == before
    f = access_fields(procs[SPLICED].access_line(f" CONNECT {target} "))
    assert f["status"] == 405 and "CONNECT is for the forward proxy" in f["rest"], f


def test_connect_that_cannot_connect_answered_502(env):
    """An allowed CONNECT (port 443) to an address where nothing listens: 502 with the
    reason, no tunnel, and the listener goes on serving."""
    lab, so, _ngx, procs = env
    target = "198.18.2.2:443"           # (the TLS test's s_server is gone by now)
    res = raw_request(lab, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode(),
                      addr=PROXY, port=FORWARD, idle=2.0)
    assert res.response().status == 502 and res.end in ("eof", "reset"), res.data[:300]
    assert b"Connection Established" not in res.data
    line = procs[FORWARD].access_line(f" CONNECT {target} 502 ")
    assert "Connection refused" in line, line
    r = curl(lab, "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://{PROXY}:{FORWARD}",
             f"http://{so.addr}:{so.port}/len/10")
    assert r.stdout == b"200", (r.stdout, r.stderr)


def test_nginx_origin_large_and_keepalive(env):
    lab, so, ngx, _procs = env
    big = ngx.add_file("big.bin", 32 << 20, seed=3)
    small = ngx.add_file("small.bin", 1000, seed=4)
    # Reverse proxy to nginx through the forward proxy's absolute form keeps this simple.
    r = curl(lab, "-x", f"http://{PROXY}:{FORWARD}", "-o", "-", f"http://{ngx.addr}:{ngx.port}/small.bin",
             "-o", "-", f"http://{ngx.addr}:{ngx.port}/big.bin", "-o", "-", f"http://{ngx.addr}:{ngx.port}/small.bin")
    assert r.returncode == 0, r.stderr
    assert sha(r.stdout[:1000]) == small and sha(r.stdout[1000:1000 + (32 << 20)]) == big
    assert sha(r.stdout[1000 + (32 << 20):]) == small


def assert_nothing_left(lab, procs, port: int) -> dict:
    """Wait (up to 20 s: the linger, the stats interval) until the splicing instance has
    no pair and holds no packet and no connection of PORT's listener is open in the
    proxy (ESTAB, or CLOSE-WAIT: the client closed, the proxy did not); then fail if one
    is left or the safety net dropped a packet.  Returns the last counters."""
    deadline = time.monotonic() + 20
    while True:
        st = instance_stats("hpx-spliced", time.time())
        left = [s for s in proxy_sockets(lab) if f" {PROXY}:{port} " in s and s.split()[0] in ("ESTAB", "CLOSE-WAIT")]
        if (st.get("pairs.active") == 0 and st.get("held.now") == 0 and not left) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert st.get("pairs.active") == 0 and st.get("held.now") == 0, (st.get("held.now"), st["pairs.oldest"])
    assert st.get("dropped.proxy_socket", 0) == 0, socket_counters(st)
    detail = lab.run(lab.proxy, "ss", "-tanoie").stdout.decode()
    assert not left, (left, detail, procs[port].access_lines()[-8:])
    return st


def grew(before: dict, after: dict, key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


def test_nothing_left_after_requests(env):
    lab, _so, _ngx, procs = env
    assert_nothing_left(lab, procs, SPLICED)


@pytest.mark.parametrize("how", ["reset", "close"])
def test_client_abort_mid_spliced_download_frees_everything(env, how):
    """A client that goes away in the middle of a spliced download, with bytes unread
    in its socket (its close sends a RST) or having read all that came while the origin
    pauses (a FIN; what the origin sends after it meets a closed socket: a RST): the
    pair ends, nothing is left (pairs, held packets, connections, and no packet dropped
    by the safety net), and the listener goes on splicing."""
    lab, so, _ngx, procs = env
    before = instance_stats("hpx-spliced", time.time())
    if how == "reset":
        path = f"/len/{64 << 20}?abort=reset"
        until = ("recv", 1 << 20)
    else:
        k = 1 << 20
        path = f"/stall/{16 << 20}/{k}/2?abort=close"
        until = ("until", stream_bytes(32, offset=k - 32))       # the last bytes before the pause
    req = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    res = raw_exchange(lab, [req, until, ("sleep", 0.3), ("close",)], addr=PROXY, port=SPLICED, idle=2.0)
    assert res.response().status == 200 and len(res.data) < expected_length(path), res.end
    f = access_fields(procs[SPLICED].access_line(f" GET {path} ", timeout=20))
    # Logged as cut, with what went (at least what the client read, less than the body).
    assert f["mode"] == "spliced" and "aborted" in f["rest"], f
    assert len(res.data) - res.response().head_len <= f["out"] < expected_length(path), (f, len(res.data))
    after = assert_nothing_left(lab, procs, SPLICED)
    ended = {k: grew(before, after, k) for k in after if k.startswith("pairs.done.") and grew(before, after, k)}
    assert ended == {"pairs.done.reset": 1} and grew(before, after, "http.spliced") == 1, ended
    # The next client's body is spliced (the stall keeps it from arriving whole first).
    r = curl(lab, "-o", "-", f"http://{PROXY}:{SPLICED}/stall/2000003/65536/1?after={how}")
    assert r.returncode == 0 and sha(r.stdout) == expected_sha256("/stall/2000003/65536/1"), r.stderr
    assert " spliced " in procs[SPLICED].access_line(f" GET /stall/2000003/65536/1?after={how} ")


@pytest.mark.parametrize("port", [SPLICED, COPIED])
def test_pipelined_requests_answered_in_order(env, port):
    lab, so, _ngx, _procs = env
    # Two bodies above the splice threshold: the requests behind each were read with
    # it (or reached the socket during the hand-off) and must be answered after it.
    paths = ["/len/10", "/len/300000", "/chunked/5000/999", "/len/3000", "/len/200000", "/len/1"]
    req = b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths)
    res = raw_exchange(lab, [req, ("recv", 1)], addr=PROXY, port=port, idle=1.5)
    pos = 0
    from netns_lab.origins import decode_chunked, parse_response
    for p in paths:
        resp = parse_response(res.data, pos)
        assert resp.status == 200, (p, res.data[pos:pos + 200])
        if resp.get("transfer-encoding"):
            body, _trailers, end, _sizes = decode_chunked(res.data, pos + resp.head_len)
            pos = end
        else:
            n = int(resp.get("content-length"))
            body = res.data[pos + resp.head_len:pos + resp.head_len + n]
            pos += resp.head_len + n
        assert sha(body) == expected_sha256(p), p
    assert pos == len(res.data)


SLOWLORIS = r"""
import json, selectors, socket, sys, time
addr, port, n, watch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
mute = int(sys.argv[5]) if len(sys.argv) > 5 else 0
sel = selectors.DefaultSelector()
for i in range(n):
    s = socket.create_connection((addr, port))
    if i >= mute:                          # (the first MUTE send nothing at all)
        s.send(b"GET /len/1 HTTP/1.1\r\nHost: x\r\n")      # and never the end of the head
    sel.register(s, selectors.EVENT_READ, [time.monotonic(), 0])
print("open", n, flush=True)
# How each connection ends: [seconds after it began, "eof" or "reset", bytes received].
ends = []
deadline = time.monotonic() + watch
while len(ends) < n and time.monotonic() < deadline:
    for key, _ in sel.select(0.1):
        began_got = key.data
        try:
            data = key.fileobj.recv(65536)
        except ConnectionResetError:
            data, how = None, "reset"
        else:
            how = "eof"
        if data:
            began_got[1] += len(data)
            continue
        ends.append([time.monotonic() - began_got[0], how, began_got[1]])
        sel.unregister(key.fileobj)
        key.fileobj.close()
print(json.dumps(ends), flush=True)
"""


def slowloris_ends(proc) -> list:
    """What SLOWLORIS (running as PROC) printed once it stopped watching: how each
    connection that ended did (those still open are not listed)."""
    return json.loads(proc.stdout.readline())


def test_slowloris_does_not_stop_a_normal_client(env):
    """1,100 connections that never finish their request head: a normal client is still
    served at once, its body spliced although its socket's descriptor is above 1023
    (beyond what select() can watch); the header timeout then closes them all (10 s by
    default), not before, without an answer."""
    lab, so, _ngx, procs = env
    n, timeout = 1100, 10.0
    slow = lab.popen(lab.client, sys.executable, "-c", SLOWLORIS, PROXY, str(SPLICED), str(n), str(timeout + 4),
                     stdout=subprocess.PIPE)
    try:
        assert slow.stdout.readline() == f"open {n}\n".encode()
        t0 = time.monotonic()
        path = "/len/16777216?slowloris=1"     # (16 MiB: spliced for sure)
        r = curl(lab, "-o", "-", f"http://{PROXY}:{SPLICED}{path}")
        assert r.returncode == 0 and sha(r.stdout) == expected_sha256(path), r.stderr
        assert time.monotonic() - t0 < 5
        assert " spliced " in procs[SPLICED].access_line(f" GET {path} ")
        ends = slowloris_ends(slow)
    finally:
        slow.kill()
        slow.wait()
    assert len(ends) == n, f"{n - len(ends)} of {n} still open {timeout + 4} s after their half head"
    assert {(how, got) for _t, how, got in ends} == {("eof", 0)}, ends[:5]
    times = sorted(t for t, _how, _got in ends)
    assert timeout - 0.05 <= times[0] and times[-1] <= timeout + 2.5, (times[0], times[-1])


# -- several listeners from a config file, upstream groups, the connection pool -------------
ORIGIN_A, ORIGIN_B, DEAD_1, DEAD_2 = 8001, 8002, 8009, 8008
ONE_A, ONE_B, ROUND_ROBIN, ONE_DEAD, ALL_DEAD = 8080, 8090, 8100, 8110, 8120
ORIGIN = "198.18.2.2"
STATS = "/run/nfsplice/cfg-multi.json"   # (instance_stats reads it)

MULTI_CONFIG = f"""\
# One process, five listeners (tests/test_http_proxy.py)
[[listener]]
listen = "{PROXY}:{ONE_A}"
upstreams = ["http://{ORIGIN}:{ORIGIN_A}"]
ports = "61000-61399"

[[listener]]
listen = "{PROXY}:{ONE_B}"
upstreams = ["http://{ORIGIN}:{ORIGIN_B}"]
ports = "61400-61799"
timeouts.pool_idle = 1

[[listener]]
listen = "{PROXY}:{ROUND_ROBIN}"
upstreams = ["http://{ORIGIN}:{ORIGIN_A}", "http://{ORIGIN}:{ORIGIN_B}"]
ports = "61800-62199"

[[listener]]
listen = "{PROXY}:{ONE_DEAD}"
upstreams = ["http://{ORIGIN}:{DEAD_1}", "http://{ORIGIN}:{ORIGIN_A}"]
ports = "62200-62599"
down_time = 60

[[listener]]
listen = "{PROXY}:{ALL_DEAD}"
upstreams = ["http://{ORIGIN}:{DEAD_1}", "http://{ORIGIN}:{DEAD_2}"]
ports = "62600-62999"
splice = false
"""


@pytest.fixture(scope="module")
def multi():
    """Two scripted origins; one nfsplice process serving the five listeners of MULTI_CONFIG."""
    with Lab("cfg") as lab, ScriptedOrigin(lab, port=ORIGIN_A) as a, ScriptedOrigin(lab, port=ORIGIN_B) as b:
        d = tempfile.mkdtemp(prefix="nfsplice-cfg-")
        path = os.path.join(d, "nfsplice.toml")
        with open(path, "w") as f:
            f.write(MULTI_CONFIG)
        if os.path.exists(STATS):          # a previous run's counters are not ours
            os.unlink(STATS)
        proc = HTTPProxyProc(lab, None, "--config", path, "--queue", "0", instance="cfg-multi")
        try:
            yield lab, a, b, proc
        finally:
            assert proc.stop() == 0, proc.text()
            assert "NFSPLICE" not in raw_rules(lab)


def stats(newer_than: float = 0.0) -> dict:
    """The counters of the config-file instance, written after NEWER_THAN (time.time())."""
    return instance_stats("cfg-multi", newer_than)


def fetch(lab, port: int, path: str) -> bytes:
    r = curl(lab, "-o", "-", f"http://{PROXY}:{port}{path}")
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_config_rules_one_set_per_splicing_listener(multi):
    lab, _a, _b, _proc = multi
    jumps = [l for l in raw_rules(lab).splitlines() if l.startswith("-A PREROUTING") and "NFSPLICE-" in l]
    names = sorted(l.split("nfsplice:")[1].split()[0] for l in jumps)
    assert names == ["cfg-multi", f"cfg-multi@{PROXY}:{ONE_B}", f"cfg-multi@{PROXY}:{ROUND_ROBIN}",
                     f"cfg-multi@{PROXY}:{ONE_DEAD}"], jumps       # not the copying listener's


def test_config_two_listeners_each_reach_their_own_origin(multi):
    lab, a, b, proc = multi
    assert sha(fetch(lab, ONE_A, "/len/1001")) == expected_sha256("/len/1001")
    assert sha(fetch(lab, ONE_B, "/len/1002")) == expected_sha256("/len/1002")
    # Large bodies are spliced on both listeners, each pair given back to its own.
    assert sha(fetch(lab, ONE_A, "/len/3000001")) == expected_sha256("/len/3000001")
    assert sha(fetch(lab, ONE_B, "/len/3000002")) == expected_sha256("/len/3000002")
    got_a = {q["target"] for q in a.requests()}
    got_b = {q["target"] for q in b.requests()}
    assert {"/len/1001", "/len/3000001"} <= got_a and not {"/len/1002", "/len/3000002"} & got_a
    assert {"/len/1002", "/len/3000002"} <= got_b and not {"/len/1001", "/len/3000001"} & got_b
    for path, origin in (("/len/3000001", ORIGIN_A), ("/len/3000002", ORIGIN_B)):
        line = proc.access_line(f" GET {path} ")
        assert " 200 " in line and " spliced " in line and f" upstream={ORIGIN}:{origin} " in line, line


def test_config_round_robin_over_two_origins(multi):
    lab, a, b, proc = multi
    n = 6
    args = []
    for _ in range(n):
        args += ["-o", "-", f"http://{PROXY}:{ROUND_ROBIN}/len/1100"]
    r = curl(lab, *args)
    assert r.returncode == 0 and r.stdout == stream_bytes(1100) * n, r.stderr
    lines = [l for l in proc.access_lines() if " GET /len/1100 " in l]
    ups = [l.split(" upstream=")[1].split()[0] for l in lines]
    assert len(ups) == n and all(x != y for x, y in zip(ups, ups[1:])), ups       # alternating
    assert set(ups) == {f"{ORIGIN}:{ORIGIN_A}", f"{ORIGIN}:{ORIGIN_B}"}
    assert [q["target"] for q in a.requests()].count("/len/1100") == n // 2
    assert [q["target"] for q in b.requests()].count("/len/1100") == n // 2


def test_config_refusing_upstream_is_skipped(multi):
    """Nothing listens on one of the two upstreams: it refuses once, is marked down for
    down_time (60 s) and skipped; every request is answered by the other."""
    lab, a, _b, proc = multi
    before = stats(newer_than=time.time())
    for i in range(6):
        assert sha(fetch(lab, ONE_DEAD, f"/len/{1200 + i}")) == expected_sha256(f"/len/{1200 + i}")
        line = proc.access_line(f" GET /len/{1200 + i} ")
        assert " 200 " in line and f" upstream={ORIGIN}:{ORIGIN_A} " in line, line
    after = stats(newer_than=time.time() + 0.1)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in
             ("http.upstream_down", "http.upstream_connect_failed", "http.upstream_retries")}
    assert delta == {"http.upstream_down": 1, "http.upstream_connect_failed": 1,
                     "http.upstream_retries": 1}, delta


def test_config_all_upstreams_down_answers_502(multi):
    """Both refuse: each is tried once (a failed connect sent nothing), then 502; the
    next request still tries the one whose down period ends first."""
    lab, _a, _b, proc = multi
    for i in range(2):
        r = curl(lab, "-o", "/dev/null", "-w", "%{http_code}", f"http://{PROXY}:{ALL_DEAD}/len/{1300 + i}")
        assert r.stdout == b"502", (r.stdout, r.stderr)
        line = proc.access_line(f" GET /len/{1300 + i} ")
        assert "Connection refused" in line, line
    st = stats(newer_than=time.time() + 0.1)
    assert st["http.status_502"] >= 2


def test_config_pool_reuses_one_upstream_connection(multi):
    """Sequential client connections, one upstream connection: it goes back to the pool
    after each exchange and the next client takes it."""
    lab, a, _b, proc = multi
    before = stats(newer_than=time.time())
    paths = [f"/len/{1400 + i}" for i in range(5)]
    for p in paths:
        assert sha(fetch(lab, ONE_A, p)) == expected_sha256(p)
        proc.access_line(f" GET {p} ")           # logged once the connection is back in the pool
    reqs = [q for q in a.requests() if q["target"] in paths]
    assert len(reqs) == 5 and len({q["conn"] for q in reqs}) == 1, reqs
    seqs = [q["seq"] for q in reqs]
    assert seqs == list(range(seqs[0], seqs[0] + 5))
    after = stats(newer_than=time.time() + 0.1)
    assert after["http.pool_reused"] - before.get("http.pool_reused", 0) >= 4


def test_config_spliced_body_then_pooled_reuse(multi):
    """A spliced body is resumed (both sockets rebuilt) and its upstream connection goes
    back to the pool: the next clients' requests, small and spliced, ride on it, and
    every body is byte-exact."""
    lab, a, _b, proc = multi
    # (The stalls keep those bodies from reaching the proxy whole before the hand-off,
    # which the open windows of a resumed connection allow: they are spliced for sure.)
    paths = ["/stall/2000001/65536/1", "/len/1501", "/len/1048577", "/len/1502", "/stall/4000003/65536/1",
             "/len/1503"]
    for p in paths:
        assert sha(fetch(lab, ONE_A, p)) == expected_sha256(p), p
        line = proc.access_line(f" GET {p} ")
        assert " 200 " in line, line
        if p.startswith("/stall"):
            assert " spliced " in line, line
        elif expected_length(p) < 65536:
            assert " copied " in line, line
    reqs = [q for q in a.requests() if q["target"] in paths]
    assert [q["target"] for q in reqs] == paths
    assert len({q["conn"] for q in reqs}) == 1, reqs
    seqs = [q["seq"] for q in reqs]
    assert seqs == list(range(seqs[0], seqs[0] + len(paths)))
    st = stats(newer_than=time.time() + 0.1)
    assert st["http.resumed"] >= 2 and st.get("dropped.proxy_socket", 0) == 0, socket_counters(st)


def test_config_idle_pooled_connection_closed_after_pool_idle(multi):
    lab, _a, b, _proc = multi
    before = stats(newer_than=time.time())
    fetch(lab, ONE_B, "/len/1601")
    time.sleep(2.0)                                # timeouts.pool_idle = 1 on this listener
    after = stats(newer_than=time.time())
    assert after["http.pool_expired"] - before.get("http.pool_expired", 0) >= 1
    fetch(lab, ONE_B, "/len/1602")
    conns = {q["target"]: q["conn"] for q in b.requests()}
    assert conns["/len/1601"] != conns["/len/1602"]


def test_config_partly_read_response_retires_its_connection(multi):
    """The client goes away in the middle of a copied (chunked) body: the rest of the
    response is never read, so its upstream connection is closed, not pooled (and not
    merely found readable when taken from the pool: http.upstream_unsolicited)."""
    lab, a, _b, _proc = multi
    before = stats(newer_than=time.time())
    # 64 MiB is more than the socket buffers hold: the proxy is still copying when the
    # client closes with unread bytes (a reset).
    path = f"/chunked/{64 << 20}/65536"
    req = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    raw_exchange(lab, [req, ("recv", 20000), ("sleep", 0.5), ("close",)], addr=PROXY, port=ONE_A, idle=2.0)
    time.sleep(0.5)
    fetch(lab, ONE_A, "/len/1701")
    conns = {q["target"]: q["conn"] for q in a.requests()}
    assert conns[path] != conns["/len/1701"]
    after = stats(newer_than=time.time())
    assert after.get("http.upstream_unsolicited", 0) == before.get("http.upstream_unsolicited", 0)
