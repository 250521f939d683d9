"""The glue between the HTTP proxy and the cache store (nfsplice/cache/layer.py): fills
fed as the engine's tap feeds them (out of order, repeated, from a stream offset),
never blocking, never committing an incomplete body; the de-chunking of copied bodies;
ranges, If-Range, Cache-Status and Surrogate-Control.  No root, no network."""
from __future__ import annotations

import ipaddress
import os
import random
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfsplice.cache import layer, policy
from nfsplice.cache.store import ABORTED, COMMITTED
from nfsplice.proxy import http1

T0 = 1_700_000_000


@pytest.fixture
def cache(tmp_path):
    c = layer.Cache(str(tmp_path / "cache"), 1 << 24, fsync=False)
    yield c
    c.close()


def stored(*fields: tuple[str, str], status: int = 200) -> policy.StoredResponse:
    return policy.StoredResponse(status, "OK", (("Date", policy.format_http_date(T0)),) + fields, T0, T0)


def body_of(cache, key: str) -> bytes:
    e = cache.store.lookup(key)
    assert e is not None, f"{key} not stored"
    with e:
        return os.pread(e.fd, e.size + 1, 0)


def test_copied_fill_commits_at_the_expected_length(cache):
    data = os.urandom(100000)
    f = cache.begin("http://x/a", stored(), len(data))
    for i in range(0, len(data), 7000):
        f.body(i, data[i:i + 7000])
    assert f.settle(5) and f.state == COMMITTED       # complete: no finish() needed
    assert body_of(cache, "http://x/a") == data
    assert cache.counters["cache.bytes_stored"] == len(data)


def test_tap_fill_out_of_order_with_repeats_and_a_base(cache):
    """The engine's stream starts after BASE body bytes the proxy sent itself; segments
    come in any order, retransmissions repeat and overlap them."""
    data = os.urandom(300000)
    base = 1234
    f = cache.begin("http://x/b", stored(), len(data))
    f.body(0, data[:base])
    f.base = base
    pieces = [(o, data[base + o:base + o + 1448]) for o in range(0, len(data) - base, 1448)]
    rnd = random.Random(7)
    pieces += rnd.sample(pieces, 50)                                  # retransmissions
    pieces += [(o + 500, data[base + o + 500:base + o + 3000]) for o, _ in rnd.sample(pieces, 20)]
    rnd.shuffle(pieces)
    for o, p in pieces:
        f.write(o, memoryview(bytearray(p)))                          # (the engine's buffer is reused)
    f.close(None)                                                     # a resumed pair: no FIN
    assert f.settle(5) and f.state == COMMITTED
    assert body_of(cache, "http://x/b") == data


def test_incomplete_tap_is_never_stored(cache):
    data = os.urandom(50000)
    f = cache.begin("http://x/c", stored(), len(data))
    f.write(0, data[:20000])
    f.write(30000, data[30000:])                                      # a hole
    f.close(len(data))
    assert f.settle(5) and f.state == ABORTED
    assert cache.store.lookup("http://x/c") is None
    assert cache.counters["cache.dropped_incomplete"] == 1


def test_close_delimited_body_commits_at_the_fin(cache):
    data = os.urandom(5000)
    f = cache.begin("http://x/d", stored(), None)
    f.write(0, data)
    f.close(len(data))
    assert f.settle(5) and f.state == COMMITTED and body_of(cache, "http://x/d") == data
    g = cache.begin("http://x/e", stored(), None)
    g.write(0, data)
    g.close(None)                                                     # reset: the end was never seen
    assert g.settle(5) and g.state == ABORTED


def test_a_slow_writer_never_blocks_the_engine(tmp_path, monkeypatch):
    """The writer thread is stuck: writes return at once, and once more bytes are queued
    than max_pending the object is given up (never half-stored)."""
    c = layer.Cache(str(tmp_path / "slow"), 1 << 24, fsync=False, max_pending=256 << 10)
    gate = threading.Event()
    real = layer.Cache._write

    def stuck(self, fill, offset, data):
        gate.wait(10)
        real(self, fill, offset, data)
    monkeypatch.setattr(layer.Cache, "_write", stuck)
    try:
        data = os.urandom(1 << 20)
        f = c.begin("http://x/slow", stored(), len(data))
        t0 = time.monotonic()
        for i in range(0, len(data), 1448):
            f.write(i, data[i:i + 1448])
        f.close(len(data))
        assert time.monotonic() - t0 < 1.0
        assert f.failed
        gate.set()
        assert f.settle(5) and f.state == ABORTED
        assert c.store.lookup("http://x/slow") is None
        assert c.counters["cache.dropped_incomplete"] == 1
    finally:
        gate.set()
        c.close()


