"""The engine following chunked framing: a ChunkedScanner as a direction's limit.

No network: packets built and checked as in test_engine.  `Download` plays an origin
sending a chunked body (and maybe bytes after it) segment by segment, with loss,
duplicates and reordering, retransmitting what the client has not acknowledged, and
a client that keeps what reaches it at its stream offset; optionally a fast path that
forwards, without the engine, what the pair's fast flow lets through (its end).
"""
from __future__ import annotations

import json
import random

from hypothesis import given, settings, strategies as st
from scapy.all import TCP

from nfsplice import handoff, seq
from nfsplice import packet as P
from nfsplice.engine import C2S, S2C, Decision, Endpoint, Engine, Pair, State, splice_record
from nfsplice.proxy.http1 import ChunkedScanner
from tests.test_engine import A, B, CLIENT, PA, PB, SERVER, from_client, from_server, run, valid
from tests.test_http1 import chunked_bodies

NEXT = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"   # what must never reach the client


def chunked(sizes, ext: bool = False, trailer: bool = False) -> bytes:
    """A chunked body of chunks of SIZES bytes (deterministic content)."""
    out = bytearray()
    rnd = random.Random(len(sizes))
    for i, n in enumerate(sizes):
        out += b"%x" % n + (b";i=%d" % i if ext else b"") + b"\r\n"
        out += bytes(rnd.getrandbits(8) for _ in range(n)) + b"\r\n"
    out += b"0\r\n" + (b"X-Sum: 42\r\n" if trailer else b"") + b"\r\n"
    return bytes(out)


def registered(eng: Engine) -> Pair:
    return eng.register(Pair(Endpoint(CLIENT, 40000), Endpoint(PA, 8080), Endpoint(PB, 61000),
                             Endpoint(SERVER, 8000)), now=0.0)


def scanner_after(body: bytes, copied: int) -> ChunkedScanner:
    """A response body's scanner fed what the proxy copied itself."""
    sc = ChunkedScanner(upstream=True)
    assert sc.feed(body[:copied]) == copied
    return sc


class Download:
    """STREAM from the origin, from offset COPIED on (the proxy sent [0, COPIED) itself);
    its sequence number at offset COPIED is B.rcv_seq, the client's A.snd_seq."""

    def __init__(self, eng: Engine, stream: bytes, message_len: int, copied: int, fast: bool = False):
        self.eng, self.stream, self.message_len, self.copied = eng, stream, message_len, copied
        self.got = bytearray(len(stream))
        self.have = bytearray(len(stream))
        self.have[:copied] = b"\1" * copied
        self.got[:copied] = stream[:copied]
        self.una = copied
        self.fast = fast
        self.pair: Pair | None = None
        self.fast_sent = self.engine_sent = 0

    def packet(self, off: int, n: int) -> bytearray:
        return from_server(seq.add(B.rcv_seq, off - self.copied), B.snd_seq, P.ACK | P.PSH,
                           payload=self.stream[off:off + n])

    def deliver(self, buf) -> None:
        """A packet the proxy sent the client (checksums are test_engine's business)."""
        v = P.TCPView(memoryview(bytearray(buf)))
        assert (v.dst, v.dport) == (CLIENT, 40000)
        self.land(v.seq, bytes(v.payload()))

    def land(self, client_seq: int, data: bytes) -> None:
        """Payload reaching the client: it lands at its stream offset."""
        if not data:
            return
        off = seq.diff(client_seq, A.snd_seq) + self.copied
        assert off + len(data) <= self.message_len, f"bytes past the message end reached the client at {off}"
        assert data == self.stream[off:off + len(data)]
        self.got[off:off + len(data)] = data
        self.have[off:off + len(data)] = b"\1" * len(data)

    def send(self, off: int, n: int) -> None:
        pkt = self.packet(off, n)
        sig = self.pair.fast_sig if self.pair is not None else None
        if self.fast and isinstance(sig, tuple):
            end = sig[S2C][0]
            nxt = seq.add(B.rcv_seq, off + n - self.copied)
            if end is None or seq.le(nxt, end):
                # The program would forward it (fastpath.bpf.c: payload up to `end`),
                # translated, without the engine seeing it.
                first = seq.add(B.rcv_seq, off - self.copied)
                self.land(seq.add(first, self.pair.tr[S2C].seq_delta), self.stream[off:off + n])
                self.fast_sent += 1
                return
        d, out = run(self.eng, pkt)
        if d == Decision.HOLD:
            return
        assert d == Decision.MANGLE
        self.engine_sent += 1
        self.deliver(out)

    def received(self) -> int:
        """The client's rcv_nxt, as a stream offset."""
        n = self.have.find(0)
        return len(self.have) if n < 0 else n

    def ack(self) -> None:
        rcv = self.received()
        run(self.eng, from_client(A.rcv_seq, seq.add(A.snd_seq, rcv - self.copied)))
        self.una = max(self.una, rcv)

    def round(self, rnd: random.Random, mss: int, window: int, loss: float, dup: float) -> None:
        """The origin sends [una, una+window) again in segments of up to MSS bytes; some
        are lost, some doubled, neighbours swapped."""
        segs = []
        off, stop = self.una, min(len(self.stream), self.una + window)
        while off < stop:
            n = min(rnd.randint(1, mss), stop - off)
            if rnd.random() >= loss:
                segs.append((off, n))
                if rnd.random() < dup:
                    segs.append((off, n))
            off += n
        for i in range(len(segs) - 1):
            if rnd.random() < 0.2:
                segs[i], segs[i + 1] = segs[i + 1], segs[i]
        for off, n in segs:
            self.send(off, n)


