"""The integrity matrix: real TCP stacks in three namespaces, nfsplice splicing between.

Every byte is checked against its pattern on both ends (a failure names the first wrong
offset), the tap must hold exactly what each side received, the payload must have gone
through the engine (rewritten packets) and not through the proxy's sockets, and after
each run no pair, socket or rule may be left behind.
"""
from __future__ import annotations

import hashlib
import time

import pytest

from netns_lab.topology import Lab
from netns_lab.traffic import ServerProcess, first_mismatch, run_client, upload_seed
from tests.splicer import LISTEN, Splicer, proxy_sockets, raw_rules, socket_counters

pytestmark = pytest.mark.root

SIZES = [0, 1, 1448, 65535, 1 << 20]
MATRIX = [(s, 0) for s in SIZES] + [(0, s) for s in SIZES] + [(s, s) for s in SIZES]
HEADER = 32   # the traffic tool's header precedes the upload stream (netns_lab/traffic.py)


@pytest.fixture(scope="module")
def lab():
    with Lab("spl") as lab:
        yield lab


@pytest.fixture
def loss(lab):
    """loss(percent): drop that share of TCP packets arriving in each namespace."""
    def set_loss(percent: int) -> None:
        lab.set_segmentation(bool(percent))
        for ns in (lab.client, lab.proxy, lab.origin):
            lab.set_loss(ns, percent)
    yield set_loss
    set_loss(0)


def _describe(c: dict) -> str:
    return (f"conn {c['index']} up={c['upload']} down={c['download']} mode={c['mode']}: "
            f"received {c['received']}/{c['expected_received']}, first bad offset {c['first_bad_offset']}, "
            f"first missing {c['first_missing_offset']}, error {c['error']}")


# A RST that loss takes is never retransmitted; when the other side has nothing more
# to send, nothing answers it either, and the pair is only forgotten by the engine's
# idle timeout (300 s by default).  The lab runs use a short one, so that "no pair left
# behind" is checked within the test and covers that path too.
IDLE = ("--idle-timeout", "8")


def verify(lab, sp: Splicer, srv: ServerProcess, result: dict, fast: bool) -> dict:
    bad = [_describe(c) for c in result["connections"] if not c["ok"]]
    assert not bad, "client saw wrong bytes:\n" + "\n".join(bad[:10]) + "\n" + sp.log_text()
    problems = srv.check(result)
    # A RST is never retransmitted: when loss takes it, an origin that expects more upload
    # waits (as it would without a proxy) and has no report yet.  Bytes it did receive
    # are still checked through the tap below.
    resets = {f"conn {c['index']} " for c in result["connections"] if c["mode"] == "reset"}
    problems = [p for p in problems if not (p.endswith("no server report") and p[:p.index("(")] in resets)]
    assert not problems, "server saw wrong bytes:\n" + "\n".join(problems[:10])
    st = sp.wait_idle(timeout=30)
    n = len(result["connections"])
    assert st["pairs.active"] == 0, f"pairs left in the engine: {st}"
    assert st.get("proxy.spliced", 0) == n, f"not every connection was spliced: {st}"
    assert not any(k.startswith("pairs.fallback") for k in st), st
    # The payload went through the engine, none through the proxy's sockets, and the
    # frozen sockets said nothing (the OUTPUT safety net never had to drop a packet).
    assert st.get("proxy.drained_bytes", 0) == 0, st
    assert st.get("dropped.proxy_socket", 0) == 0, socket_counters(st)
    uploaded = server_received(srv, result)
    up = sum(uploaded.values()) + HEADER * n
    down = sum(c["received"] for c in result["connections"])
    assert st.get("bytes.c2s", 0) >= up and st.get("bytes.s2c", 0) >= down, (up, down, st)
    if fast:
        # Without a tap, the steady state went through the tc-BPF fast path, and the
        # engine learnt what it forwarded (the byte counts above include it).
        moved = [c for c in result["connections"] if c["received"] > 65536]
        if moved:
            assert st.get("fastpath.fast_packets", 0) > 0 and st.get("fastpath.flows_written", 0) > 0, st
    else:
        assert "fastpath.fast_packets" not in st, st
    if sp.tap_dir:
        check_tap(sp, result, uploaded)
    return st


def server_received(srv: ServerProcess, result: dict) -> dict[int, int]:
    """Upload bytes the origin received, per client connection index (matched by tag)."""
    by_tag = {r.get("tag"): r for r in srv.reports()}
    out = {}
    for c in result["connections"]:
        r = by_tag.get(c["tag"])
        out[c["index"]] = r["upload_received"] if r else 0
    return out


