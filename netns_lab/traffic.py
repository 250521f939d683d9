"""Byte-exact traffic for the lab's integrity tests: a pattern, a server and a client.

Pattern
-------
A stream is a function of a 32-bit seed.  Its 8-byte word number j (stream offset 8j) is
the big-endian u64 ``j XOR key(seed)``, key = splitmix64(seed).  Every word is unique in
its stream, so a lost, duplicated, reordered or corrupted byte shows up, and
`first_mismatch` names the absolute stream offset of the first wrong byte.  Upload
(client -> server) uses ``seed``, download (server -> client) ``seed ^ 0x5a5a5a5a``
(`upload_seed`, `download_seed`).

Protocol (one TCP connection)
-----------------------------
The client sends a 32-byte header, then the upload stream from offset 0 (the header is
not part of the stream).  The server reads the header and sends the download stream,
concurrently with receiving the upload.  Header, big-endian (struct ``>4sBBHQQII``)::

    0  4  magic     b"NFSP"
    4  1  version   1
    5  1  mode      0 client-first, 1 server-first, 2 reset
    6  2  reserved  0
    8  8  upload    bytes the client will send
   16  8  download  bytes the server will send
   24  4  seed      upload pattern seed (download uses seed ^ 0x5a5a5a5a)
   28  4  tag       chosen by the client; the server reports it, so its report can be
                    matched to the client's result also through a proxy (peer ports differ)

reset_at is not in the header: only the client needs it.

Close modes
-----------
client-first  The client sends its FIN after it has sent all and received all, then waits
              for the server's FIN.  The server closes only after EOF.
server-first  The server shuts down its write side (a half-close) after sending all; the
              client keeps uploading until done and sends its FIN only after it has seen
              the server's EOF.  The server closes after EOF.
reset         The client aborts (SO_LINGER {1,0} + close: RST) after receiving reset_at
              download bytes (clamped to the download size).  Neither side sends a FIN.
              What each side received must be a correct prefix; the server reports the
              reset as expected (reset=true, ok=true), an EOF instead as an error.
              With reset_at 0 the client first waits until its header is acknowledged
              (SIOCOUTQ), so that a server reached directly always sees it.  A reset
              that beats the header (possible through a proxy) gives a server report
              with tag null and error "connection reset before the header ...";
              `cross_check` accepts a missing report only for reset_at 0.

Anything received beyond the expected size is an error (first_bad_offset = expected size).
Every connection has a stall timeout (no progress for --timeout seconds, default 120):
the result then says how many bytes arrived (first_missing_offset).

CLI
---
    python -m netns_lab.traffic server --listen ADDR:PORT [--report FILE] [--once N] [--timeout S]
    python -m netns_lab.traffic client --connect ADDR:PORT --upload N --download N
        --mode client-first|server-first|reset|mixed [--reset-at N] [--seed S] [--count C]
        [--concurrency K] [--random-sizes MAX] [--sizes U:D,U:D,...] [--timeout S] [--json]

The server prints ``listening ADDR PORT`` on stdout once it accepts, then writes one JSON
line per finished connection to --report (stdout without it).  The client prints a
summary (JSON with --json) and exits 0 only when every connection is ok.

Python API: `pattern`, `first_mismatch`, `pattern_sha256`, `run_client`, `Server`,
`ServerProcess`, `cross_check`.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

MAGIC = b"NFSP"
VERSION = 1
HEADER = struct.Struct(">4sBBHQQII")
assert HEADER.size == 32
MODES = ("client-first", "server-first", "reset")
DOWNLOAD_XOR = 0x5A5A5A5A
CHUNK = 256 * 1024          # bytes per generated / verified block
DEFAULT_TIMEOUT = 120.0
_M64 = (1 << 64) - 1
_REPO = Path(__file__).resolve().parent.parent


# -- the pattern ------------------------------------------------------------------------
def pattern_key(seed: int) -> int:
    """splitmix64 of the seed: the value every word of the stream is XORed with."""
    z = (int(seed) + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def upload_seed(seed: int) -> int:
    return int(seed) & 0xFFFFFFFF


def download_seed(seed: int) -> int:
    return (int(seed) ^ DOWNLOAD_XOR) & 0xFFFFFFFF


_W = CHUNK // 8
# Word i of a block, stored so that its bytes in memory are big-endian: XORing a whole
# block with one constant then yields the stream bytes (bswap(a ^ b) = bswap(a) ^ bswap(b)).
_BASE = np.arange(_W, dtype=">u8").view(np.uint64)


def _expected(key: int, offset: int, n: int) -> np.ndarray:
    """Stream bytes [offset, offset+n) of the stream with this key, as a uint8 array."""
    if n <= 0:
        return np.empty(0, np.uint8)
    j0 = offset >> 3
    j1 = (offset + n + 7) >> 3
    s = offset - (j0 << 3)
    base = j0 - j0 % _W
    if j1 - base <= _W:
        # Inside one _W-aligned block: j = base | i, so j ^ key = i ^ (base ^ key).
        c = np.array([base ^ key], dtype=">u8").view(np.uint64)[0]
        w = np.bitwise_xor(_BASE[j0 - base:j1 - base], c)
    else:
        w = np.arange(j0, j1, dtype=np.uint64)
        np.bitwise_xor(w, np.uint64(key), out=w)
        w = w.astype(">u8")
    return w.view(np.uint8)[s:s + n]


def pattern(seed: int, offset: int, n: int) -> bytes:
    """Bytes [offset, offset+n) of the pattern stream of SEED."""
    if offset < 0 or n < 0:
        raise ValueError("offset and n must be >= 0")
    return _expected(pattern_key(seed), offset, n).tobytes()


def _first_mismatch_key(key: int, offset: int, data) -> int | None:
    a = np.frombuffer(data, np.uint8)
    step = 8 * CHUNK
    for start in range(0, len(a), step):
        part = a[start:start + step]
        e = _expected(key, offset + start, len(part))
        if (offset + start) % 8 == 0 and len(part) % 8 == 0:
            if np.array_equal(part.view(np.uint64), e.view(np.uint64)):
                continue
        elif np.array_equal(part, e):
            continue
        return offset + start + int(np.argmax(part != e))
    return None


def first_mismatch(seed: int, offset: int, data) -> int | None:
    """Absolute stream offset of the first byte of DATA (found at stream OFFSET) that is
    not the pattern of SEED, or None when all of it is right."""
    return _first_mismatch_key(pattern_key(seed), offset, data)


def pattern_sha256(seed: int, offset: int, n: int) -> str:
    """sha256 hex of pattern(seed, offset, n), computed in blocks."""
    h = hashlib.sha256()
    key = pattern_key(seed)
    step = 16 * CHUNK
    for start in range(offset, offset + n, step):
        h.update(_expected(key, start, min(step, offset + n - start)))
    return h.hexdigest()


# -- header -----------------------------------------------------------------------------
@dataclass
class Header:
    mode: str
    upload: int
    download: int
    seed: int
    tag: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, MODES.index(self.mode), 0, self.upload, self.download,
                           self.seed & 0xFFFFFFFF, self.tag & 0xFFFFFFFF)

    @classmethod
    def unpack(cls, data: bytes) -> "Header":
        magic, version, mode, _res, up, down, seed, tag = HEADER.unpack(data)
        if magic != MAGIC:
            raise ValueError(f"bad magic {magic!r}")
        if version != VERSION:
            raise ValueError(f"unsupported version {version}")
        if mode >= len(MODES):
            raise ValueError(f"bad mode {mode}")
        return cls(MODES[mode], up, down, seed, tag)


# -- stream halves ----------------------------------------------------------------------
class _Rx:
    """Receiving half: recv_into a block buffer, verify and hash each block."""

    def __init__(self, key: int, expected: int, limit: int | None = None):
        self.key, self.expected, self.limit = key, expected, limit
        size = CHUNK if (limit if limit is not None else expected) >= CHUNK else \
            (limit if limit is not None else expected) + 65536
        self.buf = bytearray(max(size, 1))
        self.mv = memoryview(self.buf)
        self.fill = 0
        self.pos = 0                      # stream offset of buf[0]
        self.sha = hashlib.sha256()
        self.first_bad: int | None = None
        self.excess = 0

    @property
    def received(self) -> int:
        return self.pos + self.fill

    def want(self) -> int:
        room = len(self.buf) - self.fill
        if self.limit is not None:
            room = min(room, self.limit - self.received)
        return room

    def recv(self, sock: socket.socket) -> int:
        """One recv_into; returns the byte count (0: EOF).  Raises BlockingIOError etc."""
        want = self.want()
        n = sock.recv_into(self.mv[self.fill:self.fill + want], want)
        self.fill += n
        if self.fill == len(self.buf):
            self.flush()
        return n

    def flush(self) -> None:
        if not self.fill:
            return
        data = self.mv[:self.fill]
        self.sha.update(data)
        valid = max(0, min(self.fill, self.expected - self.pos))
        if self.first_bad is None:
            fm = _first_mismatch_key(self.key, self.pos, data[:valid])
            if fm is not None:
                self.first_bad = fm
            elif self.fill > valid:
                self.first_bad = self.pos + valid
        self.excess += self.fill - valid
        self.pos += self.fill
        self.fill = 0


class _Tx:
    """Sending half: an optional prefix (the header), then the pattern in blocks."""

    def __init__(self, key: int, total: int, prefix: bytes = b""):
        self.key, self.total = key, total
        self.prefix = memoryview(prefix) if prefix else None
        self.gen = 0                     # pattern bytes generated so far
        self.cur: memoryview | None = None

    @property
    def sent(self) -> int:
        return self.gen - (len(self.cur) if self.cur is not None else 0)

    @property
    def prefix_done(self) -> bool:
        return self.prefix is None

    @property
    def done(self) -> bool:
        return self.prefix is None and self.sent >= self.total

    def send(self, sock: socket.socket, budget: int = 4 << 20) -> int:
        """Send until EAGAIN, done, or BUDGET bytes; returns bytes sent."""
        moved = 0
        while moved < budget:
            if self.prefix is not None:
                k = sock.send(self.prefix)
                moved += k
                self.prefix = self.prefix[k:] if k < len(self.prefix) else None
                continue
            if self.cur is None or not len(self.cur):
                if self.gen >= self.total:
                    self.cur = None
                    break
                n = min(CHUNK, self.total - self.gen)
                self.cur = memoryview(_expected(self.key, self.gen, n))
                self.gen += n
            k = sock.send(self.cur)
            moved += k
            self.cur = self.cur[k:]
        return moved


def _outq(sock: socket.socket) -> int:
    """Bytes written to SOCK and not yet acknowledged (SIOCOUTQ)."""
    import fcntl
    import termios
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def _is_reset(e: OSError) -> bool:
    return isinstance(e, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)) or \
        e.errno in (errno.ECONNRESET, errno.EPIPE)


def _addr(a) -> str:
    try:
        return f"{a[0]}:{a[1]}"
    except Exception:
        return str(a)


# -- connections ------------------------------------------------------------------------
class _Conn:
    """One connection driven by the event loop.  Subclasses set mask() and handlers."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock = sock
        self.timeout = timeout
        self.t0 = time.monotonic()
        self.last_progress = self.t0
        self.done = False
        self.error: str | None = None
        self.eof = False
        self.reset = False
        self.reg_mask = 0
        self.needs_poll = False        # advance() must be called again soon without an event

    def progress(self) -> None:
        self.last_progress = time.monotonic()

    def fail(self, msg: str) -> None:
        if self.error is None:
            self.error = msg
        self.finish()

    def finish(self) -> None:
        self.done = True

    def stalled(self) -> None:
        self.fail(f"timeout: no progress for {self.timeout:g} s")

    def mask(self) -> int:
        raise NotImplementedError

    def advance(self) -> None:
        pass

    def on_read(self) -> None:
        raise NotImplementedError

    def on_write(self) -> None:
        raise NotImplementedError

    def _shut_wr(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            if _is_reset(e):
                self.reset = True
            elif e.errno != errno.ENOTCONN:
                raise


@dataclass
class ConnSpec:
    upload: int
    download: int
    mode: str
    seed: int
    tag: int
    reset_at: int | None = None


class _ClientConn(_Conn):
    def __init__(self, index: int, spec: ConnSpec, dest: tuple[str, int], timeout: float,
                 bind: str | None = None):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        super().__init__(sock, timeout)
        self.index, self.spec = index, spec
        self.state = "connecting"
        self.local = None
        self.reset_sent = False
        hdr = Header(spec.mode, spec.upload, spec.download, spec.seed, spec.tag).pack()
        self.tx = _Tx(pattern_key(upload_seed(spec.seed)), spec.upload, hdr)
        limit = spec.reset_at if spec.mode == "reset" else None
        self.rx = _Rx(pattern_key(download_seed(spec.seed)), spec.download, limit)
        sock.setblocking(False)
        if bind:
            sock.bind((bind, 0))
        rc = sock.connect_ex(dest)
        if rc not in (0, errno.EINPROGRESS):
            self.fail(f"connect: {os.strerror(rc)}")

    def mask(self) -> int:
        if self.state == "connecting":
            return selectors.EVENT_WRITE
        m = 0
        if not self.eof and self.rx.want() > 0:
            m |= selectors.EVENT_READ
        if not self.tx.done and self.state == "running":
            m |= selectors.EVENT_WRITE
        return m

    def on_write(self) -> None:
        if self.state == "connecting":
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return self.fail(f"connect: {os.strerror(err)}")
            self.state = "running"
            try:
                self.local = _addr(self.sock.getsockname())
            except OSError:
                pass
            self.progress()
        try:
            if self.tx.send(self.sock):
                self.progress()
        except BlockingIOError:
            pass
        except OSError as e:
            if _is_reset(e):
                self.reset = True
                return self.fail(f"connection reset while sending ({e.strerror})")
            return self.fail(f"send: {e}")
        self.advance()

    def on_read(self) -> None:
        moved = 0
        try:
            while moved < (4 << 20) and self.rx.want() > 0:
                n = self.rx.recv(self.sock)
                if n == 0:
                    self.eof = True
                    self.rx.flush()
                    break
                moved += n
        except BlockingIOError:
            pass
        except OSError as e:
            self.rx.flush()
            if _is_reset(e):
                self.reset = True
                return self.fail(f"connection reset by peer after {self.rx.received} download bytes")
            return self.fail(f"recv: {e}")
        if moved or self.eof:
            self.progress()
        self.advance()

    def advance(self) -> None:
        if self.done or self.state == "connecting":
            return
        mode, rx, tx = self.spec.mode, self.rx, self.tx
        if mode == "reset":
            if rx.received >= self.spec.reset_at and tx.prefix_done:
                if self.spec.reset_at == 0 and _outq(self.sock) > tx.sent:
                    # Nothing will come back to prove the server has the header: wait until
                    # the header is acknowledged (data the peer's kernel holds is read
                    # before the RST's error), so the server can report the reset.
                    self.needs_poll = True
                    return
                self.needs_poll = False
                rx.flush()
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.reset_sent = True
                return self.finish()          # the loop closes the socket: RST
            if self.eof:
                return self.fail(f"eof after {rx.received} download bytes, before reset_at={self.spec.reset_at}")
            return
        if self.eof and rx.received < self.spec.download:
            return self.fail(f"eof after {rx.received} of {self.spec.download} download bytes")
        if mode == "client-first":
            if self.state == "running":
                if self.eof:
                    return self.fail("server closed first (client-first mode)")
                if tx.done and rx.received >= self.spec.download:
                    rx.flush()
                    self._shut_wr()
                    self.state = "wait-eof"
            elif self.state == "wait-eof" and self.eof:
                return self.finish()
        else:  # server-first: FIN only after the server's EOF and all upload sent
            if self.eof and tx.done:
                self._shut_wr()
                return self.finish()

    def stalled(self) -> None:
        self.rx.flush()
        what = {"connecting": "connect", "wait-eof": "server EOF"}.get(self.state, "transfer")
        self.fail(f"timeout: no progress for {self.timeout:g} s ({what}; "
                  f"{self.rx.received} download bytes received, {self.tx.sent} upload bytes sent)")

    def result(self) -> dict:
        s, rx = self.spec, self.rx
        rx.flush()
        expected = s.reset_at if s.mode == "reset" else s.download
        ok = (self.error is None and rx.first_bad is None and rx.received == expected
              and (self.reset_sent if s.mode == "reset" else self.eof))
        return {
            "index": self.index, "tag": s.tag, "seed": s.seed, "mode": s.mode,
            "upload": s.upload, "download": s.download, "reset_at": s.reset_at if s.mode == "reset" else None,
            "local": self.local,
            "sent": self.tx.sent, "received": rx.received, "expected_received": expected,
            "download_sha256": rx.sha.hexdigest(),
            "first_bad_offset": rx.first_bad,
            "first_missing_offset": rx.received if rx.received < expected else None,
            "eof": self.eof, "reset": self.reset or self.reset_sent, "error": self.error, "ok": ok,
            "elapsed": round(time.monotonic() - self.t0, 6),
        }


class _ServerConn(_Conn):
    def __init__(self, cid: int, sock: socket.socket, peer, timeout: float):
        super().__init__(sock, timeout)
        self.cid = cid
        self.peer = _addr(peer)
        try:
            self.local = _addr(sock.getsockname())
        except OSError:
            self.local = None
        sock.setblocking(False)
        self.hbuf = bytearray()
        self.hdr: Header | None = None
        self.rx: _Rx | None = None
        self.tx: _Tx | None = None
        self.shut = False

    def mask(self) -> int:
        if self.hdr is None:
            return selectors.EVENT_READ
        m = 0 if self.eof else selectors.EVENT_READ
        if not self.tx.done:
            m |= selectors.EVENT_WRITE
        return m

    def _on_reset(self, e: OSError) -> None:
        if self.rx is not None:
            self.rx.flush()
        self.reset = True
        if self.hdr is None:
            return self.fail(f"connection reset before the header was complete ({len(self.hbuf)} bytes)")
        if self.hdr.mode == "reset":
            return self.finish()
        self.fail(f"connection reset ({e.strerror})")

    def on_read(self) -> None:
        try:
            if self.hdr is None:
                chunk = self.sock.recv(HEADER.size - len(self.hbuf))
                if not chunk:
                    self.eof = True
                    return self.fail(f"eof before the header was complete ({len(self.hbuf)} bytes)")
                self.hbuf += chunk
                self.progress()
                if len(self.hbuf) < HEADER.size:
                    return
                try:
                    self.hdr = h = Header.unpack(bytes(self.hbuf))
                except (ValueError, struct.error) as e:
                    return self.fail(f"bad header: {e}")
                self.rx = _Rx(pattern_key(upload_seed(h.seed)), h.upload)
                self.tx = _Tx(pattern_key(download_seed(h.seed)), h.download)
                self.on_write()
                if self.done:
                    return
            moved = 0
            while moved < (4 << 20):
                n = self.rx.recv(self.sock)
                if n == 0:
                    self.eof = True
                    self.rx.flush()
                    break
                moved += n
            if moved:
                self.progress()
        except BlockingIOError:
            pass
        except OSError as e:
            if _is_reset(e):
                return self._on_reset(e)
            return self.fail(f"recv: {e}")
        self.advance()

    def on_write(self) -> None:
        if self.tx is None:
            return
        try:
            if self.tx.send(self.sock):
                self.progress()
        except BlockingIOError:
            pass
        except OSError as e:
            if _is_reset(e):
                return self._on_reset(e)
            return self.fail(f"send: {e}")
        self.advance()

    def advance(self) -> None:
        if self.done or self.hdr is None:
            return
        h, rx, tx = self.hdr, self.rx, self.tx
        if tx.done and h.mode == "server-first" and not self.shut:
            self.shut = True
            self._shut_wr()
            self.progress()
        if not self.eof:
            return
        rx.flush()
        if h.mode == "reset":
            return self.fail(f"eof after {rx.received} upload bytes; expected a reset")
        if rx.received < h.upload:
            return self.fail(f"eof after {rx.received} of {h.upload} upload bytes")
        if not tx.done:
            return self.fail(f"eof while {h.download - tx.sent} download bytes were unsent")
        if not self.shut:
            self.shut = True
            self._shut_wr()
        self.finish()

    def stalled(self) -> None:
        if self.rx is not None:
            self.rx.flush()
        rx = self.rx.received if self.rx else 0
        tx = self.tx.sent if self.tx else 0
        self.fail(f"timeout: no progress for {self.timeout:g} s "
                  f"({rx} upload bytes received, {tx} download bytes sent)")

    def result(self) -> dict:
        h, rx, tx = self.hdr, self.rx, self.tx
        if rx is not None:
            rx.flush()
        up_exp = h.upload if h else None
        received = rx.received if rx else 0
        if h is None:
            ok = False
        elif h.mode == "reset":
            ok = self.error is None and self.reset and rx.first_bad is None
        else:
            ok = (self.error is None and rx.first_bad is None and self.eof and received == h.upload
                  and tx.sent == h.download)
        return {
            "conn": self.cid, "peer": self.peer, "local": self.local,
            "tag": h.tag if h else None, "seed": h.seed if h else None, "mode": h.mode if h else None,
            "upload_expected": up_exp, "upload_received": received,
            "upload_sha256": rx.sha.hexdigest() if rx else None,
            "first_bad_offset": rx.first_bad if rx else None,
            "first_missing_offset": received if (h and received < h.upload) else None,
            "download_expected": h.download if h else None, "download_sent": tx.sent if tx else 0,
            "eof": self.eof, "reset": self.reset, "reset_expected": (h.mode == "reset") if h else None,
            "error": self.error, "ok": ok,
            "elapsed": round(time.monotonic() - self.t0, 6),
        }


class _Loop:
    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.conns: set[_Conn] = set()

    def add(self, conn: _Conn, on_done: Callable[[_Conn], None]) -> None:
        conn.on_done = on_done
        self.conns.add(conn)
        self.update(conn)

    def update(self, conn: _Conn) -> None:
        if conn.done:
            if conn.reg_mask:
                self.sel.unregister(conn.sock)
                conn.reg_mask = 0
            if conn in self.conns:
                self.conns.discard(conn)
                try:
                    conn.sock.close()
                except OSError:
                    pass
                conn.on_done(conn)
            return
        m = conn.mask()
        if m == conn.reg_mask:
            return
        if not conn.reg_mask:
            self.sel.register(conn.sock, m, conn)
        elif not m:
            self.sel.unregister(conn.sock)
        else:
            self.sel.modify(conn.sock, m, conn)
        conn.reg_mask = m

    def step(self, timeout: float, on_accept: Callable[[socket.socket], None] | None = None) -> None:
        polled = [c for c in self.conns if c.needs_poll]
        if polled:
            timeout = min(timeout, 0.002)
        for conn in polled:
            if not conn.done:
                conn.advance()
                self.update(conn)
        for key, ev in self.sel.select(timeout):
            conn = key.data
            if conn is None:          # a listening socket
                on_accept(key.fileobj)
                continue
            if conn.done:
                continue
            try:
                if ev & selectors.EVENT_READ:
                    conn.on_read()
                if ev & selectors.EVENT_WRITE and not conn.done:
                    conn.on_write()
            except Exception as e:   # a bug must not take the other connections down
                conn.fail(f"internal error: {e!r}")
            self.update(conn)

    def check_stalls(self) -> None:
        now = time.monotonic()
        for conn in list(self.conns):
            if not conn.done and now - conn.last_progress > conn.timeout:
                conn.stalled()
                self.update(conn)

    def fail_all(self, msg: str) -> None:
        for conn in list(self.conns):
            conn.fail(msg)
            self.update(conn)


def _raise_nofile() -> None:
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def _parse_hostport(s: str | tuple) -> tuple[str, int]:
    if isinstance(s, tuple):
        return (s[0], int(s[1]))
    host, _, port = s.rpartition(":")
    if not host or not port:
        raise ValueError(f"expected ADDR:PORT, got {s!r}")
    return (host.strip("[]"), int(port))


# -- server -----------------------------------------------------------------------------
class Server:
    """The traffic server, in-process.  `serve()` runs until stop() or ONCE connections."""

    def __init__(self, listen: str | tuple = ("0.0.0.0", 0), report: Callable[[dict], None] | None = None,
                 once: int | None = None, timeout: float = DEFAULT_TIMEOUT):
        _raise_nofile()
        self.addr = _parse_hostport(listen)
        self.report = report or (lambda r: None)
        self.once = once
        self.timeout = timeout
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(self.addr)
        self.lsock.listen(4096)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.finished = 0
        self.results: list[dict] = []
        self._next_id = 0
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()

    def _accept(self, lsock: socket.socket, loop: _Loop) -> None:
        for _ in range(256):
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self._next_id += 1
            conn = _ServerConn(self._next_id, sock, peer, self.timeout)
            loop.add(conn, self._done)

    def _done(self, conn: _ServerConn) -> None:
        r = conn.result()
        self.results.append(r)
        self.finished += 1
        self.report(r)

    def serve(self) -> None:
        loop = _Loop()
        loop.sel.register(self.lsock, selectors.EVENT_READ, None)
        loop.sel.register(self._wake_r, selectors.EVENT_READ, None)
        last_check = time.monotonic()

        def on_accept(fileobj):
            if fileobj is self._wake_r:
                self._wake_r.recv(64)
            else:
                self._accept(fileobj, loop)

        try:
            while not self._stop.is_set() and (self.once is None or self.finished < self.once):
                loop.step(0.25, on_accept)
                if time.monotonic() - last_check >= 0.25:
                    last_check = time.monotonic()
                    loop.check_stalls()
        finally:
            loop.fail_all("server stopped")
            loop.sel.close()
            self.lsock.close()

    def stop(self) -> None:
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def start_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve, name="traffic-server", daemon=True)
        t.start()
        return t