def splice_chunked(eng: Engine, body: bytes, copied: int, resume: bool = True, held=()) -> tuple[Pair, list]:
    pair = registered(eng)
    dl_held = []
    for pkt in held:
        d, _ = run(eng, pkt, handle=len(dl_held))
        assert d == Decision.HOLD
        dl_held.append(pkt)
    out = eng.splice(pair, A, B, limits=(0, scanner_after(body, copied)), resume=resume)
    eng.injected.clear()
    return pair, out


# -- hypothesis: framing over segment boundaries, loss, reordering, duplicates ---------------

@st.composite
def downloads(draw):
    """Tiny segments with small bodies (every framing byte split off), real MSS with
    bodies of larger chunks too."""
    mss = draw(st.sampled_from([1, 3, 7, 100, 536, 1448, 9000]))
    small = chunked_bodies().map(lambda t: t[0])
    large = st.tuples(st.lists(st.one_of(st.just(1), st.integers(1, 40), st.integers(200, 3000)), max_size=10),
                      st.booleans(), st.booleans()).map(lambda t: chunked(*t))
    body = draw(small if mss < 100 else st.one_of(small, large))
    return {"body": body,
            "extra": draw(st.booleans()),
            "copied": draw(st.integers(0, len(body) - 1)),
            "held": draw(st.integers(0, 3)),
            "mss": mss,
            "loss": draw(st.sampled_from([0.0, 0.05, 0.2, 0.4])),
            "dup": draw(st.sampled_from([0.0, 0.1])),
            "fast": draw(st.booleans()),
            "seed": draw(st.integers(0, 2 ** 32 - 1))}


