"""The fast path: spliced pairs' steady state forwarded by a tc-BPF program.

Per packet, NFQUEUE costs a trip to Python and back and a verdict that re-enters the
stack (README: about 150 us per 64 KiB packet); with many concurrent flows TCP sends
small GSO packets and that cost decides everything.  The engine in Python stays the
authority over a pair: it does the hand-off, message ends, FIN, RST, timers and
every packet that is not plain data or ACK.  While a pair is plainly SPLICED it
writes the pair's two translations into a BPF hash map, and `fastpath.bpf.c`
(attached at tc ingress of the proxy host's devices) rewrites and redirects those
packets itself, exactly as `packet.rewrite` would; anything it is not sure about goes
on to the rules and the queue, unchanged.  The program's header says which packets.

Tools: clang compiles the program when a FastPath is opened, bpftool loads it (the
object is pinned for a moment in a private bpffs mount, then only the tc filters and
our file descriptors hold it), tc attaches it; map reads and writes are bpf(2) calls
through ctypes.  `available()` names what is missing.

Each instance attaches with its own tc filter priority (from the instance name), so
`cleanup(instance)` can find and remove its filters after a crash.

The tap (payload of tapped pairs for the cache) is `TapClones` when the instance can
make its veth pair (named from the same priority, so cleanup finds it too), else the
program's ring (`TapRing`): see fastpath.bpf.c.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import logging
import mmap
import os
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

from ..syscalls import libc

log = logging.getLogger("nfsplice.fastpath")

SOURCE = os.path.join(os.path.dirname(__file__), "fastpath.bpf.c")

# struct flow in fastpath.bpf.c (56 bytes); addresses and ports in network order.
FLOW = struct.Struct("=4s4s2s2sIIIIIIIIIBBBBI")
# struct progress (32 bytes): packets, bytes, last_ns, next_seq, max_tsval.
PROGRESS = struct.Struct("=QQQII")
_BPF_ANY, _BPF_NOEXIST = 0, 1
F_FAST, F_END, F_WATCH, F_FLOOR, F_TAP, F_PASS_ACKS, F_C2S, F_LIMIT = 1, 2, 4, 8, 16, 32, 64, 128
STAT_NAMES = ("fast_packets", "fast_bytes", "queue_marked", "punt.flags", "punt.options",
              "punt.message_end", "punt.ack_watch", "tsecr_floored", "zero_window_c2s",
              "punt.shape", "redirect_failed", "tap_records", "punt.tap_full", "handoff_acks_passed",
              "punt.no_progress", "zero_window_s2c", "window_limited", "watch_copies")
TAP_RING_SIZE = 64 << 20          # nfs_tap's max_entries (without clones)
TAP_DEV_PREFIX = "nfst"           # the clone tap's veth pair: nfst<pref>, nfst<pref>p
TAP_RCVBUF = 512 << 20            # SO_RCVBUFFORCE of the clone socket (the kernel doubles it)
TAP_FRAME_MAX = 14 + 20 + 60 + 65536   # Ethernet + IP + TCP headers + the program's TAP_MAX
TAP_MARKER_TYPE = 0x88B5          # IEEE 802 local experimental ethertype: our markers
_TAP_MARKER = struct.Struct("!6s6sH8sQ")   # dst, src, type, magic, token
_MARKER_MAGIC = b"nfsplice"
_ETH_P_ALL = 0x0003
_SOL_PACKET, _PACKET_STATISTICS = 263, 6
_SO_RCVBUFFORCE, _SO_MEMINFO = 33, 55
ROUTE_TTL = 10.0                  # seconds a destination's egress device is trusted
ROUTE_CACHE_MAX = 4096            # destinations remembered (expired ones dropped past it)
_TAP_HEAD = struct.Struct("=12sII")   # struct tap_rec: key, seq, len (then the payload)
_RB_BUSY, _RB_DISCARD = 1 << 31, 1 << 30
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT, TC_ACT_UNSPEC = 0, 2, 7, -1

_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
_BPF_MAP_LOOKUP_ELEM, _BPF_MAP_UPDATE_ELEM, _BPF_MAP_DELETE_ELEM = 1, 2, 3
_BPF_OBJ_GET, _BPF_PROG_TEST_RUN = 7, 10
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long
# The map calls keep the GIL (nfsplice.syscalls.libc): each takes microseconds, and the
# runner makes them with its lock held; releasing the GIL for each one meant waiting to
# get it back from the proxy's threads (under load ~0.3 ms a time), with every queue
# thread waiting on the lock.


class FastPathError(RuntimeError):
    """The fast path cannot be set up; the message names the missing piece."""


@dataclass
class Progress:
    """What the program did for one direction since its flow was first written (the
    counters outlive rewrites of the flow; take() ends them)."""
    packets: int
    bytes: int
    last_ns: int          # CLOCK_MONOTONIC, as time.monotonic() * 1e9
    next_seq: int         # highest seq + len forwarded (meaningful when packets > 0)
    max_tsval: int = 0    # highest TSval forwarded, translated (0: none)


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(_NR_BPF, cmd, buf, 128)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def _obj_get(path: str) -> int:
    p = ctypes.create_string_buffer(path.encode())
    return _bpf(_BPF_OBJ_GET, struct.pack("=QII", ctypes.addressof(p), 0, 0))


class _Map:
    def __init__(self, fd: int, key_size: int, value_size: int):
        self.fd, self.key_size, self.value_size = fd, key_size, value_size

    def _call(self, cmd: int, key: bytes, value=None, flags: int = _BPF_ANY) -> bool:
        """bpf(2) on one element; False when the key is not there (ENOENT) or, with
        BPF_NOEXIST, already is (EEXIST)."""
        k = ctypes.create_string_buffer(key, self.key_size)
        # Fields a command does not use must be zero (DELETE has no value).
        attr = struct.pack("=IIQQQ", self.fd, 0, ctypes.addressof(k),
                           ctypes.addressof(value) if value is not None else 0, flags)
        try:
            _bpf(cmd, attr)
        except OSError as e:
            if e.errno == errno.ENOENT or (e.errno == errno.EEXIST and flags == _BPF_NOEXIST):
                return False
            raise
        return True

    def lookup(self, key: bytes) -> bytes | None:
        v = ctypes.create_string_buffer(self.value_size)
        return v.raw if self._call(_BPF_MAP_LOOKUP_ELEM, key, v) else None

    def update(self, key: bytes, value: bytes) -> None:
        self._call(_BPF_MAP_UPDATE_ELEM, key, ctypes.create_string_buffer(value, self.value_size))

    def create(self, key: bytes, value: bytes) -> bool:
        """Add KEY with VALUE unless KEY is there already (then False, nothing changes)."""
        return self._call(_BPF_MAP_UPDATE_ELEM, key, ctypes.create_string_buffer(value, self.value_size),
                          _BPF_NOEXIST)

    def delete(self, key: bytes) -> bool:
        return self._call(_BPF_MAP_DELETE_ELEM, key)


def available() -> str | None:
    """None if this machine can run the fast path, else what is missing."""
    for tool, pkg in (("clang", "clang"), ("bpftool", "bpftool"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            return f"the fast path needs {tool} (Debian package {pkg})"
    if not os.path.exists("/usr/include/bpf/bpf_helpers.h"):
        return "the fast path needs libbpf's headers (Debian package libbpf-dev)"
    if os.geteuid() != 0:
        return "the fast path needs root (bpf(2), tc)"
    return None


def tc_priority(instance: str) -> int:
    """The tc filter priority of INSTANCE's filters (unique per instance name)."""
    return 0xC000 + int.from_bytes(hashlib.sha1(instance.encode()).digest()[:2], "big") % 0x3000


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True)


