"""The sockets rebuilt at a resume offer exactly the window their peers were offered
(no shrinking): found by a 1 MiB response after a resumed one that waited ~200 ms for
the origin's RTO, because the origin sent into the window the client had offered and
the rebuilt socket dropped what lay past its own, smaller one.

And no more: a pair that resumes offers no window past the other direction's message
end plus NEXT_MESSAGE_WINDOW, so the next response cannot arrive whole in the rebuilt
socket before the proxy has read its head (it was copied then, never spliced).
"""
from __future__ import annotations

from nfsplice import packet as P
from nfsplice.engine import NEXT_MESSAGE_WINDOW, Endpoint, Engine, Pair, SocketState
from tests.test_engine import CLIENT, PA, PB, SERVER, run, valid

# window: (snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup), as TCP_REPAIR_WINDOW reads it
A = SocketState(snd_seq=1000, rcv_seq=5000, snd_wscale=7, rcv_wscale=7, window=(5000, 64000, 64000, 65535, 5000))
B = SocketState(snd_seq=90000, rcv_seq=70000, snd_wscale=7, rcv_wscale=7,
                window=(70000, 64000, 64000, 65535, 70000))


def resumed(client_window: int, server_window: int = 10, out: list | None = None,
            b: SocketState = B, fast: bool = True) -> tuple[SocketState, SocketState]:
    eng = Engine()
    eng.fast = fast        # (the limit is the fast path's; its flows are not looked at here)
    pair = eng.register(Pair(Endpoint(CLIENT, 40000), Endpoint(PA, 8080), Endpoint(PB, 61000),
                             Endpoint(SERVER, 8000)), now=0.0)
    eng.splice(pair, A, b, limits=(0, 100), resume=True)
    _, got = run(eng, P.build(SERVER, PB, 8000, 61000, 70000, 90000, P.ACK, window=server_window,
                              payload=b"m" * 100))
    buf = bytearray(P.build(CLIENT, PA, 40000, 8080, 5000, 1100, P.ACK, window=client_window))
    eng.process(memoryview(buf), now=1.0)
    assert pair.resuming
    valid(got), valid(buf)                 # checksums still right with a window cut
    if out is not None:
        out += [P.TCPView(bytearray(got)), P.TCPView(buf)]
    return eng.resume_numbers(pair)


def test_client_window_past_the_message_end_is_cut_to_the_next_message_window():
    """The client offered 2000 << 7 bytes past the body's end; the origin is offered
    NEXT_MESSAGE_WINDOW of them, and the rebuilt upstream socket reaches exactly as far."""
    out = []
    a2, b2 = resumed(client_window=2000, out=out)
    assert out[1].window == NEXT_MESSAGE_WINDOW >> 7                 # the ACK as forwarded
    assert b2.rcv_seq == 70100
    assert b2.window[3] == NEXT_MESSAGE_WINDOW and b2.window[:3] == B.window[:3]
    # The origin offered the client less than A's own edge and the limit: the limit,
    # as far as the program may have offered in ACKs the engine never saw.
    assert a2.window[3] == NEXT_MESSAGE_WINDOW and a2.window[:3] == A.window[:3]


def test_rebuilt_socket_reaches_as_far_as_its_frozen_socket_had_offered():
    """B had offered up to 70000 + 200000; the body took 100 of that, and the client
    offered less (100 << 7) past the end: B's own edge stands, counted from where B
    offered it (not from the message end, which let a whole next body in)."""
    big = SocketState(snd_seq=90000, rcv_seq=70000, snd_wscale=7, rcv_wscale=7,
                      window=(70000, 64000, 64000, 200000, 70000))
    a2, b2 = resumed(client_window=100, b=big)
    assert b2.window[3] == 70000 + 200000 - 70100 and b2.window[:3] == big.window[:3]


def test_rebuilt_socket_reaches_the_next_message_window_at_least():
    """The frozen socket's edge and the ACKs the engine saw fall short of the limit, but
    the program may have forwarded ACKs offering up to it (their copies came late):
    the rebuilt socket reaches as far."""
    a2, b2 = resumed(client_window=100)
    assert b2.window[3] == NEXT_MESSAGE_WINDOW


def test_rebuilt_client_socket_keeps_the_origins_window():
    out = []
    a2, _b2 = resumed(client_window=100, server_window=3000, out=out)
    # The origin acknowledged nothing new of the client's (ack 90000 = 5000 in A's
    # space) and offered 3000 << 7, cut at the request's end (5000) + NEXT_MESSAGE_WINDOW.
    assert out[0].window == NEXT_MESSAGE_WINDOW >> 7
    assert a2.rcv_seq == 5000 and a2.window[3] == NEXT_MESSAGE_WINDOW


def test_a_pair_that_does_not_resume_passes_the_window_whole():
    eng = Engine()
    pair = eng.register(Pair(Endpoint(CLIENT, 40000), Endpoint(PA, 8080), Endpoint(PB, 61000),
                             Endpoint(SERVER, 8000)), now=0.0)
    eng.splice(pair, A, B, limits=(0, 100), resume=False)
    run(eng, P.build(SERVER, PB, 8000, 61000, 70000, 90000, P.ACK, payload=b"m" * 100))
    _, got = run(eng, P.build(CLIENT, PA, 40000, 8080, 5000, 1100, P.ACK, window=2000))
    assert P.TCPView(bytearray(got)).window == 2000


def test_window_update_at_the_splice_is_cut_too():
    """The origin learns the client's window at the splice (an injected pure ACK): for a
    pair that resumes, no further than the body's end + NEXT_MESSAGE_WINDOW."""
    eng = Engine()
    eng.fast = True
    pair = eng.register(Pair(Endpoint(CLIENT, 40000), Endpoint(PA, 8080), Endpoint(PB, 61000),
                             Endpoint(SERVER, 8000)), now=0.0)
    big = SocketState(snd_seq=1000, rcv_seq=5000, snd_wscale=7, rcv_wscale=7,
                      window=(5000, 4 << 20, 4 << 20, 65535, 5000))      # the client offers 4 MiB
    eng.splice(pair, big, B, limits=(0, 100), resume=True)
    wu = P.TCPView(bytearray(eng.injected[-1]))
    assert (wu.ack, wu.window) == (70000, (100 + NEXT_MESSAGE_WINDOW) >> 7)
    assert pair.win_edge[0] == 70000 + ((100 + NEXT_MESSAGE_WINDOW) >> 7 << 7)


def test_without_the_fast_path_nothing_is_cut():
    """Without the fast path a splice costs more than the proxy's copy of a body that
    arrived whole: the window passes whole, and the rebuilt socket offers what was offered."""
    out = []
    a2, b2 = resumed(client_window=2000, out=out, fast=False)
    assert out[1].window == 2000
    assert b2.window[3] == 2000 << 7
