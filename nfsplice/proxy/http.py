"""The HTTP/1.1 proxy on the splicer (`nfsplice http`): reverse or forward (with CONNECT).

Heads are read and written through the proxy's own sockets, parsed strictly by
`http1` (which does no I/O).  Bodies are copied, or spliced by the engine:

  * a response body framed by Content-Length of at least --splice-threshold bytes, a
    body delimited by the origin closing, and the tunnel after a CONNECT 2xx or a 101:
    the pair is registered, what already arrived is copied, both sockets are frozen
    and the engine forwards the rest, with the message end as a hard limit (nothing
    past the Content-Length reaches the client; the client's own bytes do not reach
    the origin while a response body is spliced);
  * a request body (an upload) framed by Content-Length of at least --splice-threshold
    bytes, or chunked and still going past it (with --splice-chunk as for responses):
    the same, with the body's length as the client's message end and nothing of
    the origin's (an early answer waits in the engine for the rebuilt socket); the
    proxy always takes both connections back to read the response (`_splice_request`);
  * a chunked response body still going after --splice-threshold bytes were copied
    (through a ChunkedScanner), from a chunk with at least --splice-chunk bytes left
    (8 MiB: each chunk boundary costs a trip through the queue): the rest is spliced with that scanner as the message
    end, the engine following the chunk framing so nothing past the last chunk and
    its trailer section reaches the client (`_chunked_response`); not when the cache
    stores the body (the fill decodes what the proxy copies);
  * everything else (small bodies, chunked ones of small chunks) is copied.

Keep-alive survives a spliced Content-Length or chunked body: once the client has
acknowledged all of it, the engine holds the pair's packets and the proxy rebuilds
both sockets at the advanced sequence numbers (TCP_REPAIR restore, `_resume`) and
carries on with them.  A close-delimited body or a tunnel ends both connections
through the engine.

Upstream connections are not tied to a client connection: after a complete exchange
(also after a resumed splice) one goes back to its listener's pool of idle connections
(`ConnPool`, per upstream address) and the next request, from any client, takes it.  A
reverse proxy's upstreams are taken in round robin (`Upstreams`); one that refuses or
times out on connect is skipped for a while, and the request goes to the next one.

With a cache (--cache-dir, `nfsplice.cache`), GET and HEAD are looked up first (RFC
9111, the rules in `cache.policy`): a usable stored response is answered from the
store (head from the index, body with sendfile(2)), a stale one is validated with the
origin, concurrent misses for one key make one origin request and the others follow
the growing object, and what the origin sends is stored while it is forwarded: a
copied body from the proxy's buffer, a spliced one from the engine's tap
(`Pair.tap`).  Requests the cache cannot answer go to the origin untouched; unsafe
methods invalidate.  See "the cache" below.

One `HTTPProxy` per listen address; `HTTPService` runs several in one process on one
runner.  One thread per client connection, blocking sockets with timeouts.  Every
request gets one access-log line: client, method, target, status, bytes in/out,
spliced|copied, cache status (cache=hit|miss|revalidated|stale|collapsed|bypass|purge,
- without a cache), upstream address, upstream and total milliseconds.  The line of a
tunnel (CONNECT, 101) or of a body delimited by the origin's close is written when it
ends: copied, with the bytes the proxy moved; spliced, when the engine forgets the pair
(after --linger), with the bytes it forwarded, and "aborted" when the spliced bytes did
not end with a FIN.  A process stopped meanwhile logs such a line without them.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from .. import handoff, syscalls
from ..cache import layer, policy
from ..cache.store import ABORTED, COMMITTED
from ..engine import C2S, QUEUE_MARK, S2C, Endpoint, Engine, Pair
from . import common, http1
from .http1 import HTTPError, UpstreamError

log = logging.getLogger("nfsplice.http")
access = logging.getLogger("nfsplice.access")

RECV = 1 << 16
# An upstream connection of a splicing listener reads response heads with a small
# receive buffer (SO_RCVBUF, not autotuned): the body of a response the proxy will
# splice then waits at the origin, not in the socket, where the hand-off would copy it
# (bench_http, 1 MiB under 50 connections: 380 KB of each body copied by the drain with
# the kernel's buffer, 63-98 KB with this).  Its client connections read request heads
# the same way, so an upload waits at the client (with the kernel's autotuned buffer a
# 300 KB upload sometimes arrived whole and was copied).  The window scale is negotiated
# before it is set, so a spliced flow still offers the client's whole window.  A large
# body the proxy copies (BODY_RCVBUF_FROM bytes or more, or of unknown length) gets
# BODY_RCVBUF instead, for the rest of that socket's life: a buffer never shrinks below
# a window it has offered (what arrives past it would be dropped), so later bodies on
# that connection may arrive whole and be copied.  Smaller ones are copied through the
# head's buffer, about the window a fresh socket starts with anyway.
HEAD_RCVBUF = 64 << 10
BODY_RCVBUF = 4 << 20
BODY_RCVBUF_FROM = 1 << 20
SO_RCVBUFFORCE = 33     # asm-generic/socket.h (CAP_NET_ADMIN: beyond net.core.rmem_max)


IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})   # RFC 9110 9.2.2
# How long a request with Expect: 100-continue waits for the origin's 100 (or a final
# answer) before its body goes on anyway: many origins ignore the expectation and wait
# for the body.  The proxy then sends the client a 100 of its own, as RFC 9110 10.1.1
# lets a proxy do for an origin that does not answer one (a client may wait long for
# it: curl's --expect100-timeout, 1 s by default, is the client's to set).
EXPECT_WAIT = 1.0


@dataclass
class Timeouts:
    header: float = 10.0          # a request head must arrive within this (slowloris)
    idle: float = 60.0            # between requests on a kept-alive client connection
    connect: float = 5.0          # upstream connect
    response: float = 60.0        # upstream response head, and between body reads
    splice_idle: float = 300.0    # a spliced body or tunnel with no packet for this long
    pool_idle: float = 30.0       # an idle pooled upstream connection is closed after this


@dataclass
class Settings:
    """One listener's settings (the command line, or a [[listener]] of the config file)."""
    listen: tuple[str, int] | None = None
    upstreams: tuple[tuple[str, int], ...] = ()   # round robin; none: forward proxy
    splice: bool = True
    threshold: int = 2 << 20       # bench_http, 50 connections: 1 MiB spliced 0.94x a copy, 4 MiB 1.8x
    # A chunked body is spliced from a chunk with at least this much left: each chunk
    # boundary costs a trip through the queue (64 KiB chunks spliced: 1/3 of a copy's speed).
    chunk_threshold: int = 8 << 20
    connect_ports: frozenset = frozenset({443})
    via: str = "nfsplice"
    limits: http1.Limits = field(default_factory=http1.Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_connections: int = 4096
    resume: bool = True            # keep-alive after a spliced body (sockets rebuilt)
    source: str | None = None
    ports: tuple[int, int] = (61000, 62999)
    pool_size: int = 32            # idle upstream connections kept per upstream address
    down_time: float = 10.0        # an upstream that failed to connect is skipped this long
    cache_dir: str | None = None   # the cache's store (None: no cache)
    cache_size: int = 1 << 30      # bodies stored at most (least recently used evicted)
    cache_heuristic: bool = False  # heuristic freshness (RFC 9111 4.2.2) when configured
    purge_from: tuple = (ipaddress.IPv4Network("127.0.0.1/32"),)   # who may send PURGE


class _Closed(Exception):
    """The peer went away (EOF, reset, timeout) where that simply ends the exchange."""


class _Timeout(_Closed):
    """The peer said nothing in time."""


class _Stale(Exception):
    """A reused upstream connection closed before answering a request that may be sent
    again (idempotent, no body): the origin closed it while it was idle."""


class Conn:
    """A socket with the bytes read past the last parsed message.  An upstream
    connection also knows its source port (released when it is dropped) and whether it
    came from the pool."""

    def __init__(self, sock: socket.socket, name: str, port: int | None = None):
        self.sock = sock
        self.name = name
        self.port = port
        self.buf = bytearray()
        self.eof = False
        self.reused = False
        self._addrs_of: socket.socket | None = None
        self._addrs: tuple = ()
        self.rcvbuf: int | None = None       # set by set_rcvbuf; None: the kernel's, autotuned

    def fill(self, timeout: float) -> int:
        """Read what comes within TIMEOUT seconds (which also bounds the sends until
        the next fill)."""
        syscalls.set_timeouts(self.sock, timeout)
        try:
            data = self.sock.recv(RECV)
        except (socket.timeout, TimeoutError, BlockingIOError):
            raise _Timeout(f"{self.name}: timeout") from None
        except OSError as e:
            raise _Closed(f"{self.name}: {e.strerror or e}") from None
        if not data:
            self.eof = True
            return 0
        self.buf += data
        return len(data)

    def set_rcvbuf(self, size: int) -> None:
        """Lock the socket's receive buffer at SIZE bytes of data (the kernel doubles
        it for its bookkeeping), unless it is that already."""
        if self.rcvbuf == size:
            return
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        self.rcvbuf = size

    def addrs(self) -> tuple:
        """(local, peer) address of the socket, asked of the kernel once per socket
        (getsockname and getpeername let go of the GIL)."""
        if self._addrs_of is not self.sock:
            self._addrs = (self.sock.getsockname(), self.sock.getpeername())
            self._addrs_of = self.sock
        return self._addrs

    def send(self, data) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise _Closed(f"{self.name}: {e.strerror or e}") from None

    def take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


@dataclass
class Exchange:
    """What one request cost: the access-log line."""
    client: str
    method: str = "-"
    target: str = "-"
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    mode: str = "copied"
    cache: str = "-"
    upstream: str = "-"
    upstream_ms: float = 0.0
    started: float = field(default_factory=time.monotonic)
    deferred: bool = False      # the line is written when the engine forgets the pair (`forget`)
    cut: int | None = None      # a spliced message that ended early: the bytes the engine forwarded
    aborted: str | None = None  # why the message was cut short (the line says "aborted (why)")

    def line(self) -> str:
        total = (time.monotonic() - self.started) * 1000
        return (f"{self.client} {self.method} {self.target} {self.status} {self.bytes_in} {self.bytes_out} "
                f"{self.mode} cache={self.cache} upstream={self.upstream} upstream_ms={self.upstream_ms:.1f} "
                f"total_ms={total:.1f}" + (f" aborted ({self.aborted})" if self.aborted else ""))


class Upstreams:
    """A reverse proxy's upstreams, taken in round robin.

    One that refused or timed out on connect is down for DOWN_TIME seconds: skipped
    while another is up.  When none is up, the one whose down period ends first is
    still tried: a late answer is better than a 502 without trying."""

    def __init__(self, addrs, down_time: float, counters, clock=time.monotonic):
        self.addrs = list(addrs)
        self.down_time = down_time
        self.counters = counters
        self.clock = clock
        self.down_until = dict.fromkeys(self.addrs, 0.0)
        self.next = 0
        self.lock = threading.Lock()

    def order(self) -> list[tuple[str, int]]:
        """The upstreams to try for one request, in turn: every one that is up, from the
        round-robin position on, then the down one that comes back first."""
        with self.lock:
            now = self.clock()
            turn = self.addrs[self.next:] + self.addrs[:self.next]
            self.next = (self.next + 1) % len(self.addrs)
            up = [a for a in turn if self.down_until[a] <= now]
            down = [a for a in turn if self.down_until[a] > now]
            if down:
                up.append(min(down, key=self.down_until.__getitem__))
        return up

    def failed(self, addr) -> None:
        with self.lock:
            now = self.clock()
            was_up = self.down_until[addr] <= now
            self.down_until[addr] = now + self.down_time
        if was_up:
            self.counters["http.upstream_down"] += 1
            log.warning("upstream %s:%s is down for %g s", addr[0], addr[1], self.down_time)

    def connected(self, addr) -> None:
        if self.down_until[addr]:
            with self.lock:
                self.down_until[addr] = 0.0
            self.counters["http.upstream_up"] += 1
            log.info("upstream %s:%s is up again", addr[0], addr[1])


class ConnPool:
    """Idle upstream connections per upstream address, shared by all client connections
    of a listener.

    The caller puts a connection back only after a complete exchange (the whole
    response read, nothing past it, both sides keeping the connection).  A connection
    that has something to say while idle (unsolicited bytes, or its close: `_readable`)
    is closed instead of being taken.  At most SIZE idle connections per address, the
    most recently used taken first (so the others age out); one idle for IDLE_TIMEOUT
    seconds is closed by `sweep`.  DROP closes a connection and releases its port."""

    def __init__(self, size: int, idle_timeout: float, drop, counters, clock=time.monotonic):
        self.size = size
        self.idle_timeout = idle_timeout
        self.drop = drop
        self.counters = counters
        self.clock = clock
        self.idle: dict[tuple[str, int], list[tuple[float, Conn]]] = {}
        self.lock = threading.Lock()

    def get(self, addr) -> Conn | None:
        while True:
            with self.lock:
                stack = self.idle.get(addr)
                if not stack:
                    return None
                since, conn = stack.pop()
            if self.clock() - since >= self.idle_timeout:
                self.counters["http.pool_expired"] += 1
            elif _readable(conn.sock):
                self.counters["http.upstream_unsolicited"] += 1
            else:
                self.counters["http.pool_reused"] += 1
                conn.reused = True
                return conn
            self.drop(conn)

    def put(self, addr, conn: Conn) -> None:
        with self.lock:
            stack = self.idle.setdefault(addr, [])
            if len(stack) < self.size:
                stack.append((self.clock(), conn))
                return
        self.counters["http.pool_full"] += 1
        self.drop(conn)

    def sweep(self) -> None:
        """Close the connections idle for IDLE_TIMEOUT, and those the origin closed."""
        now = self.clock()
        expired, spoke = [], []
        with self.lock:
            for stack in self.idle.values():
                keep = []
                for since, conn in stack:
                    if now - since >= self.idle_timeout:
                        expired.append(conn)
                    elif _readable(conn.sock):
                        spoke.append(conn)
                    else:
                        keep.append((since, conn))
                stack[:] = keep
        self.counters["http.pool_expired"] += len(expired)
        self.counters["http.upstream_unsolicited"] += len(spoke)
        for conn in expired + spoke:
            self.drop(conn)

    def evict(self) -> bool:
        """Close the oldest idle connection (its source port is wanted); False if none."""
        with self.lock:
            oldest = min(((stack[0][0], addr) for addr, stack in self.idle.items() if stack), default=None)
            if oldest is None:
                return False
            _, conn = self.idle[oldest[1]].pop(0)
        self.counters["http.pool_evicted"] += 1
        self.drop(conn)
        return True

    def close(self) -> None:
        with self.lock:
            conns = [c for stack in self.idle.values() for _, c in stack]
            self.idle.clear()
        for conn in conns:
            self.drop(conn)


class HTTPProxy:
    """One listener: its listen socket, upstreams, source ports and idle connections."""

    def __init__(self, settings: Settings, runner=None, counters=None, cache: layer.Cache | None = None):
        self.s = settings
        self.runner = runner
        self.cache = cache
        self.counters = counters if counters is not None else _Counters()
        self.slots = threading.BoundedSemaphore(settings.max_connections)
        self.lsock: socket.socket | None = None
        self.ports = common.PortPool(settings.ports, settings.source)
        self.conns = ConnPool(settings.pool_size, settings.timeouts.pool_idle, self._drop, self.counters)
        self.upstreams = (Upstreams(settings.upstreams, settings.down_time, self.counters)
                          if settings.upstreams else None)
        # A caching reverse proxy is a surrogate (W3C Edge Architecture): it announces
        # itself with Surrogate-Capability and obeys Surrogate-Control meant for it.
        self.surrogate = settings.via.split(":")[0] if cache is not None and self.upstreams else None
        self.waiters: dict[int, threading.Event] = {}
        # Spliced exchanges whose access line waits for the engine's byte counts: id(pair)
        # -> (Exchange, the directions spliced until their FIN).
        self.deferred: dict[int, tuple[Exchange, tuple[int, ...]]] = {}

    @property
    def _head_window(self) -> bool:
        """Read heads with HEAD_RCVBUF: splicing with the fast path (without it a splice
        costs more than copying what arrived meanwhile)."""
        return self.runner is not None and self.s.splice and self.runner.fastpath is not None

    # -- listening -------------------------------------------------------------------------
    def open(self) -> None:
        self.lsock = common.listen(self.s.listen)

    def serve(self, stop: threading.Event) -> None:
        assert self.lsock is not None
        threading.Thread(target=self._sweep, args=(stop,), daemon=True).start()
        common.accept_loop(self.lsock, stop, self.slots, self.counters, "http", self._client)

    def _sweep(self, stop: threading.Event) -> None:
        while not stop.wait(min(1.0, self.s.timeouts.pool_idle / 2)):
            self.conns.sweep()

    def close(self) -> None:
        if self.lsock is not None:
            self.lsock.close()
            self.lsock = None
        self.conns.close()
        while self.deferred:
            _pid, (ex, _dirs) = self.deferred.popitem()
            access.info(ex.line() + " (still spliced at shutdown: the bytes since the hand-off are not counted)")

    # -- one client connection ---------------------------------------------------------------
    def _client(self, csock: socket.socket, caddr) -> None:
        # Heads and small bodies are separate writes: without NODELAY, Nagle holds the
        # second one for the client's delayed ACK (~40 ms).
        csock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = Conn(csock, f"client {caddr[0]}:{caddr[1]}")
        if self._head_window:
            client.set_rcvbuf(HEAD_RCVBUF)    # an upload waits at the client: see HEAD_RCVBUF
        handed_off = False
        try:
            first = True
            while True:
                ex = Exchange(f"{caddr[0]}:{caddr[1]}")
                try:
                    req = self._read_request(client, first)
                except _Closed:
                    return
                except HTTPError as e:
                    self._refuse(client, ex, e.status, e.reason)
                    return
                first = False
                ex.method, ex.target = req.method, req.target
                self.counters["http.requests"] += 1
                try:
                    if req.method == "CONNECT":
                        handed_off = self._connect(client, req, self._upstream_for(req), ex)
                        return
                    keep, handed_off = self._forward(client, req, ex, caddr[0])
                except HTTPError as e:
                    self._refuse(client, ex, e.status, e.reason)
                    return
                except UpstreamError as e:
                    self.counters["http.upstream_errors"] += 1
                    log.warning("%s %s: %s", ex.client, req.target, e.reason)
                    if ex.status == 0:
                        self._refuse(client, ex, 502, f"upstream failed: {e.reason}")
                    else:
                        # The head went out already: end with a reset, so the client
                        # cannot take what it got for a complete message.
                        ex.aborted = e.reason
                        access.info(ex.line())
                        _abort(client.sock)
                    return
                except _Upstream as e:
                    self.counters["http.upstream_errors"] += 1
                    if ex.status == 0:
                        self._refuse(client, ex, e.status, e.reason)
                    else:
                        # Headers already went out: the client must see a truncated
                        # message, never a complete-looking one.
                        ex.bytes_out += e.copied
                        ex.aborted = e.reason
                        access.info(ex.line())
                        _abort(client.sock)
                    return
                if not ex.deferred:
                    access.info(ex.line())
                if handed_off or not keep:
                    return
        except _Closed as e:
            log.debug("%s", e)
        finally:
            if not handed_off:
                _close(client.sock)      # (after a resume, the rebuilt socket)
                self.slots.release()

    def _forward(self, client: Conn, req: http1.Request, ex: Exchange, client_ip: str) -> tuple[bool, bool]:
        """Answer REQ: from the cache when there is one and it can (`_cached`), else
        from an upstream (`_fetch`).  Returns (keep the client connection, handed off)."""
        if self.cache is None:
            return self._fetch(client, req, ex, client_ip)
        return self._cached(client, req, ex, client_ip)

    def _fetch(self, client: Conn, req: http1.Request, ex: Exchange, client_ip: str,
               lk: _Lookup | None = None) -> tuple[bool, bool]:
        """REQ to an upstream and its response back (LK: what the cache wants from it).
        The upstream connection goes back to the pool after a complete exchange, to the
        engine with a splice that does not resume, and is closed otherwise.  Returns
        (keep the client connection, handed off)."""
        while True:
            up, addr = self._upstream(req)
            ex.upstream = f"{addr[0]}:{addr[1]}"
            try:
                keep, handed, reuse = self._exchange(client, up, req, ex, client_ip, lk)
            except _Stale:
                self.counters["http.pool_stale_retries"] += 1
                self._drop(up)
                continue
            except BaseException:
                self._drop(up)
                raise
            if reuse:
                self.conns.put(addr, up)
            elif not handed:
                self._drop(up)
            return keep, handed

    # -- the cache (RFC 9111) ---------------------------------------------------------------------
    def _cached(self, client: Conn, req: http1.Request, ex: Exchange, client_ip: str) -> tuple[bool, bool]:
        """REQ with a cache: PURGE; a request the cache cannot answer goes to the origin
        untouched (an unsafe method invalidates what its success names; a GET with a
        body or an upgrade is not the cache's either: its body would be left unread, its
        protocol switch answered with a stored page); else a stored response is reused
        or validated (`_stored`), or it is a miss (`_miss`)."""
        if req.method == "PURGE":
            return self._purge(client, req, ex, client_ip), False
        key = self.cache.key(req)
        if (key is None or req.body_framing() != ("none",) or http1.is_upgrade(req)
                or not policy.lookup_allowed(req, ranges=True)):
            ex.cache = "bypass"
            self.counters["cache.bypass"] += 1
            return self._fetch(client, req, ex, client_ip, _Lookup(self, req, key, "bypass"))
        entry = self.cache.lookup(key, req)
        if entry is not None:
            with entry:
                return self._stored(client, req, ex, client_ip, key, entry)
        return self._miss(client, req, ex, client_ip, key)

    def _stored(self, client: Conn, req: http1.Request, ex: Exchange, client_ip: str, key: str,
                entry) -> tuple[bool, bool]:
        """A stored response selected for REQ: served when fresh or allowed stale (RFC
        9111 4.2, 4.2.4; stale-while-revalidate also starts a background validation,
        RFC 5861 3), validated with the origin otherwise (4.3), 504 for only-if-cached."""
        stored = policy.StoredResponse.from_meta(entry.meta)
        r = policy.reuse(self._view(stored), req, time.time(), self.cache.config)
        if r.action == policy.GATEWAY_TIMEOUT:
            return self._gateway_timeout(client, ex)
        if not r.serve:
            return self._validate(client, req, ex, client_ip, key, entry, stored, r)
        if r.action == policy.HIT:
            ex.cache = "hit"
            self.counters["cache.hits"] += 1
            status = self._status(hit=True, ttl=r.lifetime - r.age)
        else:
            ex.cache = "stale"
            self.counters["cache.stale"] += 1
            status = self._status(hit=True, ttl=r.lifetime - r.age, detail=r.reason)
            if r.action == policy.STALE_REVALIDATE:
                self._revalidate_later(key, req, stored, entry, client_ip)
        return self._serve(client, req, ex, stored, entry.fd, entry.size, status), False

    def _validate(self, client: Conn, req: http1.Request, ex: Exchange, client_ip: str, key: str,
                  entry, stored: policy.StoredResponse, r: policy.Reuse) -> tuple[bool, bool]:
        """Ask the origin whether STORED is still good (RFC 9111 4.3.1): a 304 freshens
        it and the client is answered from it; a new response is forwarded and stored
        instead; an error (or no answer) lets a stale response be served where RFC 5861
        4 and 9111 4.2.4 allow it."""
        fwd = "request" if r.reason in ("no-cache-request", "max-age-request", "min-fresh") else "stale"
        lk = _Lookup(self, req, key, "validate", stored=stored, entry=entry, fwd=fwd,
                     request=policy.validation_request(req, stored))
        ex.cache = "miss"
        try:
            keep, handed = self._fetch(client, req, ex, client_ip, lk)
        except (_Upstream, UpstreamError) as e:
            if ex.status != 0:
                raise
            s = policy.stale_on_error(self._view(stored), req, time.time(), None, self.cache.config)
            if s.action != policy.STALE:
                raise
            self.counters["http.upstream_errors"] += 1
            log.warning("%s %s: %s; serving the stale stored response (%s)", ex.client, req.target,
                        getattr(e, "reason", e), s.reason)
            ex.cache = "stale"
            self.counters["cache.stale"] += 1
            status = self._status(fwd=fwd, detail=s.reason)
            return self._serve(client, req, ex, stored, entry.fd, entry.size, status), False
        if lk.absorbed is None:
            self.counters["cache.misses"] += 1
            return keep, handed
        if lk.absorbed.status == 304:
            ex.cache = "revalidated"
            status = self._status(fwd=fwd, fwd_status=304,
                                  detail=None if lk.outcome == "revalidated" else lk.outcome)
        else:
            ex.cache = "stale"
            self.counters["cache.stale"] += 1
            status = self._status(fwd=fwd, fwd_status=lk.absorbed.status, detail=lk.outcome)
        return self._serve(client, req, ex, lk.stored, entry.fd, entry.size, status), False

    def _miss(self, client: Conn, req: http1.Request, ex: Exchange, client_ip: str, key: str) -> tuple[bool, bool]:
        """Nothing stored for REQ.  Collapsed forwarding: while another request for KEY
        is on its way to the origin, wait until its response head decided whether it
        is stored, then follow the object as it grows (`_follow`); otherwise this
        request fetches and leads (a GET; HEAD and Range requests never lead)."""
        if policy.miss(req).action == policy.GATEWAY_TIMEOUT:
            return self._gateway_timeout(client, ex)
        leader = False
        if not req.values("Range"):
            deadline = time.monotonic() + self.s.timeouts.response
            while True:
                w = self.cache.follow(key, req)
                if w is not None:
                    got = self._follow(client, req, ex, client_ip, key, w)
                    if got is not None:
                        return got
                    break
                if req.method != "GET":
                    break
                ev = self.cache.lead(key)
                if ev is None:
                    leader = True
                    break
                if not ev.wait(max(0.0, deadline - time.monotonic())):
                    break                      # the leader is slow: go on our own
                entry = self.cache.lookup(key, req)
                if entry is not None:
                    with entry:
                        return self._stored(client, req, ex, client_ip, key, entry)
        ex.cache = "miss"
        self.counters["cache.misses"] += 1
        lk = _Lookup(self, req, key, "miss", leader=leader)
        try:
            return self._fetch(client, req, ex, client_ip, lk)
        finally:
            if lk.leader:                      # (the response head never came)
                self.cache.release(key)

    def _follow(self, client: Conn, req: http1.Request, ex: Exchange, client_ip: str, key: str,
                w) -> tuple[bool, bool] | None:
        """Serve REQ from the body W is still storing, as its bytes arrive.  None when
        W cannot answer REQ (it needs validation, or W was given up before we began):
        the caller goes to the origin.  A body of unknown length (chunked, until close)
        is served once it is complete.  If W is given up midway, the client's
        connection is reset: it never sees a complete-looking response."""
        stored = policy.StoredResponse.from_meta(w.meta)
        if not policy.reuse(self._view(stored), req, time.time(), self.cache.config).serve:
            return None
        if w.length is None:
            w.wait(1 << 62, self.s.timeouts.response)
            entry = self.cache.lookup(key, req) if w.state == COMMITTED else None
            if entry is None:
                return None
            with entry:
                return self._stored(client, req, ex, client_ip, key, entry)
        fd = w.open_body()
        if fd is None:
            return None
        try:
            if w.contiguous >= w.length:
                # Complete, only not yet in the index (the writer thread commits it any
                # moment): nothing is forwarded for this request, it is a plain hit.
                r = policy.reuse(self._view(stored), req, time.time(), self.cache.config)
                ex.cache = "hit"
                self.counters["cache.hits"] += 1
                status = self._status(hit=True, ttl=r.lifetime - r.age)
            else:
                ex.cache = "collapsed"
                self.counters["cache.collapsed"] += 1
                status = self._status(fwd="miss", collapsed=True)
            return self._serve(client, req, ex, stored, fd, w.length, status, growing=w), False
        finally:
            os.close(fd)

    def _serve(self, client: Conn, req: http1.Request, ex: Exchange, stored: policy.StoredResponse,
               fd: int, length: int, status: str, growing=None) -> bool:
        """Answer REQ from the cache: 304 to the client's own matching conditional
        (RFC 9111 4.3.2), else the stored response with Age and Date (4, 5.1): head
        only for HEAD (RFC 9110 9.3.2), one byte range as 206 or 416 for a GET with a
        satisfiable or unsatisfiable Range (RFC 9110 14, 15.3.7, 15.5.17; several
        ranges get the whole).  The body goes from FD with sendfile(2); GROWING is
        the Writer still storing it.  Returns whether the client connection is kept."""
        now = time.time()
        keep = http1.keep_alive(req)
        span = None
        if policy.conditional_hit(stored, req):
            code, reason, fields = 304, "Not Modified", policy.not_modified_fields(stored, now)
        else:
            code, reason = stored.status, stored.reason
            fields = policy.hit_fields(stored, now, length)
            span = (0, length)
            ranges = req.values("Range")
            if_range = req.values("If-Range")
            if (ranges and req.method == "GET" and stored.status == 200
                    and (not if_range or layer.if_range_matches(stored, if_range[0]))):
                rng = layer.parse_range(", ".join(ranges), length)
                if rng == "unsatisfiable":
                    code, reason, span = 416, "Range Not Satisfiable", None
                    fields = _without(fields, "content-length") + (
                        ("Content-Range", f"bytes */{length}"), ("Content-Length", "0"))
                elif rng is not None:
                    a, b = rng
                    code, reason, span = 206, "Partial Content", (a, b + 1)
                    fields = _without(fields, "content-length") + (
                        ("Content-Range", f"bytes {a}-{b}/{length}"), ("Content-Length", str(b - a + 1)))
        if self.surrogate is not None:
            fields = layer.strip_surrogate(fields)
        head = layer.response_head(code, reason, fields, via=self.s.via, status_value=status, close=not keep)
        ex.status = code
        client.send(head)
        ex.bytes_out += len(head)
        if span is not None and req.method != "HEAD" and stored.status != 204 and span[1] > span[0]:
            ex.bytes_out += self._send_body(client, fd, span[0], span[1], growing)
        return keep

    def _send_body(self, client: Conn, fd: int, start: int, end: int, growing) -> int:
        """Bytes [START, END) of FD with sendfile(2); with GROWING (a Writer), each as
        soon as it is stored.  Raises _Upstream when GROWING stops short of END."""
        timeout = self.s.timeouts.response
        pos = start
        with os.fdopen(fd, "rb", closefd=False) as f:
            while pos < end:
                avail = end
                if growing is not None:
                    have = growing.wait(pos + 1, timeout)
                    if have <= pos:
                        why = growing.error if growing.state == ABORTED else f"nothing new for {timeout:g} s"
                        raise _Upstream(502, f"the body being stored stopped at {have} of "
                                        f"{growing.length} bytes ({why})")
                    avail = min(have, end)
                client.sock.settimeout(timeout)
                try:
                    n = client.sock.sendfile(f, pos, avail - pos)
                except OSError as e:
                    raise _Closed(f"{client.name}: {e.strerror or e}") from None
                if n <= 0:
                    raise _Upstream(502, f"the stored body ended at {pos} of {end} bytes")
                pos += n
        return end - start

    def _gateway_timeout(self, client: Conn, ex: Exchange) -> tuple[bool, bool]:
        """only-if-cached and nothing usable stored (RFC 9111 5.2.1.7)."""
        ex.cache = "miss"
        self.counters["cache.misses"] += 1
        self._refuse(client, ex, 504, "only-if-cached: no usable stored response")
        return False, False

    def _purge(self, client: Conn, req: http1.Request, ex: Exchange, client_ip: str) -> bool:
        """PURGE: remove every stored variant of the target (and keep bodies still
        filling from being committed).  Only from --purge-from addresses: 403 else.
        200 when something was removed, 404 when nothing was stored."""
        ex.cache = "purge"
        if not any(ipaddress.IPv4Address(client_ip) in net for net in self.s.purge_from):
            self._refuse(client, ex, 403, f"PURGE is not allowed from {client_ip} (see --purge-from)")
            return False
        uri = policy.effective_uri(req)
        if uri is None:
            self._refuse(client, ex, 400, "PURGE needs a target URI with a host")
            return False
        n = self.cache.purge(uri)
        self.counters["cache.purges"] += 1
        body = (f"purged {uri}: {n} stored response(s)\n" if n else f"{uri} is not in the cache\n").encode()
        keep = http1.keep_alive(req) and req.body_framing() == ("none",)
        code, reason = (200, "OK") if n else (404, "Not Found")
        head = (f"HTTP/1.1 {code} {reason}\r\nDate: {policy.format_http_date(time.time())}\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
                + ("" if keep else "Connection: close\r\n") + "\r\n").encode()
        ex.status = code
        client.send(head + body)
        ex.bytes_out += len(head) + len(body)
        return keep

    def _revalidate_later(self, key: str, req: http1.Request, stored: policy.StoredResponse, entry,
                          client_ip: str) -> None:
        """stale-while-revalidate (RFC 5861 3): the stale response was served; a GET
        validates it in the background, one per key at a time."""
        if not self.cache.start_revalidation(key):
            return
        get = dataclasses.replace(req, method="GET", fields=tuple(
            (n, v) for n, v in req.fields if n.lower() not in ("range", "if-range")))
        threading.Thread(target=self._revalidate, args=(key, get, stored, entry, client_ip),
                         name="cache-revalidate", daemon=True).start()

    def _revalidate(self, key: str, req: http1.Request, stored: policy.StoredResponse, entry,
                    client_ip: str) -> None:
        ex = Exchange(f"{client_ip}:-", method=req.method, target=req.target)
        lk = _Lookup(self, req, key, "validate", stored=stored, entry=entry, fwd="stale",
                     request=policy.validation_request(req, stored), background=True)
        try:
            self._fetch(_Discard(), req, ex, client_ip, lk)
            ex.cache = "revalidated" if lk.absorbed is not None and lk.absorbed.status == 304 else "miss"
            access.info(ex.line() + " (background revalidation)")
        except (_Closed, _Upstream, http1.PeerError) as e:
            log.info("background revalidation of %s failed: %s", key, e)
        finally:
            self.cache.end_revalidation(key)

    def _status(self, **kw) -> str:
        return layer.cache_status(self.s.via, **kw)

    def _view(self, msg):
        """MSG as this cache decides on it (Surrogate-Control, `layer.surrogate_view`)."""
        return layer.surrogate_view(msg, self.surrogate)

    def _read_request(self, client: Conn, first: bool) -> http1.Request:
        wait = self.s.timeouts.header if first else self.s.timeouts.idle
        deadline = None
        while True:
            if client.buf:
                res = http1.parse_request_head(client.buf, self.s.limits)
                if res is not None:
                    req, n = res
                    del client.buf[:n]
                    return req
                if deadline is None:       # the head has begun: the header timeout runs
                    deadline = time.monotonic() + self.s.timeouts.header
            if client.eof:
                if client.buf:
                    raise HTTPError(400, "connection closed inside the request head")
                raise _Closed("client closed")
            # A new connection's first head, or one begun, within the header timeout; a
            # kept-alive connection's next one within the idle timeout.
            which = "http.header_timeouts" if first or deadline is not None else "http.idle_timeouts"
            left = wait if deadline is None else deadline - time.monotonic()
            if left <= 0:
                self.counters[which] += 1
                raise _Closed("request head timeout")
            try:
                client.fill(left)
            except _Timeout:
                self.counters[which] += 1
                raise

    def _upstream_for(self, req: http1.Request) -> tuple[str, int] | None:
        """Where REQ goes: None for a reverse proxy (its upstreams take turns), else the
        address the request names."""
        if self.upstreams is not None:
            if req.form in ("absolute", "authority"):
                if req.method == "CONNECT":
                    raise HTTPError(405, "CONNECT is for the forward proxy")
            return None
        if req.method == "CONNECT":
            if req.port not in self.s.connect_ports:
                raise HTTPError(403, f"CONNECT to port {req.port} is not allowed")
            return _resolve(req.host), req.port
        if req.form != "absolute":
            raise HTTPError(400, "a forward proxy needs an absolute-form target")
        return _resolve(req.host), req.port or 80

    def _upstream(self, req: http1.Request) -> tuple[Conn, tuple[str, int]]:
        """A connection for REQ: an idle one from the pool, else a new one.  A reverse
        proxy goes round its upstreams; one that fails to connect is marked down and the
        next one tried (a failed connect sent nothing, so any request may go elsewhere)."""
        addr = self._upstream_for(req)
        if addr is not None:
            return self.conns.get(addr) or self._dial(addr), addr
        failure = None
        for addr in self.upstreams.order():
            up = self.conns.get(addr)
            if up is not None:
                return up, addr
            if failure is not None:
                self.counters["http.upstream_retries"] += 1
            try:
                up = self._dial(addr)
            except _ConnectFailed as e:
                self.upstreams.failed(addr)
                failure = e
                continue
            self.upstreams.connected(addr)
            return up, addr
        raise failure

    def _dial(self, addr: tuple[str, int]) -> Conn:
        sock, port = self._bound_socket()
        sock.settimeout(self.s.timeouts.connect)
        try:
            sock.connect(addr)
        except (socket.timeout, TimeoutError):
            self.ports.release(port)
            _close(sock)
            self.counters["http.upstream_connect_failed"] += 1
            raise _ConnectFailed(504, f"connecting to {addr[0]}:{addr[1]} timed out") from None
        except OSError as e:
            self.ports.release(port)
            _close(sock)
            self.counters["http.upstream_connect_failed"] += 1
            raise _ConnectFailed(502, f"connecting to {addr[0]}:{addr[1]}: {e.strerror or e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.counters["http.upstream_connects"] += 1
        conn = Conn(sock, f"upstream {addr[0]}:{addr[1]}", port)
        if self._head_window:
            conn.set_rcvbuf(HEAD_RCVBUF)      # after connect: the window scale stays the kernel's
        return conn

    def _bound_socket(self) -> tuple[socket.socket, int]:
        """Upstream sockets use our port range: the rules match it, nothing else.  When
        every port is taken, idle pooled connections give theirs up."""
        while True:
            try:
                return self.ports.socket()
            except OSError as e:
                if not self.conns.evict():
                    raise _Upstream(502, str(e)) from None

    def _drop(self, up: Conn) -> None:
        """Close an upstream connection that is not handed to the engine, and free its port."""
        _close(up.sock)
        self.ports.release(up.port)

    # -- a request and its response ----------------------------------------------------------
    def _exchange(self, client: Conn, up: Conn, req: http1.Request, ex: Exchange,
                  client_ip: str, lk: _Lookup | None = None) -> tuple[bool, bool, bool]:
        """Forward REQ on UP and its response back.  Returns (keep the client connection,
        handed off, UP may carry another exchange).  Raises _Stale when UP came from the
        pool and closed before answering a request that may be sent again.

        With LK (the cache): the head sent is LK.request when it has one (a validation
        request), the response head goes to `LK.on_head` first, which may keep it from
        the client (LK.absorbed: the cache answers instead) or start storing its body
        (LK.fill: fed what is copied, or the pair's tap when the body is spliced)."""
        t0 = time.monotonic()
        sent_at = time.time()
        out = req if lk is None or lk.request is None else lk.request
        head = http1.forwarding_head(out, via=self.s.via, client_addr=client_ip,
                                     reverse=self.upstreams is not None, upgrade_allowed=True)
        if lk is not None and lk.kind != "bypass" and self.surrogate is not None:
            head = head[:-2] + f"Surrogate-Capability: {layer.surrogate_capability(self.surrogate)}\r\n\r\n".encode()
        framing = req.body_framing()
        retry = up.reused and framing == ("none",) and req.method in IDEMPOTENT
        try:
            up.send(head)
        except _Closed as e:
            if retry:
                raise _Stale() from None
            raise _Upstream(502, str(e)) from None
        resp = None
        if http1.expects_continue(req) and framing != ("none",):
            # 100 Continue, or a final answer, or (None) neither within EXPECT_WAIT: the
            # body goes on, and the client is told so with a 100 of ours (EXPECT_WAIT;
            # the origin's own late 100 is forwarded below like any interim answer).
            # Other interim answers (102, 103 Early Hints) are passed on and the wait
            # goes on: only a final answer (or a 101) means the body is not wanted.
            until = time.monotonic() + EXPECT_WAIT
            continued = False
            while True:
                resp = self._read_response(up, req, wait=max(0.0, until - time.monotonic()))
                if resp is None or not 100 <= resp.status < 200 or resp.status == 101:
                    break
                client.send(http1.forwarding_head(resp, via=self.s.via))
                if resp.status == 100:
                    resp, continued = None, True
                    break
            if resp is not None:
                framing = ("unread",)
            elif not continued:
                client.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.counters["http.expect_100_sent"] += 1
        if framing[0] == "length" and self._splices_upload(framing[1]):
            handed = self._splice_request(client, up, ex, framing[1])
            if handed is True:          # the pair ended in the engine (a reset, a close)
                return False, True, False
        elif framing[0] == "length":
            ex.bytes_in += self._copy_length(client, up, framing[1], self.s.timeouts.header)
        elif framing[0] == "chunked" and self._splices_upload(None):
            handed = self._chunked_request(client, up, ex)
            if handed is True:
                return False, True, False
        elif framing[0] == "chunked":
            ex.bytes_in += self._copy_chunked(client, up, upstream=False)
        while resp is None or 100 <= resp.status < 200 and resp.status != 101:
            if resp is not None:
                client.send(http1.forwarding_head(resp, via=self.s.via))
            resp = self._read_response(up, req, retry)
            retry = False
        ex.upstream_ms = (time.monotonic() - t0) * 1000
        if resp.status == 101 and not http1.is_upgrade(req):
            # Before ex.status is set: nothing of this response went out, the client
            # gets a 502 (not the reset that ends a response already begun).
            raise UpstreamError("101 Switching Protocols to a request that did not ask to upgrade")
        ex.status = resp.status
        rframing = resp.body_framing(req.method)
        client_keep = http1.keep_alive(req) and framing != ("unread",)
        keep = client_keep and http1.keep_alive(resp)
        # The upstream connection outlives the exchange if the origin keeps it and was
        # not asked to close (an HTTP/1.0 request is forwarded as such, without
        # keep-alive) and the request body went out whole.
        reusable = http1.keep_alive(resp) and req.version == "HTTP/1.1" and framing != ("unread",)
        if lk is not None and lk.on_head(resp, rframing, sent_at, time.time()):
            # The cache answers instead (a 304 to our validation, stale on error): a
            # response with a body is not read, so its connection is not reused.
            ex.status = 0
            keep = http1.keep_alive(req) and framing != ("unread",)
            return keep, False, reusable and rframing == ("none",) and self._clean(up)
        splice = (self.runner is not None and self.s.splice and (lk is None or not lk.background) and
                  (rframing[0] in ("close", "tunnel") or
                   rframing[0] == "length" and rframing[1] >= self.s.threshold))
        if client_keep and not keep and not splice and rframing[0] in ("length", "none"):
            # The origin closes its connection after this response (Connection: close,
            # an HTTP/1.0 origin): that ends its hop only, the client's connection goes
            # on (as with HAProxy and nginx).  Not where the body may be spliced (also
            # a chunked one, later): the origin's FIN would reach the client through
            # the engine right after the body, without a Connection: close before it.
            keep = True
        # A body of known length is spliced and the connections taken back after it
        # (sockets rebuilt with TCP_REPAIR), so keep-alive survives the splice.
        resume = splice and rframing[0] == "length" and keep and self.s.resume
        if rframing[0] == "tunnel":
            out_head = http1.forwarding_head(resp, via=self.s.via, upgrade_allowed=True)
            client.send(out_head)
            ex.bytes_out += len(out_head)
            return False, self._tunnel(client, up, ex), False
        if lk is not None and self.surrogate is not None:
            resp = dataclasses.replace(resp, fields=layer.strip_surrogate(resp.fields))
        out_head = http1.forwarding_head(resp, via=self.s.via, close=(splice and not resume) or not keep)
        if lk is not None:      # RFC 9211: our member after those of caches nearer the origin
            out_head = out_head[:-2] + f"Cache-Status: {lk.status}\r\n\r\n".encode("latin-1")
        fill = lk.fill if lk is not None else None
        if not splice and fill is None and rframing[0] == "length" and 0 < rframing[1] <= len(up.buf):
            # A body that came whole with its head (a small response): head and body in
            # one write, so one segment to the client instead of two (with NODELAY).
            out = out_head + up.take(rframing[1])
            client.send(out)
            ex.bytes_out += len(out)
            self.counters["http.one_write_responses"] += 1
            return keep, False, reusable and self._clean(up)
        client.send(out_head)
        ex.bytes_out += len(out_head)
        try:
            return self._response_body(client, up, ex, rframing, splice, resume, keep, reusable, fill)
        except BaseException:
            if fill is not None:
                fill.abort("the response failed")
            raise

    def _response_body(self, client: Conn, up: Conn, ex: Exchange, rframing, splice: bool, resume: bool,
                       keep: bool, reusable: bool, fill: layer.Fill | None) -> tuple[bool, bool, bool]:
        """The response body after its head: spliced or copied, and into FILL when the
        cache stores it.  Returns as `_exchange`."""
        if rframing[0] == "none":
            if fill is not None:
                fill.finish(0)
            return keep, False, reusable and self._clean(up)
        if splice:
            remaining = rframing[1] if rframing[0] == "length" else None
            result = self._splice_response(client, up, ex, remaining, resume, fill)
            if result == "resumed":
                _settle(fill)
                return keep, False, reusable
            if result == "copied":     # the whole body had arrived with the head
                _settle(fill)
                return keep and resume, False, reusable and self._clean(up)
            return False, result, False
        if rframing[0] == "chunked" and fill is None and self._splices_chunked(client, keep):
            return self._chunked_response(client, up, ex, keep, reusable)
        if self._head_window and (rframing[0] != "length" or rframing[1] >= BODY_RCVBUF_FROM):
            up.set_rcvbuf(BODY_RCVBUF)      # a large body copied: the window may grow as it would
        tee = _BodyTee(fill, rframing[0] == "chunked", self.s.limits) if fill is not None else None
        if rframing[0] == "length":
            ex.bytes_out += self._copy_length(up, client, rframing[1], self.s.timeouts.response,
                                              upstream=True, tee=tee)
        elif rframing[0] == "chunked":
            ex.bytes_out += self._copy_chunked(up, client, upstream=True, tee=tee)
        else:   # close-delimited, copied
            ex.bytes_out += self._copy_until_eof(up, client, tee)
            if tee is not None:
                tee.end(True)
                _settle(fill)
            return False, False, False
        if tee is not None:
            tee.end(True)
            _settle(fill)
        return keep, False, reusable and self._clean(up)

    def _clean(self, up: Conn) -> bool:
        """Nothing came after the response: the connection's framing can still be
        trusted.  Bytes after a complete response that nobody asked for are dropped
        (never forwarded) and the connection is not reused."""
        if up.buf:
            self.counters["http.upstream_extra_bytes"] += len(up.buf)
            up.buf.clear()
            up.eof = True
        return not up.eof

    def _read_response(self, up: Conn, req: http1.Request, retry: bool = False,
                       wait: float | None = None) -> http1.Response | None:
        """The next response head on UP.  RETRY: the request may be sent again, so an
        end of the connection before any byte of an answer raises _Stale.  WAIT: None
        when no complete head came within WAIT seconds (what came stays in UP.buf)
        instead of a 504 after the response timeout."""
        deadline = time.monotonic() + (self.s.timeouts.response if wait is None else wait)
        while True:
            if up.buf:
                res = http1.parse_response_head(up.buf, req.method, self.s.limits)
                if res is not None:
                    resp, n = res
                    del up.buf[:n]
                    return resp
            if up.eof:
                if retry and not up.buf:
                    raise _Stale()
                raise UpstreamError("closed before a complete response head")
            left = deadline - time.monotonic()
            if left <= 0:
                if wait is not None:
                    return None
                raise _Upstream(504, "no response from the upstream in time")
            try:
                up.fill(left)
            except _Timeout as e:
                if wait is not None:
                    return None
                raise _Upstream(504, str(e)) from None
            except _Closed as e:
                if retry and not up.buf:
                    raise _Stale() from None
                raise _Upstream(502, str(e)) from None

    # -- copying ---------------------------------------------------------------------------------
    def _copy_length(self, src: Conn, dst: Conn, n: int, timeout: float, upstream: bool = False,
                     tee=None) -> int:
        """N body bytes from SRC to DST (TEE, if given, sees each piece after it went out)."""
        left = n
        while left:
            if not src.buf:
                if src.eof:
                    self._truncated(src, upstream, n - left, n)
                try:
                    src.fill(timeout)
                except _Closed:
                    self._truncated(src, upstream, n - left, n)
                if src.eof and not src.buf:
                    self._truncated(src, upstream, n - left, n)
            chunk = src.take(min(left, len(src.buf)))
            dst.send(chunk)
            if tee is not None:
                tee(chunk)
            left -= len(chunk)
        return n

    def _truncated(self, src: Conn, upstream: bool, got: int, n: int):
        self.counters["http.truncated_bodies"] += 1
        if upstream:
            raise _Upstream(502, f"{src.name} ended the body after {got} of {n} bytes", copied=got)
        raise _Closed(f"{src.name} ended the body after {got} of {n} bytes")

    def _copy_chunked(self, src: Conn, dst: Conn, upstream: bool, tee=None) -> int:
        scanner = http1.ChunkedScanner(upstream=upstream, limits=self.s.limits)
        return self._copy_chunked_part(src, dst, scanner, None, upstream, tee=tee)

    def _copy_until_eof(self, src: Conn, dst: Conn, tee=None) -> int:
        """Everything until the upstream SRC closes (a body without framing).  Returns
        the bytes copied.  Its FIN is the body's only end: a reset or a timeout instead
        may have cut it short, and raises _Upstream, so the client's connection ends
        with a reset too (a FIN would end the client's copy as if it were complete)."""
        total = 0
        while True:
            if src.buf:
                chunk = src.take(len(src.buf))
                dst.send(chunk)
                if tee is not None:
                    tee(chunk)
                total += len(chunk)
            if src.eof:
                return total
            try:
                src.fill(self.s.timeouts.response)
            except _Closed as e:
                self.counters["http.truncated_bodies"] += 1
                raise _Upstream(502, f"{e} after {total} bytes of a body ending at the close", copied=total) from None

    # -- CONNECT and tunnels -----------------------------------------------------------------
    def _connect(self, client: Conn, req: http1.Request, addr, ex: Exchange) -> bool:
        ex.upstream = f"{addr[0]}:{addr[1]}"
        try:
            up = self._dial(addr)
        except _Upstream as e:
            self._refuse(client, ex, e.status, e.reason)
            return False
        ex.status = 200
        head = b"HTTP/1.1 200 Connection Established\r\nVia: 1.1 " + self.s.via.encode() + b"\r\n\r\n"
        # The line is written once the tunnel's mode and bytes are known: when a copied
        # tunnel ends, or (spliced) when the engine forgets the pair.
        try:
            client.send(head)
            ex.bytes_out += len(head)
            handed = self._tunnel(client, up, ex)
        except _Closed as e:
            self._drop(up)
            ex.aborted = str(e)
            access.info(ex.line())
            raise
        if not handed:
            self._drop(up)
        if not ex.deferred:
            access.info(ex.line())
        return handed

    def _tunnel(self, client: Conn, up: Conn, ex: Exchange) -> bool:
        """Both directions raw from here: spliced when we can (the engine counts the
        bytes: the access line waits for the pair's end), else copied (counted here)."""
        ex.mode = "spliced" if self.runner is not None and self.s.splice else "copied"
        if ex.mode == "spliced":
            return self._handoff(client, up, limits=(None, None), ex=ex)
        n_in, n_out = self._relay(client, up)
        ex.bytes_in += n_in
        ex.bytes_out += n_out
        return False

    def _relay(self, a: Conn, b: Conn) -> tuple[int, int]:
        """Copy both ways until both ends closed (or one failed, or splice_idle seconds
        of silence).  Returns the bytes (A to B, B to A)."""
        for c in (a, b):
            if c.rcvbuf is not None:
                c.set_rcvbuf(BODY_RCVBUF)      # copied: see HEAD_RCVBUF
        moved = {a.sock: 0, b.sock: 0}
        for c, other in ((a, b), (b, a)):
            if c.buf:
                moved[c.sock] += len(c.buf)
                other.send(c.take(len(c.buf)))
        socks = {a.sock: b, b.sock: a}
        by_fd = {a.sock.fileno(): a.sock, b.sock.fileno(): b.sock}
        open_ = {a.sock, b.sock}
        # poll(), not select(): under many connections a descriptor is above 1023,
        # which select() refuses.
        poller = select.poll()
        for s in open_:
            poller.register(s, select.POLLIN)
        while open_:
            r = [by_fd[fd] for fd, _ev in poller.poll(self.s.timeouts.splice_idle * 1000)]
            if not r:
                break
            for s in r:
                try:
                    data = s.recv(RECV)
                except OSError:
                    # A reset (or another failure) on one side: the other side's close
                    # resets it too, not a FIN that would look like the stream's end.
                    _reset_on_close(socks[s].sock)
                    return moved[a.sock], moved[b.sock]
                if not data:
                    open_.discard(s)
                    poller.unregister(s)
                    try:
                        socks[s].sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    continue
                moved[s] += len(data)
                socks[s].send(data)
        return moved[a.sock], moved[b.sock]

    # -- splicing ------------------------------------------------------------------------------
    def _splice_response(self, client: Conn, up: Conn, ex: Exchange, remaining: int | None,
                         resume: bool = False, fill: layer.Fill | None = None):
        """Returns True (the engine owns the pair now), "resumed" (the body went through
        the engine and the proxy has both connections back) or "copied".  FILL (the
        cache stores the body) gets the bytes the proxy sends itself and becomes the
        pair's tap sink for the rest: the engine's stream offset 0 is body offset
        FILL.base, the bytes sent here before the hand-off."""
        ex.mode = "spliced"
        # Body bytes already read with the head go first, through the socket.
        if up.buf:
            n = len(up.buf) if remaining is None else min(len(up.buf), remaining)
            data = up.take(n)
            client.send(data)
            if fill is not None:
                fill.body(0, data)
                fill.base = n
            ex.bytes_out += n
            if remaining is not None:
                remaining -= n
            self._clean(up)    # anything after the body is not part of this message
        if remaining == 0:
            self.counters["http.splice_skipped_small"] += 1
            ex.mode = "copied"
            if fill is not None:
                fill.finish()
            return "copied"
        if resume and remaining is not None and handoff.inq(up.sock) >= remaining:
            # The rest of the body has reached the upstream socket already (the origin
            # was quicker than a hand-off; a resumed connection's windows are open):
            # a splice would only copy it through the drain and then wait for the
            # client's acknowledgements.  Copied, without the engine.
            self.counters["http.splice_skipped_arrived"] += 1
            ex.mode = "copied"
            tee = None
            if fill is not None:
                tee = _BodyTee(fill, False, self.s.limits)
                tee.offset = fill.base
            ex.bytes_out += self._copy_length(up, client, remaining, self.s.timeouts.response,
                                              upstream=True, tee=tee)
            if tee is not None:
                tee.end(True)
            return "copied"
        handed = self._handoff(client, up, limits=(0, remaining), ex=ex, resume=resume, tap=fill)
        if remaining is not None:
            ex.bytes_out += remaining if ex.cut is None else ex.cut
        return handed

    def _splices_chunked(self, client: Conn, keep: bool) -> bool:
        """May a chunked response body be spliced once it is long enough?  Not to a
        background revalidation (no client), nor when the head promised keep-alive
        but resuming after a splice is off (its length is not known up front, so the
        head could not say the connection closes)."""
        return (self.runner is not None and self.s.splice and not isinstance(client, _Discard)
                and (self.s.resume or not keep))

    def _chunked_response(self, client: Conn, up: Conn, ex: Exchange, keep: bool, reusable: bool):
        """A chunked response body: copied through a ChunkedScanner until at least
        --splice-threshold bytes (framing included) went out and the chunk in progress
        has at least --splice-chunk bytes left; if it has not ended by then, the rest is
        spliced with the scanner as the origin's message end
        (`Engine.splice`), and taken back after its last chunk when KEEP.  Returns as
        `_exchange`.  Not for a body the cache stores (its fill decodes the chunks the
        proxy copies; a spliced chunked fill would need the tap decoded: not done).
        The access log counts the body's wire bytes: all of them after a resume, the
        ones known at the hand-off when the engine keeps the connection to its end."""
        scanner = http1.ChunkedScanner(upstream=True, limits=self.s.limits)
        ex.bytes_out += self._copy_chunked_part(up, client, scanner, self.s.threshold, upstream=True,
                                                chunk=self.s.chunk_threshold)
        if scanner.done:
            return keep, False, reusable and self._clean(up)
        before = scanner.offset
        ex.mode = "spliced"
        handed = self._handoff(client, up, limits=(0, scanner), ex=ex, resume=keep)
        if handed != "copied":
            self.counters["http.spliced_chunked"] += 1
        ex.bytes_out += scanner.offset - before
        if handed == "resumed":
            return keep, False, reusable
        if handed == "copied":      # the rest had reached the sockets: the proxy sent it
            ex.mode = "copied"
            return keep, False, reusable and self._clean(up)
        return False, handed, False

    def _copy_chunked_part(self, src: Conn, dst: Conn, scanner: http1.ChunkedScanner, upto: int | None,
                           upstream: bool, chunk: int = 0, tee=None) -> int:
        """Chunked body bytes from SRC to DST, walked by SCANNER, until the message ended
        or (UPTO not None) at least UPTO bytes went and the chunk in progress has at
        least CHUNK bytes left; SRC.buf keeps only what follows the message end.  TEE, if
        given, sees each piece after it went out.  Returns the bytes copied."""
        total = 0
        while not scanner.done and (upto is None or total < upto or scanner.data_remaining < chunk):
            if not src.buf:
                if src.eof:
                    self._truncated(src, upstream, total, -1)
                try:
                    src.fill(self.s.timeouts.response)
                except _Closed:
                    self._truncated(src, upstream, total, -1)
                continue
            n = scanner.feed(src.buf)
            piece = src.take(n)
            dst.send(piece)
            if tee is not None:
                tee(piece)
            total += n
        return total

    def _splices_upload(self, length: int | None) -> bool:
        """May a request body of LENGTH bytes (None: chunked) be spliced?"""
        return (self.runner is not None and self.s.splice and self.s.resume
                and (length is None or length >= self.s.threshold))

    def _splice_request(self, client: Conn, up: Conn, ex: Exchange, length: int):
        """A request body of LENGTH bytes (an upload) spliced: what the proxy already read
        of it goes first, the engine forwards the rest with LENGTH as the client's
        message end and nothing of the origin's (its answer waits for the rebuilt
        socket), then the proxy takes both connections back to read the response.
        Returns "resumed" or "copied" (the proxy moved it all), or True when the pair
        ended in the engine instead."""
        n = min(len(client.buf), length)
        if n:
            up.send(client.take(n))
        ex.bytes_in += length
        if n == length:
            return "copied"
        if handoff.inq(client.sock) >= length - n:
            # All of it is in the client socket already (see _splice_response): copied.
            self.counters["http.splice_skipped_arrived"] += 1
            self._copy_length(client, up, length - n, self.s.timeouts.header)
            return "copied"
        ex.mode = "spliced"
        handed = self._handoff(client, up, limits=(length - n, 0), ex=ex, resume=True, upload=True)
        if handed == "copied":
            ex.mode = "copied"
        if ex.cut is not None:
            ex.bytes_in -= length - n - ex.cut
        return handed

    def _chunked_request(self, client: Conn, up: Conn, ex: Exchange):
        """A chunked request body: copied through a ChunkedScanner like a chunked
        response (`_chunked_response`: --splice-threshold, --splice-chunk); the rest, if
        any, spliced like a Content-Length upload with the scanner as the client's
        message end.  Returns as `_splice_request`."""
        scanner = http1.ChunkedScanner(upstream=False, limits=self.s.limits)
        ex.bytes_in += self._copy_chunked_part(client, up, scanner, self.s.threshold, upstream=False,
                                               chunk=self.s.chunk_threshold)
        if scanner.done:
            return "copied"
        before = scanner.offset
        ex.mode = "spliced"
        handed = self._handoff(client, up, limits=(scanner, 0), ex=ex, resume=True, upload=True)
        ex.bytes_in += scanner.offset - before
        if handed == "copied":
            ex.mode = "copied"
        return handed

    def _handoff(self, client: Conn, up: Conn, limits, ex: Exchange | None = None, resume: bool = False,
                 tap: layer.Fill | None = None, upload: bool = False):
        """Register, drain, freeze, splice.  True when the engine owns the pair now;
        "resumed" when (RESUME) the engine reached the message end and the proxy has
        rebuilt both sockets and carries on with them.  TAP is the origin-to-client
        direction's tap sink (set after register, so before any byte is spliced; with
        --tap-dir both get the stream); it also sees what the drain moves.  UPLOAD: the
        message is the client's (a request body): the origin's early answer is kept for
        the proxy, and a FIN after the body waits for the rebuilt socket.  EX's access
        line waits for the end of a pair the engine keeps with a direction spliced until
        its FIN (a close-delimited body, a tunnel): `forget` counts those bytes."""
        csock, usock = client.sock, up.sock
        until_fin = tuple(d for d in (C2S, S2C) if limits[d] is None) if ex is not None and not resume else ()
        (cloc, cpeer), (uloc, upeer) = client.addrs(), up.addrs()
        pair = Pair(Endpoint(socket.inet_aton(cpeer[0]), cpeer[1]), Endpoint(socket.inet_aton(cloc[0]), cloc[1]),
                    Endpoint(socket.inet_aton(uloc[0]), uloc[1]), Endpoint(socket.inet_aton(upeer[0]), upeer[1]))
        pair.owner = [csock, usock, uloc[1], False]   # see common.forget_pair
        done = threading.Event()
        self.waiters[id(pair)] = done
        self.runner.register(pair)
        if tap is not None:
            pair.tap[S2C] = tap if pair.tap[S2C] is None else layer.Tee(pair.tap[S2C], tap)
        try:
            copied, finished, limits = self._drain(client, up, limits, tap, keep_upstream=upload)
            if resume and tuple(limits) == (0, 0) and not any(finished):
                # The whole message reached the sockets before the engine held the
                # pair: the proxy delivered it; nothing to splice, nothing to rebuild.
                self.waiters.pop(id(pair), None)
                self.runner.abort(pair, "delivered_by_proxy")
                if ex is not None:
                    ex.mode = "copied"
                return "copied"
            if self.runner.fastpath is not None:
                # The rules queue only marked packets: what the fast path marks coming
                # in, and from the freeze on what these two sockets send (the frozen
                # sockets' safety net).  Not earlier: the drain's bytes and their
                # retransmissions would wait in the queue behind everything else there,
                # and under load (a queue some 200 packets behind) the client's
                # acknowledgements, which the drain waits for, came hundreds of ms late.
                for sock in (csock, usock):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, QUEUE_MARK)
            a = handoff.freeze(csock)
            b = handoff.freeze(usock)
            if until_fin:
                ex.deferred = True
                self.deferred[id(pair)] = (ex, until_fin)
            self.runner.splice(pair, a, b, copied=copied, finished=finished, limits=limits, resume=resume,
                               end_fin=(False, False) if upload else (True, True))
        except http1.PeerError:
            # Malformed chunked framing among the bytes drained: the proxy has the
            # connections; the caller answers it like a bad body it copied.
            self.waiters.pop(id(pair), None)
            self.runner.abort(pair, "malformed_body")
            raise
        except (OSError, ValueError, _Closed, handoff.HandoffError) as e:
            self.waiters.pop(id(pair), None)
            if self.deferred.pop(id(pair), None) is not None:
                ex.deferred = False
            self.counters["http.splice_fallback"] += 1
            log.warning("%s: hand-off failed (%s)", pair.describe(), e)
            if pair.state == 0:
                self.runner.abort(pair, "handoff_failed")
            raise _Closed(str(e)) from None
        self.counters["http.spliced"] += 1
        if pair.owner is not None:
            pair.owner[3] = True
        if not resume:
            self.waiters.pop(id(pair), None)
            return True
        while not done.wait(1.0):
            pass
        self.waiters.pop(id(pair), None)
        if not pair.resuming:
            # It ended instead (FIN, RST, timeout): forgotten.  Unless every message end
            # was acknowledged first, the message was cut: its line says so, with the
            # bytes the engine forwarded.
            if ex is not None and pair.message_done is None:
                ex.cut = Engine.forwarded_length(pair, C2S if upload else S2C)
                ex.aborted = "the spliced message ended early"
            return True
        return self._resume(pair, client, up, (cloc, cpeer), (uloc, upeer), keep_upstream=upload)

    def _resume(self, pair: Pair, client: Conn, up: Conn, a_addr, b_addr, keep_upstream: bool = False):
        """Rebuild both sockets at the message end and take the connections back.
        KEEP_UPSTREAM: what the upstream sent before the splice is the start of the
        answer to a spliced request body, not bytes after a response."""
        a2, b2 = self.runner.resume_numbers(pair)
        handoff.close_silently(client.sock)
        handoff.close_silently(up.sock)
        pair.owner = None
        try:
            client.sock = handoff.restore(a_addr[0], a_addr[1], a2)
            up.sock = handoff.restore(b_addr[0], b_addr[1], b2)      # (the same source port)
            client._addrs, client._addrs_of = a_addr, client.sock
            up._addrs, up._addrs_of = b_addr, up.sock
            if self._head_window:
                # Small again for the next head, but never below the window the
                # rebuilt socket offers (engine.resume_numbers).
                for c, st in ((client, a2), (up, b2)):
                    c.rcvbuf = None
                    c.set_rcvbuf(max(HEAD_RCVBUF, st.window[3] if st.window else 0))
            for c in (client, up):
                c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            # The connections are lost: what was held meets no socket and gets a RST.
            self.counters["http.resume_failed"] += 1
            log.warning("%s: rebuilding the sockets failed (%s)", pair.describe(), e)
            self.runner.finish_resume(pair)
            raise _Closed(str(e)) from None
        self.runner.finish_resume(pair)
        self.counters["http.resumed"] += 1
        # client.buf keeps the pipelined requests read before the splice: they come
        # before anything the rebuilt socket receives.
        if not keep_upstream:
            up.buf.clear()
        client.eof = up.eof = False
        return "resumed"

    def message_done(self, pair: Pair) -> None:
        """The engine reached the pair's message end (runner callback)."""
        ev = self.waiters.get(id(pair))
        if ev is not None:
            ev.set()

    def _drain(self, client: Conn, up: Conn, limits, tap: layer.Fill | None = None, keep_upstream: bool = False):
        """Bytes the proxy already read go first, then what reached the sockets before
        the engine held the pair, within LIMITS, until both sockets are quiescent.
        The client's bytes past its limit (pipelined requests) stay in its buffer, to
        be answered after a resumed splice; the upstream's past its limit are not part
        of the message and are dropped.  TAP sees what goes to the client, at its body
        offset (the engine never sees these bytes).  Returns (copied, finished,
        remaining limits).  KEEP_UPSTREAM (a spliced request body): the upstream's bytes
        are its answer, kept in its buffer for the proxy to read after the splice.
        A chunked direction's limit is its ChunkedScanner: every byte moved here is fed
        to it (`handoff.within`), and one that saw the message end comes back as 0."""
        limits = list(limits)
        copied = [0, 0]
        for d, (src, dst) in enumerate(((client, up), (up, client))):
            if src.buf:
                n = handoff.within(limits[d], src.buf)
                if n:
                    data = src.take(n)
                    dst.send(data)
                    if tap is not None and d == S2C:
                        tap.body(tap.base, data)
                    copied[d] += n
                    if isinstance(limits[d], int):
                        limits[d] -= n
                if src is up and not keep_upstream:
                    src.buf.clear()
        on_data = _drained_into(tap, tap.base + copied[S2C]) if tap is not None else None
        got = handoff.drain(client.sock, up.sock, 5.0, limits=limits, keep=(True, keep_upstream), on_data=on_data)
        client.buf += got.kept[0]
        up.buf += got.kept[1]
        # What the proxy moved itself during hand-offs (the rest of a spliced body
        # went through the engine): the larger, the less a splice saves.
        self.counters["http.handoff_copied_bytes"] += sum(copied) + sum(got.copied)
        if got.dropped:
            self.counters["dropped.beyond_message_bytes"] += got.dropped
            up.eof = True      # its framing is not to be trusted: not reused
        return ((copied[0] + got.copied[0], copied[1] + got.copied[1]), tuple(got.finished),
                tuple(got.limits))

    def forget(self, pair: Pair) -> None:
        ev = self.waiters.get(id(pair))
        if ev is not None:
            ev.set()
        deferred = self.deferred.pop(id(pair), None)
        if deferred is not None:
            self._log_spliced_until_fin(pair, *deferred)
        common.forget_pair(pair, self.ports, self.slots)

    @staticmethod
    def _log_spliced_until_fin(pair: Pair, ex: Exchange, until_fin: tuple[int, ...]) -> None:
        """The access line of EX, whose directions UNTIL_FIN the engine spliced to their
        end: their bytes from the hand-off on as the engine saw them.  One that did not
        end with a FIN (a reset, the splice's idle timeout) was cut: aborted, as a copy
        cut by the upstream would be."""
        for d in until_fin:
            if Engine.stream_length(pair, d) is None:
                ex.aborted = "the splice ended without a FIN"
            if d == S2C:
                ex.bytes_out += Engine.forwarded_length(pair, d)
            else:
                ex.bytes_in += Engine.forwarded_length(pair, d)
        access.info(ex.line())

    # -- errors ----------------------------------------------------------------------------------
    def _refuse(self, client: Conn, ex: Exchange, status: int, reason: str) -> None:
        ex.status = status
        self.counters[f"http.status_{status}"] += 1
        body = http1.error_response(status, reason, head_only=ex.method == "HEAD")
        ex.bytes_out += len(body)
        try:
            client.send(body)
        except _Closed:
            pass
        access.info(ex.line() + f" ({reason})")


class HTTPService:
    """Every listener of one `nfsplice http` process: an HTTPProxy each, on one runner
    (or none: copying only) and one counters dict.  The runner's callbacks go to the
    proxy whose source-port range holds the pair's upstream port (the ranges of two
    listeners never overlap: config.py checks it).  CACHES maps each listener's
    cache_dir to its opened `layer.Cache` (listeners naming one directory share it);
    they count into this service's counters and are closed with it."""

    def __init__(self, listeners: list[Settings], runner=None, caches: dict | None = None):
        self.counters = runner.engine.counters if runner is not None else _Counters()
        self.caches = dict(caches or {})
        for c in self.caches.values():
            c.counters = self.counters
        self.proxies = [HTTPProxy(s, runner, self.counters, self.caches.get(s.cache_dir)) for s in listeners]
        if runner is not None:
            runner.on_forget = self.forget
            runner.on_message_done = self.message_done

    def open(self) -> None:
        for p in self.proxies:
            try:
                p.open()
            except OSError as e:
                self.close()
                raise OSError(e.errno, f"cannot listen on {p.s.listen[0]}:{p.s.listen[1]}: {e.strerror}") \
                    from None
        for path, cache in self.caches.items():
            cache.write_owner([p.s.listen for p in self.proxies if p.s.cache_dir == path])

    def serve(self, stop: threading.Event) -> None:
        others = [threading.Thread(target=p.serve, args=(stop,), daemon=True) for p in self.proxies[1:]]
        for t in others:
            t.start()
        self.proxies[0].serve(stop)
        for t in others:
            t.join()

    def close(self) -> None:
        for p in self.proxies:
            p.close()
        for c in self.caches.values():
            c.close()
        self.caches = {}

    def _owner(self, pair: Pair) -> HTTPProxy:
        port = pair.proxy_b.port
        return next(p for p in self.proxies if p.s.ports[0] <= port <= p.s.ports[1])

    def forget(self, pair: Pair) -> None:
        self._owner(pair).forget(pair)

    def message_done(self, pair: Pair) -> None:
        self._owner(pair).message_done(pair)


class _Upstream(Exception):
    """The upstream failed (refused, timed out, vanished): 502 or 504."""

    def __init__(self, status: int, reason: str, copied: int = 0):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.copied = copied        # body bytes the client got before it failed


class _ConnectFailed(_Upstream):
    """Connecting to the upstream failed: nothing was sent, another may be tried."""


class _Lookup:
    """What the cache wants from one exchange forwarded to the origin (`_exchange`).

    KIND is "bypass" (a request the cache does not answer: it only invalidates),
    "miss" (store the response if RFC 9111 3 allows) or "validate" (STORED, from
    ENTRY, is being validated; REQUEST is the conditional request sent instead of the
    client's, `policy.validation_request`).  FWD is RFC 9211's fwd reason.  LEADER:
    this fetch leads a collapsed miss, followers are released once the response head
    decided.  BACKGROUND: nobody waits for it (stale-while-revalidate), never spliced.

    After `on_head`: `absorbed` is a response the client does not get (a 304, or an
    error that lets the stale response be served), with `outcome` saying why
    ("revalidated", "etag-mismatch", "stale-if-error", ...); `fill` is the body being
    stored; `status` our Cache-Status member for the forwarded response.
    """

    def __init__(self, proxy: HTTPProxy, req: http1.Request, key: str | None, kind: str, *,
                 stored: policy.StoredResponse | None = None, entry=None, request=None,
                 fwd: str | None = None, leader: bool = False, background: bool = False):
        self.proxy = proxy
        self.req = req
        self.key = key
        self.kind = kind
        self.stored = stored
        self.entry = entry
        self.request = request
        self.fwd = fwd or ("bypass" if kind == "bypass" else "miss")
        self.leader = leader
        self.background = background
        self.absorbed: http1.Response | None = None
        self.outcome: str | None = None
        self.fill: layer.Fill | None = None
        self.status = proxy._status(fwd=self.fwd)

    def on_head(self, resp: http1.Response, rframing, sent_at: float, received_at: float) -> bool:
        """The origin's final response head arrived: invalidate, freshen, or begin
        storing.  True: the client does not get RESP (`absorbed`)."""
        cache, req, counters = self.proxy.cache, self.req, self.proxy.counters
        if req.method not in policy.SAFE_METHODS:
            uris, _ = policy.invalidations(req, resp)       # RFC 9111 4.4
            if uris and cache.invalidate(uris):
                counters["cache.invalidated"] += 1
        if self.kind == "bypass":
            return False
        fwd_status = resp.status if self.kind == "validate" else None
        if self.kind == "validate":
            if resp.status == 304:
                # The origin says the validators we sent (the stored response's) still
                # match: the stored response answers the client and is freshened with
                # the 304's fields (RFC 9111 4.3.4, 3.2).  A 304 whose own ETag differs
                # from the one we sent contradicts its status; it is taken as the answer
                # to what we sent, and its ETag is not taken over (the stored body is
                # the one our ETag names).
                new, why = policy.freshen(self.stored, resp, sent_at, received_at)
                if new is None and why == "etag-mismatch":
                    plain = dataclasses.replace(resp, fields=_without(resp.fields, "etag"))
                    new, _ = policy.freshen(self.stored, plain, sent_at, received_at)
                self.absorbed, self.outcome = resp, "revalidated" if why == "freshened" else why
                counters["cache.revalidated"] += 1
                if new is not None:
                    cache.update_headers(self.entry, new)
                    self.stored = new
                return True
            if req.method == "HEAD" and resp.status == 200:
                # A HEAD validates a stored GET (RFC 9111 4.3.5); the head goes on to the client.
                new, why = policy.freshen_with_head(self.stored, self.entry.size, resp, sent_at, received_at)
                if new is not None:
                    cache.update_headers(self.entry, new)
                else:
                    cache.purge(self.key)
                self.status = self.proxy._status(fwd=self.fwd, fwd_status=200, detail=why)
                return False
            if resp.status in policy.ERROR_STATUS:
                s = policy.stale_on_error(self.proxy._view(self.stored), req, time.time(), resp.status,
                                          cache.config)
                if s.action == policy.STALE:
                    self.absorbed, self.outcome = resp, s.reason
                    return True
        verdict = policy.storable(req, self.proxy._view(resp), cache.config)
        if verdict and self.key is not None and rframing[0] in ("none", "length", "chunked", "close"):
            stored = policy.stored_response(req, resp, sent_at, received_at)
            expected = {"length": rframing[-1], "none": 0}.get(rframing[0])
            self.fill = cache.begin(self.key, stored, expected)
        if self.leader:
            cache.release(self.key)        # followers find the Writer now, or go on their own
            self.leader = False
        stored_now = self.fill is not None and not self.fill.failed
        self.status = self.proxy._status(fwd=self.fwd, fwd_status=fwd_status, stored=stored_now,
                                         detail=None if verdict else verdict.reason)
        return False


class _BodyTee:
    """A copied response body into a Fill as it is forwarded; a chunked one decoded (the
    store keeps the representation: a hit sends it with Content-Length)."""

    def __init__(self, fill: layer.Fill, chunked: bool, limits: http1.Limits):
        self.fill = fill
        self.decoder = layer.ChunkedDecoder(limits) if chunked else None
        self.offset = 0

    def __call__(self, data) -> None:
        if self.decoder is None:
            self.fill.body(self.offset, data)
            self.offset += len(data)
            return
        for off, piece in self.decoder.feed(data):
            self.fill.body(off, piece)

    def end(self, complete: bool) -> None:
        """The copy is over; COMPLETE: it ended where the framing says (for a body until
        close: with a clean EOF, the only end such a body has)."""
        if self.decoder is not None:
            complete = complete and self.decoder.done
            length = self.decoder.offset
        else:
            length = self.offset
        if complete:
            self.fill.finish(length)
        else:
            self.fill.abort("the body did not end cleanly")


class _Discard:
    """The client of a background revalidation: nobody, what it is sent goes nowhere."""

    name = "background revalidation"

    def send(self, data) -> None:
        pass


def _settle(fill: layer.Fill | None) -> None:
    """Give the cache writer a moment to commit a body that was forwarded whole, so the
    next request on this connection finds it stored (it would follow the Writer
    otherwise, which serves the same bytes)."""
    if fill is not None:
        fill.settle(2.0)


def _drained_into(fill: layer.Fill, start: int):
    """handoff.drain's on_data: what it moves to the client goes into FILL from body
    offset START on."""
    def on_data(d: int, offset: int, data) -> None:
        if d == S2C:
            fill.body(start + offset, data)
    return on_data


def _without(fields, name: str) -> tuple:
    return tuple((n, v) for n, v in fields if n.lower() != name)


class _Counters(dict):
    def __missing__(self, key):
        return 0


def _resolve(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        raise _Upstream(502, f"cannot resolve {host}") from None


def _readable(sock: socket.socket) -> bool:
    """Data or EOF waiting, without blocking (poll: the descriptor may be above 1023)."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _reset_on_close(sock: socket.socket) -> None:
    """SO_LINGER 0: closing SOCK sends a RST, not a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    except OSError:
        pass


def _abort(sock: socket.socket) -> None:
    _reset_on_close(sock)
    _close(sock)
