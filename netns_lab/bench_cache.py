"""Cache benchmark in the lab: nfsplice's cache against nginx proxy_cache, Varnish and Squid.

    python -m netns_lab.bench_cache [--rounds 3] [--duration 5] [--sizes 1KiB,64KiB]
        [--big 256MiB] [--clients 20] [--connections 50] [--threads 2]
        [--hit-peers nfsplice,nginx,varnish,squid] [--collapse-peers nfsplice,nginx,varnish,squid]
        [--parts hits,fill,collapse] [--out netns_lab/results-cache] [--prefix bc]

The origin is nginx (netns_lab.origins.NginxOrigin) in the origin namespace on
198.18.2.2:8000; this benchmark adds one location to its config: /c/<file> serves the
docroot with `Cache-Control: max-age=3600`.  Every cache listens on 198.18.1.1:8080 in
the proxy namespace (bench_http's addresses and its peer machinery: a command line and
a config template in netns_lab/peers/); wrk and curl run in the client namespace.  All
processes share the machine's CPUs (nothing is pinned).  Every peer is started fresh
(an empty cache) for each part of each round; the rounds interleave the peers (order
rotated by one each round); reported are medians over rounds.

1. hits: per size, fetch /c/f-<size>.bin twice with curl (the first is a miss that
   fills the cache, the second should be a hit; both sha256-checked), empty the origin's
   access log, `wrk -t2 -c50 -d<duration>s --latency`, then count the origin requests
   wrk caused (0 when every request was a hit).  requests/s, CPU-ms per request (the
   whole machine's busy time from /proc/stat over the wrk run), latency, errors.
2. fill: one --big cacheable miss through `nfsplice` with --cache-dir (spliced by the
   engine and tapped into the cache) against the same transfer through `nfsplice-nocache`
   (the same listener without a cache); Gbit/s and CPU-s/GiB from curl and /proc/stat.
   For the cached one also when the body was committed (its file appears under the
   store's objects/, polled every 10 ms: after the fsync of the body, so mostly the
   disk's time), and for both the nfsplice process's own CPU-s/GiB (/proc/PID/stat, all
   threads) from the start until then, or until curl is done: the store hashes the
   body at commit, after the transfer.  Afterwards the
   object is fetched again through the cache and must be a hit with the right sha256
   (`stored`).  The ratio cached/uncached is the tap's cost (issue 4's target: at
   least 0.9).
3. collapse: --clients curl processes started at once for the same cold --big object
   (each body written to /dev/shm, then sha256-checked against the origin's file); the
   origin's bytes sent for that URL (its access log's $bytes_sent), its request count,
   and the time from the start until the last client is done.

Written to --out: results.json (every run, the summary, the machine), results.md,
bench.png.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from netns_lab.bench import PeerFailed, RunFailed, _fmt, _hostport, _median, machine_info, parse_size, \
    round_order, run_interruptible, wait_quiet
from netns_lab.bench_http import (LISTEN, ORIGIN, WRK_DONE_LUA, Peer, _truncate_access_log, _version,
                                  curl_big, curl_verify, nfsplice_counters, parse_sizes, size_label, start_peer,
                                  wait_port_free, wrk)
from netns_lab.origins import NginxOrigin
from netns_lab.peers.bench_tools import CLK_TCK
from netns_lab.topology import ORIGIN_ADDR, Lab

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = "1KiB,64KiB"
DEFAULT_PEERS = "nfsplice,nginx,varnish,squid"
PARTS = ("hits", "fill", "collapse")
CC = "max-age=3600"
SHM = Path("/dev/shm")
_ORIGIN_VALUES = {"origin_host": ORIGIN_ADDR, "origin_port": str(ORIGIN[1])}


# -- peers as data ----------------------------------------------------------------------
def _nfsplice(name: str, *extra: str, note: str) -> Peer:
    return Peer(name, ("{python}", "-m", "nfsplice", "http", "--listen", "{listen}", "--upstream", "http://{upstream}",
                       *extra, "--instance", "{instance}", "--ready-file", "{ready_file}", "--access-log", "off"),
                note=note)


PEERS: dict[str, Peer] = {p.name: p for p in (
    _nfsplice("nfsplice", "--cache-dir", "{dir}/cache", "--cache-size", "2GiB",
              note="nfsplice http --cache-dir (cache on the tmp directory's disk, 2 GiB): hits from the index + "
                   "sendfile, misses of 64 KiB or more spliced and tapped into the cache, tc-BPF fast path"),
    _nfsplice("nfsplice-nocache",
              note="the same nfsplice http listener without a cache (the fill part's reference)"),
    Peer("nginx", ("nginx", "-p", "{dir}", "-c", "{dir}/nginx.conf", "-e", "stderr"),
         config=("nginx_cache.conf.tmpl", "nginx.conf", {"workers": "auto"}),
         note="nginx proxy_cache on disk (the tmp directory), proxy_cache_lock on (timeout/age 60 s), "
              "upstream keep-alive, worker_processes auto"),
    Peer("varnish", ("varnishd", "-F", "-j", "none", "-n", "{dir}/varnish", "-a", "{listen}",
                     "-f", "{dir}/varnish.vcl", "-s", "malloc,1536m", "-T", "127.0.0.1:0"),
         config=("varnish.vcl.tmpl", "varnish.vcl", _ORIGIN_VALUES),
         note="varnishd, malloc storage 1.5 GiB, built-in VCL (request coalescing and streaming on), "
              "default thread pools"),
    Peer("squid", ("squid", "-N", "-f", "{dir}/squid.conf"),
         config=("squid.conf.tmpl", "squid.conf", _ORIGIN_VALUES),
         note="Squid accelerator mode, memory cache 1.5 GiB (no cache_dir), collapsed_forwarding on, "
              "one process (-N)"),
)}


class CacheOrigin(NginxOrigin):
    """The lab's nginx origin plus /c/<file>: the docroot with Cache-Control: max-age=3600."""

    def _prepare(self) -> None:
        super()._prepare()
        conf = self.dir / "nginx.conf"
        text = conf.read_text()
        anchor = "        location /chunked/ {"
        assert anchor in text, "NginxOrigin's config changed: no /chunked/ location"
        loc = (f"        location /c/ {{\n            alias {self.root}/;\n"
               f"            add_header Cache-Control \"{CC}\" always;\n        }}\n")
        conf.write_text(text.replace(anchor, loc + anchor, 1))


