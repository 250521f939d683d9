"""nfsplice.cache.store: bodies in files, index in sqlite3, crash safety, eviction, followers."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nfsplice.cache import policy, store as store_mod
from nfsplice.cache.store import ABORTED, COMMITTED, FILLING, Store, StoreBusy
from nfsplice.proxy.http1 import parse_request_head, parse_response_head

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = "http://example.com/x"


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def body_of(entry) -> bytes:
    return os.pread(entry.fd, entry.size + 1, 0)


def put(store: Store, key: str, data: bytes, variant_key: str = "", meta=None) -> bool:
    w = store.begin(key, variant_key, meta or {}, expected_length=len(data))
    w.write(0, data)
    return w.commit(len(data), sha(data))


def files_under(d) -> set[str]:
    return {n for _, _, names in os.walk(d) for n in names}


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "cache"), max_bytes=1 << 20, fsync=False)
    yield s
    s.close()


# -- writing ---------------------------------------------------------------------------------------

def pieces_in(order: str, data: bytes, rnd: random.Random) -> list[tuple[int, bytes]]:
    size = 1000
    ps = [(o, data[o:o + size]) for o in range(0, len(data), size)]
    if order == "reverse":
        ps.reverse()
    elif order == "random":
        rnd.shuffle(ps)
    elif order == "overlapping":      # retransmissions: overlapping, repeated, out of order
        ps = [(o, data[o:o + rnd.randrange(1, 3000)]) for o in
              [rnd.randrange(0, len(data)) for _ in range(200)]] + ps
        rnd.shuffle(ps)
    return ps


@pytest.mark.parametrize("order", ["in-order", "reverse", "random", "overlapping"])
def test_pieces_in_any_order(store, order):
    rnd = random.Random(order)
    data = rnd.randbytes(50_000)
    w = store.begin(K, "", {"m": 1})
    assert w.state == FILLING
    for o, p in pieces_in(order, data, rnd):
        assert w.write(o, p)
    assert w.contiguous == len(data)
    assert w.commit(len(data), sha(data)), w.error
    assert (w.state, w.length, w.sha256) == (COMMITTED, len(data), sha(data))
    with store.lookup(K) as e:
        assert body_of(e) == data and e.size == len(data) and e.sha256 == sha(data)
        assert e.meta == {"m": 1} and e.key == K and e.variant_key == ""
    assert store.stats()["entries"] == 1 and store.total_bytes == len(data)
    assert os.listdir(store.tmp_dir) == []


@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 700)), max_size=40), st.randoms())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_digest_matches_file_whatever_the_pieces(store, extra, rnd):
    """Property: any mix of pieces that covers [0, n) commits with sha256 of exactly the bytes
    (the incremental digest never disagrees with the file)."""
    data = rnd.randbytes(3000)
    ps = [(o, data[o:o + n]) for o, n in extra] + [(o, data[o:o + 500]) for o in range(0, 3000, 500)]
    rnd.shuffle(ps)
    w = store.begin(K, "", {})
    for o, p in ps:
        w.write(o, p)
    assert w.commit(3000, sha(data)), w.error
    with store.lookup(K) as e:
        assert body_of(e) == data


def test_first_copy_wins(store):
    w = store.begin(K, "", {})
    w.write(0, b"AAAA")
    w.write(2, b"BBBB")
    assert w.commit(6, sha(b"AAAABB"))
    with store.lookup(K) as e:
        assert body_of(e) == b"AAAABB"


def test_incomplete_aborts(store):
    w = store.begin(K, "", {})
    w.write(0, b"x" * 10)
    w.write(20, b"y" * 10)
    assert not w.commit(30)
    assert w.state == ABORTED and w.error.startswith("incomplete: 10 of 30 bytes") and "1 hole" in w.error
    assert not w.write(10, b"z" * 10)              # ignored once aborted
    assert store.lookup(K) is None and os.listdir(store.tmp_dir) == []
    assert store.take_io_error() is None           # not an I/O error
    assert store.stats()["aborted"] == 1


def test_sha_mismatch_aborts(store):
    w = store.begin(K, "", {})
    w.write(0, b"hello")
    assert not w.commit(5, sha(b"hellO"))
    assert "sha256 mismatch" in w.error and store.lookup(K) is None


def test_expected_sha_is_case_insensitive_and_optional(store):
    w = store.begin(K, "", {})
    w.write(0, b"hello")
    assert w.commit(5, sha(b"hello").upper())
    w = store.begin("k2", "", {})
    w.write(0, b"hi")
    assert w.commit(2) and w.sha256 == sha(b"hi")


def test_length_from_begin_drops_bytes_past_it(store):
    w = store.begin(K, "", {}, expected_length=5)
    assert w.write(0, b"hello world")
    assert w.write(7, b"ignored")                 # entirely past the end: nothing to do
    assert w.commit()
    with store.lookup(K) as e:
        assert body_of(e) == b"hello"


def test_bytes_past_a_late_length_are_cut(store):
    w = store.begin(K, "", {})
    w.write(6, b"world")
    w.write(0, b"hello ")
    assert w.commit(5, sha(b"hello"))             # file truncated, digest recomputed
    with store.lookup(K) as e:
        assert body_of(e) == b"hello" and e.size == 5


def test_length_problems(store):
    w = store.begin(K, "", {})
    assert not w.commit() and w.error == "commit without a length"
    w = store.begin(K, "", {})
    assert not w.commit(-1) and w.error == "negative length -1"
    assert store.begin(K, "", {}, expected_length=-5).state == ABORTED
    w = store.begin(K, "", {}, expected_length=3)
    w.write(0, b"abc")
    assert not w.commit(4) and "begun with 3" in w.error
    w = store.begin(K, "", {}, expected_length=2 << 20)        # above max_bytes
    assert w.state == ABORTED and "max_bytes" in w.error and not w.write(0, b"x")
    w = store.begin(K, "", {})
    w.write(0, b"x" * ((1 << 20) + 1))
    assert not w.commit((1 << 20) + 1) and "max_bytes" in w.error


def test_empty_body(store):
    w = store.begin(K, "", {})
    assert w.commit(0, sha(b""))
    with store.lookup(K) as e:
        assert e.size == 0 and body_of(e) == b""


def test_negative_offset_and_abort(store):
    w = store.begin(K, "", {})
    assert not w.write(-1, b"x")
    w.abort("response truncated")
    w.abort("twice")
    assert w.error == "response truncated" and not w.commit(0)
    assert store.stats()["filling"] == 0


def test_meta_must_be_json(store):
    with pytest.raises(TypeError):
        store.begin(K, "", {"x": object()})


# -- index: replace, variants, purge, update ---------------------------------------------------------

def test_replace_same_variant(store):
    assert put(store, K, b"old")
    with store.lookup(K) as old:
        assert put(store, K, b"new!")
        assert body_of(old) == b"old"              # a reader keeps the body it opened
        assert not os.path.exists(old.path)
    assert [e.size for e in store.stat(K)] == [4]
    with store.lookup(K) as e:
        assert body_of(e) == b"new!"
    assert len(files_under(store.objects_dir)) == 1 and store.total_bytes == 4


def test_variants(store):
    resp = parse_response_head(b"HTTP/1.1 200 OK\r\nVary: Accept-Encoding\r\n\r\n", "GET")[0]
    gz = (("Accept-Encoding", "gzip"),)
    br = (("Accept-Encoding", "br"),)
    assert put(store, K, b"gzipped", policy.variant_key(policy.variant(resp.fields, gz)))
    assert put(store, K, b"brotli", policy.variant_key(policy.variant(resp.fields, br)))
    with store.lookup(K, (("Accept-Encoding", "GZIP"),)) as e:
        assert body_of(e) == b"gzipped"
    with store.lookup(K, br) as e:
        assert body_of(e) == b"brotli"
    assert store.lookup(K, ()) is None
    assert store.lookup(K, (("Accept-Encoding", "deflate"),)) is None
    assert len(store.stat(K)) == 2


def test_newest_matching_variant_wins(store):
    assert put(store, K, b"first", '[["accept","a"]]')
    assert put(store, K, b"second", '[["cookie",null]]')
    with store.lookup(K, (("Accept", "a"),)) as e:
        assert body_of(e) == b"second"              # both match: the most recent (RFC 9111 4.1)
    with store.lookup(K, (("Accept", "a"), ("Cookie", "c"))) as e:
        assert body_of(e) == b"first"


def test_purge_and_invalidate(store):
    assert put(store, K, b"a", "v1") and put(store, K, b"b", "v2") and put(store, "http://example.com/y", b"c")
    assert store.invalidate("HTTP://Example.COM:80/x") == 2
    assert store.lookup(K, ()) is None and store.stat(K) == []
    assert store.purge("http://example.com/y") == 1 and store.purge("nothing") == 0
    assert store.total_bytes == 0 and files_under(store.objects_dir) == set()


def test_purge_while_filling_prevents_commit(store):
    w = store.begin(K, "", {})
    w.write(0, b"abc")
    assert store.follow(K) is w
    store.purge(K)
    assert store.follow(K) is None
    assert not w.commit(3) and w.error == "invalidated while filling"
    assert store.lookup(K) is None and os.listdir(store.tmp_dir) == []


def test_update_headers(store):
    assert put(store, K, b"body", meta={"v": 1})
    e = store.lookup(K)
    assert store.update_headers(e, {"v": 2}) and e.meta == {"v": 2}
    with store.lookup(K) as again:
        assert again.meta == {"v": 2} and body_of(again) == b"body"
    assert put(store, K, b"other", meta={"v": 3})
    assert not store.update_headers(e, {"v": 4})    # replaced meanwhile
    e.close()
    with store.lookup(K) as now:
        assert now.meta == {"v": 3}


def test_lookup_forgets_a_row_whose_file_vanished(store):
    assert put(store, K, b"abc")
    os.unlink(store.stat(K)[0].path)
    assert store.lookup(K) is None
    assert store.stat(K) == [] and store.total_bytes == 0
    assert "unreadable" in store.take_io_error()


def test_ls_and_stat(store):
    for k in ("http://b/", "http://a/"):
        assert put(store, k, k.encode())
    assert [e.key for e in store.ls()] == ["http://a/", "http://b/"]
    assert all(e.fd is None for e in store.ls())
    assert store.stat("http://a/")[0].size == len("http://a/")


def test_busy(tmp_path, store):
    with pytest.raises(StoreBusy):
        Store(store.path, 1 << 20)
    store.close()
    Store(store.path, 1 << 20).close()


def test_bad_max_bytes(tmp_path):
    with pytest.raises(ValueError):
        Store(str(tmp_path / "c"), 0)


def test_close_aborts_fillers(tmp_path):
    s = Store(str(tmp_path / "c"), 1 << 20, fsync=False)
    w = s.begin(K, "", {})
    w.write(0, b"abc")
    s.close()
    assert w.state == ABORTED and w.error == "store closed"
    assert os.listdir(s.tmp_dir) == []


# -- eviction (LRU) ---------------------------------------------------------------------------------

def test_eviction_is_lru_and_keeps_the_bound(tmp_path):
    s = Store(str(tmp_path / "c"), max_bytes=1000, fsync=False)
    for i in range(3):
        assert put(s, f"k{i}", bytes([i]) * 300)
    s.lookup("k0").close()                   # k0 is now the most recently used
    assert put(s, "k3", b"3" * 300)          # 1200 > 1000: evict the LRU, k1
    assert sorted(e.key for e in s.ls()) == ["k0", "k2", "k3"]
    assert s.lookup("k1") is None
    s.lookup("k2", touch=False).close()      # no touch: k2 stays the oldest
    assert put(s, "k4", b"4" * 300)
    assert sorted(e.key for e in s.ls()) == ["k0", "k3", "k4"]
    assert s.stats()["evicted"] == 2
    assert s.evict(300) == 600 and [e.key for e in s.ls()] == ["k4"]
    s.close()


def test_eviction_bound_under_random_load(tmp_path):
    rnd = random.Random(4)
    s = Store(str(tmp_path / "c"), max_bytes=20_000, fsync=False)
    readers = []
    for i in range(300):
        key = f"k{rnd.randrange(40)}"
        data = rnd.randbytes(rnd.randrange(0, 6000))
        assert put(s, key, data)
        if rnd.random() < 0.3:
            e = s.lookup(f"k{rnd.randrange(40)}")
            if e is not None:
                readers.append((e, e.sha256))
        entries = s.ls()
        assert s.total_bytes == sum(e.size for e in entries) <= 20_000
        assert {os.path.basename(e.path) for e in entries} == files_under(s.objects_dir)
    for e, digest in readers:                  # evicted or replaced: still readable in full
        assert sha(body_of(e)) == digest
        e.close()
    s.close()


def test_lowering_max_bytes_evicts_on_open(tmp_path):
    d = str(tmp_path / "c")
    with Store(d, 10_000, fsync=False) as s:
        for i in range(5):
            put(s, f"k{i}", b"x" * 1000)
    with Store(d, 2500, fsync=False) as s:
        assert s.total_bytes <= 2500 and [e.key for e in s.ls()] == ["k3", "k4"]


# -- restart and recovery ------------------------------------------------------------------------------

def test_restart_keeps_entries(tmp_path):
    d = str(tmp_path / "c")
    with Store(d, 1 << 20) as s:
        assert put(s, K, b"persist", meta={"a": [1, 2]})
        assert put(s, "k2", b"two")
        s.lookup(K).close()
    with Store(d, 1 << 20) as s:
        assert s.recovered == {"temp_files": 0, "bad_rows": 0, "orphan_files": 0}
        with s.lookup(K) as e:
            assert body_of(e) == b"persist" and e.meta == {"a": [1, 2]}
        assert s.total_bytes == 10
        assert put(s, "k3", b"3")
        lrus = {e.key: e.lru for e in s.ls()}
        assert lrus["k2"] < lrus[K] < lrus["k3"]        # the LRU counter continues


def test_recovery_cleans_up(tmp_path):
    d = str(tmp_path / "c")
    with Store(d, 1 << 20, fsync=False) as s:
        for k in ("a", "b", "c", "d"):
            put(s, k, k.encode() * 100)
        paths = {e.key: e.path for e in s.ls()}
        w = s.begin("e", "", {})
        w.write(0, b"partial")                      # a temp file, as a crash leaves it
        tmp_left = w.path
    os.close(os.open(tmp_left, os.O_CREAT | os.O_WRONLY))   # close() aborted it; recreate
    os.unlink(paths["a"])                           # row without a file
    with open(paths["b"], "ab") as f:               # row whose file has another size
        f.write(b"!")
    with open(paths["c"], "r+b") as f:              # same size, other bytes
        f.write(b"X")
    stray = os.path.join(d, "objects", "ab", "ab" + "0" * 30)
    open(stray, "wb").close()                       # file without a row
    with Store(d, 1 << 20, fsync=False) as s:
        assert s.recovered == {"temp_files": 1, "bad_rows": 2, "orphan_files": 2}   # + b's file
        assert sorted(e.key for e in s.ls()) == ["c", "d"]
    with Store(d, 1 << 20, fsync=False, verify=True) as s:
        assert s.recovered["bad_rows"] == 1          # c: only re-hashing sees it
        assert [e.key for e in s.ls()] == ["d"]
        assert files_under(s.objects_dir) == {os.path.basename(e.path) for e in s.ls()}


def test_unknown_schema_version(tmp_path):
    d = str(tmp_path / "c")
    Store(d, 1000).close()
    db = sqlite3.connect(os.path.join(d, "index.sqlite"))
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        Store(d, 1000)
    Store(d + "-other", 1000).close()       # and the lock was released: reopening works
    db = sqlite3.connect(os.path.join(d, "index.sqlite"))
    db.execute("PRAGMA user_version=1")
    db.close()
    Store(d, 1000).close()


# -- growing objects (collapsed forwarding) -----------------------------------------------------------

def test_follow_a_growing_object(store):
    data = os.urandom(300_000)
    chunk = 10_000
    pieces = [(o, data[o:o + chunk]) for o in range(0, len(data), chunk)]
    w = store.begin(K, "", {}, expected_length=len(data))
    w.write(*pieces[0])
    w.write(*pieces[2])                               # a hole at [10000, 20000)
    assert w.contiguous == chunk and w.wait(chunk + 1, timeout=0.01) == chunk
    f = store.follow(K, ())
    assert f is w
    fd = f.open_body()

    def produce():
        for o, p in pieces[3:15] + pieces[1:2] + pieces[15:]:
            time.sleep(0.001)
            w.write(o, p)
        w.commit()

    t = threading.Thread(target=produce)
    t.start()
    got = bytearray()
    try:
        while len(got) < len(data):
            n = f.wait(len(got) + 1, timeout=10)
            if n > len(got):
                got += os.pread(fd, n - len(got), len(got))
            elif f.state != FILLING:
                break
    finally:
        t.join()
    assert f.wait(len(data), timeout=10) == len(data) and f.state == COMMITTED
    assert bytes(got) == data
    assert os.pread(fd, 10, 0) == data[:10]           # same inode after the rename
    os.close(fd)
    assert store.follow(K) is None
    with store.lookup(K) as e:
        assert body_of(e) == data
    fd = w.open_body()                                # committed: opens the installed file
    assert os.pread(fd, 5, 0) == data[:5]
    os.close(fd)


def test_follower_of_an_aborted_writer(store):
    w = store.begin(K, "", {})
    w.write(0, b"abc")
    fd = w.open_body()
    done = []
    t = threading.Thread(target=lambda: done.append(w.wait(100, timeout=10)))
    t.start()
    w.abort("origin reset")
    t.join()
    assert done == [3] and w.state == ABORTED
    assert os.pread(fd, 10, 0) == b"abc"              # what it read stays right
    os.close(fd)
    assert w.open_body() is None


def test_follow_respects_variants(store):
    w = store.begin(K, '[["accept-encoding","gzip"]]', {})
    assert store.follow(K, (("Accept-Encoding", "gzip"),)) is w
    assert store.follow(K, ()) is None
    w.abort()


# -- I/O errors: swallowed, recorded once -----------------------------------------------------------

def test_write_error_is_swallowed_and_recorded(store, monkeypatch):
    def enospc(*a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    w = store.begin(K, "", {})
    assert w.write(0, b"ok")
    monkeypatch.setattr(store_mod.os, "pwrite", enospc)
    assert not w.write(2, b"fails")
    monkeypatch.undo()
    assert w.state == ABORTED and "No space left" in w.error
    assert not w.write(2, b"later") and not w.commit(7)
    msg = store.take_io_error()
    assert "No space left" in msg and K in msg and store.take_io_error() is None
    assert store.io_errors == 1 and os.listdir(store.tmp_dir) == []
    assert put(store, K, b"fine afterwards")


def test_short_write_is_finished(store, monkeypatch):
    real = os.pwrite
    monkeypatch.setattr(store_mod.os, "pwrite", lambda fd, data, off: real(fd, data[:3], off))
    w = store.begin(K, "", {})
    assert w.write(0, b"0123456789")
    monkeypatch.undo()
    assert w.commit(10, sha(b"0123456789"))


def test_commit_errors_are_swallowed(store, monkeypatch):
    def eio(*a):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    w = store.begin(K, "", {})
    w.write(0, b"abc")
    monkeypatch.setattr(store_mod.os, "rename", eio)
    assert not w.commit(3)
    monkeypatch.undo()
    assert "Input/output error" in w.error and store.io_errors == 1

    def full(*a):
        raise sqlite3.OperationalError("database or disk is full")
    w = store.begin(K, "", {})
    w.write(0, b"abc")
    monkeypatch.setattr(store, "_insert", full)
    assert not w.commit(3)
    monkeypatch.undo()
    assert "database or disk is full" in w.error and store.io_errors == 2
    assert store.lookup(K) is None
    assert files_under(store.objects_dir) == set() and os.listdir(store.tmp_dir) == []
    assert "Input/output error" in store.take_io_error()   # the first one, once


@pytest.mark.root
def test_disk_full_on_tmpfs(tmp_path):
    """A real ENOSPC: a 1 MiB tmpfs, a 2 MiB body."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        d = str(mnt / "cache")
        with Store(d, max_bytes=100 << 20) as s:
            big = os.urandom(2 << 20)
            w = s.begin("http://a/big", "", {}, expected_length=len(big))
            results = [w.write(o, big[o:o + 65536]) for o in range(0, len(big), 65536)]
            assert results[0] and not results[-1]
            assert w.state == ABORTED and "No space left" in w.error
            assert not w.commit()
            assert "No space left" in s.take_io_error() and s.take_io_error() is None
            assert s.io_errors == 1
            assert os.listdir(s.tmp_dir) == []             # the partial body is gone
            small = os.urandom(100_000)                    # the space is back
            assert put(s, "http://a/small", small)
            assert s.lookup("http://a/big") is None
        with Store(d, max_bytes=100 << 20) as s:
            with s.lookup("http://a/small") as e:
                assert body_of(e) == small
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# -- SIGKILL at random moments ------------------------------------------------------------------

