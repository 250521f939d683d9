"""The cache store: bodies in files, metadata in sqlite3, safe against a crash at any moment.

Layout of the store directory:

    index.sqlite            one row per stored response (table `entries`, below)
    objects/XX/<name>       bodies; <name> is random, XX its first two hex digits
    tmp/<name>.part         bodies being written (by a `Writer`)
    lock                    flock(2): one process per store (`StoreBusy` otherwise)

A row: key (the primary cache key, `policy.cache_key`), variant_key (the secondary key,
`policy.variant_key`; "" without Vary), file, size, sha256, meta (JSON: the caller's,
for HTTP `policy.StoredResponse.to_meta()`), stored_at and an LRU counter.  One row
per (key, variant_key): committing a new body for it replaces the old one.

Writing (`begin` -> `Writer`): pieces arrive at their offsets, in any order and any
number of times, as TCP Tap delivers them; each byte is written once (the first copy
wins, later copies of it are skipped), so bytes a reader already saw never change.
`commit(length, sha256)` succeeds only when every byte of [0, length) is there and
the sha256 of exactly those bytes matches; the digest is computed as the contiguous
prefix grows (from memory when pieces come in order, read back from the file when a
hole is filled), so committing a large object does not read it again.

Crash safety: a SIGKILL (or, with `fsync=True`, a power loss) at any moment never
leaves a row naming a partial or wrong body:

    1. the body is written to tmp/<name>.part and, with fsync, fsync'ed;
    2. it is renamed to objects/XX/<name> and the directory fsync'ed;
    3. one sqlite transaction inserts its row, deletes the row it replaces and the rows
       evicted to make room; only then
    4. the replaced and evicted files are unlinked.

A crash before 3 leaves a file no row names; a crash between 3 and 4 leaves files of
deleted rows.  Opening a store removes everything in tmp/, every file under objects/
that no row names, and every row whose file is missing or has another size (so even
a lost, not yet synced transaction cannot leave a row pointing nowhere); `verify=True`
also re-hashes every body.  The index runs in WAL mode with synchronous=NORMAL:
atomic and consistent after any crash, where a power loss may forget the last few
transactions, which for a cache only means a few misses.

I/O errors (ENOSPC, EIO, a full or broken index) while writing or committing abort
that object, never raise to the caller (the forwarding path), and are recorded:
`take_io_error()` returns the first one once, for a single log line; `io_errors`
counts them all.

Eviction: committed bodies total at most `max_bytes` (bodies still being written are
not counted); a commit evicts least recently used rows (lookup and `touch` refresh an
entry) in the same transaction.  An entry being read is never cut short: `lookup`
returns an open file descriptor, and unlinking a file that is open is harmless on
Linux, the reader keeps the whole body until it closes it.

Growing objects (collapsed forwarding): while a body is still being written, other
requests for it can follow the `Writer` instead of going to the origin:

    w = store.follow(key, request_fields)       # a Writer still filling, or None
    fd = w.open_body()                          # the same inode, before and after commit
    n = w.wait(want, timeout)                   # bytes [0, n) are present and final
    ... os.pread(fd, ..., offset < n) or sendfile ...
    w.state: FILLING, COMMITTED (all `w.length` bytes there) or ABORTED (stop: go to
    the origin for the rest, or fail the response; the bytes already read were right)

Thread safety: a Store and its Writers may be used from several threads (one lock
for the index, one per Writer; a Writer's lock is taken before the store's).
"""
from __future__ import annotations

import bisect
import errno
import fcntl
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass

from ..tap import Coverage
from . import policy

__all__ = ["Store", "Writer", "Entry", "StoreBusy", "FILLING", "COMMITTED", "ABORTED"]

