"""The cache between the HTTP proxy and the store: fills, collapsing, heads, ranges.

`policy` decides and `store` keeps; this module is what the proxy (`proxy/http.py`)
calls in between, and it does no network I/O of its own:

  * `Cache`: one per cache directory (listeners naming the same directory share it).
    It owns the `Store`, one writer thread that moves body bytes into it, the table
    of requests being collapsed, the keys being revalidated in the background, and
    the cache counters of the stats dict.
  * `Fill`: one response body on its way into the store.  Every byte reaches the
    store's `Writer` through a bounded queue and the writer thread, so nobody who
    forwards waits for the disk: neither the engine's queue thread (a spliced body:
    the Fill is the pair's tap sink, `write`/`close`) nor a proxy thread (a copied
    body: `body`/`finish`).  When the queue holds more than `max_pending` bytes the
    object is given up (`cache.dropped_incomplete`), never half-stored.
  * `ChunkedDecoder`: the data of a chunked body, for storing it de-chunked.
  * `cache_status`, `response_head`, `parse_range`, `if_range_matches`: the head of a
    response served from the cache (RFC 9211 Cache-Status, RFC 9110 14 ranges).
  * `surrogate_view`: a reverse proxy is a surrogate (W3C Edge Architecture): the
    origin's Surrogate-Control max-age / no-store, when present, decide for it instead
    of Cache-Control.

The store commits an object only when every byte [0, length) is present: the length
is the Content-Length when the origin gave one, else where the body ended (the last
chunk, or the origin's FIN with a close-delimited body).  What the Writer hashed is
exactly what was forwarded, since the tap sees the payload the engine forwards and a
copied body is stored from the buffer the proxy sent.
"""
from __future__ import annotations

import collections
import dataclasses
import ipaddress
import json
import logging
import os
import queue
import re
import threading

from ..proxy import http1
from . import policy
from .store import ABORTED, FILLING, Store

log = logging.getLogger("nfsplice.cache")

__all__ = ["Cache", "Fill", "Tee", "ChunkedDecoder", "cache_status", "response_head", "parse_range",
           "if_range_matches", "parse_networks", "surrogate_view", "surrogate_capability",
           "strip_surrogate", "OWNER_FILE", "MAX_PENDING"]

# Bytes of bodies queued for the writer thread, all fills together: past this a fill is
# given up rather than let the engine or a proxy thread wait for the disk.  The writer
# (one thread, into the page cache) falls behind a fill the fast path taps at full speed
# by about a third here (bench_cache: with 64 MiB a 256 MiB spliced miss was never
# stored); the queue only holds memory while the writer is behind.
MAX_PENDING = 1 << 30
# The running proxy's addresses, written into the cache directory for `nfsplice cache purge`.
OWNER_FILE = "proxy.json"

_END, _ABORT = object(), object()


