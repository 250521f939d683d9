"""nfsplice.packet: TCPView parsing, Malformed reasons, options, build() and rewrite().

Results are checked against scapy: checksums are recomputed by scapy from the exact
bytes (fields deleted, packet re-serialised), never trusted from our own code.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from scapy.all import IP, TCP, Raw, raw
from scapy.layers.inet import in4_chksum
from scapy.utils import checksum as scapy_checksum

from nfsplice import checksum as C
from nfsplice import packet as P
from nfsplice.packet import (ACK, FIN, PSH, RST, SYN, URG, Malformed, TCPView, Translation,
                             build, convert_window, parse_options, rewrite, sack_option,
                             syn_options, timestamp_option)

HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MID = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MASK32 = 0xFFFFFFFF
A = bytes([10, 0, 0, 1])
B = bytes([10, 0, 0, 2])

u32 = st.integers(0, MASK32)
u16 = st.integers(0, 0xFFFF)
addr4 = st.binary(min_size=4, max_size=4)
seqnum = st.one_of(u32, st.integers(MASK32 - 3000, MASK32), st.integers(0, 3000))
delta = st.one_of(st.integers(-(1 << 32), 1 << 32), st.integers(-3000, 3000),
                  st.sampled_from([0, 1, -1, 1 << 31, -(1 << 31), MASK32]))


# ---------------------------------------------------------------- helpers


def scapy_verify(pkt: bytes) -> None:
    """Recompute both checksums in scapy from PKT's bytes and compare with the stored ones.

    The payload is re-attached as Raw so scapy's port-based dissectors cannot change how
    it re-serialises; then deleting the checksum fields and rebuilding must give back
    exactly PKT."""
    pkt = bytes(pkt)
    ip = IP(pkt)
    tcp = ip[TCP]
    payload = pkt[20 + tcp.dataofs * 4:]
    tcp.remove_payload()
    if payload:
        tcp.add_payload(Raw(payload))
    ip_ck, tcp_ck = ip.chksum, tcp.chksum
    del ip.chksum
    del tcp.chksum
    rebuilt = raw(ip)
    assert rebuilt[10:12] == pkt[10:12], f"IP checksum {ip_ck:#06x}, scapy {rebuilt[10:12].hex()}"
    assert rebuilt[36:38] == pkt[36:38], f"TCP checksum {tcp_ck:#06x}, scapy {rebuilt[36:38].hex()}"
    assert rebuilt == pkt
    # And scapy's checksum primitives over the raw bytes with the fields zeroed.
    hdr = bytearray(pkt[:20])
    hdr[10:12] = b"\0\0"
    assert scapy_checksum(bytes(hdr)) == struct.unpack_from("!H", pkt, 10)[0]
    seg = bytearray(pkt[20:])
    seg[16:18] = b"\0\0"
    assert in4_chksum(6, IP(pkt), bytes(seg)) == struct.unpack_from("!H", pkt, 36)[0]


def view(pkt) -> TCPView:
    return TCPView(memoryview(pkt))


def with_total(pkt: bytearray) -> bytearray:
    struct.pack_into("!H", pkt, 2, len(pkt))
    return pkt


def tcp_hdr(doff_words: int = 5, flags: int = ACK) -> bytes:
    return struct.pack("!HHIIBBHHH", 1, 2, 3, 4, doff_words << 4, flags, 5, 0, 0)


def ip_hdr(total: int, *, vihl: int = 0x45, proto: int = 6, frag: int = 0x4000) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", vihl, 0, total, 0, frag, 64, proto, 0, A, B)


def raw_packet(tcp: bytes, **ip_kw) -> bytearray:
    return bytearray(ip_hdr(20 + len(tcp), **ip_kw) + tcp)


def reason(pkt) -> str:
    with pytest.raises(Malformed) as ei:
        view(pkt)
    return ei.value.reason


# ---------------------------------------------------------------- strategies


@st.composite
def option_bytes(draw):
    """NOPs, a timestamp option and a SACK option of 1-4 blocks, in random order,
    within the 40 bytes TCP allows (build() pads to a multiple of 4 with NOPs)."""
    items = []
    if draw(st.booleans()):
        items.append(b"\x08\x0a" + struct.pack("!II", draw(u32), draw(u32)))
    if draw(st.booleans()):
        n = draw(st.integers(1, 4))
        blocks = [(draw(seqnum), draw(seqnum)) for _ in range(n)]
        items.append(bytes([5, 2 + 8 * n]) + b"".join(struct.pack("!II", l, r) for l, r in blocks))
    items += [b"\x01"] * draw(st.integers(0, 4))
    items = draw(st.permutations(items))
    out = b""
    for it in items:
        if len(out) + len(it) <= 40:
            out += it
    return out


@st.composite
def packets(draw, flags=None):
    opts = draw(option_bytes())
    f = draw(st.integers(0, 0xFF)) if flags is None else flags
    return build(draw(addr4), draw(addr4), draw(u16), draw(u16), draw(seqnum), draw(seqnum), f,
                 window=draw(u16), options=opts,
                 payload=draw(st.one_of(st.binary(max_size=64), st.binary(max_size=3000))),
                 ttl=draw(st.integers(0, 255)), ident=draw(u16))


@st.composite
def translations(draw, shifts=None):
    if shifts is None:
        s_in, s_out = draw(st.integers(0, 14)), draw(st.integers(0, 14))
    else:
        s_in, s_out = shifts
    return Translation(draw(addr4), draw(addr4), draw(u16), draw(u16), draw(delta), draw(delta),
                       s_in, s_out, draw(delta), draw(delta))


def inverse(orig: TCPView, tr: Translation) -> Translation:
    """Maps the translated packet back onto the original's addresses and numbers."""
    return Translation(orig.src, orig.dst, orig.sport, orig.dport, -tr.seq_delta, -tr.ack_delta,
                       tr.win_shift_out, tr.win_shift_in, -tr.tsval_delta, -tr.tsecr_delta)