# -- client -----------------------------------------------------------------------------
def _rand_size(rng: np.random.Generator, max_size: int) -> int:
    """0 with probability 1/16, else log-uniform over [1, MAX] (small and large sizes)."""
    if max_size <= 0 or rng.random() < 1 / 16:
        return 0
    return min(max_size, int(np.exp(rng.random() * np.log(max_size + 1))))


def make_specs(*, upload: int = 0, download: int = 0, mode: str = "client-first", reset_at: int | None = None,
               seed: int = 1, count: int = 1, random_sizes: int | None = None,
               sizes: Iterable[tuple[int, int]] | None = None, tag_base: int | None = None) -> list[ConnSpec]:
    """The per-connection plan run_client follows (deterministic given seed and tag_base).

    Connection i gets seed (SEED + i) and tag (TAG_BASE + i).  SIZES (a list of
    (upload, download)) overrides COUNT/UPLOAD/DOWNLOAD; RANDOM_SIZES=MAX draws both sizes
    per connection.  MODE "mixed" draws a mode per connection.  In reset mode reset_at is
    min(RESET_AT, download), or download//2 (random in [0, download] with random sizes)."""
    if mode not in MODES + ("mixed",):
        raise ValueError(f"mode must be one of {MODES + ('mixed',)}")
    rng = np.random.default_rng(seed & 0xFFFFFFFF)
    if tag_base is None:
        tag_base = int.from_bytes(os.urandom(4), "big")
    if sizes is not None:
        plan = [(int(u), int(d)) for u, d in sizes]
    elif random_sizes is not None:
        plan = [(_rand_size(rng, random_sizes), _rand_size(rng, random_sizes)) for _ in range(count)]
    else:
        plan = [(upload, download)] * count
    specs = []
    for i, (up, down) in enumerate(plan):
        m = MODES[int(rng.integers(0, 3))] if mode == "mixed" else mode
        ra = None
        if m == "reset":
            if reset_at is not None:
                ra = min(reset_at, down)
            elif random_sizes is not None:
                ra = int(rng.integers(0, down + 1))
            else:
                ra = down // 2
        specs.append(ConnSpec(up, down, m, (seed + i) & 0xFFFFFFFF, (tag_base + i) & 0xFFFFFFFF, ra))
    return specs


