"""The config file of `nfsplice http --config FILE`: several listeners in one process.

TOML (tomllib).  One `[[listener]]` table per listen address; a listener with
`upstreams` is a reverse proxy to them (round robin), one without is a forward proxy.
Every other key mirrors a command-line option of `nfsplice http`, and the command line's
values (given or default) are the defaults for every listener: a key in the file
overrides them for its listener.  Only --listen and --upstream cannot go with --config.

    [[listener]]
    listen = "198.18.1.1:8080"                 # ADDRESS:PORT, required, one listener each
    upstreams = ["http://198.18.2.2:8000", "http://198.18.2.3:8000"]
    splice = true                              # false: copy every byte (--no-splice)
    splice_threshold = "64KiB"                 # --splice-threshold; sizes: 65536, "64KiB", "1MiB"
    splice_chunk = "8MiB"                      # --splice-chunk
    max_header_bytes = "32KiB"                 # --max-header-bytes
    max_header_fields = 100                    # --max-header-fields
    max_connections = 4096                     # --max-connections
    connect_ports = [443]                      # --connect-ports (forward proxy, CONNECT)
    ports = "61000-61999"                      # --ports: each listener its own range
    source = "198.18.2.1"                      # --source
    pool_size = 32                             # --pool-size: idle connections kept per upstream
    down_time = 10                             # --down-time: seconds a failing upstream is skipped
    cache_dir = "/var/cache/nfsplice/a"        # --cache-dir: cache responses here (RFC 9111)
    cache_size = "1GiB"                        # --cache-size: bodies stored at most
    cache_heuristic = false                    # --cache-heuristic: RFC 9111 4.2.2
    purge_from = ["127.0.0.1/32"]              # --purge-from: who may send PURGE

    [listener.timeouts]                        # seconds; key K mirrors --K-timeout
    header = 10
    keepalive = 60
    connect = 5
    response = 60
    pool_idle = 30

Sizes are integers (bytes) or strings with a unit of B, KiB, MiB or GiB (powers of 1024).
Upstream source-port ranges of two listeners must not overlap: the rules of each
listener match its range, and a spliced pair is given back to the listener whose range
holds its upstream port.  Listeners may share a cache_dir (one store: one cache_size
and cache_heuristic) or each have their own.

Every mistake is an error that names the file, the line and the key: unknown keys
(typos must not pass silently), wrong types, bad addresses, a missing `listen`, two
listeners on one address, overlapping port ranges.  tomllib reports syntax errors with
their line; for the rest, the line is found by scanning the text for the key (tomllib
keeps no positions).
"""
from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib

from .cache.layer import parse_networks
from .cli import UsageError, hostport, port_range
from .proxy.http import Settings


class ConfigError(UsageError):
    """A mistake in the config file; the message starts with FILE:LINE."""


_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB)?")
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_size(value) -> int:
    """Bytes from an integer or a string like "64KiB" (units B, KiB, MiB, GiB: powers of
    1024).  Raises ValueError saying what was expected."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"expected a size of 0 or more bytes, got {value}")
        return value
    m = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"expected a size like 64KiB, got {value!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def upstream_url(value: str, where: str) -> tuple[str, int]:
    """(address, port) of an upstream given as http://ADDRESS:PORT."""
    if not value.startswith("http://"):
        raise UsageError(f"{where}: expected http://ADDRESS:PORT, got {value!r}")
    return hostport(value[len("http://"):].rstrip("/"), where)


# -- value checkers: return the value for Settings, raise ValueError saying what was expected --
def _integer(v, low: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"expected an integer, got {v!r}")
    if v < low:
        raise ValueError(f"expected {low} or more, got {v}")
    return v


def _seconds(v, positive: bool = True) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ValueError(f"expected a number of seconds, got {v!r}")
    if v < 0 or positive and v == 0:
        raise ValueError(f"expected {'more than 0' if positive else '0 or more'} seconds, got {v}")
    return float(v)


def _string(v) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _bool(v) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _address(v) -> str:
    try:
        return str(ipaddress.IPv4Address(_string(v)))
    except ipaddress.AddressValueError:
        raise ValueError(f"expected an IPv4 address, got {v!r}") from None


def _ports(v) -> frozenset:
    if not isinstance(v, list) or not v or not all(isinstance(p, int) and not isinstance(p, bool)
                                                  and 0 < p < 65536 for p in v):
        raise ValueError(f"expected a list of ports like [443, 8443], got {v!r}")
    return frozenset(v)


