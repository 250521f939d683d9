"""The live loop: queue backends feeding the engine, verdicts back to the kernel.

One thread per queue; the kernel spreads flows over the queues by hash (a flow's
packets stay in one queue, in order).  The runner owns the lock that serialises the engine between those threads
and the proxy's hand-off threads; the lock covers the engine's decision only, not the
verdict: a verdict with a payload makes the kernel forward the packet (and often run the
receiver's TCP) inside our send(), about 100 us for a 64 KiB packet, which two
threads can do at once on two cores while the GIL is released.  Small verdicts (batched)
and reads keep the GIL (queue/netlink.py: under load, getting it back from the proxy's
threads after each syscall cost more than the syscall).

It is the only place verdicts are sent: every queued packet gets exactly one, whatever
happens (a packet the engine holds gets it on release).  Per queue, verdicts leave in
the order the packets were decided, so a direction is never reordered.
"""
from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
import threading
import time

from . import seq
from .engine import C2S, INJECT_MARK, QUEUE_MARK, S2C, Decision, Engine, Pair, SocketState, tap_payload
from .packet import Translation
from .queue.base import ACCEPT, DROP

STATS_DIR = "/run/nfsplice"
_NO_TRANSLATION = Translation(b"\0" * 4, b"\0" * 4, 0, 0)   # flows that only mark


