"""The origins of the HTTP proxy tests (netns_lab/origins.py), hit directly from the client.

One lab (prefix "org") with an NginxOrigin on 198.18.2.2:8000 and a ScriptedOrigin on
198.18.2.2:8001 serves the whole module; curl and the raw client run in org-client.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time

import pytest

from netns_lab import origins as O
from netns_lab.origins import NginxOrigin, ScriptedOrigin, expected_sha256, stream_bytes, stream_sha256
from netns_lab.topology import Lab

H = O.ORIGIN_ADDR


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# -- without root ----------------------------------------------------------------------------
def test_stream_is_deterministic_and_periodic():
    a = stream_bytes(O.PERIOD + 1000, seed=3)
    assert a == stream_bytes(O.PERIOD + 1000, seed=3)
    assert a[O.PERIOD:] == a[:1000] and a[:64] != stream_bytes(64, seed=4)
    assert stream_bytes(10, seed=3, offset=O.PERIOD - 5) == a[O.PERIOD - 5:O.PERIOD + 5]
    assert stream_sha256(len(a), seed=3) == sha(a)


def test_expected_sha256_of_paths():
    assert expected_sha256("/len/1000") == sha(stream_bytes(1000))
    assert expected_sha256("/chunked/1000/7?trailer=1") == sha(stream_bytes(1000))
    assert expected_sha256("/truncate/1000/10") == sha(stream_bytes(10))
    assert expected_sha256("http://198.18.2.2:8001/reset/50/20") == sha(stream_bytes(20))
    assert expected_sha256("/204") == O.EMPTY_SHA256
    with pytest.raises(ValueError):
        expected_sha256("/echo")


def test_decode_chunked_and_parse_response():
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nT: v\r\n\r\nNEXT"
    r = O.parse_response(raw)
    assert (r.status, r.get("transfer-encoding")) == (200, "chunked")
    body, trailers, end, sizes = O.decode_chunked(raw, r.head_len)
    assert (body, trailers, raw[end:], sizes) == (b"abcde", [("T", "v")], b"NEXT", [3, 2])
    for case in ("bad-chunk-size", "chunk-missing-crlf", "chunk-size-overflow"):
        data = O.BAD_CASES[case].raw
        with pytest.raises(ValueError):
            O.decode_chunked(data, O.parse_response(data).head_len)


# -- in the lab --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab():
    with Lab("org") as lab:
        yield lab


@pytest.fixture(scope="module")
def ngx(lab):
    with NginxOrigin(lab) as o:
        yield o


@pytest.fixture(scope="module")
def so(lab):
    with ScriptedOrigin(lab) as o:
        yield o


def curl(lab, *args: str, check: bool = True):
    return lab.run(lab.client, "curl", "-sS", "--max-time", "20", *args, check=check, timeout=60)


def write_out(p) -> list[str]:
    """Lines of curl's -w '%{stderr}...' output (one per URL)."""
    return [l for l in p.stderr.decode().splitlines() if l.startswith("W ")]


# nginx --------------------------------------------------------------------------------------
@pytest.mark.root
def test_nginx_files_keepalive_head_range(lab, ngx):
    s1 = ngx.add_file("a.bin", 1000, seed=1)
    s2 = ngx.add_file("/dir/b.bin", 3 << 20, seed=2)
    assert (s1, s2) == (stream_sha256(1000, 1), stream_sha256(3 << 20, 2))
    before = len(ngx.requests())
    p = curl(lab, "-w", "%{stderr}W %{http_code} %{size_download} %{num_connects}\n",
             ngx.url("/a.bin"), ngx.url("/dir/b.bin"))
    assert p.stdout == stream_bytes(1000, 1) + stream_bytes(3 << 20, 2)
    assert write_out(p) == ["W 200 1000 1", f"W 200 {3 << 20} 0"]       # one connection
    log = ngx.requests(wait_for=before + 2)[before:]
    assert [(e["uri"], e["status"], e["n"]) for e in log] == [("/a.bin", 200, 1), ("/dir/b.bin", 200, 2)]
    assert log[0]["conn"] == log[1]["conn"]
    head = curl(lab, "-I", ngx.url("/dir/b.bin")).stdout.decode()
    assert re.search(rf"(?im)^content-length: {3 << 20}\r$", head)
    part = curl(lab, "-r", "100-199", ngx.url("/a.bin")).stdout
    assert part == stream_bytes(1000, 1)[100:200]
    assert curl(lab, "-o", "/dev/null", "-w", "%{http_code}", ngx.url("/missing")).stdout == b"404"
    assert curl(lab, "-o", "/dev/null", "-w", "%{http_code}", ngx.url("/204")).stdout == b"204"


