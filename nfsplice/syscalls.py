"""System calls that never wait, made with the GIL held.

CPython's socket and fcntl modules release the GIL around nearly every system call
(recv, send, ioctl, getpeername, and the fcntl(O_NONBLOCK) behind settimeout and
setblocking).  For a call that cannot block this buys nothing, and under load it
costs: a thread that lets go of the GIL waits to get it back behind the other runnable
threads.  Measured here: 200 `fcntl.ioctl(FIONREAD)` calls beside two busy Python
threads took 311 ms (120 context switches), 200 `setsockopt` calls (which keep the GIL)
0.2 ms.  Under the 50-connection HTTP benchmark a release cost a queue thread about
1 ms.  ctypes.PyDLL calls keep the GIL; this module holds the one PyDLL handle the
package uses (the netlink queue's recv/send, the fast path's bpf(2), the hand-off's
ioctls and non-blocking reads).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct

libc = ctypes.PyDLL(ctypes.util.find_library("c"), use_errno=True)
libc.recv.restype = ctypes.c_ssize_t
libc.recv.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.send.restype = ctypes.c_ssize_t
libc.send.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int)
libc.ioctl.restype = ctypes.c_int
libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.POINTER(ctypes.c_int))
libc.syscall.restype = ctypes.c_long

MSG_DONTWAIT = 0x40
_TIMEVAL = struct.Struct("ll")


def oserror() -> OSError:
    """The OSError for errno as the last call through `libc` left it."""
    e = ctypes.get_errno()
    return OSError(e, os.strerror(e))


def ioctl_int(fd: int, request: int) -> int:
    """An ioctl that reads one int (SIOCINQ, SIOCOUTQ)."""
    v = ctypes.c_int(0)
    if libc.ioctl(fd, request, ctypes.byref(v)) < 0:
        raise oserror()
    return v.value


class Reader:
    """Non-blocking reads into one reusable buffer."""

    def __init__(self, size: int = 1 << 16):
        self.buf = bytearray(size)
        self._c = (ctypes.c_char * size).from_buffer(self.buf)

    def recv_now(self, fd: int) -> bytes | None:
        """What FD has received, up to the buffer's size, without waiting: None when
        nothing is there, b"" at the end of the stream.  OSError as recv(2) fails."""
        n = libc.recv(fd, self._c, len(self.buf), MSG_DONTWAIT)
        if n < 0:
            if ctypes.get_errno() in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
            raise oserror()
        return bytes(self.buf[:n])


def set_timeouts(sock: socket.socket, timeout: float) -> None:
    """Make SOCK's blocking calls give up after TIMEOUT seconds with EAGAIN
    (SO_RCVTIMEO, SO_SNDTIMEO; setsockopt keeps the GIL), the socket itself blocking.
    Python's own timeouts (settimeout) flip O_NONBLOCK and poll(2) before every recv and
    send: three releases of the GIL where one does.  A recv that times out raises
    BlockingIOError (EAGAIN), and so does a send, after a part of it may have gone."""
    if sock.gettimeout() is not None:
        sock.settimeout(None)
    timeout = max(timeout, 0.001)       # (zero would mean: wait for ever)
    tv = _TIMEVAL.pack(int(timeout), int((timeout % 1) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