def compile_program(out_dir: str, tap_clone_ifindex: int = 0) -> str:
    """The program in OUT_DIR; with TAP_CLONE_IFINDEX it taps by cloning to that device."""
    obj = os.path.join(out_dir, "fastpath.bpf.o")
    arch_inc = f"/usr/include/{os.uname().machine}-linux-gnu"
    from ..engine import NEXT_MESSAGE_WINDOW, WATCH_COPY_MARK
    defines = [f"-DNEXT_MESSAGE_WINDOW={NEXT_MESSAGE_WINDOW}", f"-DWATCH_COPY_MARK={WATCH_COPY_MARK:#x}"]
    if tap_clone_ifindex:
        defines.append(f"-DTAP_CLONE_IFINDEX={tap_clone_ifindex}")
    r = _run(["clang", "-O2", "-g", "-target", "bpf", "-I", arch_inc, *defines, "-c", SOURCE, "-o", obj])
    if r.returncode:
        raise FastPathError(f"compiling {SOURCE} failed: {r.stderr.strip()[-800:]}")
    return obj


def ether_devices() -> list[tuple[str, int]]:
    """(name, ifindex) of this namespace's Ethernet devices that are up (not lo, not
    a clone tap's: a program there would forward the clones again)."""
    out = []
    for name in sorted(os.listdir("/sys/class/net")):
        if name.startswith(TAP_DEV_PREFIX):
            continue
        base = f"/sys/class/net/{name}"
        try:
            with open(f"{base}/type") as f:
                if f.read().strip() != "1":      # ARPHRD_ETHER: the program expects L2
                    continue
            with open(f"{base}/ifindex") as f:
                idx = int(f.read())
            with open(f"{base}/flags") as f:
                flags = int(f.read(), 16)
        except OSError:
            continue
        # IFF_UP, not operstate: a veth whose peer just came up still says "down" for
        # a moment (the kernel's link watch updates it later).
        if name != "lo" and flags & 1:
            out.append((name, idx))
    return out