def test_two_tap_fills_interleaved(cache):
    """Two fills fed at once, as the ring consumer feeds pairs whose records interleave:
    each out of order, repeated and overlapping; both stored byte-exact, one with its
    Content-Length, one ended by close()."""
    a, b = os.urandom(600_000), os.urandom(400_000)
    fa, fb = cache.begin("http://x/a", stored(), len(a)), cache.begin("http://x/b", stored(), None)
    rnd = random.Random(3)
    pieces = [(fa, o, a[o:o + 57920]) for o in range(0, len(a), 57920)]
    pieces += [(fb, o, b[o:o + 1448]) for o in range(0, len(b), 1448)]
    pieces += [(fb, o, b[o:o + 3000]) for o in rnd.sample(range(0, len(b) - 3000), 30)]
    pieces += [(fa, o, a[o:o + 100_000]) for o in rnd.sample(range(0, len(a) - 100_000), 5)]
    rnd.shuffle(pieces)
    for f, o, p in pieces:
        f.write(o, memoryview(bytearray(p)))                          # (the ring's record is reused)
    fb.close(len(b))
    assert fa.settle(10) and fb.settle(10)
    assert fa.state == COMMITTED and fb.state == COMMITTED
    assert body_of(cache, "http://x/a") == a and body_of(cache, "http://x/b") == b
    assert cache._pending == 0


def test_too_large_is_not_begun(tmp_path):
    c = layer.Cache(str(tmp_path / "tiny"), 1000, fsync=False)
    try:
        f = c.begin("http://x/big", stored(), 5000)
        assert f.failed and f.settle(0) and f.state == ABORTED
        f.body(0, b"x" * 5000)                                        # ignored
        assert c.counters["cache.too_large"] == 1
    finally:
        c.close()


def test_followers_wait_for_the_leader(cache):
    assert cache.lead("k") is None
    ev = cache.lead("k")
    assert ev is not None and not ev.is_set()
    cache.release("k")
    assert ev.is_set() and cache.lead("k") is None
    cache.release("k")


def test_one_background_revalidation_per_key(cache):
    assert cache.start_revalidation("k") and not cache.start_revalidation("k")
    cache.end_revalidation("k")
    assert cache.start_revalidation("k")


def test_tee_feeds_both():
    got = [[], []]

    class Sink:
        def __init__(self, i):
            self.i = i

        def write(self, off, data):
            got[self.i].append((off, bytes(data)))

        def close(self, length):
            got[self.i].append(("end", length))
    t = layer.Tee(Sink(0), Sink(1))
    t.write(5, b"abc")
    t.close(8)
    assert got[0] == got[1] == [(5, b"abc"), ("end", 8)]


# -- chunked bodies, stored de-chunked -----------------------------------------------------------

def _chunked(data: bytes, sizes: list[int]) -> bytes:
    out, pos, i = bytearray(), 0, 0
    while pos < len(data):
        n = min(sizes[i % len(sizes)], len(data) - pos)
        out += b"%x;i=%d\r\n" % (n, i) + data[pos:pos + n] + b"\r\n"
        pos += n
        i += 1
    return bytes(out + b"0\r\nX-Trailer: 1\r\n\r\n")


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=5000), st.lists(st.integers(1, 700), min_size=1, max_size=5),
       st.lists(st.integers(1, 900), min_size=1, max_size=20))
def test_chunked_decoder_any_split(data, sizes, splits):
    framed = _chunked(data, sizes)
    dec = layer.ChunkedDecoder(http1.DEFAULT_LIMITS)
    out = bytearray()
    pos, i = 0, 0
    while pos < len(framed):
        n = splits[i % len(splits)]
        for off, piece in dec.feed(framed[pos:pos + n]):
            assert off == len(out)
            out += piece
        pos += n
        i += 1
    assert bytes(out) == data and dec.done and dec.offset == len(data)


