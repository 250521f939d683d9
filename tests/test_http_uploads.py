"""Request bodies (uploads) spliced by `nfsplice http`, in the lab, byte for byte.

A Content-Length request body of at least --splice-threshold bytes is handed to the
engine with the body's length as the client's message end and nothing of the
origin's; at the end the proxy rebuilds both sockets and reads the response itself.
The scripted origin's /echo answers with the sha256 of what it received; nginx (dav)
stores a PUT that is then read back.  With and without the fast path, with 1 % loss.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time

import pytest

from netns_lab.origins import NginxOrigin, ScriptedOrigin, raw_exchange, stream_sha256
from netns_lab.topology import Lab
from tests.splicer import instance_stats, socket_counters
from tests.test_http_proxy import PROXY, HTTPProxyProc, access_fields, curl, sha, stop_all

pytestmark = pytest.mark.root

FAST, QUEUED, COPIED = 8090, 8091, 8092
INSTANCES = {FAST: "hup-fast", QUEUED: "hup-queued", COPIED: "hup-copied"}


@pytest.fixture(scope="module")
def env():
    with Lab("hup") as lab, ScriptedOrigin(lab) as so, NginxOrigin(lab) as ngx:
        up = ["--upstream", f"http://{so.addr}:{so.port}"]
        procs = {
            FAST: HTTPProxyProc(lab, FAST, *up, "--queue", "10", "--fastpath", "on", "--ports", "63000-63299",
                                instance=INSTANCES[FAST]),
            QUEUED: HTTPProxyProc(lab, QUEUED, *up, "--queue", "12", "--fastpath", "off", "--ports", "63300-63599",
                                  instance=INSTANCES[QUEUED]),
            COPIED: HTTPProxyProc(lab, COPIED, *up, "--no-splice", "--ports", "63600-63899",
                                  instance=INSTANCES[COPIED]),
        }
        try:
            yield lab, so, ngx, procs
        finally:
            stop_all(lab, procs.values())
            shutil.rmtree(_FILES.pop("dir", ""), ignore_errors=True)


_FILES: dict[str, str] = {}     # the module's temporary directory (removed by env)


def body_file(n: int, seed: int) -> tuple[str, str]:
    """A file of N pseudo-random bytes and its sha256."""
    data = hashlib.shake_256(seed.to_bytes(4, "big")).digest(n) if n else b""
    if "dir" not in _FILES:
        _FILES["dir"] = tempfile.mkdtemp(prefix="hup-")
    d = _FILES["dir"]
    path = os.path.join(d, f"up-{n}-{seed}.bin")
    with open(path, "wb") as f:
        f.write(data)
    return path, sha(data)


def upload(lab, port: int, path: str, *extra: str, target: str = "/echo?discard=1") -> str:
    r = curl(lab, "-D", "-", "-o", "/dev/null", *extra, "--data-binary", f"@{path}", f"http://{PROXY}:{port}{target}")
    assert r.returncode == 0, r.stderr
    return r.stdout.decode(errors="replace").lower()


@pytest.mark.parametrize("port", [FAST, QUEUED, COPIED])
@pytest.mark.parametrize("size", [1000, 65536, 300000, 4 << 20])
def test_upload_exact(env, port, size):
    lab, _so, _ngx, procs = env
    path, digest = body_file(size, size)
    head = upload(lab, port, path, "-H", f"X-Case: exact-{size}")
    assert f"x-body-sha256: {digest}" in head and f"x-body-length: {size}" in head, head
    line = procs[port].access_line(" POST /echo?discard=1 ")
    assert " 200 " in line, line
    if port == COPIED or size < 65536:
        assert " copied " in line, line
    elif size >= 300000:
        # (a 64 KiB body may reach the proxy's socket whole before the hand-off: copied)
        assert " spliced " in line, line


@pytest.mark.parametrize("port", [FAST, QUEUED])
def test_upload_then_requests_on_the_same_connections(env, port):
    """After a spliced upload both connections are the proxy's again: the response is
    read and forwarded, the next requests (another upload, a download) use the same
    client connection, and every byte is where it belongs."""
    lab, so, _ngx, procs = env
    p1, d1 = body_file(2 << 20, 1)
    p2, d2 = body_file(700000, 2)
    so.clear_log()
    r = curl(lab, "-w", "%{num_connects}\n", "-D", "-", "-o", "/dev/null",
             "--data-binary", f"@{p1}", f"http://{PROXY}:{port}/echo?discard=1", "--next",
             "-w", "%{num_connects}\n", "-D", "-", "-o", "/dev/null",
             "--data-binary", f"@{p2}", f"http://{PROXY}:{port}/echo?discard=1", "--next",
             "-w", "%{num_connects}\n", "-o", "/dev/null", f"http://{PROXY}:{port}/len/1048576")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode().lower()
    assert f"x-body-sha256: {d1}" in out and f"x-body-sha256: {d2}" in out, out
    assert [l for l in out.splitlines() if l in ("0", "1")] == ["1", "0", "0"], out
    reqs = so.requests()
    assert len({q["conn"] for q in reqs}) == 1, reqs
    assert [q["body_length"] for q in reqs] == [2 << 20, 700000, 0]
    first, second = [l for l in procs[port].access_lines() if " POST /echo?discard=1 " in l][-2:]
    assert " spliced " in first, first
    # (After a resume the windows are wide open: the whole second body may have reached
    # the proxy's socket before the hand-off, and then the proxy copied it.)
    assert " spliced " in second or " copied " in second, second


@pytest.mark.parametrize("port", [FAST, QUEUED])
def test_upload_with_expect_continue(env, port):
    lab, _so, _ngx, procs = env
    path, digest = body_file(3 << 20, 3)
    head = upload(lab, port, path, "-H", "Expect: 100-continue", target="/expect")
    assert "100 continue" in head and f"x-body-sha256: {digest}" in head, head
    assert " spliced " in procs[port].access_line(" POST /expect ")


@pytest.mark.parametrize("client_wait", [1, 30])
@pytest.mark.parametrize("port", [FAST, COPIED])
def test_expect_continue_ignored_by_the_origin(env, port, client_wait):
    """The origin ignores Expect: 100-continue and waits for the body (as many servers
    do): the proxy waits for its 100 only a moment, then tells the client to go on
    with a 100 of its own, so a client that would wait long for one (curl's
    --expect100-timeout) sends the body at once.  The body arrives whole, long before
    the response timeout (60 s) would end the request with a 504 or the head timeout
    (10 s) the client's connection."""
    lab, so, _ngx, procs = env
    path, digest = body_file(1 << 20, 12)
    target = f"/echo?discard=1&ignore_expect=1&port={port}&wait={client_wait}"
    t0 = time.monotonic()
    head = upload(lab, port, path, "-H", "Expect: 100-continue", "--expect100-timeout", str(client_wait),
                  target=target)
    took = time.monotonic() - t0
    assert "\nhttp/1.1 200" in "\n" + head and f"x-body-sha256: {digest}" in head, head
    if client_wait > 10:
        assert head.startswith("http/1.1 100 continue"), head      # the proxy's: the origin sent none
    got = [q for q in so.requests() if q["target"] == target]
    assert [(q["body_length"], q["body_sha256"], q["sent_100"]) for q in got] == [(1 << 20, digest, 0)], got
    assert took < 10, took
    assert " 200 " in procs[port].access_line(f" POST {target} ")