@settings(max_examples=300, deadline=None)
@given(downloads())
def test_client_gets_exactly_the_message_whatever_the_segments(case):
    """Whatever the segmentation (chunk-size lines, CRLFs and trailers split anywhere),
    loss, duplicates and reordering: the client receives exactly the chunked message
    and not one byte of what follows it; the final end is found, and the pair resumes
    there, only once the client acknowledged it."""
    body = case["body"]
    stream = body + (NEXT if case["extra"] else b"")
    rnd = random.Random(case["seed"])
    eng = Engine()
    eng.fast = case["fast"]
    dl = Download(eng, stream, len(body), case["copied"], fast=case["fast"])
    # Segments that arrive during the hand-off are held, then released through the scan.
    held, off = [], dl.copied
    for _ in range(case["held"]):
        n = min(rnd.randint(1, case["mss"]), len(stream) - off)
        if n <= 0:
            break
        held.append(dl.packet(off, n))
        off += n
    pair, released = splice_chunked(eng, body, case["copied"], held=held)
    dl.pair = pair
    for _h, d, buf in released:
        assert d == Decision.MANGLE
        dl.deliver(buf)
    for r in range(2000):
        loss = 0.0 if r % 4 == 3 else case["loss"]
        dl.round(rnd, case["mss"], case["mss"] * 8, loss, case["dup"])
        assert not pair.resuming or dl.received() >= len(body)
        dl.ack()
        if dl.received() >= len(body):
            break
    assert bytes(dl.got[:len(body)]) == body and dl.received() == len(body)
    assert pair.end_final[S2C] and pair.end_seq[S2C] == seq.add(B.rcv_seq, len(body) - dl.copied)
    assert pair.follow[S2C] is None and eng.counters["chunked.ends"] == 1
    assert pair.resuming and pair.message_done is not None
    assert eng.counters.get("chunked.malformed", 0) == 0 and not pair.reset
    if not case["extra"]:
        assert not pair.overrun
    a2, b2 = eng.resume_numbers(pair)
    assert b2.rcv_seq == pair.end_seq[S2C] and a2.snd_seq == seq.add(A.snd_seq, len(body) - dl.copied)


@settings(max_examples=100, deadline=None)
@given(chunked_bodies(), st.integers(0, 2 ** 32 - 1))
def test_the_scan_does_not_depend_on_where_the_sequence_space_wraps(t, base):
    """The same body sent from any initial sequence number (across 2**32)."""
    body = t[0]
    eng = Engine()
    b = B.__class__(**{**B.__dict__, "rcv_seq": base})
    pair = registered(eng)
    eng.splice(pair, A, b, limits=(0, ChunkedScanner(upstream=True)), resume=True)
    got = bytearray()
    for off in range(0, len(body) + len(NEXT), 5):
        data = (body + NEXT)[off:off + 5]
        d, out = run(eng, from_server(seq.add(base, off), B.snd_seq, payload=data))
        got += bytes(valid(out)[TCP].payload)
    assert bytes(got) == body and pair.end_seq[S2C] == seq.add(base, len(body)) and pair.end_final[S2C]


# -- one case each -----------------------------------------------------------------------------

def test_final_end_found_and_what_follows_cut():
    body = chunked([10, 1, 5], ext=True, trailer=True)
    eng = Engine()
    pair, _ = splice_chunked(eng, body, 0)
    d, out = run(eng, from_server(B.rcv_seq, B.snd_seq, payload=body + NEXT))
    assert bytes(valid(out)[TCP].payload) == body
    assert pair.end_final[S2C] and pair.end_seq[S2C] == B.rcv_seq + len(body)
    # (A pair that resumes keeps a copy for the proxy's rebuilt socket: cut, not lost.)
    assert eng.counters["held.next_message_bytes"] == len(NEXT) and pair.overrun
    assert "dropped.beyond_message_bytes" not in eng.counters
    assert eng.counters["chunked.ends"] == 1


def test_resume_only_at_the_final_end():
    """The client acknowledging everything it got so far (a tentative end) does not
    make the message done; acknowledging the last chunk's end does."""
    body = chunked([100, 100])
    eng = Engine()
    pair, _ = splice_chunked(eng, body, 0)
    first = body.index(b"\r\n", 5) + 2 + 100 + 2       # through the first chunk's CRLF
    run(eng, from_server(B.rcv_seq, B.snd_seq, payload=body[:first]))
    assert not pair.end_final[S2C]
    run(eng, from_client(A.rcv_seq, A.snd_seq + first))
    assert not pair.end_acked[S2C] and pair.message_done is None and not pair.resuming
    run(eng, from_server(B.rcv_seq + first, B.snd_seq, payload=body[first:]))
    assert pair.end_final[S2C] and not pair.resuming
    run(eng, from_client(A.rcv_seq, A.snd_seq + len(body) - 1))
    assert not pair.resuming
    run(eng, from_client(A.rcv_seq, A.snd_seq + len(body)))
    assert pair.resuming and eng.resumable == [pair]
    assert eng.resume_numbers(pair)[1].rcv_seq == B.rcv_seq + len(body)