def _start(lab: Lab, peer: Peer, workdir: Path, prefix: str):
    workdir.mkdir(parents=True, exist_ok=True)
    if peer.name == "squid":       # Squid drops to the user proxy: let it write its log and pid
        for d in (workdir.parent, workdir):
            d.chmod(0o777 if d == workdir else 0o755)
    return start_peer(lab, peer, workdir, prefix, timeout=20.0)


def _stop(lab: Lab, peer: Peer, running, rec: dict, prefix: str) -> None:
    if running is None:
        return
    rec["peer_exit_code"] = running.stop()
    waited, left = wait_port_free(lab, LISTEN[1])
    if left:
        rec["port_busy_after_stop"] = {"states": left, "waited_s": round(waited, 2)}
    if peer.is_nfsplice:
        c = nfsplice_counters(prefix, peer)
        if c is not None:
            rec["nfsplice_counters"] = c


# -- the origin's access log -------------------------------------------------------------
def origin_entries(ngx: NginxOrigin, uri: str, settle: float = 0.5, timeout: float = 10.0,
                   at_least: int = 0) -> list[dict]:
    """The origin's access log entries for URI, once the log has stopped growing for SETTLE s
    (nginx logs a request when its response is done or aborted)."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        entries = [e for e in ngx.requests() if e.get("uri") == uri]
        n = len(entries)
        if n != last:
            last, since = n, time.monotonic()
        if (n >= at_least and time.monotonic() - since >= settle) or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)


# -- clients ----------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def parallel_fetch(lab: Lab, url: str, n: int, size: int, sha256: str, tag: str) -> dict:
    """N curl processes started at once for URL, bodies to /dev/shm, then sha256-checked.
    Returns per-client results and the time from the start to the last client done."""
    limit = 60 + size * n / 12.5e6
    fmt = "%{http_code} %{size_download} %{time_total} %{time_starttransfer}"
    paths = [SHM / f"nfsplice-bc-{os.getpid()}-{tag}-{i}.bin" for i in range(n)]
    procs, done_at = [], [None] * n
    barrier = threading.Barrier(n + 1)

    def one(i: int) -> None:
        barrier.wait()
        p = lab.popen(lab.client, "curl", "-sS", "--connect-timeout", "5", "--max-time", f"{limit:.0f}",
                      "-o", str(paths[i]), "-w", fmt, url,
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append((i, p))
        try:
            out, err = p.communicate(timeout=limit + 15)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        done_at[i] = (time.monotonic(), p.returncode, out.decode(errors="replace"), err.decode(errors="replace"))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    barrier.wait()
    for t in threads:
        t.join()
    clients = []
    try:
        def check(i: int) -> dict:
            end, code, out, err = done_at[i]
            c = {"client": i, "exit": code, "done_s": end - t0, "ok": False}
            try:
                status, got, total, ttfb = out.split()
                c.update(status=int(status), bytes=int(got), time_total_s=float(total), ttfb_s=float(ttfb))
            except ValueError:
                c["error"] = f"curl exited {code}: {out!r} {err.strip()[-300:]}"
                return c
            if code != 0 or c["status"] != 200 or c["bytes"] != size:
                c["error"] = f"curl exited {code}, HTTP {c['status']}, {c['bytes']} of {size} bytes {err.strip()[-300:]}"
                return c
            c["sha256_ok"] = _sha256_file(paths[i]) == sha256
            c["ok"] = c["sha256_ok"]
            if not c["ok"]:
                c["error"] = "sha256 mismatch"
            return c
        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as ex:
            clients = list(ex.map(check, range(n)))
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
    return {"clients": clients, "last_done_s": max(c["done_s"] for c in clients),
            "verified": sum(1 for c in clients if c["ok"])}


def head_status(lab: Lab, url: str, head: bool = False) -> str:
    """The cache status headers of one GET (body discarded), or of a HEAD: a cache answers
    HEAD from a stored GET and forwards it without a body otherwise (no new fill)."""
    p = lab.run(lab.client, "curl", "-sS", "--max-time", "60", *(["-I"] if head else []), "-D", "-", "-o",
                "/dev/null", url, check=False, timeout=90, stdin=subprocess.DEVNULL)
    keep = ("cache-status", "x-cache", "x-cache-status", "age", "x-varnish")
    return "; ".join(l.strip() for l in p.stdout.decode(errors="replace").splitlines()
                     if l.split(":", 1)[0].strip().lower() in keep)


# -- the benchmark ----------------------------------------------------------------------
@dataclass
class Settings:
    sizes: list[int]
    duration: int
    connections: int
    threads: int
    big: int
    clients: int
    rounds: int
    hit_peers: list[Peer]
    collapse_peers: list[Peer]
    parts: list[str]
    prefix: str = "bc"
    quiet_timeout: float = 10.0
    quiet_cpus: float = 0.15
    log: callable = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))


@dataclass
class Files:
    by_size: dict[int, tuple[str, str]]
    big: tuple[str, str]


def _err(e: Exception, running) -> str:
    msg = str(e)
    if running is not None and isinstance(e, RunFailed) and running.stderr_tail():
        msg += f" | peer stderr: {running.stderr_tail()[-600:]}"
    return msg


def measure_hits(lab, ngx, files: Files, peer: Peer, s: Settings, workdir: Path, script: Path, rnd: int) -> list[dict]:
    recs, running = [], None
    base = {"part": "hits", "peer": peer.name, "round": rnd}
    try:
        try:
            running = _start(lab, peer, workdir, s.prefix)
        except PeerFailed as e:
            recs.append({**base, "kind": "peer", "ok": False, "error": str(e)})
            s.log(f"round {rnd} hits {peer.name:10s} FAILED to start: {e}")
            return recs
        for n in s.sizes:
            rec = {**base, "kind": "wrk", "size": n, "label": size_label(n), "ok": False}
            recs.append(rec)
            path, sha = files.by_size[n]
            url = f"http://{_hostport(LISTEN)}/c/{path}"
            try:
                running.check_alive()
                curl_verify(lab, url, n, sha, workdir / "check.bin")      # the miss that fills
                time.sleep(0.3)                                            # a commit may be asynchronous
                curl_verify(lab, url, n, sha, workdir / "check.bin")      # should be a hit
                rec["status_after_warmup"] = head_status(lab, url)
                _truncate_access_log(ngx)
                rec["background_cpus"] = wait_quiet(s.quiet_cpus, s.quiet_timeout)
                rec["wrk"] = wrk(lab, url, s.duration, s.connections, s.threads, script)
                rec["origin_requests"] = len(origin_entries(ngx, f"/c/{path}", settle=0.2, timeout=2))
                _truncate_access_log(ngx)
                running.check_alive()
                rec["ok"] = True
                w = rec["wrk"]
                s.log(f"round {rnd} hits {peer.name:10s} {rec['label']:>6s} {w['req_s']:8.0f} req/s "
                      f"{_fmt(w['cpu_ms_per_req'], 3)} CPU-ms/req p99 {_fmt(w['p99_ms'], 2)} ms errors "
                      f"{w['error_count']} origin requests {rec['origin_requests']} [{rec['status_after_warmup']}]")
            except (PeerFailed, RunFailed) as e:
                rec["error"] = _err(e, running)
                s.log(f"round {rnd} hits {peer.name:10s} {rec['label']:>6s} FAILED: {rec['error']}")
                if running.proc.poll() is not None:
                    break
            time.sleep(0.2)
    finally:
        if recs:
            _stop(lab, peer, running, recs[-1], s.prefix)
    return recs


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) process PID used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def committed_body(store_dir: Path, size: int, timeout: float, poll: float = 0.01) -> bool:
    """Wait until a body of SIZE bytes is installed in the store at STORE_DIR (its file
    under objects/XX/: renamed there at commit, right before its index row)."""
    deadline = time.monotonic() + timeout
    objects = store_dir / "objects"
    while True:
        try:
            for sub in os.scandir(objects):
                for f in os.scandir(sub.path):
                    if f.stat().st_size == size:
                        return True
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)


def measure_fill(lab, ngx, files: Files, peer: Peer, s: Settings, workdir: Path, rnd: int) -> dict:
    rec = {"part": "fill", "peer": peer.name, "round": rnd, "ok": False}
    path, sha = files.big
    uri = f"/c/{path}?fill={rnd}"
    url = f"http://{_hostport(LISTEN)}{uri}"
    running = None
    try:
        running = _start(lab, peer, workdir, s.prefix)
        rec["background_cpus"] = wait_quiet(s.quiet_cpus, s.quiet_timeout)
        t0, p0 = time.monotonic(), process_cpu_s(running.proc.pid)
        rec["curl"] = curl_big(lab, url, s.big)
        if peer.name != "nfsplice-nocache" and committed_body(workdir / "cache", s.big, timeout=30):
            rec["committed_after_s"] = time.monotonic() - t0
        if p0 is not None:
            rec["process_cpu_s_per_gib"] = (process_cpu_s(running.proc.pid) - p0) / (s.big / 2**30)
        running.check_alive()
        rec["origin_requests"] = len(origin_entries(ngx, uri, settle=0.2, timeout=3, at_least=1))
        if peer.name != "nfsplice-nocache":
            # The object must now be in the cache: a hit, byte-exact.
            deadline, status = time.monotonic() + 10, ""
            while time.monotonic() < deadline:
                status = head_status(lab, url, head=True)
                if "hit" in status.lower():
                    break
                time.sleep(0.2)
            rec["status_after"] = status
            rec["stored"] = "hit" in status.lower()
            if rec["stored"]:          # and byte-exact
                rec["stored"] = parallel_fetch(lab, url, 1, s.big, sha, f"fill-{rnd}")["verified"] == 1
            rec["origin_requests_after"] = len(origin_entries(ngx, uri, settle=0.2, timeout=3))
        rec["ok"] = True
        c = rec["curl"]
        committed = "" if "committed_after_s" not in rec else f" committed after {rec['committed_after_s']:.2f} s"
        if "process_cpu_s_per_gib" in rec:
            committed += f", nfsplice process {rec['process_cpu_s_per_gib']:.2f} CPU-s/GiB"
        s.log(f"round {rnd} fill {peer.name:16s} {c['gbps']:6.2f} Gbit/s {c['cpu_s_per_gib']:5.2f} CPU-s/GiB "
              f"stored {rec.get('stored', '-')}{committed} [{rec.get('status_after', '')}]")
    except (PeerFailed, RunFailed) as e:
        rec["error"] = _err(e, running)
        s.log(f"round {rnd} fill {peer.name:16s} FAILED: {rec['error']}")
    finally:
        _stop(lab, peer, running, rec, s.prefix)
        _truncate_access_log(ngx)
    return rec


def measure_collapse(lab, ngx, files: Files, peer: Peer, s: Settings, workdir: Path, rnd: int) -> dict:
    rec = {"part": "collapse", "peer": peer.name, "round": rnd, "ok": False, "clients": s.clients}
    path, sha = files.big
    uri = f"/c/{path}?collapse={rnd}"
    url = f"http://{_hostport(LISTEN)}{uri}"
    running = None
    try:
        running = _start(lab, peer, workdir, s.prefix)
        _truncate_access_log(ngx)
        rec["background_cpus"] = wait_quiet(s.quiet_cpus, s.quiet_timeout)
        got = parallel_fetch(lab, url, s.clients, s.big, sha, f"collapse-{rnd}")
        running.check_alive()
        entries = origin_entries(ngx, uri, settle=0.5, timeout=10, at_least=1)
        rec.update(last_done_s=got["last_done_s"], verified=got["verified"],
                   client_errors=[c["error"] for c in got["clients"] if not c["ok"]][:5],
                   client_done_s=sorted(round(c["done_s"], 3) for c in got["clients"]),
                   origin_requests=len(entries), origin_bytes=sum(e.get("bytes_sent", 0) for e in entries),
                   origin_body_bytes=sum(e.get("body_bytes_sent", 0) for e in entries),
                   origin_statuses=sorted({e.get("status") for e in entries}))
        rec["origin_copies"] = rec["origin_body_bytes"] / s.big
        rec["ok"] = True
        s.log(f"round {rnd} collapse {peer.name:10s} last done {rec['last_done_s']:6.2f} s, verified "
              f"{rec['verified']}/{s.clients}, origin {rec['origin_requests']} request(s) "
              f"{rec['origin_copies']:.2f} copies")
    except (PeerFailed, RunFailed) as e:
        rec["error"] = _err(e, running)
        s.log(f"round {rnd} collapse {peer.name:10s} FAILED: {rec['error']}")
    finally:
        _stop(lab, peer, running, rec, s.prefix)
        _truncate_access_log(ngx)
    return rec


def run_benchmark(s: Settings, tmp: Path, runs: list[dict]) -> list[dict]:
    script = tmp / "done.lua"
    script.write_text(WRK_DONE_LUA)
    fill_peers = [PEERS["nfsplice"], PEERS["nfsplice-nocache"]]
    with Lab(s.prefix) as lab, CacheOrigin(lab) as ngx:
        s.log(f"origin nginx on {_hostport(ORIGIN)}; writing {len(s.sizes)} file(s) and {size_label(s.big)}")
        by_size = {n: (f"f-{size_label(n)}.bin", ngx.add_file(f"f-{size_label(n)}.bin", n, seed=i + 1))
                   for i, n in enumerate(s.sizes)}
        big = f"big-{size_label(s.big)}.bin"
        files = Files(by_size, (big, ngx.add_file(big, s.big, seed=99)))
        for rnd in range(1, s.rounds + 1):
            if "hits" in s.parts:
                for peer in round_order(s.hit_peers, rnd - 1):
                    runs.extend(measure_hits(lab, ngx, files, peer, s, tmp / f"r{rnd}-hits-{peer.name}", script, rnd))
            if "fill" in s.parts:
                for peer in round_order(fill_peers, rnd - 1):
                    runs.append(measure_fill(lab, ngx, files, peer, s, tmp / f"r{rnd}-fill-{peer.name}", rnd))
            if "collapse" in s.parts:
                for peer in round_order(s.collapse_peers, rnd - 1):
                    runs.append(measure_collapse(lab, ngx, files, peer, s, tmp / f"r{rnd}-collapse-{peer.name}", rnd))
    return runs


# -- summary ----------------------------------------------------------------------------
def summarize(runs: list[dict], s_meta: dict) -> dict:
    out: dict = {"hits": {}, "fill": {}, "collapse": {}, "failures": []}
    for r in runs:
        if not r["ok"]:
            out["failures"].append(f"{r['part']} {r['peer']} round {r['round']}"
                                   f"{' ' + r['label'] if 'label' in r else ''}: {r.get('error')}")
    for label in s_meta["sizes"]:
        per = {}
        for name in s_meta["hit_peers"]:
            mine = [r for r in runs if r["part"] == "hits" and r["peer"] == name
                    and (r.get("label") == label or r.get("kind") == "peer")]
            ok = [r for r in mine if r["ok"]]
            w = [r["wrk"] for r in ok]
            per[name] = {"runs": len(mine), "ok_runs": len(ok),
                         "req_s": _median([x["req_s"] for x in w]),
                         "req_s_min": min((x["req_s"] for x in w), default=None),
                         "req_s_max": max((x["req_s"] for x in w), default=None),
                         "mb_s": _median([x["bytes_per_s"] / 1e6 for x in w]),
                         "cpu_ms_per_req": _median([x["cpu_ms_per_req"] for x in w]),
                         "p50_ms": _median([x["p50_ms"] for x in w]), "p99_ms": _median([x["p99_ms"] for x in w]),
                         "errors": sum(x["error_count"] for x in w),
                         "origin_requests": sum(r["origin_requests"] for r in ok)}
        out["hits"][label] = per
    for name in ("nfsplice", "nfsplice-nocache"):
        mine = [r for r in runs if r["part"] == "fill" and r["peer"] == name]
        ok = [r for r in mine if r["ok"]]
        g = [r["curl"]["gbps"] for r in ok]
        if mine:
            out["fill"][name] = {"runs": len(mine), "ok_runs": len(ok), "gbps": _median(g),
                                 "gbps_min": min(g, default=None), "gbps_max": max(g, default=None),
                                 "cpu_s_per_gib": _median([r["curl"]["cpu_s_per_gib"] for r in ok]),
                                 "stored": sum(1 for r in ok if r.get("stored")) if name == "nfsplice" else None,
                                 "committed_after_s": _median([r["committed_after_s"] for r in ok
                                                               if "committed_after_s" in r]),
                                 "process_cpu_s_per_gib": _median([r["process_cpu_s_per_gib"] for r in ok
                                                                   if "process_cpu_s_per_gib" in r])}
    c, n = out["fill"].get("nfsplice"), out["fill"].get("nfsplice-nocache")
    if c and n and c["gbps"] and n["gbps"]:
        out["fill_ratio"] = {"gbps": c["gbps"] / n["gbps"],
                             "cpu": (c["cpu_s_per_gib"] / n["cpu_s_per_gib"]) if n["cpu_s_per_gib"] else None,
                             "target_met": c["gbps"] / n["gbps"] >= 0.9}
    for name in s_meta["collapse_peers"]:
        mine = [r for r in runs if r["part"] == "collapse" and r["peer"] == name]
        ok = [r for r in mine if r["ok"]]
        # The time until the last client is done counts only in runs where every body arrived whole.
        full = [r for r in ok if r["verified"] == r["clients"]]
        t = [r["last_done_s"] for r in full]
        out["collapse"][name] = {
            "runs": len(mine), "ok_runs": len(ok), "complete_runs": len(full), "last_done_s": _median(t),
            "last_done_min": min(t, default=None), "last_done_max": max(t, default=None),
            "origin_copies": _median([r["origin_copies"] for r in ok]),
            "origin_copies_max": max((r["origin_copies"] for r in ok), default=None),
            "origin_requests": _median([r["origin_requests"] for r in ok]),
            "origin_bytes": _median([r["origin_bytes"] for r in ok]),
            "verified": sum(r["verified"] for r in ok), "clients": sum(r["clients"] for r in ok),
            "gbps_delivered": _median([r["clients"] * s_meta["big_bytes"] * 8 / 1e9 / r["last_done_s"]
                                       for r in full if r["last_done_s"]]),
            "one_copy": bool(ok) and all(r["origin_requests"] == 1 and r["origin_copies"] <= 1.001 for r in ok)}
    return out


# -- reporting --------------------------------------------------------------------------
def markdown(result: dict) -> str:
    m, meta, summ = result["machine"], result["meta"], result["summary"]
    bg = [r["background_cpus"] for r in result["runs"] if "background_cpus" in r]
    lines = [
        "# nfsplice cache benchmark", "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- kernel: {m['kernel']} (`uname -r`), nproc: {m['nproc']}, CPU: {m['cpu_model']}",
        f"- versions: {m['nginx']}; {m['varnish']}; {m['squid']}; {m['wrk']}; {m['curl']}; Python {m['python']}",
        f"- origin: nginx (NginxOrigin + /c/ with `Cache-Control: {CC}`) on {meta['origin']}; caches listen on "
        f"{meta['listen']} in the proxy namespace; clients in the client namespace; no CPU pinning (all share "
        f"the {m['nproc']} CPUs). Every peer starts with an empty cache for each part of each round; "
        f"{meta['rounds']} interleaved round(s), medians.",
        "- CPU = whole machine (all CPUs, /proc/stat busy ticks) from right before the client starts to right "
        "after it exits.",
        f"- other load right before the runs (CPUs busy, 0-{m['nproc']}): max {_fmt(max(bg, default=None), 2)}, "
        f"median {_fmt(_median(bg), 2)}", "",
    ]
    if summ["hits"]:
        lines += [f"## Hits (wrk -t{meta['threads']} -c{meta['connections']} -d{meta['duration_s']}s, "
                  "cache warmed by two fetches)", ""]
        for label, per in summ["hits"].items():
            lines += [f"**{label} objects**", "",
                      "| peer | req/s (min-max) | MB/s | CPU-ms/req | p50 ms | p99 ms | errors | origin requests "
                      "during wrk | ok runs |", "|---|---|---|---|---|---|---|---|---|"]
            for name, r in per.items():
                if not r["ok_runs"]:
                    lines.append(f"| {name} | failed | - | - | - | - | - | - | 0/{r['runs']} |")
                    continue
                lines.append(f"| {name} | {r['req_s']:.0f} ({r['req_s_min']:.0f}-{r['req_s_max']:.0f}) | "
                             f"{_fmt(r['mb_s'], 1)} | {_fmt(r['cpu_ms_per_req'], 3)} | {_fmt(r['p50_ms'], 2)} | "
                             f"{_fmt(r['p99_ms'], 2)} | {r['errors']} | {r['origin_requests']} | "
                             f"{r['ok_runs']}/{r['runs']} |")
            lines.append("")
    if summ["fill"]:
        lines += [f"## Fill: one {size_label(meta['big_bytes'])} cacheable miss (curl, one connection)", "",
                  "| peer | Gbit/s (min-max) | CPU-s/GiB | committed after s | nfsplice process CPU-s/GiB "
                  "(until committed) | stored (hit + sha256 afterwards) | ok runs |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in summ["fill"].items():
            if not r["ok_runs"]:
                lines.append(f"| {name} | failed | - | - | - | - | 0/{r['runs']} |")
                continue
            st = "-" if r["stored"] is None else f"{r['stored']}/{r['ok_runs']}"
            lines.append(f"| {name} | {r['gbps']:.2f} ({r['gbps_min']:.2f}-{r['gbps_max']:.2f}) | "
                         f"{_fmt(r['cpu_s_per_gib'], 2)} | {_fmt(r.get('committed_after_s'), 2)} | "
                         f"{_fmt(r.get('process_cpu_s_per_gib'), 2)} | {st} | {r['ok_runs']}/{r['runs']} |")
        fr = summ.get("fill_ratio")
        if fr:
            lines += ["", f"Cached / uncached: throughput {fr['gbps']:.2f}x, CPU per GiB {_fmt(fr['cpu'], 2)}x; "
                          f"target (the tap costs at most 10 % throughput): "
                          f"**{'met' if fr['target_met'] else 'missed'}**."]
        lines.append("")
    if summ["collapse"]:
        lines += [f"## Collapsed forwarding: {meta['clients']} clients, one cold {size_label(meta['big_bytes'])} "
                  "object at once", "",
                  "| peer | last client done s (min-max) | delivered Gbit/s | origin requests | origin copies "
                  "(max) | origin MiB | bodies verified | runs with every body verified |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in summ["collapse"].items():
            if not r["ok_runs"]:
                lines.append(f"| {name} | failed | - | - | - | - | - | 0/{r['runs']} |")
                continue
            done = "-" if r["last_done_s"] is None else \
                f"{r['last_done_s']:.2f} ({r['last_done_min']:.2f}-{r['last_done_max']:.2f})"
            lines.append(f"| {name} | {done} | "
                         f"{_fmt(r['gbps_delivered'], 2)} | {_fmt(r['origin_requests'], 0)} | "
                         f"{r['origin_copies']:.2f} ({r['origin_copies_max']:.2f}) | "
                         f"{r['origin_bytes'] / 2**20:.0f} | {r['verified']}/{r['clients']} | "
                         f"{r['complete_runs']}/{r['runs']} |")
        lines += ["", "origin copies = the origin's body bytes sent for the URL / object size (nginx access log, "
                      "$body_bytes_sent); delivered = clients x size / time until the last client is done; both "
                      "times only over the runs in which every client got the whole body (sha256)."]
        lines.append("")
    lines += ["Peers:", ""]
    lines += [f"- `{name}`: {PEERS[name].note}" for name in meta["all_peers"]]
    keep = ("http.spliced", "http.requests", "pairs.spliced", "fastpath.tap_records", "cache.")
    counted = [r for r in result["runs"] if r.get("nfsplice_counters") and r["part"] in ("fill", "collapse")]
    if counted:
        lines += ["", "nfsplice counters at the end of each fill and collapse run (selected; all in results.json):",
                  ""]
        for r in counted:
            shown = ", ".join(f"{k} {v}" for k, v in r["nfsplice_counters"].items() if k.startswith(keep))
            lines.append(f"- {r['part']} `{r['peer']}` round {r['round']}: {shown or '-'}")
    if summ["failures"]:
        lines += ["", "Failures:", ""] + [f"- {f}" for f in summ["failures"]]
    if result.get("interrupted"):
        lines += ["", "**Interrupted**: partial results."]
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ, meta, m = result["summary"], result["meta"], result["machine"]
    panels = []
    for label, per in summ["hits"].items():
        panels.append((f"hits {label}: requests/s", {n: r["req_s"] for n, r in per.items()}, "{:.0f}"))
        panels.append((f"hits {label}: CPU-ms per request", {n: r["cpu_ms_per_req"] for n, r in per.items()}, "{:.3f}"))
    if summ["fill"]:
        panels.append((f"fill {size_label(meta['big_bytes'])}: Gbit/s", {n: r["gbps"] for n, r in summ["fill"].items()},
                       "{:.2f}"))
        panels.append((f"fill {size_label(meta['big_bytes'])}: CPU-s/GiB",
                       {n: r["cpu_s_per_gib"] for n, r in summ["fill"].items()}, "{:.2f}"))
    if summ["collapse"]:
        panels.append((f"{meta['clients']} clients, one cold object: s until the last is done",
                       {n: r["last_done_s"] for n, r in summ["collapse"].items()}, "{:.2f}"))
        panels.append(("same: origin copies fetched", {n: r["origin_copies"] for n, r in summ["collapse"].items()},
                       "{:.2f}"))
    cols = 2
    rows = max(1, (len(panels) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.3 * rows), squeeze=False)
    names = list(dict.fromkeys(meta["all_peers"]))
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    for ax, (title, vals, fmt) in zip(axes.flat, panels):
        ks = list(vals)
        ax.bar(range(len(ks)), [vals[k] or 0 for k in ks], color=[colors.get(k, "grey") for k in ks])
        for i, k in enumerate(ks):
            ax.text(i, vals[k] or 0, "failed" if vals[k] is None else fmt.format(vals[k]), ha="center",
                    va="bottom", fontsize=8)
        ax.set_xticks(range(len(ks)), ks, rotation=15, ha="right")
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.15)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"nfsplice cache benchmark, {meta['rounds']} round(s), kernel {m['kernel']}, {m['nproc']} CPU",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown(result))
    chart(result, out / "bench.png")


# -- command line -----------------------------------------------------------------------
def _names(ap, text: str, what: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in PEERS or n == "nfsplice-nocache"]
    if bad:
        ap.error(f"unknown {what} peer(s) {', '.join(bad)}; known: nfsplice, nginx, varnish, squid")
    return names


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m netns_lab.bench_cache", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES),
                    help=f"object sizes for the hit runs (default {DEFAULT_SIZES})")
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--big", type=parse_size, default=256 << 20, help="fill and collapse object (default 256MiB)")
    ap.add_argument("--clients", type=int, default=20, help="parallel clients of the collapse part (default 20)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hit-peers", default=DEFAULT_PEERS)
    ap.add_argument("--collapse-peers", default=DEFAULT_PEERS)
    ap.add_argument("--parts", default=",".join(PARTS), help="any of hits,fill,collapse")
    ap.add_argument("--out", type=Path, default=REPO / "netns_lab" / "results-cache")
    ap.add_argument("--prefix", default="bc", help="lab namespace prefix (default bc)")
    ap.add_argument("--quiet-timeout", type=float, default=10.0)
    ap.add_argument("--quiet-cpus", type=float, default=0.15)
    a = ap.parse_args(argv)
    if min(a.rounds, a.duration, a.connections, a.threads, a.clients) < 1 or a.threads > a.connections:
        ap.error("--rounds, --duration, --connections, --threads, --clients must be >= 1, threads <= connections")
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    if not parts or any(p not in PARTS for p in parts):
        ap.error(f"--parts: any of {', '.join(PARTS)}")
    hit_names, col_names = _names(ap, a.hit_peers, "hit"), _names(ap, a.collapse_peers, "collapse")
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces)")
    s = Settings(sizes=a.sizes, duration=a.duration, connections=a.connections, threads=a.threads, big=a.big,
                 clients=a.clients, rounds=a.rounds, hit_peers=[PEERS[n] for n in hit_names],
                 collapse_peers=[PEERS[n] for n in col_names], parts=parts, prefix=a.prefix,
                 quiet_timeout=a.quiet_timeout, quiet_cpus=a.quiet_cpus)
    machine = machine_info()
    machine.update(wrk=_version("wrk", "-v"), curl=_version("curl", "--version"), varnish=_version("varnishd", "-V"),
                   squid=_version("squid", "-v"))
    all_peers = list(dict.fromkeys((hit_names if "hits" in parts else [])
                                   + (["nfsplice", "nfsplice-nocache"] if "fill" in parts else [])
                                   + (col_names if "collapse" in parts else [])))
    result = {"meta": {"command": " ".join(["python -m netns_lab.bench_cache"] + [shlex.quote(x) for x in argv]),
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "sizes_bytes": a.sizes, "sizes": [size_label(n) for n in a.sizes] if "hits" in parts else [],
                       "duration_s": a.duration, "connections": a.connections, "threads": a.threads,
                       "big_bytes": a.big, "clients": a.clients, "rounds": a.rounds, "parts": parts,
                       "hit_peers": hit_names if "hits" in parts else [],
                       "collapse_peers": col_names if "collapse" in parts else [], "all_peers": all_peers,
                       "listen": _hostport(LISTEN), "origin": _hostport(ORIGIN)},
              "machine": machine}

    runs: list[dict] = []
    interrupted = run_interruptible(s, "nfsplice-bench-cache-", run_benchmark, runs)
    if interrupted is None:
        return 1
    result["runs"] = runs
    result["summary"] = summarize(runs, result["meta"])
    result["interrupted"] = interrupted
    write_results(result, a.out)
    sys.stdout.write(markdown(result))
    s.log(f"written: {a.out}/results.json, results.md, bench.png")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