@pytest.mark.parametrize("port", [FAST, QUEUED])
def test_upload_with_pipelined_request_behind_it(env, port):
    """The next request is written right behind the body, in the same segments: it is
    not forwarded as part of the body, and it is answered after the upload's response."""
    lab, _so, _ngx, _procs = env
    body = hashlib.shake_256(b"pipelined").digest(1 << 20)
    req = (b"POST /echo?discard=1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
           + b"GET /len/5000 HTTP/1.1\r\nHost: x\r\n\r\n")
    res = raw_exchange(lab, [req], addr=PROXY, port=port, idle=3.0)
    first = res.response()
    assert first.status == 200 and first.get("x-body-sha256") == sha(body), res.data[:400]
    second = res.response(first.head_len + int(first.get("content-length")))
    assert second.status == 200 and int(second.get("content-length")) == 5000, res.data[-300:]


@pytest.mark.parametrize("port", [FAST, QUEUED])
def test_upload_to_nginx_and_back(env, port):
    """A PUT stored by a real server (nginx, dav) reads back the same, through the proxy
    in forward mode (absolute-form) on the same listener's engine."""
    lab, _so, ngx, procs = env
    path, digest = body_file(6 << 20, 6)
    name = f"up-{port}.bin"
    url = f"http://{ngx.addr}:{ngx.port}/upload/{name}"
    # The reverse listener's upstream is the scripted origin; nginx is reached directly
    # by a forward proxy on the same engine features.
    fwd = HTTPProxyProc(lab, port + 100, "--queue", str(20 + port - FAST), "--ports", f"{64000 + 300 * (port - FAST)}-"
                        f"{64000 + 300 * (port - FAST) + 299}",
                        *(["--fastpath", "off"] if port == QUEUED else ["--fastpath", "on"]),
                        instance=f"hup-fwd{port - FAST}")
    try:
        r = curl(lab, "-x", f"http://{PROXY}:{port + 100}", "-T", path, "-o", "/dev/null", "-w", "%{http_code}", url)
        assert r.returncode == 0 and r.stdout in (b"201", b"204"), (r.stdout, r.stderr)
        assert " spliced " in fwd.access_line(f" PUT {url} ")
        r = curl(lab, "-x", f"http://{PROXY}:{port + 100}", "-o", "-", url)
        assert r.returncode == 0 and sha(r.stdout) == digest
    finally:
        assert fwd.stop() == 0, fwd.text()


