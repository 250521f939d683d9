"""Origin server and clients for the benchmark and the peer tests.

    python -m netns_lab.peers.bench_tools origin --listen 198.18.2.2:9001
    python -m netns_lab.peers.bench_tools bulk   --connect HOST:PORT --size BYTES [--sha256]
    python -m netns_lab.peers.bench_tools upload --connect HOST:PORT --size BYTES
    python -m netns_lab.peers.bench_tools duplex --connect HOST:PORT --size BYTES
    python -m netns_lab.peers.bench_tools rtt    --connect HOST:PORT --count N [--warmup W]

One origin serves every connection of a benchmark; the client's first 12 bytes say what
it wants (`HEADER`: a 4-byte operation and a 64-bit size):

- BULK n: the origin sends n bytes with sendfile(2) from a memfd (shmem, like a file in
  /dev/shm) holding `pattern()`, repeated; then it shuts down its sending side and
  closes when the client does.  The client receives with recv_into into one reused
  buffer and only counts (or hashes with --sha256, for tests).
- UPLD n: the client sends n bytes of the same stream; the origin hashes what it
  receives and answers with the sha256 and the byte count.
- ECHO: the origin sends back whatever it receives until EOF (TCP_NODELAY).  `rtt`
  does ping-pong with 64-byte messages, one at a time; `duplex` streams n bytes up
  while it reads the echo down, both directions at once.

Every client prints one JSON object on stdout and exits 0, or prints the reason on
stderr and exits 1.  Each client socket has an idle timeout (--idle-timeout): a stalled
transfer fails instead of hanging.

Throughput of `bulk` is measured from the client's first received byte to its last:
(bytes after the first chunk) / (time of last byte - time of first byte).  CPU is the
whole machine's (all CPUs, from /proc/stat, which is not namespaced): user + nice +
system + irq + softirq + steal, read right before the request is sent and right after
the last byte, converted with SC_CLK_TCK.  Standard library only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import socket
import struct
import sys
import threading
import time

HEADER = struct.Struct("!4sQ")
OP_BULK, OP_UPLOAD, OP_ECHO = b"BULK", b"UPLD", b"ECHO"
DIGEST = struct.Struct("!32sQ")          # UPLD answer: sha256, bytes received

PATTERN_SEED = 2544                      # RFC 2544: the benchmark address range's RFC
PATTERN_LEN = 16 << 20                   # the stream repeats every 16 MiB
RECV_BUF = 256 << 10
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- data -------------------------------------------------------------------------------
_pattern_cache: dict[tuple[int, int], bytes] = {}


def pattern(length: int = PATTERN_LEN, seed: int = PATTERN_SEED) -> bytes:
    """The bytes the stream is made of: pseudo-random, so a misplaced chunk shows."""
    key = (length, seed)
    if key not in _pattern_cache:
        _pattern_cache[key] = random.Random(seed).randbytes(length)
    return _pattern_cache[key]


def stream_sha256(size: int, length: int = PATTERN_LEN, seed: int = PATTERN_SEED) -> str:
    """sha256 of the first SIZE bytes of the stream (the pattern repeated)."""
    buf, h = pattern(length, seed), hashlib.sha256()
    whole, rest = divmod(size, len(buf))
    for _ in range(whole):
        h.update(buf)
    h.update(buf[:rest])
    return h.hexdigest()


def pattern_memfd(length: int = PATTERN_LEN, seed: int = PATTERN_SEED) -> int:
    """A memfd holding the pattern: a sendfile(2) source that leaves nothing behind."""
    fd = os.memfd_create("nfsplice-bench-pattern")
    buf = memoryview(pattern(length, seed))
    off = 0
    while off < len(buf):
        off += os.write(fd, buf[off:])
    return fd


def sendfile_stream(sock: socket.socket, memfd: int, size: int, length: int = PATTERN_LEN) -> None:
    """Send the first SIZE bytes of the stream with sendfile(2) from MEMFD.

    A socket with a Python timeout is non-blocking underneath: sendfile then returns
    EAGAIN, and we wait for writability up to that timeout."""
    fd, sent, timeout = sock.fileno(), 0, sock.gettimeout()
    while sent < size:
        off = sent % length
        try:
            n = os.sendfile(fd, memfd, off, min(size - sent, length - off))
        except BlockingIOError:
            if not select.select([], [fd], [], timeout)[1]:
                raise TimeoutError(f"send stalled for {timeout:g} s after {sent} of {size} bytes") from None
            continue
        if n == 0:
            raise ConnectionError(f"sendfile sent 0 bytes after {sent} of {size}")
        sent += n


# -- measurement helpers ----------------------------------------------------------------
def cpu_busy_ticks() -> int:
    """Busy ticks of all CPUs together: user+nice+system+irq+softirq+steal (/proc/stat)."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, -(-len(sorted_values) * q // 100))   # ceil(n*q/100), at least 1
    return sorted_values[int(rank) - 1]


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


