"""The tc-BPF fast path against the engine's own rewrite (packet.rewrite).

The program runs in the kernel with BPF_PROG_TEST_RUN on frames built here: for every
packet it forwards, the bytes must be exactly what `packet.rewrite` makes of it (the
checksums included); every packet it must leave to the engine (the list in
fastpath.bpf.c's header) must come out unchanged.  Hypothesis draws the translations
and the packets.  Needs root and clang/bpftool (installed by `make setup`): without
them these tests fail, naming what is missing.
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfsplice import fastpath, packet, seq
from nfsplice.engine import NEXT_MESSAGE_WINDOW
from nfsplice.packet import ACK, FIN, PSH, RST, SYN, URG, Translation, TCPView

pytestmark = pytest.mark.root

ETH = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
CLIENT, LISTEN = socket.inet_aton("198.18.1.2"), socket.inet_aton("198.18.1.1")
SOURCE, ORIGIN = socket.inet_aton("198.18.2.1"), socket.inet_aton("198.18.2.2")
U32 = st.integers(0, 2**32 - 1)


@pytest.fixture(scope="module")
def fp():
    why = fastpath.available()
    assert why is None, why
    f = fastpath.FastPath(f"test-{uuid.uuid4().hex[:6]}", attach=False)
    yield f
    f.close()


def _fast_packets(fp) -> int:
    return fp.counters().get("fastpath.fast_packets", 0)


translations = st.builds(
    Translation, st.just(SOURCE), st.just(ORIGIN), st.integers(1024, 65535), st.integers(1, 65535),
    seq_delta=U32, ack_delta=U32, win_shift_in=st.integers(0, 14), win_shift_out=st.integers(0, 14),
    tsval_delta=U32, tsecr_delta=U32, tsecr_floor=st.one_of(st.none(), U32))

OPTION_KINDS = ("none", "ts", "ts_sack", "sack", "sack_bare", "nop_pad", "mss")


@st.composite
def packets(draw):
    flags = draw(st.sampled_from([ACK, ACK | PSH, ACK | FIN, ACK | RST, SYN | ACK, ACK | URG, RST, ACK | PSH]))
    kind = draw(st.sampled_from(OPTION_KINDS))
    blocks = [(a, (a + 100) & 0xFFFFFFFF) for a in draw(st.lists(U32, min_size=1, max_size=4))]
    if kind == "ts":
        opts = packet.timestamp_option(draw(U32), draw(U32))
    elif kind == "ts_sack":     # NOP NOP TS NOP NOP SACK: at most 3 blocks fit
        opts = packet.timestamp_option(draw(U32), draw(U32)) + packet.sack_option(blocks[:3])
    elif kind == "sack":        # NOP NOP SACK
        opts = packet.sack_option(blocks)
    elif kind == "sack_bare":   # SACK without the NOPs: legal, but not a layout the program knows
        opts = packet.sack_option(blocks[:3])[2:] + b"\x01\x01"
    elif kind == "mss":
        opts = b"\x02\x04\x05\xb4"
    elif kind == "nop_pad":
        opts = b"\x01\x01\x01\x01"
    else:
        opts = b""
    payload = bytes(draw(st.binary(max_size=64)))
    return packet.build(CLIENT, LISTEN, 40000, 8080, draw(U32), draw(U32), flags,
                        window=draw(st.sampled_from([0, 1, 2, 500, 65535])), options=opts, payload=payload)


def _layout_known(pkt: bytearray, doff: int) -> bool:
    """Linux's option layouts the program translates itself."""
    o = bytes(pkt[40:20 + doff])
    if not o:
        return True
    if o[:4] == b"\x01\x01\x08\x0a":
        rest = o[12:]
        return not rest or (rest[:3] == b"\x01\x01\x05" and rest[3] == len(rest) - 2
                            and (len(rest) - 4) % 8 == 0 and len(rest) - 4 <= 32)
    return (o[:3] == b"\x01\x01\x05" and o[3] == len(o) - 2 and (len(o) - 4) % 8 == 0
            and 8 <= len(o) - 4 <= 32)