@pytest.mark.parametrize("port", [FAST, QUEUED])
def test_upload_with_loss(env, port):
    """1 % of the packets dropped in every namespace: the engine forwards what TCP
    retransmits, the body arrives whole, the response after it."""
    lab, _so, _ngx, _procs = env
    path, digest = body_file(8 << 20, 8)
    with lab.lossy(1, mss_sized=False) as dropped:
        for i in range(2):
            head = upload(lab, port, path, "-H", f"X-Round: {i}")
            assert f"x-body-sha256: {digest}" in head, head
        drops = dropped()
    assert drops > 0, "the loss rule dropped nothing"


@pytest.mark.parametrize("port", [FAST, QUEUED])
def test_client_abort_mid_upload_frees_everything(env, port):
    """A client that stops half-way through its body and closes: the pair ends, no
    engine pair or proxy socket is left, and the next upload is served."""
    lab, _so, _ngx, _procs = env
    head = b"POST /echo?discard=1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (4 << 20)
    raw_exchange(lab, [head, b"x" * (1 << 20), ("sleep", 0.5), ("close",)], addr=PROXY, port=port, idle=1.0)
    deadline = time.monotonic() + 20
    while True:
        st = instance_stats(INSTANCES[port], newer_than=time.time())
        if st.get("pairs.active") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert st.get("pairs.active") == 0, st
    assert st.get("dropped.proxy_socket", 0) == 0, socket_counters(st)
    path, digest = body_file(300000, 9)
    assert f"x-body-sha256: {digest}" in upload(lab, port, path)


@pytest.mark.parametrize("port", [FAST, QUEUED])
def test_origin_answers_before_the_body_ends(env, port):
    """The origin refuses (417) without reading a spliced body and closes: the client
    is not left hanging (an answer or a visible error within bounds), and the listener
    goes on serving."""
    lab, _so, _ngx, _procs = env
    path, _digest = body_file(4 << 20, 10)
    t0 = time.monotonic()
    r = curl(lab, "-o", "/dev/null", "-w", "%{http_code}", "--data-binary", f"@{path}",
             f"http://{PROXY}:{port}/expect?reject=1")
    assert time.monotonic() - t0 < 30
    assert r.stdout in (b"417", b"000"), (r.stdout, r.stderr)    # the refusal, or a visible error
    path, digest = body_file(500000, 11)
    assert f"x-body-sha256: {digest}" in upload(lab, port, path)


