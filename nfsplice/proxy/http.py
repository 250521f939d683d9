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

A spliced response ends its client connection (the response says Connection: close)
and its upstream connection: after the body, the client's FIN is passed on and the
origin closes too.  Keeping both connections after a spliced body needs the frozen
sockets rebuilt with their new sequence numbers (TCP_REPAIR restore); not done yet.

One thread per client connection, blocking sockets with timeouts.  Every request gets
one access-log line: client, method, target, status, bytes in/out, spliced|copied,
cache status (- for now), upstream and total milliseconds.
"""
from __future__ import annotations

import logging
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from .. import handoff
from ..engine import Endpoint, Pair
from . import common, http1
from .http1 import HTTPError, UpstreamError

log = logging.getLogger("nfsplice.http")
access = logging.getLogger("nfsplice.access")

RECV = 1 << 16


@dataclass
class Timeouts:
    header: float = 10.0          # a request head must arrive within this (slowloris)
    idle: float = 60.0            # between requests on a kept-alive client connection
    connect: float = 5.0          # upstream connect
    response: float = 60.0        # upstream response head, and between body reads
    splice_idle: float = 300.0    # a spliced body or tunnel with no packet for this long


@dataclass
class Settings:
    listen: tuple[str, int]
    upstream: tuple[str, int] | None       # None: forward proxy
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


class _Closed(Exception):
    """The peer went away (EOF, reset, timeout) where that simply ends the exchange."""


class Conn:
    """A socket with the bytes read past the last parsed message."""

    def __init__(self, sock: socket.socket, name: str):
        self.sock = sock
        self.name = name
        self.buf = bytearray()
        self.eof = False

    def fill(self, timeout: float) -> int:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(RECV)
        except (socket.timeout, TimeoutError):
            raise _Closed(f"{self.name}: timeout") from None
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
    upstream_ms: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        total = (time.monotonic() - self.started) * 1000
        return (f"{self.client} {self.method} {self.target} {self.status} {self.bytes_in} {self.bytes_out} "
                f"{self.mode} cache=- upstream_ms={self.upstream_ms:.1f} total_ms={total:.1f}")


class HTTPProxy:
    def __init__(self, settings: Settings, runner=None):
        self.s = settings
        self.runner = runner
        self.engine = runner.engine if runner is not None else None
        self.counters = self.engine.counters if self.engine is not None else _Counters()
        self.slots = threading.BoundedSemaphore(settings.max_connections)
        self.lsock: socket.socket | None = None
        self.pool = common.PortPool(settings.ports, settings.source)
        self.waiters: dict[int, threading.Event] = {}
        if runner is not None:
            runner.on_forget = self.forget
            runner.on_message_done = self.message_done

    # -- listening -------------------------------------------------------------------------
    def open(self) -> None:
        self.lsock = common.listen(self.s.listen)

    def serve(self, stop: threading.Event) -> None:
        assert self.lsock is not None
        common.accept_loop(self.lsock, stop, self.slots, self.counters, "http", self._client)

    def close(self) -> None:
        if self.lsock is not None:
            self.lsock.close()
            self.lsock = None

    # -- one client connection ---------------------------------------------------------------
    def _client(self, csock: socket.socket, caddr) -> None:
        # Heads and small bodies are separate writes: without NODELAY, Nagle holds the
        # second one for the client's delayed ACK (~40 ms).
        csock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = Conn(csock, f"client {caddr[0]}:{caddr[1]}")
        up: Conn | None = None
        up_addr = None
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
                    addr = self._upstream_for(req)
                    if req.method == "CONNECT":
                        handed_off = self._connect(client, req, addr, ex)
                        return
                    if up is not None and not up.eof and _readable(up.sock):
                        # An idle upstream connection has something to say before we
                        # asked: unsolicited bytes (or its close).  Reusing it would
                        # hand them to this request as its response.
                        self.counters["http.upstream_unsolicited"] += 1
                        up.eof = True
                    if up is None or up_addr != addr or up.eof:
                        if up is not None:
                            self._drop(up)
                        up, up_addr = self._dial(addr), addr
                    keep, handed_off = self._exchange(client, up, req, ex, caddr[0])
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
                        _abort(csock)
                        csock = None
                    return
                except _Upstream as e:
                    self.counters["http.upstream_errors"] += 1
                    if ex.status == 0:
                        self._refuse(client, ex, e.status, e.reason)
                    else:
                        # Headers already went out: the client must see a truncated
                        # message, never a complete-looking one.
                        access.info(ex.line() + " aborted")
                        _abort(csock)
                        csock = None
                    return
                access.info(ex.line())
                if handed_off or not keep:
                    return
                if up is not None and up.eof:
                    self._drop(up)
                    up = None
        except _Closed as e:
            log.debug("%s", e)
        finally:
            if not handed_off:
                if csock is not None:
                    _close(csock)
                if up is not None:
                    self._drop(up)
                self.slots.release()

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

    def _upstream_for(self, req: http1.Request) -> tuple[str, int]:
        if self.s.upstream is not None:
            if req.form in ("absolute", "authority"):
                if req.method == "CONNECT":
                    raise HTTPError(405, "CONNECT is for the forward proxy")
            return self.s.upstream
        if req.method == "CONNECT":
            if req.port not in self.s.connect_ports:
                raise HTTPError(403, f"CONNECT to port {req.port} is not allowed")
            return _resolve(req.host), req.port
        if req.form != "absolute":
            raise HTTPError(400, "a forward proxy needs an absolute-form target")
        return _resolve(req.host), req.port or 80

    def _dial(self, addr: tuple[str, int]) -> Conn:
        sock = self._bound_socket()
        sock.settimeout(self.s.timeouts.connect)
        try:
            sock.connect(addr)
        except (socket.timeout, TimeoutError):
            self._release_port(sock)
            _close(sock)
            raise _Upstream(504, f"connecting to {addr[0]}:{addr[1]} timed out") from None
        except OSError as e:
            self._release_port(sock)
            _close(sock)
            raise _Upstream(502, f"connecting to {addr[0]}:{addr[1]}: {e.strerror or e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Conn(sock, f"upstream {addr[0]}:{addr[1]}")

    def _bound_socket(self) -> socket.socket:
        """Upstream sockets use our port range: the rules match it, nothing else."""
        try:
            return self.pool.socket()[0]
        except OSError as e:
            raise _Upstream(502, str(e)) from None

    def _drop(self, up: Conn) -> None:
        self._release_port(up.sock)
        _close(up.sock)

    def _release_port(self, sock: socket.socket) -> None:
        try:
            port = sock.getsockname()[1]
        except OSError:
            return
        self.pool.release(port)

    # -- a request and its response ----------------------------------------------------------
    def _exchange(self, client: Conn, up: Conn, req: http1.Request, ex: Exchange,
                  client_ip: str) -> tuple[bool, bool]:
        """Forward REQ and its response.  Returns (keep the client connection, handed off)."""
        t0 = time.monotonic()
        head = http1.forwarding_head(req, via=self.s.via, client_addr=client_ip,
                                     reverse=self.s.upstream is not None, upgrade_allowed=True)
        up.send(head)
        framing = req.body_framing()
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
            resp = self._read_response(up, req)
        ex.upstream_ms = (time.monotonic() - t0) * 1000
        ex.status = resp.status
        rframing = resp.body_framing(req.method)
        keep = (http1.keep_alive(req) and http1.keep_alive(resp) and framing != ("unread",))
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
            return False, self._tunnel(client, up, ex)
        out_head = http1.forwarding_head(resp, via=self.s.via, close=(splice and not resume) or not keep)
        client.send(out_head)
        ex.bytes_out += len(out_head)
        if rframing[0] == "none":
            return keep, False
        if splice:
            remaining = rframing[1] if rframing[0] == "length" else None
            result = self._splice_response(client, up, ex, remaining, resume)
            if result == "resumed":
                return keep, False
            if result == "copied":     # the whole body had arrived with the head
                return keep and resume, False
            return False, result
        if rframing[0] == "length":
            ex.bytes_out += self._copy_length(up, client, rframing[1], self.s.timeouts.response, upstream=True)
        elif rframing[0] == "chunked":
            ex.bytes_out += self._copy_chunked(up, client, upstream=True)
        else:   # close-delimited, copied
            ex.bytes_out += self._copy_until_eof(up, client)
            return False, False
        if up.buf:
            # Bytes after a complete response that nobody asked for: the connection's
            # framing can no longer be trusted, so it is not reused.
            self.counters["http.upstream_extra_bytes"] += len(up.buf)
            up.buf.clear()
            up.eof = True
        if not http1.keep_alive(resp):
            up.eof = True      # (closed by the caller)
        return keep, False

    def _read_response(self, up: Conn, req: http1.Request) -> http1.Response:
        deadline = time.monotonic() + self.s.timeouts.response
        while True:
            if up.buf:
                res = http1.parse_response_head(up.buf, req.method, self.s.limits)
                if res is not None:
                    resp, n = res
                    del up.buf[:n]
                    return resp
            if up.eof:
                raise UpstreamError("closed before a complete response head")
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Upstream(504, "no response from the upstream in time")
            try:
                up.fill(left)
            except _Closed as e:
                raise _Upstream(504 if "timeout" in str(e) else 502, str(e)) from None

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
            up.buf.clear()    # anything after the body is not part of this message
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
            up.sock = handoff.restore(b_addr[0], b_addr[1], b2)
        except OSError as e:
            # The connections are lost: what was held meets no socket and gets a RST.
            self.counters["http.resume_failed"] += 1
            log.warning("%s: rebuilding the sockets failed (%s)", pair.describe(), e)
            self.runner.finish_resume(pair)
            raise _Closed(str(e)) from None
        self.runner.finish_resume(pair)
        self.counters["http.resumed"] += 1
        client.buf.clear()
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
        Returns (copied, finished, remaining limits)."""
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
                src.buf.clear()
        got = handoff.drain(client.sock, up.sock, 5.0, limits=limits)
        if got.dropped:
            self.counters["dropped.beyond_message_bytes"] += got.dropped
        return ((copied[0] + got.copied[0], copied[1] + got.copied[1]), tuple(got.finished),
                tuple(got.limits))

    def forget(self, pair: Pair) -> None:
        ev = self.waiters.get(id(pair))
        if ev is not None:
            ev.set()
        common.forget_pair(pair, self.pool, self.slots)

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


class _Upstream(Exception):
    """The upstream failed (refused, timed out, vanished): 502 or 504."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


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
