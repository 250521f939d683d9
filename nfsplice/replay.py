"""Pcap replay: the live engine's rewrite path, run offline on captured packets.

One rewrite path (STYLE.md): every packet goes through `Engine.process()`, pairs are
registered with `Engine.register()` and spliced with `Engine.splice()`, exactly as the
live runner and the L4 proxy do; handles are the packets' indices in the pcap, the
clock is the pcap's timestamps (timeouts and lingering are deterministic).

Which captured packets are inputs
---------------------------------
A capture taken in the proxy's namespace on both of its links holds each spliced packet
twice: as it arrived (addressed to a proxy address) and as it left (rewritten,
forwarded).  It also holds what the proxy's own sockets sent (handshakes), and with
``tcpdump -i any`` whatever went over loopback (the engine's injected ACKs).

  - loopback frames (ARPHRD_LOOPBACK in a Linux cooked header): skipped.  They never
    leave the host; the injected ACKs among them are the engine's output, not input.
  - arriving packets (cooked header packet type other than PACKET_OUTGOING; without a
    cooked header: destination is a proxy address) go to the engine at PRE_ROUTING.
  - leaving packets (PACKET_OUTGOING; or source a proxy address, destination not) are
    either the proxy's own (fed at LOCAL_OUT) or forwarded copies (ignored: they are
    the expected output).  A packet on a connection of a pair that replay has already
    spliced is a forwarded copy: from the splice on the engine drops everything the
    frozen proxy sockets send, so none of theirs can reach the capture (tcpdump sees
    outgoing packets after the OUTPUT hook).  Everything else the proxy sent is its own.

Pairs and splice points
-----------------------
With pair records (the JSON lines `nfsplice tcp --pairs-log` writes, `splice_record()`)
each pair is registered when the proxy's first SYN for its upstream connection B
appears (live, the proxy registers the pair and then connects) and spliced right after
the proxy's ACK that completes B's handshake (live, the splice follows the end of the
upstream handshake within a millisecond or so).  If the capture lacks that ACK (the
engine may have been spliced before the ACK reached the queue, and then dropped it),
the splice comes right after the origin's SYN-ACK.  The recorded socket states, bytes
copied, directions finished and last TSvals are used as they are: the translation is
the live one, exactly.  Message ends are not replayed: a record's `limits` (an HTTP
body's remaining length, or "chunked" when the engine followed chunked framing, whose
scanner state is not recorded) are there for the reader; a pair is replayed as spliced
until FIN, so the cuts at an end and a resume are the live run's only.

Without records the pairs are learned from the handshakes, and `ReplayResult.guessed`
says so.  An upstream connection belongs to the client connection whose payload it
carries at the same stream offset (the forwarded copies in the capture; concurrent
connections do not reach the upstream connect in accept order); without such evidence,
to the earliest client connection (by SYN order) whose handshake completed before the
upstream SYN and that has no pair yet (and a note says so).  A's
sequence numbers come from the client's SYN and the proxy's SYN-ACK, B's from the
proxy's SYN and the origin's SYN-ACK, window scales and timestamps from the SYN
options, and each socket's TCP_TIMESTAMP from the last TSval it sent plus one.  That is
right for the L4 proxy when it copied nothing itself; TSvals may differ by a few.

Checksums: a captured checksum field may hold only the pseudo-header sum (the kernel
leaves locally generated and veth-crossing packets CHECKSUM_PARTIAL, and tcpdump sees
them before anything completes the sum).  Such a packet is fed with csum_partial=True,
as NFQUEUE marks it (NFQA_SKB_CSUMNOTREADY); a full, valid checksum with False.

Golden output (`expected_lines`) is one line per packet the proxy sent to the client
or the origin, ordered by flow (within a flow, in order): a capture's order across two
interfaces is not the order in which the engine decided, within a flow it is.
"""
from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field

from . import checksum, packet, seq
from .engine import (Decision, Engine, SocketState, flow_key,
                     pair_from_record)
from .packet import ACK, FIN, RST, SYN, Malformed, TCPView
from .queue.base import HOOK_LOCAL_OUT, HOOK_PRE_ROUTING

# pcap link types (tcpdump.org/linktypes.html).  DLT_RAW is 12 or 14 in some old files.
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_LINUX_SLL2 = 276
_RAW_TYPES = (LINKTYPE_RAW, LINKTYPE_IPV4, 12, 14)
# include/uapi/linux/if_packet.h, if_arp.h, if_ether.h
PACKET_OUTGOING = 4
ARPHRD_LOOPBACK = 772
ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100

_PCAP_MAGIC = {0xA1B2C3D4: 1e-6, 0xA1B23C4D: 1e-9}   # microsecond, nanosecond pcap

# Engine defaults as `nfsplice tcp` sets them (--linger 2, --handoff-timeout 5 x 2).
LIVE_LINGER = 2.0
LIVE_IDLE_TIMEOUT = 300.0
LIVE_HANDOFF_TIMEOUT = 10.0


