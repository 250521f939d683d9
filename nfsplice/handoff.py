"""The socket side of the hand-off: drain, freeze and silence the proxy's sockets.

Contract (DESIGN.md "Hand-off"): when `freeze()` is called, the caller has registered
the pair with the engine (so no new payload reaches the sockets), read everything the
sockets had received and written it on, and seen both send queues acknowledged
(`quiescent()`).  TCP_REPAIR (root) then silences the socket: no ACKs, window updates,
retransmissions, FIN or RST of its own, also when it is closed.  TCP_QUEUE_SEQ gives the
exact next send and receive sequence numbers, TCP_INFO both window-scale factors and
TCP_TIMESTAMP the TSval the socket would send now.
"""
from __future__ import annotations

import select
import socket
import struct
import time
from dataclasses import dataclass, field

from . import syscalls
from .engine import SocketState

# include/uapi/linux/tcp.h
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_TIMESTAMP = 24
TCP_REPAIR_OPTIONS = 22
TCP_REPAIR_WINDOW = 29
# include/net/tcp.h option kinds, as TCP_REPAIR_OPTIONS takes them
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2
TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4
# include/uapi/asm-generic/ioctls.h, linux/sockios.h
SIOCINQ = 0x541B    # FIONREAD: bytes not yet read
SIOCOUTQ = 0x5411   # TIOCOUTQ: bytes (and FIN) sent but not yet acknowledged

_U32 = struct.Struct("I")


class HandoffError(Exception):
    """The sockets could not be handed to the engine (reset, or never quiescent)."""


@dataclass
class Drained:
    copied: list        # bytes moved across per direction (C2S: client -> upstream)
    finished: list      # directions whose FIN was passed on (shutdown of the other side)
    limits: list        # what is left of each direction's limit (None: unlimited; a
                        # scanner that saw its message end: 0)
    dropped: int = 0    # bytes past a limit, read and thrown away
    kept: list = field(default_factory=lambda: [bytearray(), bytearray()])   # ... or kept (KEEP)


def drain(csock: socket.socket, usock: socket.socket, timeout: float, *, limits=(None, None),
          keep=(False, False), on_data=None) -> Drained:
    """Move what already reached the two sockets across, until both are quiescent.

    Called after the pair was registered (so nothing new arrives); returns once neither
    socket holds unread bytes and both send queues are acknowledged, which `freeze`
    needs.  A direction with a limit forwards at most that many more bytes (a limit
    may also be a scanner of the message's framing, see `within`); the rest is
    read and dropped (it is past the message being spliced), or, for a direction KEEP
    says, returned in `kept` (a client's pipelined requests, for the proxy to answer
    after the spliced message).  ON_DATA(direction, offset,
    bytes) sees every byte moved (the tap).  Raises HandoffError on a reset or when the
    sockets are not quiescent within TIMEOUT seconds."""
    out = Drained([0, 0], [False, False], list(limits))
    ends = ((csock, usock), (usock, csock))
    deadline = time.monotonic() + timeout
    # The sockets stay blocking: reads here never wait (MSG_DONTWAIT), a send waits at
    # most until the deadline (SO_SNDTIMEO), and neither lets go of the GIL for nothing
    # (nfsplice.syscalls).
    reader = syscalls.Reader()
    # Nothing wakes us when the peer's ACK empties a send queue: poll, briefly at first
    # (an ACK usually takes well under a millisecond here), backing off to 5 ms.
    nap = 0.001
    while True:
        moved = False
        for d, (src, dst) in enumerate(ends):
            if out.finished[d]:
                continue
            try:
                data = reader.recv_now(src.fileno())
            except OSError as e:
                raise HandoffError(f"{e.strerror or e} during the hand-off") from None
            if data is None:
                continue
            moved = True
            if not data:
                out.finished[d] = True
                dst.shutdown(socket.SHUT_WR)
                continue
            left = out.limits[d]
            if left is not None:
                n = within(left, data)
                if len(data) > n:
                    if keep[d]:
                        out.kept[d] += data[n:]
                    else:
                        out.dropped += len(data) - n
                    data = data[:n]
                if isinstance(left, int):
                    out.limits[d] = left - n
            if not data:
                continue
            if on_data is not None:
                on_data(d, out.copied[d], data)
            syscalls.set_timeouts(dst, max(0.1, deadline - time.monotonic()))
            try:
                dst.sendall(data)
            except OSError as e:     # (EAGAIN: the receiver took nothing until the deadline)
                raise HandoffError(f"{e.strerror or e} during the hand-off") from None
            out.copied[d] += len(data)
        if moved:
            continue
        if all(outq(s) == 0 and inq(s) == 0 for s in (csock, usock)):
            out.limits = [0 if x is not None and not isinstance(x, int) and x.done else x
                          for x in out.limits]
            return out
        if time.monotonic() > deadline:
            raise HandoffError(f"sockets not quiescent after {timeout:g} s "
                               f"(unacknowledged {outq(csock)}/{outq(usock)} bytes)")
        # (poll, not select: a proxy serving a thousand connections has descriptors
        # above 1023, which select() refuses, "filedescriptor out of range")
        waiting = select.poll()
        for d, (s, _) in enumerate(ends):
            if not out.finished[d]:
                waiting.register(s, select.POLLIN)
        waiting.poll(nap * 1000)
        nap = min(nap * 2, 0.005)