class FastPath:
    """The loaded program, its maps and its tc filters for one nfsplice instance."""

    def __init__(self, instance: str, devices: list[tuple[str, int]] | None = None,
                 attach: bool = True, clones: bool = True):
        """CLONES: tap through a clone device (if it can be made; an attached program
        only), else through the ring."""
        why = available()
        if why:
            raise FastPathError(why)
        self.instance = instance
        self.pref = tc_priority(instance)
        self.devices = ether_devices() if devices is None else devices
        self.tap = self.clones = None
        self.ifindexes = {idx for _, idx in self.devices}
        self.attached: list[str] = []
        self.added_clsact: list[str] = []
        # Route lookups (the device a destination leaves by) on one rtnetlink socket,
        # opened here: importing pyroute2 at the first splice held the runner's lock
        # for ~170 ms, and the packets waiting meanwhile cost the origin an RTO.
        from pyroute2 import IPRoute
        self._ipr = IPRoute()
        self._route_lock = threading.Lock()
        self._routes: dict[bytes, tuple[int, float]] = {}
        self._last: dict[str, int] = {}
        tmp = tempfile.mkdtemp(prefix="nfsplice-bpf-")
        pin = os.path.join(tmp, "fs")
        os.mkdir(pin)
        mounted = False
        try:
            if clones and attach:
                try:
                    self.clones = TapClones(tap_device_name(self.pref))
                except (OSError, FastPathError) as e:
                    log.warning("fast path tap through the ring (slower): %s", e)
            obj = compile_program(tmp, self.clones.ifindex if self.clones else 0)
            r = _run(["mount", "-t", "bpf", "bpf", pin])
            if r.returncode:
                raise FastPathError(f"mounting a bpf filesystem failed: {r.stderr.strip()}")
            mounted = True
            r = _run(["bpftool", "prog", "load", obj, f"{pin}/prog", "type", "classifier",
                      "pinmaps", f"{pin}/maps"])
            if r.returncode:
                raise FastPathError("loading the fast path program failed (kernel BPF support, "
                                    f"tc classifier programs): {r.stderr.strip()[-800:]}")
            self.prog_fd = _obj_get(f"{pin}/prog")
            self.flows = _Map(_obj_get(f"{pin}/maps/nfs_flows"), 12, FLOW.size)
            self.progress = _Map(_obj_get(f"{pin}/maps/nfs_progress"), 12, PROGRESS.size)
            self.stats_map = _Map(_obj_get(f"{pin}/maps/nfs_stats"), 4, 8 * _ncpus())
            if self.clones is None:
                self.tap = TapRing(_obj_get(f"{pin}/maps/nfs_tap"), TAP_RING_SIZE)
            if attach:
                self._attach(f"{pin}/prog")
        except BaseException:
            self.detach()
            if self.clones is not None:
                self.clones.close()
            raise
        finally:
            if mounted:
                _run(["umount", "-l", pin])
            shutil.rmtree(tmp, ignore_errors=True)

    # -- tc ------------------------------------------------------------------------------
    def _attach(self, prog_path: str) -> None:
        for name, _ in self.devices:
            r = _run(["tc", "qdisc", "add", "dev", name, "clsact"])
            if r.returncode == 0:
                self.added_clsact.append(name)
            elif "File exists" not in r.stderr and "Exclusivity flag" not in r.stderr:
                raise FastPathError(f"tc qdisc add dev {name} clsact: {r.stderr.strip()}")
            r = _run(["tc", "filter", "add", "dev", name, "ingress", "pref", str(self.pref), "handle", "1",
                      "bpf", "object-pinned", prog_path, "direct-action"])
            if r.returncode:
                raise FastPathError(f"attaching the fast path to {name} failed: {r.stderr.strip()}")
            self.attached.append(name)

    def detach(self) -> None:
        for name in self.attached:
            _run(["tc", "filter", "del", "dev", name, "ingress", "pref", str(self.pref)])
        for name in self.added_clsact:
            r = _run(["tc", "filter", "show", "dev", name, "ingress"])
            if r.returncode == 0 and not r.stdout.strip():
                _run(["tc", "qdisc", "del", "dev", name, "clsact"])
        self.attached, self.added_clsact = [], []

    def close(self) -> None:
        """Detach and let go; counters() keeps answering with the last figures."""
        self.detach()
        if getattr(self, "tap", None) is not None:
            self.tap.close()
        if getattr(self, "clones", None) is not None:
            self.clones.close()      # after detach: the program no longer sends to it
        if getattr(self, "stats_map", None) is not None and self.stats_map.fd is not None:
            self._last = self.counters()
        if getattr(self, "prog_fd", None) is not None:
            os.close(self.prog_fd)
            self.prog_fd = None
        if getattr(self, "_ipr", None) is not None:
            self._ipr.close()
            self._ipr = None
        for m in ("flows", "progress", "stats_map"):
            mp = getattr(self, m, None)
            if mp is not None and mp.fd is not None:
                os.close(mp.fd)
                mp.fd = None

    # -- flows ---------------------------------------------------------------------------
    def egress(self, dst: bytes) -> int:
        """The ifindex packets to DST leave by, if the program is attached there; else 0.
        Looked up again after ROUTE_TTL seconds (routes change)."""
        now = time.monotonic()
        got = self._routes.get(dst)
        if got is not None and now < got[1]:
            return got[0]
        with self._route_lock:      # (the runner asks under its lock, proxies ahead of it)
            idx = _route_oif(self._ipr, socket.inet_ntoa(dst))
        idx = idx if idx in self.ifindexes else 0
        if len(self._routes) >= ROUTE_CACHE_MAX:
            self._routes = {k: v for k, v in self._routes.items() if now < v[1]}
        self._routes[dst] = (idx, now + ROUTE_TTL)
        return idx

    def put(self, key: bytes, value: bytes) -> None:
        """Write KEY's flow, in place if it is there: its counters are created (zero)
        first if they are not there, and otherwise left as they are."""
        self.progress.create(key, _NO_PROGRESS)
        self.flows.update(key, value)

    def get(self, key: bytes) -> Progress | None:
        """What the program did for KEY's flow so far (None: it has no counters)."""
        raw = self.progress.lookup(key)
        return None if raw is None else Progress(*PROGRESS.unpack(raw))

    def handoff_tsval(self, key: bytes) -> int | None:
        """The sender's latest TSval a hand-off flow (pass_acks) saw since it was
        written; None: none, or no such flow."""
        raw = self.flows.lookup(key)
        if raw is None:
            return None
        f = FLOW.unpack(raw)
        return f[17] if f[16] else None

    def take(self, key: bytes) -> Progress | None:
        """Delete KEY's flow, then its counters; what the program did for it (None: it
        had no counters).  The flow goes first: the program stops counting before the read
        (but for a packet it may hold on another CPU at that moment)."""
        self.flows.delete(key)
        got = self.get(key)
        if got is not None:
            self.progress.delete(key)
        return got

    def counters(self) -> dict[str, int]:
        if self.stats_map.fd is None:
            return dict(self._last)
        out = {}
        for i, name in enumerate(STAT_NAMES):
            raw = self.stats_map.lookup(struct.pack("=I", i))
            if raw is not None:
                total = sum(struct.unpack(f"={len(raw) // 8}Q", raw))
                if total:
                    out["fastpath." + name] = total
        return out

    def test_run(self, frame: bytes) -> tuple[int, bytes]:
        """Run the program on FRAME (Ethernet) without a device: (return value, frame out)."""
        data_in = ctypes.create_string_buffer(frame, len(frame))
        out = ctypes.create_string_buffer(len(frame) + 256)
        attr = struct.pack("=IIIIQQIIIIQQIII", self.prog_fd, 0, len(frame), len(out),
                           ctypes.addressof(data_in), ctypes.addressof(out), 1, 0, 0, 0, 0, 0, 0, 0, 0)
        buf = ctypes.create_string_buffer(attr, 128)
        r = _libc.syscall(_NR_BPF, _BPF_PROG_TEST_RUN, buf, 128)
        if r < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        _fd, retval, _sin, size_out = struct.unpack_from("=IiII", buf.raw)
        return retval, out.raw[:size_out]