class ReplayError(Exception):
    """The input cannot be replayed (unreadable pcap, bad pairs file): says what and where."""


# -- reading and writing pcaps ------------------------------------------------------------
@dataclass
class Frame:
    """One captured packet: the IP packet (link header removed) and what the link said."""
    index: int                  # position in the pcap, from 0: the engine's handle
    time: float
    data: bytes                 # the IP packet as captured (snaplen may have cut it)
    wire_len: int               # its length on the wire
    outgoing: bool | None = None   # from a Linux cooked header; None: the link type does not say
    skip: str | None = None     # why replay does not feed it (loopback, not IPv4)

    @property
    def truncated(self) -> bool:
        return len(self.data) < self.wire_len


def read_pcap(source) -> list[Frame]:
    """Frames of a pcap file (path or binary file object): raw IP, Ethernet, Linux cooked
    v1 and v2 (`tcpdump -i any`), micro- or nanosecond timestamps, either byte order.
    Read here rather than with dpkt, whose reader does not give a record's wire length
    (a packet cut by the snaplen must reach the engine as truncated)."""
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        with open(source, "rb") as f:
            return read_pcap(f)
    name = getattr(source, "name", "pcap")
    head = source.read(24)
    if len(head) < 24:
        raise ReplayError(f"{name}: not a pcap file (only {len(head)} bytes)")
    for endian in ("<", ">"):
        magic = struct.unpack(endian + "I", head[:4])[0]
        if magic in _PCAP_MAGIC:
            break
    else:
        if head[:4] == b"\x0a\x0d\x0d\x0a":
            raise ReplayError(f"{name}: pcapng is not supported; convert it: editcap -F pcap IN OUT")
        raise ReplayError(f"{name}: not a pcap file (magic {head[:4].hex()})")
    unit = _PCAP_MAGIC[magic]
    linktype = struct.unpack(endian + "I", head[20:24])[0] & 0x0FFFFFFF
    rec = struct.Struct(endian + "IIII")
    frames = []
    while True:
        h = source.read(16)
        if not h:
            break
        if len(h) < 16:
            raise ReplayError(f"{name}: record {len(frames)}: header cut short")
        sec, frac, caplen, wirelen = rec.unpack(h)
        data = source.read(caplen)
        if len(data) < caplen:
            raise ReplayError(f"{name}: record {len(frames)}: {len(data)} of {caplen} bytes")
        frames.append(_frame(len(frames), sec + frac * unit, data, wirelen, linktype, name))
    return frames


def _frame(index: int, ts: float, data: bytes, wirelen: int, linktype: int, name: str) -> Frame:
    outgoing = None
    hatype = None
    if linktype in _RAW_TYPES:
        proto, off = ETH_P_IP if data[:1] and data[0] >> 4 == 4 else 0, 0
    elif linktype == LINKTYPE_ETHERNET:
        off = 14
        proto = struct.unpack_from("!H", data, 12)[0] if len(data) >= 14 else 0
        if proto == ETH_P_8021Q and len(data) >= 18:
            proto, off = struct.unpack_from("!H", data, 16)[0], 18
    elif linktype == LINKTYPE_LINUX_SLL:
        off = 16
        if len(data) >= 16:
            pkttype, hatype = struct.unpack_from("!HH", data, 0)
            proto = struct.unpack_from("!H", data, 14)[0]
            outgoing = pkttype == PACKET_OUTGOING
        else:
            proto = 0
    elif linktype == LINKTYPE_LINUX_SLL2:
        off = 20
        if len(data) >= 20:
            proto = struct.unpack_from("!H", data, 0)[0]
            hatype, pkttype = struct.unpack_from("!HB", data, 8)
            outgoing = pkttype == PACKET_OUTGOING
        else:
            proto = 0
    else:
        raise ReplayError(f"{name}: link type {linktype} is not supported "
                          "(raw IP, Ethernet, Linux cooked v1/v2 are)")
    ip = data[off:]
    skip = None
    if hatype == ARPHRD_LOOPBACK:
        skip = "loopback"
    elif proto != ETH_P_IP:
        skip = "not-ipv4"
    return Frame(index, ts, ip, max(wirelen - off, len(ip)), outgoing, skip)


def write_pcap(path: str, packets) -> None:
    """Write (time, ip_bytes) pairs as a raw-IP pcap (dpkt; microsecond timestamps)."""
    import dpkt
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f, snaplen=262144, linktype=LINKTYPE_RAW)
        for ts, buf in packets:
            w.writepkt(bytes(buf), ts=ts)


