"""netns_lab.traffic: the pattern, the protocol on loopback, and through the lab (root)."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from netns_lab import traffic as T
from netns_lab.topology import CLIENT_ADDR, ORIGIN_ADDR, PROXY_CLIENT_ADDR, Lab

MiB = 1 << 20
HYP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def naive(seed: int, offset: int, n: int) -> bytes:
    key = T.pattern_key(seed)
    j0, j1 = offset // 8, (offset + n + 7) // 8
    words = b"".join(((j ^ key) & (2**64 - 1)).to_bytes(8, "big") for j in range(j0, j1))
    return words[offset - 8 * j0:offset - 8 * j0 + n]


def naive_first_diff(a: bytes, b: bytes, offset: int) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return offset + i
    return None


seeds = st.integers(0, 2**32 - 1)
offsets = st.one_of(st.integers(0, 4096), st.integers(0, 2**40), st.integers(0, 64).map(lambda k: k * T.CHUNK))


# -- pattern ----------------------------------------------------------------------------
@HYP
@given(seed=seeds, offset=offsets, n=st.integers(0, 3000))
def test_pattern_matches_definition(seed, offset, n):
    data = T.pattern(seed, offset, n)
    assert data == naive(seed, offset, n)
    assert T.first_mismatch(seed, offset, data) is None


@HYP
@given(seed=seeds, offset=st.integers(0, 3 * T.CHUNK), n=st.integers(0, 3 * T.CHUNK), cut=st.integers(0, 10**9))
def test_pattern_is_one_stream(seed, offset, n, cut):
    """Unaligned pieces, also across block boundaries, concatenate to the same stream."""
    cut = cut % (n + 1)
    whole = T.pattern(seed, offset, n)
    assert T.pattern(seed, offset, cut) + T.pattern(seed, offset + cut, n - cut) == whole


def test_pattern_words_and_directions():
    key = T.pattern_key(7)
    assert T.pattern(7, 8 * 5, 8) == (5 ^ key).to_bytes(8, "big")
    assert T.pattern(7, 0, 4096) != T.pattern(T.download_seed(7), 0, 4096)
    assert len(set(T.pattern(7, 0, 8 * 1000)[i:i + 8] for i in range(0, 8000, 8))) == 1000


@HYP
@given(seed=seeds, offset=offsets, n=st.integers(1, 2000), pos=st.integers(0, 10**9), x=st.integers(1, 255))
def test_single_byte_corruption_found_at_its_offset(seed, offset, n, pos, x):
    pos %= n
    data = bytearray(T.pattern(seed, offset, n))
    data[pos] ^= x
    assert T.first_mismatch(seed, offset, bytes(data)) == offset + pos


@HYP
@given(seed=seeds, base=st.integers(0, 2**37), words=st.integers(2, 300), i=st.integers(0, 10**9),
       k=st.integers(0, 10**9))
def test_swapped_words_found_in_the_first_one(seed, base, words, i, k):
    offset = 8 * base
    i, k = sorted((i % words, k % words))
    if i == k:
        k = (i + 1) % words
        i, k = sorted((i, k))
    data = bytearray(T.pattern(seed, offset, 8 * words))
    data[8 * i:8 * i + 8], data[8 * k:8 * k + 8] = data[8 * k:8 * k + 8], data[8 * i:8 * i + 8]
    fm = T.first_mismatch(seed, offset, bytes(data))
    assert fm == naive_first_diff(bytes(data), T.pattern(seed, offset, 8 * words), offset)
    assert offset + 8 * i <= fm < offset + 8 * i + 8


@HYP
@given(seed=seeds, offset=offsets, n=st.integers(20, 2000), pos=st.integers(0, 10**9))
def test_dropped_byte_found_at_or_just_after_it(seed, offset, n, pos):
    pos %= n - 17
    good = T.pattern(seed, offset, n)
    data = good[:pos] + good[pos + 1:]
    fm = T.first_mismatch(seed, offset, data)
    # The first wrong byte is the first one after the gap that differs from its
    # neighbour; words are unique, so that is less than 16 bytes on.
    assert fm == naive_first_diff(data, good, offset)
    assert fm is not None and offset + pos <= fm < offset + pos + 16


@HYP
@given(seed=seeds, offset=offsets, n=st.integers(20, 2000), pos=st.integers(0, 10**9), length=st.integers(1, 64))
def test_duplicated_segment_found(seed, offset, n, pos, length):
    pos = 1 + pos % (n - 18)
    length = min(length, pos)
    good = T.pattern(seed, offset, n)
    start = pos - length
    data = (good[:pos] + good[start:pos] + good[pos:])[:n]   # a retransmission delivered twice
    fm = T.first_mismatch(seed, offset, data)
    assert fm == naive_first_diff(data, good, offset)
    assert fm is not None and offset + pos <= fm < offset + pos + 16


def test_first_mismatch_large_and_sha():
    n = 9 * MiB + 5
    data = bytearray(T.pattern(3, 11, n))
    assert T.pattern_sha256(3, 11, n) == hashlib.sha256(data).hexdigest()
    data[7 * MiB + 3] ^= 1
    assert T.first_mismatch(3, 11, data) == 11 + 7 * MiB + 3
    assert T.first_mismatch(3, 11, memoryview(data)[:7 * MiB]) is None


def test_header_roundtrip():
    h = T.Header("server-first", 2**40, 5, 0xDEADBEEF, 77)
    raw = h.pack()
    assert len(raw) == 32 and raw[:4] == b"NFSP" and raw[4] == 1 and raw[5] == 1
    assert T.Header.unpack(raw) == h
    with pytest.raises(ValueError):
        T.Header.unpack(b"XXXX" + raw[4:])


def test_make_specs_deterministic():
    a = T.make_specs(mode="mixed", random_sizes=MiB, count=50, seed=9, tag_base=100)
    b = T.make_specs(mode="mixed", random_sizes=MiB, count=50, seed=9, tag_base=100)
    assert a == b
    assert {s.mode for s in a} == set(T.MODES)
    assert all(0 <= s.upload <= MiB and 0 <= s.download <= MiB for s in a)
    assert all(s.reset_at is not None and 0 <= s.reset_at <= s.download for s in a if s.mode == "reset")
    assert [s.tag for s in a] == list(range(100, 150))


# -- loopback, in-process ---------------------------------------------------------------
@pytest.fixture
def loop_server():
    srv = T.Server(("127.0.0.1", 0), timeout=10)
    t = srv.start_thread()
    yield srv
    srv.stop()
    t.join(5)


def _wait_results(srv, n, timeout=5.0):
    end = time.monotonic() + timeout
    while len(srv.results) < n and time.monotonic() < end:
        time.sleep(0.01)
    return srv.results


@pytest.mark.parametrize("mode", T.MODES)
def test_loopback_modes(loop_server, mode):
    sizes = [(0, 0), (1, 0), (0, 1), (1, 1), (65535, 65535), (MiB, 0), (0, MiB), (MiB + 3, MiB + 5)]
    s = T.run_client(("127.0.0.1", loop_server.port), sizes=sizes, mode=mode, concurrency=4, timeout=10)
    assert s["ok"], s
    _wait_results(loop_server, len(sizes))
    assert T.cross_check(s, loop_server.results) == []
    for c in s["connections"]:
        exp = c["reset_at"] if mode == "reset" else c["download"]
        assert c["received"] == exp
        assert c["download_sha256"] == T.pattern_sha256(T.download_seed(c["seed"]), 0, exp)


def test_loopback_many_concurrent(loop_server):
    s = T.run_client(("127.0.0.1", loop_server.port), mode="mixed", random_sizes=256 * 1024, count=300,
                     concurrency=250, timeout=20)
    assert s["ok"], [c for c in s["connections"] if not c["ok"]][:3]
    _wait_results(loop_server, 300)
    assert T.cross_check(s, loop_server.results) == []


def test_stall_times_out_with_offsets():
    """A server that sends 1000 right bytes and then nothing: the client gives up."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    held = []

    def serve():
        c, _ = ls.accept()
        hdr = T.Header.unpack(c.recv(32, socket.MSG_WAITALL))
        c.sendall(T.pattern(T.download_seed(hdr.seed), 0, 1000))
        held.append(c)

    threading.Thread(target=serve, daemon=True).start()
    t0 = time.monotonic()
    s = T.run_client(ls.getsockname(), download=5000, seed=4, timeout=1.0)
    c = s["connections"][0]
    assert time.monotonic() - t0 < 5
    assert not c["ok"] and c["error"].startswith("timeout")
    assert c["received"] == 1000 and c["first_missing_offset"] == 1000 and c["first_bad_offset"] is None
    ls.close()


