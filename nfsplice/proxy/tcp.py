"""The L4 splicing proxy (`nfsplice tcp`).

Every accepted connection is paired with a new upstream connection and spliced both
ways at once: after the two handshakes no payload passes through a proxy socket.

Per connection (a short-lived thread):
  1. accept: the engine has held the client's payload since its SYN (embryonic pair);
  2. bind an upstream socket to a port of our range, register the pair (the engine now
     also holds the origin's payload), connect;
  3. drain: normally nothing to do; bytes that reached a socket anyway (e.g. the engine
     started after the client) are copied across and into the tap, and both send
     queues must be acknowledged;
  4. freeze both sockets (TCP_REPAIR) and splice; the engine releases what it held.
When the engine forgets the pair, both sockets are closed silently.
"""
from __future__ import annotations

import logging
import socket
import threading
import time

from .. import handoff
from ..handoff import HandoffError
from . import common
from ..engine import C2S, S2C, Endpoint, Pair

log = logging.getLogger("nfsplice.tcp")


def _ip(addr: str) -> bytes:
    return socket.inet_aton(addr)


class TCPSpliceProxy:
    def __init__(self, runner, listen: tuple[str, int], upstream: tuple[str, int], *,
                 source: str | None = None, ports: tuple[int, int] = (61000, 62999),
                 handoff_timeout: float = 5.0, connect_timeout: float = 5.0,
                 max_connections: int = 4096, backlog: int = 1024):
        self.runner = runner
        self.engine = runner.engine
        self.listen = listen
        self.upstream = upstream
        self.source = source or "0.0.0.0"
        self.ports = ports
        self.handoff_timeout = handoff_timeout
        self.connect_timeout = connect_timeout
        self.slots = threading.BoundedSemaphore(max_connections)
        self.backlog = backlog
        self.pool = common.PortPool(ports, source)
        self.counters = runner.engine.counters
        self.lsock: socket.socket | None = None
        runner.on_forget = self.forget

    # -- listening ----------------------------------------------------------------------
    def open(self) -> None:
        self.lsock = common.listen(self.listen, self.backlog)
        with self.runner.lock:
            self.engine.listeners.add(_ip(self.listen[0]) + self.listen[1].to_bytes(2, "big"))

    def serve(self, stop: threading.Event) -> None:
        assert self.lsock is not None
        common.accept_loop(self.lsock, stop, self.slots, self.counters, "proxy", self._connection)

    # -- one connection -----------------------------------------------------------------
    def _upstream_socket(self) -> tuple[socket.socket, int]:
        try:
            return self.pool.socket()
        except OSError as e:
            raise HandoffError(str(e)) from None

    def _release_port(self, port: int) -> None:
        self.pool.release(port)

    def _connection(self, csock: socket.socket, caddr) -> None:
        pair = None
        usock = None
        port = None
        try:
            t0 = time.monotonic()
            usock, port = self._upstream_socket()
            # The source address is known only after routing; the pair must be
            # registered before the SYN-ACK can carry payload behind it, so the route's
            # preferred source is looked up with a throw-away UDP connect.
            src_ip = self.source if self.source != "0.0.0.0" else _route_source(self.upstream[0])
            lip, lport = csock.getsockname()
            pair = Pair(Endpoint(_ip(caddr[0]), caddr[1]), Endpoint(_ip(lip), lport),
                        Endpoint(_ip(src_ip), port), Endpoint(_ip(self.upstream[0]), self.upstream[1]))
            pair.owner = [csock, usock, port, False]   # [3]: the engine owns the slot
            self.runner.register(pair)
            syn = pair.syn[C2S]
            if syn is not None and syn.mss:
                # The origin must not send segments larger than the client accepts: B's
                # SYN announces the MSS the client announced (RFC 9293 section 3.7.1).
                usock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, syn.mss)
            usock.settimeout(self.connect_timeout)
            try:
                usock.connect(self.upstream)
            except OSError as e:
                raise HandoffError(f"upstream {self.upstream[0]}:{self.upstream[1]}: {e.strerror or e}") from None
            if usock.getsockname()[0] != src_ip:
                raise HandoffError(f"upstream socket got source {usock.getsockname()[0]}, expected {src_ip}")
            copied, finished = self._drain(pair, csock, usock)
            if finished[C2S] and finished[S2C]:
                # Nothing left to splice: the proxy carried the whole exchange itself.
                self.runner.abort(pair, "closed_before_splice")
                csock.close()
                usock.close()
                self._release_port(port)
                self.slots.release()
                return
            a = handoff.freeze(csock)
            b = handoff.freeze(usock)
            self.runner.splice(pair, a, b, copied=copied, finished=finished)
            pair.owner[3] = True
            self.counters["proxy.spliced"] += 1
            ms = int((time.monotonic() - t0) * 1000)
            self.counters["proxy.handoff_ms_total"] += ms
            if ms > self.counters["proxy.handoff_ms_max"]:
                self.counters["proxy.handoff_ms_max"] = ms
        except (HandoffError, OSError, ValueError) as e:
            # ValueError: the engine gave up on the hand-off (timeout) before we finished.
            reason = "upstream_failed" if "upstream" in str(e) else "handoff_failed"
            self.counters["proxy." + reason] += 1
            log.warning("%s: %s", pair.describe() if pair else f"client {caddr[0]}:{caddr[1]}", e)
            if pair is not None and pair.state == 0:
                self.runner.abort(pair, reason)
            _abort(csock)
            if usock is not None:
                _abort(usock)
            if port is not None:
                self._release_port(port)
            self.slots.release()

    def _drain(self, pair: Pair, csock: socket.socket, usock: socket.socket):
        """Normally nothing to move (the engine held the client's payload since its SYN);
        whatever did reach a socket goes across and into the tap.  Returns (copied bytes,
        FIN passed on) per direction."""

        def to_tap(d, offset, data):
            if pair.tap[d] is not None:
                pair.tap[d].write(offset, data)

        got = handoff.drain(csock, usock, self.handoff_timeout, on_data=to_tap)
        if got.copied[C2S] or got.copied[S2C]:
            self.counters["proxy.drained_bytes"] += got.copied[C2S] + got.copied[S2C]
        return got.copied, got.finished

    def forget(self, pair: Pair) -> None:
        """The engine is done with PAIR (runner callback)."""
        common.forget_pair(pair, self.pool, self.slots)

    def close(self) -> None:
        if self.lsock is not None:
            self.lsock.close()
            self.lsock = None


def _abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer must not take a truncated stream for whole."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    except OSError:
        pass
    sock.close()


def _route_source(dst: str) -> str:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.connect((dst, 9))
        return u.getsockname()[0]
    finally:
        u.close()
