"""The cache benchmark (netns_lab/bench_cache.py): peers, the summary, and a smoke run of
the whole thing in its own lab (prefix bct, removed on exit) with tiny sizes.

wrk, curl, nginx, varnishd and squid must be installed (`make setup`); without them
the smoke test fails and says so.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netns_lab import bench_cache as C

REPO = Path(__file__).resolve().parent.parent


def test_peers_are_command_lines():
    assert set(C.DEFAULT_PEERS.split(",")) <= set(C.PEERS)
    argv = C.PEERS["nfsplice"].argv
    assert list(argv[1:4]) == ["-m", "nfsplice", "http"] and "--cache-dir" in argv
    assert "--cache-dir" not in C.PEERS["nfsplice-nocache"].argv
    assert argv[argv.index("--access-log") + 1] == "off"
    for name in ("nginx", "varnish", "squid"):
        template = C.PEERS[name].config[0]
        assert (REPO / "netns_lab" / "peers" / template).is_file()


def _synthetic() -> tuple[list[dict], dict]:
    meta = {"sizes": ["1KiB"], "hit_peers": ["nfsplice", "nginx"], "collapse_peers": ["nfsplice", "varnish"],
            "big_bytes": 1 << 20}
    w = lambda rs: {"req_s": rs, "bytes_per_s": rs * 1100, "cpu_ms_per_req": 1000 / rs, "p50_ms": 1.0,
                    "p99_ms": 2.0, "error_count": 0}
    runs = []
    for rnd, (a, b) in enumerate([(100, 1000), (300, 900), (200, 1100)], 1):
        runs.append({"part": "hits", "peer": "nfsplice", "round": rnd, "kind": "wrk", "label": "1KiB", "ok": True,
                     "wrk": w(a), "origin_requests": 0})
        runs.append({"part": "hits", "peer": "nginx", "round": rnd, "kind": "wrk", "label": "1KiB", "ok": True,
                     "wrk": w(b), "origin_requests": 0})
        runs.append({"part": "fill", "peer": "nfsplice", "round": rnd, "ok": True, "stored": True,
                     "curl": {"gbps": 9.0 + rnd, "cpu_s_per_gib": 1.0}, "committed_after_s": 0.1 * rnd,
                     "process_cpu_s_per_gib": 2.0 + rnd})
        runs.append({"part": "fill", "peer": "nfsplice-nocache", "round": rnd, "ok": True,
                     "curl": {"gbps": 10.0 + rnd, "cpu_s_per_gib": 0.8}})
        for peer, copies in (("nfsplice", 1.0), ("varnish", 1.0)):
            runs.append({"part": "collapse", "peer": peer, "round": rnd, "ok": True, "clients": 3, "verified": 3,
                         "last_done_s": 0.5 * rnd, "origin_requests": 1, "origin_copies": copies,
                         "origin_bytes": 1 << 20})
    runs.append({"part": "hits", "peer": "squid", "round": 1, "kind": "peer", "ok": False, "error": "no squid"})
    return runs, meta


def test_summary_medians_and_targets():
    runs, meta = _synthetic()
    s = C.summarize(runs, meta)
    assert s["hits"]["1KiB"]["nfsplice"]["req_s"] == 200 and s["hits"]["1KiB"]["nginx"]["req_s"] == 1000
    assert s["fill"]["nfsplice"]["gbps"] == 11.0 and s["fill"]["nfsplice"]["stored"] == 3
    assert s["fill"]["nfsplice"]["committed_after_s"] == pytest.approx(0.2)
    assert s["fill"]["nfsplice"]["process_cpu_s_per_gib"] == 4.0
    assert s["fill"]["nfsplice-nocache"]["committed_after_s"] is None
    assert s["fill_ratio"]["gbps"] == pytest.approx(11 / 12) and s["fill_ratio"]["target_met"]
    c = s["collapse"]["nfsplice"]
    assert c["last_done_s"] == 1.0 and c["verified"] == 9 and c["clients"] == 9 and c["one_copy"]
    assert c["complete_runs"] == 3
    assert s["failures"] == ["hits squid round 1: no squid"]


# -- in the lab (root) ------------------------------------------------------------------
@pytest.mark.root
def test_smoke_run_all_parts(tmp_path):
    missing = [t for t in ("wrk", "curl", "nginx", "varnishd", "squid") if shutil.which(t) is None]
    assert not missing, f"not installed: {', '.join(missing)} (make setup installs them)"
    out = tmp_path / "out"
    clients = 3
    argv = [sys.executable, "-m", "netns_lab.bench_cache", "--sizes", "1KiB", "--duration", "1", "--rounds", "1",
            "--connections", "4", "--big", "4MiB", "--clients", str(clients), "--out", str(out), "--prefix", "bct",
            "--quiet-timeout", "0"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, timeout=120)
    log = p.stderr.decode(errors="replace")[-4000:]
    assert p.returncode == 0, log
    assert time.monotonic() - t0 < 60, f"the smoke run took {time.monotonic() - t0:.0f} s\n{log}"
    result = json.loads((out / "results.json").read_text())
    s = result["summary"]
    assert not s["failures"], f"{s['failures']}\n{log}"
    for peer in C.DEFAULT_PEERS.split(","):
        h = s["hits"]["1KiB"][peer]
        assert h["ok_runs"] == 1 and h["req_s"] > 0 and h["cpu_ms_per_req"] > 0, f"{peer}: {h}\n{log}"
        assert h["errors"] == 0 and h["origin_requests"] == 0, f"{peer} hits went to the origin: {h}\n{log}"
        c = s["collapse"][peer]
        assert c["ok_runs"] == 1 and c["verified"] == clients == c["clients"], f"{peer}: {c}\n{log}"
        assert c["origin_requests"] >= 1 and 0 < c["last_done_s"] < 30, f"{peer}: {c}\n{log}"
    assert s["collapse"]["nfsplice"]["one_copy"], f"{s['collapse']['nfsplice']}\n{log}"
    for peer in ("nfsplice", "nfsplice-nocache"):
        f = s["fill"][peer]
        assert f["ok_runs"] == 1 and f["gbps"] > 0 and f["cpu_s_per_gib"] > 0, f"{peer}: {f}\n{log}"
    assert s["fill"]["nfsplice"]["stored"] == 1, f"the fill was not stored: {s['fill']}\n{log}"
    assert s["fill"]["nfsplice"]["committed_after_s"] is not None
    assert s["fill_ratio"]["gbps"] > 0
    assert (out / "bench.png").stat().st_size > 10_000
    md = (out / "results.md").read_text()
    assert "## Hits" in md and "## Fill" in md and "## Collapsed forwarding" in md
