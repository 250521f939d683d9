"""The splicing engine: connection pairs, their states, and the per-packet decision.

One rewrite path (STYLE.md): `Engine.process()` takes the bytes of one packet and its
queue metadata and returns a `Decision`; it never does I/O.  The live queue loop
(runner.py), pcap replay (replay.py), the tests and the benchmarks all call it.

A pair joins a client's connection to the proxy (A) with the proxy's connection to
the origin (B).  Direction C2S is client -> origin, S2C origin -> client.  States:

    HANDOFF  the proxy application still owns both sockets and is draining them.
             Packets of the pair carrying payload, FIN or RST are held (copied and
             kept, no verdict yet), so nothing new reaches the sockets; pure ACKs pass
             so the sockets' send queues can drain.
    SPLICED  every packet of the pair is rewritten to the other connection and
             accepted; the proxy sockets are frozen (TCP_REPAIR) and anything they
             still try to send is dropped.  Held packets are released first, in order.
    CLOSING  both directions finished (each FIN acknowledged) or a RST passed; the
             pair lingers to translate retransmissions, then is forgotten.

Packets the engine cannot parse are counted under `malformed.<reason>` and accepted
unchanged (they are not ours to judge: the stack drops what is really broken);
packets of flows no pair owns are accepted unchanged (`unknown_flow`).
"""
from __future__ import annotations

import enum
import heapq
import itertools
import struct
import time
from collections import defaultdict
from dataclasses import dataclass, field

from . import packet, seq
from .packet import ACK, FIN, PSH, RST, SYN, Malformed, TCPView, Translation
from .proxy.http1 import PeerError
from .queue.base import HOOK_LOCAL_OUT

C2S, S2C = 0, 1
INJECT_MARK = 0x6E730001   # skb mark of the pure ACKs the engine injects ("ns" 1)
QUEUE_MARK = 0x6E730002    # packets of pairs the engine handles, when only those are queued
# A copy the fast path queues of an ACK it forwards itself (the one reaching a resumable
# pair's message end): the engine learns from it and drops it.  The rules match both
# marks (QUEUE_MARK_MASK).
WATCH_COPY_MARK = QUEUE_MARK | 1
QUEUE_MARK_MASK = 0xFFFFFFFE
DIRECTION_NAMES = ("c2s", "s2c")
_TS = struct.Struct("!II")
_PKT_NAMES = ("packets.c2s", "packets.s2c")
_BYTE_NAMES = ("bytes.c2s", "bytes.s2c")
_ZERO_WINDOW_NAMES = ("window.zero_c2s", "window.zero_s2c")
# How far past a resumable pair's message end its receivers' windows reach (see _forward).
NEXT_MESSAGE_WINDOW = 64 << 10


class Decision(enum.IntEnum):
    ACCEPT = 0     # accept unchanged
    MANGLE = 1     # accept with the rewritten bytes
    DROP = 2
    HOLD = 3       # kept by the engine; its verdict comes later from release lists



class State(enum.IntEnum):
    HANDOFF = 0
    SPLICED = 1
    CLOSING = 2
    DONE = 3


