"""`nfsplice probe`: which kernel and system features splicing needs, and which are missing.

One line per feature: `<feature>: ok [(detail)]` or `<feature>: MISSING: <what> - <how to
fix>`.  The netfilter checks (raw-table chain with the CT --notrack and NFQUEUE targets,
binding an NFQUEUE queue with the GSO flag) run in a throw-away network namespace
(`unshare -n`, or `ip netns add nfsplice-probe-<pid>`), so no rule or queue of the host
is touched.  Exit status 0 when everything required is there, 1 otherwise.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

PROBE_QUEUE = 65000
CAP_NET_ADMIN = 12
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What `nfsplice tcp --set-sysctls` sets (service.needed_sysctls; per-interface
# rp_filter/accept_local too, for the interfaces of the listen and upstream addresses).
SPLICE_SYSCTLS = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.accept_local": "1",
                  "net.ipv4.conf.all.rp_filter": "0"}


class Report:
    def __init__(self) -> None:
        self.missing: list[str] = []

    def ok(self, feature: str, detail: str = "") -> None:
        print(f"{feature}: ok" + (f" ({detail})" if detail else ""), flush=True)

    def missing_(self, feature: str, what: str, fix: str, required: bool = True) -> None:
        tag = "MISSING" if required else "MISSING (optional)"
        print(f"{feature}: {tag}: {what} - {fix}", flush=True)
        if required:
            self.missing.append(feature)


# -- privileges ----------------------------------------------------------------------------
def _cap_eff() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def has_net_admin() -> bool:
    return bool(_cap_eff() >> CAP_NET_ADMIN & 1)


# -- iptables ------------------------------------------------------------------------------
def iptables_variant() -> tuple[str | None, str, str]:
    """(path of the iptables rules.py uses, version, variant 'nf_tables'/'legacy'/'?')."""
    for name in ("iptables", "iptables-nft", "iptables-legacy"):
        path = shutil.which(name)
        if path:
            break
    else:
        return None, "", ""
    try:
        out = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    m = re.search(r"v(\d[\w.]*)", out)
    version = m.group(1) if m else "?"
    if "nf_tables" in out:
        variant = "nf_tables"
    elif "legacy" in out or m:
        variant = "legacy"      # versions before 1.8 do not say, and are legacy
    else:
        variant = "?"
    return path, version, variant


def restore_for(ipt: str) -> str | None:
    base = os.path.basename(ipt)
    if base == "iptables":
        return shutil.which("iptables-restore")
    return shutil.which(base.replace("iptables", "iptables-restore", 1))


# -- the checks run inside a throw-away network namespace ----------------------------------
def _run(argv: list[str]) -> tuple[int, str]:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 1, str(e)
    return p.returncode, (p.stderr.strip() or p.stdout.strip())


def inner_checks(tag: str) -> dict:
    """Run in the probe namespace: a throw-away raw-table chain with both targets, an
    iptables-restore of one rule into it, and an NFQUEUE bind with the GSO flag."""
    res: dict[str, str | None] = {}
    ipt, _, _ = iptables_variant()
    chain = f"NFSPLICE-probe-{tag}"
    if ipt is None:
        res["chain"] = res["ct"] = res["nfqueue"] = res["restore"] = "iptables not installed"
    else:
        rc, err = _run([ipt, "-w", "-t", "raw", "-N", chain])
        res["chain"] = None if rc == 0 else err
        if rc == 0:
            try:
                rc, err = _run([ipt, "-w", "-t", "raw", "-A", chain, "-p", "tcp", "-j", "CT", "--notrack"])
                res["ct"] = None if rc == 0 else err
                rc, err = _run([ipt, "-w", "-t", "raw", "-A", chain, "-p", "tcp", "-j", "NFQUEUE",
                                "--queue-num", str(PROBE_QUEUE), "--queue-bypass"])
                res["nfqueue"] = None if rc == 0 else err
                restore = restore_for(ipt)
                if restore is None:
                    res["restore"] = "iptables-restore not found next to " + ipt
                else:
                    text = f"*raw\n-A {chain} -p udp -j CT --notrack\nCOMMIT\n"
                    try:
                        p = subprocess.run([restore, "-w", "--noflush"], input=text, capture_output=True,
                                           text=True, timeout=20)
                        res["restore"] = None if p.returncode == 0 else (p.stderr.strip() or p.stdout.strip())
                    except (OSError, subprocess.TimeoutExpired) as e:
                        res["restore"] = str(e)
            finally:
                _run([ipt, "-w", "-t", "raw", "-F", chain])
                _run([ipt, "-w", "-t", "raw", "-X", chain])
        else:
            res["ct"] = res["nfqueue"] = res["restore"] = "not tested (no chain)"
    try:
        from .queue.base import QueueError
        from .queue.netlink import NetlinkQueue
        try:
            q = NetlinkQueue(PROBE_QUEUE, gso=True, maxlen=16, rcvbuf=1 << 16)
        except QueueError as e:
            res["queue"] = str(e)
        else:
            q.close()
            res["queue"] = None
    except Exception as e:   # noqa: BLE001 - reported, not raised
        res["queue"] = f"{type(e).__name__}: {e}"
    return res


def run_in_namespace() -> tuple[dict | None, str]:
    """Run inner_checks() in a fresh network namespace; (results, how) or (None, why not)."""
    tag = str(os.getpid())
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    inner = [sys.executable, "-m", "nfsplice.probe", "--inner", tag]
    attempts = []
    if shutil.which("unshare"):
        if os.geteuid() == 0 or has_net_admin():
            attempts.append(("unshare -n", ["unshare", "-n", "--", *inner], None))
        else:
            # Not root: a user namespace of our own still shows whether the kernel has the
            # features (the real run needs root anyway, reported separately).
            attempts.append(("unshare -rn", ["unshare", "-r", "-n", "--", *inner], None))
    ns = f"nfsplice-probe-{tag}"
    if shutil.which("ip"):
        attempts.append((f"ip netns {ns}", ["ip", "netns", "exec", ns, *inner], ns))
    errors = []
    for how, argv, netns in attempts:
        if netns is not None:
            rc, err = _run(["ip", "netns", "add", netns])
            if rc != 0:
                errors.append(f"ip netns add: {err}")
                continue
        try:
            try:
                p = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
            except (OSError, subprocess.TimeoutExpired) as e:
                errors.append(f"{how}: {e}")
                continue
            lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
            if p.returncode == 0 and lines:
                return json.loads(lines[-1]), how
            errors.append(f"{how}: {(p.stderr.strip() or p.stdout.strip()).splitlines()[-1:] or p.returncode}")
        finally:
            if netns is not None:
                _run(["ip", "netns", "del", netns])
    return None, "; ".join(errors) or "neither unshare nor ip is installed"


# -- sysctls -------------------------------------------------------------------------------
def _sysctl_path(key: str) -> str:
    return "/proc/sys/" + key.replace(".", "/")


def read_sysctl(key: str) -> str | None:
    try:
        with open(_sysctl_path(key)) as f:
            return f.read().strip()
    except OSError:
        return None


def check_sysctls(rep: Report) -> None:
    parts, unwritable, absent = [], [], []
    for key, want in SPLICE_SYSCTLS.items():
        cur = read_sysctl(key)
        if cur is None:
            absent.append(key)
            continue
        if cur == want:
            parts.append(f"{key}={cur}")
        else:
            parts.append(f"{key}={cur}, --set-sysctls sets {want}")
            if os.geteuid() == 0 and not os.access(_sysctl_path(key), os.W_OK):
                unwritable.append(key)     # (without root the privileges line says it)
    # Effective rp_filter is max(all, <dev>): name the interfaces that would still filter.
    strict = []
    try:
        for dev in sorted(os.listdir("/proc/sys/net/ipv4/conf")):
            if dev in ("all", "default", "lo"):
                continue
            v = read_sysctl(f"net.ipv4.conf.{dev}.rp_filter")
            if v not in (None, "0"):
                strict.append(f"{dev}={v}")
    except OSError:
        pass
    if strict:
        parts.append("rp_filter on " + ", ".join(strict) + " (tcp checks the interfaces it uses; "
                     "--set-sysctls sets 0)")
    if absent:
        rep.missing_("sysctls", "no " + ", ".join(absent) + " (IPv4 forwarding not built in?)",
                     "nfsplice needs an IPv4 kernel with CONFIG_IP_ADVANCED_ROUTER settings")
    elif unwritable:
        rep.missing_("sysctls", "; ".join(parts) + "; but " + ", ".join(unwritable) + " cannot be written",
                     "/proc/sys is read-only here (container?): set them on the host or the container's config")
    else:
        rep.ok("sysctls", "; ".join(parts))


# -- all of it -----------------------------------------------------------------------------
def probe() -> int:
    rep = Report()
    root = os.geteuid() == 0
    net_admin = has_net_admin()

    # 1. privileges
    if net_admin:
        rep.ok("root / CAP_NET_ADMIN", "euid 0" if root else f"euid {os.geteuid()} with CAP_NET_ADMIN")
    else:
        rep.missing_("root / CAP_NET_ADMIN",
                     f"euid {os.geteuid()}, no CAP_NET_ADMIN" if not root else "root without CAP_NET_ADMIN",
                     "run through ./nfsplice-launch or sudo (in a container: --cap-add NET_ADMIN)")

    # 2. iptables binary and variant
    ipt, version, variant = iptables_variant()
    if ipt is None:
        rep.missing_("iptables", "no iptables binary", "apt-get install iptables (or make setup)")
    else:
        restore = restore_for(ipt)
        if restore is None:
            rep.missing_("iptables", f"{ipt} v{version} ({variant}) but no iptables-restore",
                         "apt-get install --reinstall iptables")
        else:
            note = ""
            if variant == "legacy" and shutil.which("nft"):
                note = "; legacy rules are invisible to nft and vice versa, use one variant " \
                       "(update-alternatives --set iptables /usr/sbin/iptables-nft)"
            rep.ok("iptables", f"{ipt}, v{version}, {variant}{note}")

    # 3./4. raw table with CT --notrack and NFQUEUE, and an NFQUEUE bind with GSO, in a
    # throw-away namespace
    res, how = run_in_namespace()
    if res is None:
        if net_admin:
            what, fix = f"not checked ({how})", "install util-linux (unshare) or iproute2 (ip)"
        else:
            what, fix = "not checked without root", "run nfsplice probe as root (./nfsplice-launch probe)"
        rep.missing_("raw table: CT --notrack + NFQUEUE", what, fix)
        rep.missing_("nfnetlink_queue bind + GSO flag", what, fix)
    else:
        if ipt is None:
            rep.missing_("raw table: CT --notrack + NFQUEUE", "not checked (no iptables)",
                         "apt-get install iptables")
        elif res.get("chain"):
            rep.missing_("raw table: CT --notrack + NFQUEUE", f"cannot create a raw-table chain: {res['chain']}",
                         "the kernel needs CONFIG_IP_NF_RAW (legacy) or nf_tables; modprobe iptable_raw")
        else:
            bad = []
            if res.get("ct"):
                bad.append(f"CT --notrack: {res['ct']} (CONFIG_NETFILTER_XT_TARGET_CT; modprobe xt_CT)")
            if res.get("nfqueue"):
                bad.append(f"NFQUEUE: {res['nfqueue']} (CONFIG_NETFILTER_XT_TARGET_NFQUEUE; modprobe xt_NFQUEUE)")
            if res.get("restore"):
                bad.append(f"iptables-restore --noflush: {res['restore']}")
            if bad:
                rep.missing_("raw table: CT --notrack + NFQUEUE", "; ".join(bad),
                             "load the modules named or use a kernel that has them")
            else:
                rep.ok("raw table: CT --notrack + NFQUEUE", f"chain NFSPLICE-probe-<pid> created and deleted "
                       f"in a throw-away namespace ({how})")
        if res.get("queue"):
            rep.missing_("nfnetlink_queue bind + GSO flag", res["queue"],
                         "the kernel needs CONFIG_NETFILTER_NETLINK_QUEUE (modprobe nfnetlink_queue), Linux >= 3.10")
        else:
            rep.ok("nfnetlink_queue bind + GSO flag", f"queue {PROBE_QUEUE} bound with NFQA_CFG_F_GSO and released")

    # 5. TCP_REPAIR, in this namespace (the capability check is against it)
    try:
        from .handoff import repair_available
        why = repair_available()
    except Exception as e:   # noqa: BLE001 - e.g. loopback down in this namespace
        why = f"could not test it ({type(e).__name__}: {e})"
    if why is None:
        rep.ok("TCP_REPAIR")
    else:
        if not net_admin:
            fix = "run as root (./nfsplice-launch)"
        elif "refused" in why:
            fix = "the kernel needs CONFIG_CHECKPOINT_RESTORE (TCP_REPAIR)"
        else:
            fix = "bring up loopback (ip link set lo up) and retry"
        rep.missing_("TCP_REPAIR", why, fix)

    # 6. sysctls (not required as they stand: tcp --set-sysctls sets and restores them)
    check_sysctls(rep)

    # 7. conntrack (the CT target needs it; probing above loads it when it is a module)
    if os.path.isdir("/proc/sys/net/netfilter") and os.path.exists("/proc/sys/net/netfilter/nf_conntrack_max"):
        rep.ok("conntrack", "/proc/sys/net/netfilter")
    else:
        rep.missing_("conntrack", "no /proc/sys/net/netfilter/nf_conntrack_max",
                     "modprobe nf_conntrack (the kernel needs CONFIG_NF_CONNTRACK)")

    # 8. Python packages
    try:
        import numpy
        rep.ok("numpy", numpy.__version__)
    except ImportError as e:
        rep.missing_("numpy", str(e), "make setup (or .venv/bin/pip install numpy)")
    try:
        import netfilterqueue  # noqa: F401
        try:
            from importlib.metadata import version as _v
            ver = _v("NetfilterQueue")
        except Exception:   # noqa: BLE001
            ver = "installed"
        rep.ok("netfilterqueue (optional)", f"{ver}; --backend netfilterqueue available")
    except ImportError:
        rep.missing_("netfilterqueue (optional)", "package not installed (only --backend netfilterqueue needs it)",
                     ".venv/bin/pip install NetfilterQueue (make setup does)", required=False)

    # 9. the fast path (optional: without it every packet of a spliced pair is queued)
    from . import fastpath
    why = fastpath.available()
    if why is None:
        try:
            fastpath.FastPath("nfsplice-probe", attach=False).close()
        except fastpath.FastPathError as e:
            why = str(e)
    if why is None:
        rep.ok("fast path (optional)", "the tc-BPF program compiles and loads; --fastpath auto uses it")
    else:
        rep.missing_("fast path (optional)", why, "make setup (clang, libbpf-dev, bpftool); Linux 5.10+ with BPF",
                     required=False)

    if rep.missing:
        print("nfsplice probe: MISSING required: " + ", ".join(rep.missing))
        return 1
    print("nfsplice probe: everything nfsplice tcp needs is there")
    return 0


def _inner_main(argv: list[str]) -> int:
    tag = argv[1] if len(argv) > 1 else str(os.getppid())
    print(json.dumps(inner_checks(tag)), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--inner":
        raise SystemExit(_inner_main(sys.argv[1:]))
    raise SystemExit(probe())