# ---------------------------------------------------------------- build()


@MID
@given(packets())
def test_build_is_valid_for_scapy(pkt):
    scapy_verify(pkt)


def test_build_fields_in_scapy():
    opts = timestamp_option(0x11223344, 0x55667788) + sack_option([(1, 2), (3, 4)])
    pkt = build(A, B, 1234, 80, (1 << 32) + 5, -1, ACK | PSH, window=512, options=opts,
                payload=b"hello", ttl=33, ident=77)
    p = IP(bytes(pkt))
    assert (p.version, p.ihl, p.len, p.id, p.ttl, p.proto) == (4, 5, len(pkt), 77, 33, 6)
    assert p.flags == "DF" and p.frag == 0
    assert (p.src, p.dst) == ("10.0.0.1", "10.0.0.2")
    t = p[TCP]
    assert (t.sport, t.dport, t.seq, t.ack, t.window) == (1234, 80, 5, MASK32, 512)
    assert t.flags == "PA"
    assert t.dataofs * 4 == 20 + len(opts)
    assert dict(t.options)["Timestamp"] == (0x11223344, 0x55667788)
    assert dict(t.options)["SAck"] == (1, 2, 3, 4)
    assert bytes(t.payload) == b"hello"
    scapy_verify(pkt)


def test_build_pads_options_with_nops():
    pkt = build(A, B, 1, 2, 3, 4, SYN, options=b"\x02\x04\x05\xb4\x03\x03\x07")  # MSS, wscale
    v = view(pkt)
    assert v.doff == 28
    assert bytes(pkt[40:48]) == b"\x02\x04\x05\xb4\x03\x03\x07\x01"
    assert v.options() == {2: 40, 3: 44}
    scapy_verify(pkt)


def test_option_helpers():
    assert timestamp_option(1, -1) == b"\x01\x01\x08\x0a" + struct.pack("!II", 1, MASK32)
    s = sack_option([(1, 2), ((1 << 32) + 3, -4)])
    assert s == b"\x01\x01\x05\x12" + struct.pack("!IIII", 1, 2, 3, MASK32 - 3)


# ---------------------------------------------------------------- TCPView


@MID
@given(packets())
def test_tcpview_fields_match_scapy(pkt):
    v = view(pkt)
    p = IP(bytes(pkt))
    t = p[TCP]
    assert v.src == bytes(pkt[12:16]) and v.dst == bytes(pkt[16:20])
    assert (v.sport, v.dport, v.seq, v.ack, v.window) == (t.sport, t.dport, t.seq, t.ack, t.window)
    assert v.flags == int(t.flags)
    assert v.t == 20
    assert v.doff == t.dataofs * 4
    assert v.payload_off == 20 + v.doff
    assert v.payload_len == len(pkt) - 20 - v.doff
    assert bytes(v.payload()) == bytes(pkt[v.payload_off:])
    assert v.key() == bytes(pkt[12:20]) + struct.pack("!HH", t.sport, t.dport)
    want_len = v.payload_len + bool(v.flags & SYN) + bool(v.flags & FIN)
    assert v.seg_len() == want_len


