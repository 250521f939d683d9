"""A zero-copy view of an IPv4/TCP packet and the one rewrite function.

`TCPView` parses the fixed headers of a packet held in a writable buffer (a slice of
the netlink receive buffer, or a bytearray from a pcap) without copying it.  Anything
nfsplice cannot rewrite raises `Malformed` with a short reason that becomes a counter
name: the engine counts it and gives the packet a documented verdict.

`rewrite()` applies a `Translation` (one direction of a spliced pair) in place:
addresses and ports, sequence and acknowledgement numbers, the window across different
window-scale factors (RFC 7323 section 2), timestamp values and echoes (RFC 7323
section 3), SACK block edges (RFC 2018), then the IP header checksum and the TCP
checksum, incrementally (RFC 1624) when the old one was a full checksum, summed in full
when it was not (GSO and CHECKSUM_PARTIAL packets).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from . import checksum

# TCP header flags (RFC 9293 section 3.1, RFC 3168 for ECE/CWR).
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

# TCP option kinds (IANA "TCP Option Kind Numbers").
OPT_EOL, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_PERM, OPT_SACK, OPT_TIMESTAMP = 0, 1, 2, 3, 4, 5, 8

IPPROTO_TCP = 6
_TCP_FIXED = struct.Struct("!HHIIBBH")      # sport dport seq ack doff/rsv flags window
_PORTS_SEQ_ACK = struct.Struct("!HHII")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_TS = struct.Struct("!II")
_MASK32 = 0xFFFFFFFF
_NOP_NOP_TS = bytes([OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10])
# Options whose length is fixed (RFC 9293, RFC 7323, RFC 2018).
_FIXED_LENGTH = {OPT_MSS: 4, OPT_WSCALE: 3, OPT_SACK_PERM: 2, OPT_TIMESTAMP: 10}


class Malformed(ValueError):
    """A packet nfsplice cannot parse or rewrite; `reason` names the counter."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class TCPView:
    """Parsed fixed headers of an IPv4/TCP packet in BUF (a writable memoryview).

    Offsets are absolute within BUF: `t` is the TCP header, `payload_off` the payload.
    """

    __slots__ = ("buf", "t", "doff", "sport", "dport", "seq", "ack", "flags", "window",
                 "payload_off", "payload_len")

    def __init__(self, buf: memoryview, truncated: bool = False):
        n = len(buf)
        if n < 20:
            raise Malformed("truncated", f"{n} bytes")
        vihl = buf[0]
        if vihl >> 4 != 4:
            raise Malformed("not-ipv4", f"version {vihl >> 4}")
        ihl = (vihl & 0x0F) * 4
        if ihl < 20 or ihl > n:
            raise Malformed("bad-ihl", f"ihl {ihl}")
        if buf[9] != IPPROTO_TCP:
            raise Malformed("not-tcp", f"protocol {buf[9]}")
        total = (buf[2] << 8) | buf[3]
        if total != n and not (truncated and total > n):
            # (A packet the queue copied only in part is longer than the buffer; it is
            # parsed so that it can be attributed, never rewritten.)
            raise Malformed("bad-length", f"total length {total}, packet {n}")
        if ((buf[6] << 8) | buf[7]) & 0x3FFF:
            raise Malformed("fragment")
        if ihl != 20:
            # Options would have to be carried or stripped consistently; nothing on the
            # spliced paths sends them, so they are refused rather than half-handled.
            raise Malformed("ip-options", f"ihl {ihl}")
        t = ihl
        if n < t + 20:
            raise Malformed("truncated", "short TCP header")
        (self.sport, self.dport, self.seq, self.ack, offx, self.flags,
         self.window) = _TCP_FIXED.unpack_from(buf, t)
        doff = (offx >> 4) * 4
        if doff < 20 or t + doff > n:
            raise Malformed("bad-data-offset", f"data offset {doff}")
        self.buf = buf
        self.t = t
        self.doff = doff
        self.payload_off = t + doff
        self.payload_len = n - t - doff

    @property
    def src(self) -> bytes:
        return bytes(self.buf[12:16])

    @property
    def dst(self) -> bytes:
        return bytes(self.buf[16:20])

    def key(self) -> bytes:
        """(src addr, dst addr, sport, dport) as 12 bytes: the flow-table key.

        The TCP header follows the 20-byte IP header directly (IP options are refused),
        so the four fields are contiguous."""
        return bytes(self.buf[12:24])

    def seg_len(self) -> int:
        """Sequence space the segment occupies (payload, plus one for SYN and FIN)."""
        return self.payload_len + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)

    def options(self) -> dict[int, int]:
        """Absolute offsets of the TCP options present, by kind (value starts at +2)."""
        return parse_options(self.buf, self.t + 20, self.payload_off)

    def payload(self) -> memoryview:
        return self.buf[self.payload_off:]