@pytest.mark.root
def test_nginx_chunked_location(lab, ngx):
    ngx.add_file("c.bin", 200_000, seed=5)
    p = curl(lab, "--raw", "-D", "/dev/stderr", ngx.url("/chunked/c.bin"))
    head = p.stderr.decode().lower()
    assert "transfer-encoding: chunked" in head and "content-length" not in head
    body, trailers, end, sizes = O.decode_chunked(p.stdout)
    assert body == stream_bytes(200_000, 5) and end == len(p.stdout) and len(sizes) > 1
    # HEAD of the static location still says Content-Length
    assert "content-length: 200000" in curl(lab, "-I", ngx.url("/c.bin")).stdout.decode().lower()


@pytest.mark.root
def test_nginx_put_upload(lab, ngx):
    data = stream_bytes(1 << 20, seed=9)
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        code = curl(lab, "-o", "/dev/null", "-w", "%{http_code}", "-T", f.name, ngx.url("/upload/u/x.bin")).stdout
    assert code == b"201"
    assert ngx.file_sha256("upload/u/x.bin") == sha(data)
    assert curl(lab, ngx.url("/upload/u/x.bin")).stdout == data


@pytest.mark.root
@pytest.mark.slow
def test_nginx_256mib_file(lab, ngx):
    t0 = time.monotonic()
    digest = ngx.add_file("big.bin", 256 << 20, seed=11)
    assert time.monotonic() - t0 < 10
    assert os.path.getsize(ngx.root / "big.bin") == 256 << 20
    assert digest == stream_sha256(256 << 20, 11)
    p = lab.run(lab.client, "sh", "-c", f"curl -sS --max-time 30 {ngx.url('/big.bin')} | sha256sum", timeout=60)
    assert p.stdout.split()[0].decode() == digest


@pytest.mark.root
def test_nginx_stops_on_error_and_kills_workers(lab):
    with pytest.raises(KeyError):
        with NginxOrigin(lab, port=8010) as o:
            master = o.pid
            workers = O._children(master)
            tmp = o.dir
            assert workers and O._listening(master, H, 8010)
            raise KeyError("boom")
    for pid in (master, *workers):
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split(")")[1][:3]
    assert not tmp.exists()
    with pytest.raises(RuntimeError, match="exited|not listening"):
        with NginxOrigin(lab, addr="198.18.9.9", port=8011):     # not an address of the namespace
            pass


# scripted origin: well-behaved --------------------------------------------------------------------
@pytest.mark.root
def test_len_keepalive_and_request_log(lab, so):
    paths = ["/len/0", "/len/1", "/len/100000", "/len/5000000"]
    p = curl(lab, "-w", "%{stderr}W %{http_code} %{size_download} %{num_connects}\n",
             "-H", "X-Forwarded-For: 203.0.113.7", "-H", "Via: 1.1 test", *[so.url(x) for x in paths])
    assert p.stdout == b"".join(stream_bytes(O.expected_length(x)) for x in paths)
    assert sha(p.stdout[-5000000:]) == expected_sha256("/len/5000000")
    assert write_out(p) == ["W 200 0 1", "W 200 1 0", "W 200 100000 0", "W 200 5000000 0"]
    log = [e for e in so.requests() if e["path"] in paths][-4:]
    assert [e["path"] for e in log] == paths
    assert len({e["conn"] for e in log}) == 1 and [e["seq"] for e in log] == [1, 2, 3, 4]
    hdrs = log[0]["headers"]
    assert ["X-Forwarded-For", "203.0.113.7"] in hdrs and ["Via", "1.1 test"] in hdrs
    assert [h[0] for h in hdrs][0] == "Host"
    assert log[0]["head"].startswith("GET /len/0 HTTP/1.1\r\nHost: 198.18.2.2:8001\r\n")


