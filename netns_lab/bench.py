"""Benchmark of L4 forwarding paths in the lab: throughput, CPU and round-trip time.

    python -m netns_lab.bench [--size 1GiB] [--rounds 3] [--rtt-count 2000]
        [--peers routing,splice,asyncio,haproxy,nginx,nfsplice-fast,nfsplice-fasttap,nfsplice-netlink,nfsplice-nfq]
        [--peer-cmd NAME='ARGV with {python} {listen} {upstream} {ready_file} {dir}']
        [--out netns_lab/results] [--prefix bench]

Every peer but `routing` is a listener in the proxy namespace on 198.18.1.1:9000 that
forwards to the origin 198.18.2.2:9001; for `routing` the client connects straight to
the origin and the proxy namespace only forwards IP packets (the physical limit).  Peers
are data (`PEERS`): a command line with placeholders, optionally a config template;
`--peer-cmd` adds one from the command line.  A peer whose command line has
{ready_file} is ready when that file exists, any other when 198.18.1.1:9000 listens in
the proxy namespace.  A peer that does not start (or dies) is reported as failed with
the tail of its stderr, and the benchmark goes on with the others.

Per round (the order of the peers rotated by one each round): start the peer, one bulk
download of --size bytes origin -> client, one RTT run of --rtt-count 64-byte ping-pongs
client -> origin, stop the peer (SIGTERM to its process group, SIGKILL after 5 s).
What is measured and how: see netns_lab/peers/bench_tools.py.  Reported per peer: the
medians over its rounds of Gbit/s, CPU-s/GiB (whole machine), RTT p50/p99/max in
microseconds, and the added RTT against routing's medians.  Written to --out:
results.json (every run, the summary, the machine), results.md, bench.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from netns_lab.peers.bench_tools import CLK_TCK, cpu_busy_ticks
from netns_lab.topology import ORIGIN_ADDR, PROXY_CLIENT_ADDR, Lab

REPO = Path(__file__).resolve().parent.parent
PEER_DIR = Path(__file__).resolve().parent / "peers"
LISTEN = (PROXY_CLIENT_ADDR, 9000)
ORIGIN = (ORIGIN_ADDR, 9001)
DEFAULT_PEERS = "routing,splice,asyncio,haproxy,nginx,nfsplice-fast,nfsplice-fasttap,nfsplice-netlink,nfsplice-nfq"
START_TIMEOUT = 15.0        # s for a peer to become ready
STOP_TIMEOUT = 5.0          # s between SIGTERM and SIGKILL


# -- peers as data ----------------------------------------------------------------------
@dataclass(frozen=True)
class Peer:
    """How to run one forwarding path.

    argv: the command run in the proxy namespace, with {python} {listen} {upstream}
    {ready_file} {dir} filled in; None means no process (plain routing).
    config: (template in netns_lab/peers/, file name in {dir}, extra template values);
    the template also gets ${listen} ${upstream} ${dir}."""
    name: str
    argv: tuple[str, ...] | None
    config: tuple[str, str, dict] | None = None
    note: str = ""

    @property
    def target(self) -> tuple[str, int]:
        return ORIGIN if self.argv is None else LISTEN

    @property
    def uses_ready_file(self) -> bool:
        return self.argv is not None and any("{ready_file}" in a for a in self.argv)


def _nfsplice(backend: str, fast: bool = False, tap: bool = False) -> Peer:
    name = ("nfsplice-fasttap" if tap else "nfsplice-fast") if fast else \
        f"nfsplice-{'nfq' if backend == 'netfilterqueue' else backend}"
    argv = ("{python}", "-m", "nfsplice", "tcp", "--listen", "{listen}", "--upstream", "{upstream}",
            "--backend", backend, "--ready-file", "{ready_file}", "--fastpath", "on" if fast else "off")
    if tap:
        argv += ("--tap-dir", "{dir}/tap")
    note = f"NFQUEUE engine only, {backend} backend"
    if fast:
        note = "NFQUEUE engine + tc-BPF fast path" + (", TCP Tap on (both directions to files)" if tap else "")
    return Peer(name, argv, note=note)


_PY = "{python}"
PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("routing", None, note="client -> origin directly, IP forwarding in the proxy ns"),
    Peer("splice", (_PY, "-m", "netns_lab.peers.splice_proxy", "--listen", "{listen}", "--upstream", "{upstream}"),
         note="Python, os.splice through a 1 MiB pipe, a thread per direction"),
    Peer("asyncio", (_PY, "-m", "netns_lab.peers.asyncio_proxy", "--listen", "{listen}", "--upstream", "{upstream}"),
         note="Python asyncio streams, 256 KiB reads"),
    Peer("haproxy", ("haproxy", "-db", "-f", "{dir}/haproxy.cfg"),
         config=("haproxy.cfg.tmpl", "haproxy.cfg", {"nbthread": "2", "backend_options": ""}),
         note="mode tcp, nbthread 2, no splice"),
    Peer("haproxy-splice", ("haproxy", "-db", "-f", "{dir}/haproxy.cfg"),
         config=("haproxy.cfg.tmpl", "haproxy.cfg", {"nbthread": "2", "backend_options": "    option splice-request\n    option splice-response\n"}),
         note="mode tcp, nbthread 2, option splice-request + splice-response"),
    Peer("nginx", ("nginx", "-p", "{dir}", "-c", "{dir}/nginx.conf", "-e", "stderr"),
         config=("nginx.conf.tmpl", "nginx.conf", {"workers": "auto"}),
         note="stream proxy_pass, worker_processes auto"),
    _nfsplice("netlink", fast=True),
    _nfsplice("netlink", fast=True, tap=True),
    _nfsplice("netlink"),
    _nfsplice("netfilterqueue"),
)}


class PeerFailed(Exception):
    """The peer did not start, or died; the message carries its stderr tail."""


def _hostport(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def tail(path: Path, limit: int = 1500) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace").strip()


def is_listening(pid: int, addr: tuple[str, int]) -> bool:
    """Whether ADDR (or the wildcard on its port) listens in PID's network namespace.

    /proc/PID/net/tcp shows the table of the namespace PID lives in, so no process has
    to be started and no probe connection reaches the origin."""
    want_ip = "%08X" % int.from_bytes(socket.inet_aton(addr[0]), sys.byteorder)
    port = "%04X" % addr[1]
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        f = line.split()
        local, state = f[1], f[3]
        ip, _, p = local.partition(":")
        if state == "0A" and p == port and ip in (want_ip, "00000000"):
            return True
    return False


class Running:
    """A peer process in the proxy namespace: started, waited for, always stopped."""

    def __init__(self, lab: Lab, ns: str, name: str, argv: list[str], workdir: Path,
                 ready_file: Path | None, listen: tuple[str, int]):
        self.lab, self.ns, self.name, self.argv = lab, ns, name, argv
        self.workdir, self.ready_file, self.listen = workdir, ready_file, listen
        self.stdout_path, self.stderr_path = workdir / "stdout.log", workdir / "stderr.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            try:
                self.proc = self.lab.popen(self.ns, *self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=err, cwd=REPO, env=env, start_new_session=True)
            except OSError as e:
                raise PeerFailed(f"{self.name}: cannot start {self.argv[0]}: {e}") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerFailed(f"{self.name} exited with {self.proc.returncode} before it was ready: "
                                 f"{self.stderr_tail() or '(no stderr)'}")
            ready = (self.ready_file.exists() if self.ready_file is not None
                     else is_listening(self.proc.pid, self.listen))
            if ready:
                return
            time.sleep(0.02)
        raise PeerFailed(f"{self.name} not ready after {timeout:g} s "
                         f"({'no ' + self.ready_file.name if self.ready_file else 'not listening'}): "
                         f"{self.stderr_tail() or '(no stderr)'}")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise PeerFailed(f"{self.name} died with {self.proc.returncode}: {self.stderr_tail() or '(no stderr)'}")

    def stop(self) -> int | None:
        """SIGTERM the process group, SIGKILL it after STOP_TIMEOUT; return the exit code."""
        p = self.proc
        if p is None:
            return None
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children that left the group are still inside the namespace; Lab cleanup reaps them.
        return p.returncode

    def stderr_tail(self) -> str:
        return tail(self.stderr_path)


def start_peer(lab: Lab, peer: Peer, workdir: Path) -> Running | None:
    if peer.argv is None:
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    ready_file = workdir / "ready" if peer.uses_ready_file else None
    values = {"python": sys.executable, "listen": _hostport(LISTEN), "upstream": _hostport(ORIGIN),
              "ready_file": str(ready_file or ""), "dir": str(workdir)}
    if peer.config is not None:
        template, fname, extra = peer.config
        text = string.Template((PEER_DIR / template).read_text()).substitute({**values, **extra})
        (workdir / fname).write_text(text)
    argv = [a.format(**values) for a in peer.argv]
    run = Running(lab, lab.proxy, peer.name, argv, workdir, ready_file, LISTEN)
    try:
        run.start()
    except BaseException:
        run.stop()
        raise
    return run


# -- clients ----------------------------------------------------------------------------
class RunFailed(Exception):
    pass


def run_tool(lab: Lab, ns: str, args: list[str], timeout: float) -> dict:
    argv = [sys.executable, "-m", "netns_lab.peers.bench_tools", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        p = lab.run(ns, *argv, check=False, timeout=timeout, cwd=REPO, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RunFailed(f"{args[0]} timed out after {timeout:g} s") from None
    if p.returncode != 0:
        raise RunFailed(p.stderr.decode(errors="replace").strip()[-1500:] or f"{args[0]} exited {p.returncode}")
    return json.loads(p.stdout)


def bulk(lab: Lab, target: tuple[str, int], size: int, sha256: bool = False) -> dict:
    # A stall fails after the client's idle timeout; the whole run may take down to 0.1 Gbit/s.
    args = ["bulk", "--connect", _hostport(target), "--size", str(size)] + (["--sha256"] if sha256 else [])
    return run_tool(lab, lab.client, args, timeout=30 + size / 12.5e6)


def rtt(lab: Lab, target: tuple[str, int], count: int, warmup: int) -> dict:
    args = ["rtt", "--connect", _hostport(target), "--count", str(count), "--warmup", str(warmup)]
    return run_tool(lab, lab.client, args, timeout=30 + (count + warmup) * 0.01)


class Origin:
    """The origin server in the origin namespace, for the whole benchmark."""

    def __init__(self, lab: Lab, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "netns_lab.peers.bench_tools", "origin", "--listen", _hostport(ORIGIN)]
        self.run = Running(lab, lab.origin, "origin", argv, workdir, None, ORIGIN)

    def __enter__(self) -> "Origin":
        try:
            self.run.start()
        except BaseException:
            self.run.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.run.stop()


# -- the benchmark ----------------------------------------------------------------------
@dataclass
class Settings:
    size: int
    rounds: int
    rtt_count: int
    rtt_warmup: int
    peers: list[Peer]
    prefix: str
    quiet_timeout: float = 20.0
    quiet_cpus: float = 0.15
    log: callable = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))


def background_cpus(interval: float = 0.3) -> float:
    """CPUs busy over INTERVAL (whole machine, 0..nproc), while nothing of ours runs."""
    t0 = cpu_busy_ticks()
    time.sleep(interval)
    return (cpu_busy_ticks() - t0) / CLK_TCK / interval


def wait_quiet(limit: float, timeout: float) -> float:
    """Wait up to TIMEOUT s for the machine's other load to fall below LIMIT CPUs.

    The CPU figure is the whole machine's, so anything else running (another lab, a
    build) adds to it and takes CPU from the forwarding path; the last sample is
    recorded with each run."""
    deadline = time.monotonic() + timeout
    while True:
        busy = background_cpus()
        if busy < limit or time.monotonic() >= deadline:
            return busy


def round_order(peers: list, rnd: int) -> list:
    """The peers of round RND (0-based): rotated by RND, so no peer always goes first."""
    k = rnd % len(peers) if peers else 0
    return peers[k:] + peers[:k]


def measure_one(lab: Lab, peer: Peer, s: Settings, workdir: Path) -> dict:
    """Start PEER, run the bulk transfer and the RTT run through it, stop it."""
    rec: dict = {"peer": peer.name, "ok": False}
    running = None
    try:
        running = start_peer(lab, peer, workdir)
        rec["background_cpus"] = wait_quiet(s.quiet_cpus, s.quiet_timeout)
        rec["bulk"] = bulk(lab, peer.target, s.size)
        if running:
            running.check_alive()
        rec["rtt"] = rtt(lab, peer.target, s.rtt_count, s.rtt_warmup)
        if running:
            running.check_alive()
        rec["ok"] = True
    except (PeerFailed, RunFailed) as e:
        msg = str(e)
        if running is not None and isinstance(e, RunFailed) and running.stderr_tail():
            msg += f" | peer stderr: {running.stderr_tail()[-600:]}"
        rec["error"] = msg
    finally:
        if running is not None:
            rec["exit_code"] = running.stop()
    return rec


def run_benchmark(s: Settings, tmp: Path, runs: list[dict]) -> list[dict]:
    """Run every round; records are appended to RUNS as they finish (kept if interrupted)."""
    with Lab(s.prefix) as lab, Origin(lab, tmp / "origin"):
        for rnd in range(s.rounds):
            for peer in round_order(s.peers, rnd):
                t0 = time.monotonic()
                rec = measure_one(lab, peer, s, tmp / f"r{rnd + 1}-{peer.name}")
                rec["round"] = rnd + 1
                runs.append(rec)
                if rec["ok"]:
                    b, r = rec["bulk"], rec["rtt"]
                    s.log(f"round {rnd + 1} {peer.name:17s} {b['gbps']:6.2f} Gbit/s {b['cpu_s_per_gib']:5.2f} CPU-s/GiB"
                          f"  rtt p50 {r['p50_us']:6.1f} p99 {r['p99_us']:7.1f} us  background {rec['background_cpus']:.2f} CPU"
                          f"  ({time.monotonic() - t0:.1f} s)")
                else:
                    s.log(f"round {rnd + 1} {peer.name:17s} FAILED: {rec['error']}")
                time.sleep(0.2)      # let the previous peer's connections drain
    return runs


def _median(values: list) -> float | None:
    """Median of the values that are there (a failed run gives None)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict], peers: list[Peer]) -> dict:
    out: dict = {}
    for peer in peers:
        mine = [r for r in runs if r["peer"] == peer.name]
        ok = [r for r in mine if r["ok"]]
        gbps = [r["bulk"]["gbps"] for r in ok]
        out[peer.name] = {
            "note": peer.note,
            "runs": len(mine), "ok_runs": len(ok),
            "gbps": _median(gbps), "gbps_min": min(gbps, default=None), "gbps_max": max(gbps, default=None),
            "cpu_s_per_gib": _median([r["bulk"]["cpu_s_per_gib"] for r in ok]),
            "rtt_p50_us": _median([r["rtt"]["p50_us"] for r in ok]),
            "rtt_p99_us": _median([r["rtt"]["p99_us"] for r in ok]),
            "rtt_max_us": _median([r["rtt"]["max_us"] for r in ok]),
            "background_cpus_max": max((r["background_cpus"] for r in ok if "background_cpus" in r), default=None),
            "errors": [f"round {r['round']}: {r['error']}" for r in mine if not r["ok"]],
        }
    base = out.get("routing")
    for rec in out.values():
        for q in ("p50", "p99"):
            mine, ref = rec[f"rtt_{q}_us"], base and base[f"rtt_{q}_us"]
            rec[f"added_rtt_{q}_us"] = mine - ref if mine is not None and ref is not None else None
    return out


