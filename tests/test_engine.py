"""The engine without a network: pairs, hand-off, holding, limits, FIN/RST, forgetting.

Packets are built with nfsplice.packet.build and checked field by field and with scapy.
"""
from __future__ import annotations

import struct

from scapy.all import IP, TCP

from nfsplice import packet as P
from nfsplice.engine import S2C, WATCH_COPY_MARK, Decision, Endpoint, Engine, Pair, SocketState, State
from nfsplice.queue.base import HOOK_LOCAL_OUT

CLIENT, PA, PB, SERVER = (bytes([198, 18, 1, 2]), bytes([198, 18, 1, 1]),
                          bytes([198, 18, 2, 1]), bytes([198, 18, 2, 2]))
A = SocketState(snd_seq=1000, rcv_seq=5000, snd_wscale=7, rcv_wscale=7, timestamps=False)
B = SocketState(snd_seq=90000, rcv_seq=70000, snd_wscale=7, rcv_wscale=7, timestamps=False)


def new_pair(eng: Engine, **splice_kw) -> Pair:
    """A spliced pair; the window update the splice sends the origin is dropped
    (test_splice_tells_the_origin_the_window_is_open checks it)."""
    pair = eng.register(Pair(Endpoint(CLIENT, 40000), Endpoint(PA, 8080), Endpoint(PB, 61000),
                             Endpoint(SERVER, 8000)), now=0.0)
    eng.splice(pair, A, B, **splice_kw)
    eng.injected.clear()
    return pair


def from_server(seq, ack, flags=P.ACK, payload=b""):
    return P.build(SERVER, PB, 8000, 61000, seq, ack, flags, payload=payload)


def from_client(seq, ack, flags=P.ACK, payload=b""):
    return P.build(CLIENT, PA, 40000, 8080, seq, ack, flags, payload=payload)


def run(eng, pkt, **kw):
    buf = bytearray(pkt)
    d = eng.process(memoryview(buf), now=1.0, **kw)
    if eng.trimmed is not None:
        del buf[eng.trimmed:]
    return d, buf


def valid(buf) -> IP:
    ip = IP(bytes(buf))
    c_ip, c_tcp = ip.chksum, ip[TCP].chksum
    del ip.chksum
    del ip[TCP].chksum
    again = IP(bytes(ip))
    assert (again.chksum, again[TCP].chksum) == (c_ip, c_tcp)
    return again


def test_translation_both_ways():
    eng = Engine()
    new_pair(eng)
    d, out = run(eng, from_server(70000, 90000, payload=b"x" * 100))
    assert d == Decision.MANGLE
    ip = valid(out)
    assert (ip.src, ip.dst, ip[TCP].sport, ip[TCP].dport) == ("198.18.1.1", "198.18.1.2", 8080, 40000)
    assert (ip[TCP].seq, ip[TCP].ack) == (1000, 5000)
    d, out = run(eng, from_client(5000, 1100))
    ip = valid(out)
    assert (ip.src, ip.dst, ip[TCP].seq, ip[TCP].ack) == ("198.18.2.1", "198.18.2.2", 90000, 70100)


def test_message_end_cuts_payload_and_fin():
    """With a limit, nothing past the message end reaches the client: a straddling
    segment is cut, one wholly beyond keeps only its acknowledgement, a FIN after extra
    bytes is dropped."""
    eng = Engine()
    pair = new_pair(eng, limits=(0, 150), end_fin=(True, True))
    d, out = run(eng, from_server(70000, 1000, payload=b"a" * 100))
    assert len(valid(out)[TCP].payload) == 100
    d, out = run(eng, from_server(70100, 1000, flags=P.ACK | P.PSH | P.FIN, payload=b"b" * 100))
    ip = valid(out)
    assert bytes(ip[TCP].payload) == b"b" * 50 and not ip[TCP].flags & 0x01
    assert eng.counters["dropped.beyond_message_bytes"] == 50
    d, out = run(eng, from_server(70200, 1000, payload=b"c" * 10))
    ip = valid(out)
    assert len(ip[TCP].payload) == 0 and ip[TCP].flags & 0x10
    # The client's payload (a pipelined request) never reaches the origin: limit 0.
    d, out = run(eng, from_client(5000, 1150, payload=b"GET / HTTP/1.1\r\n"))
    ip = valid(out)
    assert len(ip[TCP].payload) == 0 and ip[TCP].ack == 70150
    # A FIN exactly at the end passes when the connection ends with the message.
    d, out = run(eng, from_server(70150, 1000, flags=P.ACK | P.FIN))
    assert valid(out)[TCP].flags & 0x01
    assert pair.fin_seq[S2C] == 70150


