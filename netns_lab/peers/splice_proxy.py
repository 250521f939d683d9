"""An L4 proxy that moves bytes with splice(2): socket -> pipe -> socket, no user copy.

    python -m netns_lab.peers.splice_proxy --listen 198.18.1.1:9000 --upstream 198.18.2.2:9001

Per accepted connection: a blocking connect to the upstream, then one thread per
direction.  Each thread owns a pipe (enlarged to --pipe-size with F_SETPIPE_SZ) and
loops: splice(src -> pipe, up to the pipe size), then splice(pipe -> dst) until the pipe
is empty.  The GIL is released inside each splice call, so both directions and all
connections run in parallel.  EOF from one side becomes shutdown(SHUT_WR) toward the
other (half-close is forwarded); an error on either side aborts both directions.  Both
sockets get TCP_NODELAY, like haproxy and nginx set it.  SIGTERM exits at once.

No SPLICE_F_MORE: it corks the TCP socket, and a lone small message (the RTT probe)
would wait for the cork to be released.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import signal
import socket
import sys
import threading

from netns_lab.peers.bench_tools import parse_addr


class Pair:
    """The two sockets of one proxied connection; closed when both directions are done."""

    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client, self.upstream = client, upstream
        self._lock = threading.Lock()
        self._running = 2

    def abort(self) -> None:
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def done(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self.client.close()
            self.upstream.close()


def pump(pair: Pair, src: socket.socket, dst: socket.socket, pipe_size: int) -> None:
    """Move src's bytes to dst through a pipe until src's EOF; then half-close dst."""
    r, w = os.pipe()
    try:
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, pipe_size)
        except OSError:
            pass                                  # above /proc/sys/fs/pipe-max-size: keep 64 KiB
        chunk = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        sfd, dfd = src.fileno(), dst.fileno()
        while True:
            n = os.splice(sfd, w, chunk, flags=os.SPLICE_F_MOVE)
            if n == 0:
                break
            while n:
                n -= os.splice(r, dfd, n, flags=os.SPLICE_F_MOVE)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pair.abort()                              # reset or unreachable: end both directions
    finally:
        os.close(r)
        os.close(w)
        pair.done()


def serve(listen: tuple[str, int], upstream: tuple[str, int], pipe_size: int) -> None:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(listen)
    lsock.listen(512)
    while True:
        client, _ = lsock.accept()
        try:
            up = socket.create_connection(upstream, timeout=5)
            up.settimeout(None)
        except OSError as e:
            print(f"splice_proxy: upstream {upstream[0]}:{upstream[1]}: {e}", file=sys.stderr)
            client.close()
            continue
        for s in (client, up):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = Pair(client, up)
        for src, dst in ((client, up), (up, client)):
            threading.Thread(target=pump, args=(pair, src, dst, pipe_size), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netns_lab.peers.splice_proxy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=parse_addr, required=True)
    ap.add_argument("--upstream", type=parse_addr, required=True)
    ap.add_argument("--pipe-size", type=int, default=1 << 20, help="bytes per pipe (F_SETPIPE_SZ)")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(a.listen, a.upstream, a.pipe_size)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
