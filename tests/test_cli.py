"""The command line and the launcher: option errors, probe, rules installed and always
removed (SIGTERM, SIGINT, SIGKILL + cleanup), stats, queue conflicts, sysctls.

Root tests build the lab "cli" (namespaces cli-client/-proxy/-origin) and remove it,
also on failure.  Every nfsplice instance runs in cli-proxy, so its rules live in that
namespace's raw table only.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netns_lab.topology import ORIGIN_ADDR, PROXY_CLIENT_ADDR, Lab
from nfsplice import rules

REPO = Path(__file__).resolve().parent.parent
LAUNCH = str(REPO / "nfsplice-launch")
PY = str(REPO / ".venv" / "bin" / "python")
STATS_DIR = Path("/run/nfsplice")
UPSTREAM = f"{ORIGIN_ADDR}:9001"


# -- without root -----------------------------------------------------------------------
def test_parser_knows_every_command():
    from nfsplice.cli import build_parser
    p = build_parser()
    for argv in (["probe"], ["stats"], ["cleanup", "--all"], ["tcp", "--listen", "a", "--upstream", "b"]):
        assert p.parse_args(argv).command == argv[0]


def test_launcher_is_executable_bash():
    assert os.access(LAUNCH, os.X_OK)
    assert subprocess.run(["bash", "-n", LAUNCH]).returncode == 0


# -- helpers ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab():
    with Lab("cli") as lab:
        yield lab


ECHO = r"""
import socket, sys, threading
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2]))); ls.listen(16)
print("ready", flush=True)
def echo(c):
    while data := c.recv(65536):
        c.sendall(data)
    c.close()
while True:
    threading.Thread(target=echo, args=(ls.accept()[0],), daemon=True).start()
"""

CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
msg = b"spliced by nfsplice " * 1000
c.sendall(msg); c.shutdown(socket.SHUT_WR)
got = b""
while data := c.recv(65536):
    got += data
assert got == msg, (len(got), len(msg))
print("ok")
"""


