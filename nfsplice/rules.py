"""Install and remove nfsplice's iptables rules (templates in iptables/).

Every instance gets its own chains in the raw table, named NFSPLICE-<8 hex>-P/-O, and
two jump rules whose comment says `nfsplice:<instance> pid=<pid>`.  Removal deletes
exactly those; `cleanup()` finds leftovers of killed runs by that comment (only those
whose pid is gone, unless told to remove all).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from .engine import QUEUE_MARK_MASK

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "iptables")
CHAIN_PREFIX = "NFSPLICE-"


class RulesError(RuntimeError):
    pass


def _iptables() -> str:
    for name in ("iptables", "iptables-nft", "iptables-legacy"):
        path = shutil.which(name)
        if path:
            return path
    raise RulesError("iptables is not installed (Debian: apt-get install iptables)")


def _run(argv: list[str], input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, input=input, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RulesError(f"{' '.join(argv)}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def template_path(name: str) -> str:
    return os.path.join(TEMPLATE_DIR, name)


@dataclass
class RuleSet:
    instance: str
    chain: str
    comment: str
    text: str
    installed: bool = False

    def install(self) -> None:
        ipt = _iptables()
        restore = ipt.replace("iptables", "iptables-restore") if os.path.basename(ipt) != "iptables" \
            else shutil.which("iptables-restore")
        if not restore:
            raise RulesError("iptables-restore is not installed")
        try:
            _run([restore, "-w", "--noflush"], input=self.text)
        except RulesError as e:
            msg = str(e)
            if "NFQUEUE" in msg or "No chain/target/match" in msg:
                msg += " (the kernel lacks the NFQUEUE or CT target: CONFIG_NETFILTER_XT_TARGET_NFQUEUE/CT)"
            self.installed = True   # half-applied rules must still be removed
            self.remove()
            raise RulesError(msg) from None
        self.installed = True

    def remove(self) -> None:
        if not self.installed:
            return
        remove_chain(self.chain, self.comment)
        self.installed = False


def instance_chain(instance: str) -> str:
    return CHAIN_PREFIX + hashlib.sha1(instance.encode()).hexdigest()[:8]


def tcp_rules(instance: str, *, listen_ip: str, listen_port: int, upstream_ip: str,
              upstream_port: int, ports: tuple[int, int], queue: int, bypass: bool,
              queues: int = 1, template: str = "tcp.rules", only_mark: int | None = None) -> RuleSet:
    chain = instance_chain(instance)
    comment = f"nfsplice:{instance} pid={os.getpid()}"
    with open(template_path(template)) as f:
        tmpl = "".join(line for line in f if not line.startswith("#"))
    text = tmpl.format(chain=chain, comment=comment, listen_ip=listen_ip, listen_port=listen_port,
                       upstream_ip=upstream_ip, upstream_port=upstream_port,
                       ports=f"{ports[0]}:{ports[1]}",
                       queue=f"--queue-num {queue}" if queues == 1 else f"--queue-balance {queue}:{queue + queues - 1}",
                       bypass=" --queue-bypass" if bypass else "",
                       only_marked=(f"-m mark --mark {only_mark:#x}/{QUEUE_MARK_MASK:#x} "
                                    if only_mark is not None else ""))
    return RuleSet(instance, chain, comment, text)


def remove_chain(chain: str, comment: str | None = None) -> None:
    ipt = _iptables()
    for hook, suffix in (("PREROUTING", "-P"), ("OUTPUT", "-O")):
        # Delete every jump to our chain (normally one), whatever its comment.
        for _ in range(16):
            listing = _run([ipt, "-w", "-t", "raw", "-S", hook], check=False).stdout
            rules = [l for l in listing.splitlines() if l.startswith("-A ") and l.endswith(f"-j {chain}{suffix}")]
            if not rules:
                break
            args = _split(rules[0])[2:]
            _run([ipt, "-w", "-t", "raw", "-D", hook, *args], check=False)
        _run([ipt, "-w", "-t", "raw", "-F", chain + suffix], check=False)
        _run([ipt, "-w", "-t", "raw", "-X", chain + suffix], check=False)


def _split(rule: str) -> list[str]:
    import shlex
    return shlex.split(rule)


def installed_instances() -> list[dict]:
    """nfsplice chains in the raw table: [{chain, instance, pid, alive}]."""
    try:
        ipt = _iptables()
    except RulesError:
        return []
    listing = _run([ipt, "-w", "-t", "raw", "-S"], check=False).stdout
    found: dict[str, dict] = {}
    for line in listing.splitlines():
        m = re.match(rf"-N ({CHAIN_PREFIX}[0-9a-f]{{8}})-[PO]$", line)
        if m:
            found.setdefault(m.group(1), {"chain": m.group(1), "instance": None, "pid": None})
        m = re.search(r'--comment "?nfsplice:(\S+) pid=(\d+)"? -j (' + CHAIN_PREFIX + r'[0-9a-f]{8})-[PO]', line)
        if m:
            ent = found.setdefault(m.group(3), {"chain": m.group(3)})
            ent.update(instance=m.group(1), pid=int(m.group(2)))
    for ent in found.values():
        pid = ent.get("pid")
        ent["alive"] = bool(pid) and os.path.exists(f"/proc/{pid}") and pid != os.getpid()
    return list(found.values())


def cleanup(all_instances: bool = False) -> list[dict]:
    """Remove leftover chains (of dead processes; of every instance with ALL_INSTANCES)."""
    removed = []
    for ent in installed_instances():
        if ent["alive"] and not all_instances:
            continue
        remove_chain(ent["chain"])
        removed.append(ent)
    return removed