def _upstreams(v, where: str) -> tuple:
    if not isinstance(v, list) or not v:
        raise ValueError("expected a list like [\"http://198.18.2.2:8000\"] "
                         f"(leave the key out for a forward proxy), got {v!r}")
    out = []
    for url in v:
        addr = upstream_url(_string(url), where)
        if addr in out:
            raise ValueError(f"http://{addr[0]}:{addr[1]} is listed twice")
        out.append(addr)
    return tuple(out)


def _cache_size(v) -> int:
    n = parse_size(v)
    if n < 1:
        raise ValueError(f"expected a size of 1 byte or more, got {v!r}")
    return n


def _max_header_bytes(settings: Settings, n: int) -> dict:
    if n < 1:
        raise ValueError(f"expected 1 or more bytes, got {n}")
    return {"limits": dataclasses.replace(settings.limits, max_head_bytes=n)}


# key -> function(settings so far, value, where) returning the Settings fields it sets
LISTENER_KEYS = {
    "listen": lambda s, v, w: {"listen": hostport(_string(v), w)},
    "upstreams": lambda s, v, w: {"upstreams": _upstreams(v, w)},
    "splice": lambda s, v, w: {"splice": _bool(v)},
    "splice_threshold": lambda s, v, w: {"threshold": parse_size(v)},
    "splice_chunk": lambda s, v, w: {"chunk_threshold": parse_size(v)},
    "max_header_bytes": lambda s, v, w: _max_header_bytes(s, parse_size(v)),
    "max_header_fields": lambda s, v, w: {"limits": dataclasses.replace(s.limits, max_fields=_integer(v, 1))},
    "max_connections": lambda s, v, w: {"max_connections": _integer(v, 1)},
    "connect_ports": lambda s, v, w: {"connect_ports": _ports(v)},
    "ports": lambda s, v, w: {"ports": port_range(_string(v), w)},
    "source": lambda s, v, w: {"source": _address(v)},
    "pool_size": lambda s, v, w: {"pool_size": _integer(v, 0)},
    "down_time": lambda s, v, w: {"down_time": _seconds(v, positive=False)},
    "cache_dir": lambda s, v, w: {"cache_dir": os.path.abspath(_string(v))},
    "cache_size": lambda s, v, w: {"cache_size": _cache_size(v)},
    "cache_heuristic": lambda s, v, w: {"cache_heuristic": _bool(v)},
    "purge_from": lambda s, v, w: {"purge_from": parse_networks(v)},
    "timeouts": None,          # a table, below
}
# [listener.timeouts] key -> Timeouts field
TIMEOUT_KEYS = {"header": "header", "keepalive": "idle", "connect": "connect", "response": "response",
                "pool_idle": "pool_idle"}


class _Lines:
    """Where each key and table is in the file text: tomllib keeps no positions.

    A line-based scan of table headers and `key =` lines, enough for the files this
    reads (multi-line strings are not tracked; a key not found falls back to its
    table's line)."""

    _ARRAY = re.compile(r"\[\[\s*([^\]]+?)\s*\]\]")
    _TABLE = re.compile(r"\[\s*([^\]]+?)\s*\]")
    _KEY = re.compile(r"((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=")

    def __init__(self, text: str):
        self.at: dict[tuple, int] = {}
        arrays: dict[tuple, int] = {}          # array-of-tables path -> elements so far
        table: tuple = ()
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if m := self._ARRAY.match(line):
                parts = _split_key(m.group(1))
                name = self._resolve(parts[:-1], arrays) + parts[-1:]
                arrays[name] = arrays.get(name, 0) + 1
                table = name + (arrays[name],)
            elif m := self._TABLE.match(line):
                table = self._resolve(_split_key(m.group(1)), arrays)
            elif m := self._KEY.match(line):
                key = _split_key(m.group(1))
                for i in range(1, len(key) + 1):
                    self.at.setdefault(table + key[:i], n)
                continue
            else:
                continue
            self.at.setdefault(table, n)

    @staticmethod
    def _resolve(parts: tuple, arrays: dict) -> tuple:
        """A header's path in the data: inside an array of tables, its last element."""
        out: tuple = ()
        for p in parts:
            out += (p,)
            if out in arrays:
                out += (arrays[out],)
        return out

    def line(self, path: tuple) -> int | None:
        while path:
            if path in self.at:
                return self.at[path]
            path = path[:-1]
        return None


