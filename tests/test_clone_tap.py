"""The clone tap's consumer (runner.CloneFeeder) without a kernel: frames as the
program's clones reach the socket (Ethernet + the packet as it arrived), in any order,
repeated, lost or cut short, fed into real cache fills.  What must hold: a stored body
is exactly what was forwarded; a body with a lost clone is not stored; a sink closes
only after the clones queued before its close; a key's earlier and later owners get
their own bytes.  No root, no network (the lab tests run the real device)."""
from __future__ import annotations

import collections
import os
import socket
import types

import pytest

from nfsplice import fastpath, packet, seq
from nfsplice.cache import layer, policy
from nfsplice.cache.store import COMMITTED
from nfsplice.engine import C2S, S2C, Endpoint, Pair
from nfsplice.runner import CloneFeeder

ETH = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
CLIENT, LISTEN = socket.inet_aton("198.18.1.2"), socket.inet_aton("198.18.1.1")
SOURCE, ORIGIN = socket.inet_aton("198.18.2.1"), socket.inet_aton("198.18.2.2")
T0 = 1_700_000_000
SEG = 60000


class FakeSocket:
    """What CloneFeeder reads: frames in order; a full one drops what comes."""

    def __init__(self):
        self.frames: collections.deque = collections.deque()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if not self.frames:
            raise BlockingIOError
        return self.frames.popleft()[:bufsize]


class FakeClones:
    """fastpath.TapClones' interface over FakeSocket; LOSE_MARKERS: every marker is lost."""

    def __init__(self, lose_markers: bool = False):
        self.sock = FakeSocket()
        self.lose_markers = lose_markers

    def mark(self, token: int) -> None:
        if not self.lose_markers:
            self.sock.frames.append(fastpath._TAP_MARKER.pack(b"\0" * 6, b"\2" * 6, fastpath.TAP_MARKER_TYPE,
                                                              fastpath._MARKER_MAGIC, token).ljust(60, b"\0"))

    marker = staticmethod(fastpath.TapClones.marker)

    def queued(self) -> int:
        return len(self.sock.frames)

    def drops(self) -> int:
        return 0


@pytest.fixture
def cache(tmp_path):
    c = layer.Cache(str(tmp_path / "cache"), 1 << 26, fsync=False)
    yield c
    c.close()


def new_pair(base_seq: int) -> Pair:
    pair = Pair(Endpoint(CLIENT, 40000), Endpoint(LISTEN, 8080), Endpoint(SOURCE, 50000), Endpoint(ORIGIN, 80))
    pair.tap_base[S2C] = (base_seq, 0)
    return pair


def clone(first_seq: int, payload: bytes) -> bytes:
    """The frame the socket gets for the origin's segment at FIRST_SEQ (as it arrived)."""
    return ETH + bytes(packet.build(ORIGIN, SOURCE, 80, 50000, first_seq, 1, packet.ACK, payload=payload))


def segments(base_seq: int, body: bytes, size: int = SEG) -> list[bytes]:
    return [clone(seq.add(base_seq, o), body[o:o + size]) for o in range(0, len(body), size)]


def begin(cache, name: str, length: int | None):
    stored = policy.StoredResponse(200, "OK", (("Date", policy.format_http_date(T0)),), T0, T0)
    return cache.begin(f"http://x/{name}", stored, length)


def body_of(cache, name: str) -> bytes | None:
    e = cache.store.lookup(f"http://x/{name}")
    if e is None:
        return None
    with e:
        return os.pread(e.fd, e.size + 1, 0)


def feeder_for(clones) -> tuple[CloneFeeder, types.SimpleNamespace]:
    engine = types.SimpleNamespace(counters=collections.Counter(), flows={})
    return CloneFeeder(clones, engine), engine


def splice(feeder: CloneFeeder, engine, pair: Pair, sink) -> None:
    """As the runner and the engine do it: the sink set, wrapped, the flows owned."""
    pair.tap[S2C] = sink
    feeder.wrap(pair)
    for d, key in enumerate(pair.in_keys()):
        engine.flows[key] = (pair, d)


def forget(engine, pair: Pair, length: int | None) -> None:
    """The engine forgets PAIR: its flows first, then its sink's close."""
    for key in pair.in_keys():
        if engine.flows.get(key, (None,))[0] is pair:
            del engine.flows[key]
    pair.tap[S2C].close(length)