def _as_frames(packets) -> list[Frame]:
    """PACKETS as frames: Frame objects, (time, ip_bytes) pairs or bare IP packets."""
    out = []
    for i, p in enumerate(packets):
        if isinstance(p, Frame):
            out.append(p)
        elif isinstance(p, tuple):
            out.append(Frame(i, float(p[0]), bytes(p[1]), len(p[1])))
        else:
            out.append(Frame(i, float(i), bytes(p), len(p)))
    return out


# -- one readable line per packet ---------------------------------------------------------
_FLAG_LETTERS = ((packet.FIN, "F"), (SYN, "S"), (RST, "R"), (packet.PSH, "P"), (packet.URG, "U"),
                 (packet.ECE, "E"), (packet.CWR, "W"))


def _ip(b) -> str:
    return ".".join(str(x) for x in b)


def flags_text(flags: int) -> str:
    s = "".join(ch for bit, ch in _FLAG_LETTERS if flags & bit)
    return s + ("." if flags & ACK else "") or "none"


def options_text(v: TCPView) -> str:
    b = v.buf
    out = []
    i, end = v.t + 20, v.payload_off
    while i < end:
        kind = b[i]
        if kind == packet.OPT_EOL:
            out.append("eol")
            break
        if kind == packet.OPT_NOP:
            out.append("nop")
            i += 1
            continue
        n = b[i + 1] if i + 1 < end else 0
        if n < 2 or i + n > end:
            out.append(f"bad{kind}")
            break
        val = bytes(b[i + 2:i + n])
        if kind == packet.OPT_MSS and n == 4:
            out.append(f"mss{struct.unpack('!H', val)[0]}")
        elif kind == packet.OPT_WSCALE and n == 3:
            out.append(f"ws{val[0]}")
        elif kind == packet.OPT_SACK_PERM:
            out.append("sackOK")
        elif kind == packet.OPT_TIMESTAMP and n == 10:
            out.append("ts%d/%d" % struct.unpack("!II", val))
        elif kind == packet.OPT_SACK and (n - 2) % 8 == 0:
            edges = struct.unpack(f"!{(n - 2) // 4}I", val)
            out.append("sack" + ";".join(f"{edges[j]}-{edges[j + 1]}" for j in range(0, len(edges), 2)))
        else:
            out.append(f"opt{kind}:{val.hex()}")
        i += n
    return ",".join(out) or "-"


def normalised(buf) -> bytes:
    """BUF with TTL and both checksums zeroed: what must match byte for byte between a
    forwarded packet (TTL one lower, checksum filled in or not) and replay's output."""
    b = bytearray(buf)
    if len(b) >= 20 and b[0] >> 4 == 4:
        b[8] = 0
        b[10] = b[11] = 0
        ihl = (b[0] & 0x0F) * 4
        if b[9] == packet.IPPROTO_TCP and len(b) >= ihl + 18:
            b[ihl + 16] = b[ihl + 17] = 0
    return bytes(b)


def packet_line(buf) -> str:
    """flow flags seq ack win options len payload-sha1 pkt=hash of the normalised bytes."""
    pkt = hashlib.sha1(normalised(buf)).hexdigest()[:12]
    try:
        v = TCPView(memoryview(bytearray(buf)))
    except Malformed as e:
        return f"malformed({e.reason}) len={len(buf)} pkt={pkt}"
    flow = f"{_ip(v.src)}:{v.sport}>{_ip(v.dst)}:{v.dport}"
    try:
        opts = options_text(v)
    except IndexError:
        opts = "bad"
    sha = hashlib.sha1(v.payload()).hexdigest()[:12] if v.payload_len else "-"
    return (f"{flow} {flags_text(v.flags)} seq={v.seq} ack={v.ack} win={v.window} opts={opts} "
            f"len={v.payload_len} sha1={sha} pkt={pkt}")


def order_by_flow(lines: list[str]) -> list[str]:
    """Lines grouped by flow (first word), flows sorted, order within a flow kept."""
    return sorted(lines, key=lambda line: line.split(" ", 1)[0])


# -- where a captured packet belongs --------------------------------------------------------
@dataclass
class _Tcp:
    """The few fields the planner needs, or None for a packet it cannot parse."""
    key: bytes
    flags: int
    seq: int
    ack: int
    plen: int
    tsval: int | None
    syn_options: packet.SynOptions | None
    digest: bytes | None        # of the payload, to recognise a forwarded copy


def _tcp(f: Frame) -> _Tcp | None:
    try:
        v = TCPView(memoryview(bytearray(f.data)))
        opts = packet.syn_options(v) if v.flags & SYN else None
        tsval = None
        if v.doff > 20:
            o = v.options().get(packet.OPT_TIMESTAMP)
            if o is not None:
                tsval = struct.unpack_from("!I", v.buf, o + 2)[0]
    except Malformed:
        return None
    digest = hashlib.sha1(v.payload()).digest()[:8] if v.payload_len else None
    return _Tcp(v.key(), v.flags, v.seq, v.ack, v.payload_len, tsval, opts, digest)