def expect_fast(pkt: bytearray, tr: Translation, end, watch, limit: bool = False) -> bool:
    """The program's rule (fastpath.bpf.c), restated: may this packet go fast?"""
    v = TCPView(memoryview(pkt))
    if v.flags & (SYN | FIN | RST | URG) or not v.flags & ACK:
        return False
    if not _layout_known(pkt, v.doff):
        return False
    if end is not None and seq.gt(seq.add(v.seq, v.payload_len), end):
        return False
    if watch is not None and seq.ge(seq.add(v.ack, tr.ack_delta), watch) and (v.payload_len or not limit):
        return False         # (a resuming pair's pure ACK goes on, and a copy to the queue)
    return True     # (a TSecr below the floor is raised to it, as packet.rewrite does)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tr=translations, pkt=packets(), end=st.one_of(st.none(), U32), watch=st.one_of(st.none(), U32),
       limit=st.booleans())
def test_program_rewrites_exactly_like_the_engine(fp, tr, pkt, end, watch, limit):
    key = bytes(pkt[12:20]) + bytes(pkt[20:24])
    fp.put(key, fastpath.flow_value(tr, end_seq=end, ack_watch=watch, ifindex=0, win_limit=limit))
    before = _fast_packets(fp)
    rv, out = fp.test_run(ETH + bytes(pkt))
    went_fast = _fast_packets(fp) - before == 1
    assert rv == fastpath.TC_ACT_OK
    assert out[:14] == ETH
    want = expect_fast(pkt, tr, end, watch, limit)
    assert went_fast == want, (want, pkt.hex())
    if want:
        ref = bytearray(pkt)
        win_limit = seq.add(watch, NEXT_MESSAGE_WINDOW) if limit and watch is not None else None
        packet.rewrite(TCPView(memoryview(ref)), tr, False, win_limit)
        assert out[14:] == bytes(ref), f"\n{out[14:].hex()}\n{bytes(ref).hex()}"
        # ... and the checksums are right, not merely equal to ours.
        v = TCPView(memoryview(bytearray(out[14:])))
        assert packet.checksum.full_tcp(v.src, v.dst, v.buf[20:], 16) == struct.unpack_from("!H", out, 14 + 36)[0]
    else:
        assert out[14:] == bytes(pkt)
    fp.take(key)


def test_unknown_flows_pass_untouched(fp):
    pkt = packet.build(CLIENT, LISTEN, 40001, 8080, 1, 2, ACK, payload=b"abc")
    rv, out = fp.test_run(ETH + bytes(pkt))
    assert rv == fastpath.TC_ACT_UNSPEC and out[14:] == bytes(pkt)
    arp = ETH[:12] + b"\x08\x06" + bytes(28)
    assert fp.test_run(arp)[0] == fastpath.TC_ACT_UNSPEC


def test_queue_mode_marks_only(fp):
    tr = Translation(SOURCE, ORIGIN, 61000, 80, seq_delta=5)
    pkt = packet.build(CLIENT, LISTEN, 40002, 8080, 1, 2, ACK, payload=b"abc")
    key = bytes(pkt[12:24])
    fp.put(key, fastpath.flow_value(tr, end_seq=None, ack_watch=None, ifindex=0, fast=False, mark=7))
    before = fp.counters().get("fastpath.queue_marked", 0)
    rv, out = fp.test_run(ETH + bytes(pkt))
    assert rv == fastpath.TC_ACT_OK and out[14:] == bytes(pkt)
    assert fp.counters()["fastpath.queue_marked"] == before + 1
    fp.take(key)


def test_progress_is_counted_and_taken(fp):
    tr = Translation(SOURCE, ORIGIN, 61000, 80, seq_delta=1000)
    key = CLIENT + LISTEN + struct.pack("!HH", 40003, 8080)
    fp.put(key, fastpath.flow_value(tr, end_seq=None, ack_watch=None, ifindex=0))
    for s in (100, 300, 200):    # the highest end counts, not the last
        pkt = packet.build(CLIENT, LISTEN, 40003, 8080, s, 2, ACK, payload=b"x" * 100)
        fp.test_run(ETH + bytes(pkt))
    got = fp.take(key)
    assert (got.packets, got.bytes, got.next_seq) == (3, 300, 400)
    assert got.last_ns > 0
    assert fp.take(key) is None and fp.get(key) is None


