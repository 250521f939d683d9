"""`nfsplice http` in the lab: real clients (curl, raw sockets), a scripted origin that
misbehaves on demand, nginx; spliced and copied (--no-splice) side by side.

Bodies are checked by sha256 against what the origin sent; the proxy's access log
says which were spliced; faults must leave the client with a visibly truncated message.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from netns_lab.origins import (BAD_CASES, NginxOrigin, ScriptedOrigin, expected_length, expected_sha256,
                               raw_exchange, raw_request, stream_bytes)
from netns_lab.topology import Lab
from tests.splicer import REPO, proxy_sockets, raw_rules

pytestmark = pytest.mark.root

SPLICED, COPIED, FORWARD = 8080, 8081, 3128
PROXY = "198.18.1.1"


class HTTPProxyProc:
    def __init__(self, lab, port: int, *args: str, instance: str):
        self.lab, self.port, self.instance = lab, port, instance
        self.dir = tempfile.mkdtemp(prefix=f"nfsplice-{instance}-")
        self.access = os.path.join(self.dir, "access.log")
        ready = os.path.join(self.dir, "ready")
        self.log = open(os.path.join(self.dir, "stderr.log"), "w")
        argv = [sys.executable, "-m", "nfsplice", "http", "--listen", f"{PROXY}:{port}", "--instance", instance,
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
            codes = {p.instance: p.stop() for p in (spliced, copied, forward)}
            assert codes == {"hpx-spliced": 0, "hpx-copied": 0, "hpx-forward": 0}, codes
            assert "NFSPLICE" not in raw_rules(lab)


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
    want = "spliced" if port == SPLICED and (n >= 65536 and "chunked" not in path
                                             or path.startswith("/close")) else "copied"
    assert " 200 " in line, line
    if port == SPLICED and want == "spliced" and n < 300000:
        # A body this small may have arrived whole before the engine held the pair:
        # then the proxy delivered it itself, and the log says "copied".
        assert " spliced " in line or " copied " in line, line
    else:
        assert f" {want} " in line, line


@pytest.mark.parametrize("port", [SPLICED, COPIED])
def test_keepalive_sequence_of_mixed_sizes(env, port):
    """One client connection, responses of mixed sizes: the next response's head is
    never taken for body (every body exact), and a spliced one closes the connection."""
    lab, so, _ngx, _procs = env
    paths = ["/len/100", "/len/2000", "/len/300000", "/len/10", "/chunked/70000/1000", "/len/1048576", "/len/5"]
    args = []
    for p in paths:
        args += ["-o", "-", f"http://{PROXY}:{port}{p}"]
    r = curl(lab, *args)
    assert r.returncode == 0, r.stderr
    off = 0
    for p in paths:
        n = expected_length(p)
        assert sha(r.stdout[off:off + n]) == expected_sha256(p), p
        off += n
    assert off == len(r.stdout)


def test_keepalive_survives_spliced_bodies(env):
    """After a spliced body the proxy rebuilds its two sockets (TCP_REPAIR) and goes on:
    one client connection and one origin connection carry every request."""
    lab, so, _ngx, procs = env
    so.clear_log()
    paths = ["/len/2000000", "/len/10", "/len/1048576", "/len/5000", "/len/3000000"]
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
    assert len(conns) == 1 and [q["seq"] for q in so.requests()] == [1, 2, 3, 4, 5]
    for p in ("/len/2000000", "/len/1048576", "/len/3000000"):
        assert " spliced " in procs[SPLICED].access_line(f" GET {p} ")


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


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_requests_refused(env, name):
    lab, so, _ngx, _procs = env
    req, status = BAD_REQUESTS[name]
    before = len(so.requests())
    res = raw_request(lab, req, addr=PROXY, port=SPLICED, idle=2.0)
    assert res.response().status == status, res.data[:200]
    assert res.end in ("eof", "reset")
    assert len(so.requests()) == before, "a refused request reached the origin"


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


def test_upgrade_101_turns_into_a_tunnel(env):
    lab, so, _ngx, _procs = env
    req = b"GET /upgrade HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n"
    payload = os.urandom(100000)
    res = raw_exchange(lab, [req, ("until", b"\r\n\r\n"), ("send", payload), ("recv", 0), ("shutdown",)],
                       addr=PROXY, port=SPLICED, idle=2.0)
    resp = res.response()
    assert resp.status == 101
    assert res.data.endswith(payload)


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


def test_nothing_left_after_requests(env):
    lab, _so, _ngx, procs = env
    import json
    deadline = time.monotonic() + 10     # linger (1 s) and the stats interval
    while True:
        with open("/run/nfsplice/hpx-spliced.json") as f:
            st = json.load(f)
        if st["pairs.active"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert st["pairs.active"] == 0 and st.get("dropped.proxy_socket", 0) == 0, st["pairs.oldest"]
    deadline = time.monotonic() + 10
    while True:
        left = [s for s in proxy_sockets(lab) if ":8080 " in s and "ESTAB" in s]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    detail = lab.run(lab.proxy, "ss", "-tanoie").stdout.decode()
    assert not left, (left, detail, procs[SPLICED].access_lines()[-8:])


@pytest.mark.parametrize("port", [SPLICED, COPIED])
def test_pipelined_requests_answered_in_order(env, port):
    lab, so, _ngx, _procs = env
    paths = ["/len/10", "/chunked/5000/999", "/len/3000", "/len/1"]
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
import socket, sys, time
n = int(sys.argv[1])
socks = []
for i in range(n):
    s = socket.socket()
    s.setblocking(True)
    s.connect(("198.18.1.1", 8080))
    s.send(b"GET /len/1 HTTP/1.1\r\nHost: x\r\n")      # and never the end of the head
    socks.append(s)
print("open", len(socks), flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_slowloris_does_not_stop_a_normal_client(env):
    """1,000 connections that never finish their request head: a normal client is still
    served at once; the header timeout then closes them (10 s by default)."""
    lab, so, _ngx, procs = env
    slow = lab.popen(lab.client, sys.executable, "-c", SLOWLORIS, "1000", "15", stdout=subprocess.PIPE)
    try:
        assert slow.stdout.readline().startswith(b"open 1000")
        t0 = time.monotonic()
        r = curl(lab, "-o", "-", f"http://{PROXY}:{SPLICED}/len/1048576")
        assert r.returncode == 0 and sha(r.stdout) == expected_sha256("/len/1048576"), r.stderr
        assert time.monotonic() - t0 < 5
    finally:
        slow.kill()
        slow.wait()
