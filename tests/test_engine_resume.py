"""The sockets rebuilt at a resume offer at least the window their peers were offered
through the splice (no shrinking): found by a 1 MiB response after a resumed one that
waited ~200 ms for the origin's RTO, because the origin sent into the window the
client had offered and the rebuilt socket dropped what lay past its own, smaller one.
"""
from __future__ import annotations

from nfsplice import packet as P
from nfsplice.engine import Endpoint, Engine, Pair, SocketState
from tests.test_engine import CLIENT, PA, PB, SERVER, run

# window: (snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup), as TCP_REPAIR_WINDOW reads it
A = SocketState(snd_seq=1000, rcv_seq=5000, snd_wscale=7, rcv_wscale=7, window=(5000, 64000, 64000, 65535, 5000))
B = SocketState(snd_seq=90000, rcv_seq=70000, snd_wscale=7, rcv_wscale=7,
                window=(70000, 64000, 64000, 65535, 70000))


def resumed(client_window: int, server_window: int = 10) -> tuple[SocketState, SocketState]:
    eng = Engine()
    pair = eng.register(Pair(Endpoint(CLIENT, 40000), Endpoint(PA, 8080), Endpoint(PB, 61000),
                             Endpoint(SERVER, 8000)), now=0.0)
    eng.splice(pair, A, B, limits=(0, 100), resume=True)
    run(eng, P.build(SERVER, PB, 8000, 61000, 70000, 90000, P.ACK, window=server_window, payload=b"m" * 100))
    buf = bytearray(P.build(CLIENT, PA, 40000, 8080, 5000, 1100, P.ACK, window=client_window))
    eng.process(memoryview(buf), now=1.0)
    assert pair.resuming
    return eng.resume_numbers(pair)


def test_rebuilt_upstream_socket_keeps_the_clients_window():
    """The client offered 2000 << 7 bytes past the body's end; the origin may send that
    much at once, so the rebuilt upstream socket's receive window reaches as far."""
    a2, b2 = resumed(client_window=2000)
    assert b2.rcv_seq == 70100
    assert b2.window[3] == 2000 << 7 and b2.window[:3] == B.window[:3]
    assert a2.window == A.window          # the origin offered less than A's own: kept


def test_rebuilt_socket_window_never_below_its_own():
    a2, b2 = resumed(client_window=100)  # 12800 bytes: less than B's 65535
    assert b2.window == B.window


def test_rebuilt_client_socket_keeps_the_origins_window():
    a2, _b2 = resumed(client_window=100, server_window=3000)
    # the origin acknowledged nothing new of the client's (ack 90000 = 5000 in A's
    # space), so the edge is 5000 + 3000 << 7.
    assert a2.rcv_seq == 5000 and a2.window[3] == 3000 << 7