def test_tcpview_is_zero_copy():
    pkt = build(A, B, 1, 2, 3, 4, ACK, payload=b"abc")
    v = view(pkt)
    v.payload()[0] = ord("X")
    assert pkt[40] == ord("X")
    assert v.buf.obj is pkt


@pytest.mark.parametrize("flags, extra", [(0, 0), (SYN, 1), (FIN, 1), (SYN | FIN, 2),
                                          (ACK | RST, 0)])
def test_seg_len(flags, extra):
    assert view(build(A, B, 1, 2, 3, 4, flags, payload=b"x" * 7)).seg_len() == 7 + extra
    assert view(build(A, B, 1, 2, 3, 4, flags)).seg_len() == extra


def test_tcpview_accepts_df_and_reserved_bit_and_big_doff():
    assert view(raw_packet(tcp_hdr(), frag=0x4000)).seq == 3
    assert view(raw_packet(tcp_hdr(), frag=0x0000)).seq == 3
    assert view(raw_packet(tcp_hdr(), frag=0x8000)).seq == 3        # evil bit: not a fragment
    v = view(raw_packet(tcp_hdr(15) + b"\x01" * 40))
    assert v.doff == 60 and v.payload_len == 0
    assert v.options() == {}


# ---------------------------------------------------------------- Malformed


def test_malformed_is_valueerror_with_reason():
    e = Malformed("truncated", "3 bytes")
    assert isinstance(e, ValueError)
    assert e.reason == "truncated"
    assert str(e) == "truncated: 3 bytes"
    assert str(Malformed("fragment")) == "fragment"


@pytest.mark.parametrize("n", [0, 1, 19])
def test_malformed_truncated_ip(n):
    pkt = bytearray(build(A, B, 1, 2, 3, 4, ACK))[:n]
    assert reason(pkt) == "truncated"


@pytest.mark.parametrize("tcp_len", [0, 1, 10, 19])
def test_malformed_truncated_tcp(tcp_len):
    assert reason(raw_packet(tcp_hdr()[:tcp_len])) == "truncated"


@pytest.mark.parametrize("version", [0, 5, 6, 15])
def test_malformed_not_ipv4(version):
    pkt = raw_packet(tcp_hdr(), vihl=(version << 4) | 5)
    assert reason(pkt) == "not-ipv4"


@pytest.mark.parametrize("ihl_words, tcp_len", [(0, 20), (1, 20), (4, 20), (15, 20), (11, 20)])
def test_malformed_bad_ihl(ihl_words, tcp_len):
    # ihl < 5, or a header longer than the 40-byte packet.
    pkt = raw_packet(tcp_hdr(), vihl=0x40 | ihl_words)
    assert reason(pkt) == "bad-ihl"


@pytest.mark.parametrize("proto", [0, 1, 17, 41, 132, 255])
def test_malformed_not_tcp(proto):
    assert reason(raw_packet(tcp_hdr(), proto=proto)) == "not-tcp"


@pytest.mark.parametrize("delta_len", [-1, 1, -20, 100, 1000])
def test_malformed_bad_length(delta_len):
    pkt = build(A, B, 1, 2, 3, 4, ACK, payload=b"abcd")
    struct.pack_into("!H", pkt, 2, len(pkt) + delta_len)
    assert reason(pkt) == "bad-length"


def test_bad_length_buffer_longer_than_total():
    # Trailing bytes (e.g. Ethernet padding) are refused too: total != buffer length.
    pkt = build(A, B, 1, 2, 3, 4, ACK) + b"\0\0"
    assert reason(pkt) == "bad-length"


@pytest.mark.parametrize("frag", [0x2000, 0x6000, 0x0001, 0x4001, 0x1FFF, 0x0100, 0x3FFF])
def test_malformed_fragment(frag):
    """MF set, or a non-zero fragment offset (DF alone is fine)."""
    assert reason(raw_packet(tcp_hdr(), frag=frag)) == "fragment"


@pytest.mark.parametrize("opt_words", [1, 2, 10])
def test_malformed_ip_options(opt_words):
    pkt = bytearray(ip_hdr(0, vihl=0x40 | (5 + opt_words)) + b"\x01" * (4 * opt_words) + tcp_hdr())
    with_total(pkt)
    assert reason(pkt) == "ip-options"