def flow_key(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    return src + dst + struct.pack("!HH", sport, dport)


@dataclass
class Endpoint:
    ip: bytes
    port: int


@dataclass
class SocketState:
    """What the proxy read off one frozen socket (TCP_REPAIR, TCP_QUEUE_SEQ, TCP_INFO)."""
    snd_seq: int          # write_seq: the next sequence number this socket would send
    rcv_seq: int          # rcv_nxt: the next sequence number it expects
    snd_wscale: int = 0   # shift the peer applies... to windows it sends us (tcpi_snd_wscale)
    rcv_wscale: int = 0   # shift we announced (tcpi_rcv_wscale)
    timestamps: bool = False
    ts_now: int = 0       # TCP_TIMESTAMP: the TSval it would send now
    sack: bool = False
    mss: int = 0          # tcpi_snd_mss
    window: tuple = ()    # TCP_REPAIR_WINDOW: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup


@dataclass
class Held:
    handle: object
    buf: bytearray
    csum_partial: bool
    direction: int


@dataclass
class Follower:
    """A direction whose message end is found by walking its chunked framing: SCANNER
    (a `ChunkedScanner`, or anything with its feed/advance/data_end/offset/done) and
    BASE, the sender's sequence number of the scanner's offset 0."""
    scanner: object
    base: int

    def position(self) -> int:
        """The tentative end: where the chunk-data being forwarded ends, or (outside
        chunk-data) the first framing byte not scanned yet."""
        sc = self.scanner
        at = sc.data_end
        return seq.add(self.base, sc.offset if at is None else at)


@dataclass
class Pair:
    client: Endpoint
    proxy_a: Endpoint     # the proxy's side of connection A (listen address)
    proxy_b: Endpoint     # the proxy's side of connection B (its source address)
    server: Endpoint
    id: int = 0
    state: State = State.HANDOFF
    tr: list = field(default_factory=lambda: [None, None])
    held: list = field(default_factory=list)
    fin_seq: list = field(default_factory=lambda: [None, None])   # in the sender's space
    fin_acked: list = field(default_factory=lambda: [False, False])
    tsval: list = field(default_factory=lambda: [None, None])      # last TSval seen per side
    ts_ref: list = field(default_factory=lambda: [None, None])     # TSval of the first held packet
    syn: list = field(default_factory=lambda: [None, None])        # SynOptions per side
    # Per direction a tap sink or None: an object with write(offset, data) and
    # close(length) (tap.TapStream, or the proxy's own, e.g. a cache writer), fed the
    # forwarded payload at its stream offset; neither call may block.
    tap: list = field(default_factory=lambda: [None, None])
    tap_base: list = field(default_factory=lambda: [(0, 0), (0, 0)])  # (seq, stream offset)
    packets: list = field(default_factory=lambda: [0, 0])
    bytes: list = field(default_factory=lambda: [0, 0])
    reset: bool = False
    created: float = 0.0
    last_seen: float = 0.0
    closing_since: float | None = None
    owner: object = None  # the proxy's handle (its sockets), given back on forget
    frozen: tuple | None = None   # (SocketState A, SocketState B) at the splice
    end_seq: list = field(default_factory=lambda: [None, None])  # message end per direction
    # False while end_seq is a chunked direction's tentative end (Follower.position):
    # only a final end is acknowledged, resumed at, or cut at as an overrun.
    end_final: list = field(default_factory=lambda: [True, True])
    follow: list = field(default_factory=lambda: [None, None])   # a Follower per chunked direction
    end_fin: list = field(default_factory=lambda: [True, True])   # FIN at the end may pass
    next_seq: list = field(default_factory=lambda: [None, None])  # highest seq+len seen per side
    # Per direction, the right edge of the receive window its translated packets offered
    # (ack + window, in the receiver's view): a socket rebuilt at a resume must not
    # offer less, or the peer's data past its own window is dropped.
    win_edge: list = field(default_factory=lambda: [None, None])
    end_acked: list = field(default_factory=lambda: [False, False])
    message_done: float | None = None  # when the receivers acknowledged every message end
    overrun: bool = False              # a sender went past its message end
    # Reset here while a receiver may have missed its RST (_reset_both, STALLED): what
    # either side still sends is answered with a RST at its ack.
    answer_rst: bool = False
    resumable: bool = False            # at the message end the proxy takes both connections back
    resuming: bool = False             # ... and is doing so: every packet is held meanwhile
    spliced_at: float = 0.0
    progress_at: float = 0.0           # when a direction last carried a new byte (or the splice)
    ts_pending: list = field(default_factory=lambda: [False, False])  # TSval offset still unknown
    # The fast path (fastpath/): what its flows were last written with (None: no flows),
    # and per direction the program's (packets, bytes) already counted here.
    fast_sig: tuple | None = None
    fast_seen: list = field(default_factory=lambda: [(0, 0), (0, 0)])

    def in_keys(self) -> tuple[bytes, ...]:
        """Keys of packets arriving at the proxy: from the client, from the server."""
        if self.server is None:   # embryonic: only the client's side is known yet
            return (flow_key(self.client.ip, self.proxy_a.ip, self.client.port, self.proxy_a.port),)
        return (flow_key(self.client.ip, self.proxy_a.ip, self.client.port, self.proxy_a.port),
                flow_key(self.server.ip, self.proxy_b.ip, self.server.port, self.proxy_b.port))

    def out_keys(self) -> tuple[bytes, ...]:
        """Keys of packets the proxy's own sockets send."""
        if self.server is None:
            return ()
        return (flow_key(self.proxy_a.ip, self.client.ip, self.proxy_a.port, self.client.port),
                flow_key(self.proxy_b.ip, self.server.ip, self.proxy_b.port, self.server.port))

    def describe(self) -> str:
        ip = lambda e: ".".join(map(str, e.ip)) + f":{e.port}" if e else "?"  # noqa: E731
        return (f"pair {self.id} {ip(self.client)}>{ip(self.proxy_a)} "
                f"~ {ip(self.proxy_b)}>{ip(self.server)}")


class Counters(defaultdict):
    def __init__(self):
        super().__init__(int)


@dataclass
class _SynRecord:
    options: packet.SynOptions
    tsval: int | None
    seen: float


class Engine:
    """Pair table and per-packet decisions.  Not thread-safe: callers hold `runner.lock`."""

    def __init__(self, tap=None, *, linger: float = 2.0, idle_timeout: float = 300.0,
                 handoff_timeout: float = 10.0, message_close_timeout: float = 10.0,
                 inactivity_timeout: float | None = None, clock=time.monotonic):
        self.flows: dict[bytes, tuple[Pair, int]] = {}
        self.out_flows: dict[bytes, Pair] = {}
        self.syns: dict[bytes, _SynRecord] = {}
        self.pairs: dict[int, Pair] = {}
        self.counters = Counters()
        self.tap = tap
        self.linger = linger
        self.idle_timeout = idle_timeout
        self.handoff_timeout = handoff_timeout
        self.message_close_timeout = message_close_timeout
        # A spliced pair whose bytes stop moving (a client that reads nothing: only
        # zero-window probes and ACKs pass) is reset after this long; None: never.
        self.inactivity_timeout = inactivity_timeout
        self.clock = clock
        self._ids = itertools.count(1)
        self.forgotten: list[Pair] = []   # pairs forgotten since the caller last looked
        self.injected: list[bytearray] = []  # packets for the caller to send (pure ACKs)
        self.listeners: set[bytes] = set()    # (ip, port) of the L4 proxy: pairs start at SYN
        self.splice_log = None                # called with splice_record() at every splice
        self.resumable: list[Pair] = []       # pairs whose message ended, for the proxy to resume
        self.trimmed: int | None = None       # set by process(): MANGLE'd packet's new length
        # The fast path: when on, pairs whose fast flows must be (re)written or removed
        # are listed in fast_ops for the runner, which applies them before any verdict.
        self.fast = False
        self.fast_tap = False     # the program can tap (its records reach tap_payload)
        # The newest TSval the fast path forwarded for an incoming flow key (None: none,
        # or no fast path); the runner's, reading the program's counters.
        self.fast_tsval = None
        self.window_updates = True   # splice() tells the origin the client's window (replay of
                                     # captures made before it did sets this False)
        self.fast_ops: list[Pair] = []

    # -- the per-packet path ----------------------------------------------------------------
    def process(self, buf: memoryview, *, hook: int = 0, csum_partial: bool = False,
                truncated: bool = False, mark: int = 0, handle: object = None,
                now: float | None = None) -> Decision:
        """Decide what happens to one queued packet; rewrite BUF in place for MANGLE.

        HOLD means the engine copied the packet and will return it from `splice()` or
        `abort()` or `tick()`; BUF itself may be reused by the caller at once."""
        c = self.counters
        self.trimmed = None
        try:
            v = TCPView(buf, truncated)
        except Malformed as e:
            c["malformed." + e.reason] += 1
            return Decision.ACCEPT
        key = v.key()
        if hook == HOOK_LOCAL_OUT:
            if mark == INJECT_MARK:
                return Decision.ACCEPT          # our own (a RST ending an overrun pair)
            pair = self.out_flows.get(key)
            if pair is not None and pair.state >= State.SPLICED:
                if pair.resuming:
                    # The proxy's rebuilt socket (its window probe): it owns the
                    # connection again.
                    c["proxy_socket.resumed"] += 1
                    return Decision.ACCEPT
                stale = _prefreeze(pair, key, v)
                if stale == "ack":
                    # The ACK that completed the upstream handshake (or one like it) was
                    # still waiting in the queue when the socket was frozen: it carries
                    # nothing new, and the origin needs it.
                    c["proxy_socket.prefreeze_ack"] += 1
                    return Decision.ACCEPT
                if stale == "data":
                    # A retransmission sent before the freeze (without the fast path the
                    # queue carries the sockets' own packets too, and runs behind) of
                    # bytes the receiver has acknowledged since: the drain waits for
                    # that before the freeze.  Nothing new, and its receiver has it.
                    c["proxy_socket.prefreeze_retransmission"] += 1
                    return Decision.DROP
                if v.flags & SYN:
                    # Not the frozen socket: the listener retransmitting a SYN-ACK
                    # (a lost handshake ACK) that waited in the queue while the pair
                    # was spliced.  The client is established; it needs none.
                    c["dropped.late_synack"] += 1
                    return Decision.DROP
                # A frozen proxy socket must be silent; this is the safety net.
                c["dropped.proxy_socket"] += 1
                c[f"dropped.proxy_socket.flags_{v.flags:#04x}.len_{min(v.payload_len, 1)}"] += 1
                return Decision.DROP
            if pair is not None and pair.state == State.HANDOFF:
                c["proxy_socket.handoff_out"] += 1    # (the drain's; with the fast path unmarked)
            return Decision.ACCEPT
        ent = self.flows.get(key)
        if ent is None and mark == WATCH_COPY_MARK:
            c["watch_copies.late"] += 1      # (the pair is gone: the original went on)
            return Decision.DROP
        if ent is None:
            if v.flags & SYN and not v.flags & ACK and key[4:8] + key[10:12] in self.listeners:
                self._prepair(key, v, now)
                return Decision.ACCEPT
            c["unknown_flow"] += 1
            if v.flags & SYN or key in self.syns:
                self._note_handshake(key, v, now)
            return Decision.ACCEPT
        pair, d = ent
        if mark == WATCH_COPY_MARK:
            return self._watch_copy(pair, d, v, csum_partial, now)
        if mark == INJECT_MARK:
            # One of our own pure ACKs coming back: for the proxy socket while the pair
            # is being handed off, nobody's once it is spliced.
            if pair.state == State.HANDOFF:
                return Decision.ACCEPT
            c["dropped.late_injected"] += 1
            return Decision.DROP
        pair.last_seen = self.clock() if now is None else now
        if truncated:
            # The kernel copied only part of it: re-setting the payload would cut the
            # packet, and holding a part would lose the rest.  Dropped: TCP retransmits
            # it (in smaller pieces, usually).
            c["dropped.truncated"] += 1
            return Decision.DROP
        if pair.state == State.HANDOFF:
            return self._handoff(pair, d, v, buf, csum_partial, handle)
        if pair.resuming:
            pair.held.append(Held(handle, bytearray(buf), csum_partial, d))
            c["held.resuming"] += 1
            return Decision.HOLD
        if pair.answer_rst and v.flags & (ACK | RST) == ACK:
            # The ack of a segment sent after the reset is where its sender's window
            # starts: a RST there it takes (RFC 5961 3.2), as from a closed socket.
            self.injected.append(packet.build(v.dst, v.src, v.dport, v.sport, v.ack, 0, RST, window=0))
            c["injected.rst_answer"] += 1
            return Decision.DROP
        broken = pair.follow[d] is not None and self._follow(pair, d, v)
        end = pair.end_seq[d]
        if (pair.resumable and end is not None and pair.end_final[d] and v.payload_len
                and seq.gt(seq.add(v.seq, v.payload_len), end)):
            # Bytes past a message end of a pair that will resume: the next request,
            # often on the very segment that acknowledges the response's last byte.
            # The splice cuts them (and passes the acknowledgement on); a copy is kept
            # for the rebuilt socket, or the client would resend them only after its
            # retransmission timeout.  A copy has no queue entry: it is sent again.
            pair.held.append(Held(None, _whole(buf, v, csum_partial), False, d))
            c["held.next_message"] += 1
            kept = True
        else:
            kept = False
        plen = v.payload_len
        try:
            out = self._forward(pair, d, v, csum_partial, kept)
        except Malformed as e:
            c["malformed." + e.reason] += 1
            c["dropped.malformed_spliced"] += 1
            return Decision.DROP
        if self.fast:
            self._fast_check(pair)
        decision = Decision.MANGLE
        if self.trimmed is not None and self._cut_to_a_segment(pair, d, plen, out):
            self.trimmed = None
            decision = Decision.DROP
        if broken:     # after the bytes before the bad framing, never ahead of them
            self._reset_both(pair, "chunked_malformed")
        return decision

    def _watch_copy(self, pair: Pair, d: int, v: TCPView, csum_partial: bool, now) -> Decision:
        """The fast path's copy of a pure ACK it forwarded itself, one reaching the
        message end of a pair that resumes (fastpath.bpf.c, WATCH_COPY_MARK): learnt
        from as if forwarded here (the message is done, the window edge), then dropped."""
        self.counters["watch_copies"] += 1
        if pair.state != State.SPLICED or pair.resuming:
            self.counters["watch_copies.late"] += 1
            return Decision.DROP
        pair.last_seen = self.clock() if now is None else now
        try:
            self._forward(pair, d, v, csum_partial)
        except Malformed as e:
            self.counters["malformed." + e.reason] += 1
        if self.fast:
            self._fast_check(pair)
        return Decision.DROP

    def _handoff(self, pair: Pair, d: int, v: TCPView, buf, csum_partial: bool, handle) -> Decision:
        """A packet of a pair whose sockets still belong to the proxy application.

        Payload and FIN are held, so no new byte reaches a socket that is about to be
        frozen.  The socket still needs the acknowledgement the packet carries (its
        send queue must drain, and a lost final handshake ACK leaves a connection
        unaccepted until the first data segment completes it), so a copy stripped to a
        pure ACK goes on.  RST is only held; SYNs pass (the proxy's connect needs them)."""
        c = self.counters
        flags = v.flags
        if flags & SYN:
            try:
                pair.syn[d] = packet.syn_options(v)
            except Malformed as e:
                c["malformed." + e.reason] += 1
            ts = _tsval(v)
            if ts is not None:
                pair.tsval[d] = ts
            return Decision.ACCEPT
        ts = _tsval(v)
        if ts is not None:
            pair.tsval[d] = ts
        if not (v.payload_len or flags & (FIN | RST)):
            return Decision.ACCEPT
        if ts is not None and pair.ts_ref[d] is None:
            pair.ts_ref[d] = ts
        pair.held.append(Held(handle, bytearray(buf), csum_partial, d))
        c["held"] += 1
        if flags & ACK and not flags & RST:
            self.injected.append(packet.ack_only(v))
            c["injected.ack"] += 1
        return Decision.HOLD

    def _forward(self, pair: Pair, d: int, v: TCPView, csum_partial: bool, kept: bool = False) -> TCPView:
        """Rewrite V for the other connection; returns the view rewritten (a shorter one
        when bytes past the direction's message end were cut off).  KEPT: a whole copy of
        V waits for the rebuilt socket, so what is cut here is not lost."""
        if pair.ts_pending[d]:
            self._learn_tsval(pair, d, v)
        if pair.ts_pending[1 - d] and v.doff > 20:
            # The TSecr echoes a TSval of the proxy's socket, which cannot be put into
            # the receiver's clock before the other side's offset is known: 0, "no
            # echo" (no RTT sample from it).  Summed in full: the buffer changed.
            o = v.options().get(packet.OPT_TIMESTAMP)
            if o is not None:
                struct.pack_into("!I", v.buf, o + 6, 0)
                csum_partial = True
                self.counters["tsecr_zeroed"] += 1
        tr: Translation = pair.tr[d]
        end = pair.end_seq[d]
        truncated = False
        if end is not None:
            over = seq.diff(seq.add(v.seq, v.payload_len), end)
            if over > 0 or (v.flags & FIN and over == 0 and not pair.end_fin[d] and pair.end_final[d]):
                v = self._cut_at_end(pair, d, v, max(over, 0), kept)
                csum_partial = True    # the payload changed: summed in full
            elif v.flags & FIN and not pair.end_fin[d]:
                # A FIN before the end of a message after which the connection was to
                # go on (an upload; at a tentative end, chunked framing not finished):
                # the message is cut short.  The FIN reaches the receiver, which sees
                # it so; the pair cannot resume and ends at once.
                truncated = True
        flags = v.flags
        plen = v.payload_len
        nxt = seq.add(v.seq, plen)
        if pair.next_seq[d] is None or seq.gt(nxt, pair.next_seq[d]):
            pair.next_seq[d] = nxt
            if plen:
                pair.progress_at = pair.last_seen
        if plen and pair.tap[d] is not None:
            tap_payload(pair, d, v.seq, v.payload())
        if flags & RST:
            pair.reset = True
            self.counters["rst_translated"] += 1
            self._closing(pair)
        if flags & FIN:
            pair.fin_seq[d] = seq.add(v.seq, plen)
        o = 1 - d
        if (flags & ACK and pair.end_seq[o] is not None and pair.end_final[o] and not pair.end_acked[o]
                and seq.ge(seq.add(v.ack, tr.ack_delta), pair.end_seq[o])):
            pair.end_acked[o] = True
            if all(pair.end_seq[x] is None or pair.end_acked[x] for x in (C2S, S2C)):
                pair.message_done = pair.last_seen     # every message delivered whole
                if pair.resumable and not (flags & (FIN | RST) or pair.reset
                                           or pair.fin_seq[C2S] is not None or pair.fin_seq[S2C] is not None):
                    # From the next packet on, everything is held until the proxy has
                    # rebuilt its sockets (resume_numbers, finish_resume).  A connection
                    # that is closing is left to close through the splice instead.
                    pair.resuming = True
                    self.resumable.append(pair)
        if flags & ACK and pair.fin_seq[o] is not None and not pair.fin_acked[o]:
            # The ack is in this side's view of the other's sequence space; translated it
            # is in the other sender's own space, where its FIN was recorded.
            if seq.gt(seq.add(v.ack, tr.ack_delta), pair.fin_seq[o]):
                pair.fin_acked[o] = True
                if pair.fin_acked[d]:
                    self._closing(pair)
        if not v.window and not flags & (SYN | RST):
            self.counters[_ZERO_WINDOW_NAMES[d]] += 1
        limit = self.window_limit(pair, o)
        # A packet the engine forwards while the program forwards the pair's others
        # (it waited in the queue since before the flows turned fast, or was punted) may
        # be older than some of those: its TSval is raised to the newest the program
        # sent, or the receiver's PAWS drops it (a real loss when it carries data:
        # ~1 per spliced response under 50 connections, each resent after a dupack).
        floor = None
        if isinstance(pair.fast_sig, tuple) and self.fast_tsval is not None and v.doff > 20:
            floor = self.fast_tsval(v.key())
        w = packet.rewrite(v, tr, csum_partial, limit, floor)
        if flags & ACK:
            edge = seq.add(v.ack, tr.ack_delta + (w << tr.win_shift_out))
            if pair.win_edge[d] is None or seq.gt(edge, pair.win_edge[d]):
                pair.win_edge[d] = edge
        self.counters["checksum.full" if csum_partial else "checksum.incremental"] += 1
        pair.packets[d] += 1
        pair.bytes[d] += plen
        c = self.counters
        c[_PKT_NAMES[d]] += 1
        c[_BYTE_NAMES[d]] += plen
        if truncated and not pair.reset:
            self._reset_both(pair, "truncated_message")
        return v

    def _learn_tsval(self, pair: Pair, d: int, v: TCPView) -> None:
        """The first timestamped packet from side D after the splice: its TSval goes on
        one past the last TSval the receiver saw from the proxy's socket (the frozen
        one we pose as, silent since it was frozen), the other direction's TSecr is
        translated back with the same offset and floored at this TSval."""
        tsv = _tsval(v)
        if tsv is None:
            return
        goes = pair.frozen[1] if d == C2S else pair.frozen[0]
        delta = seq.diff(seq.add(goes.ts_now, 1), tsv)
        pair.tr[d].tsval_delta = delta
        pair.tr[1 - d].tsecr_delta = -delta
        pair.tr[1 - d].tsecr_floor = tsv
        pair.tsval[d] = tsv
        pair.ts_pending[d] = False
        self.counters["pairs.tsval_learnt_late"] += 1

    def _cut_at_end(self, pair: Pair, d: int, v: TCPView, over: int, kept: bool = False) -> TCPView:
        """Nothing past a direction's message end is forwarded (an HTTP body spliced with
        its exact length): the payload beyond it is cut off and a FIN that would follow
        it dropped; what the segment acknowledges still goes on.  Past a tentative end
        (chunked framing not scanned yet: the segment holding it was lost or comes out
        of order) the cut is no overrun: the receiver never acknowledges those bytes,
        so the sender sends them again, and by then the end has moved on.  KEPT (the
        cut bytes are a next message, copied for the rebuilt socket): counted as
        held.next_message_bytes, not dropped."""
        c = self.counters
        plen = v.payload_len
        cut = min(over, plen)
        flags = v.flags
        if over > plen or (over and flags & FIN) or (flags & FIN and not pair.end_fin[d]):
            flags &= ~FIN
        if cut and not pair.end_final[d]:
            c["chunked.cut_ahead_bytes"] += cut
            c["chunked.cut_ahead"] += 1
        elif cut and kept:
            # The next message, its copy kept for the rebuilt socket (process): cut
            # from the splice, not lost.
            c["held.next_message_bytes"] += cut
            pair.overrun = True
        elif cut:
            c["dropped.beyond_message_bytes"] += cut
            c["trimmed.beyond_message"] += 1
            pair.overrun = True
        if flags != v.flags:
            c["dropped.beyond_message_fin"] += 1
        n = len(v.buf) - cut
        b = v.buf
        b[v.t + 13] = flags
        struct.pack_into("!H", b, 2, n)
        self.trimmed = n
        return TCPView(b[:n])

    def _cut_to_a_segment(self, pair: Pair, d: int, plen: int, v: TCPView) -> bool:
        """Was V, cut at a message end from PLEN payload bytes, a GSO packet that is now
        one segment or less?  The kernel drops such a packet once its verdict re-sets
        the payload (the checksum state becomes "none", and segmenting a GSO packet no
        longer than its gso_size fails), so the receiver would get the bytes before the
        end only by a retransmission, after an RTO.  Then a copy of V is sent instead
        (injected) and the caller drops the queued packet: True.  The gso_size is not
        in the queue's metadata; a packet longer than the outgoing connection's MSS
        cannot be a single segment, and what is left then fits one."""
        st = pair.frozen[0 if d == S2C else 1] if pair.frozen else None
        if st is None or not st.mss or plen <= st.mss or v.payload_len > st.mss:
            return False
        self.injected.append(bytearray(v.buf))
        self.counters["cut.reinjected"] += 1
        return True

    def _follow(self, pair: Pair, d: int, v: TCPView) -> bool:
        """Chunked framing in direction D: when V's payload holds the direction's
        tentative end, scan it from there (the chunk-data before it was forwarded
        unread, maybe by the fast path) and move the end on: to where the next
        chunk-data ends, to the next byte to scan, or, once the last chunk and the
        trailer section went by, to the final message end.  A packet wholly before the
        tentative end needs nothing; one wholly past it is cut (`_cut_at_end`).

        Malformed framing is the sender's fault: counted (`chunked.malformed`), the
        end stays where this packet's scan began (nothing from there on reaches the
        receiver) and True is returned: the caller resets both sides once the packet
        went on (a RST ahead of the bytes before the end would be ignored, RFC 5961),
        so the receiver holds a truncated message, never a complete-looking one."""
        plen = v.payload_len
        if not plen:
            return False
        f = pair.follow[d]
        k = seq.diff(pair.end_seq[d], v.seq)
        if k < 0 or k >= plen:
            return False
        sc = f.scanner
        c = self.counters
        c["chunked.scanned"] += 1
        try:
            if sc.data_end is not None:
                sc.advance(sc.data_remaining)
            n = sc.feed(v.payload()[k:])
        except PeerError:
            c["chunked.malformed"] += 1
            pair.follow[d] = None
            return True
        if sc.done:
            pair.end_seq[d] = seq.add(v.seq, k + n)
            pair.end_final[d] = True
            pair.follow[d] = None
            c["chunked.ends"] += 1
        else:
            pair.end_seq[d] = f.position()
        return False

    def _closing(self, pair: Pair) -> None:
        if pair.state < State.CLOSING:
            pair.state = State.CLOSING
            pair.closing_since = pair.last_seen
            if self.fast:
                self._fast_check(pair)

    # -- the fast path -----------------------------------------------------------------------
    def window_limit(self, pair: Pair, o: int) -> int | None:
        """How far (in the receiver's sequence space) windows offered for direction O's
        bytes may reach: O's message end + NEXT_MESSAGE_WINDOW for a pair that resumes,
        with the fast path; None: no limit.  What the sender sends past the end waits in
        the proxy's rebuilt socket until the proxy reads a head, so a next body that
        arrived whole could not be spliced (the program cuts the same, F_LIMIT).  Without
        the fast path a splice costs more than the proxy's copy of a body that did arrive
        whole."""
        if self.fast and pair.resumable and pair.end_seq[o] is not None and pair.end_final[o]:
            return seq.add(pair.end_seq[o], NEXT_MESSAGE_WINDOW)
        return None

    def fast_signature(self, pair: Pair) -> tuple | str | None:
        """What the pair's flows in the fast path must say: None, no flows (the fast
        path is off or the pair is gone); "queue", flows that only mark the pair's
        packets for the rules (the engine handles every one); "handoff", the same but
        pure ACKs pass unmarked (in HANDOFF the engine only lets them through); or per direction
        (message end, acknowledgement watch, tap) for flows the program forwards itself.
        A chunked direction's end is its tentative one: the program punts the packet
        holding the next framing bytes, so the engine scans it, and the flows are
        written again each time the end moves; only a final end is watched.
        Only a plainly spliced pair is fast; a hand-off, a message end or FIN being
        acknowledged, a reset, an overrun and a resume are not, nor a pair with a tap
        unless the program can tap (fast_tap)."""
        if not self.fast or pair.state == State.DONE:
            return None
        if pair.state == State.HANDOFF:
            return "handoff"
        if pair.state != State.SPLICED or pair.resuming or pair.reset or any(pair.ts_pending) \
                or pair.overrun or pair.message_done is not None or pair.held \
                or pair.fin_seq[C2S] is not None or pair.fin_seq[S2C] is not None \
                or (not self.fast_tap and (pair.tap[C2S] is not None or pair.tap[S2C] is not None)):
            return "queue"
        sig = []
        for d in (C2S, S2C):
            o = 1 - d
            watch = (pair.end_seq[o] if pair.end_seq[o] is not None and pair.end_final[o]
                     and not pair.end_acked[o] else None)
            sig.append((pair.end_seq[d], watch, pair.tap[d] is not None))
        return tuple(sig)

    def _fast_check(self, pair: Pair) -> None:
        sig = self.fast_signature(pair)
        if sig != pair.fast_sig:
            pair.fast_sig = sig
            self.fast_ops.append(pair)

    def fast_progress(self, pair: Pair, d: int, packets: int, nbytes: int, last_seen: float,
                      next_seq: int, final: bool) -> None:
        """Count what the fast path forwarded for direction D (totals since its counters
        were created: they outlive rewrites of the flow); FINAL: the counters are gone,
        the next ones count from zero."""
        seen_p, seen_b = pair.fast_seen[d]
        dp, db = packets - seen_p, nbytes - seen_b
        pair.fast_seen[d] = (0, 0) if final else (packets, nbytes)
        if dp <= 0:
            return
        pair.packets[d] += dp
        pair.bytes[d] += db
        c = self.counters
        c[_PKT_NAMES[d]] += dp
        c[_BYTE_NAMES[d]] += db
        if last_seen > pair.last_seen:
            pair.last_seen = last_seen
        if pair.next_seq[d] is None or seq.gt(next_seq, pair.next_seq[d]):
            pair.next_seq[d] = next_seq
            pair.progress_at = max(pair.progress_at, last_seen)

    def _note_handshake(self, key: bytes, v: TCPView, now: float | None) -> None:
        try:
            if v.flags & SYN:
                self.syns[key] = _SynRecord(packet.syn_options(v), _tsval(v),
                                            self.clock() if now is None else now)
            else:
                ts = _tsval(v)
                if ts is not None:
                    self.syns[key].tsval = ts
        except Malformed as e:
            self.counters["malformed." + e.reason] += 1

    def _prepair(self, key: bytes, v: TCPView, now: float | None) -> None:
        """A SYN to the L4 listener: hold the client's payload from its first byte, so the
        proxy socket never receives any and the hand-off has nothing to drain."""
        now = self.clock() if now is None else now
        client = Endpoint(key[0:4], struct.unpack("!H", key[8:10])[0])
        listen = Endpoint(key[4:8], struct.unpack("!H", key[10:12])[0])
        pre = Pair(client, listen, None, None, id=next(self._ids), created=now, last_seen=now)
        try:
            pre.syn[C2S] = packet.syn_options(v)
        except Malformed as e:
            self.counters["malformed." + e.reason] += 1
        pre.tsval[C2S] = _tsval(v)
        self.flows[key] = (pre, C2S)
        self.pairs[pre.id] = pre
        self.counters["pairs.embryonic"] += 1

    # -- pairs: called by the proxy (through the runner) -----------------------------------
    def register(self, pair: Pair, now: float | None = None) -> Pair:
        """Start the hand-off: from now on the pair's payload packets are held.

        If the engine already holds the client's side since its SYN (L4 listener), the
        embryonic pair's held packets and handshake facts move over to PAIR."""
        now = self.clock() if now is None else now
        pair.id = next(self._ids)
        pair.state = State.HANDOFF
        pair.created = pair.last_seen = now
        pre = self.flows.get(pair.in_keys()[C2S])
        if pre is not None and pre[0].server is None:
            pre = pre[0]
            pair.held, pair.syn[C2S], pair.tsval[C2S] = pre.held, pre.syn[C2S], pre.tsval[C2S]
            pair.created = pre.created
            del self.flows[pair.in_keys()[C2S]]
            self.pairs.pop(pre.id, None)
        for d, key in enumerate(pair.in_keys()):
            other = self.flows.get(key)
            if other is not None:
                raise ValueError(f"{pair.describe()}: flow already owned by pair {other[0].id}")
            rec = self.syns.pop(key, None)
            if rec is not None:
                pair.syn[d] = rec.options
                pair.tsval[d] = rec.tsval
        for d, key in enumerate(pair.in_keys()):
            self.flows[key] = (pair, d)
        for key in pair.out_keys():
            self.out_flows[key] = pair
        self.pairs[pair.id] = pair
        if self.tap is not None:
            for d in (C2S, S2C):
                pair.tap[d] = self.tap.open(f"pair-{pair.id}-{DIRECTION_NAMES[d]}",
                                            {"pair": pair.id, "direction": DIRECTION_NAMES[d],
                                             "flow": pair.describe()})
        self.counters["pairs.registered"] += 1
        if self.fast:
            self._fast_check(pair)
        return pair

    def splice(self, pair: Pair, a: SocketState, b: SocketState, *, copied=(0, 0),
               finished=(False, False), limits=(None, None), end_fin=(True, True),
               resume: bool = False) -> list[tuple[object, Decision, bytearray]]:
        """Finish the hand-off with the frozen sockets' numbers; return the held packets'
        verdicts (in arrival order).  COPIED: bytes the proxy moved itself per direction
        before the splice; FINISHED: directions whose FIN the proxy already passed on.
        LIMITS: per direction, how many more bytes belong to the message being spliced
        (None: until FIN); nothing past them is forwarded.  END_FIN: per direction,
        whether a FIN right at that end may pass (the connection ends with the message).

        A limit may instead be a `http1.ChunkedScanner` (either direction: upstream=True
        for a response body, False for a request body) positioned at the first byte the
        engine will forward, i.e. fed everything the proxy copied or drained.  The
        engine then owns it until the pair is resumed or forgotten, and follows the
        chunked framing in the sender's sequence space: the end is tentative (where the
        current chunk-data ends, or the next framing byte) until the last chunk and the
        trailer section have gone by; every packet holding framing bytes is scanned,
        chunk-data is forwarded unread (by the fast path too).  Bytes past a tentative
        end (a lost or reordered segment) are cut without counting as an overrun; only
        the final end is acknowledged, resumed at (RESUME) and cut at like a byte
        count.  Malformed framing resets both sides (`chunked.malformed`).  A scanner
        already `done` is a limit of 0.  After a resume, the scanner's `offset` is the
        body's length on the wire."""
        if pair.state != State.HANDOFF:
            raise ValueError(f"{pair.describe()}: splice in state {pair.state.name}")
        ts_on = a.timestamps and b.timestamps
        if a.timestamps != b.timestamps:
            self.counters["pairs.timestamps_mismatch"] += 1
        # S2C: origin -> client, re-sent as if from the proxy's socket A.  A side whose
        # current TSval the engine has not seen (its packets were not queued before the
        # hand-off) gets its offset from its first packet after the splice (ts_pending).
        pair.ts_pending = [ts_on and pair.tsval[d] is None for d in (C2S, S2C)]
        # The offset maps the oldest TSval among the packets it will translate (the
        # first one held, else the newest seen: later ones are newer still) to one past
        # the frozen socket's last, so none comes out below what the receiver saw from
        # that socket (PAWS would drop it).
        ref = [pair.ts_ref[d] if pair.ts_ref[d] is not None else pair.tsval[d] for d in (C2S, S2C)]
        s2c_ts = seq.diff(seq.add(a.ts_now, 1), ref[S2C]) if ts_on and not pair.ts_pending[S2C] else 0
        c2s_ts = seq.diff(seq.add(b.ts_now, 1), ref[C2S]) if ts_on and not pair.ts_pending[C2S] else 0
        pair.tr[C2S] = _translation(pair.proxy_b, pair.server, a, b, c2s_ts, s2c_ts,
                                    pair.tsval[S2C] if ts_on else None)
        pair.tr[S2C] = _translation(pair.proxy_a, pair.client, b, a, s2c_ts, c2s_ts,
                                    pair.tsval[C2S] if ts_on else None)
        pair.frozen = (a, b)
        pair.end_fin = list(end_fin)
        pair.resumable = resume and any(x is not None for x in limits)
        pair.spliced_at = pair.progress_at = self.clock()
        for d, limit in enumerate(limits):
            rcv = a.rcv_seq if d == C2S else b.rcv_seq
            if limit is None:
                continue
            if isinstance(limit, int):
                pair.end_seq[d] = seq.add(rcv, limit)
            elif limit.done:
                pair.end_seq[d] = rcv
            else:
                f = pair.follow[d] = Follower(limit, seq.add(rcv, -limit.offset))
                pair.end_seq[d] = f.position()
                pair.end_final[d] = False
            if pair.end_seq[d] == rcv and pair.end_final[d]:
                # Nothing of this direction is left to splice (a response's request), and
                # its receiver acknowledged everything before the freeze (the drain waits
                # for both send queues): the end is acknowledged already.  Left to be
                # seen, it was watched for, and every packet of the other direction (all
                # carry that acknowledgement) was punted until the engine had read one;
                # the program then overtook those still in the queue, and the reordering
                # cost a spurious retransmission of each overtaken 64 KiB segment.
                pair.end_acked[d] = True
        # Stream offsets for the tap: the receiving proxy socket's rcv_nxt is where the
        # spliced bytes start; the proxy itself moved `copied` bytes before that.
        # A FIN the socket already took occupies one sequence number but no stream byte.
        pair.tap_base[C2S] = (a.rcv_seq, copied[C2S] + (1 if finished[C2S] else 0))
        pair.tap_base[S2C] = (b.rcv_seq, copied[S2C] + (1 if finished[S2C] else 0))
        for d, done in enumerate(finished):
            if done:
                rcv = a.rcv_seq if d == C2S else b.rcv_seq
                pair.fin_seq[d] = seq.add(rcv, -1)
                pair.fin_acked[d] = True
        pair.state = State.SPLICED
        self.counters["pairs.spliced"] += 1
        if self.splice_log is not None:
            self.splice_log(splice_record(pair, a, b, copied, finished, limits))
        if finished[C2S] and finished[S2C]:
            self._closing(pair)
        out = self._release(pair, rewrite=True)
        if self.window_updates and not finished[S2C] and pair.state == State.SPLICED \
                and not pair.ts_pending[S2C]:
            # (With the origin's TSval unknown, its answer would go through the queue
            # until the engine learnt it; a burst there costs more than the stall.)
            wu, wnd = _window_update(pair, a, b, ts_on, self.fast, self.window_limit(pair, S2C))
            self.injected.append(wu)
            self.counters["injected.window_update"] += 1
            edge = seq.add(b.rcv_seq, wnd << b.rcv_wscale)
            if pair.win_edge[C2S] is None or seq.gt(edge, pair.win_edge[C2S]):
                pair.win_edge[C2S] = edge
        if self.fast:
            self._fast_check(pair)
        return out

    def abort(self, pair: Pair, reason: str) -> list[tuple[object, Decision, bytearray]]:
        """Give the pair back to the proxy (no splice): held packets go on unchanged."""
        self.counters["pairs.fallback." + reason] += 1
        out = self._release(pair, rewrite=False)
        self._forget(pair, reason=None)
        return out

    def _release(self, pair: Pair, rewrite: bool) -> list[tuple[object, Decision, bytearray]]:
        out = []
        held, pair.held = pair.held, []
        for h in held:
            if not rewrite:
                out.append((h.handle, Decision.ACCEPT, h.buf))
                continue
            v = TCPView(memoryview(h.buf))
            self.trimmed = None
            broken = pair.follow[h.direction] is not None and self._follow(pair, h.direction, v)
            plen = v.payload_len
            v = self._forward(pair, h.direction, v, h.csum_partial)
            decision = Decision.MANGLE
            if self.trimmed is not None:
                self.trimmed = None
                if self._cut_to_a_segment(pair, h.direction, plen, v):
                    decision = Decision.DROP
                else:
                    h.buf = h.buf[:len(v.buf)]    # (the view above still exports h.buf)
            out.append((h.handle, decision, h.buf))
            if broken:
                self._reset_both(pair, "chunked_malformed")
        self.counters["released"] += len(held)
        return out

    def tick(self, now: float | None = None) -> list[tuple[object, Decision, bytearray]]:
        """Timers: forget pairs that lingered or idled out, expire handshake records.
        Returns verdicts for packets of pairs whose hand-off timed out."""
        now = self.clock() if now is None else now
        out = []
        for pair in list(self.pairs.values()):
            if pair.state == State.HANDOFF:
                if now - pair.created > self.handoff_timeout:
                    out += self.abort(pair, "handoff_timeout")
            elif pair.state == State.CLOSING:
                if now - (pair.closing_since or now) >= self.linger:
                    self._forget(pair, "closed" if not pair.reset else "reset")
            elif pair.resuming:
                if now - pair.message_done > self.handoff_timeout:
                    # The proxy never took the connections back: end them.
                    out += [(h.handle, Decision.DROP, h.buf) for h in pair.held]
                    pair.held = []
                    pair.resuming = False
                    self._reset_both(pair, "resume_timeout")
            elif (self.inactivity_timeout is not None and pair.message_done is None
                  and now - pair.progress_at > self.inactivity_timeout):
                # Packets may still pass (zero-window probes, ACKs) but no byte moved:
                # the pair must not be held forever.  A RST each way; the client sees a
                # truncated message.
                self._reset_both(pair, "inactivity", stalled=True)
            elif pair.resumable and pair.message_done is None:
                if now - pair.last_seen > self.idle_timeout:
                    self._forget(pair, "idle_timeout")
            elif pair.message_done is not None and (
                    pair.overrun or now - pair.message_done > self.message_close_timeout):
                # The message was delivered whole, but the connection does not end by
                # itself: the origin sent more than the message (what it sent past the
                # end was cut) or neither side closes.  Both get a RST.
                self._reset_both(pair, "overrun" if pair.overrun else "message_done_timeout")
            elif now - pair.last_seen > self.idle_timeout:
                self._forget(pair, "idle_timeout")
        if self.syns:
            stale = [k for k, r in self.syns.items() if now - r.seen > 60.0]
            for k in stale:
                del self.syns[k]
        return out

    def resume_numbers(self, pair: Pair) -> tuple[SocketState, SocketState]:
        """The states the proxy's two sockets must have to carry on after the spliced
        message: sequence numbers advanced by what the engine forwarded, timestamps
        ahead of anything the peers saw from either side (PAWS only rejects older)."""
        if not pair.resuming:
            raise ValueError(f"{pair.describe()}: not at a message end")
        a, b = pair.frozen
        rcv = [pair.end_seq[d] if pair.end_seq[d] is not None else (pair.next_seq[d] or st.rcv_seq)
               for d, st in ((C2S, a), (S2C, b))]
        elapsed_ms = int((self.clock() - pair.spliced_at) * 1000) + 1000
        # Each rebuilt socket offers exactly as far as its peer was ever offered: by the
        # frozen socket itself (rcv_wup + rcv_wnd), by the window update at the splice
        # and by the other side's translated ACKs.  Never less: the peer may send up to
        # that edge at once, and a socket offering less drops what is past its own
        # window (an RTO, ~200 ms, for the next response after every resume).  No more
        # either: the frozen socket's window counted from the message end let a whole
        # next body into the rebuilt socket before the proxy had read its head.  The
        # rebuilt socket announces its own window as soon as it is live.
        win = []
        for st, d, rcv_seq in ((a, S2C, rcv[C2S]), (b, C2S, rcv[S2C])):
            w = st.window
            if w:
                top = seq.add(w[4], w[3])
                edge = pair.win_edge[d]
                if edge is not None and seq.gt(edge, top):
                    top = edge
                # As far as the limit reaches: the program offered up to it in ACKs
                # whose copies came too late to be counted (watch copies).
                cap = self.window_limit(pair, 1 - d)
                if cap is not None and seq.gt(cap, top):
                    top = cap
                w = (w[0], w[1], w[2], max(0, seq.diff(top, rcv_seq)), w[4])
            win.append(w)
        a2 = SocketState(seq.add(rcv[S2C], pair.tr[S2C].seq_delta), rcv[C2S], a.snd_wscale, a.rcv_wscale,
                         a.timestamps, seq.add(a.ts_now, elapsed_ms), a.sack, a.mss, win[0])
        b2 = SocketState(seq.add(rcv[C2S], pair.tr[C2S].seq_delta), rcv[S2C], b.snd_wscale, b.rcv_wscale,
                         b.timestamps, seq.add(b.ts_now, elapsed_ms), b.sack, b.mss, win[1])
        return a2, b2

    def finish_resume(self, pair: Pair) -> list[tuple[object, Decision, bytearray]]:
        """The proxy's rebuilt sockets own both connections again: forget the pair and
        let what was held go on unchanged, to them."""
        out = [(h.handle, Decision.ACCEPT, h.buf) for h in pair.held]
        pair.held = []
        pair.resuming = False
        self.counters["pairs.resumed"] += 1
        self._forget(pair, None)
        return out

    def _reset_both(self, pair: Pair, why: str, stalled: bool = False) -> None:
        """End a spliced pair with a RST to each side, in each side's sequence space.
        STALLED: a receiver may not have taken what was sent; each RST is followed by
        an ACK, whose answer gets the receiver reset all the same (below)."""
        for d in (C2S, S2C):
            tr = pair.tr[d]
            st = pair.frozen[1] if d == C2S else pair.frozen[0]   # the socket we pose as
            nxt = pair.next_seq[d]
            if pair.fin_seq[d] is not None and (nxt is None or seq.ge(pair.fin_seq[d], nxt)):
                nxt = seq.add(pair.fin_seq[d], 1)      # (a FIN takes one sequence number)
            # The message's end only caps: with nothing forwarded yet (the origin stalled
            # right after the hand-off) the receiver is at the frozen socket's number,
            # and a RST beyond its window would be ignored.
            if pair.end_seq[d] is not None and nxt is not None and seq.gt(nxt, pair.end_seq[d]):
                nxt = pair.end_seq[d]
            rst_seq = seq.add(nxt, tr.seq_delta) if nxt is not None else st.snd_seq
            self.injected.append(packet.build(tr.src, tr.dst, tr.sport, tr.dport, rst_seq, 0, RST,
                                              window=0))
            if stalled and pair.next_seq[1 - d] is not None:
                # A receiver that has not taken every byte sent (a client that reads
                # nothing: its window closed) drops that RST, outside its window.  This
                # ACK at the same seq makes it answer with a duplicate ACK at its window's
                # start, which `process` answers with the RST it takes (answer_rst).
                self.injected.append(packet.build(tr.src, tr.dst, tr.sport, tr.dport, rst_seq,
                                                  pair.next_seq[1 - d], ACK, window=0))
        self.counters["pairs.reset_by_engine." + why] += 1
        pair.reset = True
        pair.answer_rst = pair.answer_rst or stalled
        self._closing(pair)
        pair.closing_since = self.clock() if pair.closing_since is None else pair.closing_since

    def _forget(self, pair: Pair, reason: str | None) -> None:
        if pair.fast_sig is not None:
            pair.fast_sig = None
            self.fast_ops.append(pair)
        for key in pair.in_keys():
            if self.flows.get(key, (None,))[0] is pair:
                del self.flows[key]
        for key in pair.out_keys():
            if self.out_flows.get(key) is pair:
                del self.out_flows[key]
        self.pairs.pop(pair.id, None)
        if reason is not None:
            self.counters["pairs.done." + reason] += 1
        for d in (C2S, S2C):
            sink = pair.tap[d]
            if sink is not None:
                sink.close(self.stream_length(pair, d))
        pair.state = State.DONE
        if reason is not None:   # an aborted hand-off stays with the proxy that owns it
            self.forgotten.append(pair)

    @staticmethod
    def stream_length(pair: Pair, d: int) -> int | None:
        """Bytes in direction D from the first byte to the FIN, or to the message end
        the receiver acknowledged (a resumed pair); None: no end seen."""
        base_seq, base_off = pair.tap_base[d]
        if pair.fin_seq[d] is None or pair.reset and not pair.fin_acked[d]:
            if pair.end_seq[d] is not None and pair.end_acked[d] and not pair.reset:
                return base_off + seq.diff(pair.end_seq[d], base_seq)
            return None
        return base_off + seq.diff(pair.fin_seq[d], base_seq)

    @staticmethod
    def forwarded_length(pair: Pair, d: int) -> int:
        """Bytes in direction D from the first byte as far as they went: to the end
        `stream_length` knows, else (a reset, an inactivity timeout) to the highest byte
        the engine saw from the sender, which the receiver may not have got."""
        n = Engine.stream_length(pair, d)
        if n is not None:
            return n
        base_seq, base_off = pair.tap_base[d]
        if pair.next_seq[d] is None:
            return base_off
        return base_off + max(0, seq.diff(pair.next_seq[d], base_seq))

    def stats(self) -> dict:
        out = dict(self.counters)
        out["pairs.active"] = len(self.pairs)
        out["pairs.handoff"] = sum(1 for p in self.pairs.values() if p.state == State.HANDOFF)
        out["held.now"] = sum(len(p.held) for p in self.pairs.values())
        now = self.clock()
        out["pairs.oldest"] = [f"{p.describe()} {p.state.name} idle {now - p.last_seen:.1f}s"
                               for p in heapq.nsmallest(10, self.pairs.values(), key=lambda p: p.last_seen)]
        return out


def tap_payload(pair: Pair, d: int, first_seq: int, payload) -> None:
    """Hand PAYLOAD (sequence FIRST_SEQ in direction D's sender space) to the pair's
    tap sink at its stream offset.  The engine calls it for packets it forwards, the
    runner for the fast path's tap records."""
    base_seq, base_off = pair.tap_base[d]
    off = seq.diff(first_seq, base_seq)
    if off < 0:   # a retransmission reaching back before the splice point
        payload = payload[-off:]
        off = 0
    if len(payload):
        pair.tap[d].write(base_off + off, payload)


def _endpoint_str(e: Endpoint) -> str:
    return ".".join(map(str, e.ip)) + f":{e.port}"


def endpoint_from_str(text: str) -> Endpoint:
    host, _, port = text.rpartition(":")
    return Endpoint(bytes(int(x) for x in host.split(".")), int(port))


def splice_record(pair: Pair, a: SocketState, b: SocketState, copied, finished,
                  limits=(None, None)) -> dict:
    """Everything `splice()` used, as JSON-able data: replay and tests rebuild the exact
    translation from it (`pair_from_record`).  The message ends (LIMITS: a byte count,
    None, or "chunked" for a scanner) are recorded for the reader; replay does not
    apply them (see replay.py)."""
    return {"pair": pair.id, "client": _endpoint_str(pair.client), "proxy_a": _endpoint_str(pair.proxy_a),
            "proxy_b": _endpoint_str(pair.proxy_b), "server": _endpoint_str(pair.server),
            "a": a.__dict__.copy(), "b": b.__dict__.copy(), "copied": list(copied),
            "finished": list(finished), "tsval": list(pair.tsval), "ts_ref": list(pair.ts_ref),
            "limits": [x if x is None or isinstance(x, int) else "chunked" for x in limits],
            "window_update": True, "time": time.time()}


def pair_from_record(rec: dict) -> tuple[Pair, SocketState, SocketState]:
    pair = Pair(endpoint_from_str(rec["client"]), endpoint_from_str(rec["proxy_a"]),
                endpoint_from_str(rec["proxy_b"]), endpoint_from_str(rec["server"]))
    return pair, SocketState(**rec["a"]), SocketState(**rec["b"])


def _translation(src: Endpoint, dst: Endpoint, came: SocketState, goes: SocketState,
                 tsval_delta: int, back_delta: int, tsecr_floor: int | None) -> Translation:
    """Packets that arrived on the connection of socket CAME leave as if sent by socket
    GOES, from SRC to DST: their sequence numbers continue GOES's send sequence where
    CAME's receive sequence stood, their acknowledgements GOES's receive sequence where
    CAME had sent up to; windows go from the sender's scale (CAME's snd_wscale) to the
    one GOES announced.  TSecr echo the other direction's translated TSval: undone."""
    return Translation(src.ip, dst.ip, src.port, dst.port,
                       seq_delta=seq.diff(goes.snd_seq, came.rcv_seq),
                       ack_delta=seq.diff(goes.rcv_seq, came.snd_seq),
                       win_shift_in=came.snd_wscale, win_shift_out=goes.rcv_wscale,
                       tsval_delta=tsval_delta, tsecr_delta=-back_delta, tsecr_floor=tsecr_floor)


def _whole(buf, v: TCPView, csum_partial: bool) -> bytearray:
    """A copy of BUF that can be sent as it is: a partial checksum (a GSO or locally
    made packet) summed in full."""
    out = bytearray(buf)
    if csum_partial:
        struct.pack_into("!H", out, v.t + 16, packet.checksum.full_tcp(v.src, v.dst, memoryview(out)[v.t:], 16))
    return out


def _window_update(pair: Pair, a: SocketState, b: SocketState, ts_on: bool, fast: bool,
                   limit: int | None) -> tuple[bytearray, int]:
    """A pure ACK to the origin, as from socket B, announcing the client's window.

    The hand-off waited until the client had acknowledged everything socket A sent it,
    so no client packet may follow for a while; an origin that had filled B's receive
    window (the proxy stopped reading after the head) would wait for its persist timer,
    200 ms or more, before it learns the window is open again.  The window is the
    client's as A last saw it, in the scale B announced, cut at LIMIT (Engine.window_limit).
    Returns the packet and its window field.  TSval one past B's last (the
    translation of the offset's reference, the oldest client packet the engine will
    translate), or with FAST the client's newest, translated: the
    update goes out after the flows turn fast, so a client ACK the program forwards may
    reach the origin first, and with B's last + 1 the update was then older by the
    milliseconds the client's clock had run since the reference and PAWS dropped it.
    Without the fast path every client packet goes through the engine, some still
    queued behind the newest it knows: an update that new made PAWS drop those."""
    wnd = max(1, min(a.window[1] >> b.rcv_wscale if a.window else 0xFFFF, 0xFFFF))
    if limit is not None:
        wnd = packet.limit_window(wnd, b.rcv_wscale, b.rcv_seq, limit)
    tsval = seq.add(b.ts_now, 1)
    if fast and pair.tsval[C2S] is not None and not pair.ts_pending[C2S]:
        tsval = seq.add(pair.tsval[C2S], pair.tr[C2S].tsval_delta)
        if seq.lt(tsval, seq.add(b.ts_now, 1)):
            tsval = seq.add(b.ts_now, 1)
    opts = packet.timestamp_option(tsval, pair.tsval[S2C] or 0) if ts_on else b""
    return packet.build(pair.proxy_b.ip, pair.server.ip, pair.proxy_b.port, pair.server.port,
                        b.snd_seq, b.rcv_seq, ACK, window=wnd, options=opts), wnd


def _prefreeze(pair: Pair, key: bytes, v: TCPView) -> str | None:
    """What a frozen socket of PAIR queued before it was frozen looks like: "ack", a
    pure ACK with exactly the socket's send sequence; "data", bytes wholly before that
    sequence (a retransmission: the socket's send queue was empty at the freeze, all of
    it acknowledged).  Either acknowledges no more than the socket had received.  None:
    anything else from a frozen socket is new and must not leave."""
    if pair.frozen is None or v.flags & ~(ACK | PSH) or not v.flags & ACK:
        return None
    st = pair.frozen[0] if key == pair.out_keys()[0] else pair.frozen[1]
    if not seq.le(v.ack, st.rcv_seq):
        return None
    if not v.payload_len:
        return "ack" if v.seq == st.snd_seq and v.flags == ACK else None
    return "data" if seq.le(seq.add(v.seq, v.payload_len), st.snd_seq) else None


def _tsval(v: TCPView) -> int | None:
    if v.doff <= 20:
        return None
    o = v.options().get(packet.OPT_TIMESTAMP)
    if o is None:
        return None
    return _TS.unpack_from(v.buf, o + 2)[0]
