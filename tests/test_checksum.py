"""nfsplice.checksum: RFC 1071 sums, TCP/IP checksums, RFC 1624 incremental update.

The references are deliberately naive (one 16-bit word at a time, end-around carry) and
the checksums are compared with scapy's own, computed from scapy-built packets.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from scapy.all import IP, TCP, raw
from scapy.layers.inet import in4_chksum

from nfsplice import checksum as C

HYP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MID = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def naive_ones_sum(data: bytes, start: int = 0) -> int:
    """Word by word, carrying round at every step (RFC 1071 section 4.1's loop)."""
    data = bytes(data)
    if len(data) % 2:
        data += b"\0"
    s = start
    for hi, lo in zip(data[0::2], data[1::2]):
        s += (hi << 8) | lo
        if s > 0xFFFF:
            s -= 0xFFFF                       # end-around carry
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def naive_check(data: bytes) -> int:
    return (~naive_ones_sum(data)) & 0xFFFF


addr4 = st.binary(min_size=4, max_size=4)


# ---------------------------------------------------------------- ones_sum


def test_ones_sum_known_values():
    assert C.ones_sum(b"") == 0
    assert C.ones_sum(b"\x12") == 0x1200            # odd length: padded with a zero byte
    assert C.ones_sum(b"\x12\x34") == 0x1234
    assert C.ones_sum(b"\xff\xff") == 0xFFFF
    assert C.ones_sum(b"\xff\xff\x00\x01") == 0x0001  # end-around carry
    assert C.ones_sum(b"\x80\x00\x80\x00") == 0x0001
    # RFC 1071 section 3 example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
    assert C.ones_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2
    assert C.ones_sum(bytes(1000)) == 0
    assert C.ones_sum(b"\xff" * 1000) == 0xFFFF
    assert C.ones_sum(b"\xff" * 1001) == naive_ones_sum(b"\xff" * 1001)


def test_ones_sum_every_length_matches_naive():
    """Every length 0..200: both sides of the 64-byte switch to numpy, odd and even."""
    import random
    rnd = random.Random(1071)
    for n in range(0, 201):
        for _ in range(5):
            data = rnd.randbytes(n)
            want = naive_ones_sum(data)
            assert C.ones_sum(data) == want, (n, data.hex())
            assert C.ones_sum(bytearray(data)) == want, n
            assert C.ones_sum(memoryview(data)) == want, n
            # The same bytes at an odd, unaligned offset of a larger buffer.
            assert C.ones_sum(memoryview(b"\x77" + data)[1:]) == want, n
        for fill in (0x00, 0xFF, 0x80, 0x01):
            data = bytes([fill]) * n
            assert C.ones_sum(data) == naive_ones_sum(data), (n, fill)


@given(st.binary(max_size=200), st.integers(0, 0xFFFF))
def test_ones_sum_small_with_start(data, start):
    assert C.ones_sum(data, start) == naive_ones_sum(data, start)


@HYP
@given(st.binary(min_size=64, max_size=9000), st.integers(0, 0xFFFF))
def test_ones_sum_bulk_matches_naive(data, start):
    assert C.ones_sum(data, start) == naive_ones_sum(data, start)


@pytest.mark.parametrize("n", [4093, 4096, 65535, 65536, 65537, 131071])
@pytest.mark.parametrize("kind", ["rand", "ff", "00"])
def test_ones_sum_large_lengths(n, kind):
    import random
    rnd = random.Random(n)
    if kind == "rand":
        data = rnd.randbytes(n)
    elif kind == "ff":
        data = b"\xff" * n
    else:
        data = bytes(n)
    assert C.ones_sum(data) == naive_ones_sum(data)


@HYP
@given(st.binary(min_size=0, max_size=3000), st.integers(0, 7), st.integers(0, 7))
def test_ones_sum_unaligned_memoryview_slices(data, lo, hi_cut):
    """Slices starting at odd and unaligned offsets hit numpy's unaligned-buffer path."""
    buf = bytearray(b"\xa5" * 8 + data + b"\x5a" * 8)
    view = memoryview(buf)
    sl = view[lo:len(buf) - hi_cut]
    assert C.ones_sum(sl) == naive_ones_sum(bytes(sl))
    assert C.ones_sum(view[1:]) == naive_ones_sum(bytes(buf[1:]))
    assert C.ones_sum(memoryview(bytes(buf))[3:]) == naive_ones_sum(bytes(buf[3:]))


def test_ones_sum_does_not_modify_or_lock_buffer():
    buf = bytearray(range(256)) * 4
    before = bytes(buf)
    C.ones_sum(memoryview(buf)[1:])
    assert bytes(buf) == before
    buf += b"x"             # no numpy export left holding the bytearray


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_ones_sum_concatenation_of_even_parts(a, b):
    """RFC 1071: the sum of a concatenation is the sum of the sums (even first part)."""
    if len(a) % 2:
        a = a[:-1]
    whole = C.ones_sum(a + b)
    parts = C.ones_sum(b, C.ones_sum(a))
    # Equal as one's complement numbers; 0x0000 and 0xffff (the two zeros) only differ
    # when everything summed is zero, and then both are 0.
    assert parts == whole


# ---------------------------------------------------------------- ip_header


ip_hdr_fields = st.fixed_dictionaries({
    "src": st.ip_addresses(v=4).map(str),
    "dst": st.ip_addresses(v=4).map(str),
    "ttl": st.integers(0, 255),
    "id": st.integers(0, 0xFFFF),
    "tos": st.integers(0, 255),
    "flags": st.sampled_from([0, 1, 2, 4]),
    "frag": st.integers(0, 0x1FFF),
    "len": st.integers(20, 0xFFFF),
    "proto": st.integers(0, 255),
})


@MID
@given(ip_hdr_fields, st.integers(0, 0xFFFF))
def test_ip_header_matches_scapy(f, junk):
    hdr = bytearray(raw(IP(**f)))
    assert len(hdr) == 20
    want = struct.unpack_from("!H", hdr, 10)[0]        # scapy filled it in
    # The stored field is skipped, whatever it holds.
    struct.pack_into("!H", hdr, 10, junk)
    assert C.ip_header(hdr) == want
    assert C.ip_header(memoryview(hdr)) == want
    hdr[10:12] = b"\0\0"
    assert C.ip_header(bytes(hdr)) == want
    # And the result verifies: the sum over the header including the field is 0xffff.
    struct.pack_into("!H", hdr, 10, want)
    assert naive_ones_sum(bytes(hdr)) == 0xFFFF


def test_ip_header_known_value():
    # Wikipedia's worked example header.
    hdr = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert C.ip_header(hdr) == 0xB861


# ---------------------------------------------------------------- pseudo_sum / full_tcp


@given(addr4, addr4, st.integers(0, 0xFFFF))
def test_pseudo_sum(src, dst, n):
    assert C.pseudo_sum(src, dst, n) == naive_ones_sum(src + dst + bytes([0, 6]) + struct.pack("!H", n))


tcp_seg = st.fixed_dictionaries({
    "src": st.ip_addresses(v=4).map(str),
    "dst": st.ip_addresses(v=4).map(str),
    "sport": st.integers(0, 0xFFFF),
    "dport": st.integers(0, 0xFFFF),
    "seq": st.integers(0, 0xFFFFFFFF),
    "ack": st.integers(0, 0xFFFFFFFF),
    "flags": st.integers(0, 0xFF),
    "window": st.integers(0, 0xFFFF),
    "urgptr": st.integers(0, 0xFFFF),
    "payload": st.one_of(st.binary(max_size=100), st.binary(min_size=100, max_size=3000)),
    "opts": st.lists(st.sampled_from([("NOP", None), ("MSS", 1460), ("WScale", 7),
                                      ("SAckOK", b""), ("Timestamp", (1, 2))]), max_size=5),
})


def scapy_tcp(f):
    pkt = IP(src=f["src"], dst=f["dst"]) / TCP(
        sport=f["sport"], dport=f["dport"], seq=f["seq"], ack=f["ack"], flags=f["flags"],
        window=f["window"], urgptr=f["urgptr"], options=f["opts"]) / f["payload"]
    b = raw(pkt)          # scapy computes both checksums while building
    return b


@MID
@given(tcp_seg, st.integers(0, 0xFFFF))
def test_full_tcp_matches_scapy(f, junk):
    b = bytearray(scapy_tcp(f))
    src, dst = bytes(b[12:16]), bytes(b[16:20])
    seg = b[20:]
    want = struct.unpack_from("!H", seg, 16)[0]
    # scapy's own checksum routine over the segment with the field zeroed agrees too.
    zeroed = bytearray(seg)
    zeroed[16:18] = b"\0\0"
    assert in4_chksum(6, IP(bytes(b)), bytes(zeroed)) == want
    assert C.full_tcp(src, dst, bytes(seg), 16) == want
    # Whatever the field holds is ignored, and a memoryview slice of the packet works.
    struct.pack_into("!H", b, 36, junk)
    assert C.full_tcp(src, dst, memoryview(b)[20:], 16) == want
    assert C.full_tcp(src, dst, bytes(zeroed), 16) == want


@HYP
@given(addr4, addr4, st.binary(min_size=20, max_size=2000))
def test_full_tcp_matches_naive(src, dst, seg):
    seg = bytearray(seg)
    zeroed = bytearray(seg)
    zeroed[16:18] = b"\0\0"
    pseudo = src + dst + bytes([0, 6]) + struct.pack("!H", len(seg))
    want = naive_check(pseudo + bytes(zeroed))
    assert C.full_tcp(src, dst, bytes(seg), 16) == want
    # A checksum written into the field verifies: the sum including it is 0xffff.
    seg[16:18] = struct.pack("!H", want)
    assert naive_ones_sum(pseudo + bytes(seg)) == 0xFFFF


def test_full_tcp_ignores_checksum_partial_field():
    """The kernel leaves CHECKSUM_PARTIAL packets with the pseudo-header sum in the field."""
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    seg = bytearray(scapy_tcp({"src": "10.0.0.1", "dst": "10.0.0.2", "sport": 1, "dport": 2,
                               "seq": 3, "ack": 4, "flags": 0x10, "window": 5, "urgptr": 0,
                               "payload": bytes(range(256)) * 6, "opts": []})[20:])
    want = struct.unpack_from("!H", seg, 16)[0]
    struct.pack_into("!H", seg, 16, C.pseudo_sum(src, dst, len(seg)))
    assert C.full_tcp(src, dst, seg, 16) == want


def test_full_tcp_result_zero_when_sum_is_ffff():
    """A segment whose sum is 0xffff has checksum 0x0000 (TCP does not remap it)."""
    src, dst = bytes(4), bytes(4)
    seg = bytearray(20)
    s = naive_ones_sum(src + dst + bytes([0, 6]) + struct.pack("!H", 20))
    struct.pack_into("!H", seg, 0, 0xFFFF - s)
    assert C.full_tcp(src, dst, seg, 16) == 0
    assert naive_check(src + dst + bytes([0, 6]) + struct.pack("!H", 20) + bytes(seg)) == 0


# ---------------------------------------------------------------- incremental (RFC 1624)


@st.composite
def header_change(draw):
    """A header (with a fixed non-zero word, as every real one has) and an aligned change."""
    nwords = draw(st.integers(2, 30))
    words = draw(st.lists(st.integers(0, 0xFFFF), min_size=nwords, max_size=nwords))
    words[0] = draw(st.integers(1, 0xFFFF))           # e.g. the protocol in the pseudo-header
    i = draw(st.integers(1, nwords - 1))
    j = draw(st.integers(i + 1, nwords))
    new_words = draw(st.lists(st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 0xFFFF])),
                              min_size=j - i, max_size=j - i))
    return words, i, j, new_words