def within(limit, data) -> int:
    """How many bytes at the start of DATA belong to the message LIMIT bounds: all of
    them (None), at most LIMIT (an int), or what a scanner of the message's framing
    says (an object with `done` and `feed(data) -> int`, e.g. http1.ChunkedScanner: fed
    here, so it moves on; it raises the peer's error on malformed framing)."""
    if limit is None:
        return len(data)
    if isinstance(limit, int):
        return min(limit, len(data))
    return 0 if limit.done else limit.feed(data)


def inq(sock: socket.socket) -> int:
    return syscalls.ioctl_int(sock.fileno(), SIOCINQ)


def outq(sock: socket.socket) -> int:
    return syscalls.ioctl_int(sock.fileno(), SIOCOUTQ)


def tcp_info(sock: socket.socket) -> tuple[int, int, int]:
    """(tcpi_options, tcpi_snd_wscale, tcpi_rcv_wscale) of struct tcp_info."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    options = info[5]
    ws = info[6]      # __u8 tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4 (little-endian bitfield)
    return options, ws & 0x0F, ws >> 4


def freeze(sock: socket.socket) -> SocketState:
    """Put SOCK in repair mode and read its state.  Needs CAP_NET_ADMIN."""
    options, snd_ws, rcv_ws = tcp_info(sock)
    mss = struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 24), 16)[0]
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    snd = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    rcv = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
    ts_on = bool(options & TCPI_OPT_TIMESTAMPS)
    ts_now = sock.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF if ts_on else 0
    if not options & TCPI_OPT_WSCALE:
        snd_ws = rcv_ws = 0
    window = struct.unpack("5I", sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, 20))
    return SocketState(snd, rcv, snd_ws, rcv_ws, ts_on, ts_now, bool(options & TCPI_OPT_SACK), mss, window)


def restore(local: tuple[str, int], peer: tuple[str, int], st: SocketState) -> socket.socket:
    """A new established socket for the connection LOCAL<->PEER in state ST, without a
    packet on the wire (the way CRIU restores connections).  The old socket of that
    connection must be closed already (silently).  Repair mode forces the bind even
    where a listener holds the address."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)   # sets SK_FORCE_REUSE: no SO_REUSEADDR after it
        s.bind(local)
        s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        s.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, _U32.pack(st.snd_seq))
        s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        s.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, _U32.pack(st.rcv_seq))
        s.connect(peer)                                   # in repair mode: ESTABLISHED, nothing sent
        opts = [(TCPOPT_MSS, st.mss or 1460)]
        if st.snd_wscale or st.rcv_wscale:
            opts.append((TCPOPT_WINDOW, st.snd_wscale | (st.rcv_wscale << 16)))
        if st.sack:
            opts.append((TCPOPT_SACK_PERM, 0))
        if st.timestamps:
            opts.append((TCPOPT_TIMESTAMP, 0))
        s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_OPTIONS, b"".join(struct.pack("II", *o) for o in opts))
        if st.timestamps:
            s.setsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP, _U32.pack(st.ts_now))
        if st.window:
            _wl1, snd_wnd, max_window, rcv_wnd, _wup = st.window
            s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW,
                         struct.pack("5I", st.rcv_seq, snd_wnd, max_window, rcv_wnd, st.rcv_seq))
        s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, 0)
        s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)   # live again (sends a window probe)
        # Leaving repair mode sets SK_NO_REUSE: once closed, a socket lingering in
        # FIN-WAIT would then keep anyone from binding the listen port again.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except OSError:
        s.close()
        raise
    return s


def close_silently(sock: socket.socket) -> None:
    """Close a frozen socket: in repair mode the kernel sends nothing for it."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    except OSError:
        pass
    sock.close()


def repair_available() -> str | None:
    """None if TCP_REPAIR works here, else why not (for `nfsplice probe`)."""
    lst = socket.socket()
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        c = socket.create_connection(lst.getsockname(), timeout=2)
        s, _ = lst.accept()
        try:
            freeze(s)
        except OSError as e:
            return f"TCP_REPAIR refused ({e.strerror}): needs root (CAP_NET_ADMIN)"
        finally:
            close_silently(s)
            c.close()
        return None
    except OSError as e:
        return f"cannot test TCP_REPAIR over loopback: {e.strerror or e}"
    finally:
        lst.close()