def _leaving(f: Frame, proxy_ips: set[bytes]) -> bool:
    """Did the proxy send F (as opposed to receive it)?"""
    if f.outgoing is not None:
        return f.outgoing
    if len(f.data) < 20:
        return False
    return f.data[12:16] in proxy_ips and f.data[16:20] not in proxy_ips


def _reverse(key: bytes) -> bytes:
    return key[4:8] + key[0:4] + key[10:12] + key[8:10]


def _endpoint_text(ip: bytes, port: bytes | int) -> str:
    if isinstance(port, (bytes, bytearray)):
        port = struct.unpack("!H", port)[0]
    return f"{_ip(ip)}:{port}"


def proxy_ips_of(records, listen=None) -> set[bytes]:
    ips = set()
    for r in records:
        for k in ("proxy_a", "proxy_b"):
            ips.add(bytes(int(x) for x in r[k].rpartition(":")[0].split(".")))
    if listen is not None:
        ips.add(_listen_key(listen)[:4])
    return ips


def _listen_key(listen) -> bytes:
    """'IP:PORT' or (ip, port) as the engine's listener key (4 address bytes + port)."""
    if isinstance(listen, str):
        host, _, port = listen.rpartition(":")
    else:
        host, port = listen
    return bytes(int(x) for x in host.split(".")) + int(port).to_bytes(2, "big")


def sent_by_proxy(frames: list[Frame], proxy_ips: set[bytes]) -> list[Frame]:
    """The packets the proxy sent to the client and the origin: its own and forwarded."""
    return [f for f in frames if f.skip is None and _leaving(f, proxy_ips)]


def expected_lines(frames: list[Frame], proxy_ips: set[bytes]) -> list[str]:
    """The golden output of a capture: `packet_line` of every packet the proxy sent,
    ordered by flow."""
    return order_by_flow([packet_line(f.data) for f in sent_by_proxy(frames, proxy_ips)])


# -- the plan: where pairs are registered and spliced ----------------------------------------
@dataclass
class _Upstream:
    """One handshake of the proxy's upstream connection B, as the capture shows it."""
    key: bytes                 # proxy_b -> server
    syn_at: int
    isn: int
    syn: _Tcp
    tsval_sent: int | None = None       # last TSval the proxy's socket B sent before the splice
    synack_at: int | None = None
    synack: _Tcp | None = None
    ack_at: int | None = None           # the proxy's ACK completing the handshake
    ack_time: float = 0.0
    first_after_at: int | None = None   # first other leaving packet after the SYN-ACK

    def splice_after(self, not_after: float | None = None) -> int | None:
        """Index of the packet after which the pair is spliced (None: never)."""
        if self.ack_at is not None and (not_after is None or self.ack_time <= not_after):
            return self.ack_at
        return self.synack_at


def _upstream_handshakes(frames: list[Frame], tcp: dict[int, _Tcp], proxy_ips: set[bytes],
                         is_upstream_syn) -> list[_Upstream]:
    """Every upstream handshake in SYN order.  IS_UPSTREAM_SYN(key) says which leaving
    SYNs are the proxy's connects (not its SYN-ACKs to clients: those carry ACK)."""
    out: list[_Upstream] = []
    open_: dict[bytes, _Upstream] = {}
    for f in frames:
        t = tcp.get(f.index)
        if t is None:
            continue
        leaving = _leaving(f, proxy_ips)
        if leaving and t.flags & (SYN | ACK) == SYN and is_upstream_syn(t.key):
            if t.key not in open_ or open_[t.key].synack_at is not None:
                u = _Upstream(t.key, f.index, t.seq, t, tsval_sent=t.tsval)
                open_[t.key] = u
                out.append(u)
            continue
        if not leaving and t.flags & (SYN | ACK) == SYN | ACK:
            u = open_.get(_reverse(t.key))
            if u is not None and u.synack_at is None and t.ack == seq.add(u.isn, 1):
                u.synack_at, u.synack = f.index, t
            continue
        if leaving and t.key in open_:
            u = open_[t.key]
            if u.synack_at is None or u.ack_at is not None or u.first_after_at is not None:
                continue
            if (t.flags & (SYN | FIN | RST | ACK) == ACK and not t.plen
                    and t.seq == seq.add(u.isn, 1) and t.ack == seq.add(u.synack.seq, 1)):
                u.ack_at, u.ack_time = f.index, f.time
                if t.tsval is not None:
                    u.tsval_sent = t.tsval
            else:
                u.first_after_at = f.index
    return out


@dataclass
class _Plan:
    register: dict = field(default_factory=lambda: defaultdict(list))   # frame index -> records
    splice: dict = field(default_factory=lambda: defaultdict(list))     # after frame index -> records
    notes: list = field(default_factory=list)
    listener: bytes | None = None     # learned: where the clients connect (address + port)