def _split_key(text: str) -> tuple:
    return tuple(p.strip().strip("\"'") for p in re.findall(r"\"[^\"]*\"|'[^']*'|[^.]+", text))


def _name(path: tuple) -> str:
    """listener[1].timeouts.connect"""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def load(path: str, defaults: Settings) -> list[Settings]:
    """The listeners of the config file PATH, each starting from DEFAULTS (the command
    line).  Raises ConfigError naming the file and line of the first mistake."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return loads(text, defaults, path)


def loads(text: str, defaults: Settings, name: str = "<config>") -> list[Settings]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", msg, re.S)
        if m:
            raise ConfigError(f"{name}:{m.group(2)}:{m.group(3)}: {m.group(1)}") from None
        raise ConfigError(f"{name}: {msg}") from None
    lines = _Lines(text)

    def fail(path: tuple, msg: str):
        line = lines.line(path)
        where = f"{name}:{line}" if line is not None else name
        raise ConfigError(f"{where}: {_name(path)}: {msg}" if path else f"{where}: {msg}")

    def unknown(path: tuple, key: str, known) -> None:
        close = difflib.get_close_matches(key, list(known), n=1)
        fail(path + (key,), "unknown key" + (f" (did you mean {close[0]}?)" if close else ""))

    for key in doc:
        if key != "listener":
            unknown((), key, ["listener"])
    tables = doc.get("listener")
    if not isinstance(tables, list) or not tables:
        fail(("listener",) if tables is not None else (),
             "expected [[listener]] tables, one per listen address"
             if tables is not None else "no [[listener]] table: nothing to listen on")
    out: list[Settings] = []
    for i, table in enumerate(tables, 1):
        here = ("listener", i)
        if not isinstance(table, dict):
            fail(here, "expected a table")
        s = dataclasses.replace(defaults, listen=None, upstreams=())
        for key, value in table.items():
            if key not in LISTENER_KEYS:
                unknown(here, key, LISTENER_KEYS)
            if key == "timeouts":
                s = _timeouts(s, value, here + (key,), fail, unknown)
                continue
            try:
                s = dataclasses.replace(s, **LISTENER_KEYS[key](s, value, _name(here + (key,))))
            except UsageError as e:       # hostport, port_range, upstream_url name the key
                fail(here + (key,), str(e).partition(": ")[2])
            except ValueError as e:
                fail(here + (key,), str(e))
        if s.listen is None:
            fail(here, "no listen = \"ADDRESS:PORT\"")
        for j, other in enumerate(out, 1):
            if other.listen == s.listen:
                fail(here + ("listen",), f"listener[{j}] listens on {s.listen[0]}:{s.listen[1]} already")
            if s.cache_dir is not None and s.cache_dir == other.cache_dir:
                if s.cache_size != other.cache_size:
                    fail(here + ("cache_size",), f"{s.cache_size} bytes, but listener[{j}] uses cache_dir "
                         f"{s.cache_dir} with {other.cache_size} (a shared cache has one size)")
                if s.cache_heuristic != other.cache_heuristic:
                    fail(here + ("cache_heuristic",), f"listener[{j}] uses cache_dir {s.cache_dir} with "
                         f"cache_heuristic = {str(other.cache_heuristic).lower()} (a shared cache has one)")
            if s.ports[0] <= other.ports[1] and other.ports[0] <= s.ports[1]:
                fail(here + ("ports",), f"{s.ports[0]}-{s.ports[1]} overlaps listener[{j}]'s "
                     f"{other.ports[0]}-{other.ports[1]} (each listener needs its own source ports)")
        out.append(s)
    return out


def _timeouts(s: Settings, value, path: tuple, fail, unknown) -> Settings:
    if not isinstance(value, dict):
        fail(path, f"expected a table like [listener.timeouts], got {value!r}")
    fields = {}
    for key, v in value.items():
        if key not in TIMEOUT_KEYS:
            unknown(path, key, TIMEOUT_KEYS)
        try:
            fields[TIMEOUT_KEYS[key]] = _seconds(v)
        except ValueError as e:
            fail(path + (key,), str(e))
    return dataclasses.replace(s, timeouts=dataclasses.replace(s.timeouts, **fields))