def _run_specs(dest: tuple[str, int], specs: list[ConnSpec], concurrency: int, timeout: float,
               total_timeout: float | None, bind: str | None) -> list[dict]:
    _raise_nofile()
    loop = _Loop()
    results: list[dict | None] = [None] * len(specs)
    pending = list(enumerate(specs))
    pending.reverse()
    active = 0

    def done(conn: _ClientConn) -> None:
        nonlocal active
        active -= 1
        results[conn.index] = conn.result()

    t_end = time.monotonic() + total_timeout if total_timeout else None
    last_check = time.monotonic()
    try:
        while pending or active:
            while pending and active < max(1, concurrency):
                i, spec = pending.pop()
                active += 1
                loop.add(_ClientConn(i, spec, dest, timeout, bind), done)
            if active:
                loop.step(0.25)
            now = time.monotonic()
            if now - last_check >= 0.25:
                last_check = now
                loop.check_stalls()
            if t_end is not None and now > t_end:
                loop.fail_all(f"total timeout ({total_timeout:g} s)")
                for i, spec in pending:
                    results[i] = {"index": i, "tag": spec.tag, "seed": spec.seed, "mode": spec.mode,
                                  "upload": spec.upload, "download": spec.download, "ok": False,
                                  "error": "not started (total timeout)"}
                pending = []
    finally:
        loop.fail_all("client aborted")
        loop.sel.close()
    return results  # type: ignore[return-value]


