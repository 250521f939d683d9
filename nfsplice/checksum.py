"""Internet checksums (RFC 1071) for IPv4 and TCP.

Two ways, as DESIGN.md says:
- `full_tcp(...)`: the whole segment summed with numpy, needed when the packet's
  checksum field is not a full checksum (GSO packets and locally generated packets
  whose checksum the kernel left CHECKSUM_PARTIAL, NFQA_SKB_CSUMNOTREADY).
- `incremental(...)`: RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), over the bytes that
  changed, when the old checksum is a full one.

`ones_sum` returns the 16-bit one's complement sum (not inverted) of big-endian words.
"""
from __future__ import annotations

import struct

import numpy as np

IPPROTO_TCP = 6
_LITTLE = np.little_endian


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ones_sum(data, start: int = 0) -> int:
    """One's complement sum of DATA as big-endian 16-bit words (odd length padded)."""
    n = len(data)
    if n < 256:
        # 2**16 == 1 (mod 0xFFFF): the big integer's residue is the end-around-carry sum,
        # except that a non-zero sum of 0xFFFF comes out as 0.
        v = int.from_bytes(data, "big")
        if n & 1:
            v <<= 8
        s = v % 0xFFFF
        if s == 0 and v:
            s = 0xFFFF
        return _fold(s + start) if start else s
    # Bulk: native 32-bit words summed in 64 bits; the fold of little-endian words
    # is the byte-swapped fold of big-endian ones (RFC 1071, byte order independence).
    body = n & ~3
    words = np.frombuffer(data, dtype=np.uint32, count=body // 4)
    s = _fold(int(words.sum(dtype=np.uint64)))
    if _LITTLE:
        s = ((s & 0xFF) << 8) | (s >> 8)
    tail = bytes(data[body:])
    if tail:
        if len(tail) & 1:
            tail += b"\0"
        s += sum(struct.unpack(f"!{len(tail) // 2}H", tail))
    return _fold(s + start)


def ip_header(hdr) -> int:
    """The IPv4 header checksum of HDR, its checksum field (bytes 10-11) ignored."""
    s = ones_sum(hdr)
    old = (hdr[10] << 8) | hdr[11]
    s = _fold(s + ((~old) & 0xFFFF)) if old else s
    return (~s) & 0xFFFF


def pseudo_sum(src: bytes, dst: bytes, tcp_len: int) -> int:
    """Sum of the TCP pseudo-header (RFC 9293 section 3.1)."""
    return ones_sum(src + dst + struct.pack("!HH", IPPROTO_TCP, tcp_len))


def full_tcp(src: bytes, dst: bytes, segment, check_off: int) -> int:
    """The TCP checksum of SEGMENT (header + payload) with the field at CHECK_OFF ignored."""
    s = pseudo_sum(src, dst, len(segment))
    s = ones_sum(segment, s)
    old = struct.unpack_from("!H", segment, check_off)[0]
    # Remove the stored field's contribution instead of copying the segment to zero it.
    s = _fold(s + ((~old) & 0xFFFF))
    return (~s) & 0xFFFF


def incremental(old_check: int, old_bytes: bytes, new_bytes: bytes) -> int:
    """RFC 1624 eqn. 3 for a change of OLD_BYTES into NEW_BYTES (same even length)."""
    s = ((~old_check) & 0xFFFF) + ((~ones_sum(old_bytes)) & 0xFFFF) + ones_sum(new_bytes)
    return (~_fold(s)) & 0xFFFF