def test_chunked_decoder_stops_at_bad_framing():
    dec = layer.ChunkedDecoder(http1.DEFAULT_LIMITS)
    pieces = dec.feed(b"3\r\nabc\r\nzz\r\n")
    assert [bytes(p) for _, p in pieces] == [b"abc"]
    assert dec.broken and not dec.done and dec.feed(b"1\r\nx\r\n") == []


# -- ranges, If-Range ---------------------------------------------------------------------------

@pytest.mark.parametrize("value,want", [
    ("bytes=0-9", (0, 9)), ("bytes=10-", (10, 99)), ("bytes=-10", (90, 99)), ("bytes=90-200", (90, 99)),
    ("bytes=-200", (0, 99)), ("bytes=100-", "unsatisfiable"), ("bytes=-0", "unsatisfiable"),
    ("bytes=5-4", None), ("bytes=0-1,5-6", None), ("items=0-1", None), ("bytes=", None), ("bytes=a-b", None),
    ("BYTES = 1-2", (1, 2)),
])
def test_parse_range(value, want):
    assert layer.parse_range(value, 100) == want


def test_if_range():
    s = stored(("ETag", '"v1"'), ("Last-Modified", policy.format_http_date(T0 - 60)))
    assert layer.if_range_matches(s, '"v1"')
    assert not layer.if_range_matches(s, 'W/"v1"')                    # weak: never
    assert not layer.if_range_matches(s, '"v2"')
    assert layer.if_range_matches(s, policy.format_http_date(T0 - 60))
    assert not layer.if_range_matches(s, policy.format_http_date(T0 - 59))
    # A Last-Modified as recent as Date is weak (RFC 9110 8.8.2.2).
    weak = stored(("Last-Modified", policy.format_http_date(T0)))
    assert not layer.if_range_matches(weak, policy.format_http_date(T0))


# -- heads: Cache-Status, Surrogate-Control --------------------------------------------------------

def test_cache_status_members():
    assert layer.cache_status("nfsplice", hit=True, ttl=59.7) == "nfsplice; hit; ttl=59"
    assert layer.cache_status("nfsplice", fwd="miss", stored=True) == "nfsplice; fwd=miss; stored"
    assert layer.cache_status("nfsplice", fwd="stale", fwd_status=304) == "nfsplice; fwd=stale; fwd-status=304"
    assert layer.cache_status("nfsplice", fwd="miss", collapsed=True) == "nfsplice; fwd=miss; collapsed"
    assert layer.cache_status("nfsplice", fwd="miss", detail="no-store") == "nfsplice; fwd=miss; detail=no-store"


def test_response_head():
    head = layer.response_head(200, "OK", (("Content-Length", "3"),), via="nfsplice",
                               status_value="nfsplice; hit", close=True)
    assert head == (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nVia: 1.1 nfsplice\r\n"
                    b"Cache-Status: nfsplice; hit\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize("sc,cc,want", [
    ("max-age=3600", "no-store", "max-age=3600"),
    ("no-store", "max-age=100", "no-store"),
    ("MaX-aGe=60, foobar", None, "MaX-aGe=60"),
    ("max-age=10;other", "max-age=5", "max-age=5"),                     # not for us
    ("max-age=10;nfsplice, max-age=99", None, "max-age=10"),             # targeted wins
    ('content="ESI/1.0"', "max-age=5", "max-age=5"),                     # nothing for freshness
])
def test_surrogate_view(sc, cc, want):
    fields = (("Surrogate-Control", sc),) + ((("Cache-Control", cc),) if cc else ())
    view = layer.surrogate_view(stored(*fields), "nfsplice")
    assert view.values("Cache-Control") == [want]
    assert layer.surrogate_view(stored(*fields), None).values("Cache-Control") == ([cc] if cc else [])
    assert layer.strip_surrogate(fields) == tuple(f for f in fields if f[0] != "Surrogate-Control")


def test_surrogate_decides_storing():
    req, _ = http1.parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    resp, _ = http1.parse_response_head(b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\n"
                                        b"Surrogate-Control: max-age=60\r\nContent-Length: 0\r\n\r\n", "GET")
    assert not policy.storable(req, resp)
    assert policy.storable(req, layer.surrogate_view(resp, "nfsplice"))