class TapRing:
    """The consumer side of the program's tap ring (BPF_MAP_TYPE_RINGBUF).

    The map is mmapped as the kernel lays it out: a consumer page we write our
    position to, then the producer page and the data pages mapped twice in a row, so a
    record that wraps reads as one slice.  Each record: 8-byte header (length with the
    busy and discard bits), then struct tap_rec, padded to 8 bytes."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        page = mmap.PAGESIZE
        self.page = page
        self.consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self.producer = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self.view = memoryview(self.producer)
        self.poller = select.epoll()
        self.poller.register(fd, select.EPOLLIN)

    def wait(self, timeout: float) -> None:
        self.poller.poll(timeout)

    def consume(self, handle) -> int:
        """Call HANDLE(key, seq, payload) for every record committed so far; the
        payload is a view into the ring, valid only during the call."""
        cons = struct.unpack_from("=Q", self.consumer, 0)[0]
        prod = struct.unpack_from("=Q", self.producer, 0)[0]
        n = 0
        view, mask, page = self.view, self.size - 1, self.page
        while cons < prod:
            at = page + (cons & mask)
            head = struct.unpack_from("=I", view, at)[0]
            if head & _RB_BUSY:
                break                      # reserved, not yet submitted
            length = head & ~(_RB_BUSY | _RB_DISCARD)
            if not head & _RB_DISCARD:
                key, first_seq, plen = _TAP_HEAD.unpack_from(view, at + 8)
                start = at + 8 + _TAP_HEAD.size
                handle(key, first_seq, view[start:start + plen])
                n += 1
            cons += (length + 8 + 7) & ~7
            struct.pack_into("=Q", self.consumer, 0, cons)
        return n

    def close(self) -> None:
        if self.fd is None:
            return
        self.poller.close()
        self.view.release()
        self.producer.close()
        self.consumer.close()
        os.close(self.fd)
        self.fd = None


def tap_device_name(pref: int) -> str:
    """The clone tap's device of the instance with tc priority PREF (its peer: + "p")."""
    return f"{TAP_DEV_PREFIX}{pref:04x}"