def run_client(connect: str | tuple, *, upload: int = 0, download: int = 0, mode: str = "client-first",
               reset_at: int | None = None, seed: int = 1, count: int = 1, concurrency: int = 1,
               random_sizes: int | None = None, sizes: Iterable[tuple[int, int]] | None = None,
               timeout: float = DEFAULT_TIMEOUT, total_timeout: float | None = None,
               tag_base: int | None = None, bind: str | None = None, netns: str | None = None) -> dict:
    """Run the client and return its summary (what `client --json` prints).

    With NETNS, runs ``python -m netns_lab.traffic client`` under ``ip netns exec NETNS``
    and parses its JSON.  Summary: ok, n_ok, n_failed, failed (indices), bytes_up,
    bytes_down, elapsed, gbit_s, connections: one dict per connection with index, tag,
    seed, mode, upload, download, reset_at, local, sent, received, expected_received,
    download_sha256, first_bad_offset, first_missing_offset, eof, reset, error, ok."""
    if tag_base is None:
        tag_base = int.from_bytes(os.urandom(4), "big")
    sizes = None if sizes is None else [(int(u), int(d)) for u, d in sizes]
    if netns is not None:
        host, port = _parse_hostport(connect)
        argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "netns_lab.traffic", "client",
                "--connect", f"{host}:{port}", "--upload", str(upload), "--download", str(download),
                "--mode", mode, "--seed", str(seed), "--count", str(count), "--concurrency", str(concurrency),
                "--timeout", str(timeout), "--tag-base", str(tag_base), "--json"]
        if reset_at is not None:
            argv += ["--reset-at", str(reset_at)]
        if random_sizes is not None:
            argv += ["--random-sizes", str(random_sizes)]
        if sizes is not None:
            argv += ["--sizes", ",".join(f"{u}:{d}" for u, d in sizes)]
        if total_timeout is not None:
            argv += ["--total-timeout", str(total_timeout)]
        if bind:
            argv += ["--bind", bind]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
        p = subprocess.run(argv, capture_output=True, env=env, cwd=str(_REPO),
                           timeout=(total_timeout + 60) if total_timeout else None)
        try:
            return json.loads(p.stdout)
        except ValueError:
            raise RuntimeError(f"traffic client in {netns} exited {p.returncode} without a summary: "
                               f"{p.stderr.decode(errors='replace')[-2000:]}") from None
    dest = _parse_hostport(connect)
    specs = make_specs(upload=upload, download=download, mode=mode, reset_at=reset_at, seed=seed,
                       count=count, random_sizes=random_sizes, sizes=sizes, tag_base=tag_base)
    t0 = time.monotonic()
    results = _run_specs(dest, specs, concurrency, timeout, total_timeout, bind)
    elapsed = time.monotonic() - t0
    up = sum(r.get("sent", 0) for r in results)
    down = sum(r.get("received", 0) for r in results)
    failed = [r["index"] for r in results if not r["ok"]]
    return {
        "ok": not failed, "connect": _addr(dest), "count": len(results), "concurrency": concurrency,
        "n_ok": len(results) - len(failed), "n_failed": len(failed), "failed": failed,
        "bytes_up": up, "bytes_down": down, "elapsed": round(elapsed, 6),
        "gbit_s": round((up + down) * 8 / elapsed / 1e9, 3) if elapsed > 0 else None,
        "connections": results,
    }