def test_parse_networks():
    assert layer.parse_networks("127.0.0.1/32, 198.18.1.0/24") == (
        ipaddress.IPv4Network("127.0.0.1/32"), ipaddress.IPv4Network("198.18.1.0/24"))
    assert layer.parse_networks(["10.0.0.5"]) == (ipaddress.IPv4Network("10.0.0.5/32"),)
    for bad in ("nonsense", "1.2.3.4/33", [], [5], ""):
        with pytest.raises(ValueError):
            layer.parse_networks(bad)


# -- `nfsplice cache` and a busy directory -------------------------------------------------------

def _fill(cache, key: str, data: bytes) -> None:
    f = cache.begin(key, stored(("Cache-Control", "max-age=60"),), len(data))
    f.body(0, data)
    assert f.settle(5) and f.state == COMMITTED


def test_cache_command_without_a_running_proxy(tmp_path, capsys):
    from nfsplice import cli
    d = str(tmp_path / "c")
    c = layer.Cache(d, 1 << 20, fsync=False)
    _fill(c, "http://x/a?q=1", b"hello")
    c.close()
    assert cli.main(["cache", "ls", "--cache-dir", d]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["5", "200", "stale", "http://x/a?q=1"] and out[-1].startswith("1 stored")
    assert cli.main(["cache", "stat", "HTTP://X:80/a?q=1", "--cache-dir", d]) == 0      # normalised
    assert "sha256:    2cf24dba" in capsys.readouterr().out
    assert cli.main(["cache", "purge", "http://x/a?q=1", "--cache-dir", d]) == 0
    assert capsys.readouterr().out.strip() == "purged http://x/a?q=1: 1 stored response(s)"
    assert cli.main(["cache", "purge", "http://x/a?q=1", "--cache-dir", d]) == 0
    assert "is not in the cache" in capsys.readouterr().out
    assert cli.main(["cache", "ls", "--cache-dir", str(tmp_path / "none")]) == 2
    assert "no cache index there" in capsys.readouterr().err
    assert cli.main(["cache", "stat", "not a url", "--cache-dir", d]) == 2


def test_ls_works_beside_the_owner(tmp_path, capsys):
    """The proxy holds the store (flock); ls reads the index read-only beside it."""
    from nfsplice import cli
    d = str(tmp_path / "c")
    c = layer.Cache(d, 1 << 20, fsync=False)
    try:
        _fill(c, "http://x/live", b"abc")
        assert cli.main(["cache", "ls", "--cache-dir", d]) == 0
        assert "http://x/live" in capsys.readouterr().out
        # purge needs the proxy: without a proxy.json it says how instead.
        assert cli.main(["cache", "purge", "http://x/live", "--cache-dir", d]) == 2
        assert "left no usable proxy.json" in capsys.readouterr().err
    finally:
        c.close()


def test_a_busy_cache_dir_is_a_usage_error(tmp_path, capsys):
    from nfsplice import cli
    d = str(tmp_path / "c")
    c = layer.Cache(d, 1 << 20, fsync=False)
    try:
        assert cli.main(["http", "--listen", "198.18.1.1:8080", "--no-splice", "--cache-dir", d]) == 2
        err = capsys.readouterr().err
        assert f"--cache-dir {d}: cache store {d} is in use by another process" in err, err
    finally:
        c.close()


# -- the fast path's ring consumer (Runner's tap thread), which feeds tapped fills ---------------

def test_tap_thread_gathers_records_between_drains(monkeypatch):
    """While records keep coming the tap thread drains every TAP_GATHER_S (one wakeup
    per batch, not one per 64 KiB record); once a drain finds nothing it waits on the
    ring again."""
    from nfsplice import runner as runner_mod
    events = []

    class Ring:
        def wait(self, timeout):
            events.append("wait")

    class FP:
        tap = Ring()
    r = runner_mod.Runner([object()], engine=None)
    r.fastpath = FP()
    counts = iter([2, 64, 1, 0, 0, 5, 0])

    def drain():
        n = next(counts, None)
        if n is None:
            r.stop.set()
            return 0
        events.append(n)
        return n
    monkeypatch.setattr(r, "_drain_tap", drain)
    monkeypatch.setattr(runner_mod.time, "sleep", lambda s: events.append(f"sleep {s}"))
    r._tap_loop()
    g = f"sleep {runner_mod.Runner.TAP_GATHER_S}"
    assert events[:12] == ["wait", 2, g, 64, g, 1, g, 0, "wait", 0, "wait", 5]