@pytest.mark.root
def test_chunked_framing_and_trailer(lab, so):
    p = curl(lab, "--raw", "-D", "/dev/stderr", so.url("/chunked/100000/4096?trailer=1&ext=1"))
    head = p.stderr.decode().lower()
    assert "transfer-encoding: chunked" in head and "trailer: x-trailer-sha256" in head
    assert "content-length" not in head
    body, trailers, end, sizes = O.decode_chunked(p.stdout)
    assert sha(body) == expected_sha256("/chunked/100000/4096") and end == len(p.stdout)
    assert sizes == [4096] * 24 + [100000 - 24 * 4096]
    assert trailers == [("X-Trailer-SHA256", sha(body))]
    assert b"\r\n1000;i=0\r\n" in b"\r\n" + p.stdout
    # decoded by curl, one-byte chunks
    assert sha(curl(lab, so.url("/chunked/3000/1")).stdout) == expected_sha256("/chunked/3000/1")


@pytest.mark.root
def test_close_delimited(lab, so):
    assert sha(curl(lab, so.url("/close/300000")).stdout) == expected_sha256("/close/300000")
    r = O.raw_request(lab, O.request_bytes("GET", "/close/1000?bare=1"))
    resp = r.response()
    assert r.end == "eof" and resp.get("content-length") is None and resp.get("connection") is None
    assert r.data[resp.head_len:] == stream_bytes(1000)


@pytest.mark.root
def test_head_204_304_pipelined_on_one_connection(lab, so):
    reqs = b"".join(O.request_bytes(m, t) for m, t in [
        ("HEAD", "/len/5000"), ("HEAD", "/chunked/100/10"), ("HEAD", "/head-only/777"), ("GET", "/204"),
        ("GET", "/304?cl=4242"), ("GET", "/head-only/1"), ("GET", "/len/7")])
    r = O.raw_exchange(lab, [reqs, ("until", stream_bytes(7)), ("close",)])
    pos, got = 0, []
    for _ in range(7):
        resp = r.response(pos)
        got.append((resp.status, resp.get("content-length"), resp.get("transfer-encoding"), resp.get("x-origin-seq")))
        pos += resp.head_len
    assert got == [(200, "5000", None, "1"), (200, None, "chunked", "2"), (200, "777", None, "3"),
                   (204, None, None, "4"), (304, "4242", None, "5"), (405, "0", None, "6"), (200, "7", None, "7")]
    assert r.data[pos:] == stream_bytes(7)
    assert len({O.parse_response(r.data).get("x-origin-conn")}) == 1