def test_segment_beyond_a_tentative_end_cut_without_overrun():
    """The segment holding the next chunk-size line is lost: the one after it cannot be
    judged (it might be past the message end), so its payload is cut, which is no
    overrun; the retransmissions then go through."""
    body = chunked([50, 50, 50])
    eng = Engine()
    pair, _ = splice_chunked(eng, body, 0)
    cuts = [0, 40, 60, 120, len(body)]
    segs = [(a, body[a:b]) for a, b in zip(cuts, cuts[1:])]
    d, out = run(eng, from_server(B.rcv_seq, B.snd_seq, payload=segs[0][1]))
    tentative = pair.end_seq[S2C]
    assert not pair.end_final[S2C] and seq.gt(tentative, B.rcv_seq + 40)
    for off, data in segs[2:]:                            # segs[1] is lost
        d, out = run(eng, from_server(B.rcv_seq + off, B.snd_seq, payload=data))
        ip = valid(out)
        assert d == Decision.MANGLE and not ip[TCP].payload and ip[TCP].flags & 0x10
    assert not pair.overrun and eng.counters["chunked.cut_ahead"] == 2
    assert not pair.held and "held.next_message" not in eng.counters   # not a next message
    assert eng.counters["chunked.cut_ahead_bytes"] == len(body) - 60
    assert eng.counters.get("dropped.beyond_message_bytes", 0) == 0
    for off, data in segs[1:]:                            # retransmitted, in order
        d, out = run(eng, from_server(B.rcv_seq + off, B.snd_seq, payload=data))
        assert bytes(valid(out)[TCP].payload) == data
    assert pair.end_final[S2C] and pair.end_seq[S2C] == B.rcv_seq + len(body) and not pair.overrun


def test_malformed_framing_resets_both_and_nothing_past_it_passes():
    """The segment with the bad chunk-size line: its bytes before it go on, the rest is
    cut, and the client's RST comes right after them (at its rcv_nxt, or RFC 5961 has
    it ignored)."""
    body = b"5\r\nhello\r\n" + b"zz\r\nworld\r\n0\r\n\r\n"
    eng = Engine()
    pair, _ = splice_chunked(eng, body, 0)
    d, out = run(eng, from_server(B.rcv_seq, B.snd_seq, payload=body[:6]))
    assert bytes(valid(out)[TCP].payload) == body[:6]
    d, out = run(eng, from_server(B.rcv_seq + 6, B.snd_seq, payload=body[6:]))
    assert d == Decision.MANGLE and bytes(valid(out)[TCP].payload) == body[6:8]   # up to where the scan began
    assert eng.counters["chunked.malformed"] == 1
    assert eng.counters["pairs.reset_by_engine.chunked_malformed"] == 1
    assert pair.reset and pair.state == State.CLOSING and not pair.end_final[S2C]
    rsts = {valid(p).dst: valid(p)[TCP] for p in eng.injected}
    assert set(rsts) == {"198.18.1.2", "198.18.2.2"} and all(t.flags & 0x04 for t in rsts.values())
    assert rsts["198.18.1.2"].seq == A.snd_seq + 8
    # A retransmission of it later is cut too: the client never gets the terminator.
    d, out = run(eng, from_server(B.rcv_seq + 10, B.snd_seq, payload=body[10:]))
    assert not valid(out)[TCP].payload and not pair.overrun


def test_malformed_framing_in_a_held_packet():
    """Found while the splice releases the packets held during the hand-off."""
    body = b"5\r\nhello\r\nQ\r\n"
    eng = Engine()
    pair, out = splice_chunked(eng, body, 0, held=[from_server(B.rcv_seq, B.snd_seq, payload=body)])
    (_h, d, buf), = out
    assert d == Decision.MANGLE and not valid(buf)[TCP].payload
    assert pair.reset and eng.counters["chunked.malformed"] == 1


def test_origin_fin_before_the_last_chunk_passes_but_never_resumes():
    """The origin closes mid-body: the client sees the FIN before any last-chunk (a
    truncated message), the pair is not taken back."""
    body = chunked([30, 30])
    eng = Engine()
    pair, _ = splice_chunked(eng, body, 0)
    part = body[:40]
    d, out = run(eng, from_server(B.rcv_seq, B.snd_seq, P.ACK | P.FIN, payload=part))
    ip = valid(out)
    assert bytes(ip[TCP].payload) == part and ip[TCP].flags & 0x01
    run(eng, from_client(A.rcv_seq, A.snd_seq + 41))
    assert not pair.resuming and pair.message_done is None


