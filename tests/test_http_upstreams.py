"""The HTTP proxy's upstream choice and idle-connection pool, without root or the lab:
round robin, down periods and what is tried when all are down; what the pool gives
back, keeps, closes and when; a pooled connection found closed after the request went
out (retried only when the request may be repeated).  The lab tests in
test_http_proxy.py run them for real."""
from __future__ import annotations

import socket
import threading

import pytest

from nfsplice.proxy import http1
from nfsplice.proxy.http import Conn, ConnPool, Exchange, HTTPProxy, Settings, Upstreams, _Counters
from nfsplice.proxy.http1 import UpstreamError

A, B, C = ("198.18.2.2", 8000), ("198.18.2.3", 8000), ("198.18.2.4", 8000)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def group(*addrs, down_time=10.0):
    clock = Clock()
    counters = _Counters()
    return Upstreams(addrs, down_time, counters, clock=clock), clock, counters


def test_round_robin_starts_one_further_each_time():
    g, _clock, _ = group(A, B, C)
    assert [g.order()[0] for _ in range(6)] == [A, B, C, A, B, C]
    assert g.order() == [A, B, C]      # the rest follow, in turn, for retries


def test_a_down_upstream_is_skipped_until_its_time_is_up():
    g, clock, counters = group(A, B, down_time=10)
    g.failed(B)
    assert counters["http.upstream_down"] == 1
    # B is still the last resort (down), after A.
    assert [g.order() for _ in range(4)] == [[A, B], [A, B], [A, B], [A, B]]
    clock.now += 10
    assert g.order()[0] == A and g.order()[0] == B     # back in turn
    g.failed(B)
    g.failed(B)              # failing again while down extends the period, counted once
    assert counters["http.upstream_down"] == 2
    g.connected(B)
    assert counters["http.upstream_up"] == 1
    assert sorted(g.order()[0] for _ in range(2)) == [A, B]


def test_all_down_tries_the_one_that_comes_back_first():
    g, clock, _ = group(A, B, C, down_time=10)
    g.failed(A)
    clock.now += 1
    g.failed(C)
    clock.now += 1
    g.failed(B)
    assert g.order() == [A]            # only one attempt: the first to be up again
    clock.now += 8.5                   # A is up again, the others not yet
    assert g.order() == [A, C]


class Pool:
    def __init__(self, size=2, idle_timeout=30.0):
        self.clock = Clock()
        self.counters = _Counters()
        self.dropped = []
        self.pool = ConnPool(size, idle_timeout, self.dropped.append, self.counters, clock=self.clock)
        self.peers = []

    def conn(self) -> Conn:
        ours, theirs = socket.socketpair()
        self.peers.append(theirs)
        return Conn(ours, "upstream test", port=61000 + len(self.peers))


def test_pool_gives_back_the_most_recently_used():
    p = Pool(size=3)
    a, b = p.conn(), p.conn()
    p.pool.put(A, a)
    p.pool.put(A, b)
    assert p.pool.get(B) is None
    assert p.pool.get(A) is b and b.reused
    assert p.pool.get(A) is a
    assert p.pool.get(A) is None
    assert p.counters["http.pool_reused"] == 2 and p.dropped == []


def test_pool_keeps_at_most_size_per_address():
    p = Pool(size=1)
    a, b, c = p.conn(), p.conn(), p.conn()
    p.pool.put(A, a)
    p.pool.put(A, b)
    p.pool.put(B, c)
    assert p.dropped == [b] and p.counters["http.pool_full"] == 1
    assert p.pool.get(A) is a and p.pool.get(B) is c


def test_pool_size_zero_keeps_nothing():
    p = Pool(size=0)
    a = p.conn()
    p.pool.put(A, a)
    assert p.dropped == [a] and p.pool.get(A) is None


def test_a_connection_that_spoke_while_idle_is_not_taken():
    p = Pool()
    a, b = p.conn(), p.conn()
    p.pool.put(A, a)
    p.pool.put(A, b)
    p.peers[1].close()                 # b's origin closed it (EOF waiting)
    p.peers[0].send(b"HTTP/1.1 200 OK\r\n")    # a got bytes nobody asked for
    assert p.pool.get(A) is None
    assert p.dropped == [b, a] and p.counters["http.upstream_unsolicited"] == 2