# -- checking client results against server reports -------------------------------------
def cross_check(summary: dict, reports: Iterable[dict]) -> list[str]:
    """Problems found comparing a client summary with the server's reports (matched by
    tag); an empty list means both sides agree that every connection was byte-exact."""
    by_tag: dict[int, dict] = {}
    for r in reports:
        if r.get("tag") is not None:
            by_tag[r["tag"]] = r
    problems = []
    for c in summary["connections"]:
        name = f"conn {c['index']} (tag {c['tag']}, {c['mode']}, up {c['upload']}, down {c['download']})"
        if not c["ok"]:
            problems.append(f"{name}: client: error={c.get('error')} first_bad={c.get('first_bad_offset')} "
                            f"received={c.get('received')}/{c.get('expected_received')}")
        r = by_tag.get(c["tag"])
        if r is None:
            if c["ok"] and c["mode"] == "reset" and c.get("reset_at") == 0:
                continue    # reset before the server could read anything: nothing to report
            problems.append(f"{name}: no server report")
            continue
        if not r["ok"]:
            problems.append(f"{name}: server: error={r.get('error')} first_bad={r.get('first_bad_offset')} "
                            f"received={r.get('upload_received')}/{r.get('upload_expected')}")
        if r.get("seed") != c["seed"] or r.get("mode") != c["mode"]:
            problems.append(f"{name}: server saw seed {r.get('seed')} mode {r.get('mode')}")
        if c["mode"] != "reset":
            if r.get("upload_received") != c["upload"]:
                problems.append(f"{name}: server received {r.get('upload_received')} of {c['upload']}")
        elif c.get("sent") is not None and r.get("upload_received", 0) > c["sent"]:
            problems.append(f"{name}: server received {r['upload_received']} > {c['sent']} sent")
        if c.get("received") is not None and r.get("download_sent", 0) < c["received"]:
            problems.append(f"{name}: client received {c['received']} > {r.get('download_sent')} server sent")
    return problems


