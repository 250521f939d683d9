"""The HTTP benchmark (netns_lab/bench_http.py): wrk's output, the summary, the report,
and a smoke run of the whole thing in its own lab (prefix bht, removed on exit).

wrk, curl, haproxy and nginx must be installed (`make setup`); without them the smoke
test fails and says so.
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

from netns_lab import bench_http as B

REPO = Path(__file__).resolve().parent.parent

WRK_TEXT = """\
Running 5s test @ http://198.18.1.1:8080/f-1MiB.bin
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.58s   384.82ms   1.87s    85.71%
    Req/Sec    12.97     10.95    40.00     73.33%
  Latency Distribution
     50%    1.65s
     75%    1.87s
     90%    1.87s
     99%  870.00us
  50 requests in 5.00s, 61.26MB read
  Socket errors: connect 1, read 2, write 3, timeout 43
  Non-2xx or 3xx responses: 7
Requests/sec:     10.00
Transfer/sec:     12.25MB
"""


# -- without root -----------------------------------------------------------------------
def test_parse_wrk_text():
    r = B.parse_wrk(WRK_TEXT)
    assert r["source"] == "text" and r["requests"] == 50 and r["duration_s"] == 5.0
    assert r["bytes"] == int(61.26 * 2**20) and r["req_s"] == 10.0 and r["bytes_per_s"] == 12.25 * 2**20
    assert r["p50_ms"] == 1650.0 and r["p90_ms"] == 1870.0 and r["p99_ms"] == pytest.approx(0.87)
    assert r["mean_ms"] == 1580.0 and r["max_ms"] == 1870.0
    assert r["errors"] == {"connect": 1, "read": 2, "write": 3, "timeout": 43, "non2xx": 7}


def test_parse_wrk_prefers_the_lua_line():
    line = ('WRK_JSON {"duration_us":2000000,"requests":1000,"bytes":1234567,"connect":0,"read":4,"write":0,'
            '"status":0,"timeout":0,"p50_us":1500.0,"p90_us":2000.0,"p99_us":3000.0,"mean_us":1600.0,"max_us":9000.0}')
    r = B.parse_wrk(WRK_TEXT + line + "\n")
    assert r["source"] == "lua" and r["requests"] == 1000 and r["bytes"] == 1234567
    assert r["req_s"] == 500.0 and r["p50_ms"] == 1.5 and r["p99_ms"] == 3.0
    assert r["errors"] == {"connect": 0, "read": 4, "write": 0, "timeout": 0, "non2xx": 0}


def test_parse_wrk_without_summary_fails():
    with pytest.raises(ValueError):
        B.parse_wrk("unable to connect to 198.18.1.1:8080 Connection refused\n")


def test_sizes_and_labels():
    assert B.parse_sizes("1KiB,64KiB,1MiB,1KiB") == [1024, 65536, 1 << 20]
    assert [B.size_label(n) for n in (1024, 65536, 1 << 20, 1 << 30, 1000)] == \
        ["1KiB", "64KiB", "1MiB", "1GiB", "1000B"]


def test_peers_are_command_lines():
    assert B.PEERS["origin"].argv is None and B.PEERS["origin"].target == B.ORIGIN
    for name in ("nfsplice", "nfsplice-copy"):
        argv = B.PEERS[name].argv
        assert list(argv[1:4]) == ["-m", "nfsplice", "http"] and B.PEERS[name].uses_ready_file
        assert argv[argv.index("--access-log") + 1] == "off"
    assert "--no-splice" in B.PEERS["nfsplice-copy"].argv and "--no-splice" not in B.PEERS["nfsplice"].argv
    assert B.PEERS["haproxy"].target == B.LISTEN == ("198.18.1.1", 8080)


def _wrk(req_s: float, cpu_s: float = 1.0, read: int = 0) -> dict:
    return {"requests": int(req_s), "bytes": int(req_s) * 1100, "req_s": req_s, "bytes_per_s": req_s * 1100,
            "p50_ms": 1.0, "p99_ms": 2.0, "cpus_busy": 1.0, "cpu_ms_per_req": cpu_s * 1e3 / req_s,
            "bytes_per_cpu_s": req_s * 1100 / cpu_s, "bytes_per_response": 1100.0,
            "errors": {"connect": 0, "read": read, "write": 0, "timeout": 0, "non2xx": 0}}


def _synthetic_runs() -> list[dict]:
    runs = []
    for rnd, (a, b) in enumerate([(100, 50), (300, 70), (200, 60)], 1):
        runs.append({"peer": "origin", "round": rnd, "kind": "wrk", "size": 1024, "label": "1KiB", "ok": True,
                     "wrk": _wrk(a), "background_cpus": 0.1})
        runs.append({"peer": "nfsplice", "round": rnd, "kind": "wrk", "size": 1024, "label": "1KiB", "ok": True,
                     "wrk": _wrk(b, read=1), "background_cpus": 0.1})
        runs.append({"peer": "origin", "round": rnd, "kind": "big", "size": 1 << 20, "label": "1MiB", "ok": True,
                     "curl": {"gbps": 10.0 * rnd, "cpu_s_per_gib": 1.0}})
    runs.append({"peer": "nfsplice", "round": 3, "kind": "big", "size": 1 << 20, "label": "1MiB", "ok": False,
                 "error": "curl exited 18"})
    runs.append({"peer": "haproxy", "round": 1, "kind": "peer", "ok": False, "error": "exited with 1: bad config"})
    return runs


def test_summary_medians_and_errors():
    peers = [B.PEERS["origin"], B.PEERS["nfsplice"], B.PEERS["haproxy"]]
    s = B.summarize(_synthetic_runs(), peers, [1024])
    o, n, h = (s["sizes"]["1KiB"][p] for p in ("origin", "nfsplice", "haproxy"))
    assert o["req_s"] == 200 and o["req_s_min"] == 100 and o["req_s_max"] == 300 and o["errors"] == 0
    assert n["req_s"] == 60 and n["errors"] == 3 and n["error_detail"]["read"] == 3 and n["ok_runs"] == 3
    assert h["ok_runs"] == 0 and h["runs"] == 1 and h["req_s"] is None
    assert s["big"]["origin"]["gbps"] == 20.0 and s["big"]["nfsplice"]["ok_runs"] == 0
    assert s["peers"]["haproxy"]["failures"] == ["round 1: exited with 1: bad config"]
    assert s["peers"]["nfsplice"]["failures"] == ["round 3 1MiB: curl exited 18"]


def test_report_from_synthetic_results(tmp_path):
    peers = [B.PEERS["origin"], B.PEERS["nfsplice"], B.PEERS["haproxy"]]
    runs = _synthetic_runs()
    result = {"meta": {"command": "python -m netns_lab.bench_http", "date": "today", "sizes": ["1KiB"],
                       "duration_s": 5, "connections": 50, "threads": 2, "big_bytes": 1 << 20, "rounds": 3,
                       "listen": "198.18.1.1:8080", "origin": "198.18.2.2:8000"},
              "machine": {"kernel": "6.18", "nproc": 2, "cpu_model": "x", "wrk": "wrk 4.1.0", "curl": "curl 7",
                          "haproxy": "HAProxy 2.6", "nginx": "nginx/1.22", "python": "3.11"},
              "runs": runs, "summary": B.summarize(runs, peers, [1024]), "interrupted": False}
    B.write_results(result, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "## 1KiB responses" in md and "| haproxy | failed |" in md and "TCP_REPAIR" in md
    assert "| nfsplice | 60 |" in md and "(read 3)" in md
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["big"]["origin"]["gbps"] == 20.0


# -- in the lab (root) ------------------------------------------------------------------
@pytest.mark.root
def test_smoke_run_all_peers(tmp_path):
    missing = [t for t in ("wrk", "curl", "haproxy", "nginx") if shutil.which(t) is None]
    assert not missing, f"not installed: {', '.join(missing)} (make setup installs them)"
    out = tmp_path / "out"
    # A smoke run of the harness with few connections: how nfsplice scales with many
    # concurrent spliced responses is what the full benchmark measures, not this test.
    argv = [sys.executable, "-m", "netns_lab.bench_http", "--sizes", "1KiB,1MiB", "--duration", "2", "--rounds", "1",
            "--connections", "4",
            "--big", "32MiB", "--peers", B.DEFAULT_PEERS, "--out", str(out), "--prefix", "bht",
            "--quiet-timeout", "0"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, timeout=120)
    log = p.stderr.decode(errors="replace")[-4000:]
    assert p.returncode == 0, log
    assert time.monotonic() - t0 < 60, f"the smoke run took {time.monotonic() - t0:.0f} s\n{log}"
    result = json.loads((out / "results.json").read_text())
    summary = result["summary"]
    peers = B.DEFAULT_PEERS.split(",")
    assert list(summary["sizes"]) == ["1KiB", "1MiB"]
    for label, per in summary["sizes"].items():
        for peer in peers:
            r = per[peer]
            assert r["ok_runs"] == 1 and r["req_s"] and r["req_s"] > 0, \
                f"{peer} {label}: {r} {summary['peers'][peer]}\n{log}"
            assert r["errors"] == 0, f"{peer} {label}: errors {r['error_detail']}\n{log}"
    for peer in peers:
        assert summary["big"][peer]["gbps"] and summary["big"][peer]["gbps"] > 0, f"{peer}: {summary['peers'][peer]}"
    assert (out / "bench.png").stat().st_size > 10_000
    assert "## 1MiB responses" in (out / "results.md").read_text()
