"""Chunked response bodies spliced by `nfsplice http`, in the lab, byte for byte.

A chunked body still going after --splice-threshold (64 KiB here) bytes were copied is
spliced with the proxy's ChunkedScanner as the origin's message end: the engine follows
the chunk framing, so the client gets exactly the message (framing, extensions and
trailers as the origin sent them) and nothing after it, and keep-alive survives.  With
and without the fast path (whose flows end where the next framing bytes must be read),
with 1 % loss, nginx as a chunked origin, and origins that break off or send a
malformed chunk-size line in the middle: the client always sees a truncated message.
"""
from __future__ import annotations

import time

import pytest

from netns_lab.origins import (NginxOrigin, ScriptedOrigin, decode_chunked, expected_sha256, parse_response,
                               raw_exchange, stream_sha256)
from netns_lab.topology import Lab
from tests.splicer import instance_stats
from tests.test_http_proxy import PROXY, HTTPProxyProc, curl, sha, stop_all

pytestmark = pytest.mark.root

FAST, QUEUED, FORWARD = 8080, 8081, 3128
INSTANCES = {FAST: "chk-fast", QUEUED: "chk-queued", FORWARD: "chk-forward"}
MIB = 1 << 20


@pytest.fixture(scope="module")
def env():
    with Lab("chk") as lab, ScriptedOrigin(lab) as so, NginxOrigin(lab) as ngx:
        up = ["--upstream", f"http://{so.addr}:{so.port}"]
        procs = {
            FAST: HTTPProxyProc(lab, FAST, *up, "--queue", "0", "--fastpath", "on", "--ports", "61000-61499",
                                instance=INSTANCES[FAST]),
            QUEUED: HTTPProxyProc(lab, QUEUED, *up, "--queue", "2", "--fastpath", "off", "--ports", "61500-61999",
                                  instance=INSTANCES[QUEUED]),
            FORWARD: HTTPProxyProc(lab, FORWARD, "--queue", "4", "--fastpath", "off", "--ports", "62000-62499",
                                   instance=INSTANCES[FORWARD]),
        }
        try:
            yield lab, so, ngx, procs
        finally:
            stop_all(lab, procs.values())


def stats(port: int, newer_than: float = 0.0) -> dict:
    """The instance's counters (engine and proxy), written after NEWER_THAN (time.time())."""
    return instance_stats(INSTANCES[port], newer_than)