# -- server as a subprocess (optionally in a namespace) -----------------------------------
class ServerProcess:
    """``python -m netns_lab.traffic server`` in namespace NS of LAB (or here when ns is None).

        with ServerProcess(lab, lab.origin, ORIGIN_ADDR, 5001) as srv:
            s = run_client(srv.target, download=1 << 20, netns=lab.client)
            assert not srv.check(s)

    PORT 0 picks a free port (srv.port).  The report goes to REPORT_PATH (a temporary file
    when None); reports() reads it, wait_reports()/check() wait for the server to finish
    the connections of a client summary."""

    def __init__(self, lab=None, ns: str | None = None, addr: str = "0.0.0.0", port: int = 0,
                 report_path: str | os.PathLike | None = None, *, once: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT, start_timeout: float = 10.0):
        self.lab, self.ns, self.addr, self.port = lab, ns, addr, port
        self.once, self.timeout, self.start_timeout = once, timeout, start_timeout
        self._tmpdir = None
        if report_path is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="traffic-")
            report_path = os.path.join(self._tmpdir.name, "report.jsonl")
        self.report_path = Path(report_path)
        self.proc: subprocess.Popen | None = None
        self._stderr = None

    @property
    def target(self) -> str:
        """ADDR:PORT to connect to."""
        return f"{self.addr}:{self.port}"

    def start(self) -> "ServerProcess":
        self.report_path.write_text("")
        argv = [sys.executable, "-u", "-m", "netns_lab.traffic", "server", "--listen", f"{self.addr}:{self.port}",
                "--report", str(self.report_path), "--timeout", str(self.timeout)]
        if self.once is not None:
            argv += ["--once", str(self.once)]
        if self.ns is not None:
            argv = (self.lab.cmd(self.ns, *argv) if self.lab is not None else ["ip", "netns", "exec", self.ns, *argv])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._stderr, env=env, cwd=str(_REPO))
        line = self._readline(self.start_timeout)
        parts = line.split()
        if len(parts) != 3 or parts[0] != "listening":
            self.stop()
            raise RuntimeError(f"traffic server did not start: {line!r} {self.stderr_text()[-2000:]}")
        self.port = int(parts[2])
        return self

    def _readline(self, timeout: float) -> str:
        import select
        fd = self.proc.stdout.fileno()
        buf = b""
        end = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            b = os.read(fd, 256)
            if not b:
                break
            buf += b
        return buf.decode(errors="replace").strip()

    def stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def reports(self) -> list[dict]:
        out = []
        try:
            text = self.report_path.read_text()
        except FileNotFoundError:
            return out
        for line in text.splitlines(keepends=True):
            if line.endswith("\n") and line.strip():
                out.append(json.loads(line))
        return out

    def wait_reports(self, tags: Iterable[int] | None = None, n: int | None = None,
                     timeout: float = 30.0) -> list[dict]:
        """Reports, once all TAGS (or N reports) are there or TIMEOUT passed."""
        tags = set(tags) if tags is not None else None
        end = time.monotonic() + timeout
        while True:
            reps = self.reports()
            have = {r.get("tag") for r in reps}
            if (tags is None or tags <= have) and (n is None or len(reps) >= n):
                return reps
            if time.monotonic() > end or (self.proc is not None and self.proc.poll() is not None):
                return reps
            time.sleep(0.02)

    def check(self, summary: dict, timeout: float = 30.0) -> list[str]:
        """cross_check(summary, reports) after waiting for the reports of SUMMARY's
        connections (a reset-at-0 connection may have none)."""
        tags = {c["tag"] for c in summary["connections"] if not (c["mode"] == "reset" and c.get("reset_at") == 0)}
        return cross_check(summary, self.wait_reports(tags, timeout=timeout))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._stderr is not None:
            self._stderr.close()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()