FILLING, COMMITTED, ABORTED = "filling", "committed", "aborted"

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id          INTEGER PRIMARY KEY,
    key         TEXT NOT NULL,
    variant_key TEXT NOT NULL,
    file        TEXT NOT NULL UNIQUE,
    size        INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    meta        TEXT NOT NULL,
    stored_at   REAL NOT NULL,
    lru         INTEGER NOT NULL,
    UNIQUE (key, variant_key)
);
CREATE INDEX IF NOT EXISTS entries_lru ON entries (lru);
"""
_COLUMNS = "id, key, variant_key, file, size, sha256, meta, stored_at, lru"
_READ_CHUNK = 1 << 20


class StoreBusy(RuntimeError):
    """Another process holds the store directory."""


@dataclass
class Entry:
    """A stored response: its row, and (from `lookup`) an open descriptor of its body.

    Close `fd` when done (`close()`, or use the entry as a context manager); until
    then the body stays readable even if the entry is evicted or replaced.
    """
    id: int
    key: str
    variant_key: str
    meta: dict
    path: str
    size: int
    sha256: str
    stored_at: float
    lru: int
    fd: int | None = None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Entry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _gaps(cov: Coverage, start: int, end: int) -> list[tuple[int, int]]:
    """The parts of [start, end) that `cov` does not cover, in order."""
    out = []
    pos = start
    k = bisect.bisect_right(cov.ends, start)     # first interval ending after start
    while k < len(cov.starts) and cov.starts[k] < end and pos < end:
        if cov.starts[k] > pos:
            out.append((pos, cov.starts[k]))
        pos = max(pos, cov.ends[k])
        k += 1
    if pos < end:
        out.append((pos, end))
    return out


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        if n <= 0:   # a regular file writes something or fails; never loop forever
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        data = data[n:]
        offset += n


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_of(fd: int, start: int, end: int, h=None):
    """Feed bytes [start, end) of `fd` to `h` (a new sha256 if None); returns `h`."""
    h = hashlib.sha256() if h is None else h
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(_READ_CHUNK, end - pos), pos)
        if not chunk:
            raise OSError(errno.EIO, f"short read at offset {pos}")
        h.update(chunk)
        pos += len(chunk)
    return h


class Writer:
    """One body being stored.  Made by `Store.begin`; never raises on I/O errors.

    write(offset, data) -> bool       store a piece (False: ignored or the writer failed)
    contiguous                        bytes present from offset 0
    wait(n, timeout) -> int           block until contiguous >= n or the writer is done
    open_body() -> fd | None          a descriptor for a follower (see the module doc)
    commit(length, sha256) -> bool    install it; False: aborted, `error` says why
    abort(reason)                     give up; the temporary file goes
    state, error, length, sha256      FILLING/COMMITTED/ABORTED; why it aborted;
                                      the final length (once known) and digest
    """

    def __init__(self, store: Store, key: str, variant_key: str, meta: str,
                 length: int | None):
        self._store = store
        self.key = key
        self.variant_key = variant_key
        self.meta_json = meta
        self.length = length
        self.sha256: str | None = None
        self.state = FILLING
        self.error: str | None = None
        self.invalidated = False       # set by Store.purge: finish filling, never commit
        self.path = os.path.join(store.tmp_dir, secrets.token_hex(16) + ".part")
        self._fd: int | None = None
        self._cond = threading.Condition()
        self._cov = Coverage()
        self._hash = hashlib.sha256()
        self._hashed = 0               # bytes [0, _hashed) are in _hash (== contiguous)

    @property
    def meta(self) -> dict:
        return json.loads(self.meta_json)

    @property
    def contiguous(self) -> int:
        cov = self._cov
        return cov.ends[0] if cov.starts and cov.starts[0] == 0 else 0

    def _open(self, max_bytes: int) -> None:
        """Create the temporary file; called once by Store.begin."""
        with self._cond:
            if self.length is not None and self.length < 0:
                self._abort(f"negative length {self.length}")
                return
            if self.length is not None and self.length > max_bytes:
                self._abort(f"length {self.length} is above the store's max_bytes {max_bytes}")
                return
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except OSError as e:
                self._abort(f"cannot create {self.path}: {e.strerror or e}", io=True)

    def write(self, offset: int, data) -> bool:
        """Store `data` at `offset`.  Bytes already present are skipped (the first copy
        wins); bytes at or past a known length are dropped.  Returns False when
        nothing could be stored (not filling, negative offset, or an I/O error, which
        aborts the writer and is recorded in the store)."""
        mv = memoryview(data).cast("B")
        with self._cond:
            if self.state != FILLING or offset < 0:
                return False
            end = offset + len(mv)
            if self.length is not None:
                end = min(end, self.length)
            if end <= offset:
                return True
            try:
                written = []
                for s, e in _gaps(self._cov, offset, end):
                    _pwrite_all(self._fd, mv[s - offset:e - offset], s)
                    self._cov.add(s, e)
                    written.append((s, e))
                self._hash_prefix(offset, mv, written)
            except OSError as e:
                self._abort(f"write at offset {offset}: {e.strerror or e}", io=True)
                return False
            if written:
                self._cond.notify_all()
            return True

    def _hash_prefix(self, offset: int, mv: memoryview, written: list[tuple[int, int]]) -> None:
        """Extend the digest to the new contiguous prefix: from `mv` for the pieces this
        write stored right at the old prefix end, from the file for the rest."""
        target = self.contiguous
        pos = self._hashed
        if target <= pos:
            return
        for s, e in written:
            if s != pos:
                break
            self._hash.update(mv[s - offset:e - offset])
            pos = e
        if pos < target:
            _sha256_of(self._fd, pos, target, self._hash)
        self._hashed = target

    def wait(self, n: int, timeout: float | None = None) -> int:
        """Wait until at least `n` bytes from 0 are present, the writer is done, or
        `timeout` passed; returns `contiguous` then."""
        with self._cond:
            self._cond.wait_for(lambda: self.contiguous >= n or self.state != FILLING, timeout)
            return self.contiguous

    def open_body(self) -> int | None:
        """A new read-only descriptor of the body (temporary or installed: the same
        inode); None once aborted.  The caller closes it."""
        with self._cond:
            if self.state == ABORTED:
                return None
            try:
                return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None

    def commit(self, expected_length: int | None = None, expected_sha256: str | None = None) -> bool:
        """Install the body if bytes [0, length) are all present and their sha256 is
        `expected_sha256` (when given).  `length` is `expected_length`, or the one given
        to `begin`; with neither, or when they differ, the writer aborts.  Returns
        False (and aborts, `error` says why) otherwise or on an I/O error."""
        with self._cond:
            if self.state != FILLING:
                return False
            length = self.length if expected_length is None else expected_length
            if length is None or length < 0:
                self._abort("commit without a length" if length is None else f"negative length {length}")
                return False
            if self.length is not None and length != self.length:
                self._abort(f"commit with length {length}, begun with {self.length}")
                return False
            if length > self._store.max_bytes:
                self._abort(f"length {length} is above the store's max_bytes {self._store.max_bytes}")
                return False
            have = self.contiguous
            if have < length:
                holes = len(_gaps(self._cov, 0, length))
                self._abort(f"incomplete: {have} of {length} bytes from offset 0, {holes} hole(s)")
                return False
            try:
                if self._cov.ends and self._cov.ends[-1] > length:
                    os.ftruncate(self._fd, length)
                digest = (self._hash if have == length else _sha256_of(self._fd, 0, length)).hexdigest()
            except OSError as e:
                self._abort(f"commit: {e.strerror or e}", io=True)
                return False
            if expected_sha256 is not None and digest != expected_sha256.lower():
                self._abort(f"sha256 mismatch: stored {digest}, expected {expected_sha256}")
                return False
            if self.invalidated:
                self._abort("invalidated while filling")
                return False
            self.length, self.sha256 = length, digest
            err = self._store._install(self)
            if err is not None:
                self._abort(err, io=not err.startswith("invalidated"))
                return False
            self.state = COMMITTED
            self._close_fd()
            self._store._done(self, committed=True)
            self._cond.notify_all()
            return True

    def abort(self, reason: str = "aborted") -> None:
        """Give up this body (the caller saw the response fail); idempotent."""
        with self._cond:
            if self.state == FILLING:
                self._abort(reason)

    def _abort(self, reason: str, io: bool = False) -> None:
        """With the lock held."""
        self.state = ABORTED
        self.error = reason
        self._close_fd()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self._store._done(self, committed=False, io_error=reason if io else None)
        self._cond.notify_all()

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def __repr__(self) -> str:
        return (f"<Writer {self.key!r} {self.state} {self.contiguous}/{self.length} "
                f"error={self.error!r}>")


class Store:
    """Bodies in files under `path`, their index in sqlite3; at most `max_bytes` of bodies.

    begin(key, variant_key, meta, expected_length=None) -> Writer
    lookup(key, request_fields, touch=True) -> Entry | None   (body fd open)
    follow(key, request_fields) -> Writer | None             (a body still filling)
    touch(entry); update_headers(entry, meta) -> bool
    purge(key) -> int; invalidate(uri) -> int
    ls() -> [Entry]; stat(key) -> [Entry]; evict(target_bytes=None) -> int
    stats() -> dict; take_io_error() -> str | None; close()

    `fsync=False` skips fsync(2) (safe against a process crash, not a power loss).
    `verify=True` re-hashes every body when opening.  Raises StoreBusy when another
    process has the directory, OSError / sqlite3.Error when it cannot be opened at
    all (a configuration problem: loud).
    """

    def __init__(self, path: str, max_bytes: int, *, fsync: bool = True, verify: bool = False):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.path = os.path.abspath(path)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.objects_dir = os.path.join(self.path, "objects")
        self.tmp_dir = os.path.join(self.path, "tmp")
        os.makedirs(self.tmp_dir, exist_ok=True)
        for i in range(256):
            os.makedirs(os.path.join(self.objects_dir, f"{i:02x}"), exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreBusy(f"cache store {self.path} is in use by another process") from None
        self._lock = threading.RLock()
        self._err_lock = threading.Lock()
        self._filling: dict[str, list[Writer]] = {}
        self._io_error: str | None = None
        self._io_error_taken = False
        self.io_errors = 0
        self.committed = 0
        self.aborted = 0
        self.evicted = 0
        try:
            self._db = sqlite3.connect(os.path.join(self.path, "index.sqlite"),
                                       isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise RuntimeError(f"cache index {self.path}/index.sqlite has schema version "
                                   f"{version}, this nfsplice knows {_SCHEMA_VERSION}: remove the store")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            self.recovered = self._recover(verify)
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- opening ----------------------------------------------------------------------------

    def _object_path(self, name: str) -> str:
        return os.path.join(self.objects_dir, name[:2], name)

    def _recover(self, verify: bool) -> dict:
        """Remove temporary files, rows without their exact body and files without a row."""
        out = {"temp_files": 0, "bad_rows": 0, "orphan_files": 0}
        for name in os.listdir(self.tmp_dir):
            try:
                os.unlink(os.path.join(self.tmp_dir, name))
                out["temp_files"] += 1
            except FileNotFoundError:
                pass
        known, bad = set(), []
        for rid, name, size, digest in self._db.execute("SELECT id, file, size, sha256 FROM entries"):
            p = self._object_path(name)
            try:
                ok = os.stat(p).st_size == size
                if ok and verify:
                    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        ok = _sha256_of(fd, 0, size).hexdigest() == digest
                    finally:
                        os.close(fd)
            except FileNotFoundError:
                ok = False
            if ok:
                known.add(name)
            else:
                bad.append(rid)
        if bad:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM entries WHERE id=?", [(r,) for r in bad])
            self._db.execute("COMMIT")
            out["bad_rows"] = len(bad)
        for sub in os.listdir(self.objects_dir):
            d = os.path.join(self.objects_dir, sub)
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                if name not in known:
                    try:
                        os.unlink(os.path.join(d, name))
                        out["orphan_files"] += 1
                    except FileNotFoundError:
                        pass
        self._bytes = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0]
        self._lru = self._db.execute("SELECT COALESCE(MAX(lru), 0) FROM entries").fetchone()[0]
        if self._bytes > self.max_bytes:       # max_bytes lowered since the last run
            self.evict()
        return out

    # -- writing ----------------------------------------------------------------------------

    def begin(self, key: str, variant_key: str, meta: dict, *,
              expected_length: int | None = None) -> Writer:
        """Start storing a body for (key, variant_key) with `meta` (JSON-able: a
        TypeError otherwise, our bug).  Always returns a Writer; one that could not
        start (too large, no temporary file) is already ABORTED and ignores writes."""
        w = Writer(self, key, variant_key, json.dumps(meta, separators=(",", ":")), expected_length)
        with self._lock:
            self._filling.setdefault(key, []).append(w)
        w._open(self.max_bytes)
        return w

    def _install(self, w: Writer) -> str | None:
        """Steps 1-4 of the module docstring for a complete, verified Writer (its lock
        held).  Returns None, or why it failed (the caller aborts the writer)."""
        name = secrets.token_hex(16)
        final = self._object_path(name)
        renamed = False
        doomed: list[str] = []
        try:
            if self.fsync:
                os.fsync(w._fd)
            os.rename(w.path, final)
            renamed = True
            w.path = final
            if self.fsync:
                _fsync_dir(os.path.dirname(final))
            with self._lock:
                if w.invalidated:
                    raise _Invalidated()
                doomed = self._insert(w, name)
        except _Invalidated:
            self._unlink_quietly(final if renamed else None)
            return "invalidated while committing"
        except (OSError, sqlite3.Error) as e:
            self._unlink_quietly(final if renamed else None)
            return f"commit: {getattr(e, 'strerror', None) or e}"
        for p in doomed:
            self._unlink_quietly(p)
        return None

    def _insert(self, w: Writer, name: str) -> list[str]:
        """One transaction: drop the row w replaces, evict LRU rows until w fits, insert
        w's row.  Returns the files to unlink after it committed."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            doomed = []
            total = self._bytes
            evicted = 0
            for rid, f, size in db.execute("SELECT id, file, size FROM entries WHERE key=? AND variant_key=?",
                                           (w.key, w.variant_key)).fetchall():
                db.execute("DELETE FROM entries WHERE id=?", (rid,))
                doomed.append(self._object_path(f))
                total -= size
            while total + w.length > self.max_bytes:
                row = db.execute("SELECT id, file, size FROM entries ORDER BY lru LIMIT 1").fetchone()
                if row is None:
                    break
                db.execute("DELETE FROM entries WHERE id=?", (row[0],))
                doomed.append(self._object_path(row[1]))
                total -= row[2]
                evicted += 1
            self._lru += 1
            db.execute(f"INSERT INTO entries ({_COLUMNS}) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (w.key, w.variant_key, name, w.length, w.sha256, w.meta_json, time.time(), self._lru))
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._bytes = total + w.length
        self.evicted += evicted
        return doomed

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _done(self, w: Writer, committed: bool, io_error: str | None = None) -> None:
        """A Writer finished (called with its lock held)."""
        with self._lock:
            lst = self._filling.get(w.key)
            if lst and w in lst:
                lst.remove(w)
                if not lst:
                    del self._filling[w.key]
        with self._err_lock:
            if committed:
                self.committed += 1
            else:
                self.aborted += 1
            if io_error is not None:
                self.io_errors += 1
                if self._io_error is None:
                    self._io_error = f"cache store {self.path}: {w.key}: {io_error}"

    def _record_io_error(self, what: str) -> None:
        with self._err_lock:
            self.io_errors += 1
            if self._io_error is None:
                self._io_error = f"cache store {self.path}: {what}"

    def take_io_error(self) -> str | None:
        """The first I/O error, once (for one log line); None afterwards and before."""
        with self._err_lock:
            if self._io_error is None or self._io_error_taken:
                return None
            self._io_error_taken = True
            return self._io_error

    @staticmethod
    def _unlink_quietly(path: str | None) -> None:
        if path is None:
            return
        try:
            os.unlink(path)
        except OSError:
            pass

    # -- reading ----------------------------------------------------------------------------

    def _entry(self, row, fd: int | None = None) -> Entry:
        rid, key, vk, name, size, digest, meta, stored_at, lru = row
        return Entry(id=rid, key=key, variant_key=vk, meta=json.loads(meta),
                     path=self._object_path(name), size=size, sha256=digest,
                     stored_at=stored_at, lru=lru, fd=fd)

    def lookup(self, key: str, request_fields=(), *, touch: bool = True) -> Entry | None:
        """The most recently stored variant of `key` that `request_fields` select
        (RFC 9111 4.1, `policy.variant_matches`; "most recent" by commit order, which
        needs no clock), with its body open (`Entry.fd`), or None.  Refreshes its LRU position unless `touch=False`.  An index error is
        recorded (`take_io_error`) and reads as a miss."""
        with self._lock:
            try:
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM entries WHERE key=? ORDER BY id DESC",
                    (key,)).fetchall()
                for row in rows:
                    if not policy.variant_matches(row[2], request_fields):
                        continue
                    try:
                        fd = os.open(self._object_path(row[3]), os.O_RDONLY | os.O_CLOEXEC)
                    except OSError as e:     # removed behind our back: forget the row
                        self._record_io_error(f"body of {key} unreadable: {e.strerror or e}")
                        self._delete_rows([row[0]])
                        continue
                    entry = self._entry(row, fd)
                    if touch:
                        self.touch(entry)
                    return entry
            except sqlite3.Error as e:
                self._record_io_error(f"lookup {key}: {e}")
            return None

    def follow(self, key: str, request_fields=()) -> Writer | None:
        """The newest Writer still filling a body for `key` whose variant
        `request_fields` select, or None (collapsed forwarding; see the module doc)."""
        with self._lock:
            for w in reversed(self._filling.get(key, ())):
                if (w.state == FILLING and not w.invalidated
                        and policy.variant_matches(w.variant_key, request_fields)):
                    return w
        return None

    def touch(self, entry: Entry) -> None:
        """Make `entry` the most recently used (errors recorded, not raised)."""
        with self._lock:
            self._lru += 1
            try:
                self._db.execute("UPDATE entries SET lru=? WHERE id=?", (self._lru, entry.id))
            except sqlite3.Error as e:
                self._record_io_error(f"touch {entry.key}: {e}")
                return
            entry.lru = self._lru

    def update_headers(self, entry: Entry, meta: dict) -> bool:
        """Replace `entry`'s meta (after a 304, RFC 9111 3.2: the body stays).  False if
        the entry is gone or was replaced meanwhile, or on an index error (recorded)."""
        text = json.dumps(meta, separators=(",", ":"))
        name = os.path.basename(entry.path)
        with self._lock:
            try:
                cur = self._db.execute("UPDATE entries SET meta=? WHERE id=? AND file=?",
                                       (text, entry.id, name))
            except sqlite3.Error as e:
                self._record_io_error(f"update {entry.key}: {e}")
                return False
            if cur.rowcount == 1:
                entry.meta = json.loads(text)
                return True
            return False

    # -- removing ---------------------------------------------------------------------------

    def _delete_rows(self, ids: list[int]) -> int:
        """Delete rows (one transaction), then their files.  Returns bytes freed."""
        if not ids:
            return 0
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = []
            for rid in ids:
                row = db.execute("SELECT file, size FROM entries WHERE id=?", (rid,)).fetchone()
                if row is not None:
                    db.execute("DELETE FROM entries WHERE id=?", (rid,))
                    rows.append(row)
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        freed = sum(size for _, size in rows)
        self._bytes -= freed
        for name, _ in rows:
            self._unlink_quietly(self._object_path(name))
        return freed

    def purge(self, key: str) -> int:
        """Remove every variant of `key`, and keep bodies still filling for it from
        being committed (followers can still read them).  Returns rows removed (0 on
        an index error, which is recorded)."""
        with self._lock:
            for w in self._filling.get(key, ()):
                w.invalidated = True
            try:
                ids = [r[0] for r in self._db.execute("SELECT id FROM entries WHERE key=?", (key,))]
                self._delete_rows(ids)
            except sqlite3.Error as e:
                self._record_io_error(f"purge {key}: {e}")
                return 0
            return len(ids)

    def invalidate(self, uri: str) -> int:
        """purge() the cache key of `uri` (normalised as `policy.normalize_uri`; RFC
        9111 4.4, the URIs come from `policy.invalidations`)."""
        return self.purge(policy.normalize_uri(uri) or uri)

    def evict(self, target_bytes: int | None = None) -> int:
        """Evict least recently used entries until at most `target_bytes` (default
        max_bytes) are stored.  Open readers keep their bodies.  Returns bytes freed."""
        target = self.max_bytes if target_bytes is None else target_bytes
        freed = 0
        with self._lock:
            while self._bytes > target:
                row = self._db.execute("SELECT id FROM entries ORDER BY lru LIMIT 1").fetchone()
                if row is None:
                    break
                freed += self._delete_rows([row[0]])
                self.evicted += 1
        return freed

    # -- listing ----------------------------------------------------------------------------

    def ls(self) -> list[Entry]:
        """Every entry (no descriptor open), by key and variant."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY key, variant_key").fetchall()
        return [self._entry(r) for r in rows]

    def stat(self, key: str) -> list[Entry]:
        """The variants stored for `key` (no descriptor open), newest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM entries WHERE key=? "
                                    "ORDER BY id DESC", (key,)).fetchall()
        return [self._entry(r) for r in rows]

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def stats(self) -> dict:
        with self._lock:
            entries = self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            filling = sum(len(v) for v in self._filling.values())
        return {"entries": entries, "bytes": self._bytes, "max_bytes": self.max_bytes,
                "filling": filling, "committed": self.committed, "aborted": self.aborted,
                "evicted": self.evicted, "io_errors": self.io_errors}

    def close(self) -> None:
        """Abort the Writers still filling, close the index, release the directory."""
        with self._lock:
            writers = [w for lst in self._filling.values() for w in lst]
        for w in writers:
            w.abort("store closed")
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
                os.close(self._lock_fd)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Invalidated(Exception):
    pass
