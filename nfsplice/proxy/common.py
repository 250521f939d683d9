"""What the L4 and the HTTP proxy share: the listening socket and its accept loop, and
the pool of source ports for upstream connections (the rules match that range, so
nothing else on the host is touched)."""
from __future__ import annotations

import errno
import itertools
import select
import socket
import threading
import time

from .. import handoff


def listen(addr: tuple[str, int], backlog: int = 1024) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr)
    s.listen(backlog)
    return s


def accept_loop(lsock: socket.socket, stop: threading.Event, slots: threading.BoundedSemaphore,
                counters, prefix: str, handler) -> None:
    """Accept until STOP; each connection gets a slot (or is refused) and a thread
    running HANDLER(sock, addr), which must release the slot when done."""
    while not stop.is_set():
        r, _, _ = select.select([lsock], [], [], 0.2)
        if not r:
            continue
        try:
            csock, caddr = lsock.accept()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                counters[f"{prefix}.accept_emfile"] += 1
                time.sleep(0.05)
            continue
        if not slots.acquire(blocking=False):
            counters[f"{prefix}.refused_max_connections"] += 1
            csock.close()
            continue
        counters[f"{prefix}.accepted"] += 1
        threading.Thread(target=handler, args=(csock, caddr), daemon=True).start()


class PortPool:
    """Upstream sockets bound to a port of [lo, hi] on SOURCE, each port used once at a
    time (a port in use by anything else is skipped)."""

    def __init__(self, ports: tuple[int, int], source: str | None = None):
        self.lo, self.hi = ports
        self.source = source or "0.0.0.0"
        self.lock = threading.Lock()
        self.in_use: set[int] = set()
        self._next = itertools.cycle(range(self.lo, self.hi + 1))

    def socket(self) -> tuple[socket.socket, int]:
        """A bound socket and its port; raises OSError(EADDRNOTAVAIL) when none is free."""
        with self.lock:
            for _ in range(self.hi - self.lo + 1):
                port = next(self._next)
                if port in self.in_use:
                    continue
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((self.source, port))
                except OSError:
                    s.close()
                    continue
                self.in_use.add(port)
                return s, port
        raise OSError(errno.EADDRNOTAVAIL, f"no free source port in {self.lo}-{self.hi}")

    def release(self, port: int) -> None:
        with self.lock:
            self.in_use.discard(port)


def forget_pair(pair, pool: PortPool, slots: threading.BoundedSemaphore) -> None:
    """The engine is done with PAIR: close its frozen sockets without a sound.

    pair.owner is [client socket, upstream socket, upstream port, handed]; `handed` says
    the engine owned the connection (its thread has ended).  If not, the connection's
    thread still runs (a shutdown during the hand-off): it fails on the closed sockets
    and releases port and slot itself."""
    if pair.owner is None:
        return
    csock, usock, port, handed = pair.owner
    pair.owner = None
    handoff.close_silently(csock)
    handoff.close_silently(usock)
    if handed:
        pool.release(port)
        slots.release()