def test_fin_at_end_dropped_when_not_allowed():
    eng = Engine()
    new_pair(eng, limits=(None, 10), end_fin=(True, False))
    d, out = run(eng, from_server(70000, 1000, flags=P.ACK | P.FIN, payload=b"z" * 10))
    ip = valid(out)
    assert bytes(ip[TCP].payload) == b"z" * 10 and not ip[TCP].flags & 0x01


def test_held_packets_released_in_order_and_cut():
    eng = Engine()
    pair = eng.register(Pair(Endpoint(CLIENT, 40000), Endpoint(PA, 8080), Endpoint(PB, 61000),
                             Endpoint(SERVER, 8000)), now=0.0)
    held = []
    for i in range(3):
        d, _ = run(eng, from_server(70000 + 100 * i, 1000, payload=bytes([65 + i]) * 100), handle=i)
        assert d == Decision.HOLD
        held.append(i)
    assert len(eng.injected) == 3        # the sockets still get the ACKs, as pure ACKs
    out = eng.splice(pair, A, B, limits=(None, 250))
    assert [h for h, _, _ in out] == held
    lens = [len(valid(buf)[TCP].payload) for _, _, buf in out]
    assert lens == [100, 100, 50]
    assert pair.state == State.SPLICED


def test_frozen_socket_silenced_but_prefreeze_ack_passes():
    eng = Engine()
    pair = new_pair(eng)
    own = P.build(PB, SERVER, 61000, 8000, B.snd_seq, B.rcv_seq, P.ACK)
    d, _ = run(eng, own, hook=HOOK_LOCAL_OUT)
    assert d == Decision.ACCEPT and eng.counters["proxy_socket.prefreeze_ack"] == 1
    later = P.build(PB, SERVER, 61000, 8000, B.snd_seq, B.rcv_seq + 10, P.ACK)
    d, _ = run(eng, later, hook=HOOK_LOCAL_OUT)
    assert d == Decision.DROP and eng.counters["dropped.proxy_socket"] == 1
    assert pair.state == State.SPLICED


def test_frozen_socket_prefreeze_retransmission_dropped_apart():
    """A retransmission the socket queued before the freeze (bytes wholly before its
    send sequence, acknowledged since) is dropped and counted as such; bytes at or past
    the send sequence, a FIN or an ACK of more than the socket received are new: the
    safety net's drops."""
    eng = Engine()
    new_pair(eng)
    old = P.build(PB, SERVER, 61000, 8000, B.snd_seq - 100, B.rcv_seq, P.ACK | P.PSH, payload=b"r" * 100)
    d, _ = run(eng, old, hook=HOOK_LOCAL_OUT)
    assert d == Decision.DROP and eng.counters["proxy_socket.prefreeze_retransmission"] == 1
    assert eng.counters["dropped.proxy_socket"] == 0
    for pkt in (P.build(PB, SERVER, 61000, 8000, B.snd_seq - 50, B.rcv_seq, P.ACK, payload=b"n" * 100),
                P.build(PB, SERVER, 61000, 8000, B.snd_seq - 100, B.rcv_seq, P.ACK | P.FIN, payload=b"f" * 100),
                P.build(PB, SERVER, 61000, 8000, B.snd_seq - 100, B.rcv_seq + 1, P.ACK, payload=b"a" * 100)):
        d, _ = run(eng, pkt, hook=HOOK_LOCAL_OUT)
        assert d == Decision.DROP
    assert eng.counters["dropped.proxy_socket"] == 3
    assert eng.counters["proxy_socket.prefreeze_retransmission"] == 1


def test_both_fins_acked_then_forgotten_after_linger():
    eng = Engine(linger=2.0)
    pair = new_pair(eng)
    run(eng, from_client(5000, 1000, flags=P.ACK | P.FIN))
    run(eng, from_server(70000, 5001 - 5000 + 90000, flags=P.ACK | P.FIN))
    run(eng, from_client(5001, 1001))
    assert pair.state == State.CLOSING
    eng.tick(now=3.5)
    assert pair.state == State.DONE and not eng.pairs and not eng.flows
    assert eng.forgotten == [pair]


