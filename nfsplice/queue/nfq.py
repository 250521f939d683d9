"""NFQUEUE through the netfilterqueue package (libnetfilter_queue).

The comparison backend.  netfilterqueue offers no way to set queue flags, so:

- no NFQA_CFG_F_GSO: the kernel segments every GSO packet to the MTU and completes its
  checksum before queueing it (csum_partial is always False, gso always False);
- no NFQA_CFG_F_FAIL_OPEN: asking for fail-open is refused with QueueError.

netfilterqueue is callback driven.  `receive(timeout)` waits on the queue's netlink fd
with select() and then lets `run_socket()` feed at most BATCH datagrams to our callback
through a small object whose recv() is non-blocking (MSG_DONTWAIT) and stops the batch;
the callback only wraps each packet in a QueuedPacket.

Held packets: a netfilterqueue Packet stays usable for a verdict after the callback
returned (it keeps its queue and packet id; only its pointer into libnetfilter_queue's
receive buffer is dropped, which is what `retain()` would work around).  We copy the
payload in the callback, so no retain() is needed, and `verdict()` calls
`set_payload()` + `accept()` / `drop()` on the Packet whenever the engine releases it.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import warnings

from .base import ACCEPT, DROP, QueuedPacket, QueueError

BATCH = 256            # datagrams handled per receive() at most (one packet each)
MAX_COPY = 0xFFFF      # netfilterqueue caps this at 4016 bytes; MTU-sized packets fit


class _BatchReader:
    """What run_socket() reads from: the queue's socket, non-blocking, at most LEFT
    datagrams.  Raising EAGAIN is run_socket's signal to return."""

    __slots__ = ("sock", "left", "owner")

    def __init__(self, sock: socket.socket, owner: "NFQBackend"):
        self.sock = sock
        self.owner = owner
        self.left = 0

    def recv(self, n: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch done")
        self.left -= 1
        try:
            return self.sock.recv(n, socket.MSG_DONTWAIT)
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                # The socket buffer overflowed and the kernel dropped what it could not
                # deliver; run_socket() carries on after ENOBUFS.
                self.owner.enobufs += 1
            raise


class NFQBackend:
    """One NFQUEUE queue bound with netfilterqueue.

    fail_open: not available (netfilterqueue cannot set NFQA_CFG_F_FAIL_OPEN): QueueError.
    maxlen: packets the kernel keeps waiting for a verdict (held ones count too).
    Other keywords (gso=...) are accepted and ignored: this backend never gets GSO packets.
    """

    name = "netfilterqueue"
    gso = False
    fail_open = False

    def __init__(self, queue_num: int, *, fail_open: bool = False, maxlen: int = 8192,
                 rcvbuf: int = 16 << 20, **ignored):
        if fail_open:
            raise QueueError("the netfilterqueue backend cannot set NFQA_CFG_F_FAIL_OPEN "
                             "(netfilterqueue has no queue-flags call): use --backend netlink "
                             "for --fail-open")
        try:
            import netfilterqueue
        except ImportError as e:
            raise QueueError(f"the netfilterqueue backend needs the NetfilterQueue package and "
                             f"libnetfilter_queue ({e}): pip install 'nfsplice[netfilterqueue]'") from e
        self.queue_num = queue_num
        self.enobufs = 0
        self._batch: list[QueuedPacket] = []
        self._error: BaseException | None = None
        self._sock: socket.socket | None = None
        self._nfq = None
        try:
            nfq = netfilterqueue.NetfilterQueue(af=socket.AF_INET)
        except OSError as e:
            raise self._diagnose(f"cannot open an nfnetlink queue handle ({e})") from e
        try:
            with warnings.catch_warnings():
                # bind() warns when the socket buffer is not what it asked for; we check below.
                warnings.simplefilter("ignore", RuntimeWarning)
                nfq.bind(queue_num, self._on_packet, max_len=maxlen,
                         mode=netfilterqueue.COPY_PACKET, range=MAX_COPY, sock_len=rcvbuf)
        except OSError as e:
            nfq.unbind()
            raise self._diagnose(f"cannot bind NFQUEUE {queue_num} ({e})") from e
        self._nfq = nfq
        # Our own view of libnetfilter_queue's netlink socket (a dup: closing it leaves
        # theirs alone), read with MSG_DONTWAIT so the fd's blocking mode is untouched.
        self._sock = socket.socket(fileno=os.dup(nfq.get_fd()))
        self._reader = _BatchReader(self._sock, self)

    def _diagnose(self, what: str) -> QueueError:
        """netfilterqueue's errors carry no errno: ask the kernel the same question over a
        plain netlink socket, which says EPERM / EBUSY / ENOENT."""
        from .netlink import NetlinkQueue
        try:
            probe = NetlinkQueue(self.queue_num, gso=False)
        except QueueError as e:
            return QueueError(f"netfilterqueue: {what}: {e}")
        except OSError as e:
            return QueueError(f"netfilterqueue: {what}: {e.strerror}")
        probe.close()
        return QueueError(f"netfilterqueue: {what}; a plain netlink bind of the same queue works, "
                          "so libnetfilter_queue itself failed (see nfsplice probe)")

    # -- packets ------------------------------------------------------------------------
    def _on_packet(self, pkt) -> None:
        # Called from inside run_socket(); an exception escaping here would be left pending
        # by netfilterqueue, so nothing may raise: a packet we cannot wrap is accepted.
        try:
            try:
                data = pkt.get_payload()
            except RuntimeError:
                data = b""
            n = len(data)
            truncated = n >= 4 and ((data[2] << 8) | data[3]) > n
            self._batch.append(QueuedPacket(pkt.id, pkt.hook, memoryview(bytearray(data)),
                                            truncated=truncated, mark=pkt.get_mark(), handle=pkt))
        except BaseException as e:  # noqa: BLE001 - see above
            if self._error is None:
                self._error = e
            try:
                pkt.accept()
            except BaseException:  # noqa: BLE001
                pass

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self, timeout: float | None = None) -> list[QueuedPacket]:
        """Wait up to TIMEOUT for the queue; return the packets of up to BATCH datagrams.
        Each has its own copied buffer, valid for as long as the caller keeps it."""
        if self._nfq is None:
            raise QueueError("the netfilterqueue backend is closed")
        try:
            ready, _, _ = select.select([self._sock], [], [], timeout)
        except InterruptedError:
            return []
        if not ready:
            return []
        self._reader.left = BATCH
        self._nfq.run_socket(self._reader)
        out, self._batch = self._batch, []
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return out

    def verdict(self, pkt: QueuedPacket, verdict: int, payload=None) -> None:
        """Send the one verdict PKT gets (also long after it was received: held packets);
        PAYLOAD (bytes-like) replaces the packet."""
        p = pkt.handle
        try:
            if payload is not None:
                p.set_payload(bytes(payload))
            if verdict == ACCEPT:
                p.accept()
            elif verdict == DROP:
                p.drop()
            else:
                raise ValueError(f"verdict {verdict} not supported by netfilterqueue (ACCEPT or DROP)")
        except RuntimeError as e:
            if "unbound" in str(e):
                # The queue was closed: the kernel dropped the packet already.
                raise OSError(errno.EBADF, f"NFQUEUE {self.queue_num} is closed") from e
            raise   # a second verdict for one packet: a bug in the caller

    def close(self) -> None:
        if self._nfq is None:
            return
        nfq, self._nfq = self._nfq, None
        try:
            nfq.unbind()    # unbinding the queue: the kernel drops what still waits in it
        except OSError:
            pass
        if self._sock is not None:
            self._sock.close()
            self._sock = None