def test_reordered_repeated_clones_stored_exact_and_closed_after_them(cache):
    clones = FakeClones()
    feeder, engine = feeder_for(clones)
    body = os.urandom(40 * SEG + 123)
    base = 0xFFFF0000                       # the stream wraps around 2^32
    pair = new_pair(base)
    fill = begin(cache, "a", None)          # no Content-Length: the close decides
    splice(feeder, engine, pair, fill)
    frames = segments(base, body)
    frames = frames[5:] + frames[:5] + frames[10:14]          # late and repeated
    clones.sock.frames.extend(frames)
    forget(engine, pair, len(body))         # the end seen while its clones wait
    assert not fill.settle(0.3), "closed before its clones were fed"
    feeder._drain()
    assert fill.settle(5) and fill.state == COMMITTED
    assert body_of(cache, "a") == body
    assert not feeder.pending and not feeder.closing


@pytest.mark.parametrize("lose", ["clone", "cut_short"])
def test_a_lost_or_cut_clone_leaves_the_object_unstored(cache, lose):
    clones = FakeClones()
    feeder, engine = feeder_for(clones)
    body = os.urandom(20 * SEG)
    for name, length in (("known", len(body)), ("unknown", None)):
        pair = new_pair(1000)
        fill = begin(cache, name, length)
        splice(feeder, engine, pair, fill)
        frames = segments(1000, body)
        if lose == "clone":
            del frames[7]
        else:
            frames[7] = frames[7][:len(frames[7]) - 100]
        clones.sock.frames.extend(frames)
        forget(engine, pair, len(body))
        feeder._drain()
        assert fill.settle(5) and fill.state != COMMITTED
        assert body_of(cache, name) is None
    if lose == "cut_short":
        assert engine.counters["fastpath.tap_clone_truncated"] == 2


def test_lost_marker_closes_once_the_socket_is_empty(cache):
    clones = FakeClones(lose_markers=True)
    feeder, engine = feeder_for(clones)
    body = os.urandom(10 * SEG)
    pair = new_pair(5)
    fill = begin(cache, "m", len(body) + 1)      # one byte more than sent: never complete
    splice(feeder, engine, pair, fill)
    clones.sock.frames.extend(segments(5, body))
    forget(engine, pair, None)
    feeder._drain()
    assert fill.settle(5) and fill.state != COMMITTED
    assert not feeder.pending


def test_one_key_two_messages_each_gets_its_own_bytes(cache):
    """A resumed connection: the first message's pair is forgotten (its close waits for
    its clones), the next one is spliced on the same key; their clones interleave."""
    clones = FakeClones()
    feeder, engine = feeder_for(clones)
    first, second = os.urandom(9 * SEG + 7), os.urandom(11 * SEG + 3)
    base1 = 4000
    base2 = seq.add(base1, len(first) + 200)     # (a response head in between)
    p1 = new_pair(base1)
    f1 = begin(cache, "first", len(first))
    splice(feeder, engine, p1, f1)
    s1 = segments(base1, first)
    clones.sock.frames.extend(s1[:-3])
    forget(engine, p1, len(first))
    p2 = new_pair(base2)
    f2 = begin(cache, "second", len(second))
    splice(feeder, engine, p2, f2)
    s2 = segments(base2, second)
    # The first's last clones came after its close and between the second's.
    for a, b in zip(s1[-3:], s2[:3]):
        clones.sock.frames.extend([b, a])
    clones.sock.frames.extend(s2[3:])
    feeder._drain()
    assert f1.settle(5) and f2.settle(5)
    assert body_of(cache, "first") is None        # its tail came after its close: a hole
    assert body_of(cache, "second") == second
    assert engine.counters["fastpath.tap_orphan_records"] == 0

    # Again, with the first's clones all before its close: both stored.
    p1, p2 = new_pair(base1), new_pair(base2)
    f1, f2 = begin(cache, "first2", len(first)), begin(cache, "second2", len(second))
    splice(feeder, engine, p1, f1)
    clones.sock.frames.extend(s1[:-2])
    forget(engine, p1, len(first))
    splice(feeder, engine, p2, f2)
    clones.sock.frames.extend(s2[:4] + s1[-2:] + s2[4:])   # first's tail: behind its marker
    feeder._drain()
    assert f1.settle(5) and f2.settle(5)
    assert body_of(cache, "second2") == second
    # (first2's last two clones came after its marker: not stored, never wrong)
    assert body_of(cache, "first2") in (None, first)