def _plan_records(frames, tcp, records, proxy_ips) -> _Plan:
    """Registration and splice points of recorded pairs (see the module docstring)."""
    plan = _Plan()
    by_key: dict[bytes, deque] = defaultdict(deque)
    for r in records:
        pb, sv = r["proxy_b"].rpartition(":"), r["server"].rpartition(":")
        key = flow_key(bytes(int(x) for x in pb[0].split(".")), bytes(int(x) for x in sv[0].split(".")),
                       int(pb[2]), int(sv[2]))
        by_key[key].append(r)
    for u in _upstream_handshakes(frames, tcp, proxy_ips, lambda k: k in by_key):
        if not by_key[u.key]:
            continue
        r = by_key[u.key].popleft()
        plan.register[u.syn_at].append(r)
        at = u.splice_after(r.get("time"))
        if at is None:
            plan.notes.append(f"pair {r.get('pair')} ({r['proxy_b']}>{r['server']}): no SYN-ACK from the "
                              "origin in the capture; registered, not spliced")
            continue
        if at != u.ack_at:
            plan.notes.append(f"pair {r.get('pair')}: the proxy's handshake ACK to the origin is not in "
                              f"the capture (before the recorded splice); spliced after the origin's "
                              f"SYN-ACK (packet {at})")
        plan.splice[at].append(r)
    for key, left in by_key.items():
        for r in left:
            plan.notes.append(f"pair {r.get('pair')} ({r['proxy_b']}>{r['server']}): its upstream SYN is "
                              "not in the capture; not replayed")
    return plan