def grew(before: dict, after: dict, key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


def wire(data: bytes, pos: int = 0):
    """The response at POS: (head, decoded body, trailers, chunk sizes, end position)."""
    resp = parse_response(data, pos)
    assert resp.get("transfer-encoding") == "chunked", resp.headers
    body, trailers, end, sizes = decode_chunked(data, pos + resp.head_len)
    return resp, body, trailers, sizes, end


# 10 KiB (copied: below the threshold), 200 KiB (the origin pauses after 100 KiB, so the
# rest is the engine's, not the drain's), 5 MiB of mixed chunk sizes (a quarter of them
# 1 byte) with extensions and a trailer, 1 MiB of chunks of at most 64 bytes.
BODIES = {
    "10k": (f"/chunked/{10 << 10}/1000?ext=1", False),
    "200k": (f"/chunked/{200 << 10}/4096?ext=1&trailer=1&pause={100 << 10}", True),
    "5m-mixed": (f"/chunked/{5 * MIB}/65536?mix=7&ext=1&trailer=1", True),
    "1m-tiny": (f"/chunked/{MIB}/64?mix=3&trailer=1", True),
}


@pytest.mark.parametrize("port", [FAST, QUEUED])
@pytest.mark.parametrize("name", list(BODIES))
def test_chunked_body_exact_then_next_request(env, port, name):
    """The chunked response, then a small one on the same connection (pipelined: both
    requests sent at once).  The wire is exact: the decoded body, its trailer, and the
    next response's head right after the last chunk (never forwarded as body)."""
    lab, so, _ngx, procs = env
    path, spliced = BODIES[name]
    before = stats(port, time.time())
    reqs = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\nGET /len/777 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    res = raw_exchange(lab, [reqs, ("recv", 1)], addr=PROXY, port=port, idle=2.0, timeout=120)
    resp, body, trailers, sizes, end = wire(res.data)
    n = int(path.split("/")[2].split("?")[0])
    assert resp.status == 200 and len(body) == n and sha(body) == stream_sha256(n), (name, len(body))
    if "trailer=1" in path:
        assert trailers == [("X-Trailer-SHA256", stream_sha256(n))]
    if "mix" in path:
        assert 1 in sizes and len(set(sizes)) > 10
    second = parse_response(res.data, end)
    assert second.status == 200 and sha(res.data[end + second.head_len:]) == expected_sha256("/len/777")
    line = procs[port].access_line(f" GET {path} ")
    assert f" {'spliced' if spliced else 'copied'} " in line, line
    if spliced:
        after = stats(port, time.time())
        assert grew(before, after, "http.spliced_chunked") >= 1 and grew(before, after, "chunked.ends") >= 1
        assert grew(before, after, "http.resumed") >= 1
        assert after.get("dropped.proxy_socket", 0) == 0 and after.get("chunked.malformed", 0) == 0


@pytest.mark.parametrize("port", [FAST, QUEUED])
def test_keepalive_over_spliced_chunked_bodies(env, port):
    """curl on one client connection: chunked and sized responses in turn, each body
    exact; one origin connection carries them all (resumed after each splice)."""
    lab, so, _ngx, procs = env
    so.clear_log()
    paths = [f"/chunked/{3 * MIB}/32768?mix=11&trailer=1", "/len/10", f"/chunked/{MIB}/1000?pause=300000",
             "/chunked/5000/999", f"/len/{2 * MIB}", f"/chunked/{2 * MIB}/65536"]
    args = []
    for p in paths:
        args += ["-o", "-", f"http://{PROXY}:{port}{p}"]
    r = curl(lab, "-w", "%{num_connects}", *args, timeout=120)
    assert r.returncode == 0, r.stderr
    off, counts = 0, []
    for p in paths:
        n = int(p.split("/")[2].split("?")[0])
        assert sha(r.stdout[off:off + n]) == stream_sha256(n), p
        counts.append(r.stdout[off + n:off + n + 1])
        off += n + 1
    assert counts == [b"1"] + [b"0"] * (len(paths) - 1), counts
    reqs = so.requests()
    assert [q["target"] for q in reqs] == paths and len({q["conn"] for q in reqs}) == 1, reqs
    for p in (paths[0], paths[2]):
        assert " spliced " in procs[port].access_line(f" GET {p} ")
    # (A resumed connection's windows are open: this body may reach the proxy whole
    # before the hand-off, and then the proxy delivers it itself.)
    line = procs[port].access_line(f" GET {paths[5]} ")
    assert " spliced " in line or " copied " in line, line


@pytest.mark.parametrize("port", [FAST, QUEUED])
def test_chunked_with_loss(env, port):
    """1 % of the packets dropped in every namespace, MSS-sized segments: segments
    holding chunk-size lines get lost and come back out of order; the body is exact and
    the next response follows on the same connection."""
    lab, _so, _ngx, _procs = env
    path = f"/chunked/{5 * MIB}/20000?mix=5&ext=1&trailer=1"
    before = stats(port, time.time())
    with lab.lossy(1) as dropped:
        r = curl(lab, "-w", "%{num_connects}", "-o", "-", f"http://{PROXY}:{port}{path}",
                 "-o", "-", f"http://{PROXY}:{port}/len/1234", timeout=120)
        drops = dropped()
    assert r.returncode == 0, r.stderr
    n = 5 * MIB
    assert sha(r.stdout[:n]) == stream_sha256(n)
    assert r.stdout[n:n + 1] == b"1" and sha(r.stdout[n + 1:n + 1 + 1234]) == expected_sha256("/len/1234")
    assert r.stdout[-1:] == b"0"                      # the second on the same connection
    assert drops > 0, "the loss rule dropped nothing"
    after = stats(port, time.time())
    assert grew(before, after, "http.spliced_chunked") == 1 and grew(before, after, "chunked.ends") == 1


def test_nginx_chunked_through_the_forward_proxy(env):
    """nginx sends the file chunked (its own chunk sizes); spliced, exact, and the
    connection carries a second request."""
    lab, _so, ngx, procs = env
    digest = ngx.add_file("chunky.bin", 6 * MIB, seed=12)
    small = ngx.add_file("small.bin", 1000, seed=13)
    url = f"http://{ngx.addr}:{ngx.port}/chunked/chunky.bin"
    r = curl(lab, "-x", f"http://{PROXY}:{FORWARD}", "-w", "%{num_connects}", "-o", "-", url,
             "-o", "-", f"http://{ngx.addr}:{ngx.port}/small.bin", "-D", "/dev/stderr")
    assert r.returncode == 0, r.stderr
    assert b"transfer-encoding: chunked" in r.stderr.lower()
    assert sha(r.stdout[:6 * MIB]) == digest and r.stdout[6 * MIB:6 * MIB + 1] == b"1"
    assert sha(r.stdout[6 * MIB + 1:6 * MIB + 1001]) == small and r.stdout[-1:] == b"0"
    assert " spliced " in procs[FORWARD].access_line(f" GET {url} ")


def truncated(data: bytes) -> bool:
    """A response whose chunked body does not end: no last-chunk and trailer section."""
    resp = parse_response(data)
    try:
        decode_chunked(data, resp.head_len)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("port", [FAST, QUEUED])
@pytest.mark.parametrize("path", [f"/truncate-chunked/{3 * MIB}/4096", f"/reset-chunked/{3 * MIB}/4096",
                                  f"/chunked/{3 * MIB}/4096?pause=500000&bad_at=1000000",
                                  f"/chunked/{3 * MIB}/4096?pause=400000&bad_at=150000"])
def test_upstream_fault_mid_splice_leaves_client_truncated(env, port, path):
    """The origin stops before the last chunk (FIN or RST), or sends a malformed
    chunk-size line: the client's connection ends and what it got never decodes as a
    complete message.  The malformed line after the pause reaches the engine (which
    resets both sides); the one before it is found by the proxy's drain or the engine."""
    lab, so, _ngx, procs = env
    before = stats(port, time.time())
    req = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    res = raw_exchange(lab, [req, ("recv", 1)], addr=PROXY, port=port, idle=5.0, timeout=60)
    assert res.end in ("eof", "reset"), res.end
    assert parse_response(res.data).status == 200
    assert truncated(res.data), f"{path}: a complete-looking message ({len(res.data)} bytes)"
    assert b"zz\r\n" not in res.data
    assert " spliced " in procs[port].access_line(f" GET {path.split('?')[0]}")
    after = stats(port, time.time())
    if "bad_at=1000000" in path:
        assert grew(before, after, "chunked.malformed") == 1
        assert grew(before, after, "pairs.reset_by_engine.chunked_malformed") == 1
        assert res.end == "reset"
    elif "bad_at" in path:
        assert grew(before, after, "chunked.malformed") + grew(before, after, "http.upstream_errors") == 1
        assert res.end == "reset"
    # Nothing is left of the pair.
    deadline = time.monotonic() + 15
    while after.get("pairs.active", 0) and time.monotonic() < deadline:
        after = stats(port, time.time())
    assert after.get("pairs.active", 0) == 0, after.get("pairs.oldest")


def test_small_chunks_copied_large_chunks_spliced(env):
    """--splice-chunk: past the threshold a chunked body is spliced only from a chunk
    with at least that much left (each chunk boundary costs a trip through the
    queue); one of small chunks is copied to its end, one with a big chunk is spliced
    from that chunk on.  Both exact."""
    lab, so, _ngx, _procs = env
    proc = HTTPProxyProc(lab, 8082, "--upstream", f"http://{so.addr}:{so.port}", "--queue", "6",
                         "--fastpath", "on", "--ports", "62500-62999", "--splice-chunk", "1MiB",
                         instance="chk-policy")
    try:
        for path, mode in ((f"/chunked/{3 * MIB}/65536", "copied"), (f"/chunked/{6 * MIB}/{2 * MIB}", "spliced")):
            r = curl(lab, "-o", "-", f"http://{PROXY}:8082{path}", timeout=120)
            assert r.returncode == 0, r.stderr
            n = int(path.split("/")[2])
            assert len(r.stdout) == n and sha(r.stdout) == stream_sha256(n), path
            line = proc.access_line(f" GET {path} ")
            assert f" {mode} " in line, line
    finally:
        assert proc.stop() == 0, proc.text()
