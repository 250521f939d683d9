"""The HTTP/1.1 proxy on the splicer (`nfsplice http`): reverse or forward (with CONNECT).

Heads are read and written through the proxy's own sockets, parsed strictly by
`http1` (which does no I/O).  Bodies are copied, or spliced by the engine:

  * a response body framed by Content-Length of at least --splice-threshold bytes, a
    body delimited by the origin closing, and the tunnel after a CONNECT 2xx or a 101:
    the pair is registered, what already arrived is copied, both sockets are frozen
    and the engine forwards the rest, with the message end as a hard limit (nothing
    past the Content-Length reaches the client; the client's own bytes do not reach
    the origin while a response body is spliced);
  * everything else (small and chunked bodies, request bodies) is copied.

Keep-alive survives a spliced Content-Length body: once the client has acknowledged
all of it, the engine holds the pair's packets and the proxy rebuilds both sockets at
the advanced sequence numbers (TCP_REPAIR restore, `_resume`) and carries on with
them.  A close-delimited body or a tunnel ends both connections through the engine.

Upstream connections are not tied to a client connection: after a complete exchange
(also after a resumed splice) one goes back to its listener's pool of idle connections
(`ConnPool`, per upstream address) and the next request, from any client, takes it.  A
reverse proxy's upstreams are taken in round robin (`Upstreams`); one that refuses or
times out on connect is skipped for a while, and the request goes to the next one.

One `HTTPProxy` per listen address; `HTTPService` runs several in one process on one
runner.  One thread per client connection, blocking sockets with timeouts.  Every
request gets one access-log line: client, method, target, status, bytes in/out,
spliced|copied, cache status (- for now), upstream address, upstream and total
milliseconds.
"""
from __future__ import annotations

import logging
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from .. import handoff
from ..engine import QUEUE_MARK, Endpoint, Pair
from . import common, http1
from .http1 import HTTPError, UpstreamError

log = logging.getLogger("nfsplice.http")
access = logging.getLogger("nfsplice.access")

RECV = 1 << 16
SO_MARK = 36


IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})   # RFC 9110 9.2.2


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
    threshold: int = 64 * 1024
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

    def fill(self, timeout: float) -> int:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(RECV)
        except (socket.timeout, TimeoutError):
            raise _Timeout(f"{self.name}: timeout") from None
        except OSError as e:
            raise _Closed(f"{self.name}: {e.strerror or e}") from None
        if not data:
            self.eof = True
            return 0
        self.buf += data
        return len(data)

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
    upstream: str = "-"
    upstream_ms: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        total = (time.monotonic() - self.started) * 1000
        return (f"{self.client} {self.method} {self.target} {self.status} {self.bytes_in} {self.bytes_out} "
                f"{self.mode} cache=- upstream={self.upstream} upstream_ms={self.upstream_ms:.1f} "
                f"total_ms={total:.1f}")


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

    def __init__(self, settings: Settings, runner=None, counters=None):
        self.s = settings
        self.runner = runner
        self.counters = counters if counters is not None else _Counters()
        self.slots = threading.BoundedSemaphore(settings.max_connections)
        self.lsock: socket.socket | None = None
        self.ports = common.PortPool(settings.ports, settings.source)
        self.conns = ConnPool(settings.pool_size, settings.timeouts.pool_idle, self._drop, self.counters)
        self.upstreams = (Upstreams(settings.upstreams, settings.down_time, self.counters)
                          if settings.upstreams else None)
        self.waiters: dict[int, threading.Event] = {}

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

    # -- one client connection ---------------------------------------------------------------
    def _client(self, csock: socket.socket, caddr) -> None:
        # Heads and small bodies are separate writes: without NODELAY, Nagle holds the
        # second one for the client's delayed ACK (~40 ms).
        csock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = Conn(csock, f"client {caddr[0]}:{caddr[1]}")
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
                        access.info(ex.line() + f" aborted ({e.reason})")
                        _abort(client.sock)
                    return
                except _Upstream as e:
                    self.counters["http.upstream_errors"] += 1
                    if ex.status == 0:
                        self._refuse(client, ex, e.status, e.reason)
                    else:
                        # Headers already went out: the client must see a truncated
                        # message, never a complete-looking one.
                        access.info(ex.line() + " aborted")
                        _abort(client.sock)
                    return
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
        """REQ to an upstream and its response back.  The upstream connection goes back
        to the pool after a complete exchange, to the engine with a splice that does
        not resume, and is closed otherwise.  Returns (keep the client connection,
        handed off)."""
        while True:
            up, addr = self._upstream(req)
            ex.upstream = f"{addr[0]}:{addr[1]}"
            try:
                keep, handed, reuse = self._exchange(client, up, req, ex, client_ip)
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
            left = wait if deadline is None else deadline - time.monotonic()
            if left <= 0:
                self.counters["http.header_timeouts"] += 1
                raise _Closed("request head timeout")
            client.fill(left)

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
        return Conn(sock, f"upstream {addr[0]}:{addr[1]}", port)

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
                  client_ip: str) -> tuple[bool, bool, bool]:
        """Forward REQ on UP and its response back.  Returns (keep the client connection,
        handed off, UP may carry another exchange).  Raises _Stale when UP came from the
        pool and closed before answering a request that may be sent again."""
        t0 = time.monotonic()
        head = http1.forwarding_head(req, via=self.s.via, client_addr=client_ip,
                                     reverse=self.upstreams is not None, upgrade_allowed=True)
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
            resp = self._read_response(up, req)     # 100 Continue, or a final answer
            if resp.status == 100:
                client.send(http1.forwarding_head(resp, via=self.s.via))
                resp = None
            else:
                framing = ("unread",)
        if framing[0] == "length":
            ex.bytes_in += self._copy_length(client, up, framing[1], self.s.timeouts.header)
        elif framing[0] == "chunked":
            ex.bytes_in += self._copy_chunked(client, up, upstream=False)
        while resp is None or 100 <= resp.status < 200 and resp.status != 101:
            if resp is not None:
                client.send(http1.forwarding_head(resp, via=self.s.via))
            resp = self._read_response(up, req, retry)
            retry = False
        ex.upstream_ms = (time.monotonic() - t0) * 1000
        ex.status = resp.status
        rframing = resp.body_framing(req.method)
        keep = (http1.keep_alive(req) and http1.keep_alive(resp) and framing != ("unread",))
        # The upstream connection outlives the exchange if the origin keeps it and was
        # not asked to close (an HTTP/1.0 request is forwarded as such, without
        # keep-alive) and the request body went out whole.
        reusable = http1.keep_alive(resp) and req.version == "HTTP/1.1" and framing != ("unread",)
        if resp.status == 101 and not http1.is_upgrade(req):
            raise UpstreamError("101 Switching Protocols to a request that did not ask to upgrade")
        splice = (self.runner is not None and self.s.splice and
                  (rframing[0] in ("close", "tunnel") or
                   rframing[0] == "length" and rframing[1] >= self.s.threshold))
        # A body of known length is spliced and the connections taken back after it
        # (sockets rebuilt with TCP_REPAIR), so keep-alive survives the splice.
        resume = splice and rframing[0] == "length" and keep and self.s.resume
        if rframing[0] == "tunnel":
            client.send(http1.forwarding_head(resp, via=self.s.via, upgrade_allowed=True))
            return False, self._tunnel(client, up, ex), False
        out_head = http1.forwarding_head(resp, via=self.s.via, close=(splice and not resume) or not keep)
        client.send(out_head)
        ex.bytes_out += len(out_head)
        if rframing[0] == "none":
            return keep, False, reusable and self._clean(up)
        if splice:
            remaining = rframing[1] if rframing[0] == "length" else None
            result = self._splice_response(client, up, ex, remaining, resume)
            if result == "resumed":
                return keep, False, reusable
            if result == "copied":     # the whole body had arrived with the head
                return keep and resume, False, reusable and self._clean(up)
            return False, result, False
        if rframing[0] == "length":
            ex.bytes_out += self._copy_length(up, client, rframing[1], self.s.timeouts.response, upstream=True)
        elif rframing[0] == "chunked":
            ex.bytes_out += self._copy_chunked(up, client, upstream=True)
        else:   # close-delimited, copied
            ex.bytes_out += self._copy_until_eof(up, client)
            return False, False, False
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

    def _read_response(self, up: Conn, req: http1.Request, retry: bool = False) -> http1.Response:
        """The next response head on UP.  RETRY: the request may be sent again, so an
        end of the connection before any byte of an answer raises _Stale."""
        deadline = time.monotonic() + self.s.timeouts.response
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
                raise _Upstream(504, "no response from the upstream in time")
            try:
                up.fill(left)
            except _Timeout as e:
                raise _Upstream(504, str(e)) from None
            except _Closed as e:
                if retry and not up.buf:
                    raise _Stale() from None
                raise _Upstream(502, str(e)) from None

    # -- copying ---------------------------------------------------------------------------------
    def _copy_length(self, src: Conn, dst: Conn, n: int, timeout: float, upstream: bool = False) -> int:
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
            left -= len(chunk)
        return n

    def _truncated(self, src: Conn, upstream: bool, got: int, n: int):
        self.counters["http.truncated_bodies"] += 1
        if upstream:
            raise _Upstream(502, f"{src.name} ended the body after {got} of {n} bytes")
        raise _Closed(f"{src.name} ended the body after {got} of {n} bytes")

    def _copy_chunked(self, src: Conn, dst: Conn, upstream: bool) -> int:
        scanner = http1.ChunkedScanner(upstream=upstream, limits=self.s.limits)
        total = 0
        while not scanner.done:
            if not src.buf:
                if src.eof:
                    self._truncated(src, upstream, total, -1)
                try:
                    src.fill(self.s.timeouts.response)
                except _Closed:
                    self._truncated(src, upstream, total, -1)
                continue
            n = scanner.feed(src.buf)
            chunk = src.take(n)
            dst.send(chunk)
            total += n
        return total

    def _copy_until_eof(self, src: Conn, dst: Conn) -> int:
        total = 0
        while True:
            if src.buf:
                chunk = src.take(len(src.buf))
                dst.send(chunk)
                total += len(chunk)
            if src.eof:
                return total
            try:
                src.fill(self.s.timeouts.response)
            except _Closed:
                return total

    # -- CONNECT and tunnels -----------------------------------------------------------------
    def _connect(self, client: Conn, req: http1.Request, addr, ex: Exchange) -> bool:
        ex.upstream = f"{addr[0]}:{addr[1]}"
        try:
            up = self._dial(addr)
        except _Upstream as e:
            self._refuse(client, ex, e.status, e.reason)
            return False
        ex.status = 200
        client.send(b"HTTP/1.1 200 Connection Established\r\nVia: 1.1 " + self.s.via.encode() + b"\r\n\r\n")
        access.info(ex.line())
        handed = self._tunnel(client, up, ex)
        if not handed:
            self._drop(up)
        return handed

    def _tunnel(self, client: Conn, up: Conn, ex: Exchange) -> bool:
        """Both directions raw from here: spliced when we can, else copied."""
        ex.mode = "spliced" if self.runner is not None and self.s.splice else "copied"
        if ex.mode == "spliced":
            return self._handoff(client, up, limits=(None, None))
        self._relay(client, up)
        return False

    def _relay(self, a: Conn, b: Conn) -> None:
        for c, other in ((a, b), (b, a)):
            if c.buf:
                other.send(c.take(len(c.buf)))
        socks = {a.sock: b, b.sock: a}
        open_ = {a.sock, b.sock}
        while open_:
            r, _, _ = select.select(list(open_), [], [], self.s.timeouts.splice_idle)
            if not r:
                return
            for s in r:
                try:
                    data = s.recv(RECV)
                except OSError:
                    return
                if not data:
                    open_.discard(s)
                    try:
                        socks[s].sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    continue
                socks[s].send(data)

    # -- splicing ------------------------------------------------------------------------------
    def _splice_response(self, client: Conn, up: Conn, ex: Exchange, remaining: int | None,
                         resume: bool = False):
        """Returns True (the engine owns the pair now), "resumed" (the body went through
        the engine and the proxy has both connections back) or "copied"."""
        ex.mode = "spliced"
        # Body bytes already read with the head go first, through the socket.
        if up.buf:
            n = len(up.buf) if remaining is None else min(len(up.buf), remaining)
            client.send(up.take(n))
            ex.bytes_out += n
            if remaining is not None:
                remaining -= n
            self._clean(up)    # anything after the body is not part of this message
        if remaining == 0:
            self.counters["http.splice_skipped_small"] += 1
            ex.mode = "copied"
            return "copied"
        handed = self._handoff(client, up, limits=(0, remaining), ex=ex, resume=resume)
        if remaining is not None:
            ex.bytes_out += remaining
        return handed

    def _handoff(self, client: Conn, up: Conn, limits, ex: Exchange | None = None, resume: bool = False):
        """Register, drain, freeze, splice.  True when the engine owns the pair now;
        "resumed" when (RESUME) the engine reached the message end and the proxy has
        rebuilt both sockets and carries on with them."""
        csock, usock = client.sock, up.sock
        cpeer, cloc = csock.getpeername(), csock.getsockname()
        upeer, uloc = usock.getpeername(), usock.getsockname()
        pair = Pair(Endpoint(socket.inet_aton(cpeer[0]), cpeer[1]), Endpoint(socket.inet_aton(cloc[0]), cloc[1]),
                    Endpoint(socket.inet_aton(uloc[0]), uloc[1]), Endpoint(socket.inet_aton(upeer[0]), upeer[1]))
        pair.owner = [csock, usock, uloc[1], False]   # see common.forget_pair
        done = threading.Event()
        self.waiters[id(pair)] = done
        self.runner.register(pair)
        if self.runner.fastpath is not None:
            # The rules queue only marked packets: what the fast path marks coming in,
            # and from now on what these two sockets send (the frozen sockets' safety net).
            for sock in (csock, usock):
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, QUEUE_MARK)
        try:
            copied, finished, limits = self._drain(client, up, limits)
            if resume and tuple(limits) == (0, 0) and not any(finished):
                # The whole message reached the sockets before the engine held the
                # pair: the proxy delivered it; nothing to splice, nothing to rebuild.
                self.waiters.pop(id(pair), None)
                self.runner.abort(pair, "delivered_by_proxy")
                for c in (client, up):
                    c.sock.setblocking(True)
                if ex is not None:
                    ex.mode = "copied"
                return "copied"
            a = handoff.freeze(csock)
            b = handoff.freeze(usock)
            self.runner.splice(pair, a, b, copied=copied, finished=finished, limits=limits, resume=resume)
        except (OSError, ValueError, _Closed, handoff.HandoffError) as e:
            self.waiters.pop(id(pair), None)
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
            return True                 # it ended instead (FIN, RST, timeout): forgotten
        return self._resume(pair, client, up, (cloc, cpeer), (uloc, upeer))

    def _resume(self, pair: Pair, client: Conn, up: Conn, a_addr, b_addr):
        """Rebuild both sockets at the message end and take the connections back."""
        a2, b2 = self.runner.resume_numbers(pair)
        handoff.close_silently(client.sock)
        handoff.close_silently(up.sock)
        pair.owner = None
        try:
            client.sock = handoff.restore(a_addr[0], a_addr[1], a2)
            up.sock = handoff.restore(b_addr[0], b_addr[1], b2)      # (the same source port)
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
        up.buf.clear()
        client.eof = up.eof = False
        return "resumed"

    def message_done(self, pair: Pair) -> None:
        """The engine reached the pair's message end (runner callback)."""
        ev = self.waiters.get(id(pair))
        if ev is not None:
            ev.set()

    def _drain(self, client: Conn, up: Conn, limits):
        """Bytes the proxy already read go first, then what reached the sockets before
        the engine held the pair, within LIMITS, until both sockets are quiescent.
        The client's bytes past its limit (pipelined requests) stay in its buffer, to
        be answered after a resumed splice; the upstream's past its limit are not part
        of the message and are dropped.  Returns (copied, finished, remaining limits)."""
        limits = list(limits)
        copied = [0, 0]
        for d, (src, dst) in enumerate(((client, up), (up, client))):
            if src.buf:
                n = len(src.buf) if limits[d] is None else min(len(src.buf), limits[d])
                if n:
                    dst.send(src.take(n))
                    copied[d] += n
                    if limits[d] is not None:
                        limits[d] -= n
                if src is up:
                    src.buf.clear()
        got = handoff.drain(client.sock, up.sock, 5.0, limits=limits, keep=(True, False))
        client.buf += got.kept[0]
        if got.dropped:
            self.counters["dropped.beyond_message_bytes"] += got.dropped
            up.eof = True      # its framing is not to be trusted: not reused
        return ((copied[0] + got.copied[0], copied[1] + got.copied[1]), tuple(got.finished),
                tuple(got.limits))

    def forget(self, pair: Pair) -> None:
        ev = self.waiters.get(id(pair))
        if ev is not None:
            ev.set()
        common.forget_pair(pair, self.ports, self.slots)

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
    listeners never overlap: config.py checks it)."""

    def __init__(self, listeners: list[Settings], runner=None):
        self.counters = runner.engine.counters if runner is not None else _Counters()
        self.proxies = [HTTPProxy(s, runner, self.counters) for s in listeners]
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

    def _owner(self, pair: Pair) -> HTTPProxy:
        port = pair.proxy_b.port
        return next(p for p in self.proxies if p.s.ports[0] <= port <= p.s.ports[1])

    def forget(self, pair: Pair) -> None:
        self._owner(pair).forget(pair)

    def message_done(self, pair: Pair) -> None:
        self._owner(pair).message_done(pair)


class _Upstream(Exception):
    """The upstream failed (refused, timed out, vanished): 502 or 504."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _ConnectFailed(_Upstream):
    """Connecting to the upstream failed: nothing was sent, another may be tried."""


class _Counters(dict):
    def __missing__(self, key):
        return 0


def _resolve(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        raise _Upstream(502, f"cannot resolve {host}") from None


def _readable(sock: socket.socket) -> bool:
    """Data or EOF waiting, without blocking."""
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _abort(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    except OSError:
        pass
    _close(sock)
