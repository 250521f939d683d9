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
from .engine import QUEUE_MARK, Engine
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


def needed_sysctls(listen_ip: str, upstream_ip: str | None) -> dict[str, str]:
    """Spliced packets carry one of our own addresses as source and are forwarded."""
    need = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.accept_local": "1",
            "net.ipv4.conf.all.rp_filter": "0"}
    addr_dev = subprocess.run(["ip", "-o", "addr", "show", "to", listen_ip], capture_output=True,
                              text=True).stdout.split()
    devs = {addr_dev[1]} if len(addr_dev) > 1 else set()
    dev = _interface_for(upstream_ip) if upstream_ip else None
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
    _need_root("tcp")
    instance = args.instance or f"{listen[0]}_{listen[1]}"
    ruleset = rules.tcp_rules(instance, listen_ip=listen[0], listen_port=listen[1],
                              upstream_ip=upstream[0], upstream_port=upstream[1], ports=ports,
                              queue=args.queue, bypass=args.fail_open, queues=args.queues)

    def make_proxy(runner):
        from .proxy.tcp import TCPSpliceProxy
        return TCPSpliceProxy(runner, listen, upstream, source=args.source, ports=ports,
                              handoff_timeout=args.handoff_timeout, max_connections=args.max_connections)

    what = f"splicing {listen[0]}:{listen[1]} -> {upstream[0]}:{upstream[1]}"
    return _serve(args, instance, f"--listen {listen[0]}:{listen[1]}", needed_sysctls(listen[0], upstream[0]),
                  lambda _only_mark: [ruleset], make_proxy, what)


def run_http(args) -> int:
    """One process for every listener (one with --listen, those of --config FILE):
    one engine and runner, one rule set per splicing listener."""
    from dataclasses import replace
    from . import config
    from .proxy.http import HTTPService
    defaults = _http_defaults(args)
    if args.config:
        if args.listen or args.upstream:
            raise UsageError("--listen and --upstream do not go with --config: the file lists the listeners")
        listeners = config.load(args.config, defaults)
        label = f"--config {args.config}"
    else:
        if not args.listen:
            raise UsageError("http needs --listen ADDRESS:PORT (or --config FILE)")
        upstreams = (config.upstream_url(args.upstream, "--upstream"),) if args.upstream else ()
        listeners = [replace(defaults, listen=hostport(args.listen, "--listen"), upstreams=upstreams)]
        label = "--listen"
    first = listeners[0].listen
    instance = args.instance or f"{first[0]}_{first[1]}"
    _access_log(args.access_log)
    what = "; ".join(_describe(s) for s in listeners)
    if not any(s.splice for s in listeners):
        # The baseline: the same proxy copying every byte, no rules, no engine.
        caches = _open_caches(listeners)
        return _serve_plain(args, HTTPService(listeners, caches=caches), instance, label, what)
    _need_root("http")
    need: dict[str, str] = {}
    for s in listeners:
        for up in s.upstreams or [None]:
            need.update(needed_sysctls(s.listen[0], up[0] if up else None))

    def make_rules(only_mark: int | None) -> list:
        # One rule set per splicing listener; the first carries the instance's own name.
        # With the fast path, only packets of pairs the engine handles are queued.
        rulesets = []
        for s in listeners:
            if s.splice:
                name = instance if not rulesets else f"{instance}@{s.listen[0]}:{s.listen[1]}"
                rulesets.append(rules.tcp_rules(name, listen_ip=s.listen[0], listen_port=s.listen[1],
                                                upstream_ip="0.0.0.0", upstream_port=0, ports=s.ports,
                                                queue=args.queue, bypass=args.fail_open, queues=args.queues,
                                                template="http.rules", only_mark=only_mark))
        return rulesets
    caches = _open_caches(listeners)
    try:
        return _serve(args, instance, label, need, make_rules,
                      lambda runner: HTTPService(listeners, runner, caches), what)
    finally:
        for c in caches.values():       # (HTTPService closes them; not when _serve failed before)
            c.close()


def _open_caches(listeners) -> dict:
    """The cache of each cache directory the listeners name (one per directory: the
    listeners naming it share it); a directory that cannot be used is a usage error."""
    import sqlite3
    from .cache.layer import Cache
    from .cache.policy import CacheConfig
    from .cache.store import StoreBusy
    caches: dict = {}
    try:
        for s in listeners:
            if s.cache_dir is None or s.cache_dir in caches:
                continue
            try:
                caches[s.cache_dir] = Cache(s.cache_dir, s.cache_size,
                                            config=CacheConfig(heuristic=s.cache_heuristic))
            except StoreBusy as e:
                raise UsageError(f"--cache-dir {s.cache_dir}: {e} (another nfsplice http runs with it; "
                                 "`nfsplice cache` works alongside)") from None
            except (OSError, sqlite3.Error, RuntimeError) as e:
                raise UsageError(f"--cache-dir {s.cache_dir}: cannot open the cache there: {e}") from None
    except BaseException:
        for c in caches.values():
            c.close()
        raise
    return caches


