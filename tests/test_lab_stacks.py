"""Different TCP stacks on the two sides of a splice, and a receiver that stops reading.

The three namespaces are separate TCP stacks with their own sysctls, so each test gives
the client and the origin different settings and checks that the splice translates
what differs: window scale factors (from tcp_rmem), timestamps or SACK off on one side,
and a zero window while the client does not read.
"""
from __future__ import annotations

import json
import sys

import pytest

from netns_lab.topology import Lab
from netns_lab.traffic import ServerProcess, run_client
from tests.splicer import LISTEN, REPO, Splicer, raw_rules

pytestmark = pytest.mark.root


@pytest.fixture
def lab():
    with Lab("stk") as lab:
        yield lab


def _run(lab, name: str, sizes, mode="client-first"):
    with ServerProcess(lab, lab.origin, "198.18.2.2", 9001) as srv, Splicer(lab, name) as sp:
        result = run_client(LISTEN, sizes=sizes, mode=mode, concurrency=len(sizes), netns=lab.client,
                            timeout=60, seed=3)
        bad = [c for c in result["connections"] if not c["ok"]]
        assert not bad, f"{bad[:3]}\n{sp.log_text()}"
        assert srv.check(result) == []
        st = sp.wait_idle()
        assert st.get("proxy.spliced") == len(sizes) and st.get("dropped.proxy_socket", 0) == 0, st
        assert sp.stop() == 0
        assert "NFSPLICE" not in raw_rules(lab)
        return st, sp


def _wscale(lab, ns: str) -> str:
    return lab.run(ns, "ss", "-tni").stdout.decode()


def test_different_window_scales(lab):
    """Client buffers small (window scale 0-2), origin's large (scale 9+): every window
    crossing the splice is re-expressed in the receiver's units."""
    lab.sysctl(lab.client, "net.ipv4.tcp_rmem", "4096 65536 131072")
    lab.sysctl(lab.origin, "net.ipv4.tcp_rmem", "4096 131072 67108864")
    lab.sysctl(lab.origin, "net.core.rmem_max", "67108864")
    st, sp = _run(lab, "stk-ws", [(1 << 20, 1 << 20), (4 << 20, 0), (0, 4 << 20)])
    with open(sp.pairs_log) as f:
        rec = json.loads(f.readline())
    # The two connections really negotiated different scales.
    assert rec["a"]["snd_wscale"] != rec["b"]["snd_wscale"], rec


@pytest.mark.parametrize("side,key", [("client", "net.ipv4.tcp_timestamps"), ("origin", "net.ipv4.tcp_timestamps"),
                                      ("client", "net.ipv4.tcp_sack"), ("origin", "net.ipv4.tcp_sack")])
def test_option_off_on_one_side(lab, side, key):
    lab.sysctl(getattr(lab, side), key, "0")
    lab.set_segmentation(True)
    lab.set_loss(lab.client, 1)
    lab.set_loss(lab.origin, 1)
    st, _ = _run(lab, f"stk-{side}-{key.rsplit('_', 1)[1]}", [(1 << 20, 1 << 20)] * 4)
    if key.endswith("timestamps"):
        assert st.get("pairs.timestamps_mismatch") == 4, st


SLOW_READER = r"""
import socket, sys, time, hashlib
sys.path.insert(0, sys.argv[1])
from netns_lab.traffic import Header, download_seed, first_mismatch
size = int(sys.argv[2])
s = socket.create_connection(("198.18.1.1", 9000), timeout=30)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
s.sendall(Header("client-first", 0, size, 5, 77).pack())
time.sleep(3)                     # the origin fills our window: zero window, probes
buf = bytearray()
while len(buf) < size:
    chunk = s.recv(1 << 16)
    if not chunk:
        break
    buf += chunk
    time.sleep(0.001)             # and read slowly afterwards
s.shutdown(socket.SHUT_WR)
rest = s.recv(1)
print(len(buf), first_mismatch(download_seed(5), 0, bytes(buf)), len(rest))
"""


def test_zero_window(lab):
    size = 4 << 20
    with ServerProcess(lab, lab.origin, "198.18.2.2", 9001) as srv, Splicer(lab, "stk-zw") as sp:
        out = lab.run(lab.client, sys.executable, "-c", SLOW_READER, REPO, str(size), timeout=120)
        n, bad, rest = out.stdout.decode().split()
        assert (int(n), bad, int(rest)) == (size, "None", 0)
        st = sp.wait_idle()
        assert st.get("proxy.spliced") == 1 and st.get("dropped.proxy_socket", 0) == 0, st
        # The client did advertise a zero window through the splice.
        assert st.get("window.zero_c2s", 0) > 0, st
        # The origin's side of it: it sent the whole download and saw a clean end.
        report = [r for r in srv.reports() if r.get("tag") == 77]
        assert report and report[0]["download_sent"] == size and report[0]["ok"], report
        assert sp.stop() == 0