def seeded_body(seed: int) -> bytes:
    return random.Random(seed).randbytes(seed % 150_001)


CHILD = r"""
import hashlib, random, sys
from nfsplice.cache.store import Store
store = Store(sys.argv[1], max_bytes=int(sys.argv[3]))
rnd = random.Random(int(sys.argv[2]))
print("open", flush=True)
while True:
    seed = rnd.getrandbits(40)
    data = random.Random(seed).randbytes(seed % 150_001)
    key = "http://k/%d" % (seed % 12)
    w = store.begin(key, "", {"seed": seed, "length": len(data)})
    pieces = [(o, data[o:o + 4096]) for o in range(0, len(data), 4096)]
    rnd.shuffle(pieces)
    for o, p in pieces + pieces[:3]:
        w.write(o, p)
    ok = w.commit(len(data), hashlib.sha256(data).hexdigest())
    if rnd.random() < 0.1:
        store.purge("http://k/%d" % rnd.randrange(12))
    e = store.lookup("http://k/%d" % rnd.randrange(12))
    if e is not None:
        store.update_headers(e, dict(e.meta, touched=True))
        e.close()
    print("commit" if ok else "fail " + str(w.error), flush=True)
"""


def check_index_as_left(d: str) -> int:
    """Read what the killed process left, before any recovery: every row's body must be
    there, complete and right.  Returns the number of rows."""
    db = sqlite3.connect(os.path.join(d, "index.sqlite"))
    try:
        rows = db.execute("SELECT file, size, sha256, meta FROM entries").fetchall()
    finally:
        db.close()
    for name, size, digest, meta in rows:
        with open(os.path.join(d, "objects", name[:2], name), "rb") as f:
            data = f.read()
        m = json.loads(meta)
        assert len(data) == size == m["length"], name
        assert sha(data) == digest
        assert data == seeded_body(m["seed"])
    return len(rows)