def _http_defaults(args):
    """The command line's per-listener settings: the only listener's, or with --config
    the defaults of every listener."""
    from .proxy.http import Settings, Timeouts
    from .proxy import http1
    try:
        connect_ports = frozenset(int(p) for p in args.connect_ports.split(","))
    except ValueError:
        raise UsageError(f"--connect-ports: expected PORT[,PORT...], got {args.connect_ports!r}") from None
    if args.pool_size < 0 or args.down_time < 0:
        raise UsageError("--pool-size and --down-time must be 0 or more")
    if args.pool_idle_timeout <= 0:
        raise UsageError("--pool-idle-timeout must be more than 0 seconds")
    if args.max_header_bytes < 1:
        raise UsageError("--max-header-bytes must be 1 or more")
    if args.max_header_fields < 1:
        raise UsageError("--max-header-fields must be 1 or more")
    if args.cache_size < 1:
        raise UsageError("--cache-size must be 1 byte or more")
    from .cache.layer import parse_networks
    try:
        purge_from = parse_networks(args.purge_from)
    except ValueError as e:
        raise UsageError(f"--purge-from: {e}") from None
    return Settings(splice=not args.no_splice, threshold=args.splice_threshold,
                    chunk_threshold=args.splice_chunk, connect_ports=connect_ports,
                    limits=http1.Limits(max_head_bytes=args.max_header_bytes, max_fields=args.max_header_fields),
                    timeouts=Timeouts(header=args.header_timeout, idle=args.keepalive_timeout,
                                      connect=args.connect_timeout, response=args.response_timeout,
                                      pool_idle=args.pool_idle_timeout),
                    max_connections=args.max_connections, source=args.source, ports=port_range(args.ports),
                    pool_size=args.pool_size, down_time=args.down_time,
                    cache_dir=os.path.abspath(args.cache_dir) if args.cache_dir else None,
                    cache_size=args.cache_size, cache_heuristic=args.cache_heuristic, purge_from=purge_from)


def _describe(s) -> str:
    mode = ("reverse proxy for " + ", ".join(f"http://{a}:{p}" for a, p in s.upstreams) if s.upstreams
            else "forward proxy")
    how = f"splicing bodies of {s.threshold}+ bytes" if s.splice else "copying"
    cache = (f", caching in {s.cache_dir} (at most {s.cache_size} bytes"
             f"{', heuristic freshness' if s.cache_heuristic else ''})" if s.cache_dir else "")
    return f"HTTP {mode} on {s.listen[0]}:{s.listen[1]}, {how}{cache}"


def _need_root(cmd: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"{cmd} needs root (NFQUEUE, iptables, TCP_REPAIR): run it through "
                         "./nfsplice-launch or sudo")


def _access_log(target: str | None) -> None:
    alog = logging.getLogger("nfsplice.access")
    alog.propagate = False
    alog.setLevel(logging.INFO)
    if target in (None, "-"):
        handler = logging.StreamHandler()
    elif target == "off":
        alog.disabled = True
        return
    else:
        handler = logging.FileHandler(target)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    alog.addHandler(handler)


def _signals(stop: threading.Event) -> dict:
    def on_signal(signum, _frame):
        stop.set()
    return {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}


def _ready(args) -> None:
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write(f"{os.getpid()}\n")


def _serve_plain(args, proxy, instance: str, listen: str, what: str) -> int:
    """The copying proxy alone (no queue, engine or rules); its counters go to the
    instance's stats file every second and at the end, like a runner's."""
    import time
    from .runner import stats_path, write_stats_file
    path = stats_path(instance)
    started = time.time()

    def write_stats() -> None:
        now = time.time()
        write_stats_file(path, {"instance": instance, "pid": os.getpid(), "time": now,
                                "uptime": round(now - started, 1), **proxy.counters})

    def stats_loop() -> None:
        while not stop.wait(1.0):
            write_stats()
    stop = threading.Event()
    old_handlers = _signals(stop)
    writer = threading.Thread(target=stats_loop, daemon=True)
    try:
        try:
            proxy.open()
        except OSError as e:
            raise UsageError(f"{listen}: {e.strerror}") from None
        log.info("%s", what)
        write_stats()
        writer.start()
        _ready(args)
        proxy.serve(stop)
    finally:
        stop.set()
        proxy.close()
        if writer.ident is not None:            # (started: the proxy listened)
            writer.join(5)          # (one writer at a time: they share the temporary file)
            write_stats()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        log.info("exit: %s", " ".join(f"{k}={v}" for k, v in sorted(proxy.counters.items())))
    return 0