def test_malformed_counted_never_raised():
    eng = Engine()
    new_pair(eng)
    for bad in (b"", b"\x45" * 10, bytes(from_server(1, 1))[:30]):
        d, _ = run(eng, bad)
        assert d == Decision.ACCEPT
    assert sum(v for k, v in eng.counters.items() if k.startswith("malformed.")) == 3
    truncated = bytearray(from_server(70000, 1000, payload=b"x" * 500))[:100]
    d, _ = run(eng, truncated, truncated=True)
    assert d == Decision.DROP and eng.counters["dropped.truncated"] == 1


def test_record_roundtrip():
    from nfsplice.engine import pair_from_record, splice_record
    eng = Engine()
    pair = new_pair(eng)
    rec = splice_record(pair, A, B, (0, 0), (False, False))
    p2, a2, b2 = pair_from_record(rec)
    assert (a2, b2) == (A, B) and p2.in_keys() == pair.in_keys()
    assert struct.unpack("!H", p2.in_keys()[0][8:10])[0] == 40000


def test_overrun_ends_the_pair_with_resets_once_the_message_is_delivered():
    eng = Engine(linger=1.0)
    pair = new_pair(eng, limits=(0, 100))
    run(eng, from_server(70000, 90000, payload=b"m" * 100))
    run(eng, from_server(70100, 90000, payload=b"garbage"))        # past the end: cut
    assert pair.overrun and pair.message_done is None
    eng.tick(now=1.1)
    assert not eng.injected                                         # not yet delivered
    run(eng, from_client(5000, 1100))                               # the client has it all
    assert pair.message_done is not None
    eng.tick(now=1.2)
    rsts = [valid(p) for p in eng.injected]
    assert sorted((ip.dst, ip[TCP].flags & 0x04, ip[TCP].seq) for ip in rsts) == \
        [("198.18.1.2", 4, 1100), ("198.18.2.2", 4, 90000)]
    assert pair.state == State.CLOSING and pair.reset


def test_long_spliced_body_not_cut_by_the_message_timer():
    """A response splice has a c2s limit of 0, delivered at once; the pair's message is
    done only when the body is acknowledged too."""
    eng = Engine(message_close_timeout=10.0)
    pair = new_pair(eng, limits=(0, 1 << 30))
    run(eng, from_client(5000, 1000))
    run(eng, from_server(70000, 90000, payload=b"x" * 1000))
    eng.tick(now=100.0)
    assert pair.message_done is None and pair.state == State.SPLICED and not eng.injected


# -- the fast path's flows: what the engine asks the runner to write --------------------
def _ops(eng):
    ops, eng.fast_ops = eng.fast_ops, []
    return [(p.id, p.fast_sig) for p in ops]


def test_fast_flows_follow_the_pair():
    """Registered: flows that only mark (pure ACKs pass: the hand-off is the engine's).  Spliced: fast
    flows.  A FIN: back to marking, so the engine sees the close.  Forgotten: none."""
    eng = Engine(linger=0.5)
    eng.fast = True
    pair = eng.register(Pair(Endpoint(CLIENT, 40000), Endpoint(PA, 8080), Endpoint(PB, 61000),
                             Endpoint(SERVER, 8000)), now=0.0)
    assert _ops(eng) == [(pair.id, "handoff")]
    eng.splice(pair, A, B)
    assert _ops(eng) == [(pair.id, ((None, None, False), (None, None, False)))]
    run(eng, from_server(70000, 90000, payload=b"x" * 100))
    assert _ops(eng) == []                           # nothing changed: nothing to write
    run(eng, from_server(70100, 90000, flags=P.ACK | P.FIN))
    assert _ops(eng) == [(pair.id, "queue")]
    run(eng, from_client(5000, 1102, flags=P.ACK | P.FIN))
    run(eng, from_server(70101, 90001))
    eng.tick(now=100.0)
    assert _ops(eng) == [(pair.id, None)] and pair.state == State.DONE


