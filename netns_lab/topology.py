"""The three-namespace lab of DESIGN.md.

    client 198.18.1.2 --veth-- 198.18.1.1 proxy 198.18.2.1 --veth-- 198.18.2.2 origin

Addresses are from 198.18.0.0/15 (RFC 2544, set aside for benchmarks).  The proxy
namespace routes between the two links and accepts packets carrying one of its own
addresses as source (accept_local, rp_filter off): spliced packets look like that.

`Lab` is a context manager: namespaces are created on entry and deleted on exit,
also when the body raised.  `cleanup(prefix)` removes leftovers of a killed run.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass

CLIENT_ADDR = "198.18.1.2"
PROXY_CLIENT_ADDR = "198.18.1.1"
PROXY_ORIGIN_ADDR = "198.18.2.1"
ORIGIN_ADDR = "198.18.2.2"

LOSS_TABLE = "nfslab_loss"


def sh(*argv: str, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a command, raising with its stderr when it fails."""
    p = subprocess.run(argv, input=input, capture_output=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.decode(errors='replace').strip()}")
    return p


def existing_namespaces() -> list[str]:
    out = sh("ip", "netns", "list").stdout.decode()
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def cleanup(prefix: str = "nfs") -> list[str]:
    """Delete every namespace named PREFIX-client/-proxy/-origin; return their names."""
    gone = []
    for ns in existing_namespaces():
        if ns in (f"{prefix}-client", f"{prefix}-proxy", f"{prefix}-origin"):
            # Kill what still runs inside, or the namespace lingers while a process holds it.
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            sh("ip", "netns", "del", ns, check=False)
            gone.append(ns)
    return gone


@dataclass
class Lab:
    prefix: str = "nfs"

    @property
    def client(self) -> str:
        return f"{self.prefix}-client"

    @property
    def proxy(self) -> str:
        return f"{self.prefix}-proxy"

    @property
    def origin(self) -> str:
        return f"{self.prefix}-origin"

    def __enter__(self) -> "Lab":
        cleanup(self.prefix)
        try:
            self._build()
        except BaseException:
            cleanup(self.prefix)
            raise
        return self

    def __exit__(self, *exc) -> None:
        cleanup(self.prefix)

    def _build(self) -> None:
        p = self.prefix
        for ns in (self.client, self.proxy, self.origin):
            sh("ip", "netns", "add", ns)
            self.ip(ns, "link", "set", "lo", "up")
        # Interface names are at most 15 characters; the peer is moved into its namespace.
        sh("ip", "link", "add", f"{p}-c0", "netns", self.client, "type", "veth", "peer", "name", f"{p}-p0", "netns", self.proxy)
        sh("ip", "link", "add", f"{p}-p1", "netns", self.proxy, "type", "veth", "peer", "name", f"{p}-o0", "netns", self.origin)
        self.ip(self.client, "addr", "add", f"{CLIENT_ADDR}/24", "dev", f"{p}-c0")
        self.ip(self.proxy, "addr", "add", f"{PROXY_CLIENT_ADDR}/24", "dev", f"{p}-p0")
        self.ip(self.proxy, "addr", "add", f"{PROXY_ORIGIN_ADDR}/24", "dev", f"{p}-p1")
        self.ip(self.origin, "addr", "add", f"{ORIGIN_ADDR}/24", "dev", f"{p}-o0")
        for ns, dev in ((self.client, f"{p}-c0"), (self.proxy, f"{p}-p0"), (self.proxy, f"{p}-p1"), (self.origin, f"{p}-o0")):
            self.ip(ns, "link", "set", dev, "up")
        self.ip(self.client, "route", "add", "default", "via", PROXY_CLIENT_ADDR)
        self.ip(self.origin, "route", "add", "default", "via", PROXY_ORIGIN_ADDR)
        for key, val in self.proxy_sysctls().items():
            self.sysctl(self.proxy, key, val)

    def proxy_sysctls(self) -> dict[str, str]:
        p = self.prefix
        out = {"net.ipv4.ip_forward": "1"}
        for dev in ("all", "default", f"{p}-p0", f"{p}-p1"):
            out[f"net.ipv4.conf.{dev}.rp_filter"] = "0"
            out[f"net.ipv4.conf.{dev}.accept_local"] = "1"
        return out

    # -- running things inside ---------------------------------------------------------
    def ip(self, ns: str, *args: str) -> subprocess.CompletedProcess:
        return sh("ip", "-n", ns, *args)

    def sysctl(self, ns: str, key: str, value: str) -> None:
        self.run(ns, "sysctl", "-q", "-w", f"{key}={value}")

    def cmd(self, ns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, *argv: str, check: bool = True, timeout: float | None = 600, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(self.cmd(ns, *argv), capture_output=True, timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise RuntimeError(f"[{ns}] {' '.join(argv)} failed ({p.returncode}): "
                               f"{p.stderr.decode(errors='replace').strip()[-2000:]}")
        return p

    def popen(self, ns: str, *argv: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(ns, *argv), **kw)

    # -- loss ------------------------------------------------------------------------
    def set_loss(self, ns: str, percent: int) -> None:
        """Drop PERCENT % of the TCP packets arriving in namespace NS (0 removes the rule).

        This kernel has no netem; nftables' numgen gives independent random drops."""
        self.run(ns, "nft", "delete", "table", "inet", LOSS_TABLE, check=False)
        if percent <= 0:
            return
        rules = (f"table inet {LOSS_TABLE} {{\n chain ingress {{\n  type filter hook prerouting priority -500;\n"
                 f"  meta l4proto tcp numgen random mod 100 < {int(percent)} counter drop\n }}\n}}\n")
        self.run(ns, "nft", "-f", "-", input=rules.encode())

    def veths(self) -> list[tuple[str, str]]:
        p = self.prefix
        return [(self.client, f"{p}-c0"), (self.proxy, f"{p}-p0"), (self.proxy, f"{p}-p1"), (self.origin, f"{p}-o0")]

    def set_segmentation(self, mss_sized: bool) -> None:
        """mss_sized: the veths send MSS-sized packets (gso_max_segs 1), so injected loss
        hits single segments rather than whole 64 KiB GSO bursts; False restores GSO."""
        for ns, dev in self.veths():
            self.ip(ns, "link", "set", "dev", dev, "gso_max_segs", "1" if mss_sized else "65535")

    @contextlib.contextmanager
    def lossy(self, percent: int = 1, mss_sized: bool = True):
        """PERCENT % loss in every namespace (on MSS-sized packets unless MSS_SIZED is
        False, see set_segmentation), undone on leaving, also on a failure.  Yields a
        function that counts the packets dropped so far."""
        nss = (self.client, self.proxy, self.origin)
        if mss_sized:
            self.set_segmentation(True)
        try:
            for ns in nss:
                self.set_loss(ns, percent)
            yield lambda: sum(self.loss_drops(ns) for ns in nss)
        finally:
            for ns in nss:
                self.set_loss(ns, 0)
            if mss_sized:
                self.set_segmentation(False)

    def loss_drops(self, ns: str) -> int:
        """Packets the loss rule of NS dropped so far."""
        out = self.run(ns, "nft", "list", "table", "inet", LOSS_TABLE, check=False).stdout.decode()
        for word_i, word in enumerate(out.split()):
            if word == "packets":
                return int(out.split()[word_i + 1])
        return 0