class TapClones:
    """The clone tap's device and socket: a veth pair (NAME, NAME + "p") the program
    clones tapped packets out of NAME, and an AF_PACKET socket on NAME that keeps them
    (the kernel hands it each clone as NAME transmits it, in the program's call, before
    the veth; so what the program cloned before an event is in the socket when the
    event is seen).  The pair is up, without addresses, IPv6, ARP or forwarding; the
    peer drops what reaches it (addressed to another host's MAC, or unknown type).

    Markers: `mark(token)` sends a frame of our own type out of NAME; it reaches the
    socket behind every clone already there, so the consumer knows when it has seen
    all of them (deferred tap closes, runner.py).  A full socket drops clones and
    markers alike; `drops()` says how many."""

    def __init__(self, name: str):
        self.name, self.peer = name, name + "p"
        self.sock = self.marker_sock = None
        _run(["ip", "link", "del", name])       # left by a killed instance of this name
        r = _run(["ip", "link", "add", name, "type", "veth", "peer", "name", self.peer])
        if r.returncode:
            raise FastPathError(f"creating the clone tap device {name} (veth) failed: {r.stderr.strip()}")
        try:
            for dev in (name, self.peer):
                # Before the device is up, so no link-local address, DAD or RS is sent.
                for key, value in (("ipv6/conf/{}/disable_ipv6", "1"), ("ipv4/conf/{}/forwarding", "0"),
                                   ("ipv4/conf/{}/rp_filter", "1")):
                    path = "/proc/sys/net/" + key.format(dev)
                    if os.path.exists(path):
                        with open(path, "w") as f:
                            f.write(value)
                for args in (["addrgenmode", "none"], ["arp", "off"], ["up"]):
                    r = _run(["ip", "link", "set", dev, *args])
                    if r.returncode and args == ["up"]:
                        raise FastPathError(f"setting {dev} up failed: {r.stderr.strip()}")
            self.ifindex = socket.if_nametoindex(name)
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, TAP_RCVBUF)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TAP_RCVBUF)
            self.sock.bind((name, _ETH_P_ALL))
            self.marker_sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            self.marker_sock.bind((name, 0))
            self.marker_sock.setblocking(False)
            self._marker_src = self.marker_sock.getsockname()[4][:6]
            self.drops()                        # (reading the statistics resets them)
        except BaseException:
            self.close()
            raise

    def mark(self, token: int) -> None:
        """Send marker TOKEN (a lost one is the caller's to notice: see the class)."""
        frame = _TAP_MARKER.pack(b"\0" * 6, self._marker_src, TAP_MARKER_TYPE, _MARKER_MAGIC, token)
        try:
            self.marker_sock.send(frame.ljust(60, b"\0"))
        except OSError:
            pass

    @staticmethod
    def marker(frame) -> int | None:
        """The token of FRAME if it is one of our markers."""
        if len(frame) >= _TAP_MARKER.size and frame[12:14] == b"\x88\xb5" and frame[14:22] == _MARKER_MAGIC:
            return _TAP_MARKER.unpack_from(frame)[4]
        return None

    def queued(self) -> int:
        """Bytes of memory the socket holds (what counts against its buffer)."""
        return struct.unpack_from("=I", self.sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, 36))[0]

    def drops(self) -> int:
        """Frames the socket had no room for since the last call."""
        raw = self.sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8)
        return struct.unpack("=II", raw)[1]

    def close(self) -> None:
        for s in (self.sock, self.marker_sock):
            if s is not None:
                s.close()
        self.sock = self.marker_sock = None
        if self.name is not None:
            _run(["ip", "link", "del", self.name])     # the peer goes with it
            self.name = None