def test_malformed_ip_options_from_scapy():
    from scapy.layers.inet import IPOption_NOP
    pkt = bytearray(raw(IP(src="10.0.0.1", dst="10.0.0.2", options=[IPOption_NOP()] * 4) / TCP()))
    assert pkt[0] == 0x46
    assert reason(pkt) == "ip-options"


@pytest.mark.parametrize("doff_words, tail", [(0, 0), (1, 0), (4, 0), (6, 0), (15, 39), (8, 11)])
def test_malformed_bad_data_offset(doff_words, tail):
    """Data offset below 5 words, or past the end of the packet."""
    assert reason(raw_packet(tcp_hdr(doff_words) + b"\x01" * tail)) == "bad-data-offset"


@pytest.mark.parametrize("mutate, want", [
    (lambda p: p.__setitem__(9, 17), "not-tcp"),
    (lambda p: p.__setitem__(0, 0x65), "not-ipv4"),
    (lambda p: p.__setitem__(6, 0x20), "fragment"),
])
def test_malformed_on_a_built_packet(mutate, want):
    pkt = build(A, B, 1, 2, 3, 4, ACK, payload=b"data")
    mutate(pkt)
    assert reason(pkt) == want


# ---------------------------------------------------------------- TCP options


def opts_packet(opts: bytes, flags: int = ACK, payload: bytes = b"") -> bytearray:
    """A packet whose TCP option area is exactly OPTS (a multiple of 4 bytes)."""
    assert len(opts) % 4 == 0
    return build(A, B, 1, 2, 3, 4, flags, options=opts, payload=payload)


BAD_OPTIONS = [
    pytest.param(b"\x02\x00\x00\x00", id="length-0"),
    pytest.param(b"\x02\x01\x00\x00", id="length-1"),
    pytest.param(b"\x13\x00\x01\x01", id="unknown-length-0"),
    pytest.param(b"\x01\x01\x01\x02", id="kind-at-last-byte"),
    pytest.param(b"\x02\x05\x05\xb4", id="overrun-by-1"),
    pytest.param(b"\x01\x01\x1e\xff", id="overrun-far"),
    pytest.param(b"\x08\x08" + bytes(6), id="timestamp-length-8"),
    pytest.param(b"\x08\x0c" + bytes(10), id="timestamp-length-12"),
    pytest.param(b"\x08\x02\x01\x01", id="timestamp-length-2"),
    pytest.param(b"\x05\x03\x00\x00", id="sack-length-3"),
    pytest.param(b"\x05\x09" + bytes(10), id="sack-length-9"),
    pytest.param(b"\x05\x0b" + bytes(10), id="sack-length-11"),
    pytest.param(b"\x05\x0c" + bytes(10), id="sack-length-12"),
    pytest.param(b"\x05\x11" + bytes(18), id="sack-length-17"),
    pytest.param(b"\x01\x01\x08\x0a" + bytes(8) + b"\x05\x06" + bytes(6), id="sack-6-after-ts"),
    pytest.param(b"\x01\x01\x08\x0a" + bytes(8) + b"\x02\x00\x00\x00", id="zero-after-ts"),
]


@pytest.mark.parametrize("opts", BAD_OPTIONS)
def test_bad_tcp_options(opts):
    pkt = opts_packet(opts, payload=b"payload bytes")     # the payload is not options
    v = view(pkt)                                          # the fixed headers parse
    with pytest.raises(Malformed) as ei:
        v.options()
    assert ei.value.reason == "bad-tcp-options"
    with pytest.raises(Malformed) as ei:
        parse_options(pkt, 40, v.payload_off)
    assert ei.value.reason == "bad-tcp-options"
    tr = Translation(B, A, 9, 8, 1, 1, 0, 0, 1, 1)
    with pytest.raises(Malformed) as ei:
        rewrite(v, tr, False)
    assert ei.value.reason == "bad-tcp-options"
    v = view(opts_packet(opts, payload=b"payload bytes"))
    with pytest.raises(Malformed) as ei:
        rewrite(v, tr, True)
    assert ei.value.reason == "bad-tcp-options"


@pytest.mark.parametrize("opts", BAD_OPTIONS)
def test_bad_tcp_options_in_syn(opts):
    v = view(opts_packet(opts, SYN))
    with pytest.raises(Malformed) as ei:
        syn_options(v)
    assert ei.value.reason == "bad-tcp-options"


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4])
def test_sack_lengths_2_plus_8n_accepted(n):
    opt = bytes([5, 2 + 8 * n]) + bytes(8 * n)
    opt += b"\x01" * (-len(opt) % 4)
    v = view(opts_packet(opt))
    assert v.options() == {5: 40}


