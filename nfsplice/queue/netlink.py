"""nfnetlink_queue over a raw netlink socket.

Field names and numbers follow include/uapi/linux/netfilter/nfnetlink_queue.h and
include/uapi/linux/netlink.h, so they can be checked against the header.  Written by
hand because neither netfilterqueue nor pyroute2 can set NFQA_CFG_F_GSO (see DESIGN.md:
without it no queue consumer passes 1 Gbit/s) or NFQA_CFG_F_FAIL_OPEN.

Packets are parsed in place in one receive buffer.  Verdicts decided together leave in
one datagram; a small one is sent, like the non-blocking reads, with the GIL held (see
nfsplice.syscalls), a large one by sendmsg() from where the payloads lie.
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

from ..syscalls import MSG_DONTWAIT, libc
from .base import HOOK_PRE_ROUTING, QueuedPacket, QueueError

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5

# struct nlmsghdr
NLMSG_HDR = struct.Struct("=IHHII")
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
# struct nfgenmsg: family, version, res_id (queue number, big endian)
NFGEN_HDR = struct.Struct("!BBH")
NFNETLINK_V0 = 0
# struct nlattr
NLA_HDR = struct.Struct("=HH")
NLA_TYPE_MASK = 0x3FFF

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2

# enum nfqnl_attr_type
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_MARK = 3
NFQA_PAYLOAD = 10
NFQA_CAP_LEN = 13
NFQA_SKB_INFO = 14
NFQA_SKB_CSUMNOTREADY = 1 << 0
NFQA_SKB_GSO = 1 << 1

# enum nfqnl_attr_config
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN = 1 << 0
NFQA_CFG_F_GSO = 1 << 2

PACKET_HDR = struct.Struct("!IHB")        # struct nfqnl_msg_packet_hdr
VERDICT_HDR = struct.Struct("!II")        # struct nfqnl_msg_verdict_hdr
_U32BE = struct.Struct("!I")

RECV_BUF = 1 << 18
# recv and send with the GIL held (nfsplice.syscalls).  A netlink send to the kernel
# never waits (a verdict is processed inside the call: ~100 us for a 64 KiB packet
# forwarded), nor does a recv with MSG_DONTWAIT; releasing the GIL around them, as the
# socket module does, meant waiting to get it back behind the proxy's threads (under
# 50-connection load ~1 ms a time, with the queue hundreds of packets behind).  The
# queue thread is the one thread every spliced byte waits for: it keeps the GIL while it
# has work.
GIL_SEND_MAX = 16 << 10
_VERDICT_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT
_VERDICT_NLA = NLA_HDR.pack(NLA_HDR.size + VERDICT_HDR.size, NFQA_VERDICT_HDR)
_VERDICT_LEN = NLMSG_HDR.size + NFGEN_HDR.size + len(_VERDICT_NLA) + VERDICT_HDR.size
_PAD = (b"", b"\0", b"\0\0", b"\0\0\0")
VERDICT_BATCH_BYTES = 192 << 10   # below the socket's send buffer (wmem_default 208 KiB)


def _has_net_admin() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 12))   # CAP_NET_ADMIN
    except OSError:
        pass
    return os.geteuid() == 0


def _attr(atype: int, payload: bytes) -> bytes:
    n = NLA_HDR.size + len(payload)
    return NLA_HDR.pack(n, atype) + payload + b"\0" * ((4 - n % 4) % 4)


class NetlinkQueue:
    """One NFQUEUE queue bound over netlink.

    gso: ask for unsegmented GSO packets (NFQA_CFG_F_GSO); their checksum may be partial.
    fail_open: when the queue is full the kernel accepts instead of dropping.
    maxlen: packets the kernel keeps waiting for a verdict (held ones count too).
    """

    name = "netlink"

    def __init__(self, queue_num: int, *, gso: bool = True, fail_open: bool = False,
                 maxlen: int = 8192, rcvbuf: int = 32 << 20):
        self.queue_num = queue_num
        self.seq = 0
        self.enobufs = 0
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as e:
            raise QueueError(f"cannot open a netfilter netlink socket ({e.strerror}): "
                             "the kernel needs CONFIG_NETFILTER_NETLINK") from e
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE (root)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((0, 0))
        self._timeout = None
        self.buf = bytearray(RECV_BUF)
        self.view = memoryview(self.buf)
        self._buf_addr = ctypes.addressof((ctypes.c_char * RECV_BUF).from_buffer(self.buf))
        try:
            self._config(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)))
        except OSError as e:
            self.sock.close()
            hint = {errno.EPERM: "run as root (CAP_NET_ADMIN)",
                    errno.ENOENT: "the kernel lacks nfnetlink_queue (CONFIG_NETFILTER_NETLINK_QUEUE)"}
            if e.errno == errno.EPERM and _has_net_admin():
                # nfqnl_recv_config() answers EPERM also when another socket owns the queue.
                hint[errno.EPERM] = (f"queue {queue_num} is already bound by another process "
                                     "(another nfsplice instance? choose another --queue)")
            raise QueueError(f"cannot bind NFQUEUE {queue_num}: {e.strerror}; "
                             f"{hint.get(e.errno, 'see nfsplice probe')}") from e
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IBxxx", 0xFFFF, NFQNL_COPY_PACKET)[:5]))
        self._config(_attr(NFQA_CFG_QUEUE_MAXLEN, _U32BE.pack(maxlen)))
        flags = (NFQA_CFG_F_GSO if gso else 0) | (NFQA_CFG_F_FAIL_OPEN if fail_open else 0)
        mask = NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN
        try:
            self._config(_attr(NFQA_CFG_FLAGS, _U32BE.pack(flags)) + _attr(NFQA_CFG_MASK, _U32BE.pack(mask)))
        except OSError as e:
            raise QueueError(f"the kernel refused NFQUEUE flags {flags:#x} ({e.strerror}): "
                             "NFQA_CFG_F_GSO needs Linux 3.10 or newer") from e
        self.gso = gso
        self.fail_open = fail_open
        self._nfgen = NFGEN_HDR.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue_num)

    # -- netlink plumbing -------------------------------------------------------------
    def _header(self, msg_type: int, flags: int, length: int) -> bytes:
        self.seq += 1
        return NLMSG_HDR.pack(length, (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, self.seq, 0)

    def _config(self, attrs: bytes) -> None:
        body = NFGEN_HDR.pack(socket.AF_UNSPEC, NFNETLINK_V0, self.queue_num) + attrs
        self.sock.send(self._header(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK,
                                    NLMSG_HDR.size + len(body)) + body)
        want = self.seq
        while True:
            n = self.sock.recv_into(self.buf)
            off = 0
            while off + NLMSG_HDR.size <= n:
                length, mtype, _flags, seq, _pid = NLMSG_HDR.unpack_from(self.buf, off)
                if mtype == NLMSG_ERROR and seq == want:
                    err = struct.unpack_from("=i", self.buf, off + NLMSG_HDR.size)[0]
                    if err:
                        raise OSError(-err, os.strerror(-err))
                    return
                off += (length + 3) & ~3

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- packets ------------------------------------------------------------------------
    def receive(self, timeout: float | None = None) -> list[QueuedPacket]:
        """Wait up to TIMEOUT for one datagram; return its packets (views into our buffer)."""
        n = libc.recv(self.sock.fileno(), self._buf_addr, RECV_BUF, MSG_DONTWAIT)
        e = ctypes.get_errno() if n < 0 else 0
        try:
            if n < 0 and e == errno.ENOBUFS:
                raise OSError(e, os.strerror(e))
            if n < 0:       # nothing waiting (EAGAIN): wait for it without the GIL
                if timeout != self._timeout:
                    self.sock.settimeout(timeout)
                    self._timeout = timeout
                n = self.sock.recv_into(self.buf)
        except TimeoutError:
            return []
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                # The socket buffer overflowed: the kernel dropped (or, fail-open,
                # accepted) what it could not deliver.  Count it and carry on.
                self.enobufs += 1
                return []
            raise
        out = []
        buf = self.buf
        view = self.view
        off = 0
        while off + NLMSG_HDR.size <= n:
            length, mtype, _flags, _seq, _pid = NLMSG_HDR.unpack_from(buf, off)
            if length < NLMSG_HDR.size:
                break
            if mtype == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                pkt = self._parse_packet(view, off + NLMSG_HDR.size + NFGEN_HDR.size, off + length)
                if pkt is not None:
                    out.append(pkt)
            off += (length + 3) & ~3
        return out

    @staticmethod
    def _parse_packet(view: memoryview, a: int, end: int) -> QueuedPacket | None:
        pid = None
        hook = HOOK_PRE_ROUTING
        payload = None
        skb_info = 0
        cap_len = None
        mark = 0
        while a + 4 <= end:
            alen, atype = NLA_HDR.unpack_from(view, a)
            if alen < 4:
                break
            atype &= NLA_TYPE_MASK
            if atype == NFQA_PACKET_HDR:
                pid, _proto, hook = PACKET_HDR.unpack_from(view, a + 4)
            elif atype == NFQA_PAYLOAD:
                payload = view[a + 4:a + alen]
            elif atype == NFQA_SKB_INFO:
                skb_info = _U32BE.unpack_from(view, a + 4)[0]
            elif atype == NFQA_MARK:
                mark = _U32BE.unpack_from(view, a + 4)[0]
            elif atype == NFQA_CAP_LEN:
                cap_len = _U32BE.unpack_from(view, a + 4)[0]
            a += (alen + 3) & ~3
        if pid is None:
            return None
        if payload is None:
            payload = view[0:0]
        return QueuedPacket(pid, hook, payload,
                            csum_partial=bool(skb_info & NFQA_SKB_CSUMNOTREADY),
                            gso=bool(skb_info & NFQA_SKB_GSO),
                            truncated=cap_len is not None and cap_len > len(payload), mark=mark)

    def verdict(self, pkt: QueuedPacket, verdict: int, payload=None) -> None:
        """Send the one verdict PKT gets; PAYLOAD (bytes-like) replaces the packet."""
        self._send(*self._message(pkt, verdict, payload))

    def _message(self, pkt: QueuedPacket, verdict: int, payload) -> tuple[tuple, int]:
        """The parts of one verdict message (header, payload, padding) and its length."""
        self.seq += 1
        fixed = self._nfgen + _VERDICT_NLA + VERDICT_HDR.pack(verdict, pkt.packet_id)
        if payload is None:
            return (NLMSG_HDR.pack(_VERDICT_LEN, _VERDICT_TYPE, NLM_F_REQUEST, self.seq, 0) + fixed,), _VERDICT_LEN
        plen = len(payload)
        pad = -plen & 3
        n = _VERDICT_LEN + NLA_HDR.size + plen + pad
        head = (NLMSG_HDR.pack(n, _VERDICT_TYPE, NLM_F_REQUEST, self.seq, 0) + fixed
                + NLA_HDR.pack(NLA_HDR.size + plen, NFQA_PAYLOAD))
        return ((head, payload, _PAD[pad]) if pad else (head, payload)), n

    def _send(self, parts, size: int) -> None:
        """One datagram to the kernel.  Up to GIL_SEND_MAX bytes (pure verdicts, ACKs,
        small packets) with the GIL held, copied into one buffer (see nfsplice.syscalls); larger
        ones, where the kernel's work inside the call (forwarding 64 KiB packets, ~100 us
        each) is worth letting other threads run, sent in place by sendmsg()."""
        if size > GIL_SEND_MAX:
            self.sock.sendmsg(parts)
            return
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if libc.send(self.sock.fileno(), data, len(data), 0) < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    def verdicts(self, items) -> int:
        """Send several verdicts, ITEMS of (packet, verdict, payload or None), in as few
        sends as fit (the kernel's netlink_rcv_skb takes every message of one datagram
        in turn): one syscall for a batch, not one per packet.
        Returns how many verdicts could not be sent (their packets are gone)."""
        failed = 0
        iov: list = []
        size = 0
        batch: list = []
        for pkt, verdict, payload in items:
            parts, n = self._message(pkt, verdict, payload)
            if iov and (size + n > VERDICT_BATCH_BYTES or len(iov) + len(parts) > 512):
                failed += self._send_batch(iov, size, batch)
                iov, size, batch = [], 0, []
            iov.extend(parts)
            size += n
            batch.append((pkt, verdict, payload))
        if iov:
            failed += self._send_batch(iov, size, batch)
        return failed

    def _send_batch(self, iov, size: int, batch) -> int:
        try:
            self._send(iov, size)
            return 0
        except OSError:
            pass
        failed = 0     # the datagram as a whole was refused: one by one, each counted
        for pkt, verdict, payload in batch:
            try:
                self.verdict(pkt, verdict, payload)
            except OSError:
                failed += 1
        return failed

    def close(self) -> None:
        try:
            body = NFGEN_HDR.pack(socket.AF_UNSPEC, NFNETLINK_V0, self.queue_num) + \
                _attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_UNBIND, socket.AF_INET))
            self.sock.send(self._header(NFQNL_MSG_CONFIG, NLM_F_REQUEST, NLMSG_HDR.size + len(body)) + body)
        except OSError:
            pass
        self.sock.close()
