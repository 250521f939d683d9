"""`nfsplice cache ls | stat URL | purge URL --cache-dir DIR`: the store from outside.

A running `nfsplice http` holds the store's flock (one writer per directory), so:

  * ls and stat read the sqlite index read-only; its WAL journal lets a reader in
    beside the writer, so both work while the proxy runs and see what it committed;
  * purge opens the store itself when no proxy has it; when one does, it asks that
    proxy: a PURGE request from 127.0.0.1 to the first listen address the proxy wrote
    into DIR/proxy.json (the default --purge-from allows exactly that).  Removing rows
    behind the running proxy's back would leave its size accounting and the bodies it
    is still filling wrong.

No root needed unless the directory is root's.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import urllib.parse

from ..cli import UsageError
from . import policy
from .layer import OWNER_FILE
from .store import Store, StoreBusy


def _index(path: str) -> sqlite3.Connection:
    db = os.path.join(path, "index.sqlite")
    if not os.path.exists(db):
        raise UsageError(f"--cache-dir {path}: no cache index there ({db} is missing)")
    try:
        return sqlite3.connect(f"file:{urllib.parse.quote(db)}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise UsageError(f"--cache-dir {path}: cannot read {db}: {e}") from None


def _rows(path: str, key: str | None = None) -> list[tuple]:
    db = _index(path)
    try:
        q = "SELECT key, variant_key, file, size, sha256, meta, stored_at, lru FROM entries"
        if key is None:
            return db.execute(q + " ORDER BY key, variant_key").fetchall()
        return db.execute(q + " WHERE key=? ORDER BY id DESC", (key,)).fetchall()
    except sqlite3.Error as e:
        raise UsageError(f"--cache-dir {path}: cannot read the index: {e}") from None
    finally:
        db.close()


def _key(url: str) -> str:
    key = policy.normalize_uri(url)
    if key is None:
        raise UsageError(f"{url!r} is not an absolute http:// URL with a host")
    return key


def _freshness(stored: policy.StoredResponse, now: float) -> str:
    age = policy.current_age(stored, now)
    lifetime, source = policy.freshness_lifetime(stored)
    left = lifetime - age
    state = "fresh" if left > 0 else "stale"
    return f"{state} (age {int(age)} s, lifetime {lifetime} s from {source})"


def ls(path: str) -> list[str]:
    now = time.time()
    out = []
    total = 0
    for key, vk, _file, size, _sha, meta, _at, _lru in _rows(path):
        stored = policy.StoredResponse.from_meta(json.loads(meta))
        total += size
        fresh = "fresh" if policy.current_age(stored, now) < policy.freshness_lifetime(stored)[0] else "stale"
        out.append(f"{size:>12} {stored.status} {fresh:5} {key}" + (f" {vk}" if vk else ""))
    out.append(f"{len(out)} stored response(s), {total} bytes")
    return out


def stat(path: str, url: str) -> list[str]:
    key = _key(url)
    rows = _rows(path, key)
    if not rows:
        raise UsageError(f"{key} is not in the cache {path}")
    now = time.time()
    out = []
    for _key_, vk, name, size, digest, meta, stored_at, lru in rows:
        stored = policy.StoredResponse.from_meta(json.loads(meta))
        out += [f"key:       {key}",
                f"variant:   {vk or '(no Vary)'}",
                f"status:    {stored.status} {stored.reason}",
                f"size:      {size}",
                f"sha256:    {digest}",
                f"file:      {os.path.join(path, 'objects', name[:2], name)}",
                f"stored:    {policy.format_http_date(stored_at)}",
                f"freshness: {_freshness(stored, now)}",
                f"lru:       {lru}",
                "fields:"]
        out += [f"  {n}: {v}" for n, v in stored.fields]
        out.append("")
    return out


def purge(path: str, url: str) -> str:
    key = _key(url)
    try:
        store = Store(path, 1 << 62, fsync=True)      # (no size bound: evict nothing)
    except StoreBusy:
        return _purge_through_proxy(path, key)
    except (OSError, sqlite3.Error, RuntimeError) as e:
        raise UsageError(f"--cache-dir {path}: cannot open the cache: {e}") from None
    with store:
        n = store.purge(key)
    return f"purged {key}: {n} stored response(s)" if n else f"{key} is not in the cache"


def _purge_through_proxy(path: str, key: str) -> str:
    try:
        with open(os.path.join(path, OWNER_FILE)) as f:
            owner = json.load(f)
        addr, port = owner["listen"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise UsageError(f"--cache-dir {path}: another process holds the cache but left no usable "
                         f"{OWNER_FILE}; purge through it with an HTTP PURGE request") from None
    parts = urllib.parse.urlsplit(key)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    req = f"PURGE {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode("latin-1")
    try:
        with socket.socket() as s:
            s.settimeout(10)
            s.bind(("127.0.0.1", 0))            # what --purge-from allows by default
            s.connect((addr, port))
            s.sendall(req)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError as e:
        raise UsageError(f"PURGE to the running proxy at {addr}:{port} (pid {owner.get('pid')}) failed: "
                         f"{e.strerror or e}") from None
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    text = body.decode("utf-8", "replace").strip()
    if " 200 " not in status + " " and " 404 " not in status + " ":
        raise UsageError(f"the running proxy at {addr}:{port} answered {status}: {text}")
    return f"{text} (through the running proxy at {addr}:{port})"


def cmd_cache(args) -> int:
    path = os.path.abspath(args.cache_dir)
    if args.action == "ls":
        lines = ls(path)
    elif args.action == "stat":
        lines = stat(path, args.url)
    else:
        lines = [purge(path, args.url)]
    for line in lines:
        print(line)
    return 0