def test_attach_and_cleanup_in_a_namespace():
    """Filters go on every Ethernet device of the namespace and come off on close; the
    crash cleanup finds filters a dead instance left.  The same for the clone tap's
    veth pair, which no instance attaches to."""
    ns = f"fpt-{uuid.uuid4().hex[:6]}"
    sh = lambda *a: subprocess.run(a, check=True, capture_output=True, text=True)  # noqa: E731
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "add", "fa", "type", "veth", "peer", "name", "fb")
        sh("ip", "-n", ns, "link", "set", "fa", "up")
        sh("ip", "-n", ns, "link", "set", "fb", "up")
        code = (
            "import json, os, sys\n"
            "from nfsplice import fastpath\n"
            "f = fastpath.FastPath('nscheck')\n"
            "assert f.clones is not None and f.tap is None\n"
            "g = fastpath.FastPath('nscheck2')\n"         # sees nscheck's tap device, leaves it
            "print(json.dumps([f.attached, g.attached, sorted(os.listdir('/sys/class/net'))]))\n"
            "g.close()\n"
            "if sys.argv[1] == 'close': f.close()\n")
        tapdev = fastpath.tap_device_name(fastpath.tc_priority("nscheck"))
        r = subprocess.run(["ip", "netns", "exec", ns, "python3", "-c", code, "close"],
                           capture_output=True, text=True, cwd=_repo(), env=_env())
        assert r.returncode == 0, r.stderr
        attached, attached2, devices = eval(r.stdout)
        assert sorted(attached) == sorted(attached2) == ["fa", "fb"]
        assert tapdev in devices and tapdev + "p" in devices
        assert "nfsplice_fast" not in sh("ip", "netns", "exec", ns, "tc", "filter", "show", "dev", "fa", "ingress").stdout
        assert sh("ip", "-n", ns, "-o", "link", "show").stdout.count(fastpath.TAP_DEV_PREFIX) == 0
        # A process that dies without closing leaves its filters; cleanup removes them.
        r = subprocess.run(["ip", "netns", "exec", ns, "python3", "-c", code, "crash"],
                           capture_output=True, text=True, cwd=_repo(), env=_env())
        assert r.returncode == 0, r.stderr
        assert "nfsplice_fast" in sh("ip", "netns", "exec", ns, "tc", "filter", "show", "dev", "fa", "ingress").stdout
        assert tapdev in sh("ip", "-n", ns, "-o", "link", "show").stdout
        r = subprocess.run(["ip", "netns", "exec", ns, "python3", "-c",
                            "from nfsplice import fastpath; print(fastpath.cleanup())"],
                           capture_output=True, text=True, cwd=_repo(), env=_env())
        assert "fa ingress" in r.stdout and "fb ingress" in r.stdout, r
        assert f"clone tap device {tapdev}" in r.stdout, r
        assert sh("ip", "-n", ns, "-o", "link", "show").stdout.count(fastpath.TAP_DEV_PREFIX) == 0
        for dev in ("fa", "fb"):
            assert "nfsplice_fast" not in sh("ip", "netns", "exec", ns, "tc", "filter", "show", "dev", dev, "ingress").stdout
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _repo() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = _repo()
    env["PATH"] = os.path.dirname(sys.executable) + ":" + env.get("PATH", "")
    return env


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tr=translations, seq_=U32, ack=U32, tsval=U32, tsecr=U32, ts=st.booleans(),
       window=st.integers(1, 65535), payload=st.binary(max_size=1500), sack=st.lists(U32, max_size=4))
def test_plain_data_goes_fast_and_exact(fp, tr, seq_, ack, tsval, tsecr, ts, window, payload, sack):
    """The steady state: data and ACKs with or without timestamps and SACK blocks, no
    message end."""
    tr.tsecr_floor = None
    opts = packet.timestamp_option(tsval, tsecr) if ts else b""
    blocks = [(a, (a + 1448) & 0xFFFFFFFF) for a in sack[:3 if ts else 4]]
    if blocks:
        opts += packet.sack_option(blocks)
    pkt = packet.build(CLIENT, LISTEN, 40004, 8080, seq_, ack, ACK | PSH, window=window,
                       options=opts, payload=payload)
    key = bytes(pkt[12:24])
    fp.put(key, fastpath.flow_value(tr, end_seq=None, ack_watch=None, ifindex=0))
    before = _fast_packets(fp)
    rv, out = fp.test_run(ETH + bytes(pkt))
    assert _fast_packets(fp) == before + 1
    ref = bytearray(pkt)
    packet.rewrite(TCPView(memoryview(ref)), tr, False)
    assert out[14:] == bytes(ref)
    fp.take(key)