def _pack(words):
    return struct.pack(f"!{len(words)}H", *words)


def _check_incremental(words, i, j, new_words):
    old = _pack(words)
    old_check = naive_check(old)
    new_all = words[:i] + new_words + words[j:]
    new = _pack(new_all)
    got = C.incremental(old_check, _pack(words[i:j]), _pack(new_words))
    assert got == naive_check(new), (words, i, j, new_words)
    # Incremental update back again returns the original checksum.
    assert C.incremental(got, _pack(new_words), _pack(words[i:j])) == old_check


@settings(max_examples=150, deadline=None)
@given(header_change())
def test_incremental_equals_full_recompute(hc):
    _check_incremental(*hc)


@settings(max_examples=100, deadline=None)
@given(header_change(), st.sampled_from(["old_ffff", "new_ffff", "both"]))
def test_incremental_edge_sums(hc, which):
    """Force the whole-header sum to 0xffff (checksum 0x0000) before and/or after."""
    words, i, j, new_words = hc
    last = len(words) - 1
    if which in ("old_ffff", "both") and not (i <= last < j):
        rest = naive_ones_sum(_pack(words[:last]))
        words[last] = 0xFFFF - rest
        assert naive_check(_pack(words)) == 0
    if which in ("new_ffff", "both"):
        new_all = words[:i] + new_words + words[j:]
        k = j - 1                               # the last changed word
        rest = naive_ones_sum(_pack(new_all[:k] + new_all[k + 1:]))
        new_words[k - i] = 0xFFFF - rest
        assert naive_check(_pack(words[:i] + new_words + words[j:])) == 0
    _check_incremental(words, i, j, new_words)


@pytest.mark.parametrize("m, m2", [(0x0000, 0xFFFF), (0xFFFF, 0x0000), (0x0000, 0x0000),
                                   (0xFFFF, 0xFFFF), (0x1234, 0x1234), (0x0001, 0xFFFE)])
@pytest.mark.parametrize("other", [0x0001, 0x1234, 0xFFFE, 0xFFFF, 0xEDCB])
def test_incremental_rfc1624_examples(m, m2, other):
    """RFC 1624 section 3's troublesome cases: zero and minus-zero words and sums."""
    _check_incremental([other, m], 1, 2, [m2])
    _check_incremental([other, m, 0xFFFF - other], 1, 2, [m2])


def test_incremental_rfc1624_section4_example():
    # RFC 1624 section 4: HC = 0xDD2F, m = 0x5555 -> m' = 0x3285 gives HC' = 0x0000.
    assert C.incremental(0xDD2F, b"\x55\x55", b"\x32\x85") == 0x0000


def test_incremental_no_change_is_identity():
    for hc in (0x0000, 0x0001, 0x1234, 0xFFFE):
        for m in (b"", b"\x00\x00", b"\xff\xff", b"\x12\x34\x56\x78"):
            assert C.incremental(hc, m, m) == hc