def learn_pairs(frames: list[Frame], listen=None) -> tuple[list[dict], _Plan]:
    """Pair records and their plan guessed from the handshakes (module docstring)."""
    tcp = {f.index: t for f in frames if f.skip is None and (t := _tcp(f)) is not None}
    plan = _Plan()
    if listen is not None:
        lkey = _listen_key(listen)
    else:
        # The listener: where the first SYN goes (a client's: the proxy connects upstream
        # only after accepting one).
        first = next((t for f in frames if (t := tcp.get(f.index)) is not None and f.outgoing is not True
                      and t.flags & (SYN | ACK) == SYN), None)
        if first is None:
            plan.notes.append("no SYN in the capture: no pair to learn")
            return [], plan
        lkey = first.key[4:8] + first.key[10:12]
    plan.listener = lkey
    to_listener = lambda k: k[4:8] + k[10:12] == lkey      # noqa: E731
    proxy_ips = {lkey[:4]}
    for f in frames:
        t = tcp.get(f.index)
        if t is not None and t.flags & (SYN | ACK) == SYN and not to_listener(t.key) and f.outgoing is not False:
            proxy_ips.add(t.key[:4])

    # Client connections A, in SYN order, and the TSvals the proxy sent on them.
    clients: list[dict] = []
    by_key: dict[bytes, dict] = {}
    sent_ts: dict[bytes, list[tuple[int, int]]] = defaultdict(list)   # A out key -> (index, TSval)
    for f in frames:
        t = tcp.get(f.index)
        if t is None:
            continue
        leaving = _leaving(f, proxy_ips)
        if leaving and t.tsval is not None and _reverse(t.key) in by_key:
            sent_ts[t.key].append((f.index, t.tsval))
        if not leaving and t.flags & (SYN | ACK) == SYN and to_listener(t.key):
            c = by_key.get(t.key)
            if c is None or c.get("synack") is not None and c["syn"].seq != t.seq:
                c = {"key": t.key, "syn": t, "syn_at": f.index, "synack": None, "established_at": None,
                     "paired": False}
                by_key[t.key] = c
                clients.append(c)
        elif leaving and t.flags & (SYN | ACK) == SYN | ACK and _reverse(t.key) in by_key:
            c = by_key[_reverse(t.key)]
            if c["synack"] is None:
                c["synack"] = t
        elif not leaving and t.key in by_key and not t.flags & SYN:
            c = by_key[t.key]
            if c["synack"] is not None and c["established_at"] is None:
                c["established_at"] = f.index

    # Payload per flow: (index, seq, digest), arriving and leaving.  A forwarded copy has
    # the payload at the same stream offset on the other connection (the L4 proxy copies
    # nothing itself), which says which two connections are one pair.
    arriving: dict[bytes, list] = defaultdict(list)
    leaving_: dict[bytes, list] = defaultdict(list)
    for f in frames:
        t = tcp.get(f.index)
        if t is not None and t.digest is not None:
            (leaving_ if _leaving(f, proxy_ips) else arriving)[t.key].append((f.index, t.seq, t.digest))

    def stream(packets, after: int, isn: int, before: int | None = None) -> set:
        return {(seq.diff(s, seq.add(isn, 1)), d) for i, s, d in packets
                if i > after and (before is None or i < before)}

    ups = _upstream_handshakes(frames, tcp, proxy_ips, lambda k: not to_listener(k))
    nxt, last_on = {}, {}     # handshake -> index of the next SYN on the same upstream tuple
    for u in reversed(ups):
        nxt[id(u)] = last_on.get(u.key)
        last_on[u.key] = u.syn_at
    ready = [c for c in clients if c["synack"] is not None]
    uploads, downloads = defaultdict(list), defaultdict(list)   # (offset, digest) -> clients
    for c in ready:
        for x in stream(arriving[c["key"]], c["syn_at"], c["syn"].seq):
            uploads[x].append(id(c))
        for x in stream(leaving_[_reverse(c["key"])], c["syn_at"], c["synack"].seq):
            downloads[x].append(id(c))
    score: Counter = Counter()
    for u in ups:
        if u.synack_at is None:
            continue
        for x in stream(leaving_[u.key], u.synack_at, u.isn, nxt[id(u)]):
            score.update((id(u), ci) for ci in uploads.get(x, ()))
        for x in stream(arriving[_reverse(u.key)], u.synack_at, u.synack.seq, nxt[id(u)]):
            score.update((id(u), ci) for ci in downloads.get(x, ()))
    # Best evidence first; then, for upstream connections without any, the earliest
    # client connection (by SYN) whose handshake completed before the upstream SYN.
    pairing = {}
    for (ui, ci), _n in sorted(score.items(), key=lambda kv: -kv[1]):
        if ui not in pairing and ci not in pairing.values():
            pairing[ui] = ci
    by_id = {id(c): c for c in clients}
    for c in clients:
        c["paired"] = id(c) in pairing.values()

    records = []
    for u in ups:
        if id(u) in pairing:
            c = by_id[pairing[id(u)]]
        else:
            cands = [c for c in ready if not c["paired"]
                     and c["established_at"] is not None and c["established_at"] < u.syn_at]
            cands = cands or [c for c in ready if not c["paired"]]
            if not cands:
                plan.notes.append(f"upstream connection {_endpoint_text(u.key[:4], u.key[8:10])}>"
                                  f"{_endpoint_text(u.key[4:8], u.key[10:12])}: no client connection to pair it with")
                continue
            c = cands[0]
            c["paired"] = True
            plan.notes.append(f"pair {_endpoint_text(c['key'][:4], c['key'][8:10])} ~ "
                              f"{_endpoint_text(u.key[:4], u.key[8:10])}: no forwarded payload to confirm it; "
                              "paired by SYN order")
        at = u.splice_after()
        if at is None:
            plan.notes.append(f"upstream connection at packet {u.syn_at}: no SYN-ACK from the origin; not spliced")
            continue
        # Socket A's last TSval before the splice (later ones on that flow are forwarded).
        a_ts = next((ts for i, ts in reversed(sent_ts[_reverse(c["key"])]) if i <= at), None)
        cs, ps, ss, os_ = c["syn"].syn_options, c["synack"].syn_options, u.syn.syn_options, u.synack.syn_options
        ws_a = cs.wscale is not None and ps.wscale is not None
        ws_b = ss.wscale is not None and os_.wscale is not None
        a = SocketState(snd_seq=seq.add(c["synack"].seq, 1), rcv_seq=seq.add(c["syn"].seq, 1),
                        snd_wscale=cs.wscale if ws_a else 0, rcv_wscale=ps.wscale if ws_a else 0,
                        timestamps=cs.timestamps and ps.timestamps,
                        ts_now=seq.add(a_ts or 0, 1), sack=cs.sack_permitted and ps.sack_permitted)
        b = SocketState(snd_seq=seq.add(u.isn, 1), rcv_seq=seq.add(u.synack.seq, 1),
                        snd_wscale=os_.wscale if ws_b else 0, rcv_wscale=ss.wscale if ws_b else 0,
                        timestamps=ss.timestamps and os_.timestamps,
                        ts_now=seq.add(u.tsval_sent or 0, 1), sack=ss.sack_permitted and os_.sack_permitted)
        rec = {"pair": len(records) + 1, "client": _endpoint_text(c["key"][:4], c["key"][8:10]),
               "proxy_a": _endpoint_text(lkey[:4], lkey[4:]),
               "proxy_b": _endpoint_text(u.key[:4], u.key[8:10]),
               "server": _endpoint_text(u.key[4:8], u.key[10:12]),
               "a": a.__dict__.copy(), "b": b.__dict__.copy(), "copied": [0, 0],
               "finished": [False, False], "tsval": None, "time": None, "guessed": True}
        records.append(rec)
        plan.register[u.syn_at].append(rec)
        plan.splice[at].append(rec)
    return records, plan


