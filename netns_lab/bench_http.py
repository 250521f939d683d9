"""HTTP benchmark in the lab: wrk and curl through nfsplice http, haproxy and nginx.

    python -m netns_lab.bench_http [--sizes 1KiB,64KiB,1MiB,4MiB] [--duration 5] [--connections 50]
        [--threads 2] [--big 1GiB] [--rounds 3]
        [--peers origin,nfsplice,nfsplice-copy,haproxy,nginx]
        [--out netns_lab/results-http] [--prefix bh]

The origin is nginx (netns_lab.origins.NginxOrigin) in the origin namespace on
198.18.2.2:8000, serving one file per size plus the --big file.  Every peer but
`origin` listens on 198.18.1.1:8080 in the proxy namespace and forwards to it; for
`origin` wrk talks to the origin directly (the proxy namespace only routes): the
reference.  Peers are data (`PEERS`), started and stopped like those of
netns_lab.bench; one that does not start (or dies) is reported with the tail of its
stderr and the benchmark goes on with the others.

Per round (peer order rotated by one each round) and peer: start the peer; per size:
fetch the file once with curl and check its sha256 (also a warm-up), then
`wrk -t2 -c50 -d5s --latency URL` from the client namespace, with the machine's busy
CPU ticks (/proc/stat: all CPUs, every namespace: wrk, the peer, the origin, the
kernel) read right before wrk starts and right after it exits; then one --big
download with curl (`-o /dev/null -w '%{speed_download}'`), CPU measured the same
way; stop the peer.  From wrk: requests/s, bytes/s, latency p50/p99, errors (non-2xx
and socket errors: connect, read, write, timeout); wrk's own numbers come from a
`done()` Lua hook (exact counts), its text output is parsed as a fallback.  Derived:
CPU-ms per request and bytes per CPU-second (bytes as wrk counts them, heads
included).  Reported: medians over the rounds.  Written to --out: results.json (every
run, the summary, the machine), results.md, bench.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shlex
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from netns_lab import bench
from netns_lab.bench import (PeerFailed, RunFailed, Running, _fmt, _hostport, _median, machine_info,
                             parse_size, round_order, wait_quiet)
from netns_lab.origins import NGINX_PORT, NginxOrigin
from netns_lab.peers.bench_tools import CLK_TCK, cpu_busy_ticks
from netns_lab.topology import ORIGIN_ADDR, PROXY_CLIENT_ADDR, Lab

REPO = Path(__file__).resolve().parent.parent
PEER_DIR = Path(__file__).resolve().parent / "peers"
LISTEN = (PROXY_CLIENT_ADDR, 8080)
ORIGIN = (ORIGIN_ADDR, NGINX_PORT)
DEFAULT_PEERS = "origin,nfsplice,nfsplice-copy,haproxy,nginx"
DEFAULT_SIZES = "1KiB,64KiB,1MiB,4MiB"
STATS_DIR = Path("/run/nfsplice")          # where `nfsplice` writes its counters (nfsplice.runner)

CLOSE_NOTE = ("nfsplice keeps both connections after a spliced response by rebuilding its sockets "
              "(TCP_REPAIR); every response at or above the splice threshold (2 MiB by default, --splice-threshold) costs a "
              "hand-off and a rebuild, and a response the engine could not hand off ends with "
              "Connection: close. That cost is part of what is measured.")


# -- peers as data ----------------------------------------------------------------------
@dataclass(frozen=True)
class Peer(bench.Peer):
    """An HTTP forwarding path: bench.Peer's command line and config template, with this
    benchmark's addresses; argv also gets {instance}, and None means wrk straight to
    the origin."""

    @property
    def target(self) -> tuple[str, int]:
        return ORIGIN if self.argv is None else LISTEN

    @property
    def is_nfsplice(self) -> bool:
        return self.argv is not None and "nfsplice" in self.argv


def _nfsplice(name: str, *extra: str, note: str) -> Peer:
    return Peer(name, ("{python}", "-m", "nfsplice", "http", "--listen", "{listen}", "--upstream", "http://{upstream}",
                       *extra, "--instance", "{instance}", "--ready-file", "{ready_file}", "--access-log", "off"),
                note=note)


PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("origin", None, note="wrk/curl straight to the origin nginx (the proxy namespace only routes): the reference"),
    _nfsplice("nfsplice", note="nfsplice http, response bodies at or above the splice threshold spliced; "
                               "keep-alive kept across them (sockets rebuilt with TCP_REPAIR); tc-BPF fast path"),
    _nfsplice("nfsplice-queue", "--fastpath", "off",
              note="nfsplice http without the fast path: every packet of a spliced pair through the "
                   "queue, and every packet of the proxy's connections queued (as before the fast path)"),
    _nfsplice("nfsplice-copy", "--no-splice", note="nfsplice http --no-splice: the same proxy copying every byte, "
                                                   "keep-alive on both sides"),
    Peer("haproxy", ("haproxy", "-db", "-f", "{dir}/haproxy.cfg"),
         config=("haproxy_http.cfg.tmpl", "haproxy.cfg", {"nbthread": "2"}),
         note="mode http, keep-alive both sides, http-reuse always, nbthread 2"),
    Peer("nginx", ("nginx", "-p", "{dir}", "-c", "{dir}/nginx.conf", "-e", "stderr"),
         config=("nginx_http.conf.tmpl", "nginx.conf", {"workers": "auto"}),
         note="proxy_pass to an upstream with keepalive 32, HTTP/1.1, Connection \"\", proxy_buffering on "
              "(default buffers), worker_processes auto"),
)}


def instance_name(prefix: str, peer: Peer) -> str:
    return f"{prefix}-{peer.name}"


def start_peer(lab: Lab, peer: Peer, workdir: Path, prefix: str, timeout: float = 15.0) -> Running | None:
    if peer.argv is None:
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    ready_file = workdir / "ready" if peer.uses_ready_file else None
    if ready_file is not None:
        ready_file.unlink(missing_ok=True)
    values = {"python": sys.executable, "listen": _hostport(LISTEN), "upstream": _hostport(ORIGIN),
              "ready_file": str(ready_file or ""), "dir": str(workdir), "instance": instance_name(prefix, peer)}
    if peer.config is not None:
        template, fname, extra = peer.config
        text = string.Template((PEER_DIR / template).read_text()).substitute({**values, **extra})
        (workdir / fname).write_text(text)
    argv = [a.format(**values) for a in peer.argv]
    run = Running(lab, lab.proxy, peer.name, argv, workdir, ready_file, LISTEN)
    try:
        run.start(timeout)
    except BaseException:
        run.stop()
        raise
    return run


def port_sockets(lab: Lab, port: int) -> dict[str, int]:
    """Sockets on local PORT in the proxy namespace, by state, TIME-WAIT left out."""
    try:
        p = lab.run(lab.proxy, "ss", "-Htan", f"sport = :{port}", check=False, timeout=10)
    except subprocess.TimeoutExpired:
        return {"ss-timeout": 1}
    states: dict[str, int] = {}
    for line in p.stdout.decode(errors="replace").splitlines():
        st = line.split()[0] if line.strip() else ""
        if st and st != "TIME-WAIT":
            states[st] = states.get(st, 0) + 1
    return states


def wait_port_free(lab: Lab, port: int, timeout: float = 10.0) -> tuple[float, dict[str, int]]:
    """After a peer stopped: wait until no socket but TIME-WAIT holds PORT (the next peer
    binds it); return the seconds waited and what was there at first."""
    t0 = time.monotonic()
    first = port_sockets(lab, port)
    states = first
    while states and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
        states = port_sockets(lab, port)
    return time.monotonic() - t0, first


def nfsplice_counters(prefix: str, peer: Peer) -> dict | None:
    """The counters nfsplice last wrote for this peer's instance (non-zero numbers only);
    the file is removed, so the next round starts from nothing."""
    path = STATS_DIR / f"{instance_name(prefix, peer)}.json"
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        path.unlink()
    except OSError:
        pass
    return {k: v for k, v in sorted(stats.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v and k not in ("pid", "started")}


# -- wrk --------------------------------------------------------------------------------
# Called once by wrk at the end with the totals of all threads: exact counts and
# microsecond latencies, on one line that parse_wrk() picks out of the output.
WRK_DONE_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"duration_us":%.0f,"requests":%.0f,"bytes":%.0f,"connect":%.0f,"read":%.0f,' ..
    '"write":%.0f,"status":%.0f,"timeout":%.0f,"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,' ..
    '"mean_us":%.1f,"max_us":%.1f}\n',
    summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""

_TIME = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_BYTES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}      # wrk's units are binary


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"bad wrk time {text!r}")
    return float(m.group(1)) * _TIME[m.group(2)]


def _bytes(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(B|KB|MB|GB|TB)", text)
    if not m:
        raise ValueError(f"bad wrk byte count {text!r}")
    return float(m.group(1)) * _BYTES[m.group(2)]


def parse_wrk(text: str) -> dict:
    """wrk's output -> requests, bytes, duration_s, req_s, bytes_per_s, p50/p90/p99_ms,
    errors {connect, read, write, timeout, non2xx} and source ("lua" or "text").

    The WRK_JSON line of the done() hook is exact; without it the text is parsed
    (wrk rounds: bytes to 3 digits, latencies to 2 decimals)."""
    m = re.search(r"^WRK_JSON (\{.*\})\s*$", text, re.M)
    if m:
        j = json.loads(m.group(1))
        dur = j["duration_us"] / 1e6
        return {"source": "lua", "requests": int(j["requests"]), "bytes": int(j["bytes"]), "duration_s": dur,
                "req_s": j["requests"] / dur if dur > 0 else 0.0, "bytes_per_s": j["bytes"] / dur if dur > 0 else 0.0,
                "p50_ms": j["p50_us"] / 1e3, "p90_ms": j["p90_us"] / 1e3, "p99_ms": j["p99_us"] / 1e3,
                "mean_ms": j["mean_us"] / 1e3, "max_ms": j["max_us"] / 1e3,
                "errors": {"connect": int(j["connect"]), "read": int(j["read"]), "write": int(j["write"]),
                           "timeout": int(j["timeout"]), "non2xx": int(j["status"])}}
    out: dict = {"source": "text"}
    m = re.search(r"^\s*(\d+) requests in ([\d.]+\w+), ([\d.]+\w+) read", text, re.M)
    if not m:
        raise ValueError("no 'N requests in T, B read' line in wrk's output")
    out["requests"] = int(m.group(1))
    out["duration_s"] = _ms(m.group(2)) / 1e3
    out["bytes"] = int(_bytes(m.group(3)))
    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    out["req_s"] = float(m.group(1)) if m else out["requests"] / out["duration_s"]
    m = re.search(r"^Transfer/sec:\s+([\d.]+\w+)", text, re.M)
    out["bytes_per_s"] = _bytes(m.group(1)) if m else out["bytes"] / out["duration_s"]
    for q in ("50", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+([\d.]+\w+)", text, re.M)
        out[f"p{q}_ms"] = _ms(m.group(1)) if m else None
    m = re.search(r"^\s+Latency\s+([\d.]+\w+)\s+[\d.]+\w+\s+([\d.]+\w+)", text, re.M)
    out["mean_ms"], out["max_ms"] = (_ms(m.group(1)), _ms(m.group(2))) if m else (None, None)
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0, "non2xx": 0}
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errors.update(connect=int(m.group(1)), read=int(m.group(2)), write=int(m.group(3)), timeout=int(m.group(4)))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        errors["non2xx"] = int(m.group(1))
    out["errors"] = errors
    return out


def wrk(lab: Lab, url: str, duration: int, connections: int, threads: int, script: Path) -> dict:
    """One wrk run from the client namespace, with the whole machine's CPU during it."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url]
    t0, c0 = time.monotonic(), cpu_busy_ticks()
    try:
        p = lab.run(lab.client, *argv, check=False, timeout=duration + 30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RunFailed(f"wrk timed out after {duration + 30} s") from None
    cpu_s = (cpu_busy_ticks() - c0) / CLK_TCK
    wall = time.monotonic() - t0
    text = p.stdout.decode(errors="replace")
    if p.returncode != 0:
        raise RunFailed(f"wrk exited {p.returncode}: "
                        f"{(p.stderr.decode(errors='replace') + text).strip()[-1000:] or '(no output)'}")
    try:
        r = parse_wrk(text)
    except (ValueError, KeyError) as e:
        raise RunFailed(f"cannot parse wrk's output ({e}): {text[-1000:]}") from None
    if not r["requests"]:           # wrk prints 0 for the percentiles of no samples
        for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms"):
            r[k] = None
    r["argv"] = " ".join(argv)
    r["cpu_s"] = cpu_s
    r["wall_s"] = wall
    r["cpus_busy"] = cpu_s / wall if wall > 0 else None
    n, b = r["requests"], r["bytes"]
    r["error_count"] = sum(r["errors"].values())
    r["cpu_ms_per_req"] = cpu_s * 1e3 / n if n and cpu_s > 0 else None
    r["bytes_per_cpu_s"] = b / cpu_s if cpu_s > 0 else None
    r["bytes_per_response"] = b / n if n else None
    r["output"] = text.replace(_json_line(text), "").strip()[-2500:]
    return r


def _json_line(text: str) -> str:
    m = re.search(r"^WRK_JSON .*$", text, re.M)
    return m.group(0) if m else "\0"


# -- curl -------------------------------------------------------------------------------
def curl_verify(lab: Lab, url: str, size: int, sha256: str, dest: Path) -> None:
    """Fetch URL once into DEST and check status, length and sha256 (raises RunFailed)."""
    try:
        p = lab.run(lab.client, "curl", "-sS", "--connect-timeout", "5", "--max-time", "30", "-o", str(dest),
                    "-w", "%{http_code}", url, check=False, timeout=40, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RunFailed("curl (check) timed out") from None
    try:
        code = p.stdout.decode().strip()
        if p.returncode != 0 or code != "200":
            raise RunFailed(f"check: curl exited {p.returncode}, HTTP {code or '-'}: "
                            f"{p.stderr.decode(errors='replace').strip()[-500:]}")
        data = dest.read_bytes()
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise RunFailed(f"check: body of {len(data)} bytes, expected {size}; sha256 "
                            f"{'matches' if hashlib.sha256(data).hexdigest() == sha256 else 'differs'}")
    finally:
        dest.unlink(missing_ok=True)


def curl_big(lab: Lab, url: str, size: int) -> dict:
    """One download of SIZE bytes to /dev/null: Gbit/s (curl's speed_download) and CPU-s/GiB."""
    limit = 30 + size / 12.5e6                  # down to 0.1 Gbit/s
    argv = ["curl", "-sS", "--connect-timeout", "5", "--max-time", f"{limit:.0f}", "-o", "/dev/null",
            "-w", "%{http_code} %{size_download} %{speed_download} %{time_total} %{time_starttransfer}", url]
    t0, c0 = time.monotonic(), cpu_busy_ticks()
    try:
        p = lab.run(lab.client, *argv, check=False, timeout=limit + 15, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RunFailed(f"curl timed out after {limit + 15:.0f} s") from None
    cpu_s = (cpu_busy_ticks() - c0) / CLK_TCK
    wall = time.monotonic() - t0
    try:
        code, got, speed, total, ttfb = p.stdout.decode().split()
        got, speed, total, ttfb = int(got), float(speed), float(total), float(ttfb)
    except ValueError:
        raise RunFailed(f"curl exited {p.returncode}: {p.stdout.decode(errors='replace')!r} "
                        f"{p.stderr.decode(errors='replace').strip()[-500:]}") from None
    if p.returncode != 0 or code != "200" or got != size:
        raise RunFailed(f"curl exited {p.returncode}, HTTP {code}, {got} of {size} bytes: "
                        f"{p.stderr.decode(errors='replace').strip()[-500:]}")
    return {"bytes": got, "gbps": speed * 8 / 1e9, "time_total_s": total, "ttfb_s": ttfb, "cpu_s": cpu_s,
            "wall_s": wall, "cpu_s_per_gib": cpu_s / (got / 2**30)}


# -- the benchmark ----------------------------------------------------------------------
@dataclass
class Settings:
    sizes: list[int]
    duration: int
    connections: int
    threads: int
    big: int
    rounds: int
    peers: list[Peer]
    prefix: str = "bh"
    quiet_timeout: float = 10.0
    quiet_cpus: float = 0.15
    log: callable = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))


def size_label(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n}B"


def url_of(peer: Peer, path: str) -> str:
    return f"http://{_hostport(peer.target)}/{path}"


@dataclass
class Files:
    """The origin's files: size -> (path, sha256)."""
    by_size: dict[int, tuple[str, str]]
    big: tuple[str, str]


def make_files(ngx: NginxOrigin, sizes: list[int], big: int) -> Files:
    by_size = {}
    for i, n in enumerate(sizes):
        path = f"f-{size_label(n)}.bin"
        by_size[n] = (path, ngx.add_file(path, n, seed=i + 1))
    path = f"big-{size_label(big)}.bin"
    return Files(by_size, (path, ngx.add_file(path, big, seed=99)))


def _truncate_access_log(ngx: NginxOrigin) -> None:
    # The origin logs every request (JSON, O_APPEND): keep a long run from filling the disk.
    try:
        os.truncate(ngx.dir / "access.log", 0)
    except OSError:
        pass


def measure_peer(lab: Lab, ngx: NginxOrigin, files: Files, peer: Peer, s: Settings, workdir: Path,
                 script: Path, rnd: int) -> list[dict]:
    """Start PEER, the wrk run of every size and the big download through it, stop it.
    One record per measurement; a peer that did not start gives one record, kind "peer"."""
    recs: list[dict] = []
    running = None
    base = {"peer": peer.name, "round": rnd}
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        try:
            running = start_peer(lab, peer, workdir, s.prefix)
        except PeerFailed as e:
            recs.append({**base, "kind": "peer", "ok": False, "error": str(e)})
            s.log(f"round {rnd} {peer.name:14s} FAILED to start: {e}")
            return recs
        items = [("wrk", n) for n in s.sizes] + [("big", s.big)]
        for i, (kind, size) in enumerate(items):
            rec = {**base, "kind": kind, "size": size, "label": size_label(size), "ok": False}
            recs.append(rec)
            t0 = time.monotonic()
            try:
                if running:
                    running.check_alive()
                rec["background_cpus"] = wait_quiet(s.quiet_cpus, s.quiet_timeout)
                if kind == "wrk":
                    path, sha = files.by_size[size]
                    curl_verify(lab, url_of(peer, path), size, sha, workdir / "check.bin")
                    rec["wrk"] = wrk(lab, url_of(peer, path), s.duration, s.connections, s.threads, script)
                    _truncate_access_log(ngx)
                else:
                    rec["curl"] = curl_big(lab, url_of(peer, files.big[0]), size)
                if running:
                    running.check_alive()
                rec["ok"] = True
            except (PeerFailed, RunFailed) as e:
                msg = str(e)
                if running is not None and isinstance(e, RunFailed) and running.stderr_tail():
                    msg += f" | peer stderr: {running.stderr_tail()[-600:]}"
                rec["error"] = msg
            _log_rec(s, rec, time.monotonic() - t0)
            if running and running.proc.poll() is not None:
                for kind2, size2 in items[i + 1:]:
                    recs.append({**base, "kind": kind2, "size": size2, "label": size_label(size2), "ok": False,
                                 "error": f"{peer.name} died earlier in this round"})
                break
            time.sleep(0.2)        # let the connections of the previous run drain
    finally:
        if running is not None:
            code = running.stop()
            waited, left = wait_port_free(lab, LISTEN[1])
            for r in recs:
                r["peer_exit_code"] = code
            if left and recs:
                # e.g. connections of the stopped peer still closing; the next peer waits for them
                recs[-1]["port_busy_after_stop"] = {"states": left, "waited_s": round(waited, 2)}
                s.log(f"round {rnd} {peer.name:14s} after stop: {left} on port {LISTEN[1]}, waited {waited:.1f} s")
            if peer.is_nfsplice:
                counters = nfsplice_counters(s.prefix, peer)
                if counters is not None and recs:
                    recs[-1]["nfsplice_counters"] = counters
    return recs


def _log_rec(s: Settings, rec: dict, secs: float) -> None:
    head = f"round {rec['round']} {rec['peer']:14s} {rec['label']:>7s}"
    if not rec["ok"]:
        s.log(f"{head} FAILED: {rec['error']}")
    elif rec["kind"] == "wrk":
        w = rec["wrk"]
        err = ", ".join(f"{k} {v}" for k, v in w["errors"].items() if v) or "0"
        s.log(f"{head} {w['req_s']:9.0f} req/s {w['bytes_per_s'] / 1e6:8.1f} MB/s "
              f"{_fmt(w['cpu_ms_per_req'], 3)} CPU-ms/req p50 {_fmt(w['p50_ms'], 2)} p99 {_fmt(w['p99_ms'], 2)} ms "
              f"errors {err}  background {rec['background_cpus']:.2f} CPU ({secs:.1f} s)")
    else:
        c = rec["curl"]
        s.log(f"{head} {c['gbps']:6.2f} Gbit/s {c['cpu_s_per_gib']:5.2f} CPU-s/GiB  "
              f"background {rec['background_cpus']:.2f} CPU ({secs:.1f} s)")


def run_benchmark(s: Settings, tmp: Path, runs: list[dict]) -> list[dict]:
    """Every round; records are appended to RUNS as they finish (kept if interrupted)."""
    script = tmp / "done.lua"
    script.write_text(WRK_DONE_LUA)
    with Lab(s.prefix) as lab, NginxOrigin(lab) as ngx:
        s.log(f"origin nginx on {_hostport(ORIGIN)}; writing {len(s.sizes)} file(s) and {size_label(s.big)}")
        files = make_files(ngx, s.sizes, s.big)
        for rnd in range(1, s.rounds + 1):
            for peer in round_order(s.peers, rnd - 1):
                runs.extend(measure_peer(lab, ngx, files, peer, s, tmp / f"r{rnd}-{peer.name}", script, rnd))
    return runs


# -- summary ----------------------------------------------------------------------------
def summarize(runs: list[dict], peers: list[Peer], sizes: list[int]) -> dict:
    """Medians over the rounds, per size and peer (wrk) and per peer (big download)."""
    out: dict = {"sizes": {}, "big": {}, "peers": {}}
    for peer in peers:
        mine = [r for r in runs if r["peer"] == peer.name]
        out["peers"][peer.name] = {
            "note": peer.note,
            "failures": [f"round {r['round']}{' ' + r['label'] if 'label' in r else ''}: {r['error']}"
                         for r in mine if not r["ok"]],
            "nfsplice_counters": [{"round": r["round"], **r["nfsplice_counters"]}
                                  for r in mine if r.get("nfsplice_counters")],
            "port_busy_after_stop": [{"round": r["round"], **r["port_busy_after_stop"]}
                                     for r in mine if r.get("port_busy_after_stop")],
        }
    for n in sizes:
        per: dict = {}
        for peer in peers:
            mine = [r for r in runs if r["peer"] == peer.name and (r.get("kind") == "wrk" and r["size"] == n
                                                                    or r.get("kind") == "peer")]
            ok = [r["wrk"] for r in mine if r["ok"]]
            errs = {k: sum(w["errors"][k] for w in ok) for k in ("connect", "read", "write", "timeout", "non2xx")}
            req_s = [w["req_s"] for w in ok]
            per[peer.name] = {
                "runs": len(mine), "ok_runs": len(ok),
                "req_s": _median(req_s), "req_s_min": min(req_s, default=None), "req_s_max": max(req_s, default=None),
                "mb_s": _median([w["bytes_per_s"] / 1e6 for w in ok]),
                "cpu_ms_per_req": _median([w["cpu_ms_per_req"] for w in ok]),
                "bytes_per_cpu_s": _median([w["bytes_per_cpu_s"] for w in ok]),
                "cpus_busy": _median([w["cpus_busy"] for w in ok]),
                "p50_ms": _median([w["p50_ms"] for w in ok]),
                "p99_ms": _median([w["p99_ms"] for w in ok]),
                "bytes_per_response": _median([w["bytes_per_response"] for w in ok]),
                "requests_total": sum(w["requests"] for w in ok),
                "errors": sum(errs.values()), "error_detail": errs,
            }
        out["sizes"][size_label(n)] = per
    for peer in peers:
        mine = [r for r in runs if r["peer"] == peer.name and r.get("kind") in ("big", "peer")]
        ok = [r["curl"] for r in mine if r["ok"]]
        gbps = [c["gbps"] for c in ok]
        out["big"][peer.name] = {"runs": len(mine), "ok_runs": len(ok), "gbps": _median(gbps),
                                 "gbps_min": min(gbps, default=None), "gbps_max": max(gbps, default=None),
                                 "cpu_s_per_gib": _median([c["cpu_s_per_gib"] for c in ok])}
    return out


# -- reporting --------------------------------------------------------------------------
def _si(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= f:
            return f"{v / f:.{digits}f} {unit}"
    return f"{v:.{digits}f}"


def markdown(result: dict) -> str:
    m, meta, summ = result["machine"], result["meta"], result["summary"]
    bg = [r["background_cpus"] for r in result["runs"] if "background_cpus" in r]
    lines = [
        "# nfsplice HTTP benchmark", "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- kernel: {m['kernel']} (`uname -r`), nproc: {m['nproc']}, CPU: {m['cpu_model']}",
        f"- versions: {m['wrk']}; {m['curl']}; {m['haproxy']}; {m['nginx']}; Python {m['python']}",
        f"- origin: nginx (netns_lab.origins.NginxOrigin: sendfile, keep-alive, one worker, JSON access log) on "
        f"{meta['origin']}; peers listen on {meta['listen']}; `origin` = wrk straight to the origin",
        f"- per round, per peer (order rotated each round), per size: one curl fetch checked by sha256, then "
        f"`wrk -t{meta['threads']} -c{meta['connections']} -d{meta['duration_s']}s --latency`; then one "
        f"{size_label(meta['big_bytes'])} curl download to /dev/null. {meta['rounds']} round(s); medians over rounds.",
        "- CPU = whole machine (all CPUs, /proc/stat busy ticks: wrk or curl, the peer, the origin, the kernel) "
        "from right before the client starts to right after it exits. MB = 10^6 bytes; bytes as wrk counts them "
        "(heads included). errors = socket errors (connect/read/write/timeout) + non-2xx/3xx, summed over rounds; "
        "wrk's timeout counts responses slower than its 2 s --timeout (they are not aborted), and wrk counts only "
        "responses complete before the end of the run.",
        f"- other load on the machine right before the runs (CPUs busy, 0-{m['nproc']}): "
        f"max {_fmt(max(bg, default=None), 2)}, median {_fmt(_median(bg), 2)}",
        "", f"Note: {CLOSE_NOTE}", "",
    ]
    for label, per in summ["sizes"].items():
        lines += [f"## {label} responses", "",
                  "| peer | req/s | MB/s | CPU-ms/req | bytes per CPU-s | p50 ms | p99 ms | errors | ok runs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in per.items():
            if r["ok_runs"] == 0:
                lines.append(f"| {name} | failed | - | - | - | - | - | - | 0/{r['runs']} |")
                continue
            detail = ", ".join(f"{k} {v}" for k, v in r["error_detail"].items() if v)
            lines.append(f"| {name} | {r['req_s']:.0f} | {_fmt(r['mb_s'], 1)} | {_fmt(r['cpu_ms_per_req'], 3)} | "
                         f"{_si(r['bytes_per_cpu_s'])}B | {_fmt(r['p50_ms'], 2)} | {_fmt(r['p99_ms'], 2)} | "
                         f"{r['errors']}{f' ({detail})' if detail else ''} | {r['ok_runs']}/{r['runs']} |")
        lines.append("")
    lines += [f"## {size_label(meta['big_bytes'])} download (curl, one connection)", "",
              "| peer | Gbit/s (min-max) | CPU-s/GiB | ok runs |", "|---|---|---|---|"]
    for name, r in summ["big"].items():
        if r["ok_runs"] == 0:
            lines.append(f"| {name} | failed | - | 0/{r['runs']} |")
        else:
            lines.append(f"| {name} | {r['gbps']:.2f} ({r['gbps_min']:.2f}-{r['gbps_max']:.2f}) | "
                         f"{_fmt(r['cpu_s_per_gib'], 2)} | {r['ok_runs']}/{r['runs']} |")
    lines += ["", "Peers:", ""]
    lines += [f"- `{name}`: {p['note']}" for name, p in summ["peers"].items()]
    counters = [(name, c) for name, p in summ["peers"].items() for c in p["nfsplice_counters"]]
    if counters:
        lines += ["", "nfsplice counters at the end of each round (non-zero; see results.json):", ""]
        keep = ("http.", "dropped", "handoff", "pairs", "verdict", "queue")
        for name, c in counters:
            shown = ", ".join(f"{k} {v}" for k, v in c.items() if k != "round" and k.startswith(keep))
            lines.append(f"- `{name}` round {c['round']}: {shown or '-'}")
    busy = [(name, b) for name, p in summ["peers"].items() for b in p.get("port_busy_after_stop", [])]
    if busy:
        lines += ["", f"Sockets (not TIME-WAIT) left on port {meta['listen'].rsplit(':', 1)[1]} right after a peer "
                  "stopped (the next peer waited for them to go):", ""]
        lines += [f"- `{name}` round {b['round']}: {b['states']}, gone after {b['waited_s']} s" for name, b in busy]
    failures = [(name, e) for name, p in summ["peers"].items() for e in p["failures"]]
    if failures:
        lines += ["", "Failures:", ""]
        lines += [f"- `{name}` {e}" for name, e in failures]
    if result.get("interrupted"):
        lines += ["", "**Interrupted**: partial results."]
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ, meta, m = result["summary"], result["meta"], result["machine"]
    names = list(summ["big"])
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    rows = list(summ["sizes"].items()) + [(None, summ["big"])]
    fig, axes = plt.subplots(len(rows), 2, figsize=(max(11, 1.6 * len(names) + 4), 3.4 * len(rows)), squeeze=False)
    x = list(range(len(names)))

    def bars(ax, vals: list, labels: list, title: str) -> None:
        ax.bar(x, [v or 0 for v in vals], color=[colors[n] for n in names])
        for i, (v, lab) in enumerate(zip(vals, labels)):
            ax.text(i, v or 0, lab, ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.margins(y=0.15)

    for (label, per), (ax1, ax2) in zip(rows, axes):
        if label is not None:
            rs = [per[n]["req_s"] for n in names]
            bc = [per[n]["bytes_per_cpu_s"] for n in names]
            failed = [per[n]["ok_runs"] == 0 for n in names]
            bars(ax1, rs, ["failed" if f else f"{v:.0f}" for f, v in zip(failed, rs)],
                 f"{label}: requests/s (wrk -c{meta['connections']})")
            bars(ax2, [v / 1e6 if v else None for v in bc],
                 ["failed" if f else _si(v) + "B" for f, v in zip(failed, bc)],
                 f"{label}: MB per CPU-second (whole machine)")
        else:
            gb = [per[n]["gbps"] for n in names]
            cg = [per[n]["cpu_s_per_gib"] for n in names]
            bars(ax1, gb, ["failed" if v is None else f"{v:.2f}" for v in gb],
                 f"{size_label(meta['big_bytes'])} download: Gbit/s (curl, 1 connection)")
            bars(ax2, cg, ["failed" if v is None else f"{v:.2f}" for v in cg],
                 f"{size_label(meta['big_bytes'])} download: CPU-s per GiB (whole machine)")
    fig.suptitle(f"nfsplice HTTP benchmark, {meta['rounds']} round(s) x {meta['duration_s']} s, "
                 f"kernel {m['kernel']}, {m['nproc']} CPU", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown(result))
    chart(result, out / "bench.png")


def _version(*argv: str) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return f"{argv[0]} not installed"
    text = (p.stdout + p.stderr).decode(errors="replace").strip().splitlines()
    return text[0].split(" Copyright")[0] if text else argv[0]


# -- command line -----------------------------------------------------------------------
def parse_sizes(text: str) -> list[int]:
    sizes = [parse_size(t) for t in text.split(",") if t.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError("give at least one size")
    return list(dict.fromkeys(sizes))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m netns_lab.bench_http", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="known peers: " + ", ".join(PEERS))
    ap.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES),
                    help=f"response sizes for wrk (default {DEFAULT_SIZES})")
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    ap.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    ap.add_argument("--big", type=parse_size, default=2**30, help="size of the curl download (default 1GiB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--splice-threshold", help="--splice-threshold for the nfsplice peers (default: theirs, 2MiB)")
    ap.add_argument("--peers", default=DEFAULT_PEERS, help=f"comma-separated (default {DEFAULT_PEERS})")
    ap.add_argument("--out", type=Path, default=REPO / "netns_lab" / "results-http")
    ap.add_argument("--prefix", default="bh", help="lab namespace prefix (default bh)")
    ap.add_argument("--quiet-timeout", type=float, default=10.0,
                    help="before each run wait up to this long (s) for other load to fall below --quiet-cpus")
    ap.add_argument("--quiet-cpus", type=float, default=0.15, help="CPUs of other load that count as quiet")
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.duration < 1 or a.connections < 1 or a.threads < 1:
        ap.error("--rounds, --duration, --connections and --threads must be at least 1")
    if a.threads > a.connections:
        ap.error("--threads must not exceed --connections (wrk needs a connection per thread)")
    names = list(dict.fromkeys(n.strip() for n in a.peers.split(",") if n.strip()))
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        ap.error(f"unknown peer(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(PEERS)}")
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces)")
    for tool in ("wrk", "curl"):
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep)):
            ap.error(f"{tool} not found: apt-get install -y {tool} (or make setup)")

    peers = [PEERS[n] for n in names]
    if a.splice_threshold:
        peers = [dataclasses.replace(p, argv=p.argv + ("--splice-threshold", a.splice_threshold))
                 if p.is_nfsplice else p for p in peers]
    s = Settings(sizes=a.sizes, duration=a.duration, connections=a.connections, threads=a.threads, big=a.big,
                 rounds=a.rounds, peers=peers, prefix=a.prefix,
                 quiet_timeout=a.quiet_timeout, quiet_cpus=a.quiet_cpus)
    machine = machine_info()
    machine.update(wrk=_version("wrk", "-v"), curl=_version("curl", "--version"))
    result = {
        "meta": {"command": " ".join(["python -m netns_lab.bench_http"] + [shlex.quote(x) for x in argv]),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "sizes_bytes": a.sizes, "sizes": [size_label(n) for n in a.sizes], "duration_s": a.duration,
                 "connections": a.connections, "threads": a.threads, "big_bytes": a.big, "rounds": a.rounds,
                 "peers": names, "listen": _hostport(LISTEN), "origin": _hostport(ORIGIN), "note": CLOSE_NOTE},
        "machine": machine,
    }

    runs: list[dict] = []
    interrupted = bench.run_interruptible(s, "nfsplice-bench-http-", run_benchmark, runs)
    if interrupted is None:
        return 1
    result["runs"] = runs
    result["summary"] = summarize(runs, s.peers, s.sizes)
    result["interrupted"] = interrupted
    write_results(result, a.out)
    sys.stdout.write(markdown(result))
    s.log(f"written: {a.out}/results.json, results.md, bench.png")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