def test_parse_options_offsets_nops_and_eol():
    opts = (b"\x01" + b"\x02\x04\x05\xb4" + b"\x01" + b"\x03\x03\x07" + b"\x04\x02"
            + b"\x08\x0a" + bytes(8) + b"\x01" + b"\x05\x0a" + bytes(8))   # 32 bytes
    v = view(opts_packet(opts))
    assert v.options() == {2: 41, 3: 46, 4: 49, 8: 51, 5: 62}
    # EOL ends the list; whatever follows (even garbage) is not parsed.
    v = view(opts_packet(b"\x02\x04\x05\xb4\x00\x02\x00\xff"))
    assert v.options() == {2: 40}
    v = view(opts_packet(b"\x00\x08\x02\x00"))
    assert v.options() == {}
    # Unknown kinds are skipped by their length and recorded.
    v = view(opts_packet(b"\x1e\x06" + bytes(4) + b"\x01\x01"))
    assert v.options() == {30: 40}
    assert view(opts_packet(b"")).options() == {}
    assert view(opts_packet(b"\x01" * 40)).options() == {}


def test_parse_options_within_range_only():
    buf = bytearray(b"\x01\x02\x04\x05\xb4\xff\xff")
    assert parse_options(buf, 1, 5) == {2: 1}
    assert parse_options(buf, 0, 0) == {}
    with pytest.raises(Malformed):
        parse_options(buf, 1, 4)          # the MSS option runs past END


# ---------------------------------------------------------------- syn_options


def test_syn_options_typical_linux_syn():
    opts = (b"\x02\x04\x05\xb4" + b"\x04\x02" + b"\x08\x0a" + struct.pack("!II", 12345, 0)
            + b"\x01" + b"\x03\x03\x07")
    so = syn_options(view(opts_packet(opts, SYN)))
    assert so == P.SynOptions(mss=1460, wscale=7, sack_permitted=True, timestamps=True)


def test_syn_options_none():
    so = syn_options(view(build(A, B, 1, 2, 3, 0, SYN)))
    assert so == P.SynOptions(None, None, False, False)
    assert so.mss is None and so.wscale is None and not so.sack_permitted and not so.timestamps


@given(st.integers(0, 255), u16, st.booleans(), st.booleans(), st.booleans(), st.booleans(),
       st.permutations(range(4)))
def test_syn_options_extracts_and_clamps(ws, mss, has_mss, has_ws, sackok, ts, order):
    parts = [b"\x02\x04" + struct.pack("!H", mss) if has_mss else b"",
             b"\x01\x03\x03" + bytes([ws]) if has_ws else b"",
             b"\x01\x01\x04\x02" if sackok else b"",
             b"\x01\x01\x08\x0a" + struct.pack("!II", 7, 8) if ts else b""]
    opts = b"".join(parts[i] for i in order)
    pkt = build(A, B, 1, 2, 3, 0, SYN | (ACK if ws & 1 else 0), options=opts)
    so = syn_options(view(pkt))
    assert so.mss == (mss if has_mss else None)
    assert so.wscale == (min(ws, 14) if has_ws else None)       # RFC 7323 2.3: at most 14
    assert so.sack_permitted is sackok
    assert so.timestamps is ts


@pytest.mark.parametrize("ws, want", [(0, 0), (7, 7), (14, 14), (15, 14), (255, 14)])
def test_syn_options_wscale_clamp(ws, want):
    so = syn_options(view(opts_packet(b"\x01\x03\x03" + bytes([ws]), SYN)))
    assert so.wscale == want


# A peer's SYN whose MSS (RFC 9293: length 4) or window-scale (RFC 7323: length 3) option
# is too short must not be read out of the neighbouring option or past the end of the
# buffer: IndexError / struct.error would escape the engine's `except Malformed`.
# Either answer is acceptable: Malformed("bad-tcp-options"), or the option ignored
# (what Linux's tcp_parse_options does with a wrong-length MSS or window scale).
@pytest.mark.parametrize("opts, field", [
    pytest.param(b"\x01\x01\x03\x02", "wscale", id="wscale-length-2-at-end"),
    pytest.param(b"\x01\x01\x02\x02", "mss", id="mss-length-2-at-end"),
    pytest.param(b"\x01\x01\x01\x01\x01\x02\x03\x01", "mss", id="mss-length-3-at-end"),
    pytest.param(b"\x02\x02\x03\x03\x07\x01\x01\x01", "mss", id="mss-length-2-then-wscale"),
    pytest.param(b"\x03\x02\x02\x04\x05\xb4\x01\x01", "wscale", id="wscale-length-2-then-mss"),
])
def test_syn_options_short_mss_wscale(opts, field):
    v = view(opts_packet(opts, SYN))
    try:
        so = syn_options(v)
    except Malformed as e:
        assert e.reason == "bad-tcp-options"
        return
    assert getattr(so, field) is None, so