@pytest.mark.root
def test_echo_content_length_and_chunked(lab, so):
    data = stream_bytes(300_000, seed=21)
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        p = curl(lab, "-D", "/dev/stderr", "--data-binary", f"@{f.name}", so.url("/echo"))
        assert p.stdout == data and f"x-body-sha256: {sha(data)}" in p.stderr.decode().lower()
        p = curl(lab, "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{f.name}", so.url("/echo?discard=1"),
                 "-D", "/dev/stderr")
        assert p.stdout == b"" and "x-request-chunked: 1" in p.stderr.decode().lower()
    e = [e for e in so.requests() if e["path"] == "/echo"][-1]
    assert e["chunked"] and e["body_length"] == len(data) and e["body_sha256"] == sha(data)
    # chunked request with a trailer, raw
    req = (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\n")
    r = O.raw_request(lab, req)
    assert r.data.endswith(b"\r\n\r\nhello world") and r.end == "eof"
    assert so.requests()[-1]["trailers"] == [["X-T", "1"]]


@pytest.mark.root
def test_expect_100_continue(lab, so):
    head = b"POST /expect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
    r = O.raw_exchange(lab, [head, ("until", b"100 Continue\r\n\r\n"), b"hello"])
    assert r.data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    resp = r.response(len(b"HTTP/1.1 100 Continue\r\n\r\n"))
    assert resp.get("x-body-sha256") == sha(b"hello") and r.data.endswith(b"hello")
    assert r.marks[1][1] == len(b"HTTP/1.1 100 Continue\r\n\r\n")       # before the body was sent
    r = O.raw_request(lab, head.replace(b"/expect", b"/expect?reject=1"))
    assert r.response().status == 417 and r.end == "eof"
    # any path answers an Expect: curl's upload does not wait for its timeout (made 20 s
    # here, so a busy machine's slow curl cannot pass for a missing 100 Continue)
    with tempfile.NamedTemporaryFile() as f:
        f.write(b"x" * 2_000_000)
        f.flush()
        t0 = time.monotonic()
        p = curl(lab, "-H", "Expect: 100-continue", "--expect100-timeout", "20", "--data-binary", f"@{f.name}",
                 so.url("/echo?discard=1"))
        assert time.monotonic() - t0 < 10 and p.returncode == 0
    assert so.requests()[-1]["sent_100"] == 1
    # ?ignore_expect=1: no 100 Continue however long the client waits; the body, once
    # sent, is read and answered
    head = head.replace(b"/expect", b"/echo?ignore_expect=1")
    r = O.raw_exchange(lab, [head, ("sleep", 1.5), b"hello"])
    assert r.marks[1][1] == 0 and r.response().status == 200 and r.data.endswith(b"hello"), r.data
    assert so.requests()[-1]["sent_100"] == 0


@pytest.mark.root
def test_upgrade_echo(lab, so):
    head = b"GET /upgrade HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    r = O.raw_exchange(lab, [head, ("until", b"\r\n\r\n"), b"ping", ("until", b"ping"), b"pong!",
                             ("until", b"pong!"), ("shutdown",)])
    resp = r.response()
    assert resp.status == 101 and resp.get("upgrade") == "echo" and r.end == "eof"
    assert r.data[resp.head_len:] == b"pingpong!"
    r = O.raw_request(lab, O.request_bytes("GET", "/upgrade", close=True))
    assert r.response().status == 426
    r = O.raw_exchange(lab, [O.request_bytes("GET", "/upgrade?force=1"), ("until", b"\r\n\r\n"), b"ping",
                             ("until", b"ping"), ("shutdown",)])
    assert r.response().status == 101 and r.data.endswith(b"\r\n\r\nping") and r.end == "eof"


# scripted origin: misbehaviour ---------------------------------------------------------------------
@pytest.mark.root
def test_truncate_and_truncate_chunked(lab, so):
    r = O.raw_request(lab, O.request_bytes("GET", "/truncate/100000/30000"))
    resp = r.response()
    assert r.end == "eof" and resp.get("content-length") == "100000"
    assert sha(r.data[resp.head_len:]) == expected_sha256("/truncate/100000/30000")
    assert curl(lab, so.url("/truncate/100000/30000"), check=False).returncode == 18   # partial file
    r = O.raw_request(lab, O.request_bytes("GET", "/truncate-chunked/10000/3000"))
    resp = r.response()
    assert r.end == "eof" and resp.get("transfer-encoding") == "chunked"
    rest = r.data[resp.head_len:]
    assert rest.endswith(b"\r\n") and not rest.endswith(b"0\r\n\r\n")
    with pytest.raises(ValueError, match="incomplete"):
        O.decode_chunked(rest)
    body = re.sub(rb"(?:^|\r\n)[0-9a-f]+\r\n", b"", rest)[:-2]
    assert sha(body) == expected_sha256("/truncate-chunked/10000")
    assert curl(lab, so.url("/truncate-chunked/10000"), check=False).returncode == 18


@pytest.mark.root
def test_reset_after_k_bytes(lab, so):
    r = O.raw_request(lab, O.request_bytes("GET", "/reset/1000000/200000"))
    resp = r.response()
    assert r.end == "reset" and resp.get("content-length") == "1000000"
    assert sha(r.data[resp.head_len:]) == expected_sha256("/reset/1000000/200000")
    assert curl(lab, so.url("/reset/1000000/200000"), check=False).returncode in (18, 56)