def test_fast_flows_carry_message_end_and_watch():
    """A spliced response body: the origin's flow stops at the end, the client's flow
    watches for the ACK of that end; when it comes the engine takes the pair back."""
    eng = Engine()
    eng.fast = True
    pair = new_pair(eng, limits=(0, 150))
    ops = _ops(eng)
    end_c2s, end_s2c = A.rcv_seq, B.rcv_seq + 150
    # C2S: ends where it is (nothing may go to the origin), watches the body's end.
    # S2C: ends after 150 bytes; watches nothing: the C2S end (the request's) was
    # acknowledged before the freeze (the drain waits for it).  Watched, it made the
    # program punt the origin's first packets, all of which carry that ack, and then
    # overtake those still queued: a spurious retransmission per overtaken segment.
    assert ops[-1] == (pair.id, ((end_c2s, end_s2c, False), (end_s2c, None, False)))
    assert pair.end_acked == [True, False]
    run(eng, from_server(70000, 90000, payload=b"x" * 100))
    assert _ops(eng) == []                                       # nothing changed
    run(eng, from_client(5000, 1150))                            # acks the whole body
    assert _ops(eng) == [(pair.id, "queue")] and pair.message_done is not None


def test_fast_progress_counts_what_the_program_forwarded():
    eng = Engine()
    eng.fast = True
    pair = new_pair(eng)
    eng.fast_progress(pair, S2C, 10, 15000, 42.0, 85000, final=False)
    eng.fast_progress(pair, S2C, 12, 18000, 43.0, 88000, final=True)   # the same counters, later
    assert pair.packets[S2C] == 12 and pair.bytes[S2C] == 18000
    assert eng.counters["bytes.s2c"] == 18000 and pair.next_seq[S2C] == 88000
    assert pair.last_seen == 43.0
    eng.fast_progress(pair, S2C, 1, 100, 44.0, 88100, final=True)      # new counters count from 0
    assert pair.bytes[S2C] == 18100


def test_no_fast_flows_when_off_or_tapped(tmp_path):
    from nfsplice.tap import TapStore
    eng = Engine()
    new_pair(eng)
    assert eng.fast_ops == []
    tap = TapStore(str(tmp_path))
    eng = Engine(tap)
    eng.fast = True
    pair = new_pair(eng)
    assert _ops(eng)[-1] == (pair.id, "queue")     # the tap needs every payload ...
    eng._forget(pair, "test")
    eng.fast_tap = True
    pair = new_pair(eng)                           # ... unless the program copies them
    assert _ops(eng)[-1] == (pair.id, ((None, None, True), (None, None, True)))
    tap.stop()


def test_inactivity_resets_a_pair_whose_bytes_stopped():
    """A client that reads nothing: ACKs with a zero window keep arriving, so the pair
    never idles out, but no new byte moves.  The inactivity timeout ends it, one RST
    each way; a pair that makes progress is left alone."""
    clock = [0.0]
    eng = Engine(inactivity_timeout=5.0, clock=lambda: clock[0])
    stuck = new_pair(eng)
    moving = eng.register(Pair(Endpoint(CLIENT, 40001), Endpoint(PA, 8080), Endpoint(PB, 61001),
                               Endpoint(SERVER, 8000)), now=0.0)
    eng.splice(moving, A, B)
    eng.injected.clear()
    eng.process(memoryview(from_server(70000, 5000, payload=b"x" * 3000)), now=0.5)   # never taken
    for t in range(1, 9):
        clock[0] = float(t)
        zero = P.build(CLIENT, PA, 40000, 8080, 5000, 1000, P.ACK, window=0)
        eng.process(memoryview(bytearray(zero)), now=clock[0])
        data = P.build(SERVER, PB, 8000, 61001, 70000 + 100 * t, 90000, P.ACK, payload=b"y" * 100)
        eng.process(memoryview(bytearray(data)), now=clock[0])
        eng.tick(now=clock[0])
    assert eng.counters["pairs.reset_by_engine.inactivity"] == 1
    assert stuck.reset and not moving.reset
    sent = [IP(bytes(p)) for p in eng.injected]
    assert [(r.dst, str(r[TCP].flags)) for r in sent] == [("198.18.2.2", "R"), ("198.18.2.2", "A"),
                                                          ("198.18.1.2", "R"), ("198.18.1.2", "A"),
                                                          ("198.18.1.2", "R"), ("198.18.1.2", "R")]
    # Each RST at the highest seq sent, then an ACK at it: a receiver whose window
    # closed before that (the client here: it took none of the 3,000 bytes) drops the
    # RST but answers the ACK with one at its window's start.  What the client sends
    # after the reset (its ACKs at t = 7 and 8) is answered with a RST there, at 1000.
    assert [(r[TCP].seq, r[TCP].ack) for r in sent] == [(90000, 0), (90000, 73000), (4000, 0), (4000, 5000),
                                                        (1000, 0), (1000, 0)]
    assert {(r.src, r[TCP].sport) for r in sent[2:]} == {("198.18.1.1", 8080)}
    assert eng.counters["injected.rst_answer"] == 2