def parse_options(buf, start: int, end: int) -> dict[int, int]:
    out: dict[int, int] = {}
    i = start
    while i < end:
        kind = buf[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise Malformed("bad-tcp-options", f"option {kind} truncated")
        length = buf[i + 1]
        if length < 2 or i + length > end:
            raise Malformed("bad-tcp-options", f"option {kind} length {length}")
        fixed = _FIXED_LENGTH.get(kind)
        if fixed is not None and length != fixed:
            raise Malformed("bad-tcp-options", f"option {kind} length {length}, must be {fixed}")
        if kind == OPT_SACK and (length - 2) % 8:
            raise Malformed("bad-tcp-options", f"SACK length {length}")
        out[kind] = i
        i += length
    return out


@dataclass(frozen=True)
class SynOptions:
    """What one side announced in its SYN (RFC 9293 MSS, RFC 7323, RFC 2018)."""
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    timestamps: bool = False


def syn_options(v: TCPView) -> SynOptions:
    opts = v.options()
    b = v.buf
    mss = _U16.unpack_from(b, opts[OPT_MSS] + 2)[0] if OPT_MSS in opts else None
    ws = min(b[opts[OPT_WSCALE] + 2], 14) if OPT_WSCALE in opts else None
    return SynOptions(mss, ws, OPT_SACK_PERM in opts, OPT_TIMESTAMP in opts)


@dataclass
class Translation:
    """How packets of one direction of a spliced pair are rewritten.

    The packet arrives addressed as on the connection it came from and leaves as if
    sent by the proxy's socket on the other connection: new addresses and ports,
    seq + seq_delta, ack + ack_delta (SACK edges too, they are acknowledgement space),
    window field converted from the sender's scale (win_shift_in) to the scale the
    receiver expects from the proxy's socket (win_shift_out), TSval + tsval_delta and
    TSecr + tsecr_delta, but never below tsecr_floor: a TSecr that echoes one of the
    proxy socket's own pre-splice timestamps would otherwise translate to a value older
    than the receiver's last TSval, which Linux (6.15+) rejects on a handshake ACK.
    """
    src: bytes
    dst: bytes
    sport: int
    dport: int
    seq_delta: int = 0
    ack_delta: int = 0
    win_shift_in: int = 0
    win_shift_out: int = 0
    tsval_delta: int = 0
    tsecr_delta: int = 0
    tsecr_floor: int | None = None

    def inverse_addresses(self) -> tuple[bytes, bytes, int, int]:
        return self.dst, self.src, self.dport, self.sport


def convert_window(window: int, shift_in: int, shift_out: int) -> int:
    """A window field scaled by 2**shift_in, re-expressed in units of 2**shift_out.

    Rounded down (never announce space the receiver has not offered), but a non-zero
    window never becomes zero, which would stall the sender for a probe interval."""
    if shift_in == shift_out:
        return window
    w = (window << shift_in) >> shift_out
    if w > 0xFFFF:
        return 0xFFFF
    if w == 0 and window:
        return 1
    return w


def limit_window(window: int, shift: int, ack: int, limit: int) -> int:
    """WINDOW (a field in units of 2**SHIFT, offered at ACK) cut so that it offers no
    space past LIMIT (sequence numbers mod 2**32, LIMIT ahead of ACK); a non-zero window
    stays non-zero.  The fast path's rule (F_LIMIT), bit for bit."""
    room = (limit - ack) & _MASK32
    if window << shift <= room:
        return window
    return max(room >> shift, 1)


def rewrite(v: TCPView, tr: Translation, full_checksum: bool, win_limit: int | None = None,
            tsval_floor: int | None = None) -> int:
    """Apply TR to the packet in V's buffer, in place, checksums included.  WIN_LIMIT
    (the receiver's sequence space): the window offered reaches no further.  TSVAL_FLOOR:
    a translated TSval below it is raised to it.  Returns the window field written."""
    b = v.buf
    t = v.t                      # always 20: IP options are refused by TCPView
    hdr_end = v.payload_off
    opts = None
    if hdr_end > t + 20:
        # Parsed before anything is written, so a bad option leaves the packet untouched.
        if hdr_end == t + 32 and b[t + 20:t + 24] == _NOP_NOP_TS:
            opts = {OPT_TIMESTAMP: t + 22}    # the layout Linux always sends
        else:
            opts = parse_options(b, t + 20, hdr_end)
    if not full_checksum:
        # Addresses (pseudo-header) and the TCP header are contiguous: bytes 12..hdr_end.
        old = bytes(b[12:hdr_end])
        old_check = _U16.unpack_from(b, t + 16)[0]
    b[12:16] = tr.src
    b[16:20] = tr.dst
    # The acknowledgement field means nothing without ACK (a bare RST): left alone.
    ack = (v.ack + tr.ack_delta) & _MASK32 if v.flags & ACK else v.ack
    _PORTS_SEQ_ACK.pack_into(b, t, tr.sport, tr.dport, (v.seq + tr.seq_delta) & _MASK32, ack)
    window = v.window
    if not v.flags & SYN:
        window = convert_window(window, tr.win_shift_in, tr.win_shift_out)
        if win_limit is not None and window and v.flags & ACK:
            window = limit_window(window, tr.win_shift_out, ack, win_limit)
        if window != v.window:
            _U16.pack_into(b, t + 14, window)
    if opts:
        o = opts.get(OPT_TIMESTAMP)
        if o is not None:
            tsval, tsecr = _TS.unpack_from(b, o + 2)
            tsecr = (tsecr + tr.tsecr_delta) & _MASK32
            floor = tr.tsecr_floor
            if floor is not None and (tsecr - floor) & 0x80000000:   # seq.lt(tsecr, floor)
                tsecr = floor
            tsval = (tsval + tr.tsval_delta) & _MASK32
            if tsval_floor is not None and (tsval - tsval_floor) & 0x80000000:   # seq.lt
                tsval = tsval_floor
            _TS.pack_into(b, o + 2, tsval, tsecr)
        o = opts.get(OPT_SACK)
        if o is not None and tr.ack_delta and v.flags & ACK:
            for e in range(o + 2, o + b[o + 1], 4):
                _U32.pack_into(b, e, (_U32.unpack_from(b, e)[0] + tr.ack_delta) & _MASK32)
    # IPv4 header checksum, recomputed over the 20 bytes.
    _U16.pack_into(b, 10, checksum.ip_header(b[:t]))
    if full_checksum:
        c = checksum.full_tcp(tr.src, tr.dst, b[t:], 16)
    else:
        c = checksum.incremental(old_check, old, bytes(b[12:hdr_end]))
    _U16.pack_into(b, t + 16, c)
    return window


def ack_only(v: TCPView) -> bytearray:
    """A copy of V's headers as a pure ACK: no payload, FIN/PSH/URG cleared, same
    sequence, acknowledgement, window and options; checksums computed in full."""
    b = v.buf
    t = v.t
    out = bytearray(b[:v.payload_off])
    struct.pack_into("!H", out, 2, len(out))
    out[t + 13] = v.flags & ~(FIN | PSH | URG)
    out[t + 18] = out[t + 19] = 0     # urgent pointer
    out[10] = out[11] = 0
    _U16.pack_into(out, 10, checksum.ip_header(out[:t]))
    _U16.pack_into(out, t + 16, checksum.full_tcp(bytes(out[12:16]), bytes(out[16:20]),
                                                  memoryview(out)[t:], 16))
    return out


def build(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
          window: int = 65535, options: bytes = b"", payload: bytes = b"", ttl: int = 64,
          ident: int = 0) -> bytearray:
    """An IPv4/TCP packet with correct checksums (tests, pcap replay, synthetic segments)."""
    if len(options) % 4:
        options += b"\x01" * (4 - len(options) % 4)
    doff = 20 + len(options)
    total = 20 + doff + len(payload)
    pkt = bytearray(total)
    struct.pack_into("!BBHHHBBH4s4s", pkt, 0, 0x45, 0, total, ident, 0x4000, ttl, IPPROTO_TCP, 0, src, dst)
    struct.pack_into("!HHIIBBHHH", pkt, 20, sport, dport, seq & _MASK32, ack & _MASK32,
                     (doff // 4) << 4, flags, window, 0, 0)
    pkt[40:40 + len(options)] = options
    pkt[20 + doff:] = payload
    _U16.pack_into(pkt, 10, checksum.ip_header(pkt[:20]))
    _U16.pack_into(pkt, 36, checksum.full_tcp(src, dst, memoryview(pkt)[20:], 16))
    return pkt


def timestamp_option(tsval: int, tsecr: int) -> bytes:
    return b"\x01\x01\x08\x0a" + _TS.pack(tsval & _MASK32, tsecr & _MASK32)


def sack_option(blocks: list[tuple[int, int]]) -> bytes:
    body = b"".join(_TS.pack(l & _MASK32, r & _MASK32) for l, r in blocks)
    return b"\x01\x01" + bytes([OPT_SACK, 2 + len(body)]) + body
