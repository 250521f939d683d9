"""The live loop: one queue backend feeding the engine, verdicts back to the kernel.

The runner owns the lock that serialises the engine between the queue thread and the
proxy's hand-off threads, and is the only place verdicts are sent: every queued packet
gets exactly one, whatever happens (a packet the engine holds gets it on release).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from .engine import INJECT_MARK, Decision, Engine, Pair, SocketState
from .queue.base import ACCEPT, DROP

STATS_DIR = "/run/nfsplice"
SO_MARK = 36


class Runner:
    def __init__(self, backend, engine: Engine, *, instance: str = "nfsplice",
                 on_forget=None, stats_interval: float = 1.0, stats_dir: str = STATS_DIR):
        self.backend = backend
        self.engine = engine
        self.instance = instance
        self.on_forget = on_forget
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.stats_interval = stats_interval
        self.stats_path = os.path.join(stats_dir, f"{instance}.json")
        self.started = time.time()
        self.verdict_errors = 0
        self.thread: threading.Thread | None = None
        self.raw: socket.socket | None = None

    # -- verdicts ------------------------------------------------------------------------
    def _send(self, pkt, decision: Decision, buf=None) -> None:
        try:
            if decision == Decision.MANGLE:
                self.backend.verdict(pkt, ACCEPT, buf if buf is not None else pkt.buf)
            elif decision == Decision.DROP:
                self.backend.verdict(pkt, DROP)
            else:
                self.backend.verdict(pkt, ACCEPT)
        except OSError:
            # The packet is gone from the kernel's queue (e.g. the queue was flushed);
            # nothing else to do for it, but it is counted.
            self.verdict_errors += 1

    def _inject(self, packets) -> None:
        """Send engine-made packets (pure ACKs for the proxy's own sockets)."""
        if self.raw is None:
            self.raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self.raw.setsockopt(socket.SOL_SOCKET, SO_MARK, INJECT_MARK)
        for pkt in packets:
            try:
                self.raw.sendto(pkt, (socket.inet_ntoa(bytes(pkt[16:20])), 0))
            except OSError:
                self.engine.counters["injected.send_failed"] += 1

    def _send_all(self, items) -> None:
        for handle, decision, buf in items:
            self._send(handle, decision, buf)

    # -- the queue thread ----------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="nfsplice-queue", daemon=True)
        self.thread.start()

    def run(self) -> None:
        eng = self.engine
        next_tick = time.monotonic() + 0.2
        next_stats = time.monotonic()
        while not self.stop.is_set():
            pkts = self.backend.receive(timeout=0.2)
            with self.lock:
                for p in pkts:
                    d = eng.process(p.buf, hook=p.hook, csum_partial=p.csum_partial,
                                    truncated=p.truncated, mark=p.mark, handle=p)
                    if d != Decision.HOLD:
                        self._send(p, d)
                if eng.injected:
                    self._inject(eng.injected)
                    eng.injected = []
                now = time.monotonic()
                if now >= next_tick:
                    self._send_all(eng.tick(now))
                    next_tick = now + 0.2
                forgotten, eng.forgotten = eng.forgotten, []
            for pair in forgotten:
                if self.on_forget is not None:
                    self.on_forget(pair)
            if now >= next_stats:
                self.write_stats()
                next_stats = now + self.stats_interval

    # -- the proxy's calls ---------------------------------------------------------------
    def register(self, pair: Pair) -> Pair:
        with self.lock:
            return self.engine.register(pair)

    def splice(self, pair: Pair, a: SocketState, b: SocketState, **kw) -> None:
        with self.lock:
            self._send_all(self.engine.splice(pair, a, b, **kw))

    def abort(self, pair: Pair, reason: str) -> None:
        with self.lock:
            self._send_all(self.engine.abort(pair, reason))
            self.engine.forgotten = [p for p in self.engine.forgotten if p is not pair]

    # -- stats ---------------------------------------------------------------------------
    def stats(self) -> dict:
        with self.lock:
            eng = self.engine.stats()
        out = {"instance": self.instance, "pid": os.getpid(), "uptime": round(time.time() - self.started, 1),
               "backend": getattr(self.backend, "name", "?"),
               "queue.enobufs": getattr(self.backend, "enobufs", 0),
               "queue.verdict_errors": self.verdict_errors}
        out.update(eng)
        tap = self.engine.tap
        if tap is not None:
            out.update({"tap.bytes": tap.bytes_written, "tap.complete": tap.complete,
                        "tap.incomplete": tap.incomplete, "tap.dropped_writes": tap.dropped_writes})
        return out

    def write_stats(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.stats_path), exist_ok=True)
            tmp = self.stats_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.stats(), f, indent=1, sort_keys=True)
            os.replace(tmp, self.stats_path)
        except OSError:
            pass

    def shutdown(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)