# -- the replay --------------------------------------------------------------------------
@dataclass
class Output:
    """One verdict event.  VERDICT: ACCEPT, MANGLE, DROP, RELEASE-MANGLE/RELEASE-ACCEPT
    (held, then released at a splice or an aborted hand-off), INJECT (a pure ACK the
    engine made).  TO: "wire" (leaves the proxy for the client or the origin), "local"
    (delivered to the proxy's own sockets), "none" (dropped)."""
    index: int
    verdict: str
    hook: int
    time: float
    buf: bytes
    to: str


@dataclass
class ReplayResult:
    outputs: list[Output] = field(default_factory=list)
    counters: dict = field(default_factory=dict)
    records: list = field(default_factory=list)
    guessed: bool = False
    notes: list = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)    # frames not fed, by reason
    forwarded_copies: int = 0                           # leaving copies of spliced packets (ignored)
    bad_checksums: int = 0                              # inputs whose TCP checksum is neither full nor partial

    def wire(self) -> list[Output]:
        """What the proxy host sent to the client and the origin, in decision order."""
        return [o for o in self.outputs if o.to == "wire"]

    def wire_lines(self) -> list[str]:
        """`packet_line` of `wire()`, ordered by flow: comparable with `expected_lines`."""
        return order_by_flow([packet_line(o.buf) for o in self.wire()])


def _checksum_partial(buf: bytes) -> tuple[bool, bool]:
    """(csum_partial, valid): the TCP checksum field holds only the pseudo-header sum
    (CHECKSUM_PARTIAL, as Linux leaves it: ~tcp_v4_check(len, saddr, daddr, 0)), or a
    full checksum that verifies."""
    if len(buf) < 40 or buf[0] != 0x45 or buf[9] != packet.IPPROTO_TCP:
        return False, False
    n = (buf[2] << 8) | buf[3]
    if n != len(buf):
        return False, False
    seg = memoryview(buf)[20:]
    src, dst = bytes(buf[12:16]), bytes(buf[16:20])
    field_ = (buf[36] << 8) | buf[37]
    if checksum.full_tcp(src, dst, seg, 16) == field_:
        return False, True
    if checksum.pseudo_sum(src, dst, len(seg)) == field_:
        return True, False
    return False, False


def replay(packets, pairs_records=None, listen=None, *, linger: float = LIVE_LINGER,
           idle_timeout: float = LIVE_IDLE_TIMEOUT,
           handoff_timeout: float = LIVE_HANDOFF_TIMEOUT) -> ReplayResult:
    """Run PACKETS (Frames from `read_pcap`, (time, ip_bytes) pairs or IP packets) through
    a fresh Engine.  PAIRS_RECORDS: splice records (`--pairs-log` lines) or None to learn
    the pairs from the handshakes.  LISTEN: 'IP:PORT' of the L4 listener (default: the
    records' proxy_a, or where the first SYN goes)."""
    frames = _as_frames(packets)
    res = ReplayResult()
    clock = [frames[0].time if frames else 0.0]
    eng = Engine(None, linger=linger, idle_timeout=idle_timeout, handoff_timeout=handoff_timeout,
                 clock=lambda: clock[0])
    if pairs_records is None:
        records, plan = learn_pairs(frames, listen)
        res.guessed = True
    else:
        records = [dict(r) for r in pairs_records]
        plan = None
    if plan is not None and plan.listener is not None:
        eng.listeners.add(plan.listener)
    for r in records:
        eng.listeners.add(_listen_key(r["proxy_a"]))
    if listen is not None:
        eng.listeners.add(_listen_key(listen))
    proxy_ips = proxy_ips_of(records, listen)
    proxy_ips |= {k[:4] for k in eng.listeners}
    if plan is None:
        tcp = {f.index: t for f in frames if f.skip is None and (t := _tcp(f)) is not None}
        plan = _plan_records(frames, tcp, records, proxy_ips)
    res.records = records
    res.notes += plan.notes
    live: dict[int, object] = {}          # id(record) -> Pair
    spliced_out: set[bytes] = set()       # out keys of pairs replay has spliced

    def emit(items, f: Frame, prefix: str) -> None:
        for handle, decision, buf in items:
            buf = bytes(buf)
            to = "wire" if decision == Decision.MANGLE else ("local" if buf[16:20] in proxy_ips else "wire")
            res.outputs.append(Output(handle, prefix + decision.name, HOOK_PRE_ROUTING, f.time, buf, to))

    for f in frames:
        clock[0] = f.time
        emit(eng.tick(f.time), f, "RELEASE-")
        if f.skip is not None:
            res.skipped[f.skip] += 1
            continue
        for r in plan.register.get(f.index, ()):
            # Live, the proxy registers the pair, then connects: before its SYN.
            pair, _a, _b = pair_from_record(r)
            try:
                eng.register(pair, now=f.time)
            except ValueError as e:
                res.notes.append(f"packet {f.index}: register failed: {e}")
                continue
            live[id(r)] = pair
            spliced_out.difference_update(pair.out_keys())   # a reused port: new connection
        leaving = _leaving(f, proxy_ips)
        if leaving and len(f.data) >= 20:
            ihl = (f.data[0] & 0x0F) * 4
            if f.data[12:16] not in proxy_ips or f.data[12:20] + f.data[ihl:ihl + 4] in spliced_out:
                res.forwarded_copies += 1
                continue
        hook = HOOK_LOCAL_OUT if leaving else HOOK_PRE_ROUTING
        buf = bytearray(f.data)
        partial, valid = _checksum_partial(buf)
        if not partial and not valid and len(buf) >= 40:
            res.bad_checksums += 1     # fed as a full checksum, as NFQUEUE would
        d = eng.process(memoryview(buf), hook=hook, csum_partial=partial, truncated=f.truncated,
                        handle=f.index, now=f.time)
        if eng.trimmed is not None:       # cut at a message end
            del buf[eng.trimmed:]
        if d != Decision.HOLD:
            if d == Decision.DROP:
                to = "none"
            elif d == Decision.MANGLE or leaving:
                to = "wire"
            else:
                to = "local" if bytes(buf[16:20]) in proxy_ips else "wire"
            res.outputs.append(Output(f.index, d.name, hook, f.time,
                                      bytes(buf if d != Decision.DROP else f.data), to))
        if eng.injected:
            for p in eng.injected:
                res.outputs.append(Output(f.index, "INJECT", HOOK_LOCAL_OUT, f.time, bytes(p), "local"))
            eng.injected = []
        for r in plan.splice.get(f.index, ()):
            pair = live.get(id(r))
            if pair is None:
                continue
            _p, a, b = pair_from_record(r)
            if r.get("tsval") is not None:
                pair.tsval = list(r["tsval"])
            # Records from before the engine took offsets from the first held packet,
            # or sent the origin a window update, replay as they ran live.
            pair.ts_ref = list(r["ts_ref"]) if "ts_ref" in r else [None, None]
            eng.window_updates = bool(r.get("window_update"))
            try:
                released = eng.splice(pair, a, b, copied=tuple(r.get("copied", (0, 0))),
                                      finished=tuple(r.get("finished", (False, False))))
            except ValueError as e:
                res.notes.append(f"packet {f.index}: splice failed: {e}")
                continue
            spliced_out.update(pair.out_keys())
            emit(released, f, "RELEASE-")
        eng.forgotten = []
    res.counters = eng.stats()
    return res


