"""The engine with a request body spliced (an upload): limits (N, 0), end_fin off.

The client's body is the message; the origin's bytes are its answer, which the proxy
reads itself after the resume.  No network: packets built and checked as in
test_engine.
"""
from __future__ import annotations

from nfsplice import packet as P
from nfsplice.engine import C2S, Decision, Engine
from tests.test_engine import from_client, from_server, new_pair, run, valid


def upload_pair(eng: Engine, n: int):
    return new_pair(eng, limits=(n, 0), end_fin=(False, False), resume=True)


def test_body_forwarded_then_resume_with_the_answer_kept():
    """The origin's answer rides on the ACK of the body's last byte: the ACK reaches
    the client side, the answer is kept whole for the rebuilt upstream socket."""
    eng = Engine()
    pair = upload_pair(eng, 200)
    for i in range(2):
        d, out = run(eng, from_client(5000 + 100 * i, 1000, payload=bytes([97 + i]) * 100))
        assert d == Decision.MANGLE and len(valid(out)["TCP"].payload) == 100
    assert not pair.resuming
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    d, out = run(eng, from_server(70000, 90200, flags=P.ACK | P.PSH, payload=answer))
    ip = valid(out)
    assert d == Decision.MANGLE and not ip["TCP"].payload and ip["TCP"].ack == 5200
    assert pair.resuming and eng.counters["held.next_message"] == 1
    eng.resume_numbers(pair)
    (handle, decision, buf), = eng.finish_resume(pair)
    ip = valid(buf)
    assert handle is None and decision == Decision.ACCEPT
    assert (ip.dst, ip["TCP"].dport, ip["TCP"].seq) == ("198.18.2.1", 61000, 70000)
    assert bytes(ip["TCP"].payload) == answer


def test_fin_right_after_the_body_waits_for_the_rebuilt_socket():
    eng = Engine()
    pair = upload_pair(eng, 100)
    d, out = run(eng, from_client(5000, 1000, flags=P.ACK | P.FIN, payload=b"z" * 100))
    ip = valid(out)
    assert bytes(ip["TCP"].payload) == b"z" * 100 and not ip["TCP"].flags & 0x01
    assert pair.fin_seq[C2S] is None and eng.counters["dropped.beyond_message_fin"] == 1
    run(eng, from_server(70000, 90100))
    assert pair.resuming


def test_fin_before_the_end_passes_and_ends_the_pair():
    """A client that gives up half-way: its FIN reaches the origin (which sees a
    truncated body); the pair cannot resume, so the engine ends it at once with a RST
    each way, the origin's just past the FIN (RFC 5961: exactly at rcv_nxt)."""
    eng = Engine()
    pair = upload_pair(eng, 1000)
    d, out = run(eng, from_client(5000, 1000, flags=P.ACK | P.FIN, payload=b"h" * 100))
    assert valid(out)["TCP"].flags & 0x01
    assert pair.fin_seq[C2S] == 5100
    assert pair.reset and pair.state.name == "CLOSING" and not pair.resuming
    assert eng.counters["pairs.reset_by_engine.truncated_message"] == 1
    rsts = [valid(b) for b in eng.injected]
    to_origin, = [ip for ip in rsts if ip.dst == "198.18.2.2"]
    to_client, = [ip for ip in rsts if ip.dst == "198.18.1.2"]
    assert to_origin["TCP"].flags & 0x04 and to_origin["TCP"].seq == 90101
    assert to_client["TCP"].flags & 0x04 and to_client["TCP"].seq == 1000
