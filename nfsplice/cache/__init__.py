"""HTTP cache for the proxy (issue 4): RFC 9111 rules and the body store.

`policy` decides (pure functions over `proxy.http1` heads, no I/O): what may be
stored, how fresh it is, whether a stored response may answer a request, how to
validate it and what head to send.  `store` keeps bodies in files and their metadata
in sqlite3, fills them from out-of-order pieces (TCP Tap), survives a crash at any
moment, evicts least recently used entries and lets readers follow a body still being
written.
"""
from .policy import CacheConfig, StoredResponse
from .store import Entry, Store, StoreBusy, Writer

__all__ = ["CacheConfig", "StoredResponse", "Entry", "Store", "StoreBusy", "Writer"]