def parse_networks(value) -> tuple:
    """IPv4 networks from "127.0.0.1/32,198.18.1.0/24" or a list of such strings (an
    address alone is a /32); ValueError saying which element is bad."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError(f"expected addresses or networks like [\"127.0.0.1/32\"], got {value!r}")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"expected address/prefix strings, got {item!r}")
        try:
            out.append(ipaddress.IPv4Network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item.strip()!r} is not an IPv4 address or network like 127.0.0.1/32") from None
    return tuple(out)


class Fill:
    """One response body being stored (see the module docstring).

    Tap sink calls, from the engine's queue thread (offsets in the spliced stream,
    which starts at body offset `base`): write(offset, data), close(length or None).
    Proxy calls (body offsets): body(offset, data), finish(length or None: the length
    given at the start, or whatever close() says), abort(reason).  None of them blocks.
    `settle(timeout)` waits until the object was committed or given up; `state` is
    FILLING, COMMITTED or ABORTED afterwards as the Writer's.
    """

    def __init__(self, cache: Cache, writer, expected: int | None):
        self.cache = cache
        self.writer = writer
        self.expected = expected
        self.base = 0
        self.failed = False          # queued pieces are being dropped (fell behind, aborted)
        self.ended = False           # the writer thread has committed or aborted it
        self._done = threading.Event()

    @property
    def key(self) -> str:
        return self.writer.key

    @property
    def state(self) -> str:
        return self.writer.state

    # -- the engine (tap sink) --------------------------------------------------------------
    def write(self, offset: int, data) -> None:
        self.cache._put(self, self.base + offset, data)

    def close(self, length: int | None) -> None:
        self.cache._put_end(self, _END, None if length is None else self.base + length)

    # -- the proxy ----------------------------------------------------------------------------
    def body(self, offset: int, data) -> None:
        self.cache._put(self, offset, data)

    def finish(self, length: int | None = None) -> None:
        self.cache._put_end(self, _END, length)

    def abort(self, reason: str) -> None:
        self.failed = True
        self.cache._put_end(self, _ABORT, reason)

    def settle(self, timeout: float) -> bool:
        """Wait until the writer thread committed or gave up this object."""
        return self._done.wait(timeout)


class Tee:
    """Two tap sinks fed the same stream (--tap-dir and the cache on one pair)."""

    def __init__(self, *sinks):
        self.sinks = sinks

    def write(self, offset: int, data) -> None:
        for s in self.sinks:
            s.write(offset, data)

    def close(self, length: int | None) -> None:
        for s in self.sinks:
            s.close(length)


class ChunkedDecoder:
    """The chunk data of a chunked body (RFC 9112 7.1), given the framed bytes in any
    split.  The proxy's own ChunkedScanner has checked every byte it passes on, so a
    framing error here means ours: `feed` returns no more data after one."""

    def __init__(self, limits: http1.Limits):
        self.scanner = http1.ChunkedScanner(upstream=True, limits=limits)
        self.offset = 0              # decoded bytes so far
        self.broken = False

    def feed(self, data) -> list[tuple[int, memoryview]]:
        """(decoded offset, data) pieces in DATA."""
        out = []
        mv = memoryview(data).cast("B")
        pos, n = 0, len(mv)
        sc = self.scanner
        try:
            while pos < n and not sc.done and not self.broken:
                left = sc.data_remaining
                if left:
                    take = min(left, n - pos)
                    out.append((self.offset, mv[pos:pos + take]))
                    sc.advance(take)
                    self.offset += take
                    pos += take
                else:
                    # Framing bytes one at a time: feed() would swallow the chunk data too.
                    pos += sc.feed(mv[pos:pos + 1])
        except http1.PeerError:
            self.broken = True
        return out

    @property
    def done(self) -> bool:
        return self.scanner.done and not self.broken


class Cache:
    """A store and everything around it for the listeners that use its directory.

    `counters` is the stats dict (cache.* keys; the service puts in its own once it has
    one), `config` what RFC 9111 leaves to the cache, `fsync` goes to the Store.  Raises
    StoreBusy / OSError / sqlite3.Error from the Store when the directory cannot be
    used (a configuration problem: the caller reports it with the option's name).
    """

    def __init__(self, path: str, max_bytes: int, counters=None, *,
                 config: policy.CacheConfig = policy.DEFAULT_CONFIG, fsync: bool = True,
                 max_pending: int = MAX_PENDING):
        self.store = Store(path, max_bytes, fsync=fsync)
        self.path = self.store.path
        self.config = config
        self.counters = counters if counters is not None else collections.Counter()
        self.max_pending = max_pending
        self._pending = 0
        self._lock = threading.Lock()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._leaders: dict[str, threading.Event] = {}
        self._revalidating: set[str] = set()
        self._seen = {"evicted": 0, "io_errors": 0}
        self._acct_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()
        if self.store.recovered and any(self.store.recovered.values()):
            log.info("cache %s: recovered after an unclean stop: %s", self.path,
                     ", ".join(f"{k}={v}" for k, v in self.store.recovered.items()))

    # -- keys and lookups ------------------------------------------------------------------
    def key(self, req: http1.Request) -> str | None:
        return policy.cache_key(req)

    def lookup(self, key: str, req: http1.Request):
        """The stored response for REQ (an Entry with its body open), or None; None
        once closed (connections still finishing while the proxy stops see misses)."""
        return None if self._closed else self.store.lookup(key, req.fields)

    def follow(self, key: str, req: http1.Request):
        return None if self._closed else self.store.follow(key, req.fields)

    # -- collapsed forwarding ----------------------------------------------------------------
    def lead(self, key: str) -> threading.Event | None:
        """None: the caller fetches KEY and must call `release(key)` once the response
        head decided whether it is stored (followers then find its Writer) or the
        fetch failed.  Else an Event to wait for before looking again."""
        with self._lock:
            ev = self._leaders.get(key)
            if ev is None:
                self._leaders[key] = threading.Event()
            return ev

    def release(self, key: str) -> None:
        with self._lock:
            ev = self._leaders.pop(key, None)
        if ev is not None:
            ev.set()

    # -- background revalidation (RFC 5861 3) ----------------------------------------------
    def start_revalidation(self, key: str) -> bool:
        """One background revalidation per key at a time: False if one is running."""
        with self._lock:
            if key in self._revalidating:
                return False
            self._revalidating.add(key)
            return True

    def end_revalidation(self, key: str) -> None:
        with self._lock:
            self._revalidating.discard(key)

    # -- storing -------------------------------------------------------------------------------
    def begin(self, key: str, stored: policy.StoredResponse, expected: int | None) -> Fill:
        """A Fill for the body of STORED under KEY (EXPECTED: its Content-Length)."""
        w = self.store.begin(key, stored.variant_key, stored.to_meta(), expected_length=expected)
        fill = Fill(self, w, expected)
        if w.state != FILLING:               # too large, or no temporary file
            fill.failed = fill.ended = True
            fill._done.set()
            self._account(w)
        return fill

    def update_headers(self, entry, stored: policy.StoredResponse) -> bool:
        ok = self.store.update_headers(entry, stored.to_meta())
        self._account(None)
        return ok

    def purge(self, key: str) -> int:
        n = self.store.purge(key)
        self._account(None)
        return n

    def invalidate(self, uris) -> int:
        n = sum(self.store.invalidate(u) for u in uris)
        self._account(None)
        return n

    def _put(self, fill: Fill, offset: int, data) -> None:
        """Queue a piece for the writer thread, never waiting: past max_pending bytes
        queued the fill is given up instead.  DATA is copied (the engine's receive
        buffer is reused once the packet has its verdict) unless nobody can change it:
        bytes, or a view of bytes (the clone tap's frames, runner.CloneFeeder)."""
        if fill.failed:
            return
        n = len(data)
        with self._lock:
            room = self._pending + n <= self.max_pending
            if room:
                self._pending += n
        if not room:
            fill.failed = True
            self._q.put((fill, _ABORT, "the cache writer fell behind"))
            return
        if not (type(data) is bytes or type(data) is memoryview and type(data.obj) is bytes):
            data = bytes(data)
        self._q.put((fill, offset, data))

    def _put_end(self, fill: Fill, what, arg) -> None:
        self._q.put((fill, what, arg))

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fill, what, arg = item
            if isinstance(what, int):
                with self._lock:
                    self._pending -= len(arg)
                if not fill.ended:
                    self._write(fill, what, arg)
            elif not fill.ended:
                if what is _END:
                    self._end(fill, arg)
                else:
                    self._give_up(fill, arg)

    def _write(self, fill: Fill, offset: int, data: bytes) -> None:
        w = fill.writer
        w.write(offset, data)
        if w.state != FILLING:
            self._ended(fill)
        elif fill.expected is not None and w.contiguous >= fill.expected:
            self._commit(fill, fill.expected)

    def _end(self, fill: Fill, length: int | None) -> None:
        """The body ended (close from the engine, finish from the proxy)."""
        if fill.expected is not None:
            length = fill.expected
        if length is None:
            self._give_up(fill, "the end of the body was never seen")
        else:
            self._commit(fill, length)

    def _commit(self, fill: Fill, length: int) -> None:
        w = fill.writer
        if w.commit(length):
            self.counters["cache.bytes_stored"] += length
            self.counters["cache.objects_stored"] += 1
        elif w.error and w.error.startswith("incomplete"):
            self.counters["cache.dropped_incomplete"] += 1
            log.debug("cache: %s not stored: %s", w.key, w.error)
        self._ended(fill)

    def _give_up(self, fill: Fill, reason: str) -> None:
        w = fill.writer
        if w.state == FILLING:
            w.abort(reason)
            self.counters["cache.dropped_incomplete"] += 1
            log.debug("cache: %s not stored: %s", w.key, reason)
        self._ended(fill)

    def _ended(self, fill: Fill) -> None:
        fill.ended = fill.failed = True
        self._account(fill.writer)
        fill._done.set()

    def _account(self, w) -> None:
        """Carry the store's eviction and I/O error counts into the stats dict, and say
        the first I/O error once (disk full: nothing more is stored, proxying goes on)."""
        st = self.store
        with self._acct_lock:
            for name, now in (("evicted", st.evicted), ("io_errors", st.io_errors)):
                delta = now - self._seen[name]
                if delta:
                    self._seen[name] = now
                    self.counters["cache.evictions" if name == "evicted" else "cache.io_errors"] += delta
        msg = st.take_io_error()
        if msg is not None:
            log.warning("%s; responses are still forwarded, only not stored (this is said once)", msg)
        if w is not None and w.state == ABORTED and w.error and "above the store's max_bytes" in w.error:
            self.counters["cache.too_large"] += 1

    # -- the owner file and closing ------------------------------------------------------------
    def write_owner(self, listen: list[tuple[str, int]]) -> None:
        """Say where the running proxy listens, for `nfsplice cache purge` (the store
        is locked by this process, so the command asks the proxy with PURGE)."""
        path = os.path.join(self.path, OWNER_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "listen": [list(a) for a in listen]}, f)
        os.replace(tmp, path)

    def close(self) -> None:
        """Stop the writer thread after what is queued, then close the store (bodies
        still filling are given up).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._q.put(None)
        self._thread.join(10)
        try:
            os.unlink(os.path.join(self.path, OWNER_FILE))
        except OSError:
            pass
        self.store.close()


# -- Surrogate-Control (W3C Edge Architecture 1.0, 2001) ------------------------------------------

SURROGATE_DIRECTIVES = ("max-age", "no-store")
_TARGET = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def surrogate_capability(device: str) -> str:
    """The request field a surrogate sends toward the origin: what it understands."""
    return f'{device}="Surrogate/1.0"'


def surrogate_view(msg, device: str | None):
    """MSG (a Response or StoredResponse) as the surrogate DEVICE decides on it: when a
    Surrogate-Control field has max-age or no-store for it (directives targeted at
    DEVICE with ";DEVICE" win over untargeted ones; those for other devices are
    ignored), they replace Cache-Control, which is then the clients' business only.
    MSG itself when DEVICE is None (not a reverse proxy) or nothing applies.  The
    stored and forwarded fields stay as received, without Surrogate-Control (it is
    for surrogates only: `strip_surrogate`)."""
    if device is None:
        return msg
    values = [v for n, v in msg.fields if n.lower() == "surrogate-control"]
    if not values:
        return msg
    mine, anyone = [], []
    for elem in _elements(", ".join(values)):
        directive, target = elem, None
        head, sep, tail = elem.rpartition(";")
        if sep and _TARGET.fullmatch(tail.strip()) and '"' not in tail:
            directive, target = head.strip(), tail.strip()
        if directive.split("=", 1)[0].strip().lower() not in SURROGATE_DIRECTIVES:
            continue
        if target is None:
            anyone.append(directive)
        elif target == device:
            mine.append(directive)
    chosen = mine or anyone
    if not chosen:
        return msg
    fields = tuple((n, v) for n, v in msg.fields if n.lower() != "cache-control")
    return dataclasses.replace(msg, fields=fields + (("Cache-Control", ", ".join(chosen)),))


def strip_surrogate(fields) -> tuple:
    return tuple((n, v) for n, v in fields if n.lower() != "surrogate-control")


def _elements(text: str) -> list[str]:
    """Comma-separated elements, commas inside quoted strings kept."""
    out, cur, quoted = [], [], False
    for c in text:
        if c == '"':
            quoted = not quoted
        if c == "," and not quoted:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    out.append("".join(cur).strip())
    return [e for e in out if e]


# -- heads of responses served from the cache ----------------------------------------------------

def cache_status(name: str, *, hit: bool = False, fwd: str | None = None, fwd_status: int | None = None,
                 stored: bool = False, collapsed: bool = False, ttl: float | None = None,
                 detail: str | None = None) -> str:
    """One RFC 9211 Cache-Status member: `nfsplice; hit; ttl=12`, `nfsplice; fwd=miss;
    stored`, `nfsplice; fwd=stale; fwd-status=304`.  DETAIL must be an sf-token (our
    reason slugs are)."""
    parts = [name]
    if hit:
        parts.append("hit")
    if fwd is not None:
        parts.append(f"fwd={fwd}")
    if fwd_status is not None:
        parts.append(f"fwd-status={fwd_status}")
    if stored:
        parts.append("stored")
    if collapsed:
        parts.append("collapsed")
    if ttl is not None:
        parts.append(f"ttl={int(ttl)}")
    if detail:
        parts.append(f"detail={detail}")
    return "; ".join(parts)


def response_head(status: int, reason: str, fields, *, via: str, status_value: str,
                  close: bool) -> bytes:
    """The head of a response the cache answers itself: stored fields as given, then
    Via (RFC 9110 7.6.3: the stored response came through us), our Cache-Status member
    (RFC 9211 2: appended after those of caches nearer the origin), Connection."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{n}: {v}" for n, v in fields]
    lines.append(f"Via: 1.1 {via}")
    lines.append(f"Cache-Status: {status_value}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_RANGE = re.compile(r"bytes[ \t]*=[ \t]*(.*)", re.I)
_SPEC = re.compile(r"([0-9]*)[ \t]*-[ \t]*([0-9]*)")


def parse_range(value: str, length: int):
    """A Range field (RFC 9110 14.1.1) against a representation of LENGTH bytes.

    Returns None to ignore it (not bytes, malformed, several ranges: then the whole
    representation is the answer, which 14.2 allows), "unsatisfiable" (416) or
    (first, last) inclusive for a single satisfiable range (a last-byte-pos past the
    end is cut to it; a suffix range larger than LENGTH is the whole)."""
    m = _RANGE.fullmatch(value.strip(" \t"))
    if m is None:
        return None
    specs = [s.strip(" \t") for s in m.group(1).split(",") if s.strip(" \t")]
    if len(specs) != 1:
        return None
    m = _SPEC.fullmatch(specs[0])
    if m is None or not (m.group(1) or m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if first:
        a = int(first)
        b = int(last) if last else length - 1
        if last and b < a:
            return None                      # invalid range-spec: ignore the field
        if a >= length:
            return "unsatisfiable"
        return a, min(b, length - 1)
    n = int(last)
    if n == 0 or length == 0:
        return "unsatisfiable"
    return max(0, length - n), length - 1


def if_range_matches(stored: policy.StoredResponse, value: str) -> bool:
    """If-Range (RFC 9110 13.1.5): a strong ETag equal to the stored one, or an
    HTTP-date equal to the stored Last-Modified (which must itself be strong: at
    least a second older than Date, 8.8.2.2)."""
    v = value.strip(" \t")
    if v.startswith('"') or v.startswith("W/"):
        etags = stored.values("ETag")
        return (not v.startswith("W/") and len(etags) == 1 and etags[0].strip(" \t") == v)
    since = policy.parse_http_date(v)
    lms = stored.values("Last-Modified")
    if since is None or len(lms) != 1:
        return False
    lm = policy.parse_http_date(lms[0])
    return lm is not None and lm == since and policy.date_value(stored) - lm >= 1