def test_inactivity_reset_before_any_spliced_byte_is_in_the_receivers_window():
    """The origin stalls right after the hand-off: the drain delivered every byte so
    far and none went through the engine.  The RST to the client carries the frozen
    socket's send sequence (what the client received up to), not the message's end
    (200 bytes further: outside the client's window, so it ignored the RST and waited
    for ever); the one to the origin its receive sequence."""
    clock = [0.0]
    eng = Engine(inactivity_timeout=5.0, clock=lambda: clock[0])
    pair = new_pair(eng, limits=(0, 200))
    for t in range(1, 8):
        clock[0] = float(t)
        eng.tick(now=clock[0])
    assert eng.counters["pairs.reset_by_engine.inactivity"] == 1
    rsts = {r.dst: r[TCP] for r in (IP(bytes(p)) for p in eng.injected)}
    assert rsts["198.18.1.2"].flags.R and rsts["198.18.1.2"].seq == A.snd_seq
    assert rsts["198.18.2.2"].flags.R and rsts["198.18.2.2"].seq == B.snd_seq
    assert pair.reset


def test_tsvals_learnt_from_the_first_packets_after_the_splice():
    """When only marked packets are queued, the engine may not have seen either side's
    TSval before the hand-off.  Each side's offset then comes from its first packet
    after the splice (one past what the receiver saw from the frozen socket), and until
    the other side's is known a TSecr cannot be translated: it goes out as 0."""
    eng = Engine()
    eng.fast = True
    a = SocketState(snd_seq=1000, rcv_seq=5000, timestamps=True, ts_now=777_000)
    b = SocketState(snd_seq=90000, rcv_seq=70000, timestamps=True, ts_now=3_000_000_000)
    pair = eng.register(Pair(Endpoint(CLIENT, 40000), Endpoint(PA, 8080), Endpoint(PB, 61000),
                             Endpoint(SERVER, 8000)), now=0.0)
    eng.splice(pair, a, b)
    assert _ops(eng)[-1] == (pair.id, "queue")
    ts = lambda v, e: P.timestamp_option(v, e)  # noqa: E731
    pkt = P.build(CLIENT, PA, 40000, 8080, 5000, 1000, P.ACK, options=ts(42, 776_990), payload=b"hi")
    _d, out = run(eng, pkt)
    assert valid(out)[TCP].options[2][1] == (3_000_000_001, 0)
    pkt = P.build(SERVER, PB, 8000, 61000, 70000, 90002, P.ACK, options=ts(9_000, 3_000_000_001))
    _d, out = run(eng, pkt)
    assert valid(out)[TCP].options[2][1] == (777_001, 42)   # TSecr back in the client's clock
    assert _ops(eng)[-1] == (pair.id, ((None, None, False), (None, None, False)))   # the program's now
    pkt = P.build(CLIENT, PA, 40000, 8080, 5002, 1000, P.ACK, options=ts(50, 777_001))
    _d, out = run(eng, pkt)
    assert valid(out)[TCP].options[2][1] == (3_000_000_009, 9_000)


def _registered_with_timestamps(tsval, ts_ref=(None, None)):
    """An engine and a registered pair whose sockets A (the client's window 3 MiB) and B
    (window scale 9) use timestamps, for the window update's tests."""
    eng = Engine()
    a = SocketState(snd_seq=1000, rcv_seq=5000, snd_wscale=7, rcv_wscale=7, timestamps=True, ts_now=500,
                    window=(1000, 3 << 20, 3 << 20, 65535, 5000))
    b = SocketState(snd_seq=90000, rcv_seq=70000, snd_wscale=7, rcv_wscale=9, timestamps=True, ts_now=9000)
    pair = eng.register(Pair(Endpoint(CLIENT, 40000), Endpoint(PA, 8080), Endpoint(PB, 61000),
                             Endpoint(SERVER, 8000)), now=0.0)
    pair.tsval, pair.ts_ref = list(tsval), list(ts_ref)
    return eng, pair, a, b