# ---------------------------------------------------------------- convert_window


@given(u16, st.integers(0, 14))
def test_convert_window_same_shift_is_identity(w, s):
    assert convert_window(w, s, s) == w


@given(u16, st.integers(0, 14), st.integers(0, 14))
def test_convert_window_properties(w, s_in, s_out):
    got = convert_window(w, s_in, s_out)
    assert 0 <= got <= 0xFFFF
    if w:
        assert got != 0
    else:
        assert got == 0
    exact = (w << s_in) >> s_out
    if s_in != s_out:
        assert got == min(0xFFFF, max(exact, 1 if w else 0))
    if got > 1 or exact >= 1:
        # Rounded down: never more bytes than the sender offered.
        assert got << s_out <= w << s_in


@pytest.mark.parametrize("w, s_in, s_out, want", [
    (1000, 7, 7, 1000),
    (1000, 0, 7, 7),            # 1000 >> 7 = 7.8 -> 7
    (100, 0, 7, 1),             # 0.78 -> would be 0 -> 1
    (0, 0, 7, 0),
    (0, 7, 0, 0),
    (1000, 7, 0, 0xFFFF),       # 128000 clamps
    (511, 1, 0, 1022),
    (65535, 14, 0, 0xFFFF),
    (65535, 0, 14, 3),
    (1, 0, 14, 1),
    (3, 2, 3, 1),               # 12 >> 3 = 1.5 -> 1
])
def test_convert_window_examples(w, s_in, s_out, want):
    assert convert_window(w, s_in, s_out) == want


# ---------------------------------------------------------------- rewrite()


def expected_rewrite(pkt: bytearray, tr: Translation) -> bytearray:
    """What rewrite() must produce, built from scratch (checksums in full by build())."""
    v = view(bytearray(pkt))
    opts = bytearray(pkt[40:v.payload_off])
    o = parse_options(opts, 0, len(opts))
    if 8 in o:
        i = o[8] + 2
        tsval, tsecr = struct.unpack_from("!II", opts, i)
        struct.pack_into("!II", opts, i, (tsval + tr.tsval_delta) & MASK32,
                         (tsecr + tr.tsecr_delta) & MASK32)
    if 5 in o and v.flags & ACK:      # SACK edges are acknowledgement space
        i = o[5]
        for e in range(i + 2, i + opts[i + 1], 4):
            struct.pack_into("!I", opts, e, (struct.unpack_from("!I", opts, e)[0] + tr.ack_delta) & MASK32)
    window = v.window if v.flags & SYN else convert_window(v.window, tr.win_shift_in, tr.win_shift_out)
    ttl, ident = pkt[8], struct.unpack_from("!H", pkt, 4)[0]
    ack = v.ack + tr.ack_delta if v.flags & ACK else v.ack   # no ACK flag: field left alone
    out = build(tr.src, tr.dst, tr.sport, tr.dport, v.seq + tr.seq_delta, ack,
                v.flags, window=window, options=bytes(opts), payload=bytes(v.payload()),
                ttl=ttl, ident=ident)
    out[38:40] = pkt[38:40]           # urgent pointer (build() writes 0, as does ours)
    return out