def test_a_key_whose_end_was_never_seen_is_cut_by_its_next_owner(cache):
    clones = FakeClones()
    feeder, engine = feeder_for(clones)
    old, new = os.urandom(5 * SEG), os.urandom(5 * SEG)
    p1, p2 = new_pair(0), new_pair(7 << 20)
    f1, f2 = begin(cache, "old", None), begin(cache, "new", len(new))
    splice(feeder, engine, p1, f1)
    clones.sock.frames.extend(segments(0, old))
    forget(engine, p1, None)                  # no end seen
    splice(feeder, engine, p2, f2)            # same key: p1's clones cannot be told apart
    clones.sock.frames.extend(segments(7 << 20, new))
    feeder._drain()
    assert f1.settle(5) and f1.state != COMMITTED
    assert engine.counters["fastpath.tap_clone_unattributed"] == 5
    # Behind p1's marker the key is p2's alone again.
    assert f2.settle(5) and body_of(cache, "new") == new


def test_foreign_frames_are_counted_and_ignored(cache):
    clones = FakeClones()
    feeder, engine = feeder_for(clones)
    clones.sock.frames.extend([b"\xff" * 6 + b"\x02" * 6 + b"\x86\xdd" + b"\0" * 60,   # IPv6
                               b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + b"\0" * 28])  # ARP
    clones.sock.frames.append(clone(1, b"x" * 10))       # nobody's
    feeder._drain()
    assert engine.counters["fastpath.tap_clone_foreign"] == 2
    assert engine.counters["fastpath.tap_orphan_records"] == 1


def test_after_stop_a_close_is_immediate(cache):
    clones = FakeClones()
    feeder, engine = feeder_for(clones)
    feeder.live = False
    body = os.urandom(SEG)
    pair = new_pair(0)
    fill = begin(cache, "s", len(body))
    splice(feeder, engine, pair, fill)
    pair.tap[S2C].write(0, body)          # (the engine's own forwarding feeds it too)
    forget(engine, pair, len(body))
    assert fill.settle(5) and body_of(cache, "s") == body
    assert pair.tap[C2S] is None


# -- the real device and socket (root, in a namespace of its own) -----------------------------
KERNEL_CHECK = r"""
import json, os, shutil, socket, sys, tempfile
from nfsplice import fastpath
from nfsplice.cache import layer
from tests.test_clone_tap import begin, body_of, feeder_for, forget, new_pair, segments, splice

small = sys.argv[1] == "small"
tc = fastpath.TapClones("nfstffff")
if small:   # (the kernel's least: a few frames)
    tc.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
out.bind((tc.name, 0))
cache_dir = tempfile.mkdtemp(prefix="clone-tap-")
cache = layer.Cache(cache_dir, 1 << 26, fsync=False)
feeder, engine = feeder_for(tc)
body = os.urandom(300 * 1400)
pair = new_pair(77)
fill = begin(cache, "k", len(body))
splice(feeder, engine, pair, fill)
for frame in segments(77, body, 1400):      # what the program's clones look like
    out.send(frame)
queued = tc.queued()
forget(engine, pair, len(body))
assert not fill.settle(0.2)                 # its close waits for the marker
feeder._drain()
fill.settle(5)
devices = sorted(os.listdir("/sys/class/net"))
tc.close()
print(json.dumps({"stored": body_of(cache, "k") == body, "state": fill.state, "queued": queued,
                  "counters": dict(engine.counters), "devices": devices,
                  "after": sorted(os.listdir("/sys/class/net"))}))
shutil.rmtree(cache_dir, ignore_errors=True)
"""


@pytest.mark.root
@pytest.mark.parametrize("rcvbuf", ["default", "small"])
def test_kernel_socket_keeps_clones_and_counts_what_it_dropped(rcvbuf):
    """Frames sent out of a real clone device reach its socket behind each other and
    before the close's marker; with a socket too small for them the drops are counted
    and the object is not stored.  The device pair is gone after close()."""
    import json
    import subprocess
    import sys
    import uuid
    ns = f"ctap-{uuid.uuid4().hex[:6]}"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", KERNEL_CHECK, rcvbuf],
                           capture_output=True, text=True, cwd=repo, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert {"nfstffff", "nfstffffp"} <= set(got["devices"])
    assert not any(d.startswith(fastpath.TAP_DEV_PREFIX) for d in got["after"])
    counters = got["counters"]
    for what in ("tap_orphan_records", "tap_clone_truncated", "tap_clone_foreign"):   # (no IPv6, no ARP)
        assert not counters.get(f"fastpath.{what}"), got
    if rcvbuf == "default":
        assert got["stored"] and got["state"] == COMMITTED, got
        assert got["queued"] > 300 * 1400 and not counters.get("fastpath.tap_clone_drops"), got
    else:
        assert not got["stored"] and got["state"] != COMMITTED, got
        assert counters.get("fastpath.tap_clone_drops", 0) > 200, got