@pytest.mark.root
def test_reset_ends_a_close_delimited_body(lab, so):
    r = O.raw_request(lab, O.request_bytes("GET", "/reset-close/300000"))
    resp = r.response()
    assert r.end == "reset" and resp.get("content-length") is None and resp.get("connection") == "close"
    assert r.data[resp.head_len:] == stream_bytes(300000)
    assert curl(lab, so.url("/reset-close/300000"), check=False).returncode == 56     # recv failure


@pytest.mark.root
def test_half_close_keeps_reading(lab, so):
    r = O.raw_exchange(lab, [O.request_bytes("GET", "/half-close/5000"), ("eof",), b"after-fin", ("sleep", 0.1),
                             ("close",)])
    resp = r.response()
    assert r.end == "eof" and r.data[resp.head_len:] == stream_bytes(5000)
    conn = int(resp.get("x-origin-conn"))
    e = so.wait_event(lambda e: e["event"] == "half-close-read" and e["conn"] == conn)
    assert e["bytes"] == len(b"after-fin") and e["sha256"] == sha(b"after-fin")


@pytest.mark.root
def test_stall(lab, so):
    r = O.raw_exchange(lab, [O.request_bytes("GET", "/stall/100000/1000/1", close=True), ("recv", 1000)])
    resp = r.response()
    assert r.marks[1][0] < 0.5 and r.elapsed >= 1.0 and r.end == "eof"
    assert sha(r.data[resp.head_len:]) == expected_sha256("/stall/100000/1000/1")


@pytest.mark.root
def test_cache_headers_and_conditionals(lab, so):
    """The query's cache fields; If-None-Match / If-Modified-Since answered 304 with
    them; fail_after; stall with cut."""
    q = "/len/100?cc=max-age%3D60&etag=v1&lm=1700000000&vary=X-L&hdr=X-A%3A+1&expires=60"
    r = O.raw_exchange(lab, [O.request_bytes("GET", q, headers=[("X-L", "en")], close=True)])
    resp = r.response()
    assert resp.get("cache-control") == "max-age=60" and resp.get("etag") == '"v1"'
    assert resp.get("last-modified") == "Tue, 14 Nov 2023 22:13:20 GMT" and resp.get("x-a") == "1"
    assert resp.get("vary") == "X-L" and resp.get("x-vary-value") == "en" and resp.get("expires")
    for cond in (("If-None-Match", '"v0", "v1"'), ("If-Modified-Since", "Tue, 14 Nov 2023 22:13:20 GMT")):
        r = O.raw_exchange(lab, [O.request_bytes("GET", q, headers=[cond], close=True)])
        resp = r.response()
        assert resp.status == 304 and resp.get("etag") == '"v1"' and r.data[resp.head_len:] == b"", cond
    r = O.raw_exchange(lab, [O.request_bytes("GET", q, headers=[("If-None-Match", '"v0"')], close=True)])
    assert r.response().status == 200
    statuses = [O.raw_exchange(lab, [O.request_bytes("GET", "/len/5?fail_after=2", close=True)]).response().status
                for _ in range(3)]
    assert statuses == [200, 200, 503]
    r = O.raw_exchange(lab, [O.request_bytes("GET", "/stall/10000/1000/0.2?cut=1", close=True)])
    assert r.end == "eof" and len(r.data) - r.response().head_len == 1000


@pytest.mark.root
def test_extra_bytes_after_body(lab, so):
    r = O.raw_exchange(lab, [O.request_bytes("GET", "/extra/1000"), ("until", O.EXTRA_GARBAGE),
                             O.request_bytes("GET", "/len/3", close=True)])
    resp = r.response()
    assert resp.get("content-length") == "1000"
    body_end = resp.head_len + 1000
    assert r.data[resp.head_len:body_end] == stream_bytes(1000)
    assert r.data[body_end:body_end + 100] == O.EXTRA_GARBAGE
    second = r.response(body_end + 100)                       # the connection stays usable
    assert second.get("x-origin-seq") == "2" and r.data.endswith(b"\r\n\r\n" + stream_bytes(3))
    assert r.end == "eof"