@pytest.mark.parametrize("port", [FAST, QUEUED])
@pytest.mark.parametrize("size", [300000, 5 << 20])
def test_chunked_upload_exact_then_pipelined_request(env, port, size):
    """A chunked request body (chunks of varied sizes, an extension, a trailer) with the
    next request written right behind it: the body is spliced past the threshold with
    the engine following its framing, the origin gets it whole, and the next request
    is answered after it on the same connection."""
    lab, so, _ngx, procs = env
    body = hashlib.shake_256(b"chunked-up-%d" % size).digest(size)
    wire, pos, i = bytearray(), 0, 0
    while pos < size:
        n = min((1, 7, 4096, 65536, 300001)[i % 5], size - pos)
        wire += b"%x;i=%d\r\n" % (n, i) + body[pos:pos + n] + b"\r\n"
        pos, i = pos + n, i + 1
    wire += b"0\r\nX-Sum: done\r\n\r\n"
    so.clear_log()
    req = (b"POST /echo?discard=1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + wire
           + b"GET /len/4000 HTTP/1.1\r\nHost: x\r\n\r\n")
    res = raw_exchange(lab, [req], addr=PROXY, port=port, idle=3.0)
    first = res.response()
    assert first.status == 200 and first.get("x-body-sha256") == sha(body), res.data[:300]
    second = res.response(first.head_len + int(first.get("content-length")))
    assert second.status == 200 and int(second.get("content-length")) == 4000, res.data[-300:]
    got = so.requests()
    assert [q["target"] for q in got] == ["/echo?discard=1", "/len/4000"], got
    assert got[0]["chunked"] and got[0]["body_length"] == size
    line = procs[port].access_line(" POST /echo?discard=1 ")
    assert " spliced " in line or (size < 1 << 20 and " copied " in line), line


# -- the copying listener (--no-splice) beside a splicing one ---------------------------------
def chunked_wire(body: bytes, trailer: bool) -> bytes:
    """BODY chunked (sizes 1, 7, 4096, 65536, 300001 in turn, an extension on each),
    ended by a last-chunk with an X-Sum trailer (its sha256) or none."""
    out, pos, i = bytearray(), 0, 0
    while pos < len(body):
        n = min((1, 7, 4096, 65536, 300001)[i % 5], len(body) - pos)
        out += b"%x;i=%d\r\n" % (n, i) + body[pos:pos + n] + b"\r\n"
        pos, i = pos + n, i + 1
    return bytes(out) + b"0\r\n" + (b"X-Sum: %s\r\n" % sha(body).encode() if trailer else b"") + b"\r\n"


@pytest.mark.parametrize("port", [FAST, COPIED])
@pytest.mark.parametrize("trailer", [False, True], ids=["plain", "trailer"])
@pytest.mark.parametrize("size", [1000, 100000, 3 << 20])
def test_chunked_upload_spliced_and_copied(env, port, trailer, size):
    """A chunked request body, small or long enough to be spliced on FAST, with or
    without a trailer: the origin gets the body, its chunked framing and the trailer
    exactly (the X-Body-SHA256 it answers and its own log), on both listeners."""
    lab, so, _ngx, procs = env
    body = hashlib.shake_256(b"chunked-both-%d" % size).digest(size)
    target = f"/echo?discard=1&case=chunked-{port}-{size}-{int(trailer)}"
    req = (f"POST {target} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
           + chunked_wire(body, trailer))
    res = raw_exchange(lab, [req, ("until", b"\r\n\r\n"), ("close",)], addr=PROXY, port=port, idle=5.0)
    resp = res.response()
    assert resp.status == 200 and resp.get("x-body-sha256") == sha(body), res.data[:300]
    assert resp.get("x-body-length") == str(size) and resp.get("x-request-chunked") == "1", resp.headers
    got = [q for q in so.requests() if q["target"] == target]
    assert [(q["chunked"], q["body_length"], q["body_sha256"]) for q in got] == [(True, size, sha(body))], got
    assert got[0]["trailers"] == ([["X-Sum", sha(body)]] if trailer else []), got[0]["trailers"]
    line = procs[port].access_line(f" POST {target} ")
    mode = access_fields(line)["mode"]
    if port == COPIED or size < 65536:
        assert mode == "copied", line
    elif size >= 1 << 20:
        assert mode == "spliced", line


