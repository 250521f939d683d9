"""`nfsplice tcp`: wire queue, engine, tap, rules and the L4 proxy together, and take
everything down again on any exit (Ctrl-C, SIGTERM, an exception).  A SIGKILL leaves
the rules behind: `nfsplice cleanup` (the launcher runs it after every exit) removes them.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

from . import rules
from .cli import UsageError, hostport, port_range
from .engine import Engine
from .queue import QueueError, open_backend
from .runner import Runner

log = logging.getLogger("nfsplice")


def _sysctl_path(key: str) -> str:
    return "/proc/sys/" + key.replace(".", "/")


def _read(key: str) -> str | None:
    try:
        with open(_sysctl_path(key)) as f:
            return f.read().strip()
    except OSError:
        return None


def _interface_for(addr: str) -> str | None:
    out = subprocess.run(["ip", "-o", "route", "get", addr], capture_output=True, text=True).stdout
    words = out.split()
    return words[words.index("dev") + 1] if "dev" in words else None


def needed_sysctls(listen_ip: str, upstream_ip: str, client_hint: str | None = None) -> dict[str, str]:
    """Spliced packets carry one of our own addresses as source and are forwarded."""
    need = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.accept_local": "1",
            "net.ipv4.conf.all.rp_filter": "0"}
    addr_dev = subprocess.run(["ip", "-o", "addr", "show", "to", listen_ip], capture_output=True,
                              text=True).stdout.split()
    devs = {addr_dev[1]} if len(addr_dev) > 1 else set()
    dev = _interface_for(upstream_ip)
    if dev:
        devs.add(dev)
    for dev in sorted(devs):
        if dev == "lo":
            continue
        need[f"net.ipv4.conf.{dev}.rp_filter"] = "0"
        need[f"net.ipv4.conf.{dev}.accept_local"] = "1"
    return need


def check_sysctls(need: dict[str, str], set_them: bool) -> dict[str, str]:
    """Return the previous values of what was changed; raise naming what is wrong."""
    wrong = {k: v for k, v in need.items() if _read(k) != v}
    if not wrong:
        return {}
    if not set_them:
        names = ", ".join(f"{k}={v} (is {_read(k)})" for k, v in wrong.items())
        raise UsageError(f"splicing needs {names}; set them or pass --set-sysctls")
    old = {}
    for k, v in wrong.items():
        old[k] = _read(k)
        with open(_sysctl_path(k), "w") as f:
            f.write(v)
    return old


def restore_sysctls(old: dict[str, str]) -> None:
    for k, v in old.items():
        try:
            with open(_sysctl_path(k), "w") as f:
                f.write(v)
        except OSError:
            pass


def run_tcp(args) -> int:
    listen = hostport(args.listen, "--listen")
    upstream = hostport(args.upstream, "--upstream")
    ports = port_range(args.ports)
    if os.geteuid() != 0:
        raise UsageError("tcp needs root (NFQUEUE, iptables, TCP_REPAIR): run it through ./nfsplice-launch or sudo")
    instance = args.instance or f"{listen[0]}_{listen[1]}"
    old_sysctls = check_sysctls(needed_sysctls(listen[0], upstream[0]), args.set_sysctls)
    ruleset = rules.tcp_rules(instance, listen_ip=listen[0], listen_port=listen[1],
                              upstream_ip=upstream[0], upstream_port=upstream[1], ports=ports,
                              queue=args.queue, bypass=args.fail_open, queues=args.queues)
    tap = None
    if args.tap_dir:
        from .tap import TapStore
        tap = TapStore(args.tap_dir)
    try:
        kw = {"fail_open": args.fail_open}
        if args.backend == "netlink":
            kw["gso"] = not args.no_gso
        backends = [open_backend(args.backend, args.queue + i, **kw) for i in range(args.queues)]
    except (QueueError, OSError) as e:
        for b in locals().get("backends", []):
            b.close()
        restore_sysctls(old_sysctls)
        raise UsageError(str(e)) from None
    backend = backends[0]
    engine = Engine(tap, linger=args.linger, idle_timeout=args.idle_timeout,
                    handoff_timeout=args.handoff_timeout * 2)
    runner = Runner(backends, engine, instance=instance)
    if args.pairs_log:
        import json
        pairs_log = open(args.pairs_log, "a", buffering=1)
        engine.splice_log = lambda rec: pairs_log.write(json.dumps(rec) + "\n")
    from .proxy.tcp import TCPSpliceProxy
    proxy = TCPSpliceProxy(runner, listen, upstream, source=args.source, ports=ports,
                           handoff_timeout=args.handoff_timeout, max_connections=args.max_connections)
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        runner.start()
        ruleset.install()
        try:
            proxy.open()
        except OSError as e:
            raise UsageError(f"--listen {listen[0]}:{listen[1]}: {e.strerror}") from None
        log.info("splicing %s:%d -> %s:%d (queue %s, %s backend%s%s)", *listen, *upstream,
                 "-".join(str(args.queue + i) for i in range(args.queues)),
                 backend.name, ", GSO" if getattr(backend, "gso", False) else "",
                 f", tap in {args.tap_dir}" if tap else "")
        if args.ready_file:
            with open(args.ready_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        proxy.serve(stop)
    except rules.RulesError as e:
        raise UsageError(f"installing rules: {e}") from None
    finally:
        proxy.close()
        ruleset.remove()
        runner.shutdown()
        # Spliced pairs still open lose their path now; their frozen sockets are closed
        # silently like at a normal end, so the kernel sends nothing for them.
        with runner.lock:
            pairs = list(engine.pairs.values())
            for pair in pairs:
                engine._forget(pair, "shutdown")
            engine.forgotten = []
        for pair in pairs:
            proxy.forget(pair)
        for b in backends:
            b.close()
        if tap is not None:
            tap.stop()
        runner.write_stats()
        restore_sysctls(old_sysctls)
        for s, h in old_handlers.items():
            signal.signal(s, h)
        st = runner.stats()
        log.info("exit: %s", summary_line(st))
    return 0


def summary_line(st: dict) -> str:
    keys = ["pairs.spliced", "pairs.done.closed", "pairs.done.reset", "packets.c2s", "bytes.c2s",
            "packets.s2c", "bytes.s2c", "held", "dropped.proxy_socket", "dropped.truncated",
            "queue.enobufs", "tap.bytes", "unknown_flow"]
    fallbacks = sum(v for k, v in st.items() if k.startswith("pairs.fallback."))
    malformed = sum(v for k, v in st.items() if k.startswith("malformed."))
    parts = [f"{k}={st.get(k, 0)}" for k in keys]
    parts += [f"fallbacks={fallbacks}", f"malformed={malformed}"]
    return " ".join(parts)