# -- origin -----------------------------------------------------------------------------
class Origin:
    """Thread-per-connection server for BULK, UPLD and ECHO."""

    def __init__(self, addr: tuple[str, int]):
        self.memfd = pattern_memfd()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(addr)
        self.lsock.listen(128)

    def serve_forever(self) -> None:
        while True:
            conn, _ = self.lsock.accept()
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(120)
            try:
                op, size = HEADER.unpack(recv_exact(conn, HEADER.size))
            except (ConnectionError, OSError):
                return                   # a probe or an aborted client: nothing to serve
            if op == OP_BULK:
                sendfile_stream(conn, self.memfd, size)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(4096):   # wait for the client's close: no RST, no TIME_WAIT here
                    pass
            elif op == OP_UPLOAD:
                h, got, buf = hashlib.sha256(), 0, bytearray(RECV_BUF)
                view = memoryview(buf)
                while got < size:
                    n = conn.recv_into(view, min(len(buf), size - got))
                    if n == 0:
                        break
                    h.update(view[:n])
                    got += n
                conn.sendall(DIGEST.pack(h.digest(), got))
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(4096):
                    pass
            elif op == OP_ECHO:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf = bytearray(RECV_BUF)
                view = memoryview(buf)
                while True:
                    n = conn.recv_into(view)
                    if n == 0:
                        break
                    conn.sendall(view[:n])
                conn.shutdown(socket.SHUT_WR)
            else:
                print(f"origin: unknown operation {op!r}", file=sys.stderr)
        except OSError as e:
            print(f"origin: connection failed: {e}", file=sys.stderr)
        finally:
            conn.close()