def test_sweep_closes_idle_and_closed_connections():
    p = Pool(size=3, idle_timeout=30)
    old, closed, fresh = p.conn(), p.conn(), p.conn()
    p.pool.put(A, old)
    p.clock.now += 20
    p.pool.put(A, closed)
    p.pool.put(B, fresh)
    p.peers[1].close()
    p.clock.now += 10                  # old has been idle for 30 s
    p.pool.sweep()
    assert p.dropped == [old, closed]
    assert p.counters["http.pool_expired"] == 1 and p.counters["http.upstream_unsolicited"] == 1
    assert p.pool.get(A) is None and p.pool.get(B) is fresh


def test_get_does_not_hand_out_an_expired_connection():
    p = Pool(idle_timeout=5)
    a = p.conn()
    p.pool.put(A, a)
    p.clock.now += 5
    assert p.pool.get(A) is None and p.dropped == [a]


def test_evict_frees_the_oldest_and_close_frees_all():
    p = Pool(size=3)
    a, b, c = p.conn(), p.conn(), p.conn()
    p.pool.put(A, a)
    p.clock.now += 1
    p.pool.put(B, b)
    p.clock.now += 1
    p.pool.put(A, c)
    assert p.pool.evict() and p.dropped == [a]
    p.pool.close()
    assert sorted(map(id, p.dropped)) == sorted(map(id, [a, b, c]))
    assert not p.pool.evict()


# -- a pooled connection the origin closed while it was idle ----------------------------------
class OneShotOrigin:
    """A local origin answering every request on its connections with "ok"."""

    def __init__(self):
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.addr = self.lsock.getsockname()
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                sock, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(sock,), daemon=True).start()

    def _conn(self, sock):
        buf = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return
            buf += data
            while b"\r\n\r\n" in buf:
                head, _, buf = buf.partition(b"\r\n\r\n")
                self.requests.append(head)
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def stale_setup(origin: OneShotOrigin):
    """A proxy whose pool holds one connection that the origin closes once it has read
    the next request on it: the race `_readable` cannot see."""
    proxy = HTTPProxy(Settings(listen=("127.0.0.1", 0), upstreams=(origin.addr,), ports=(63000, 63099)))
    ours, theirs = socket.socketpair()
    stale = Conn(ours, "upstream stale", port=None)
    got = []

    def close_after_request():
        got.append(theirs.recv(65536))
        theirs.close()
    threading.Thread(target=close_after_request, daemon=True).start()
    proxy.conns.put(origin.addr, stale)
    return proxy, got


def forward(proxy, request: bytes):
    req, _ = http1.parse_request_head(bytearray(request), proxy.s.limits)
    ours, theirs = socket.socketpair()
    client = Conn(ours, "client test")
    result = proxy._forward(client, req, Exchange("127.0.0.1:1"), "127.0.0.1")
    theirs.settimeout(2)
    return result, theirs.recv(65536)


def test_a_stale_pooled_connection_is_retried_on_a_new_one():
    origin = OneShotOrigin()
    proxy, got = stale_setup(origin)
    (keep, handed), answer = forward(proxy, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok")
    assert keep and not handed
    assert got and got[0].startswith(b"GET /x ")                  # sent once on the stale one,
    assert len(origin.requests) == 1                              # then once on a new one
    assert proxy.counters["http.pool_stale_retries"] == 1
    assert proxy.conns.get(origin.addr) is not None               # which went back to the pool
    proxy.close()


def test_a_request_that_must_not_be_repeated_is_not_retried():
    origin = OneShotOrigin()
    proxy, got = stale_setup(origin)
    with pytest.raises(UpstreamError, match="closed before a complete response head"):
        forward(proxy, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert got and origin.requests == [] and proxy.counters["http.pool_stale_retries"] == 0
    proxy.close()