def test_window_past_a_resuming_message_end_is_cut_and_counted(fp):
    """A pair that resumes (F_LIMIT): the client's ACKs offer the origin no window past
    the body's end (the watch) + NEXT_MESSAGE_WINDOW; the rest of the window is left
    alone, and a flow without the flag passes the window whole."""
    tr = Translation(SOURCE, ORIGIN, 61000, 80, seq_delta=5, ack_delta=7, win_shift_in=7, win_shift_out=7)
    watch = 1_000_000
    cases = ((True, watch - 7 - 100_000, 4000, (100_000 + NEXT_MESSAGE_WINDOW) >> 7, 1),   # cut
             (True, watch - 7 - 500_000, 4000, 4000, 0),      # 512000 bytes: within the limit
             (False, watch - 7 - 100_000, 4000, 4000, 0))     # not resuming: whole
    for limited, ack, window, want, counted in cases:
        pkt = packet.build(CLIENT, LISTEN, 40007, 8080, 100, ack, ACK, window=window)
        key = bytes(pkt[12:24])
        fp.put(key, fastpath.flow_value(tr, end_seq=None, ack_watch=watch, ifindex=0, win_limit=limited))
        before = fp.counters().get("fastpath.window_limited", 0)
        rv, out = fp.test_run(ETH + bytes(pkt))
        assert struct.unpack_from("!H", out, 14 + 34)[0] == want
        v = TCPView(memoryview(bytearray(out[14:])))
        assert packet.checksum.full_tcp(v.src, v.dst, v.buf[20:], 16) == struct.unpack_from("!H", out, 14 + 36)[0]
        assert fp.counters().get("fastpath.window_limited", 0) - before == counted
        fp.take(key)


def test_tsecr_below_the_floor_is_raised_by_the_program(fp):
    """The client's first ACKs after a splice echo TSvals of the proxy's socket, which
    translate below the floor: raised to it in the program, as packet.rewrite does
    (they were punted for that, about 12 times per spliced response)."""
    tr = Translation(SOURCE, ORIGIN, 61000, 80, seq_delta=5, ack_delta=7, tsval_delta=1000,
                     tsecr_delta=-50, tsecr_floor=5000)
    for tsecr, want in ((4000, 5000), (5050, 5000), (6000, 5950)):
        pkt = packet.build(CLIENT, LISTEN, 40008, 8080, 100, 200, ACK, window=100,
                           options=packet.timestamp_option(77, tsecr))
        key = bytes(pkt[12:24])
        fp.put(key, fastpath.flow_value(tr, end_seq=None, ack_watch=None, ifindex=0))
        before = fp.counters()
        rv, out = fp.test_run(ETH + bytes(pkt))
        after = fp.counters()
        assert after["fastpath.fast_packets"] == before.get("fastpath.fast_packets", 0) + 1
        assert struct.unpack_from("!II", out, 14 + 44) == (1077, want)
        raised = after.get("fastpath.tsecr_floored", 0) - before.get("fastpath.tsecr_floored", 0)
        assert raised == (1 if tsecr - 50 < 5000 else 0)
        ref = bytearray(pkt)
        packet.rewrite(TCPView(memoryview(ref)), tr, False)
        assert out[14:] == bytes(ref)
        fp.take(key)


def test_progress_keeps_the_newest_tsval_forwarded(fp):
    """The engine raises the TSval of a late packet to the newest the program sent for
    the same flow (PAWS), read from the flow's counters."""
    tr = Translation(SOURCE, ORIGIN, 61000, 80, seq_delta=5, ack_delta=7, tsval_delta=1000, tsecr_delta=0)
    key = None
    for tsval, want in ((500, 1500), (700, 1700), (650, 1700)):       # a late one does not lower it
        pkt = packet.build(CLIENT, LISTEN, 40009, 8080, 100, 200, ACK, options=packet.timestamp_option(tsval, 1))
        key = bytes(pkt[12:24])
        if tsval == 500:
            fp.put(key, fastpath.flow_value(tr, end_seq=None, ack_watch=None, ifindex=0))
        fp.test_run(ETH + bytes(pkt))
        assert fp.get(key).max_tsval == want
    fp.take(key)