# -- reporting --------------------------------------------------------------------------
def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(*argv: str) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "not installed"
        text = (p.stdout + p.stderr).decode(errors="replace").strip().splitlines()
        return text[0] if text else ""

    return {"kernel": os.uname().release, "nproc": len(os.sched_getaffinity(0)), "cpu_model": model,
            "python": sys.version.split()[0], "haproxy": version("haproxy", "-v"), "nginx": version("nginx", "-v"),
            "clk_tck": os.sysconf("SC_CLK_TCK")}


def _fmt(v: float | None, digits: int = 1, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def markdown(result: dict) -> str:
    m, meta = result["machine"], result["meta"]
    lines = [
        "# nfsplice benchmark", "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- kernel: {m['kernel']} (`uname -r`), nproc: {m['nproc']}, CPU: {m['cpu_model']}",
        f"- {meta['size_bytes'] / 2**20:g} MiB bulk download origin -> client per run, {meta['rounds']} round(s), "
        f"RTT: {meta['rtt_count']} x 64 B ping-pong after {meta['rtt_warmup']} warm-up; medians over rounds",
        "- CPU = whole machine (all CPUs, /proc/stat busy ticks) during the bulk transfer; "
        "Gbit/s from the client's first to last byte",
        f"- {m['haproxy']}; {m['nginx']}; Python {m['python']}",
        f"- other load on the machine right before the runs (CPUs busy, 0-{m['nproc']}): "
        f"max {_fmt(max((r.get('background_cpus', 0) for r in result['runs']), default=None), 2)}, "
        f"median {_fmt(_median([r['background_cpus'] for r in result['runs'] if 'background_cpus' in r]), 2)}", "",
        "| peer | Gbit/s (min-max) | CPU-s/GiB | RTT p50 us | RTT p99 us | RTT max us | added p50 us | added p99 us | ok runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["summary"].items():
        if r["ok_runs"] == 0:
            lines.append(f"| {name} | failed | - | - | - | - | - | - | 0/{r['runs']} |")
            continue
        lines.append(
            f"| {name} | {_fmt(r['gbps'], 2)} ({_fmt(r['gbps_min'], 2)}-{_fmt(r['gbps_max'], 2)}) | "
            f"{_fmt(r['cpu_s_per_gib'], 2)} | {_fmt(r['rtt_p50_us'])} | {_fmt(r['rtt_p99_us'])} | "
            f"{_fmt(r['rtt_max_us'], 0)} | {_fmt(r['added_rtt_p50_us'], signed=True)} | "
            f"{_fmt(r['added_rtt_p99_us'], signed=True)} | {r['ok_runs']}/{r['runs']} |")
    lines += ["", "Peers:", ""]
    lines += [f"- `{name}`: {r['note']}" for name, r in result["summary"].items()]
    errors = [(name, e) for name, r in result["summary"].items() for e in r["errors"]]
    if errors:
        lines += ["", "Failures:", ""]
        lines += [f"- `{name}` {e}" for name, e in errors]
    if result.get("interrupted"):
        lines += ["", "**Interrupted**: partial results."]
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["summary"])
    rows = [result["summary"][n] for n in names]
    x = list(range(len(names)))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(max(12, 1.8 * len(names) + 3), 5))

    def bars(ax, key, title, color, err=False):
        vals = [r[key] or 0 for r in rows]
        yerr = None
        if err:
            yerr = [[max(0, (r[key] or 0) - (r["gbps_min"] or 0)) for r in rows],
                    [max(0, (r["gbps_max"] or 0) - (r[key] or 0)) for r in rows]]
        ax.bar(x, vals, color=color, yerr=yerr, capsize=3)
        for i, r in enumerate(rows):
            label = "failed" if r["ok_runs"] == 0 else f"{r[key]:.2f}"
            ax.text(i, vals[i], label, ha="center", va="bottom", fontsize=8)
        ax.set_title(title)
        ax.set_xticks(x, names, rotation=30, ha="right")

    bars(ax1, "gbps", "Throughput, 1 flow (Gbit/s)", "tab:blue", err=True)
    if "routing" in result["summary"] and result["summary"]["routing"]["gbps"]:
        ax1.axhline(result["summary"]["routing"]["gbps"], ls="--", color="grey", lw=1)
    bars(ax2, "cpu_s_per_gib", "CPU-s per GiB (whole machine)", "tab:orange")
    w = 0.38
    p50 = [r["rtt_p50_us"] or 0 for r in rows]
    p99 = [r["rtt_p99_us"] or 0 for r in rows]
    ax3.bar([i - w / 2 for i in x], p50, w, label="p50", color="tab:green")
    ax3.bar([i + w / 2 for i in x], p99, w, label="p99", color="tab:red")
    ax3.set_title("RTT, 64 B ping-pong (us)")
    ax3.set_xticks(x, names, rotation=30, ha="right")
    ax3.legend()
    meta, m = result["meta"], result["machine"]
    fig.suptitle(f"nfsplice lab, {meta['size_bytes'] / 2**20:g} MiB x {meta['rounds']} rounds, "
                 f"kernel {m['kernel']}, {m['nproc']} CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_interruptible(s, tmp_prefix: str, run_benchmark, runs: list) -> bool | None:
    """RUN_BENCHMARK(s, workdir, runs) in a temporary directory, SIGTERM and Ctrl-C
    ending it early (the lab is cleaned up, RUNS keeps what was measured).  True when
    interrupted, False when done, None when it failed (the lab or the origin did not
    come up; said in the log)."""
    def on_term(*_):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, on_term)
    try:
        with tempfile.TemporaryDirectory(prefix=tmp_prefix) as tmp:
            try:
                run_benchmark(s, Path(tmp), runs)
            except KeyboardInterrupt:
                s.log("interrupted: lab cleaned up, writing partial results")
                return True
            except (PeerFailed, RuntimeError) as e:    # the lab or the origin did not come up
                s.log(f"benchmark failed: {e}")
                return None
    finally:
        signal.signal(signal.SIGTERM, old)
    return False


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown(result))
    chart(result, out / "bench.png")