@HYP
@given(packets(), translations())
def test_rewrite_both_modes_valid_identical_and_exact(pkt, tr):
    orig = bytes(pkt)
    a, b = bytearray(pkt), bytearray(pkt)
    va, vb = view(a), view(b)
    rewrite(va, tr, full_checksum=True)
    rewrite(vb, tr, full_checksum=False)
    assert a == b, "incremental and full checksums disagree"
    scapy_verify(a)
    assert a == expected_rewrite(bytearray(orig), tr)
    # Field by field, through the parser.
    v0, v1 = view(bytearray(orig)), view(a)
    assert (v1.src, v1.dst, v1.sport, v1.dport) == (tr.src, tr.dst, tr.sport, tr.dport)
    assert v1.seq == (v0.seq + tr.seq_delta) % (1 << 32)
    assert v1.ack == ((v0.ack + tr.ack_delta) % (1 << 32) if v0.flags & ACK else v0.ack)
    assert v1.flags == v0.flags and v1.doff == v0.doff
    assert bytes(v1.payload()) == bytes(v0.payload())
    assert a[:12] == orig[:10] + a[10:12]               # version..TTL/proto untouched
    o0, o1 = v0.options(), v1.options()
    assert o0 == o1
    if 8 in o0:
        tsval, tsecr = struct.unpack_from("!II", orig, o0[8] + 2)
        assert struct.unpack_from("!II", a, o1[8] + 2) == (
            (tsval + tr.tsval_delta) % (1 << 32), (tsecr + tr.tsecr_delta) % (1 << 32))
    if 5 in o0:
        i = o0[5]
        n = (orig[i + 1] - 2) // 4
        edges0 = struct.unpack_from(f"!{n}I", orig, i + 2)
        edges1 = struct.unpack_from(f"!{n}I", a, i + 2)
        delta = tr.ack_delta if v0.flags & ACK else 0
        assert edges1 == tuple((e + delta) % (1 << 32) for e in edges0)
    if v0.flags & SYN or tr.win_shift_in == tr.win_shift_out:
        assert v1.window == v0.window
    else:
        assert v1.window == convert_window(v0.window, tr.win_shift_in, tr.win_shift_out)


@HYP
@given(packets(), st.integers(0, 14).flatmap(lambda s: translations((s, s))),
       st.booleans(), st.booleans())
def test_rewrite_then_inverse_is_identity(pkt, tr, full1, full2):
    orig = bytes(pkt)
    v0 = view(bytearray(orig))
    v = view(pkt)
    rewrite(v, tr, full1)
    rewrite(view(pkt), inverse(v0, tr), full2)
    assert bytes(pkt) == orig


@FEW
@given(packets(flags=ACK), translations())
def test_rewrite_inverse_restores_window_when_exact(pkt, tr):
    """Window conversion loses only the bits the coarser scale cannot carry."""
    orig = bytes(pkt)
    v0 = view(bytearray(orig))
    rewrite(view(pkt), tr, False)
    rewrite(view(pkt), inverse(v0, tr), True)
    scapy_verify(pkt)
    # Everything but the window and the TCP checksum is back as it was.
    assert pkt[:34] == orig[:34] and pkt[38:] == orig[38:]
    scaled = v0.window << tr.win_shift_in
    if scaled % (1 << tr.win_shift_out) == 0 and scaled >> tr.win_shift_out <= 0xFFFF:
        assert view(pkt).window == v0.window
        assert pkt == orig


@pytest.mark.parametrize("full", [True, False])
def test_rewrite_leaves_window_alone_on_syn(full):
    for flags in (SYN, SYN | ACK):
        pkt = build(A, B, 1, 2, 3, 4, flags, window=29200, options=b"\x02\x04\x05\xb4\x01\x03\x03\x07")
        rewrite(view(pkt), Translation(B, A, 5, 6, 10, 20, 0, 7), full)
        assert view(pkt).window == 29200
        scapy_verify(pkt)
    pkt = build(A, B, 1, 2, 3, 4, ACK, window=29200)
    rewrite(view(pkt), Translation(B, A, 5, 6, 10, 20, 0, 7), full)
    assert view(pkt).window == 29200 >> 7
    scapy_verify(pkt)


def test_rewrite_sack_untouched_when_ack_delta_zero():
    opts = sack_option([(100, 200), (300, 400)])
    pkt = build(A, B, 1, 2, 3, 4, ACK, options=opts)
    rewrite(view(pkt), Translation(B, A, 5, 6, seq_delta=7, ack_delta=0), False)
    assert bytes(pkt[40:60]) == opts
    scapy_verify(pkt)


def test_rewrite_example_across_wrap():
    opts = timestamp_option(MASK32, 5) + sack_option([(MASK32 - 1, 3)])
    pkt = build(A, B, 1000, 80, MASK32 - 9, MASK32, ACK | PSH, window=100, options=opts,
                payload=b"x" * 20)
    tr = Translation(bytes([192, 168, 1, 1]), bytes([192, 168, 1, 2]), 40000, 8080,
                     seq_delta=20, ack_delta=2, win_shift_in=2, win_shift_out=0,
                     tsval_delta=1, tsecr_delta=-6)
    rewrite(view(pkt), tr, False)
    p = IP(bytes(pkt))
    assert (p.src, p.dst, p[TCP].sport, p[TCP].dport) == ("192.168.1.1", "192.168.1.2", 40000, 8080)
    assert (p[TCP].seq, p[TCP].ack, p[TCP].window) == (10, 1, 400)
    d = dict(p[TCP].options)
    assert d["Timestamp"] == (0, MASK32)
    assert d["SAck"] == (0, 5)
    scapy_verify(pkt)