def test_ack_reaching_a_resuming_message_end_goes_on_and_a_copy_to_the_queue(fp):
    """The client's ACK of a resumable pair's body end: the origin needs it at once (its
    last segment's retransmission timer runs while the queue is behind), the engine
    needs to see it.  The program forwards it and clones a copy marked WATCH_COPY_MARK
    into the device's ingress, for the rules to queue.  Data past the watch, or a pair
    that does not resume, is punted as before."""
    tr = Translation(SOURCE, ORIGIN, 61000, 80, seq_delta=5, ack_delta=7, win_shift_in=7, win_shift_out=7)
    watch = 500_000
    for limited, payload, fast in ((True, b"", True), (True, b"GET /", False), (False, b"", False)):
        pkt = packet.build(CLIENT, LISTEN, 40010, 8080, 100, watch - 7, ACK, window=4000, payload=payload)
        key = bytes(pkt[12:24])
        fp.put(key, fastpath.flow_value(tr, end_seq=None, ack_watch=watch, ifindex=0, win_limit=limited))
        before = fp.counters()
        rv, out = fp.test_run(ETH + bytes(pkt))
        after = fp.counters()
        went = after["fastpath.fast_packets"] - before.get("fastpath.fast_packets", 0)
        copied = after.get("fastpath.watch_copies", 0) - before.get("fastpath.watch_copies", 0)
        assert (went, copied) == ((1, 1) if fast else (0, 0)), (limited, payload)
        if fast:
            ref = bytearray(pkt)
            packet.rewrite(TCPView(memoryview(ref)), tr, False, seq.add(watch, NEXT_MESSAGE_WINDOW))
            assert out[14:] == bytes(ref)
            assert struct.unpack_from("!H", out, 14 + 34)[0] == NEXT_MESSAGE_WINDOW >> 7
        else:
            assert out[14:] == bytes(pkt)
        fp.take(key)


def test_zero_windows_go_fast_and_are_counted_per_direction(fp):
    """A receiver that stops reading advertises a zero window, often many times per
    transfer under load: forwarded (still zero after the scale conversion) and counted
    in the program, not punted to a queue that may be hundreds of packets behind."""
    tr = Translation(SOURCE, ORIGIN, 61000, 80, seq_delta=5, ack_delta=7, win_shift_in=7, win_shift_out=9)
    counts = []
    for c2s, window in ((True, 0), (False, 0), (True, 3)):
        pkt = packet.build(CLIENT, LISTEN, 40005, 8080, 100, 200, ACK, window=window)
        key = bytes(pkt[12:24])
        fp.put(key, fastpath.flow_value(tr, end_seq=None, ack_watch=None, ifindex=0, c2s=c2s))
        before = _fast_packets(fp)
        rv, out = fp.test_run(ETH + bytes(pkt))
        assert _fast_packets(fp) == before + 1
        assert struct.unpack_from("!H", out, 14 + 34)[0] == (0 if window == 0 else 1)
        c = fp.counters()
        counts.append((c.get("fastpath.zero_window_c2s", 0), c.get("fastpath.zero_window_s2c", 0)))
        fp.take(key)
    (c0, s0), (c1, s1), (c2, s2) = counts
    assert (c1, s1) == (c0, s0 + 1) and (c2, s2) == (c1, s1), counts
    assert c0 >= 1, counts


def test_handoff_flows_pass_pure_acks_and_keep_the_latest_tsval(fp):
    """During a hand-off the engine only lets pure ACKs through to the proxy's socket:
    the program does that itself (unmarked) and keeps the sender's latest TSval for the
    splice; anything with payload is marked for the queue."""
    key = CLIENT + LISTEN + struct.pack("!HH", 40005, 8080)
    fp.put(key, fastpath.flow_value(Translation(SOURCE, ORIGIN, 0, 0), end_seq=None, ack_watch=None,
                                    ifindex=0, mark=7, fast=False, pass_acks=True))
    ack = packet.build(CLIENT, LISTEN, 40005, 8080, 1, 2, ACK, options=packet.timestamp_option(4242, 1))
    rv, out = fp.test_run(ETH + bytes(ack))
    assert rv == fastpath.TC_ACT_UNSPEC and out[14:] == bytes(ack)
    data = packet.build(CLIENT, LISTEN, 40005, 8080, 1, 2, ACK | PSH, options=packet.timestamp_option(4250, 1),
                        payload=b"x")
    rv, out = fp.test_run(ETH + bytes(data))
    assert rv == fastpath.TC_ACT_OK and out[14:] == bytes(data)
    assert fp.handoff_tsval(key) == 4250
    fp.take(key)


