"""Both queue backends (netlink, netfilterqueue): held verdicts, and nfsplice tcp end to end
in the lab, byte-exact, with the stats file and the rules gone after SIGTERM (root)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netns_lab.topology import ORIGIN_ADDR, PROXY_CLIENT_ADDR, Lab
from netns_lab.traffic import ServerProcess, run_client

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
BACKENDS = [("netlink", "qb1"), ("netfilterqueue", "qb2")]

pytestmark = pytest.mark.root


# -- the backend interface: hold one packet, verdict it later with a new payload -------
HELD = r'''
import json, socket, sys, time
from nfsplice.queue import ACCEPT, DROP, QueueError, open_backend
q = open_backend(sys.argv[1], 7)
try:
    open_backend(sys.argv[1], 7).close()
    busy = None
except QueueError as e:
    busy = str(e)
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); rx.bind(("127.0.0.1", 5555)); rx.settimeout(1.0)
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); tx.setsockopt(socket.SOL_SOCKET, 36, 0x42)  # SO_MARK
for m in (b"first-AAAA", b"second-BBB", b"third-CCCC"):
    tx.sendto(m, ("127.0.0.1", 5555))
pkts, bufs, end = [], [], time.monotonic() + 5
while len(pkts) < 3 and time.monotonic() < end:
    got = q.receive(0.2)
    pkts += got
    bufs += [bytearray(p.buf) for p in got]             # netlink: views valid until the next receive
out = {"busy": busy, "n": len(pkts), "meta": [(p.hook, p.mark, p.truncated, p.csum_partial, len(b)) for p, b in zip(pkts, bufs)]}
held, held_buf = pkts[0], bufs[0]                       # what the engine keeps: handle + copy
q.verdict(pkts[1], ACCEPT)
q.verdict(pkts[2], DROP)
out["got1"] = rx.recv(100).decode()
out["later"] = len(q.receive(0.2))                      # the kernel keeps waiting for the held one
held_buf[-4:] = b"ZZZZ"
held_buf[26:28] = b"\0\0"                               # UDP checksum: none
q.verdict(held, ACCEPT, memoryview(held_buf))
out["got2"] = rx.recv(100).decode()
try:
    out["got3"] = rx.recv(100).decode()
except TimeoutError:
    out["got3"] = None
q.close()
print(json.dumps(out))
'''


@pytest.mark.parametrize("backend", [b for b, _ in BACKENDS])
def test_held_packet_verdicted_later(backend):
    with Lab("qb3") as lab:
        ns = lab.proxy
        lab.run(ns, "iptables", "-t", "raw", "-A", "OUTPUT", "-o", "lo", "-p", "udp", "--dport", "5555",
                "-j", "NFQUEUE", "--queue-num", "7")
        p = lab.run(ns, sys.executable, "-c", HELD, backend, cwd=str(REPO), timeout=30)
        out = json.loads(p.stdout)
    assert "bound by another process" in (out["busy"] or ""), out["busy"]
    assert out["n"] == 3
    for hook, mark, truncated, csum_partial, n in out["meta"]:
        assert (hook, mark, truncated, n) == (3, 0x42, False, 38)      # LOCAL_OUT, SO_MARK
        if backend == "netfilterqueue":
            assert not csum_partial
    assert out["got1"] == "second-BBB"
    assert out["later"] == 0
    assert out["got2"] == "first-ZZZZ"
    assert out["got3"] is None


BATCH = r'''
import json, socket, sys, time
from nfsplice.queue import ACCEPT, DROP, open_backend
q = open_backend("netlink", 8)
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); rx.bind(("127.0.0.1", 5556)); rx.settimeout(1.0)
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tx.setsockopt(socket.SOL_SOCKET, 32, 8 << 20)   # SO_SNDBUFFORCE: queued datagrams count against it
rx.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)   # SO_RCVBUFFORCE
n = 40
for i in range(n):
    tx.sendto(b"m%03d-" % i + b"x" * 20000, ("127.0.0.1", 5556))
pkts, bufs, end = [], [], time.monotonic() + 5
while len(pkts) < n and time.monotonic() < end:
    got = q.receive(0.2)
    pkts += got
    bufs += [bytearray(p.buf) for p in got]
items = []
for i, (p, b) in enumerate(zip(pkts, bufs)):
    if i % 3 == 0:
        items.append((p, DROP, None))
    elif i % 3 == 1:
        items.append((p, ACCEPT, None))
    else:
        b[28:29] = b"M"; b[26:28] = b"\0\0"     # new payload, no UDP checksum
        items.append((p, ACCEPT, memoryview(b)))
failed = q.verdicts(items)
got = []
try:
    while True:
        got.append(rx.recv(30000)[:4].decode())
except TimeoutError:
    pass
print(json.dumps({"n": len(pkts), "failed": failed, "got": got}))
'''


def test_netlink_verdicts_batched_in_order():
    """Many verdicts in one datagram (several when they exceed VERDICT_BATCH_BYTES): each
    packet gets its own, in order, with its own payload."""
    with Lab("qb4") as lab:
        ns = lab.proxy
        lab.run(ns, "iptables", "-t", "raw", "-A", "OUTPUT", "-o", "lo", "-p", "udp", "--dport", "5556",
                "-j", "NFQUEUE", "--queue-num", "8")
        p = lab.run(ns, sys.executable, "-c", BATCH, cwd=str(REPO), timeout=30)
        out = json.loads(p.stdout)
    assert out["n"] == 40 and out["failed"] == 0, out
    want = [("M" if i % 3 == 2 else "m") + f"{i:03d}" for i in range(40) if i % 3]
    assert out["got"] == want, out["got"]


def test_netfilterqueue_refuses_fail_open():
    from nfsplice.queue import QueueError, open_backend
    with pytest.raises(QueueError, match="FAIL_OPEN"):
        open_backend("netfilterqueue", 7, fail_open=True)


# -- nfsplice tcp through each backend ---------------------------------------------------
def _read_stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _wait_stats(path: Path, proc: subprocess.Popen, ok, timeout: float = 5.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        st = _read_stats(path)
        if ok(st) or time.monotonic() > end or proc.poll() is not None:
            return st
        time.sleep(0.1)


@pytest.mark.parametrize("backend,prefix", BACKENDS)
def test_tcp_splice_through_backend(backend, prefix, tmp_path):
    ready = tmp_path / "ready"
    stats_path = Path("/run/nfsplice") / f"{prefix}.json"
    stats_path.unlink(missing_ok=True)
    log_path = tmp_path / "nfsplice.log"
    with Lab(prefix) as lab, ServerProcess(lab, lab.origin, ORIGIN_ADDR, 9001) as srv, \
            open(log_path, "wb") as log:
        proc = lab.popen(lab.proxy, sys.executable, "-m", "nfsplice", "tcp",
                         "--listen", f"{PROXY_CLIENT_ADDR}:9000", "--upstream", f"{ORIGIN_ADDR}:9001",
                         "--backend", backend, "--instance", prefix, "--ready-file", str(ready),
                         "--tap-dir", str(tmp_path / "tap"),
                         cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)

        def fail(msg: str):
            pytest.fail(f"{backend}: {msg}\n--- nfsplice log ---\n{log_path.read_text()[-4000:]}")

        try:
            end = time.monotonic() + 10
            while not ready.exists():
                if proc.poll() is not None:
                    fail(f"nfsplice exited {proc.returncode} before it was ready")
                if time.monotonic() > end:
                    fail("nfsplice not ready after 10 s")
                time.sleep(0.05)

            target = f"{PROXY_CLIENT_ADDR}:9000"
            r1 = run_client(target, upload=MiB, download=MiB, mode="client-first", count=5, concurrency=5,
                            netns=lab.client, total_timeout=30)
            if not r1["ok"] or srv.check(r1):
                fail(f"1 MiB x 5 not byte-exact: {srv.check(r1)}")
            st = _wait_stats(stats_path, proc, lambda s: s.get("proxy.spliced", 0) >= 5
                             and s.get("bytes.s2c", 0) >= 5 * MiB)
            assert st.get("backend") == backend, st
            assert st.get("proxy.spliced") == 5, st
            assert st.get("bytes.s2c", 0) >= 5 * MiB, st

            r2 = run_client(target, download=8 * MiB, mode="client-first", count=1,
                            netns=lab.client, total_timeout=30)
            if not r2["ok"] or srv.check(r2):
                fail(f"8 MiB download not byte-exact: {srv.check(r2)}")

            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(15)
            except subprocess.TimeoutExpired:
                fail("nfsplice did not exit within 15 s of SIGTERM")
            if rc != 0:
                fail(f"nfsplice exited {rc} after SIGTERM")
            st = _read_stats(stats_path)       # written on exit
            assert st.get("proxy.spliced") == 6, st
            assert st.get("bytes.s2c", 0) >= 13 * MiB, st
            assert st.get("bytes.c2s", 0) >= 5 * MiB, st
            rules = lab.run(lab.proxy, "iptables-save", "-t", "raw").stdout.decode()
            assert "NFSPLICE" not in rules, rules
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