def flow_value(tr, *, end_seq: int | None, ack_watch: int | None, ifindex: int, mark: int = 0,
               fast: bool = True, tap: bool = False, pass_acks: bool = False, c2s: bool = False,
               win_limit: bool = False) -> bytes:
    """The map value for one direction with Translation TR (packet.Translation); C2S:
    the client's direction (the program counts zero windows per direction); WIN_LIMIT
    (with ACK_WATCH): no window offered past ACK_WATCH + engine.NEXT_MESSAGE_WINDOW."""
    flags = (F_FAST if fast else 0) | (F_TAP if tap else 0) | (F_END if end_seq is not None else 0) \
        | (F_PASS_ACKS if pass_acks else 0) | (F_C2S if c2s else 0) \
        | (F_LIMIT if win_limit and ack_watch is not None else 0) \
        | (F_WATCH if ack_watch is not None else 0) | (F_FLOOR if tr.tsecr_floor is not None else 0)
    m = 0xFFFFFFFF
    return FLOW.pack(tr.src, tr.dst, struct.pack("!H", tr.sport), struct.pack("!H", tr.dport),
                     tr.seq_delta & m, tr.ack_delta & m, tr.tsval_delta & m, tr.tsecr_delta & m,
                     (end_seq or 0) & m, (ack_watch or 0) & m, (tr.tsecr_floor or 0) & m,
                     ifindex, mark, tr.win_shift_in, tr.win_shift_out, flags, 0, 0)