# -- clients ----------------------------------------------------------------------------
def connect(addr: tuple[str, int], idle_timeout: float) -> socket.socket:
    sock = socket.create_connection(addr, timeout=idle_timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def client_bulk(addr: tuple[str, int], size: int, idle_timeout: float, want_sha: bool) -> dict:
    sock = connect(addr, idle_timeout)
    buf = bytearray(RECV_BUF)
    view = memoryview(buf)
    h = hashlib.sha256() if want_sha else None
    total = first_len = 0
    t_first = t_last = 0.0
    try:
        ticks0, w0 = cpu_busy_ticks(), time.perf_counter()
        sock.sendall(HEADER.pack(OP_BULK, size))
        while True:
            try:
                n = sock.recv_into(view)
            except socket.timeout:
                raise TimeoutError(f"stalled: no data for {idle_timeout:g} s after {total} of {size} bytes") from None
            if n == 0:
                break
            if total == 0:
                t_first, first_len = time.perf_counter(), n
            total += n
            if h is not None:
                h.update(view[:n])
            if total >= size and not t_last:
                t_last = time.perf_counter()
                ticks1, w1 = cpu_busy_ticks(), t_last
        if total != size:
            raise ConnectionError(f"received {total} bytes, expected {size}")
    finally:
        sock.close()
    span = t_last - t_first
    cpu_s = (ticks1 - ticks0) / CLK_TCK
    out = {
        "bytes": total,
        "first_to_last_s": span,
        "gbps": (total - first_len) * 8 / span / 1e9 if span > 0 else None,
        "window_s": w1 - w0,
        "cpu_s": cpu_s,
        "cpu_s_per_gib": cpu_s / (total / 2**30),
        "clk_tck": CLK_TCK,
    }
    if h is not None:
        out["sha256"] = h.hexdigest()
    return out


def client_upload(addr: tuple[str, int], size: int, idle_timeout: float) -> dict:
    memfd = pattern_memfd()
    sock = connect(addr, idle_timeout)
    try:
        t0 = time.perf_counter()
        sock.sendall(HEADER.pack(OP_UPLOAD, size))
        sendfile_stream(sock, memfd, size)
        digest, got = DIGEST.unpack(recv_exact(sock, DIGEST.size))
        t1 = time.perf_counter()
    except socket.timeout:
        raise TimeoutError(f"stalled: upload of {size} bytes idle for {idle_timeout:g} s") from None
    finally:
        sock.close()
        os.close(memfd)
    return {"bytes": size, "origin_received": got, "origin_sha256": digest.hex(),
            "sha256": stream_sha256(size), "seconds": t1 - t0}


def client_duplex(addr: tuple[str, int], size: int, idle_timeout: float) -> dict:
    """Stream SIZE bytes up through ECHO while reading the echo down, at the same time."""
    sock = connect(addr, idle_timeout)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(HEADER.pack(OP_ECHO, 0))
            data = memoryview(pattern())
            sent = 0
            while sent < size:
                n = min(size - sent, len(data) - sent % len(data), 64 << 10)
                sock.sendall(data[sent % len(data): sent % len(data) + n])
                sent += n
            sock.shutdown(socket.SHUT_WR)
        except BaseException as e:          # reported by the receiving side
            errors.append(e)

    sender = threading.Thread(target=send, daemon=True)
    h, total, buf = hashlib.sha256(), 0, bytearray(RECV_BUF)
    view = memoryview(buf)
    t0 = time.perf_counter()
    sender.start()
    try:
        while True:
            try:
                n = sock.recv_into(view)
            except socket.timeout:
                raise TimeoutError(f"stalled: echo idle for {idle_timeout:g} s after {total} of {size} bytes") from None
            if n == 0:
                break
            h.update(view[:n])
            total += n
        sender.join(idle_timeout)
    finally:
        sock.close()
    if errors:
        raise ConnectionError(f"sending side failed: {errors[0]!r}")
    return {"bytes": size, "echoed": total, "sha256": stream_sha256(size),
            "echo_sha256": h.hexdigest(), "seconds": time.perf_counter() - t0}


def client_rtt(addr: tuple[str, int], count: int, warmup: int, msg_size: int, idle_timeout: float) -> dict:
    sock = connect(addr, idle_timeout)
    msg = pattern(msg_size)
    buf = bytearray(msg_size)
    view = memoryview(buf)
    samples: list[float] = []
    perf = time.perf_counter_ns
    try:
        sock.sendall(HEADER.pack(OP_ECHO, 0))
        for i in range(warmup + count):
            t0 = perf()
            sock.sendall(msg)
            got = 0
            while got < msg_size:
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise ConnectionError(f"EOF in round trip {i}")
                got += n
            t1 = perf()
            if i >= warmup:
                samples.append((t1 - t0) / 1000.0)
        if bytes(buf) != msg:
            raise ValueError("echo differs from the message sent")
    except socket.timeout:
        raise TimeoutError(f"stalled: no echo for {idle_timeout:g} s after {len(samples)} round trips") from None
    finally:
        sock.close()
    samples.sort()
    return {"count": count, "warmup": warmup, "msg_bytes": msg_size,
            "min_us": samples[0], "p50_us": percentile(samples, 50), "p99_us": percentile(samples, 99),
            "max_us": samples[-1], "mean_us": sum(samples) / len(samples)}


# -- command line -----------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netns_lab.peers.bench_tools", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("origin", help="serve BULK, UPLD and ECHO")
    o.add_argument("--listen", type=parse_addr, required=True)
    o.add_argument("--ready-file", help="written once listening")
    for name in ("bulk", "upload", "duplex", "rtt"):
        c = sub.add_parser(name)
        c.add_argument("--connect", type=parse_addr, required=True)
        c.add_argument("--idle-timeout", type=float, default=20.0, help="fail when a socket is idle this long (s)")
        if name == "rtt":
            c.add_argument("--count", type=int, default=2000)
            c.add_argument("--warmup", type=int, default=200)
            c.add_argument("--msg-size", type=int, default=64)
        else:
            c.add_argument("--size", type=int, required=True)
        if name == "bulk":
            c.add_argument("--sha256", action="store_true", help="hash what arrives (slower; for tests)")
    a = ap.parse_args(argv)

    if a.cmd == "origin":
        origin = Origin(a.listen)
        if a.ready_file:
            with open(a.ready_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        try:
            origin.serve_forever()
        except KeyboardInterrupt:
            pass
        return 0
    try:
        if a.cmd == "bulk":
            out = client_bulk(a.connect, a.size, a.idle_timeout, a.sha256)
        elif a.cmd == "upload":
            out = client_upload(a.connect, a.size, a.idle_timeout)
        elif a.cmd == "duplex":
            out = client_duplex(a.connect, a.size, a.idle_timeout)
        else:
            out = client_rtt(a.connect, a.count, a.warmup, a.msg_size, a.idle_timeout)
    except (OSError, ValueError) as e:       # TimeoutError and ConnectionError are OSErrors
        print(f"{a.cmd} via {a.connect[0]}:{a.connect[1]} failed: {e}", file=sys.stderr)
        return 1
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