@pytest.mark.parametrize("port", [FAST, COPIED])
def test_expect_continue_upload_spliced_and_copied(env, port):
    """Expect: 100-continue, and the origin sends its 100: the proxy passes it on at
    once (curl would otherwise wait its 20 s before sending), the body arrives whole."""
    lab, so, _ngx, procs = env
    path, digest = body_file(3 << 20, 13)
    target = f"/echo?discard=1&case=expect-{port}"
    t0 = time.monotonic()
    head = upload(lab, port, path, "-H", "Expect: 100-continue", "--expect100-timeout", "20", target=target)
    took = time.monotonic() - t0
    assert head.startswith("http/1.1 100 continue") and f"x-body-sha256: {digest}" in head, head
    assert took < 10, took
    got = [q for q in so.requests() if q["target"] == target]
    assert [(q["body_length"], q["body_sha256"], q["sent_100"]) for q in got] == [(3 << 20, digest, 1)], got
    line = procs[port].access_line(f" POST {target} ")
    assert access_fields(line)["status"] == 200, line
    assert access_fields(line)["mode"] == ("copied" if port == COPIED else "spliced"), line


@pytest.mark.parametrize("port", [FAST, COPIED])
def test_expect_continue_refused_before_the_body(env, port):
    """Expect: 100-continue, and the origin answers 417 without reading the body: the
    client gets the 417 at once (not after its 20 s wait) and sends no body; the origin
    read none; the listener goes on serving."""
    lab, so, _ngx, procs = env
    path, _digest = body_file(4 << 20, 14)
    target = f"/expect?reject=1&case=reject-{port}"
    t0 = time.monotonic()
    r = curl(lab, "-o", "/dev/null", "-w", "%{http_code} %{size_upload}", "-H", "Expect: 100-continue",
             "--expect100-timeout", "20", "--data-binary", f"@{path}", f"http://{PROXY}:{port}{target}")
    took = time.monotonic() - t0
    assert r.returncode == 0 and r.stdout == b"417 0", (r.stdout, r.stderr)
    assert took < 10, took
    got = [q for q in so.requests() if q["target"] == target]
    assert [(q["body_read"], q["body_length"]) for q in got] == [(False, None)], got
    f = access_fields(procs[port].access_line(f" POST {target} "))
    assert (f["status"], f["in"]) == (417, 0), f
    path, digest = body_file(500000, 15)
    assert f"x-body-sha256: {digest}" in upload(lab, port, path)


@pytest.mark.parametrize("port", [FAST, COPIED])
def test_downloads_and_upload_with_loss(env, port):
    """1 % of the (MSS-sized) packets dropped in every namespace: a Content-Length and a
    chunked response of 4 MiB, and a 4 MiB upload, all exact, through each listener."""
    lab, so, _ngx, procs = env
    n = 4 << 20
    chunked = f"/chunked/{n}/20000?mix=5&ext=1&trailer=1&case=loss-{port}"
    path, digest = body_file(n, 16)
    target = f"/echo?discard=1&case=loss-{port}"
    with lab.lossy(1) as dropped:
        r = curl(lab, "-o", "-", f"http://{PROXY}:{port}/len/{n}?case=loss-{port}",
                 "-o", "-", f"http://{PROXY}:{port}{chunked}", timeout=120)
        head = upload(lab, port, path, target=target)
        drops = dropped()
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == 2 * n, len(r.stdout)
    assert sha(r.stdout[:n]) == stream_sha256(n) and sha(r.stdout[n:]) == stream_sha256(n)
    assert f"x-body-sha256: {digest}" in head, head
    got = [q for q in so.requests() if q["target"] == target]
    assert [(q["body_length"], q["body_sha256"]) for q in got] == [(n, digest)], got
    assert drops > 0, "the loss rule dropped nothing"
    if port == COPIED:
        for needle in (f" GET /len/{n}?case=loss-{port} ", f" GET {chunked} ", f" POST {target} "):
            assert " copied " in procs[port].access_line(needle)