def test_excess_and_wrong_data_reported():
    """A server that sends the wrong stream after 300 bytes and 10 bytes too many."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()

    def serve():
        c, _ = ls.accept()
        hdr = T.Header.unpack(c.recv(32, socket.MSG_WAITALL))
        c.sendall(T.pattern(T.download_seed(hdr.seed), 0, 300) + T.pattern(123, 300, 710))
        c.shutdown(socket.SHUT_WR)
        while c.recv(4096):
            pass
        c.close()

    threading.Thread(target=serve, daemon=True).start()
    s = T.run_client(ls.getsockname(), download=1000, mode="server-first", seed=5, timeout=5)
    c = s["connections"][0]
    assert not c["ok"] and c["first_bad_offset"] == 300 and c["received"] == 1010
    ls.close()


def test_connect_refused_is_reported():
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    port = ls.getsockname()[1]
    ls.close()
    s = T.run_client(("127.0.0.1", port), download=10, timeout=5)
    assert not s["ok"] and "refused" in s["connections"][0]["error"].lower()


# -- through the lab (root) ------------------------------------------------------------
PREFIX = "trf"
SERVER_PORT = 5201

RELAY = r'''
import socket, sys, threading
la, lp, da, dp, flip_up, flip_down, stall_down = sys.argv[1:8]
flip_up, flip_down, stall_down = (None if v == "-" else int(v) for v in (flip_up, flip_down, stall_down))
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((la, int(lp))); ls.listen(64)
print("ready", flush=True)
def pump(src, dst, flip, stall):
    n = 0
    while True:
        try:
            data = src.recv(65536)
        except OSError:
            break
        if not data:
            try: dst.shutdown(socket.SHUT_WR)
            except OSError: pass
            break
        if stall is not None and n + len(data) > stall:
            dst.sendall(data[:stall - n]); threading.Event().wait()
        if flip is not None and n <= flip < n + len(data):
            b = bytearray(data); b[flip - n] ^= 0x20; data = bytes(b)
        n += len(data)
        try: dst.sendall(data)
        except OSError: break
def handle(c):
    o = socket.create_connection((da, int(dp)))
    t = threading.Thread(target=pump, args=(c, o, None if flip_up is None else flip_up + 32, None), daemon=True)
    t.start(); pump(o, c, flip_down, stall_down); t.join(); c.close(); o.close()
while True:
    c, _ = ls.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
'''


@pytest.fixture(scope="module")
def lab():
    with Lab(PREFIX) as lab:
        yield lab


@pytest.fixture(scope="module")
def server(lab):
    with T.ServerProcess(lab, lab.origin, ORIGIN_ADDR, SERVER_PORT, timeout=30) as srv:
        yield srv


def _veths(lab):
    p = lab.prefix
    return ((lab.client, f"{p}-c0"), (lab.proxy, f"{p}-p0"), (lab.proxy, f"{p}-p1"), (lab.origin, f"{p}-o0"))


@pytest.fixture
def loss(lab):
    """Set loss on client and origin ingress.  veth passes GSO packets of up to 64 KiB
    whole, so 1 % of packets would be a handful per MiB; gso_max_segs 1 makes the loss
    hit single segments (about 1 % of MSS-sized packets) while it is on."""
    before = {}
    for ns, dev in _veths(lab):
        info = json.loads(lab.ip(ns, "-d", "-j", "link", "show", "dev", dev).stdout)[0]
        before[(ns, dev)] = str(info.get("gso_max_segs", 65535))

    def set_loss(percent):
        for ns, dev in _veths(lab):
            lab.ip(ns, "link", "set", "dev", dev, "gso_max_segs", "1" if percent else before[(ns, dev)])
        lab.set_loss(lab.client, percent)
        lab.set_loss(lab.origin, percent)
    yield set_loss
    set_loss(0)


@pytest.fixture
def relay(lab):
    procs = []

    def start(port, flip_up=None, flip_down=None, stall_down=None):
        args = [("-" if v is None else str(v)) for v in (flip_up, flip_down, stall_down)]
        p = lab.popen(lab.proxy, sys.executable, "-c", RELAY, PROXY_CLIENT_ADDR, str(port), ORIGIN_ADDR,
                      str(SERVER_PORT), *args, stdout=subprocess.PIPE)
        procs.append(p)
        assert p.stdout.readline().strip() == b"ready"
        return f"{PROXY_CLIENT_ADDR}:{port}"

    yield start
    for p in procs:
        p.kill()
        p.wait()


LAB_SIZES = [(0, 0), (1, 0), (0, 1), (1, 1), (65535, 0), (0, 65535), (65535, 65535),
             (MiB, 0), (0, MiB), (MiB, MiB)]


@pytest.mark.root
@pytest.mark.parametrize("percent", [0, 1])
@pytest.mark.parametrize("mode", T.MODES)
def test_lab_direct(lab, server, loss, mode, percent):
    loss(percent)
    s = T.run_client(server.target, sizes=LAB_SIZES, mode=mode, concurrency=5, timeout=20, netns=lab.client)
    assert s["ok"], [c for c in s["connections"] if not c["ok"]]
    assert server.check(s) == []
    for c in s["connections"]:
        assert c["local"].startswith(CLIENT_ADDR + ":")
        if mode != "reset":
            assert c["download_sha256"] == T.pattern_sha256(T.download_seed(c["seed"]), 0, c["download"])


@pytest.mark.root
@pytest.mark.parametrize("percent", [0, 1])
def test_lab_concurrent_random(lab, server, loss, percent):
    loss(percent)
    drops = lab.loss_drops(lab.client) + lab.loss_drops(lab.origin)
    s = T.run_client(server.target, mode="mixed", random_sizes=2 * MiB, count=50, concurrency=50, seed=42,
                     timeout=20, netns=lab.client)
    assert s["ok"], [c for c in s["connections"] if not c["ok"]][:3]
    assert s["concurrency"] == 50 and s["count"] == 50
    assert server.check(s) == []
    if percent:
        assert lab.loss_drops(lab.client) + lab.loss_drops(lab.origin) - drops > 20   # about 100 expected


@pytest.mark.root
def test_lab_250_concurrent(lab, server):
    s = T.run_client(server.target, mode="mixed", random_sizes=64 * 1024, count=250, concurrency=250, seed=7,
                     timeout=20, netns=lab.client)
    assert s["ok"], [c for c in s["connections"] if not c["ok"]][:3]
    assert server.check(s) == []


@pytest.mark.root
def test_lab_corrupting_relay_reported_at_exact_offset(lab, server, relay):
    target = relay(5301, flip_up=54321, flip_down=123457)
    cmd = lab.cmd(lab.client, sys.executable, "-m", "netns_lab.traffic", "client", "--connect", target,
                  "--upload", "256k", "--download", "256k", "--seed", "99", "--tag-base", "4242",
                  "--timeout", "10", "--json")
    p = subprocess.run(cmd, capture_output=True, timeout=60, cwd=T._REPO,
                       env={**os.environ, "PYTHONPATH": str(T._REPO)})
    assert p.returncode == 1, p.stderr
    s = json.loads(p.stdout)
    c = s["connections"][0]
    assert not s["ok"] and not c["ok"]
    assert c["first_bad_offset"] == 123457 and c["received"] == 256 * 1024 and c["error"] is None
    r = {r["tag"]: r for r in server.wait_reports([4242])}[4242]
    assert not r["ok"] and r["first_bad_offset"] == 54321 and r["upload_received"] == 256 * 1024
    assert any("first_bad=54321" in p for p in T.cross_check(s, [r]))
    # the same relay without flips passes
    clean = relay(5302)
    s = T.run_client(clean, upload=300000, download=300000, mode="server-first", timeout=10, netns=lab.client)
    assert s["ok"] and server.check(s) == []


@pytest.mark.root
def test_lab_stalled_transfer_reports_first_missing_offset(lab, server, relay):
    target = relay(5303, stall_down=100000)
    t0 = time.monotonic()
    s = T.run_client(target, download=MiB, timeout=2, netns=lab.client)
    c = s["connections"][0]
    assert time.monotonic() - t0 < 15
    assert not c["ok"] and c["error"].startswith("timeout")
    assert c["received"] == 100000 and c["first_missing_offset"] == 100000 and c["first_bad_offset"] is None


@pytest.mark.root
@pytest.mark.slow
def test_lab_256mib_download(lab, server):
    s = T.run_client(server.target, download=256 * MiB, timeout=30, netns=lab.client)
    assert s["ok"], s
    assert server.check(s) == []
    print(f"256 MiB download through the lab: {s['elapsed']:.3f} s, {s['gbit_s']} Gbit/s")