# -- command line -----------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit not in _UNITS or not num:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 1GiB, 64MiB, 1000000")
    n = int(float(num) * _UNITS[unit])
    if n <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return n


def parse_peer_cmd(text: str) -> Peer:
    name, sep, cmd = text.partition("=")
    if not sep or not name or not cmd.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=COMMAND, got {text!r}")
    return Peer(name, tuple(shlex.split(cmd)), note=f"--peer-cmd: {cmd}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m netns_lab.bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="known peers: " + ", ".join(PEERS))
    ap.add_argument("--size", type=parse_size, default=2**30, help="bulk bytes per run (default 1GiB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rtt-count", type=int, default=2000)
    ap.add_argument("--rtt-warmup", type=int, default=200)
    ap.add_argument("--peers", default=DEFAULT_PEERS, help=f"comma-separated (default {DEFAULT_PEERS})")
    ap.add_argument("--peer-cmd", type=parse_peer_cmd, action="append", default=[],
                    help="NAME='ARGV' an extra peer; placeholders {python} {listen} {upstream} {ready_file} {dir}")
    ap.add_argument("--out", type=Path, default=REPO / "netns_lab" / "results")
    ap.add_argument("--prefix", default="bench", help="lab namespace prefix (default bench)")
    ap.add_argument("--quiet-timeout", type=float, default=20.0,
                    help="before each run wait up to this long (s) for other load to fall below --quiet-cpus")
    ap.add_argument("--quiet-cpus", type=float, default=0.15, help="CPUs of other load that count as quiet")
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.rtt_count < 1:
        ap.error("--rounds and --rtt-count must be at least 1")

    known = dict(PEERS)
    known.update({p.name: p for p in a.peer_cmd})
    names = [n.strip() for n in a.peers.split(",") if n.strip()]
    names += [p.name for p in a.peer_cmd if p.name not in names]
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces)")

    s = Settings(size=a.size, rounds=a.rounds, rtt_count=a.rtt_count, rtt_warmup=a.rtt_warmup,
                 peers=[known[n] for n in names], prefix=a.prefix,
                 quiet_timeout=a.quiet_timeout, quiet_cpus=a.quiet_cpus)
    result = {
        "meta": {"command": " ".join(["python -m netns_lab.bench"] + [shlex.quote(x) for x in argv]),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "size_bytes": a.size, "rounds": a.rounds, "rtt_count": a.rtt_count, "rtt_warmup": a.rtt_warmup,
                 "peers": names, "listen": _hostport(LISTEN), "origin": _hostport(ORIGIN)},
        "machine": machine_info(),
    }

    runs: list[dict] = []
    interrupted = run_interruptible(s, "nfsplice-bench-", run_benchmark, runs)
    if interrupted is None:
        return 1
    result["runs"] = runs
    result["summary"] = summarize(runs, s.peers)
    result["interrupted"] = interrupted
    write_results(result, a.out)
    sys.stdout.write(markdown(result))
    s.log(f"written: {a.out}/results.json, results.md, bench.png")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