@MID
@given(packets(), translations())
def test_rewrite_checksum_partial_packet_full_mode(pkt, tr):
    """CHECKSUM_PARTIAL: the kernel leaves the pseudo-header sum in the TCP field."""
    src, dst = bytes(pkt[12:16]), bytes(pkt[16:20])
    struct.pack_into("!H", pkt, 36, C.pseudo_sum(src, dst, len(pkt) - 20))
    want = bytearray(pkt)
    struct.pack_into("!H", want, 36, 0)
    rewrite(view(want), tr, True)         # reference: same rewrite from a zeroed field
    rewrite(view(pkt), tr, True)
    scapy_verify(pkt)
    assert pkt == want


def test_rewrite_checksum_partial_incremental_is_wrong():
    """Why the flag matters: incremental update of a partial checksum stays partial."""
    pkt = build(A, B, 1, 2, 3, 4, ACK, payload=b"abcdef" * 50)
    struct.pack_into("!H", pkt, 36, C.pseudo_sum(A, B, len(pkt) - 20))
    rewrite(view(pkt), Translation(B, A, 7, 8, 100, 200), False)
    with pytest.raises(AssertionError):
        scapy_verify(pkt)


@FEW
@given(packets(), translations())
def test_rewrite_is_in_place_on_a_memoryview_slice(pkt, tr):
    """The packet in a larger receive buffer (as from netlink), at an odd offset."""
    big = bytearray(b"\xee" * 3) + pkt + bytearray(b"\xdd" * 5)
    mv = memoryview(big)[3:3 + len(pkt)]
    rewrite(TCPView(mv), tr, True)
    rewrite(view(pkt), tr, False)
    assert big[:3] == b"\xee" * 3 and big[-5:] == b"\xdd" * 5
    assert big[3:3 + len(pkt)] == pkt
    scapy_verify(pkt)


# ---------------------------------------------------------------- Translation


def test_translation_inverse_addresses():
    tr = Translation(A, B, 1, 2)
    assert tr.inverse_addresses() == (B, A, 2, 1)
    assert (tr.seq_delta, tr.ack_delta, tr.win_shift_in, tr.win_shift_out,
            tr.tsval_delta, tr.tsecr_delta) == (0, 0, 0, 0, 0, 0)


# ---------------------------------------------------------------- ack_only


@FEW
@given(packets(flags=ACK | PSH | FIN | URG))
def test_ack_only(pkt):
    v = view(pkt)
    out = P.ack_only(v)
    w = view(out)
    assert w.payload_len == 0 and len(out) == v.payload_off
    assert w.flags == ACK
    assert (w.src, w.dst, w.sport, w.dport, w.seq, w.ack, w.window) == \
        (v.src, v.dst, v.sport, v.dport, v.seq, v.ack, v.window)
    assert bytes(out[40:]) == bytes(pkt[40:v.payload_off])
    assert out[38:40] == b"\0\0"
    scapy_verify(out)


def test_tsecr_never_translated_below_the_floor():
    """A TSecr echoing a proxy socket's own pre-splice TSval would translate to a value
    older than the receiver's last TSval; it is raised to that value instead."""
    src, dst = bytes([198, 18, 1, 2]), bytes([198, 18, 1, 1])
    pkt = build(src, dst, 40000, 9000, 1, 1, ACK, options=P.timestamp_option(500, 1000))
    tr = Translation(bytes([198, 18, 2, 1]), bytes([198, 18, 2, 2]), 61000, 9001,
                     tsecr_delta=-100, tsecr_floor=950)
    v = view(pkt)
    rewrite(v, tr, full_checksum=False)
    assert struct.unpack_from("!II", pkt, v.options()[8] + 2) == (500, 950)
    scapy_verify(pkt)
    # Across the 2**32 wrap the comparison is modular: 0xFFFFFF00 + 0x200 is "after" it.
    pkt = build(src, dst, 40000, 9000, 1, 1, ACK, options=P.timestamp_option(1, 0x100))
    tr.tsecr_delta, tr.tsecr_floor = 0, 0xFFFFFF00
    v = view(pkt)
    rewrite(v, tr, full_checksum=True)
    assert struct.unpack_from("!II", pkt, v.options()[8] + 2) == (1, 0x100)