def test_upload_direction_fin_at_a_tentative_end_ends_the_pair():
    """The same for a request body (C2S, end_fin off as an upload splices it): a FIN
    before the last chunk is a truncated upload; the engine ends the pair."""
    body = chunked([20])
    eng = Engine()
    pair = registered(eng)
    eng.splice(pair, A, B, limits=(ChunkedScanner(upstream=False), 0), end_fin=(False, False), resume=True)
    d, out = run(eng, from_client(A.rcv_seq, A.snd_seq, P.ACK | P.FIN, payload=body[:10]))
    assert valid(out)[TCP].flags & 0x01
    assert pair.reset and eng.counters["pairs.reset_by_engine.truncated_message"] == 1


def test_upload_direction_next_request_kept_for_the_resume():
    """C2S: a chunked request body whose last chunk shares a segment with the next
    request: the body goes to the origin, the request is kept for the rebuilt socket."""
    body = chunked([7, 300], ext=True)
    nxt = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
    eng = Engine()
    pair = registered(eng)
    eng.splice(pair, A, B, limits=(ChunkedScanner(upstream=False), 0), end_fin=(False, False), resume=True)
    d, out = run(eng, from_client(A.rcv_seq, A.snd_seq, P.ACK | P.PSH, payload=body + nxt))
    assert bytes(valid(out)[TCP].payload) == body
    assert eng.counters["held.next_message"] == 1 and pair.end_final[C2S]
    run(eng, from_server(B.rcv_seq, B.snd_seq + len(body)))
    assert pair.resuming
    (handle, decision, buf), = eng.finish_resume(pair)
    assert bytes(valid(buf)[TCP].payload) == body + nxt and handle is None


def test_fast_flows_follow_the_tentative_end():
    """The origin's flow ends where the framing must be read next, and is written again
    whenever that moves; no flow watches a tentative end; at the final end the client's
    flow watches for its acknowledgement, as with a byte count."""
    body = chunked([1000, 2000])
    eng = Engine()
    eng.fast = True
    pair, _ = splice_chunked(eng, body, 0)
    first_data_end = B.rcv_seq + body.index(b"\r\n") + 2 + 1000
    second_data_end = B.rcv_seq + body.index(b"\r\n", 1010) + 2 + 2000
    # Nothing scanned yet: the flow ends at the first byte (the chunk-size line).  (The
    # request's end was acknowledged before the freeze: nobody watches for it.)
    assert pair.fast_sig == ((A.rcv_seq, None, False), (B.rcv_seq, None, False))
    eng.fast_ops.clear()
    # The line read: the end moves to the first chunk-data's end.
    run(eng, from_server(B.rcv_seq, B.snd_seq, payload=body[:500]))
    assert pair.fast_sig == ((A.rcv_seq, None, False), (first_data_end, None, False))
    assert [p.id for p in eng.fast_ops] == [pair.id]
    eng.fast_ops.clear()
    # Chunk-data before the end: forwarded (as the program would), nothing to write.
    run(eng, from_server(B.rcv_seq + 500, B.snd_seq, payload=body[500:700]))
    assert eng.fast_ops == []
    # A segment crossing the data end: scanned, the end moves to the second chunk's.
    run(eng, from_server(B.rcv_seq + 700, B.snd_seq, payload=body[700:1500]))
    assert pair.fast_sig == ((A.rcv_seq, None, False), (second_data_end, None, False))
    assert [p.id for p in eng.fast_ops] == [pair.id]
    eng.fast_ops.clear()
    # Up to the final end: the client's flow now watches it.
    run(eng, from_server(B.rcv_seq + 1500, B.snd_seq, payload=body[1500:]))
    end = B.rcv_seq + len(body)
    assert second_data_end < end
    assert pair.end_final[S2C] and pair.fast_sig == ((A.rcv_seq, end, False), (end, None, False))