def check_tap(sp: Splicer, result: dict, uploaded: dict[int, int]) -> None:
    # A pair's tap closes after it is forgotten: with the clone tap, once the clones
    # queued before the close were fed (runner.CloneFeeder), so its files may follow the
    # engine's idle state by a moment.
    wanted = {c["local"] for c in result["connections"]}
    deadline = time.monotonic() + 10
    while True:
        streams = sp.tap_streams()
        if all(set(streams.get(w, ())) == {"c2s", "s2c"} for w in wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for c in result["connections"]:
        tap = streams.get(c["local"])
        assert tap is not None and set(tap) == {"c2s", "s2c"}, f"no tap for {c['local']}: {sorted(streams)[:5]}"
        down = tap["s2c"]
        with open(down["data"], "rb") as f:
            data = f.read()
        # The tap holds exactly what the client received.
        got = hashlib.sha256(data[:c["received"]]).hexdigest()
        assert got == c["download_sha256"], f"tap s2c differs from what {c['local']} received"
        upl = tap["c2s"]
        with open(upl["data"], "rb") as f:
            data = f.read()
        # ... and what the origin received.
        n = uploaded[c["index"]]
        stream = data[HEADER:HEADER + n]
        assert len(stream) == n and first_mismatch(upload_seed(c["seed"]), 0, stream) is None, \
            f"tap c2s of {c['local']} wrong at {first_mismatch(upload_seed(c['seed']), 0, stream)}"
        if c["mode"] != "reset":
            assert down["complete"] and down["length"] == c["download"], down
            assert upl["complete"] and upl["length"] == HEADER + c["upload"], upl
        else:
            # No FIN: the tap must not call the stream complete.
            assert not down["complete"], down


def after_stop(lab, sp: Splicer) -> None:
    assert sp.stop() == 0, sp.log_text()
    assert "NFSPLICE" not in raw_rules(lab), raw_rules(lab)
    assert "nfsplice_fast" not in tc_filters(lab), tc_filters(lab)
    assert proxy_sockets(lab) == [], proxy_sockets(lab)
    assert "exit:" in sp.log_text()


# "queue": every packet through NFQUEUE and the engine, tap on;
# "fast": the steady state through the tc-BPF fast path, no tap;
# "fasttap": the fast path with the tap (the program copies payloads into its ring).
PATHS = {"queue": (("--fastpath", "off"), True), "fast": (("--fastpath", "on"), False),
         "fasttap": (("--fastpath", "on"), True)}


def tc_filters(lab) -> str:
    out = []
    for dev in (f"{lab.prefix}-p0", f"{lab.prefix}-p1"):
        r = lab.run(lab.proxy, "tc", "filter", "show", "dev", dev, "ingress", check=False)
        out.append(r.stdout.decode())
    return "".join(out)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("loss_percent", [0, 1])
@pytest.mark.parametrize("mode", ["client-first", "server-first", "reset"])
def test_matrix(lab, loss, mode, loss_percent, path):
    """Sizes 0..1 MiB; upload, download and both at once; each close mode; 0 and 1 % loss;
    through the queue and through the fast path."""
    loss(loss_percent)
    extra, tap = PATHS[path]
    with ServerProcess(lab, lab.origin, "198.18.2.2", 9001) as srv, \
            Splicer(lab, f"mx-{mode}-{loss_percent}-{path}", *IDLE, *extra, tap=tap) as sp:
        kw = {"reset_at": 30000} if mode == "reset" else {}
        result = run_client(LISTEN, sizes=MATRIX, mode=mode, concurrency=len(MATRIX),
                            netns=lab.client, timeout=60, seed=loss_percent * 100 + len(mode), **kw)
        st = verify(lab, sp, srv, result, fast=path != "queue")
        if loss_percent:
            assert sum(lab.loss_drops(ns) for ns in (lab.client, lab.proxy, lab.origin)) > 0
        if mode == "reset":
            assert st.get("rst_translated", 0) >= 1
        after_stop(lab, sp)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_200_concurrent_pairs_with_loss(lab, loss, path):
    loss(1)
    extra, tap = PATHS[path]
    with ServerProcess(lab, lab.origin, "198.18.2.2", 9001) as srv, \
            Splicer(lab, f"conc200-{path}", *IDLE, *extra, tap=tap) as sp:
        result = run_client(LISTEN, random_sizes=1 << 20, count=200, concurrency=200, mode="mixed",
                            netns=lab.client, timeout=90, seed=7)
        verify(lab, sp, srv, result, fast=path != "queue")
        after_stop(lab, sp)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["queue", "fasttap"])
@pytest.mark.parametrize("size,loss_percent", [(64 << 20, 1), (256 << 20, 0)])
def test_large_both_ways(lab, loss, size, loss_percent, path):
    loss(loss_percent)
    extra, tap = PATHS[path]
    with ServerProcess(lab, lab.origin, "198.18.2.2", 9001) as srv, \
            Splicer(lab, f"big-{size}-{path}", *IDLE, *extra, tap=tap) as sp:
        result = run_client(LISTEN, upload=size, download=size, mode="client-first",
                            netns=lab.client, timeout=120, seed=11)
        st = verify(lab, sp, srv, result, fast=path != "queue")
        # With the GSO flag the engine sees large packets: far fewer than one per MSS.
        if not loss_percent:
            assert st["packets.s2c"] < size // 1448 // 4, st
        after_stop(lab, sp)
