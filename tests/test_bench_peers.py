"""The benchmark's peers and the benchmark itself (netns_lab/bench.py, netns_lab/peers/).

Root tests build their own labs (prefixes h2t and h2s) and remove them, also on failure.
haproxy, nginx and libnginx-mod-stream must be installed for the smoke test (`make bench`
installs them); without them it fails and says so.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from netns_lab import bench
from netns_lab.peers import bench_tools
from netns_lab.topology import Lab

REPO = Path(__file__).resolve().parent.parent
SIZE = 4 << 20


# -- without root -----------------------------------------------------------------------
def test_parse_size():
    assert bench.parse_size("1GiB") == 2**30
    assert bench.parse_size("8MiB") == 8 << 20
    assert bench.parse_size("1000") == 1000
    with pytest.raises(Exception):
        bench.parse_size("1 parsec")


def test_round_order_rotates_every_peer_to_the_front():
    peers = ["a", "b", "c"]
    firsts = [bench.round_order(peers, r)[0] for r in range(3)]
    assert sorted(firsts) == peers
    assert all(sorted(bench.round_order(peers, r)) == peers for r in range(5))


def test_percentile_nearest_rank():
    v = [float(i) for i in range(1, 101)]
    assert bench_tools.percentile(v, 50) == 50.0
    assert bench_tools.percentile(v, 99) == 99.0
    assert bench_tools.percentile([7.0], 99) == 7.0


def test_stream_sha256_matches_the_pattern_repeated():
    import hashlib
    n = bench_tools.PATTERN_LEN + 12345
    p = bench_tools.pattern()
    assert bench_tools.stream_sha256(n) == hashlib.sha256(p + p[:12345]).hexdigest()


def test_summary_adds_rtt_against_routing():
    def run(peer, gbps, p50):
        return {"peer": peer, "ok": True, "round": 1,
                "bulk": {"gbps": gbps, "cpu_s_per_gib": 1.0},
                "rtt": {"p50_us": p50, "p99_us": 2 * p50, "max_us": 3 * p50}}
    peers = [bench.PEERS["routing"], bench.PEERS["splice"]]
    runs = [run("routing", 10, 40), run("routing", 12, 42), run("splice", 9, 60), run("splice", 9, 70),
            {"peer": "splice", "ok": False, "round": 3, "error": "boom"}]
    s = bench.summarize(runs, peers)
    assert s["routing"]["gbps"] == 11 and s["routing"]["added_rtt_p50_us"] == 0
    assert s["splice"]["added_rtt_p50_us"] == 65 - 41
    assert s["splice"]["ok_runs"] == 2 and s["splice"]["errors"] == ["round 3: boom"]


def test_nfsplice_peers_are_just_command_lines():
    p = bench.PEERS["nfsplice-netlink"]
    assert p.uses_ready_file
    assert list(p.argv[1:5]) == ["-m", "nfsplice", "tcp", "--listen"]
    assert "netfilterqueue" in bench.PEERS["nfsplice-nfq"].argv


# -- in the lab (root) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with Lab("h2t") as lab, bench.Origin(lab, tmp_path_factory.mktemp("origin")):
        yield lab


def _client(lab: Lab, *args: str) -> dict:
    return bench.run_tool(lab, lab.client, list(args), timeout=60)


@pytest.mark.root
@pytest.mark.parametrize("name", ["splice", "asyncio"])
def test_python_peer_forwards_both_directions_byte_exact(lab, name, tmp_path):
    peer = bench.PEERS[name]
    target = bench._hostport(peer.target)
    running = bench.start_peer(lab, peer, tmp_path / name)
    try:
        expected = bench_tools.stream_sha256(SIZE)
        down = _client(lab, "bulk", "--connect", target, "--size", str(SIZE), "--sha256")
        assert down["bytes"] == SIZE and down["sha256"] == expected

        up = _client(lab, "upload", "--connect", target, "--size", str(SIZE))
        assert up["origin_received"] == SIZE and up["origin_sha256"] == expected

        # Both directions at once on one connection, and three connections at once.
        results: list = []

        def duplex():
            try:
                results.append(_client(lab, "duplex", "--connect", target, "--size", str(SIZE)))
            except Exception as e:       # reported below
                results.append(e)
        threads = [threading.Thread(target=duplex) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert len(results) == 3
        for r in results:
            assert not isinstance(r, Exception), r
            assert r["echoed"] == SIZE and r["echo_sha256"] == expected
        running.check_alive()
    finally:
        running.stop()


@pytest.mark.root
def test_bench_smoke(tmp_path):
    missing = [tool for tool in ("haproxy", "nginx") if shutil.which(tool) is None]
    if not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists():
        missing.append("libnginx-mod-stream")
    assert not missing, f"not installed: {', '.join(missing)} (apt-get install haproxy nginx libnginx-mod-stream)"
    peers = ["routing", "splice", "asyncio", "haproxy", "nginx"]
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "netns_lab.bench", "--size", "8MiB", "--rounds", "1", "--rtt-count", "200",
           "--rtt-warmup", "50", "--quiet-timeout", "0", "--peers", ",".join(peers), "--prefix", "h2s", "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=90,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert list(result["summary"]) == peers
    for name in peers:
        s = result["summary"][name]
        assert s["ok_runs"] == 1, (name, s["errors"])
        assert 0.01 < s["gbps"] < 1000, (name, s)
        # 8 MiB lasts a few ms: the CPU ticks (1/100 s) may well read 0 here.
        assert math.isfinite(s["cpu_s_per_gib"]) and 0 <= s["cpu_s_per_gib"] < 1000, (name, s)
        assert 0 < s["rtt_p50_us"] <= s["rtt_p99_us"] <= s["rtt_max_us"] < 1e6, (name, s)
    assert result["summary"]["routing"]["added_rtt_p50_us"] == 0
    assert (out / "bench.png").stat().st_size > 10_000
    md = (out / "results.md").read_text()
    assert "uname -r" in md and "python -m netns_lab.bench --size 8MiB" in md
    assert not [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if ns.startswith("h2s-")], "the benchmark left its namespaces behind"