def test_a_scanner_already_done_is_a_limit_of_zero():
    body = chunked([3])
    eng = Engine()
    pair = registered(eng)
    eng.splice(pair, A, B, limits=(0, scanner_after(body, len(body))), resume=True)
    assert pair.end_seq[S2C] == B.rcv_seq and pair.end_final[S2C] and pair.follow[S2C] is None


def test_splice_record_names_a_chunked_limit():
    """Replay does not apply message ends; the record says a direction was chunked
    (its scanner's state is not recorded) and stays JSON."""
    records = []
    eng = Engine()
    eng.splice_log = records.append
    splice_chunked(eng, chunked([10]), 4)
    rec = json.loads(json.dumps(records[0]))
    assert rec["limits"] == [0, "chunked"]
    from nfsplice.engine import pair_from_record
    p, a, _b = pair_from_record(rec)
    assert (a.snd_seq, a.rcv_seq, p.server.port) == (A.snd_seq, A.rcv_seq, 8000)
    assert splice_record(registered(Engine()), A, B, (0, 0), (False, False))["limits"] == [None, None]


def test_drain_within_a_scanner():
    """handoff.within: what the drain may move of a direction: all, a count, or what the
    scanner says belongs to the message (and then 0: past its end)."""
    body = chunked([4, 2])
    assert handoff.within(None, b"abc") == 3 and handoff.within(2, b"abc") == 2
    sc = ChunkedScanner(upstream=True)
    assert handoff.within(sc, body[:5]) == 5 and not sc.done
    assert handoff.within(sc, body[5:] + NEXT) == len(body) - 5 and sc.done
    assert handoff.within(sc, NEXT) == 0


def test_gso_packet_cut_to_one_segment_is_sent_as_a_copy():
    """A GSO packet crossing a final end, cut to no more than one segment: the kernel
    would drop it after the verdict (the receiver then waits for an RTO), so the engine
    injects the cut copy and drops the queued packet.  A cut that leaves more than a
    segment, or of a packet that was one segment already, is a plain verdict."""
    a = A.__class__(**{**A.__dict__, "mss": 1448})
    body = chunked([3000])
    for keep, plen, want in ((100, 5000, Decision.DROP), (0, 5000, Decision.DROP),
                             (2000, 5000, Decision.MANGLE), (100, 1000, Decision.MANGLE)):
        eng = Engine()
        pair = registered(eng)
        eng.splice(pair, a, B, limits=(0, scanner_after(body, len(body) - keep)), resume=True)
        eng.injected.clear()
        tail = body[len(body) - keep:]
        data = (tail + NEXT * 200)[:plen]
        d, out = run(eng, from_server(B.rcv_seq, B.snd_seq, payload=data))
        assert d == want and pair.end_final[S2C], (keep, plen)
        if want == Decision.DROP:
            (copy,) = eng.injected
            ip = valid(copy)
            assert bytes(ip[TCP].payload) == tail and ip.dst == "198.18.1.2" and ip[TCP].flags & 0x10
            assert eng.counters["cut.reinjected"] == 1
        else:
            assert bytes(valid(out)[TCP].payload) == tail and not eng.injected


def test_malformed_framing_in_a_gso_packet_reset_after_the_bytes_before_it():
    """The bad line 100 bytes into a GSO packet: the 100 bytes go out as a copy, and the
    RSTs after it (the client would ignore one ahead of its rcv_nxt)."""
    a = A.__class__(**{**A.__dict__, "mss": 1448})
    eng = Engine()
    pair = registered(eng)
    eng.splice(pair, a, B, limits=(0, scanner_after(b"64\r\n", 4)), resume=True)
    eng.injected.clear()
    data = b"d" * 100 + b"zz\r\n" + b"x" * 4896
    d, _ = run(eng, from_server(B.rcv_seq, B.snd_seq, payload=data))
    assert d == Decision.DROP and pair.reset
    first, *rsts = [valid(p) for p in eng.injected]
    assert bytes(first[TCP].payload) == b"d" * 100 and not first[TCP].flags & 0x04
    assert sorted(ip.dst for ip in rsts) == ["198.18.1.2", "198.18.2.2"]
    assert [ip[TCP].seq for ip in rsts if ip.dst == "198.18.1.2"] == [A.snd_seq + 100]
