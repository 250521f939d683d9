"""What every queue backend shares."""
from __future__ import annotations

from dataclasses import dataclass

# Netfilter verdicts (include/uapi/linux/netfilter.h).
DROP = 0      # NF_DROP
ACCEPT = 1    # NF_ACCEPT

# Hook numbers (enum nf_inet_hooks).
HOOK_PRE_ROUTING, HOOK_LOCAL_IN, HOOK_FORWARD, HOOK_LOCAL_OUT, HOOK_POST_ROUTING = range(5)


class QueueError(RuntimeError):
    """The queue could not be set up: says which kernel feature or permission is missing."""


@dataclass
class QueuedPacket:
    """One packet the kernel handed us; it must get exactly one verdict.

    `buf` is a writable view of the IP packet.  For the netlink backend it points into
    the receive buffer and is only valid until the next receive: code that keeps a
    packet (holding it during a hand-off) copies it.  `csum_partial` is true when the
    TCP checksum field is not a full checksum (NFQA_SKB_CSUMNOTREADY), `truncated` when
    the kernel copied less than the whole packet (NFQA_CAP_LEN)."""
    packet_id: int
    hook: int
    buf: memoryview
    csum_partial: bool = False
    gso: bool = False
    truncated: bool = False
    mark: int = 0
    source: object = None     # the backend it came from (set by the runner)
    handle: object = None