def read_pairs(path: str) -> list[dict]:
    """Splice records from a `--pairs-log` file (one JSON object per line)."""
    out = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    for k in ("client", "proxy_a", "proxy_b", "server", "a", "b"):
                        rec[k]
                except (ValueError, KeyError, TypeError) as e:
                    raise ReplayError(f"{path}:{n}: not a splice record ({e})") from None
                out.append(rec)
    except OSError as e:
        raise ReplayError(f"--pairs {path}: {e.strerror}") from None
    return out


def summary_line(o: Output) -> str:
    return f"{o.index:6d} {o.verdict:14s} {o.to:5s} {packet_line(o.buf)}"


def cmd_replay(args) -> int:
    """`nfsplice replay PCAP --out OUT [--pairs FILE] [--summary]`."""
    from .cli import UsageError
    try:
        frames = read_pcap(args.pcap)
        records = read_pairs(args.pairs) if args.pairs else None
    except OSError as e:
        raise UsageError(f"{args.pcap}: {e.strerror}") from None
    except ReplayError as e:
        raise UsageError(str(e)) from None
    res = replay(frames, records)
    try:
        write_pcap(args.out, [(o.time, o.buf) for o in res.outputs if o.to != "none"])
    except OSError as e:
        raise UsageError(f"--out {args.out}: {e.strerror}") from None
    out = sys.stdout
    if res.guessed:
        print(f"pairs: {len(res.records)} guessed from the handshakes (no --pairs): "
              "the pairing and the TSval offsets may be wrong", file=out)
    else:
        print(f"pairs: {len(res.records)} from {args.pairs}", file=out)
    for note in res.notes:
        print(f"note: {note}", file=out)
    if args.summary:
        for o in res.outputs:
            print(summary_line(o), file=out)
    verdicts = Counter(o.verdict for o in res.outputs)
    print(f"{len(frames)} packets read, {sum(res.skipped.values())} skipped "
          f"({', '.join(f'{k} {v}' for k, v in sorted(res.skipped.items())) or 'none'}), "
          f"{res.forwarded_copies} forwarded copies ignored; "
          + ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items())), file=out)
    print("counters: " + " ".join(f"{k}={v}" for k, v in sorted(res.counters.items())), file=out)
    print(f"wrote {sum(1 for o in res.outputs if o.to != 'none')} packets to {args.out}", file=out)
    return 0
