"""nfsplice command line: tcp, http, cache, probe, stats, cleanup, replay.

Run through ./nfsplice-launch (root, sudo) or `python -m nfsplice` as root.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys

log = logging.getLogger("nfsplice")


class UsageError(Exception):
    pass


def hostport(value: str, option: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        raise UsageError(f"{option}: expected ADDRESS:PORT, got {value!r}")
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise UsageError(f"{option}: {host!r} is not an IPv4 address (nfsplice splices IPv4 only)") from None
    if ip.is_unspecified:
        raise UsageError(f"{option}: give a concrete address, not {host} (the rules match it)")
    try:
        p = int(port)
    except ValueError:
        raise UsageError(f"{option}: port {port!r} is not a number") from None
    if not 0 < p < 65536:
        raise UsageError(f"{option}: port {p} out of range 1-65535")
    return str(ip), p


def port_range(value: str, option: str = "--ports") -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in value.split("-", 1))
    except ValueError:
        raise UsageError(f"{option}: expected LOW-HIGH, got {value!r}") from None
    if not (1024 <= lo <= hi < 65536):
        raise UsageError(f"{option}: {value} is not a range within 1024-65535")
    return lo, hi


def size(value: str) -> int:
    """argparse type of byte counts: 65536, 64KiB, 1MiB."""
    from .config import parse_size
    try:
        return parse_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nfsplice", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tcp", help="L4 proxy: every connection spliced to the upstream at once")
    t.add_argument("--listen", required=True, help="ADDRESS:PORT to accept clients on")
    t.add_argument("--upstream", required=True, help="ADDRESS:PORT of the origin")
    _engine_options(t)

    h = sub.add_parser("http", help="HTTP/1.1 reverse (--upstream) or forward proxy; large bodies spliced",
                       description="With --config FILE the listeners come from the file (see "
                       "nfsplice/config.py); the other options here are then defaults for every listener.")
    h.add_argument("--listen", help="ADDRESS:PORT to accept clients on (or --config)")
    h.add_argument("--upstream", help="http://ADDRESS:PORT of the origin (reverse proxy); "
                   "without it a forward proxy (absolute-form targets and CONNECT)")
    h.add_argument("--config", metavar="FILE", help="TOML file of listeners, each with its own upstreams "
                   "and settings; not with --listen or --upstream")
    h.add_argument("--no-splice", action="store_true", help="copy every byte (the baseline); no rules, no root")
    h.add_argument("--splice-threshold", type=size, default="2MiB",
                   help="splice response bodies of at least this many bytes (65536, 64KiB, 1MiB) [%(default)s]")
    h.add_argument("--splice-chunk", type=size, default="8MiB",
                   help="splice a chunked response body (once --splice-threshold bytes of it were "
                   "copied) from a chunk with at least this many bytes left; 0: whatever its chunk "
                   "sizes. Every chunk boundary costs a trip through the queue [%(default)s]")
    h.add_argument("--connect-ports", default="443", help="ports CONNECT may reach [%(default)s]")
    h.add_argument("--access-log", default="-", help="file, - (stderr) or off [%(default)s]")
    h.add_argument("--header-timeout", type=float, default=10.0, help="request head within [%(default)s] s")
    h.add_argument("--keepalive-timeout", type=float, default=60.0, help="idle client connection [%(default)s] s")
    h.add_argument("--connect-timeout", type=float, default=5.0, help="upstream connect [%(default)s] s")
    h.add_argument("--response-timeout", type=float, default=60.0, help="upstream response [%(default)s] s")
    h.add_argument("--max-header-bytes", type=size, default="32KiB", help="[%(default)s]")
    h.add_argument("--max-header-fields", type=int, default=100,
                   help="field lines in a head or a trailer section; more: 431 [%(default)s]")
    h.add_argument("--pool-size", type=int, default=32,
                   help="idle upstream connections kept per upstream address [%(default)s]")
    h.add_argument("--pool-idle-timeout", type=float, default=30.0,
                   help="close an idle pooled upstream connection after [%(default)s] s "
                   "(keep it below the origins' own keep-alive timeout)")
    h.add_argument("--down-time", type=float, default=10.0,
                   help="an upstream that refused or timed out on connect is skipped for [%(default)s] s")
    h.add_argument("--cache-dir", metavar="DIR", help="cache responses (RFC 9111) in DIR: bodies in files, "
                   "an sqlite index; survives restarts (see `nfsplice cache`)")
    h.add_argument("--cache-size", type=size, default="1GiB",
                   help="bodies stored at most; least recently used evicted [%(default)s]")
    h.add_argument("--cache-heuristic", action="store_true",
                   help="give responses without explicit freshness but with Last-Modified a heuristic "
                   "lifetime (RFC 9111 4.2.2): 10%% of their age at arrival, at most a day; off by default")
    h.add_argument("--purge-from", default="127.0.0.1/32", metavar="NETS",
                   help="addresses or networks allowed to send PURGE, comma-separated [%(default)s]")
    _engine_options(h)

    k = sub.add_parser("cache", help="list, inspect or purge a cache directory (also while the proxy runs)")
    ks = k.add_subparsers(dest="action", required=True)
    for name, what in (("ls", "every stored response"), ("stat", "the stored variants of URL"),
                       ("purge", "remove URL (through the running proxy when it has the directory)")):
        a = ks.add_parser(name, help=what)
        if name != "ls":
            a.add_argument("url", help="the URL as clients ask for it (http://HOST[:PORT]/PATH)")
        a.add_argument("--cache-dir", required=True, metavar="DIR", help="the proxy's --cache-dir")

    sub.add_parser("probe", help="which kernel features are there and what is missing")
    s = sub.add_parser("stats", help="counters of running (or last) instances")
    s.add_argument("--instance")
    c = sub.add_parser("cleanup", help="remove rules left by killed runs")
    c.add_argument("--all", action="store_true", help="also those of running instances")
    r = sub.add_parser("replay", help="run a pcap through the rewrite code offline")
    r.add_argument("pcap")
    r.add_argument("--out", required=True, help="pcap of the rewritten packets")
    r.add_argument("--pairs", help="JSON file describing the pairs and their splice points "
                   "(default: learned from the capture)")
    r.add_argument("--summary", action="store_true", help="print one line per packet")
    return p


def _engine_options(t) -> None:
    t.add_argument("--source", help="source address for upstream connections (default: the route's)")
    t.add_argument("--ports", default="61000-62999", help="source ports for upstream connections "
                   "(outside the ephemeral range; the rules match them) [%(default)s]")
    t.add_argument("--queue", type=int, default=0, help="NFQUEUE number [%(default)s]")
    t.add_argument("--queues", type=int, choices=(1, 2), default=2,
                   help="queue threads (QUEUE, QUEUE+1): flows are spread over them by hash [%(default)s]")
    t.add_argument("--backend", choices=("netlink", "netfilterqueue"), default="netlink")
    t.add_argument("--no-gso", action="store_true", help="do not ask for GSO packets (slow; for comparison)")
    t.add_argument("--fail-open", action="store_true",
                   help="accept packets when the queue is full or nfsplice is gone, instead of dropping")
    t.add_argument("--tap-dir", help="store every spliced payload here (TCP Tap)")
    t.add_argument("--fastpath", choices=("auto", "on", "off"), default="auto",
                   help="forward spliced pairs' plain data and ACKs in a tc-BPF program; auto: "
                   "when clang, bpftool and tc are there, else say why and use the queue only [%(default)s]")
    t.add_argument("--linger", type=float, default=2.0, help="seconds a closed pair is kept [%(default)s]")
    t.add_argument("--idle-timeout", type=float, default=300.0, help="forget idle pairs after [%(default)s] s")
    t.add_argument("--inactivity-timeout", type=float, default=300.0,
                   help="reset a spliced pair whose bytes stopped moving for this long, even if packets "
                   "still pass (a client that reads nothing); 0: never [%(default)s] s")
    t.add_argument("--handoff-timeout", type=float, default=5.0)
    t.add_argument("--max-connections", type=int, default=4096)
    t.add_argument("--instance", help="name for rules and stats [listen address]")
    t.add_argument("--ready-file", help="touched once the proxy accepts connections")
    t.add_argument("--pairs-log", help="append one JSON line per splice (pair, socket numbers) for replay")
    t.add_argument("--set-sysctls", action="store_true",
                   help="set ip_forward, accept_local and rp_filter as splicing needs, restore on exit")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="nfsplice: %(message)s")
        if args.command == "tcp":
            from .service import run_tcp
            return run_tcp(args)
        if args.command == "http":
            from .service import run_http
            return run_http(args)
        if args.command == "cache":
            from .cache.admin import cmd_cache
            return cmd_cache(args)
        if args.command == "probe":
            from .probe import probe
            return probe()
        if args.command == "stats":
            return cmd_stats(args)
        if args.command == "cleanup":
            return cmd_cleanup(args)
        if args.command == "replay":
            from .replay import cmd_replay
            return cmd_replay(args)
    except UsageError as e:
        print(f"nfsplice: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


def cmd_stats(args) -> int:
    from .runner import STATS_DIR
    try:
        names = sorted(f for f in os.listdir(STATS_DIR) if f.endswith(".json"))
    except FileNotFoundError:
        names = []
    if args.instance:
        names = [n for n in names if n[:-5] == args.instance]
    if not names:
        print("nfsplice: no instance has written stats (is one running? see /run/nfsplice)", file=sys.stderr)
        return 1
    for n in names:
        with open(os.path.join(STATS_DIR, n)) as f:
            st = json.load(f)
        alive = os.path.exists(f"/proc/{st.get('pid')}")
        print(f"== {st.get('instance')} (pid {st.get('pid')}, {'running' if alive else 'exited'})")
        for k in sorted(st):
            if k not in ("instance", "pid"):
                print(f"{k:36} {st[k]}")
    return 0


def cmd_cleanup(args) -> int:
    from . import fastpath, rules
    removed = rules.cleanup(all_instances=args.all)
    for ent in removed:
        print(f"removed {ent['chain']} (instance {ent.get('instance')}, pid {ent.get('pid')})")
    left = [e for e in rules.installed_instances()]
    # Fast path filters of any instance that is not running any more (their rules are
    # gone, or never got installed because it died starting).
    keep = {fastpath.tc_priority(e["instance"]) for e in left if e.get("instance")}
    for what in fastpath.cleanup(keep_prefs=keep):
        print(f"removed {what}")
    for ent in left:
        print(f"kept {ent['chain']} of running instance {ent.get('instance')} (pid {ent.get('pid')}); --all removes it")
    if not removed and not left:
        print("no nfsplice rules installed")
    return 0