def _data(src, dst, sport, dport, s, payload=b"x" * 100):
    return ETH + bytes(packet.build(src, dst, sport, dport, s, 2, ACK, payload=payload))


def test_rewriting_a_flow_keeps_its_counts(fp):
    """The engine rewrites a flow in place whenever the pair's state changes (a message
    end, the tap, back to marking); what the program counted stays, before and after."""
    tr = Translation(SOURCE, ORIGIN, 61000, 80, seq_delta=1000)
    key = CLIENT + LISTEN + struct.pack("!HH", 40006, 8080)
    fp.put(key, fastpath.flow_value(tr, end_seq=None, ack_watch=None, ifindex=0))
    for s in (100, 200):
        fp.test_run(_data(CLIENT, LISTEN, 40006, 8080, s))
    fp.put(key, fastpath.flow_value(tr, end_seq=5000, ack_watch=None, ifindex=0))
    got = fp.get(key)
    assert (got.packets, got.bytes, got.next_seq) == (2, 200, 300)
    fp.test_run(_data(CLIENT, LISTEN, 40006, 8080, 300))
    fp.put(key, fastpath.flow_value(tr, end_seq=None, ack_watch=None, ifindex=0, fast=False, mark=7))
    fp.test_run(_data(CLIENT, LISTEN, 40006, 8080, 400))   # marked for the queue: not counted
    got = fp.take(key)
    assert (got.packets, got.bytes, got.next_seq) == (3, 300, 400)
    assert fp.take(key) is None and fp.get(key) is None


def test_runner_loses_nothing_the_program_counts_while_it_rewrites(fp, monkeypatch):
    """A packet the program forwards while the runner rewrites the pair's flows (here:
    just before each flow update reaches the map) is in the engine's counts in the end,
    exactly: CI once found a spliced pair's bytes.c2s short by three such packets."""
    from nfsplice.engine import S2C, Endpoint, Engine, Pair, SocketState
    from nfsplice.runner import Runner
    eng = Engine()
    eng.fast = True
    runner = Runner([None], eng, instance="test-counts")   # (no queue: never started)
    runner.fastpath = fp
    monkeypatch.setattr(fp, "egress", lambda dst: 1)
    pair = eng.register(Pair(Endpoint(CLIENT, 40010), Endpoint(LISTEN, 8080), Endpoint(SOURCE, 61010),
                             Endpoint(ORIGIN, 8000)), now=0.0)
    eng.splice(pair, SocketState(snd_seq=1000, rcv_seq=5000, snd_wscale=7, rcv_wscale=7, timestamps=False),
               SocketState(snd_seq=90000, rcv_seq=70000, snd_wscale=7, rcv_wscale=7, timestamps=False))
    eng.injected.clear()
    runner._apply_fast()
    assert isinstance(pair.fast_sig, tuple)
    sent = []

    def from_origin():
        s = 70000 + 100 * len(sent)
        fp.test_run(_data(ORIGIN, SOURCE, 8000, 61010, s))
        sent.append(s)
    for _ in range(3):
        from_origin()
    update = fp.flows.update

    def racing_update(key, value):
        from_origin()
        update(key, value)
    monkeypatch.setattr(fp.flows, "update", racing_update)
    # The origin's FIN: the engine takes the pair back (flows that only mark) ...
    fin = packet.build(ORIGIN, SOURCE, 8000, 61010, 70000 + 100 * 5, 1000, ACK | FIN)
    eng.process(memoryview(bytearray(fin)), now=1.0)
    assert pair.fast_sig == "queue"
    runner._apply_fast()
    monkeypatch.setattr(fp.flows, "update", update)
    # ... and forgets it: the flows go, with the final counts.
    eng._forget(pair, "test")
    runner._apply_fast()
    assert len(sent) == 5
    assert pair.bytes[S2C] == 500 and eng.counters["bytes.s2c"] == 500
    assert fp.get(pair.in_keys()[1]) is None