def test_sigkill_at_random_moments(tmp_path):
    d = str(tmp_path / "cache")
    max_bytes = 1_000_000
    rnd = random.Random(20261126)
    env = dict(os.environ, PYTHONPATH=REPO)
    commits = rows_seen = 0
    for round_ in range(8):
        p = subprocess.Popen([sys.executable, "-c", CHILD, d, str(round_), str(max_bytes)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
        first = p.stdout.readline()
        assert first == b"open\n", p.stderr.read().decode()
        time.sleep(rnd.uniform(0.02, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        out = p.stdout.read().decode().split("\n")
        p.stdout.close()
        p.stderr.close()
        assert p.returncode == -signal.SIGKILL
        assert not [line for line in out if line.startswith("fail")]
        commits += sum(line == "commit" for line in out)
        rows_seen += check_index_as_left(d)
        with Store(d, max_bytes) as s:                  # recovery: nothing was wrong
            assert s.recovered["bad_rows"] == 0
            entries = s.ls()
            for e in entries:
                with open(e.path, "rb") as f:
                    assert sha(f.read()) == e.sha256
            assert os.listdir(s.tmp_dir) == []
            assert files_under(s.objects_dir) == {os.path.basename(e.path) for e in entries}
            assert s.total_bytes <= max_bytes
    assert commits >= 8 and rows_seen > 0, (commits, rows_seen)


# -- with the policy ------------------------------------------------------------------------------

def test_store_and_policy_together(store):
    t0 = 1_700_000_000
    req = parse_request_head(b"GET /x HTTP/1.1\r\nHost: example.com\r\nAccept-Encoding: gzip\r\n\r\n")[0]
    resp = parse_response_head(
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nVary: Accept-Encoding\r\n"
        b"Content-Length: 5\r\nETag: \"1\"\r\n\r\n", "GET")[0]
    assert policy.storable(req, resp)
    sr = policy.stored_response(req, resp, t0, t0)
    key = policy.cache_key(req)
    w = store.begin(key, sr.variant_key, sr.to_meta(), expected_length=5)
    w.write(0, b"hello")
    assert w.commit()
    head = parse_request_head(b"HEAD /x HTTP/1.1\r\nHost: EXAMPLE.com\r\nAccept-Encoding: gzip\r\n\r\n")[0]
    with store.lookup(policy.cache_key(head), head.fields) as e:
        got = policy.StoredResponse.from_meta(e.meta)
        assert got == sr
        assert policy.reuse(got, head, t0 + 10).action == policy.HIT
        assert dict(policy.hit_fields(got, t0 + 10, e.size))["Content-Length"] == "5"
        r304 = parse_response_head(b"HTTP/1.1 304 Not Modified\r\nETag: \"1\"\r\n"
                                   b"Cache-Control: max-age=600\r\n\r\n", "GET")[0]
        new, why = policy.freshen(got, r304, t0 + 100, t0 + 100)
        assert store.update_headers(e, new.to_meta())
    with store.lookup(key, (("Accept-Encoding", "gzip"),)) as e:
        assert policy.StoredResponse.from_meta(e.meta).values("Cache-Control") == ["max-age=600"]
        assert body_of(e) == b"hello"
    assert store.lookup(key, (("Accept-Encoding", "br"),)) is None
