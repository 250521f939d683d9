"""TCP Tap: the payload of every spliced segment, stored at its stream offset.

Offsets are sequence minus base, so retransmissions and reordering rewrite the same
bytes and are harmless.  A stream is complete when every byte of its length is
present.  The forward path never waits: writes go through a bounded queue to a writer
thread, and when the queue is full the stream is marked failed (not complete) instead
of blocking the engine.

Layout: DIR/pair-<id>-<c2s|s2c>.data holds the bytes; .json beside it, written
atomically when the stream is closed, says length, bytes covered and `complete`.
"""
from __future__ import annotations

import bisect
import json
import os
import queue
import threading
from dataclasses import dataclass, field


class Coverage:
    """Disjoint, sorted [start, end) intervals; merging on insert."""

    __slots__ = ("starts", "ends")

    def __init__(self):
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        s, e = self.starts, self.ends
        # Fast path: in-order arrival extends the last interval.
        if s and start <= e[-1] and start >= s[-1]:
            if end > e[-1]:
                e[-1] = end
            return
        i = bisect.bisect_left(e, start)          # first interval that ends at/after start
        j = bisect.bisect_right(s, end)           # intervals starting after end are untouched
        if i < j:
            start = min(start, s[i])
            end = max(end, e[j - 1])
        s[i:j] = [start]
        e[i:j] = [end]

    def covered(self, length: int) -> bool:
        return length == 0 or (len(self.starts) >= 1 and self.starts[0] == 0 and self.ends[0] >= length)

    def total(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends))

    def intervals(self) -> list[tuple[int, int]]:
        return list(zip(self.starts, self.ends))


@dataclass
class TapStream:
    """One direction of one pair in a TapStore.  Like every tap sink the engine feeds
    (Pair.tap), it has write(offset, data) and close(length): neither may block."""
    path: str
    fd: int
    meta: dict
    store: "TapStore | None" = None
    coverage: Coverage = field(default_factory=Coverage)
    failed: str | None = None
    length: int | None = None
    closed: bool = False

    def write(self, offset: int, data) -> None:
        self.store.write(self, offset, data)

    def close(self, length: int | None) -> None:
        self.store.close(self, length)


class TapStore:
    def __init__(self, directory: str, max_pending: int = 256 << 20):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.max_pending = max_pending
        self.pending = 0
        self.lock = threading.Lock()
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.bytes_written = 0
        self.dropped_writes = 0
        self.complete = 0
        self.incomplete = 0
        self.thread = threading.Thread(target=self._writer, name="tap-writer", daemon=True)
        self.thread.start()

    def open(self, name: str, meta: dict) -> TapStream:
        path = os.path.join(self.directory, name)
        fd = os.open(path + ".data", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        return TapStream(path, fd, dict(meta), self)

    def write(self, stream: TapStream, offset: int, data) -> None:
        """Queue DATA for OFFSET of STREAM; never blocks (a full queue fails the stream)."""
        if stream.failed or stream.closed or offset < 0:
            return
        n = len(data)
        with self.lock:
            if self.pending + n > self.max_pending:
                stream.failed = "tap writer fell behind"
                self.dropped_writes += 1
                return
            self.pending += n
        self.q.put((stream, offset, bytes(data)))

    def close(self, stream: TapStream, length: int | None) -> None:
        """The stream ends at LENGTH bytes (None: its end was never seen)."""
        if stream.closed:
            return
        stream.closed = True
        self.q.put((stream, None, length))

    def flush(self, timeout: float = 30.0) -> None:
        done = threading.Event()
        self.q.put((None, None, done))
        done.wait(timeout)

    def stop(self) -> None:
        self.flush()
        self.q.put(None)
        self.thread.join(5)

    def _writer(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            stream, offset, data = item
            if stream is None:
                data.set()
                continue
            if offset is None:
                self._finish(stream, data)
                continue
            with self.lock:
                self.pending -= len(data)
            if stream.failed:
                continue
            try:
                os.pwrite(stream.fd, data, offset)
                stream.coverage.add(offset, offset + len(data))
                self.bytes_written += len(data)
            except OSError as e:
                stream.failed = f"write failed: {e.strerror}"

    def _finish(self, stream: TapStream, length: int | None) -> None:
        stream.length = length
        complete = stream.failed is None and length is not None and stream.coverage.covered(length)
        if complete:
            self.complete += 1
        else:
            self.incomplete += 1
        try:
            if length is not None and stream.failed is None:
                os.ftruncate(stream.fd, length)
        except OSError:
            pass
        os.close(stream.fd)
        meta = dict(stream.meta, length=length, covered=stream.coverage.total(), complete=complete,
                    failed=stream.failed, holes=len(stream.coverage.starts) > 1)
        tmp = stream.path + ".json.tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, stream.path + ".json")
