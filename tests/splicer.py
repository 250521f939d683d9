"""Start and stop `nfsplice tcp` inside a lab's proxy namespace, for the lab tests."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from netns_lab.topology import ORIGIN_ADDR, PROXY_CLIENT_ADDR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTEN = f"{PROXY_CLIENT_ADDR}:9000"
UPSTREAM = f"{ORIGIN_ADDR}:9001"


class Splicer:
    def __init__(self, lab, instance: str, *extra: str, tap: bool = True):
        self.lab = lab
        self.instance = instance
        self.extra = list(extra)
        self.dir = tempfile.mkdtemp(prefix=f"nfsplice-{instance}-")
        self.tap_dir = os.path.join(self.dir, "tap") if tap else None
        self.log_path = os.path.join(self.dir, "nfsplice.log")
        self.pairs_log = os.path.join(self.dir, "pairs.json")
        self.proc = None
        self.returncode = None

    def __enter__(self) -> "Splicer":
        ready = os.path.join(self.dir, "ready")
        argv = [sys.executable, "-m", "nfsplice", "tcp", "--listen", LISTEN, "--upstream", UPSTREAM,
                "--instance", self.instance, "--ready-file", ready, "--pairs-log", self.pairs_log,
                "--linger", "1", *self.extra]
        if self.tap_dir:
            argv += ["--tap-dir", self.tap_dir]
        self.log = open(self.log_path, "w")
        self.proc = self.lab.popen(self.lab.proxy, *argv, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.exists(ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nfsplice did not start: {self.log_text()}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.tap_dir:
            # The tap's copies are as large as the transfers (512 MiB for a 256 MiB run
            # both ways): gone with the run; the log and pairs log stay.
            shutil.rmtree(self.tap_dir, ignore_errors=True)

    def stop(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.returncode = self.proc.returncode
        return self.returncode

    def log_text(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def stats(self) -> dict:
        with open(f"/run/nfsplice/{self.instance}.json") as f:
            return json.load(f)

    def wait_idle(self, timeout: float = 15.0) -> dict:
        """Wait until the engine forgot every pair (FIN/RST seen, linger over), as told by
        a stats file written after this call began."""
        since = time.time()
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if (st.get("time", 0) > since and st.get("pairs.active", 0) == 0
                    and st.get("proxy.accepted", 0) == st.get("pairs.registered", 0)):
                return st
            if time.monotonic() > deadline:
                return st
            time.sleep(0.25)

    def tap_streams(self) -> dict[str, dict]:
        """Tap metadata by client address ('ip:port') -> {'c2s': meta+path, 's2c': ...}."""
        out: dict[str, dict] = {}
        if not self.tap_dir or not os.path.isdir(self.tap_dir):
            return out
        for name in os.listdir(self.tap_dir):
            if not name.endswith(".json"):
                continue
            with open(os.path.join(self.tap_dir, name)) as f:
                meta = json.load(f)
            meta["data"] = os.path.join(self.tap_dir, name[:-5] + ".data")
            client = meta["flow"].split()[2].split(">")[0]
            out.setdefault(client, {})[meta["direction"]] = meta
        return out


def socket_counters(st: dict) -> dict:
    """The proxy-socket counters of stats ST (dropped.proxy_socket and its per-flags
    keys): what an assertion on them shows when it fails (the whole dict is cut)."""
    return {k: v for k, v in st.items() if "proxy_socket" in k}


def instance_stats(instance: str, newer_than: float = 0.0) -> dict:
    """The counters the running instance INSTANCE wrote (/run/nfsplice/INSTANCE.json)
    after NEWER_THAN (time.time()); waits up to 10 s for them, then fails."""
    path = f"/run/nfsplice/{instance}.json"
    deadline = time.monotonic() + 10
    while True:
        try:
            with open(path) as f:
                st = json.load(f)
        except (FileNotFoundError, ValueError):    # (not written yet, or being written)
            st = {"time": 0.0}
        if st.get("time", 0.0) > newer_than:
            return st
        assert time.monotonic() < deadline, f"{path} not written since {newer_than}"
        time.sleep(0.2)


def raw_rules(lab) -> str:
    return lab.run(lab.proxy, "iptables-save", "-t", "raw").stdout.decode()


def proxy_sockets(lab) -> list[str]:
    """TCP sockets in the proxy namespace other than listeners."""
    out = lab.run(lab.proxy, "ss", "-Htan").stdout.decode().splitlines()
    return [line for line in out if not line.startswith("LISTEN")]