def test_splice_tells_the_origin_the_window_is_open():
    """The hand-off waited for the client's last ACK, so no client packet may follow
    soon; an origin that filled B's window must hear at once that the client's window
    is open, as from socket B (not after its persist timer)."""
    eng, pair, a, b = _registered_with_timestamps([111, 222])
    eng.splice(pair, a, b)
    (wu,) = [valid(p) for p in eng.injected]
    assert (wu.src, wu.dst, wu[TCP].sport, wu[TCP].dport) == ("198.18.2.1", "198.18.2.2", 61000, 8000)
    assert (wu[TCP].seq, wu[TCP].ack, wu[TCP].flags) == (90000, 70000, 0x10)
    assert wu[TCP].window == (3 << 20) >> 9                     # the client's, in B's scale
    assert dict(wu[TCP].options)["Timestamp"] == (9001, 222)


def test_window_update_is_not_older_than_the_clients_acks():
    """The window update leaves after the flows turn fast, so a client ACK may reach the
    origin first.  Its TSval is the client's newest translated: with B's last + 1 it was
    older than such an ACK by as much as the client's clock ran since the offset's
    reference (the first held packet), and the origin's PAWS dropped it."""
    eng, pair, a, b = _registered_with_timestamps([111, 222], [100, None])   # one held from 11 ms before
    eng.fast = True
    eng.splice(pair, a, b)
    (wu,) = [valid(p) for p in eng.injected]
    assert dict(wu[TCP].options)["Timestamp"] == (9012, 222)
    _d, out = run(eng, P.build(CLIENT, PA, 40000, 8080, 5000, 1000, P.ACK, options=P.timestamp_option(112, 400)))
    assert valid(out)[TCP].options[2][1][0] == 9013            # the next client ACK: newer still
    # Without the fast path every client packet comes through the engine, older ones
    # still queued behind the newest: the update is the reference's translation.
    eng, pair, a, b = _registered_with_timestamps([111, 222], [100, None])
    eng.splice(pair, a, b)
    (wu,) = [valid(p) for p in eng.injected]
    assert dict(wu[TCP].options)["Timestamp"] == (9001, 222)


def test_late_packet_of_a_fast_pair_is_not_older_than_the_programs():
    """A packet the engine forwards while the program forwards the pair (it waited in
    the queue since before the flows turned fast) leaves with a TSval no older than the
    newest the program sent for that flow (engine.fast_tsval): PAWS dropped it, a real
    loss for data."""
    eng = Engine()
    eng.fast = True
    asked = []
    eng.fast_tsval = lambda key: asked.append(key) or 50_000
    pair = new_pair(eng, limits=(None, None))
    tr = pair.tr[S2C]
    assert isinstance(pair.fast_sig, tuple)
    late = P.build(SERVER, PB, 8000, 61000, 70000, 90000, P.ACK, options=P.timestamp_option(40, 7),
                   payload=b"d" * 100)
    out = valid(run(eng, late)[1])
    assert out[TCP].options[2][1][0] == 50_000 and bytes(out[TCP].payload) == b"d" * 100
    assert asked == [late[12:24]]
    newer = P.build(SERVER, PB, 8000, 61000, 70100, 90000, P.ACK,
                    options=P.timestamp_option((60_000 - tr.tsval_delta) & 0xFFFFFFFF, 7))
    assert valid(run(eng, newer)[1])[TCP].options[2][1][0] == 60_000        # newer: as translated
    eng.fast_tsval = None
    assert valid(run(eng, late)[1])[TCP].options[2][1][0] == (40 + tr.tsval_delta) & 0xFFFFFFFF