@pytest.fixture(scope="module")
def origin(lab):
    host, port = UPSTREAM.split(":")
    p = lab.popen(lab.origin, sys.executable, "-c", ECHO, host, port, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    yield
    p.kill()
    p.wait()


def raw_rules(lab: Lab) -> str:
    return lab.run(lab.proxy, "iptables-save", "-t", "raw").stdout.decode()


def nfsplice_lines(lab: Lab) -> list[str]:
    """nfsplice's iptables rules and fast path tc filters left in the proxy namespace."""
    lines = [l for l in raw_rules(lab).splitlines() if "NFSPLICE" in l]
    for dev in (f"{lab.prefix}-p0", f"{lab.prefix}-p1"):
        out = lab.run(lab.proxy, "tc", "filter", "show", "dev", dev, "ingress", check=False).stdout.decode()
        lines += [f"{dev}: {l}" for l in out.splitlines() if "nfsplice_fast" in l]
    return lines


def chains_of(lab: Lab, instance: str) -> list[str]:
    chain = rules.instance_chain(instance)
    return [l for l in raw_rules(lab).splitlines() if chain in l]


class Instance:
    """One `nfsplice tcp` in the proxy namespace, through the launcher or directly."""

    def __init__(self, lab: Lab, tmp: Path, name: str, port: int, *extra: str, queue: int = 0,
                 launcher: bool = True):
        self.lab, self.name = lab, name
        self.ready = tmp / f"{name}.ready"
        self.out = open(tmp / f"{name}.out", "w+")
        self.err = open(tmp / f"{name}.err", "w+")
        stats = STATS_DIR / f"{name}.json"
        if stats.exists():
            stats.unlink()
        head = [LAUNCH] if launcher else [PY, "-m", "nfsplice"]
        self.argv = [*head, "tcp", "--listen", f"{PROXY_CLIENT_ADDR}:{port}", "--upstream", UPSTREAM,
                     "--instance", name, "--queue", str(queue), "--ready-file", str(self.ready), *extra]
        self.proc = lab.popen(lab.proxy, *self.argv, stdout=self.out, stderr=self.err, cwd=REPO)

    def wait_ready(self, timeout: float = 20) -> int:
        """The pid of the python process (written to the ready file)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.ready.exists() and self.ready.read_text().strip():
                return int(self.ready.read_text().split()[0])
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready (exit {self.proc.poll()}): {self.stderr()}")

    def wait(self, timeout: float = 20) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout}s: {self.stderr()}") from None

    def stderr(self) -> str:
        self.err.flush()
        return (self.err.name and Path(self.err.name).read_text())[-3000:]

    def stdout(self) -> str:
        self.out.flush()
        return Path(self.out.name).read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def instances(lab):
    """Instances started by a test; killed (and their rules removed) after it."""
    started: list[Instance] = []
    yield started
    for inst in started:
        if inst.ready.exists():
            try:
                os.kill(int(inst.ready.read_text().split()[0]), signal.SIGKILL)
            except (ProcessLookupError, ValueError, IndexError):
                pass
        inst.kill()
    lab.run(lab.proxy, PY, "-m", "nfsplice", "cleanup", "--all", check=False, cwd=REPO)


# -- option errors --------------------------------------------------------------------------
BAD_OPTIONS = [
    (["--listen", "nonsense"], "--listen"),
    (["--listen", "0.0.0.0:9000"], "--listen"),
    (["--listen", "198.18.1.1:99999"], "--listen"),
    (["--ports", "10-5"], "--ports"),
    (["--backend", "foo"], "--backend"),
    (["--upstream", "198.18.2.2"], "--upstream"),
    (["--inactivity-timeout", "-1"], "--inactivity-timeout"),
    (["--fastpath", "maybe"], "--fastpath"),
]


@pytest.mark.root
@pytest.mark.parametrize("bad,option", BAD_OPTIONS, ids=[" ".join(b) for b, _ in BAD_OPTIONS])
def test_bad_option_names_itself_and_installs_nothing(lab, bad, option):
    args = {"--listen": f"{PROXY_CLIENT_ADDR}:9000", "--upstream": UPSTREAM}
    for i in range(0, len(bad), 2):
        args[bad[i]] = bad[i + 1]
    argv = [LAUNCH, "tcp", *[x for kv in args.items() for x in kv], "--instance", "clibad"]
    p = lab.run(lab.proxy, *argv, check=False, cwd=REPO, timeout=30)
    err = p.stderr.decode()
    assert p.returncode == 2, (p.returncode, err)
    assert option in err, err
    assert "Traceback" not in err, err
    assert nfsplice_lines(lab) == []


# -- probe ----------------------------------------------------------------------------------
@pytest.mark.root
def test_probe_finds_everything_here():
    p = subprocess.run([LAUNCH, "probe"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert not [l for l in lines if "MISSING" in l], p.stdout
    ok = [l.partition(": ok")[0] for l in lines if ": ok" in l]
    for feature in ("root / CAP_NET_ADMIN", "iptables", "CT --notrack + NFQUEUE", "GSO", "TCP_REPAIR",
                    "sysctls", "conntrack", "numpy", "netfilterqueue", "fast path"):
        assert any(feature in f for f in ok), (feature, p.stdout)
    assert lines[-1] == "nfsplice probe: everything nfsplice tcp needs is there"
    assert "nf_tables" in p.stdout or "legacy" in p.stdout
    # The throw-away chain and namespace are gone; no host rule was touched.
    assert "NFSPLICE-probe" not in subprocess.run(["iptables-save", "-t", "raw"], capture_output=True,
                                                  text=True).stdout
    assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
                .stdout.split() if n.startswith("nfsplice-probe")]


# -- the launcher: signals, crash, cleanup ----------------------------------------------------
@pytest.mark.root
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_launcher_signal_removes_rules(lab, instances, tmp_path, sig):
    inst = Instance(lab, tmp_path, "cli1", 9000)
    instances.append(inst)
    pid = inst.wait_ready()
    assert pid != inst.proc.pid      # a child, not exec'd
    assert len(chains_of(lab, "cli1")) >= 4, raw_rules(lab)   # -N x2, jumps x2, rules
    assert f"nfsplice:cli1 pid={pid}" in raw_rules(lab)
    inst.proc.send_signal(sig)
    assert inst.wait() == 0, inst.stderr()
    assert nfsplice_lines(lab) == []
    assert "exit:" in inst.stderr()     # the service's own orderly shutdown


@pytest.mark.root
def test_launcher_cleans_up_after_sigkilled_child(lab, instances, tmp_path):
    inst = Instance(lab, tmp_path, "cli1", 9000)
    instances.append(inst)
    pid = inst.wait_ready()
    assert chains_of(lab, "cli1")
    os.kill(pid, signal.SIGKILL)
    status = inst.wait()
    assert status == 128 + signal.SIGKILL, inst.stderr()
    assert nfsplice_lines(lab) == []
    assert "removed" in inst.stderr()


@pytest.mark.root
def test_stats_while_running_and_queue_conflict(lab, origin, instances, tmp_path):
    inst = Instance(lab, tmp_path, "cli1", 9000, queue=7)
    instances.append(inst)
    pid = inst.wait_ready()
    # One connection through the launcher-run instance, spliced, so there is something to count.
    c = lab.run(lab.client, sys.executable, "-c", CLIENT, PROXY_CLIENT_ADDR, "9000", timeout=30)
    assert c.stdout.decode().strip() == "ok"

    # (e) stats of the running instance
    end = time.monotonic() + 5
    while True:
        p = subprocess.run([LAUNCH, "stats", "--instance", "cli1"], capture_output=True, text=True, cwd=REPO)
        if p.returncode == 0 and f"pid {pid}" in p.stdout and "pairs.spliced" in p.stdout \
                or time.monotonic() > end:
            break
        time.sleep(0.1)
    assert p.returncode == 0, p.stderr
    assert f"== cli1 (pid {pid}, running)" in p.stdout, p.stdout
    counters = dict(l.split(None, 1) for l in p.stdout.splitlines()[1:])
    assert counters["backend"] == "netlink" and int(counters["pairs.spliced"]) == 1, p.stdout
    assert int(counters["bytes.c2s"]) > 0, p.stdout
    st = json.loads((STATS_DIR / "cli1.json").read_text())
    assert st["pid"] == pid and st["instance"] == "cli1"

    # (f) a second instance on the same queue fails, naming the queue, and leaves no rules
    before = raw_rules(lab)
    second = Instance(lab, tmp_path, "cli1b", 9003, queue=7)
    instances.append(second)
    assert second.wait() == 2, second.stderr()
    err = second.stderr()
    assert "NFQUEUE 7" in err, err
    assert "already bound" in err or "in use" in err, err   # not "run as root": we are root
    assert "Traceback" not in err, err
    assert chains_of(lab, "cli1b") == []
    assert raw_rules(lab).count("NFSPLICE") == before.count("NFSPLICE")   # the first one's rules kept
    assert inst.proc.poll() is None

    inst.proc.send_signal(signal.SIGTERM)
    assert inst.wait() == 0, inst.stderr()
    assert nfsplice_lines(lab) == []


@pytest.mark.root
def test_cleanup_removes_dead_keeps_running(lab, instances, tmp_path):
    # (d) without the launcher: a SIGKILLed run leaves its rules behind
    dead = Instance(lab, tmp_path, "clidead", 9010, queue=1, launcher=False)
    live = Instance(lab, tmp_path, "clilive", 9011, queue=3, launcher=False)   # queues 1-2 and 3-4
    instances += [dead, live]
    dead_pid = dead.wait_ready()
    live_pid = live.wait_ready()
    dead.proc.send_signal(signal.SIGKILL)
    dead.wait()
    assert chains_of(lab, "clidead"), "a SIGKILLed run leaves its rules"

    p = lab.run(lab.proxy, LAUNCH, "cleanup", cwd=REPO)
    out = p.stdout.decode()
    assert f"removed {rules.instance_chain('clidead')} (instance clidead, pid {dead_pid})" in out, out
    assert f"kept {rules.instance_chain('clilive')} of running instance clilive (pid {live_pid})" in out, out
    assert chains_of(lab, "clidead") == []
    assert chains_of(lab, "clilive")
    assert live.proc.poll() is None

    p = lab.run(lab.proxy, LAUNCH, "cleanup", "--all", cwd=REPO)
    assert f"removed {rules.instance_chain('clilive')}" in p.stdout.decode()
    assert nfsplice_lines(lab) == []
    live.proc.send_signal(signal.SIGTERM)
    assert live.wait() == 0, live.stderr()     # removing already-removed rules is no error
    assert nfsplice_lines(lab) == []
    p = lab.run(lab.proxy, LAUNCH, "cleanup", cwd=REPO)
    assert "no nfsplice rules installed" in p.stdout.decode()


# -- sysctls ----------------------------------------------------------------------------------
@pytest.mark.root
def test_missing_sysctl_is_named_and_set_sysctls_restores(lab, instances, tmp_path):
    devs = [f"{lab.prefix}-p0", f"{lab.prefix}-p1"]

    def get(key):
        return lab.run(lab.proxy, "sysctl", "-n", key).stdout.decode().strip()

    try:
        for dev in devs:
            lab.sysctl(lab.proxy, f"net.ipv4.conf.{dev}.rp_filter", "1")
        p = lab.run(lab.proxy, LAUNCH, "tcp", "--listen", f"{PROXY_CLIENT_ADDR}:9020", "--upstream", UPSTREAM,
                    "--instance", "clisys", check=False, cwd=REPO, timeout=30)
        err = p.stderr.decode()
        assert p.returncode == 2, err
        assert f"net.ipv4.conf.{devs[0]}.rp_filter" in err, err
        assert "--set-sysctls" in err, err
        assert nfsplice_lines(lab) == []

        inst = Instance(lab, tmp_path, "clisys", 9020, "--set-sysctls")
        instances.append(inst)
        inst.wait_ready()
        assert [get(f"net.ipv4.conf.{d}.rp_filter") for d in devs] == ["0", "0"]
        inst.proc.send_signal(signal.SIGTERM)
        assert inst.wait() == 0, inst.stderr()
        assert [get(f"net.ipv4.conf.{d}.rp_filter") for d in devs] == ["1", "1"]
        assert nfsplice_lines(lab) == []
    finally:
        for key, val in lab.proxy_sysctls().items():
            lab.sysctl(lab.proxy, key, val)