class Runner:
    def __init__(self, backends, engine: Engine, *, instance: str = "nfsplice",
                 on_forget=None, stats_interval: float = 1.0, stats_dir: str = STATS_DIR):
        self.backends = list(backends) if isinstance(backends, (list, tuple)) else [backends]
        self.backend = self.backends[0]
        self.engine = engine
        self.instance = instance
        self.on_forget = on_forget
        self.on_message_done = None
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.stats_interval = stats_interval
        self.stats_path = stats_path(instance, stats_dir)
        self.started = time.time()
        self.verdict_errors = 0
        self.raw: socket.socket | None = None
        self.fastpath = None      # a fastpath.FastPath, when the fast path is on
        self.tap_lock = threading.Lock()
        self.clone_feeder: CloneFeeder | None = None     # the fast path taps by cloning
        self._fast_refresh = 0.0

    # -- verdicts ------------------------------------------------------------------------
    def _send_many(self, decided) -> None:
        """Verdicts for (packet, decision, buf or None) items: batched per queue where the
        backend can (one syscall for many), else one by one."""
        by_backend: dict = {}
        for pkt, decision, buf in decided:
            if decision == Decision.MANGLE:
                item = (pkt, ACCEPT, buf if buf is not None else pkt.buf)
            else:
                item = (pkt, DROP if decision == Decision.DROP else ACCEPT, None)
            by_backend.setdefault(id(pkt.source), (pkt.source, []))[1].append(item)
        for backend, items in by_backend.values():
            many = getattr(backend, "verdicts", None)
            if many is not None and len(items) > 1:
                self.verdict_errors += many(items)
                continue
            for pkt, verdict, payload in items:
                try:
                    backend.verdict(pkt, verdict, payload)
                except OSError:
                    self.verdict_errors += 1

    def _inject(self, packets) -> None:
        """Send engine-made packets (pure ACKs for the proxy's own sockets)."""
        if self.raw is None:
            self.raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, INJECT_MARK)
        for pkt in packets:
            try:
                self.raw.sendto(pkt, (socket.inet_ntoa(bytes(pkt[16:20])), 0))
            except OSError:
                self.engine.counters["injected.send_failed"] += 1

    def _send_all(self, items) -> None:
        """Verdicts for queued packets; a copy the engine kept (no queue entry, handle
        None) is sent again when accepted, forgotten when dropped."""
        queued = []
        for handle, decision, buf in items:
            if handle is None:
                if decision != Decision.DROP:
                    self._send_many(queued)      # (in order: the ones before it go first)
                    queued = []
                    self._inject([buf])
                continue
            queued.append((handle, decision, buf))
        self._send_many(queued)

    # -- the queue thread ----------------------------------------------------------------
    def start(self) -> None:
        self.threads = []
        if self.fastpath is not None and self.engine.fast_tap:
            loop, args = self._tap_loop, ()
            if self.fastpath.clones is not None:
                self.clone_feeder = CloneFeeder(self.fastpath.clones, self.engine)
                loop, args = self.clone_feeder.run, (self.stop,)
            t = threading.Thread(target=loop, args=args, name="nfsplice-tap", daemon=True)
            t.start()
            self.threads.append(t)
        for i, backend in enumerate(self.backends):
            t = threading.Thread(target=self.run, args=(backend, i == 0), name=f"nfsplice-queue{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def run(self, backend=None, timers: bool = True) -> None:
        backend = backend or self.backend
        prof_path = os.environ.get("NFSPLICE_PROFILE")
        if prof_path:   # a developer's tool: cProfile of the queue thread, dumped at stop
            import cProfile
            prof = cProfile.Profile()
            prof.enable()
            try:
                self._loop(backend, timers)
            finally:
                prof.disable()
                prof.dump_stats(f"{prof_path}.{backend.queue_num}")
        else:
            self._loop(backend, timers)

    def _loop(self, backend, timers: bool) -> None:
        eng = self.engine
        process = eng.process
        decided = []
        next_tick = time.monotonic() + 0.2
        next_stats = time.monotonic()
        while not self.stop.is_set():
            pkts = backend.receive(timeout=0.2)
            now = time.monotonic()
            forgotten = injected = resumable = ()
            with self.lock:
                for p in pkts:
                    p.source = backend
                    d = process(p.buf, hook=p.hook, csum_partial=p.csum_partial,
                                truncated=p.truncated, mark=p.mark, handle=p)
                    if d != Decision.HOLD:
                        if eng.trimmed is not None:       # cut at a message end
                            p.buf = p.buf[:eng.trimmed]
                        decided.append((p, d))
                if eng.fast_ops:
                    self._apply_fast()
                if eng.injected:
                    injected, eng.injected = eng.injected, []
                if timers and now >= next_tick:
                    if self.fastpath is not None:
                        self._refresh_fast(now)
                        if self.engine.fast_tap and self.fastpath.tap is not None:
                            self._drain_tap()
                    for handle, d, buf in eng.tick(now):
                        if handle is None:      # a kept copy: no verdict, nothing to send
                            continue
                        decided.append((handle, d))
                        handle.buf = memoryview(buf)
                    next_tick = now + 0.2
                    if eng.fast_ops:
                        self._apply_fast()
                if eng.forgotten:
                    forgotten, eng.forgotten = eng.forgotten, []
                if eng.resumable:
                    resumable, eng.resumable = eng.resumable, []
            if decided:
                self._send_many([(p, d, None) for p, d in decided])
                decided.clear()
            if injected:
                self._inject(injected)
            for pair in forgotten:
                if self.on_forget is not None:
                    self.on_forget(pair)
            for pair in resumable:
                if self.on_message_done is not None:
                    self.on_message_done(pair)
            if timers and now >= next_stats:
                self.write_stats()
                next_stats = now + self.stats_interval

    # -- the fast path (called with the lock held) ---------------------------------------
    def _apply_fast(self) -> None:
        """Write or remove the fast flows of the pairs the engine listed, before the
        verdicts of the packets that changed them go out.  What the program did for a
        flow is counted into the pair after it is written, and finally as it is removed."""
        eng = self.engine
        ops, eng.fast_ops = eng.fast_ops, []
        fp = self.fastpath
        if fp is None:
            return
        from .fastpath import flow_value
        for pair in {id(p): p for p in ops}.values():
            keys = pair.in_keys()
            try:
                sig = pair.fast_sig
                values = [None, None]       # None: the flow is removed
                if sig is not None:
                    egress = [fp.egress(pair.tr[d].dst) for d in (C2S, S2C)] if isinstance(sig, tuple) else []
                    if isinstance(sig, tuple) and not all(egress):
                        # One side is reached by a device the program is not attached
                        # to (or by no route): the queue carries this pair.
                        eng.counters["fastpath.no_device"] += 1
                        sig = pair.fast_sig = "queue"
                    if sig in ("queue", "handoff"):
                        values = [flow_value(_NO_TRANSLATION, end_seq=None, ack_watch=None, ifindex=0,
                                             mark=QUEUE_MARK, fast=False, pass_acks=sig == "handoff")] * 2
                    else:
                        values = [flow_value(pair.tr[d], end_seq=sig[d][0], ack_watch=sig[d][1],
                                             ifindex=egress[d], mark=QUEUE_MARK, tap=sig[d][2], c2s=d == C2S,
                                             win_limit=eng.window_limit(pair, 1 - d) is not None)
                                  for d in (C2S, S2C)]
                        eng.counters["fastpath.flows_written"] += 2
                for d, key in enumerate(keys):
                    # A flow being replaced is overwritten in place, never deleted
                    # first: in between, the pair's packets would go unmarked past the
                    # queue to the frozen sockets (a resumed pair's next request was lost
                    # so, until the client's RTO).  The program's counters are in a map
                    # of their own that the overwrite leaves alone, so what it counts
                    # meanwhile is read now or later, never lost.
                    final = values[d] is None
                    if final:
                        got = fp.take(key)
                    else:
                        fp.put(key, values[d])
                        got = fp.get(key)
                    if got is not None:
                        eng.fast_progress(pair, d, got.packets, got.bytes, got.last_ns / 1e9,
                                          got.next_seq, final=final)
            except OSError as e:
                # A full map or a failing bpf(2): the queue carries the pair.
                eng.counters[f"fastpath.map_error.{errno.errorcode.get(e.errno, e.errno)}"] += 1
                for d, key in enumerate(keys):
                    try:
                        got = fp.take(key)
                    except OSError:
                        continue
                    if got is not None:
                        eng.fast_progress(pair, d, got.packets, got.bytes, got.last_ns / 1e9,
                                          got.next_seq, final=True)
                pair.fast_sig = None

    # -- the fast path's tap ---------------------------------------------------------------
    TAP_GATHER_S = 0.001     # between drains while records keep coming (see _tap_loop)

    def _tap_loop(self) -> None:
        """Payload the program copied for tapped pairs, to their sinks.  While records
        keep coming, the thread drains the ring every TAP_GATHER_S instead of waiting
        on it: the ring wakes its consumer whenever it has caught up, at 25 Gbit/s for
        nearly every 64 KiB record, and those wakeups and GIL hand-overs were half of
        this thread's CPU (bench_cache, fill: 0.28 -> 0.14 CPU-s per GiB tapped).  The
        ring holds about 20 ms of such a flow; records wait at most TAP_GATHER_S."""
        ring = self.fastpath.tap
        while not self.stop.is_set():
            ring.wait(0.2)
            while self._drain_tap() and not self.stop.is_set():
                time.sleep(self.TAP_GATHER_S)

    def _drain_tap(self) -> int:
        """Every record committed so far.  The tap thread calls it, and the timers do
        (with the engine lock held) before the engine may close a pair's tap, so a tap
        sees all of its payload; tap_lock keeps the two consumers apart."""
        flows = self.engine.flows
        counters = self.engine.counters

        def handle(key, first_seq, payload):
            ent = flows.get(key)
            if ent is None or ent[0].tap[ent[1]] is None:
                counters["fastpath.tap_orphan_records"] += 1
                return
            tap_payload(ent[0], ent[1], first_seq, payload)
        with self.tap_lock:
            return self.fastpath.tap.consume(handle)

    def _handoff_tsvals(self, pair: Pair) -> None:
        """Each side's latest TSval as the program saw it during the hand-off (the
        pure ACKs it let pass never reached the engine), for the splice's offsets."""
        for d, key in enumerate(pair.in_keys()):
            try:
                tsval = self.fastpath.handoff_tsval(key)
            except OSError:
                continue
            if tsval is not None:
                pair.tsval[d] = tsval

    def _refresh_fast(self, now: float) -> None:
        """Idle and inactivity timers: a fast pair's packets never reach the engine, so
        before its timers run, pairs that look idle (or without progress) for a second
        learn the program's progress."""
        if now < self._fast_refresh:
            return
        self._fast_refresh = now + 1.0
        eng = self.engine
        for pair in list(eng.pairs.values()):
            if not isinstance(pair.fast_sig, tuple) or now - min(pair.last_seen, pair.progress_at) < 1.0:
                continue
            for d, key in enumerate(pair.in_keys()):
                try:
                    got = self.fastpath.get(key)
                except OSError:
                    got = None
                if got is not None:
                    eng.fast_progress(pair, d, got.packets, got.bytes, got.last_ns / 1e9,
                                      got.next_seq, final=False)

    def fast_tsval(self, key: bytes) -> int | None:
        """The newest TSval (translated) the program forwarded for incoming flow KEY
        (engine.fast_tsval; called with the lock held)."""
        try:
            got = self.fastpath.get(key)
        except OSError:
            return None
        return (got.max_tsval or None) if got is not None else None

    # -- the proxy's calls ---------------------------------------------------------------
    def register(self, pair: Pair) -> Pair:
        if self.fastpath is not None:
            # Where the spliced packets will leave (a route lookup, a few ms the first
            # time for a destination): now, before the lock the queue threads need.
            self.fastpath.egress(pair.client.ip)
            self.fastpath.egress(pair.server.ip)
        with self.lock:
            self.engine.register(pair)
            if self.engine.fast_ops:
                self._apply_fast()     # the program marks the pair's packets from now on
            return pair

    def splice(self, pair: Pair, a: SocketState, b: SocketState, **kw) -> None:
        with self.lock:
            if self.clone_feeder is not None:
                self.clone_feeder.wrap(pair)
            if isinstance(pair.fast_sig, str):
                self._handoff_tsvals(pair)
            out = self.engine.splice(pair, a, b, **kw)
            # The flows change before the released packets' verdicts go out: the hand-off
            # flows pass pure ACKs to the proxy's sockets, which are frozen now, so the
            # receivers' ACKs for the released packets would be lost (the origin then
            # waits for its RTO).  While released packets are still on their way through
            # the queue, the pair's next packets follow them there (no overtaking by the
            # program); the flows the engine wants come right after the verdicts.
            final = pair.fast_sig
            if out and isinstance(final, tuple):
                pair.fast_sig = "queue"
            if self.engine.fast_ops:
                self._apply_fast()
            self._send_all(out)
            if pair.fast_sig != final:
                pair.fast_sig = final
                self.engine.fast_ops.append(pair)
                self._apply_fast()
            if self.engine.injected:      # the window update to the origin: at once
                injected, self.engine.injected = self.engine.injected, []
                self._inject(injected)

    def resume_numbers(self, pair: Pair):
        with self.lock:
            return self.engine.resume_numbers(pair)

    def _drain_tap_before_forget(self, pair: Pair) -> None:
        """A tapped pair is about to be forgotten (its sinks closed): what the program
        copied for it and still waits in the ring goes to the sinks first."""
        if (self.fastpath is not None and self.engine.fast_tap and self.fastpath.tap is not None
                and (pair.tap[C2S] or pair.tap[S2C])):
            self._drain_tap()

    def finish_resume(self, pair: Pair) -> None:
        with self.lock:
            self._drain_tap_before_forget(pair)
            self._send_all(self.engine.finish_resume(pair))
            if self.engine.fast_ops:
                self._apply_fast()

    def abort(self, pair: Pair, reason: str) -> None:
        with self.lock:
            self._drain_tap_before_forget(pair)
            self._send_all(self.engine.abort(pair, reason))
            self.engine.forgotten = [p for p in self.engine.forgotten if p is not pair]
            if self.engine.fast_ops:
                self._apply_fast()

    # -- stats ---------------------------------------------------------------------------
    def stats(self) -> dict:
        with self.lock:
            eng = self.engine.stats()
        out = {"instance": self.instance, "pid": os.getpid(), "time": time.time(),
               "uptime": round(time.time() - self.started, 1),
               "backend": getattr(self.backend, "name", "?"), "queues": len(self.backends),
               "queue.enobufs": sum(getattr(b, "enobufs", 0) for b in self.backends),
               "queue.verdict_errors": self.verdict_errors}
        out.update(eng)
        if self.fastpath is not None:
            try:
                out.update(self.fastpath.counters())
            except OSError:
                out["fastpath.counters_unreadable"] = 1
            for d in ("c2s", "s2c"):     # zero windows the program forwarded, with the engine's
                n = out.get(f"window.zero_{d}", 0) + out.get(f"fastpath.zero_window_{d}", 0)
                if n:
                    out[f"window.zero_{d}"] = n
        tap = self.engine.tap
        if tap is not None:
            out.update({"tap.bytes": tap.bytes_written, "tap.complete": tap.complete,
                        "tap.incomplete": tap.incomplete, "tap.dropped_writes": tap.dropped_writes})
        return out

    def write_stats(self) -> None:
        write_stats_file(self.stats_path, self.stats())

    def shutdown(self) -> None:
        self.stop.set()
        for t in getattr(self, "threads", []):
            t.join(5)


def stats_path(instance: str, stats_dir: str = STATS_DIR) -> str:
    """Where INSTANCE's counters go (`nfsplice stats` reads them)."""
    return os.path.join(stats_dir, f"{instance}.json")


def write_stats_file(path: str, stats: dict) -> None:
    """Replace PATH (what `nfsplice stats` reads) with STATS at once; a directory that
    cannot be written (not root) is no error."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


# -- the clone tap ---------------------------------------------------------------------------
_TCP_SEQ = struct.Struct("!I")
_ETH_IPV4_TCP = 34 + 20         # Ethernet + IPv4 (no options: the program's) + TCP


class _Closing:
    """A tapped direction whose sink the engine closed while its clones may still wait
    in the socket: they go to it while their offset is below LENGTH (None: the end was
    never seen, so everything of the key until the close runs, unless CUT)."""
    __slots__ = ("pair", "d", "sink", "length", "cut")

    def __init__(self, pair: Pair, d: int, sink, length: int | None):
        self.pair, self.d, self.sink, self.length, self.cut = pair, d, sink, length, False


class _ClonedSink:
    """A pair's tap sink while the program clones its payload: writes go through, the
    close waits until the clones queued before it were fed (CloneFeeder.close_later)."""
    __slots__ = ("sink", "feeder", "pair", "d", "key")

    def __init__(self, sink, feeder: "CloneFeeder", pair: Pair, d: int, key: bytes):
        self.sink, self.feeder, self.pair, self.d, self.key = sink, feeder, pair, d, key

    def write(self, offset: int, data) -> None:
        self.sink.write(offset, data)

    def close(self, length: int | None) -> None:
        self.feeder.close_later(self, length)


class CloneFeeder:
    """The consumer of the clone tap (fastpath.TapClones): each clone's payload to its
    pair's tap sink at its stream offset, as the ring's records (_drain_tap): the key
    is the 4-tuple the packet arrived with, the sequence the sender's.

    The engine closes a pair's sinks when it forgets the pair, and its last clones may
    still be in the socket then (the consumer runs behind the transfer; nobody who
    forwards waits for it).  So the close is deferred (_ClonedSink): the direction is
    kept here with its final length, a marker goes into the socket behind its clones,
    and the sink is closed when the marker comes out, or when the socket was found
    empty after the marker was sent (a full socket drops markers too).  Clones of a key
    are told apart by sequence: a closed direction takes what lies below its length, the
    pair the engine has now for the key the rest (a resumed connection's next message:
    same key, later bytes).  A lost clone is a hole: the object is not stored.

    `run` is the tap thread.  It leaves the clones in the socket while they keep
    coming (a transfer runs) and reads them once none came for QUIET_S, or a tapped
    direction was closed, or they hold HOLD_BYTES or wait since HOLD_S (requests
    collapsed on a fill follow what is stored): every pass over the payload while the
    transfer runs takes CPU from it (README, Cache), and the socket keeps the clones for
    the price of their pages.  The socket read copies a payload into a bytes object
    that the sinks keep (no copy of their own: cache.layer), with the GIL released."""

    POLL_S = 0.2
    QUIET_S = 0.005
    HOLD_S = 0.5
    HOLD_BYTES = 512 << 20       # a 256 MiB fill whole (the socket has room for 1 GiB)
    STATS_EVERY = 256            # frames between reads of the socket's drop count

    def __init__(self, clones, engine: Engine):
        self.clones = clones
        self.engine = engine
        self.lock = threading.Lock()
        self.closing: dict[bytes, list[_Closing]] = {}
        self.pending: list[tuple[int, bytes, _Closing]] = []    # (marker token, key, entry)
        self.token = 0
        self.sent = 0            # the latest token whose marker send returned
        self.live = True

    # -- the engine's side (its lock held) ------------------------------------------------
    def wrap(self, pair: Pair) -> None:
        """Before PAIR is spliced: its sinks close after their clones."""
        for d, key in enumerate(pair.in_keys()):
            sink = pair.tap[d]
            if sink is None or isinstance(sink, _ClonedSink):
                continue
            pair.tap[d] = _ClonedSink(sink, self, pair, d, key)
            with self.lock:
                for ent in self.closing.get(key, ()):
                    if ent.length is None:
                        # An earlier owner of the key whose end was never seen: its
                        # clones and the new pair's cannot be told apart any more.
                        ent.cut = True

    def close_later(self, sink: _ClonedSink, length: int | None) -> None:
        ent = _Closing(sink.pair, sink.d, sink.sink, length)
        with self.lock:
            if not self.live:
                token = None
            else:
                self.token += 1
                token = self.token
                self.closing.setdefault(sink.key, []).append(ent)
                self.pending.append((token, sink.key, ent))
        if token is None:
            sink.sink.close(length)
            return
        self.clones.mark(token)
        self.sent = token

    # -- the tap thread ----------------------------------------------------------------------
    def reached(self, token: int) -> None:
        """Every clone queued before marker TOKEN was fed: close those sinks."""
        done = []
        with self.lock:
            while self.pending and self.pending[0][0] <= token:
                _, key, ent = self.pending.pop(0)
                ents = self.closing.get(key)
                if ents is not None:
                    ents.remove(ent)
                    if not ents:
                        del self.closing[key]
                done.append(ent)
        for ent in done:
            ent.sink.close(ent.length)

    def feed(self, key: bytes, first_seq: int, payload) -> None:
        counters = self.engine.counters
        for ent in self.closing.get(key, ()):
            pair, d = ent.pair, ent.d
            base_seq, base_off = pair.tap_base[d]
            if ent.length is not None and base_off + seq.diff(first_seq, base_seq) >= ent.length:
                continue                         # a later owner's bytes
            if ent.cut:
                counters["fastpath.tap_clone_unattributed"] += 1
            else:
                tap_payload(pair, d, first_seq, payload)     # (pair.tap[d] is still its sink)
            return
        got = self.engine.flows.get(key)
        if got is None or got[0].tap[got[1]] is None:
            counters["fastpath.tap_orphan_records"] += 1
            return
        tap_payload(got[0], got[1], first_seq, payload)

    def run(self, stop: threading.Event) -> None:
        clones = self.clones
        poller = select.poll()
        poller.register(clones.sock, select.POLLIN)
        held, since = 0, None
        try:
            while not stop.is_set():
                if not self.pending:
                    try:
                        queued = clones.queued()
                    except OSError:
                        queued = None               # (no SO_MEMINFO: read at once)
                    if queued == 0:
                        poller.poll(self.POLL_S * 1000)
                        continue
                    now = time.monotonic()
                    since = now if since is None else since
                    if (queued is not None and queued != held and queued < self.HOLD_BYTES
                            and now - since < self.HOLD_S):
                        held = queued               # still coming: leave them there
                        time.sleep(self.QUIET_S)
                        continue
                self._drain()
                held, since = 0, None
        finally:
            with self.lock:
                self.live = False
            self._count_drops()
            self.reached(self.token)     # what is left is not fed: those objects are not stored

    def _drain(self) -> None:
        """Feed every clone in the socket, until it is found empty."""
        from .fastpath import TAP_FRAME_MAX
        clones, counters = self.clones, self.engine.counters
        recv, unpack_seq, marker = clones.sock.recv, _TCP_SEQ.unpack_from, clones.marker
        bufsize = TAP_FRAME_MAX + 64           # (room to tell a longer frame)
        n = 0
        while True:
            sent = self.sent
            try:
                frame = recv(bufsize, socket.MSG_DONTWAIT)
            except BlockingIOError:
                # Empty: every marker sent before was read or lost.
                if self.pending:
                    self.reached(sent)
                break
            n += 1
            if n % self.STATS_EVERY == 0:
                self._count_drops()
            if len(frame) < _ETH_IPV4_TCP or frame[12:14] != b"\x08\x00" or frame[14] != 0x45 \
                    or frame[23] != 6:
                token = marker(frame)
                if token is not None:
                    self.reached(token)
                else:
                    counters["fastpath.tap_clone_foreign"] += 1
                continue
            tot = (frame[16] << 8) | frame[17]
            data_at = 34 + (frame[46] >> 4) * 4
            if 14 + tot > len(frame) or data_at > 14 + tot:
                # A clone cut short: never fed as if whole (the object keeps a hole).
                counters["fastpath.tap_clone_truncated"] += 1
                continue
            if data_at < 14 + tot:
                self.feed(frame[26:38], unpack_seq(frame, 38)[0], memoryview(frame)[data_at:14 + tot])
        self._count_drops()

    def _count_drops(self) -> None:
        try:
            lost = self.clones.drops()
        except OSError:
            return
        if lost:
            self.engine.counters["fastpath.tap_clone_drops"] += lost