def test_a_copy_of_the_last_ack_ends_the_message_and_is_dropped():
    """With the fast path the client's ACK of the body's end goes on in the program,
    and the engine gets a copy (WATCH_COPY_MARK): the message is done (the proxy
    resumes), nothing is sent again, and a copy for a pair gone or resuming is dropped."""
    eng = Engine()
    eng.fast = True
    pair = new_pair(eng, limits=(0, 100), resume=True)
    run(eng, from_server(70000, 90000, payload=b"m" * 100))
    ack = from_client(5000, 1100)
    d, _ = run(eng, ack, mark=WATCH_COPY_MARK)
    assert d == Decision.DROP and pair.resuming and eng.resumable == [pair]
    assert eng.counters["watch_copies"] == 1
    d, _ = run(eng, ack, mark=WATCH_COPY_MARK)                  # another, while resuming
    assert d == Decision.DROP and not pair.held and eng.counters["watch_copies.late"] == 1
    eng.resume_numbers(pair)
    eng.finish_resume(pair)
    d, _ = run(eng, ack, mark=WATCH_COPY_MARK)                  # the pair is gone
    assert d == Decision.DROP and eng.counters["watch_copies.late"] == 2


def test_next_request_on_the_last_ack_is_kept_for_the_resume():
    """The client's next request often rides on the segment that acknowledges the
    response's last byte.  The splice cuts it (the origin gets the ACK), and a whole
    copy is kept and sent again to the rebuilt socket at the resume."""
    eng = Engine()
    pair = new_pair(eng, limits=(0, 100), resume=True)
    run(eng, from_server(70000, 90000, payload=b"m" * 100))
    d, out = run(eng, from_client(5000, 1100, flags=P.ACK | P.PSH, payload=b"GET /next HTTP/1.1\r\n\r\n"))
    assert d == Decision.MANGLE and not valid(out)[TCP].payload          # the ACK went on
    assert pair.resuming and eng.counters["held.next_message"] == 1
    # Not lost, so not counted as dropped (it was, and looked like loss in the benchmark).
    assert eng.counters["held.next_message_bytes"] == len(b"GET /next HTTP/1.1\r\n\r\n")
    assert "dropped.beyond_message_bytes" not in eng.counters
    eng.resume_numbers(pair)
    (handle, decision, buf), = eng.finish_resume(pair)
    assert handle is None and decision == Decision.ACCEPT                 # sent again, whole
    ip = valid(buf)
    assert (ip.dst, ip[TCP].dport, ip[TCP].seq) == ("198.18.1.1", 8080, 5000)
    assert bytes(ip[TCP].payload) == b"GET /next HTTP/1.1\r\n\r\n"


def test_offset_from_the_first_held_packet_so_none_goes_back_in_time():
    """Packets held during the hand-off carry TSvals a few ms apart; the offset maps the
    first (oldest) to one past the frozen socket's last, so no released packet comes
    out below what the receiver saw from that socket (PAWS would drop it)."""
    eng = Engine()
    a = SocketState(snd_seq=1000, rcv_seq=5000, timestamps=True, ts_now=777_000)
    b = SocketState(snd_seq=90000, rcv_seq=70000, timestamps=True, ts_now=3_000)
    pair = eng.register(Pair(Endpoint(CLIENT, 40000), Endpoint(PA, 8080), Endpoint(PB, 61000),
                             Endpoint(SERVER, 8000)), now=0.0)
    for i, tsv in enumerate((500, 504)):
        pkt = P.build(SERVER, PB, 8000, 61000, 70000 + 10 * i, 90000, P.ACK,
                      options=P.timestamp_option(tsv, 2_999), payload=b"z" * 10)
        assert run(eng, pkt)[0] == Decision.HOLD
    released = eng.splice(pair, a, b)
    tsvals = [valid(buf)[TCP].options[2][1][0] for _h, _d, buf in released]
    assert tsvals == [777_001, 777_005]


def test_late_synack_of_the_listener_is_not_the_frozen_socket_talking():
    """With a lost handshake ACK the listener retransmits its SYN-ACK; one that waited
    in the queue until the pair was spliced is dropped, and not counted against the
    frozen socket (which must say nothing)."""
    eng = Engine()
    new_pair(eng)
    synack = P.build(PA, CLIENT, 8080, 40000, 999, 4000, P.SYN | P.ACK)
    d = eng.process(memoryview(bytearray(synack)), hook=HOOK_LOCAL_OUT, now=1.0)
    assert d == Decision.DROP
    assert eng.counters["dropped.late_synack"] == 1 and "dropped.proxy_socket" not in eng.counters
