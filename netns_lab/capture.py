"""Capture a spliced lab run for pcap replay, and (re)generate the golden replay cases.

    python -m netns_lab.capture --out DIR [--upload N] [--download N] [--mode M]
        [--count C] [--concurrency K] [--reset-at N] [--loss P] [--seed S]
    python -m netns_lab.capture --case NAME     # regenerate tests/replay/NAME (see CASES)
    python -m netns_lab.capture --case all

Needs root.  Builds a Lab (prefix "cap"), switches its veths to MSS-sized packets (no
64 KiB GSO bursts, so captures stay small), starts tcpdump in the proxy namespace on
all its interfaces (``-i any -y LINUX_SLL2``: the cooked header says whether a packet
arrived or left and on which kind of link), then `nfsplice tcp` with --pairs-log, a
traffic server in the origin namespace and a traffic client in the client namespace.
When the client is done and the engine has forgotten every pair, everything is stopped.

DIR gets capture.pcap (input.pcap for a case), pairs.json (the live engine's splice
records), expected.txt (one line per packet the proxy sent to the client or the origin,
taken from the capture's leaving copies, `nfsplice.replay.expected_lines`) and
README.md (what ran, with the exact command, the live engine's and the kernel's TCP
counters).  Finally the capture is replayed offline and the result compared with
expected.txt, so a case is known to pass when written.  A case is captured again until
it shows what it is for (CASES: e.g. payload retransmitted both ways for "loss").

Loss (--loss P) is injected in the client and origin namespaces only: a packet dropped
in the proxy namespace before the queue would be in the capture but never reach the
engine, which replay cannot know.  Packets dropped at the client or origin are still in
expected.txt: it lists what the proxy sent.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from netns_lab import traffic
from netns_lab.topology import Lab, ORIGIN_ADDR, PROXY_CLIENT_ADDR

REPO = Path(__file__).resolve().parent.parent
CASES_DIR = REPO / "tests" / "replay"
LISTEN = f"{PROXY_CLIENT_ADDR}:9000"
UPSTREAM = f"{ORIGIN_ADDR}:9001"
INSTANCE = "cap-capture"

# The golden cases: name -> (what it shows, traffic parameters, what a capture must show).
# A run is random (scheduling, the loss rule), so a case is captured again, up to RETRIES
# times, until `want` is met.  RACE is replay's note for a pair whose proxy handshake ACK
# to the origin is missing from the capture.  The engine used to drop that ACK when the
# splice won the race against it (the origin then rejected the forwarded segments'
# TSecr, Linux >= 6.15, until retransmissions); it now lets such a pre-freeze ACK out
# and floors translated TSecr values, so a capture showing it is a regression.
RACE = "handshake ACK to the origin is not in the capture"
RETRIES = 12


def _no_race(notes, lines):
    return None if not any(RACE in n for n in notes) else "the proxy's handshake ACK was dropped"


def _loss(notes, lines):
    if len(retransmitted_payload(lines)) < 2:
        return "no payload retransmission in both directions"
    return _no_race(notes, lines)


CASES = {
    "plain": ("one pair, 10 KB each way, client closes first",
              dict(upload=10240, download=10240, mode="client-first"), _no_race),
    "server-first": ("one pair, 10 KB each way; the origin half-closes first, the client "
                     "keeps uploading, then closes", dict(upload=10240, download=10240, mode="server-first"),
                     _no_race),
    "reset": ("one pair; the client resets the connection (RST) after 8 KiB of a 32 KiB "
              "download, while the origin is still sending",
              dict(upload=2048, download=32768, mode="reset", reset_at=8192), _no_race),
    "two-pairs": ("two concurrent pairs, 6 KB up and 8 KB down each",
                  dict(upload=6144, download=8192, count=2, concurrency=2), _no_race),
    "loss": ("one pair, 24 KB each way with 5% loss at the client and at the origin: "
             "retransmissions, SACK and duplicate ACKs pass through the splice",
             dict(upload=24576, download=24576, loss=5, seed=7), _loss),
}
# Kernel counters worth keeping next to a case (/proc/net/snmp Tcp, /proc/net/netstat TcpExt).
NETSTAT_KEYS = ("RetransSegs", "TCPLossProbes", "TCPSackRecovery", "TSEcrRejected", "PAWSEstab",
                "TCPChallengeACK", "TCPDSACKRecv")


def _wait_for(path: Path, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _engine_stats() -> dict:
    try:
        with open(f"/run/nfsplice/{INSTANCE}.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def tcp_counters(lab: Lab, ns: str) -> dict:
    """NETSTAT_KEYS of namespace NS that are not zero."""
    out = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        lines = lab.run(ns, "cat", path).stdout.decode().splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            for k, v in zip(names.split()[1:], values.split()[1:]):
                if k in NETSTAT_KEYS and v != "0":
                    out[k] = int(v)
    return out


def retransmitted_payload(lines: list[str]) -> dict[str, int]:
    """Per flow: payload segments in expected lines whose sequence number was sent before."""
    seen, out = set(), {}
    for line in lines:
        w = line.split()
        f = dict(x.split("=", 1) for x in w[2:] if "=" in x)
        if f.get("len", "0") == "0":
            continue
        if (w[0], f["seq"]) in seen:
            out[w[0]] = out.get(w[0], 0) + 1
        seen.add((w[0], f["seq"]))
    return out


def capture(out: Path, *, upload: int = 10240, download: int = 10240, mode: str = "client-first",
            count: int = 1, concurrency: int = 1, reset_at: int | None = None, loss: int = 0,
            seed: int = 1, pcap_name: str = "capture.pcap") -> dict:
    """Run the lab once and leave OUT/PCAP_NAME and OUT/pairs.json; return what happened
    (client summary, server problems, live engine counters, loss drops)."""
    out.mkdir(parents=True, exist_ok=True)
    pcap = out / pcap_name
    pairs = out / "pairs.json"
    for p in (pcap, pairs):
        if p.exists():
            p.unlink()
    tmp = Path(tempfile.mkdtemp(prefix="nfsplice-capture-"))
    stats = Path(f"/run/nfsplice/{INSTANCE}.json")
    if stats.exists():
        stats.unlink()        # a previous run's numbers must not end the wait below
    dump = proxy = None
    result: dict = {}
    dump_err = open(tmp / "tcpdump.err", "w+")
    log = open(tmp / "nfsplice.log", "w")
    try:
        with Lab("cap") as lab:
            lab.set_segmentation(True)
            # tcpdump writes as root (-Z root): it would otherwise drop to its own user.
            tmp_pcap = tmp / "capture.pcap"
            dump = lab.popen(lab.proxy, "tcpdump", "-i", "any", "-y", "LINUX_SLL2", "-U", "-s", "0", "-n",
                             "-Z", "root", "-w", str(tmp_pcap), "tcp",
                             stdout=subprocess.DEVNULL, stderr=dump_err)
            deadline = time.monotonic() + 10
            while "listening on" not in Path(tmp / "tcpdump.err").read_text():
                if dump.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tcpdump did not start: {Path(tmp / 'tcpdump.err').read_text()}")
                time.sleep(0.05)
            with traffic.ServerProcess(lab, lab.origin, ORIGIN_ADDR, 9001) as srv:
                ready = tmp / "ready"
                proxy = lab.popen(lab.proxy, sys.executable, "-m", "nfsplice", "tcp", "--listen", LISTEN,
                                  "--upstream", UPSTREAM, "--instance", INSTANCE, "--pairs-log", str(pairs),
                                  "--ready-file", str(ready), cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
                _wait_for(ready, proxy, "nfsplice tcp")
                if loss:
                    lab.set_loss(lab.client, loss)
                    lab.set_loss(lab.origin, loss)
                summary = traffic.run_client(LISTEN, upload=upload, download=download, mode=mode,
                                             reset_at=reset_at, seed=seed, count=count, concurrency=concurrency,
                                             tag_base=seed * 1000, timeout=30, netns=lab.client)
                result["client"] = {k: summary.get(k) for k in ("ok", "n_ok", "count", "bytes_up", "bytes_down")}
                result["problems"] = srv.check(summary)
                if loss:
                    result["loss_drops"] = {"client": lab.loss_drops(lab.client), "origin": lab.loss_drops(lab.origin)}
                # Let the engine forget the pairs (linger), so late packets are captured too.
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    st = _engine_stats()
                    if st.get("pairs.active", 1) == 0 and st.get("pairs.spliced", 0) >= count:
                        break
                    time.sleep(0.2)
                time.sleep(0.3)
                result["tcp"] = {ns: tcp_counters(lab, getattr(lab, ns)) for ns in ("client", "proxy", "origin")}
                _stop(proxy)
                log.flush()
                result["engine"] = _engine_stats()
                result["nfsplice_log"] = (tmp / "nfsplice.log").read_text()[-2000:]
            time.sleep(0.2)
            _stop(dump)
        shutil.copyfile(tmp_pcap, pcap)
    finally:
        _stop(proxy)
        _stop(dump)
        log.close()
        dump_err.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def write_case_files(out: Path, pcap_name: str, title: str, command: str, params: dict,
                     result: dict) -> tuple[list[str], list[str]]:
    """expected.txt and README.md next to the capture; return (replay notes, mismatches);
    no mismatch when the engine, replayed offline, sent what the live proxy sent."""
    from nfsplice import replay as R
    frames = R.read_pcap(out / pcap_name)
    records = R.read_pairs(str(out / "pairs.json"))
    ips = R.proxy_ips_of(records, LISTEN)
    expected = R.expected_lines(frames, ips)
    (out / "expected.txt").write_text(
        "# Packets the proxy sent to the client and to the origin, from the capture's leaving copies,\n"
        "# grouped by flow (order kept within a flow).  Per line: flow, flags, seq, ack, window,\n"
        "# TCP options, payload length, sha1 of the payload, pkt = sha1 of the packet with TTL and\n"
        "# both checksums zeroed.  Regenerate: python -m netns_lab.capture --case NAME (root).\n"
        + "".join(line + "\n" for line in expected))
    res = R.replay(frames, records)
    got = res.wire_lines()
    notes = list(res.notes)
    problems = []
    for i in range(max(len(got), len(expected))):
        e = expected[i] if i < len(expected) else "<none>"
        g = got[i] if i < len(got) else "<none>"
        if e != g:
            problems.append(f"line {i + 1}: expected {e}\n{'':>10}replayed {g}")
            if len(problems) > 10:
                break
    eng = result.get("engine", {})
    keys = ("pairs.spliced", "pairs.done.closed", "pairs.done.reset", "packets.c2s", "packets.s2c",
            "bytes.c2s", "bytes.s2c", "held", "released", "injected.ack", "dropped.proxy_socket")
    sent = R.sent_by_proxy(frames, ips)
    readme = [f"# {out.name}", "", title + ".", "",
              "Generated (as root, from the repository root) with:", "", f"    {command}", "",
              f"Traffic: {json.dumps(params, sort_keys=True)}.  Lab: netns_lab.topology.Lab(\"cap\") with "
              "MSS-sized segmentation; `nfsplice tcp --listen " + LISTEN + " --upstream " + UPSTREAM + "`.",
              "",
              f"- `{pcap_name}`: the whole capture (`tcpdump -i any -y LINUX_SLL2 -s 0 tcp` in the proxy "
              f"namespace), {len(frames)} packets: arriving packets, the proxy's own, the forwarded "
              "copies and the loopback injected ACKs.  Replay feeds the arriving and the proxy's own, "
              "ignores the rest (nfsplice/replay.py).",
              "- `pairs.json`: the live engine's splice records (`--pairs-log`).",
              f"- `expected.txt`: the {len(sent)} packets the proxy sent to the client and the origin.",
              "",
              f"Client: {json.dumps(result.get('client'))}; server problems: {result.get('problems') or 'none'}.",
              ]
    if "loss_drops" in result:
        readme.append(f"Loss drops: {json.dumps(result['loss_drops'])}; payload retransmissions by flow: "
                      f"{json.dumps(retransmitted_payload(expected))}.")
    readme += ["Live engine: " + ", ".join(f"{k}={eng.get(k, 0)}" for k in keys) + ".",
               f"TCP counters (not zero): {json.dumps(result.get('tcp', {}), sort_keys=True)}.",
               f"Kernel {platform.release()}.",
               f"Offline replay at generation: {'matches expected.txt' if not problems else 'MISMATCH'}"
               + (f"; notes: {'; '.join(notes)}" if notes else "") + ".", ""]
    (out / "README.md").write_text("\n".join(readme))
    return notes, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m netns_lab.capture", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="directory for capture.pcap, pairs.json, expected.txt, README.md")
    p.add_argument("--case", help=f"regenerate tests/replay/CASE ({', '.join(CASES)}, or all)")
    p.add_argument("--upload", type=traffic._size, default=10240)
    p.add_argument("--download", type=traffic._size, default=10240)
    p.add_argument("--mode", choices=traffic.MODES, default="client-first")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--reset-at", type=traffic._size)
    p.add_argument("--loss", type=int, default=0, help="percent of TCP packets dropped at client and origin")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("capture needs root (network namespaces, iptables, NFQUEUE, tcpdump)", file=sys.stderr)
        return 2
    if bool(a.out) == bool(a.case):
        p.error("give exactly one of --out DIR and --case NAME")
    jobs = []
    if a.case:
        names = list(CASES) if a.case == "all" else [a.case]
        for name in names:
            if name not in CASES:
                p.error(f"unknown case {name!r}; cases: {', '.join(CASES)}")
            title, params, want = CASES[name]
            jobs.append((CASES_DIR / name, "input.pcap", title, f"python -m netns_lab.capture --case {name}",
                         params, want))
    else:
        params = {"upload": a.upload, "download": a.download, "mode": a.mode, "count": a.count,
                  "concurrency": a.concurrency, "reset_at": a.reset_at, "loss": a.loss, "seed": a.seed}
        params = {k: v for k, v in params.items() if v is not None}
        cmd = "python -m netns_lab.capture " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
        jobs.append((Path(a.out), "capture.pcap", "a lab capture", cmd, params, None))
    rc = 0
    for out, pcap_name, title, cmd, params, want in jobs:
        for attempt in range(1, RETRIES + 1):
            result = capture(out, pcap_name=pcap_name, **params)
            notes, problems = write_case_files(out, pcap_name, title, cmd, params, result)
            lines = [x for x in (out / "expected.txt").read_text().splitlines() if not x.startswith("#")]
            why = want(notes, lines) if want else None
            if why is None:
                break
            print(f"{out}: attempt {attempt}: {why}; capturing again")
        else:
            print(f"{out}: gave up after {RETRIES} attempts: the case does not show what it should")
            rc = 1
        size = (out / pcap_name).stat().st_size
        status = "replay matches" if not problems else "REPLAY MISMATCH"
        print(f"{out}: {pcap_name} {size} bytes, client ok={result['client']['ok']}, {status}")
        if not result["client"]["ok"] or result["problems"]:
            print(f"  traffic problems: {result['problems']}\n  {result.get('nfsplice_log', '')}")
            rc = 1
        for n in notes:
            print("  note: " + n)
        for pr in problems:
            print("  " + pr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