# -- CLI --------------------------------------------------------------------------------
def _size(s: str) -> int:
    s = s.strip()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    if s and s[-1].lower() in mult:
        return int(float(s[:-1]) * mult[s[-1].lower()])
    if s.lower().endswith(("kib", "mib", "gib")):
        return int(float(s[:-3]) * mult[s[-3].lower()])
    return int(s)


def _cmd_server(a) -> int:
    out = open(a.report, "a", buffering=1) if a.report else sys.stdout
    lock = threading.Lock()

    def report(r: dict) -> None:
        with lock:
            out.write(json.dumps(r) + "\n")
            out.flush()

    srv = Server(a.listen, report, once=a.once, timeout=a.timeout)
    signal.signal(signal.SIGTERM, lambda *_: srv.stop())
    signal.signal(signal.SIGINT, lambda *_: srv.stop())
    print(f"listening {srv.addr[0]} {srv.port}", flush=True)
    srv.serve()
    if out is not sys.stdout:
        out.close()
    return 0


def _cmd_client(a) -> int:
    sizes = None
    if a.sizes:
        sizes = [tuple(_size(x) for x in item.split(":")) for item in a.sizes.split(",") if item]
    s = run_client(a.connect, upload=a.upload, download=a.download, mode=a.mode, reset_at=a.reset_at,
                   seed=a.seed, count=a.count, concurrency=a.concurrency, random_sizes=a.random_sizes,
                   sizes=sizes, timeout=a.timeout, total_timeout=a.total_timeout, tag_base=a.tag_base,
                   bind=a.bind)
    if a.json:
        json.dump(s, sys.stdout)
        sys.stdout.write("\n")
    else:
        for c in s["connections"]:
            if not c["ok"]:
                print(f"FAIL conn {c['index']} {c['mode']} up={c['upload']} down={c['download']} "
                      f"received={c.get('received')} first_bad={c.get('first_bad_offset')} error={c.get('error')}")
        print(f"{s['n_ok']}/{s['count']} ok, {s['bytes_up']} B up, {s['bytes_down']} B down, "
              f"{s['elapsed']:.3f} s, {s['gbit_s']} Gbit/s")
    return 0 if s["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m netns_lab.traffic", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("server", help="accept connections and serve the pattern")
    ps.add_argument("--listen", required=True, help="ADDR:PORT (PORT 0: any free port)")
    ps.add_argument("--report", help="JSON lines file, one line per finished connection (default stdout)")
    ps.add_argument("--once", type=int, help="exit after N finished connections")
    ps.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="stall timeout per connection (s)")
    pc = sub.add_parser("client", help="run connections and verify them")
    pc.add_argument("--connect", required=True, help="ADDR:PORT")
    pc.add_argument("--upload", type=_size, default=0)
    pc.add_argument("--download", type=_size, default=0)
    pc.add_argument("--mode", choices=MODES + ("mixed",), default="client-first")
    pc.add_argument("--reset-at", type=_size, help="reset mode: RST after this many download bytes")
    pc.add_argument("--seed", type=int, default=1)
    pc.add_argument("--count", type=int, default=1)
    pc.add_argument("--concurrency", type=int, default=1)
    pc.add_argument("--random-sizes", type=_size, metavar="MAX", help="random upload/download sizes up to MAX")
    pc.add_argument("--sizes", help="explicit per-connection sizes U:D,U:D,... (overrides count/upload/download)")
    pc.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="stall timeout per connection (s)")
    pc.add_argument("--total-timeout", type=float, help="deadline for the whole run (s)")
    pc.add_argument("--tag-base", type=int, help="tag of connection 0 (default random)")
    pc.add_argument("--bind", help="local address to bind")
    pc.add_argument("--json", action="store_true", help="print the JSON summary")
    a = p.parse_args(argv)
    return _cmd_server(a) if a.cmd == "server" else _cmd_client(a)


if __name__ == "__main__":
    sys.exit(main())