def _catalogue_checks() -> dict:
    """What each catalogue case must show, checked on the bytes received."""
    def head(d):
        return d.split(b"\r\n\r\n", 1)[0]
    return {
        "cl-te": lambda d: b"Content-Length: 3" in head(d) and b"Transfer-Encoding: chunked" in head(d),
        "two-cl": lambda d: len(set(re.findall(rb"Content-Length: (\d+)", head(d)))) == 2,
        "cl-list": lambda d: re.search(rb"Content-Length: 5, 6\r\n", d),
        "cl-negative": lambda d: b"Content-Length: -5\r\n" in d,
        "cl-plus": lambda d: b"Content-Length: +5\r\n" in d,
        "bad-chunk-size": lambda d: d.split(b"\r\n\r\n", 1)[1].startswith(b"zz\r\n"),
        "chunk-size-overflow": lambda d: len(d.split(b"\r\n\r\n", 1)[1].split(b"\r\n")[0]) == 17,
        "chunk-missing-crlf": lambda d: b"5\r\nhelloX" in d,
        "obs-fold": lambda d: b"\r\n second\r\n" in head(d),
        "nul-in-value": lambda d: b"\x00" in head(d),
        "bare-cr": lambda d: re.search(rb"a\rb", head(d)),
        "space-before-colon": lambda d: b"Content-Length : 5" in head(d),
        "invalid-name": lambda d: b"\r\nX Bad: 1\r\n" in head(d),
        "no-colon": lambda d: b"\r\nNot a header line\r\n" in head(d),
        "bare-lf": lambda d: b"\r" not in d and b"\n\n" in d,
        "http2-status": lambda d: d.startswith(b"HTTP/2.0 200"),
        "bad-status-code": lambda d: d.startswith(b"HTTP/1.1 2000 "),
        "te-chunked-not-last": lambda d: b"\r\nTransfer-Encoding: chunked, gzip\r\n\r\n" in d,
        "te-unknown": lambda d: b"\r\nTransfer-Encoding: xchunked\r\n\r\n" in d,
        "eof-in-head": lambda d: b"\r\n\r\n" not in d,
        "header-too-long": lambda d: len(head(d)) > 100 << 10,
    }


@pytest.mark.root
def test_bad_catalogue(lab, so):
    checks = _catalogue_checks()
    assert set(checks) == set(O.BAD_CASES) and len(O.BAD_CASES) >= 10
    for name, case in O.BAD_CASES.items():
        r = O.raw_request(lab, O.request_bytes("GET", f"/bad/{name}"))
        assert r.data == case.raw and r.end == "eof", name
        assert checks[name](r.data), name
    listing = curl(lab, so.url("/bad")).stdout
    assert set(json.loads(listing)) == set(O.BAD_CASES)
    assert O.raw_request(lab, O.request_bytes("GET", "/bad/no-such-case", close=True)).response().status == 404


@pytest.mark.root
def test_bad_request_gets_400(lab, so):
    r = O.raw_request(lab, b"GET /len/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n")
    assert r.response().status == 400 and r.end == "eof"
    assert so.wait_event(lambda e: e["event"] == "bad-request" and "Content-Length" in e["error"])


@pytest.mark.root
def test_head_logged_before_the_body(lab, so):
    """A request head is logged ("head") as soon as it is parsed: a body that never
    arrives leaves that trace only; a whole request is logged head first."""
    target = "/echo?discard=1&case=head-only"
    head = f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode()
    O.raw_exchange(lab, [head + b"x" * 10, ("sleep", 0.3), ("close",)])
    e = so.wait_event(lambda e: e["event"] == "head" and e["target"] == target)
    assert (e["method"], e["seq"], e["chunked"], e["content_length"]) == ("POST", 1, False, 1000), e
    assert [q for q in so.requests() if q["target"] == target] == []
    target = "/echo?discard=1&case=head-then-request"
    r = O.raw_request(lab, O.request_bytes("POST", target, body=b"hello", chunked=True, close=True))
    assert r.response().status == 200
    mine = [(e["event"], e["conn"], e["seq"]) for e in so.events() if e.get("target") == target]
    conn = mine[0][1]
    assert mine == [("head", conn, 1), ("request", conn, 1)], mine
    assert [h["chunked"] for h in so.heads() if h["target"] == target] == [True]