_NO_PROGRESS = PROGRESS.pack(0, 0, 0, 0, 0)


def _ncpus() -> int:
    """Possible CPUs (per-CPU map values have one slot each)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
        n = 0
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            n = max(n, int(hi or lo) + 1)
        return n
    except OSError:
        return os.cpu_count() or 1


def _route_oif(ipr, dst: str) -> int:
    try:
        routes = ipr.route("get", dst=dst)
    except Exception:   # noqa: BLE001 - pyroute2 raises NetlinkError and friends
        return 0
    for r in routes:
        oif = r.get_attr("RTA_OIF")
        if oif:
            return int(oif)
    return 0


def cleanup(keep_prefs: set[int] = frozenset()) -> list[str]:
    """Remove the fast path tc filters of this namespace's devices and the clone tap
    devices, except those of priorities in KEEP_PREFS (running instances'); returns
    what was removed."""
    removed = []
    keep = {tap_device_name(p) for p in keep_prefs}
    for name in sorted(os.listdir("/sys/class/net")):
        if (name.startswith(TAP_DEV_PREFIX) and len(name) == len(TAP_DEV_PREFIX) + 4 and name not in keep
                and _run(["ip", "link", "del", name]).returncode == 0):
            removed.append(f"clone tap device {name}")
    if shutil.which("tc") is None:
        return removed
    for name, _ in ether_devices():
        r = _run(["tc", "filter", "show", "dev", name, "ingress"])
        if r.returncode:
            continue
        prefs = set()
        for line in r.stdout.splitlines():
            if "nfsplice_fast" in line and " pref " in line:
                pref = int(line.split(" pref ")[1].split()[0])
                if pref not in keep_prefs:
                    prefs.add(pref)
        for pref in sorted(prefs):
            _run(["tc", "filter", "del", "dev", name, "ingress", "pref", str(pref)])
            removed.append(f"tc filter {name} ingress pref {pref}")
    return removed