def _serve(args, instance: str, listen: str, need: dict[str, str], make_rules, make_proxy, what: str) -> int:
    """Queue, engine, rules and a proxy; everything taken down again on any exit.
    LISTEN names the listen option in errors; NEED are the sysctls splicing needs;
    MAKE_RULES(only_mark) the rule sets (ONLY_MARK: the fast path marks what to queue)."""
    if args.inactivity_timeout < 0:
        raise UsageError("--inactivity-timeout must be 0 (never) or more seconds")
    old_sysctls = check_sysctls(need, args.set_sysctls)
    tap = None
    if args.tap_dir:
        from .tap import TapStore
        tap = TapStore(args.tap_dir)
    backends = []
    try:
        kw = {"fail_open": args.fail_open}
        if args.backend == "netlink":
            kw["gso"] = not args.no_gso
        for i in range(args.queues):
            backends.append(open_backend(args.backend, args.queue + i, **kw))
    except (QueueError, OSError) as e:
        for b in backends:
            b.close()
        restore_sysctls(old_sysctls)
        raise UsageError(str(e)) from None
    backend = backends[0]
    engine = Engine(tap, linger=args.linger, idle_timeout=args.idle_timeout,
                    handoff_timeout=args.handoff_timeout * 2,
                    inactivity_timeout=args.inactivity_timeout or None)
    runner = Runner(backends, engine, instance=instance)
    if args.pairs_log:
        import json
        pairs_log = open(args.pairs_log, "a", buffering=1)
        engine.splice_log = lambda rec: pairs_log.write(json.dumps(rec) + "\n")
    proxy = make_proxy(runner)
    stop = threading.Event()
    old_handlers = _signals(stop)
    rulesets = []
    try:
        runner.fastpath = _open_fastpath(args, instance)
        engine.fast = engine.fast_tap = runner.fastpath is not None
        engine.fast_tsval = runner.fast_tsval if engine.fast else None
        rulesets = make_rules(QUEUE_MARK if engine.fast else None)
        runner.start()
        for ruleset in rulesets:
            ruleset.install()
        try:
            proxy.open()
        except OSError as e:
            raise UsageError(f"{listen}: {e.strerror}") from None
        fp = runner.fastpath
        log.info("%s (queue %s, %s backend%s%s%s)", what,
                 "-".join(str(args.queue + i) for i in range(args.queues)),
                 backend.name, ", GSO" if getattr(backend, "gso", False) else "",
                 f", fast path on {','.join(fp.attached)}" if fp else "",
                 f", tap in {args.tap_dir}" if tap else "")
        _ready(args)
        proxy.serve(stop)
    except rules.RulesError as e:
        raise UsageError(f"installing rules: {e}") from None
    finally:
        proxy.close()
        for ruleset in rulesets:
            ruleset.remove()
        runner.shutdown()
        # Spliced pairs still open lose their path now; their frozen sockets are closed
        # silently like at a normal end, so the kernel sends nothing for them.
        with runner.lock:
            pairs = list(engine.pairs.values())
            for pair in pairs:
                engine._forget(pair, "shutdown")
            engine.forgotten = []
            if runner.fastpath is not None:
                runner._apply_fast()
                runner.fastpath.close()
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


def _open_fastpath(args, instance: str):
    """The fast path as --fastpath asks: None when off (or unavailable with auto)."""
    mode = getattr(args, "fastpath", "off")
    if mode == "off":
        return None
    from .fastpath import FastPath, FastPathError
    try:
        return FastPath(instance)
    except FastPathError as e:
        if mode == "on":
            raise UsageError(f"--fastpath on: {e}") from None
        log.warning("fast path off: %s", e)
        return None


def summary_line(st: dict) -> str:
    keys = ["pairs.spliced", "pairs.done.closed", "pairs.done.reset", "packets.c2s", "bytes.c2s",
            "packets.s2c", "bytes.s2c", "held", "dropped.proxy_socket", "dropped.truncated",
            "queue.enobufs", "tap.bytes", "unknown_flow", "fastpath.fast_packets"]
    fallbacks = sum(v for k, v in st.items() if k.startswith("pairs.fallback."))
    malformed = sum(v for k, v in st.items() if k.startswith("malformed."))
    parts = [f"{k}={st.get(k, 0)}" for k in keys]
    parts += [f"fallbacks={fallbacks}", f"malformed={malformed}"]
    return " ".join(parts)
