"""The pool of idle upstream connections (proxy.http.ConnPool), without the lab.

Connections are socketpair ends (the other end plays the origin: writing to it or
closing it makes the idle connection "speak").  The threaded test checks that no
connection is ever handed to two callers at once and none is lost (a lock-free pool of
deques was tried: no CPU saved at 1 KiB, bench_http 2x2 interleaved runs).
"""
from __future__ import annotations

import collections
import socket
import threading
import time

from nfsplice.proxy.http import Conn, ConnPool, Upstreams

A, B = ("198.18.2.2", 8000), ("198.18.2.3", 8000)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, size: int = 4, idle: float = 10.0):
        self.clock = Clock()
        self.counters = collections.Counter()
        self.dropped: list[Conn] = []
        self.peers: dict[int, socket.socket] = {}
        self.pool = ConnPool(size, idle, self.dropped.append, self.counters, clock=self.clock)

    def conn(self, name: str) -> Conn:
        a, b = socket.socketpair()
        c = Conn(a, name)
        self.peers[id(c)] = b
        return c

    def close(self):
        for c in self.dropped:
            c.sock.close()
        for b in self.peers.values():
            b.close()


def test_most_recent_first_and_per_address():
    h = Harness()
    c1, c2, c3 = h.conn("1"), h.conn("2"), h.conn("3")
    h.pool.put(A, c1)
    h.clock.now += 1
    h.pool.put(A, c2)
    h.pool.put(B, c3)
    assert h.pool.get(A) is c2 and c2.reused
    assert h.pool.get(A) is c1
    assert h.pool.get(A) is None
    assert h.pool.get(B) is c3
    assert h.counters["http.pool_reused"] == 3
    h.close()


def test_size_bound_drops_the_extra_one():
    h = Harness(size=2)
    cs = [h.conn(str(i)) for i in range(3)]
    for c in cs:
        h.pool.put(A, c)
    assert h.dropped == [cs[2]] and h.counters["http.pool_full"] == 1
    h.close()


def test_expired_and_speaking_connections_are_not_handed_out():
    h = Harness(idle=10.0)
    old, spoke, fresh = h.conn("old"), h.conn("spoke"), h.conn("fresh")
    h.pool.put(A, old)
    h.clock.now += 8
    h.pool.put(A, fresh)
    h.pool.put(A, spoke)
    h.peers[id(spoke)].sendall(b"unsolicited")
    h.clock.now += 3          # old: 11 s idle
    assert h.pool.get(A) is fresh          # spoke is dropped on the way
    assert h.pool.get(A) is None           # old expired
    assert h.dropped == [spoke, old]
    assert h.counters["http.upstream_unsolicited"] == 1 and h.counters["http.pool_expired"] == 1
    h.close()


def test_sweep_keeps_the_rest_in_order():
    h = Harness(idle=10.0)
    cs = [h.conn(str(i)) for i in range(4)]
    for c in cs:
        h.pool.put(A, c)
        h.clock.now += 3                   # idle 12, 9, 6, 3 s at the sweep
    h.peers[id(cs[3])].close()             # the origin closed the newest
    h.pool.sweep()
    assert h.dropped == [cs[0], cs[3]]
    assert h.pool.get(A) is cs[2] and h.pool.get(A) is cs[1] and h.pool.get(A) is None
    h.close()


def test_evict_takes_the_oldest_of_all_addresses():
    h = Harness()
    a1, b1, a2 = h.conn("a1"), h.conn("b1"), h.conn("a2")
    h.pool.put(B, b1)
    h.clock.now += 1
    h.pool.put(A, a1)
    h.pool.put(A, a2)
    assert h.pool.evict() and h.dropped == [b1]
    assert h.pool.evict() and h.dropped == [b1, a1]
    assert h.pool.evict() and h.pool.evict() is False
    h.pool.close()
    assert h.dropped == [b1, a1, a2] and h.counters["http.pool_evicted"] == 3
    h.close()


def test_threads_never_share_a_connection_and_lose_none():
    """8 threads take and give back 6 connections 2,000 times each, holding each a
    moment, a sweeper beside them: every connection is held by one caller at a time,
    and at the end each is in the pool or was dropped exactly once."""
    h = Harness(size=6, idle=1e9)
    conns = [h.conn(str(i)) for i in range(6)]
    for c in conns:
        h.pool.put(A, c)
    holders: dict[int, int] = {}
    guard = threading.Lock()          # (the test's own bookkeeping, not the pool's)
    errors: list[str] = []
    stop = threading.Event()

    def worker(me: int):
        for _ in range(2000):
            c = h.pool.get(A)
            if c is None:
                continue
            with guard:
                if id(c) in holders:
                    errors.append(f"{c.name} held by {holders[id(c)]} and {me}")
                holders[id(c)] = me
            time.sleep(0)                 # (others run while this one holds it)
            with guard:
                del holders[id(c)]
            h.pool.put(A, c)

    def sweeper():
        while not stop.is_set():
            h.pool.sweep()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    side = threading.Thread(target=sweeper)
    side.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    side.join()
    assert not errors, errors[:5]
    left = []
    while (c := h.pool.get(A)) is not None:
        left.append(c)
    assert sorted(c.name for c in left + h.dropped) == sorted(c.name for c in conns)
    h.close()


def test_round_robin_and_down_upstreams():
    counters = collections.Counter()
    clock = Clock()
    u = Upstreams([A, B], 5.0, counters, clock=clock)
    assert [u.order()[0] for _ in range(4)] == [A, B, A, B]
    u.failed(A)
    assert u.order() == [B, A] and u.order() == [B, A]     # down: tried last
    clock.now += 6
    assert {u.order()[0] for _ in range(2)} == {A, B}
    single = Upstreams([A], 5.0, counters, clock=clock)
    single.failed(A)
    assert single.order() == [A]
