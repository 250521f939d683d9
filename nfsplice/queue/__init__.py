"""Queue layer: the only code that talks to the kernel's NFQUEUE.

A backend yields `QueuedPacket`s and takes verdicts.  Two backends:

- `netlink` (default): nfnetlink_queue spoken directly over a netlink socket, with the
  GSO and fail-open flags and zero-copy views of the receive buffer.
- `netfilterqueue`: the netfilterqueue package (libnetfilter_queue); it cannot set the
  GSO flag, so the kernel segments every packet to the MTU first (see DESIGN.md).
"""
from .base import ACCEPT, DROP, QueuedPacket, QueueError  # noqa: F401


def open_backend(name: str, queue_num: int, **kw):
    if name == "netlink":
        from .netlink import NetlinkQueue
        return NetlinkQueue(queue_num, **kw)
    if name == "netfilterqueue":
        from .nfq import NFQBackend
        return NFQBackend(queue_num, **kw)
    raise QueueError(f"unknown queue backend {name!r} (choose netlink or netfilterqueue)")
