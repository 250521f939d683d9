"""`nfsplice http --cache-dir` in the lab: the cache filled from copied bodies and from the
engine's tap, hits served from the store, RFC 9111 semantics end to end, collapsed
forwarding, and what a crash, a full disk and a size bound do to the store.

The origin is the scripted one (netns_lab/origins.py) with cache headers from the query
(?cc=, etag=, lm=, vary=, ...); every test uses its own URLs (a `t=` parameter), so the
shared proxy's cache never mixes them up.  Bodies are checked by sha256 against what
the origin sends; `origin_hits` counts what reached the origin.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass

import pytest

from netns_lab.origins import ScriptedOrigin, expected_sha256, raw_exchange, stream_bytes
from netns_lab.topology import Lab
from nfsplice import fastpath
from nfsplice.cache.store import Store
from tests.splicer import REPO, raw_rules
from tests.splicer import instance_stats as stats
from tests.test_http_proxy import HTTPProxyProc

pytestmark = pytest.mark.root

PROXY = "198.18.1.1"
MAIN, SMALL = 8080, 8090          # the shared caching proxy; one with a 1 MiB cache
TAGGED = f"{PROXY}:{MAIN}"


@dataclass
class Resp:
    rc: int
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    first_byte: float
    total: float
    stderr: str

    def get(self, name: str) -> str | None:
        vals = [v for n, v in self.headers if n.lower() == name.lower()]
        return vals[-1] if vals else None

    @property
    def cache_status(self) -> str:
        return self.get("cache-status") or ""


def fetch(lab, port: int, path: str, *headers: str, method: str | None = None, data: str | None = None,
          timeout: float = 60) -> Resp:
    """One request with curl from the client namespace."""
    d = tempfile.mkdtemp(prefix="chx-curl-")
    hfile, bfile = os.path.join(d, "h"), os.path.join(d, "b")
    argv = ["curl", "-sS", "--max-time", str(int(timeout)), "-D", hfile, "-o", bfile,
            "-w", "%{http_code} %{time_starttransfer} %{time_total}"]
    if method == "HEAD":
        argv.append("-I")
    elif method:
        argv += ["-X", method]
    if data is not None:
        argv += ["--data-binary", data]
    for h in headers:
        argv += ["-H", h]
    argv.append(f"http://{PROXY}:{port}{path}")
    p = lab.run(lab.client, *argv, check=False, timeout=timeout + 10)
    r = _resp(p.returncode, p.stdout.decode(), hfile, bfile, p.stderr.decode())
    if method == "HEAD":           # curl -I writes the head to the output too: what follows it
        with open(hfile, "rb") as f:
            r.body = r.body[len(f.read()):]
    shutil.rmtree(d, ignore_errors=True)
    return r


def _resp(rc: int, w: str, hfile: str, bfile: str, stderr: str) -> Resp:
    code, first, total = (w.split() + ["0", "0", "0"])[:3]
    try:
        with open(hfile, "rb") as f:
            blocks = [b for b in f.read().decode("latin-1").split("\r\n\r\n") if b.strip()]
    except FileNotFoundError:
        blocks = []
    headers = []
    for line in (blocks[-1].split("\r\n")[1:] if blocks else []):
        n, _, v = line.partition(":")
        headers.append((n, v.strip()))
    try:
        with open(bfile, "rb") as f:
            body = f.read()
    except FileNotFoundError:
        body = b""
    return Resp(rc, int(code), headers, body, float(first), float(total), stderr)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def q(path: str, t: str, **params) -> str:
    """PATH with the cache parameters and a test tag (its own cache key)."""
    return path + "?" + urllib.parse.urlencode({**params, "t": t})


def origin_hits(so, path: str, method: str = "GET") -> list[dict]:
    return [r for r in so.requests() if r["target"] == path and r["method"] == method]


def cache_cli(lab, *args: str) -> subprocess.CompletedProcess:
    return lab.run(lab.proxy, sys.executable, "-m", "nfsplice", "cache", *args, cwd=REPO, check=False)


class Proc(HTTPProxyProc):
    """A caching proxy; its cache directory survives restarts of the process."""

    def __init__(self, lab, so, port: int, cache_dir: str, *args: str, instance: str):
        self.cache_dir = cache_dir
        super().__init__(lab, port, "--upstream", f"http://{so.addr}:{so.port}", "--cache-dir", cache_dir,
                         *args, instance=instance)

    def nth_line(self, needle: str, n: int, timeout: float = 5.0) -> str:
        """The Nth access-log line containing NEEDLE (the proxy may log a request a
        moment after the client has its response)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.access_lines() if needle in line]
            if len(lines) >= n or time.monotonic() > deadline:
                assert len(lines) >= n, f"{len(lines)} access-log lines with {needle!r}, not {n}"
                return lines[n - 1]
            time.sleep(0.05)


@pytest.fixture(scope="module")
def env():
    with Lab("chx") as lab, ScriptedOrigin(lab) as so:
        main = Proc(lab, so, MAIN, tempfile.mkdtemp(prefix="chx-cache-"), "--purge-from", "127.0.0.1/32,198.18.1.0/24",
                    "--queue", "0", "--ports", "61000-61499", instance="chx-main")
        small = Proc(lab, so, SMALL, tempfile.mkdtemp(prefix="chx-small-"), "--cache-size", "1MiB",
                     "--queue", "2", "--ports", "61500-61999", instance="chx-small")
        try:
            yield lab, so, {MAIN: main, SMALL: small}
        finally:
            codes = {p.instance: p.stop() for p in (main, small)}
            for p in (main, small):
                shutil.rmtree(p.cache_dir, ignore_errors=True)
            assert codes == {"chx-main": 0, "chx-small": 0}, (codes, main.text(), small.text())
            assert "NFSPLICE" not in raw_rules(lab)


# -- hits after misses: copied and spliced fills -----------------------------------------------

@pytest.mark.parametrize("path,mode", [("/len/5000", "copied"), ("/chunked/200000/4096", "copied"),
                                       ("/len/16777216", "spliced"), ("/close/300000", "spliced")])
def test_hit_after_miss_byte_exact(env, path, mode):
    """The first request fills the cache (from the proxy's buffer when the body is
    copied, from the engine's tap when it is spliced: 16 MiB, more than the socket
    buffers hold, so the hand-off cannot find all of it drained already); the second is
    answered from the store with the same bytes, and the origin saw one request."""
    lab, so, procs = env
    url = q(path, f"fill-{mode}", cc="max-age=300")
    first = fetch(lab, MAIN, url)
    assert first.rc == 0 and first.status == 200, first.stderr
    assert sha(first.body) == expected_sha256(path)
    assert first.cache_status == "nfsplice; fwd=miss; stored", first.headers
    line = procs[MAIN].nth_line(f" GET {url} ", 1)
    assert f" {mode} " in line and " cache=miss " in line, line
    second = fetch(lab, MAIN, url)
    assert second.rc == 0 and second.status == 200 and sha(second.body) == expected_sha256(path)
    assert second.cache_status.startswith("nfsplice; hit"), second.headers
    assert second.get("content-length") == str(len(second.body))
    assert second.get("transfer-encoding") is None            # stored de-chunked
    assert " cache=hit " in procs[MAIN].nth_line(f" GET {url} ", 2)
    assert len(origin_hits(so, url)) == 1


def test_tap_equals_forward_with_loss(env):
    """1 % loss everywhere, MSS-sized segments: the engine forwards retransmissions and
    out-of-order segments, the tap stores each byte once, and the stored object is
    exactly what the origin sent (the hit's sha256)."""
    lab, so, procs = env
    with lab.lossy(1) as dropped:
        url = q("/len/4194304", "loss", cc="max-age=300")
        first = fetch(lab, MAIN, url)
        assert first.rc == 0 and sha(first.body) == expected_sha256("/len/4194304"), first.stderr
        assert " spliced " in procs[MAIN].nth_line(f" GET {url} ", 1)
        drops = dropped()
    assert drops > 0, "the loss rule dropped nothing"
    second = fetch(lab, MAIN, url)
    assert second.cache_status.startswith("nfsplice; hit"), (second.headers, procs[MAIN].text())
    assert sha(second.body) == expected_sha256("/len/4194304")
    assert len(origin_hits(so, url)) == 1


@pytest.mark.parametrize("path", ["/truncate/1048576/300000", "/truncate/20000/5000", "/reset/1048576/200000"])
def test_truncated_body_never_stored(env, path):
    """An origin that ends the body early: the client sees a truncated response, nothing
    is stored, and the next request goes to the origin again."""
    lab, so, procs = env
    before = stats("chx-main", time.time())
    url = q(path, "truncated", cc="max-age=300")
    for i in range(2):
        r = fetch(lab, MAIN, url)
        assert r.rc != 0 and len(r.body) < int(path.split("/")[2]), "a truncated body looked complete"
        assert " cache=miss " in procs[MAIN].nth_line(f" GET {url} ", i + 1)
    assert len(origin_hits(so, url)) == 2
    time.sleep(2.5)                       # linger: the engine closes the tap of a spliced one
    after = stats("chx-main", time.time())
    assert after.get("cache.dropped_incomplete", 0) - before.get("cache.dropped_incomplete", 0) == 2
    key = f"http://{TAGGED}{url}"
    assert key not in cache_cli(lab, "ls", "--cache-dir", procs[MAIN].cache_dir).stdout.decode()


# -- collapsed forwarding ---------------------------------------------------------------------

def _concurrent(lab, port: int, path: str, n: int) -> list[Resp]:
    """N curl processes for PATH started together in the client namespace."""
    d = tempfile.mkdtemp(prefix="chx-many-")
    procs = []
    for i in range(n):
        h, b = os.path.join(d, f"h{i}"), os.path.join(d, f"b{i}")
        argv = ["curl", "-sS", "--max-time", "60", "-D", h, "-o", b, "-w",
                "%{http_code} %{time_starttransfer} %{time_total}", f"http://{PROXY}:{port}{path}"]
        procs.append((lab.popen(lab.client, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE), h, b))
    out = []
    for p, h, b in procs:
        so_, se = p.communicate(timeout=90)
        out.append(_resp(p.returncode, so_.decode(), h, b, se.decode()))
    shutil.rmtree(d, ignore_errors=True)
    return out


def test_collapsed_forwarding_one_origin_fetch(env):
    """20 clients ask for one cold 4 MiB object at once (the origin sends 1 MiB, waits
    2 s, sends the rest): one origin request; the others follow the object as it fills
    (a follower has most of the first MiB long before the origin sends the rest), all
    byte-exact."""
    lab, so, procs = env
    path = "/stall/4194304/1048576/2"
    url = q(path, "collapse", cc="max-age=300")
    box = {}
    late = threading.Thread(target=lambda: box.update(r=_follower(lab, url)))
    timer = threading.Timer(0.3, late.start)          # surely after the leader
    timer.start()
    got = _concurrent(lab, MAIN, url, 19)
    timer.join()
    late.join(60)
    want = expected_sha256(path)
    assert all(r.rc == 0 and r.status == 200 and sha(r.body) == want for r in got), \
        [(r.rc, r.status, len(r.body), r.stderr) for r in got]
    assert len(origin_hits(so, url)) == 1
    statuses = sorted(r.cache_status for r in got)
    assert statuses.count("nfsplice; fwd=miss; stored") == 1, statuses
    assert statuses.count("nfsplice; fwd=miss; collapsed") >= 15, statuses
    # Served as it fills: 700,000 body bytes reached the late follower before the origin
    # sent its last 3 MiB (2 s after the first).
    raw = box["r"]
    head = raw.response()
    assert head.get("cache-status") == "nfsplice; fwd=miss; collapsed", head.headers
    assert sha(raw.data[head.head_len:]) == want
    assert raw.marks[1][0] < 1.6, raw.marks


def _follower(lab, url: str):
    req = f"GET {url} HTTP/1.1\r\nHost: {TAGGED}\r\nConnection: close\r\n\r\n".encode()
    return raw_exchange(lab, [req, ("recv", 700000)], addr=PROXY, port=MAIN, idle=10)


def test_collapsed_followers_of_a_failed_fill_are_truncated(env):
    """The origin cuts the body after 512 KiB: every client (leader and followers) gets a
    visibly truncated response, nothing is stored, the next request is a miss."""
    lab, so, procs = env
    path = "/stall/2097152/524288/1"
    url = q(path, "collapse-cut", cc="max-age=300", cut="1")
    got = _concurrent(lab, MAIN, url, 6)
    assert all(r.rc != 0 and len(r.body) < 2097152 for r in got), [(r.rc, len(r.body)) for r in got]
    assert len(origin_hits(so, url)) == 1
    r = fetch(lab, MAIN, url)
    assert r.rc != 0 and len(origin_hits(so, url)) == 2


# -- RFC 9111 semantics ------------------------------------------------------------------------

def test_no_store_private_authorization_not_stored(env):
    lab, so, _procs = env
    cases = [(q("/len/300", "no-store", cc="no-store, max-age=300"), (), "detail=no-store"),
             (q("/len/300", "private", cc="private, max-age=300"), (), "detail=private"),
             (q("/len/300", "auth", cc="max-age=300"), ("Authorization: Basic dTpw",), "detail=authorization"),
             (q("/len/300", "no-store-req", cc="max-age=300"), ("Cache-Control: no-store",), "detail=no-store-request")]
    for url, hdrs, detail in cases:
        for _ in range(2):
            r = fetch(lab, MAIN, url, *hdrs)
            assert r.status == 200 and sha(r.body) == expected_sha256("/len/300")
            assert r.cache_status == f"nfsplice; fwd=miss; {detail}", (url, r.headers)
        assert len(origin_hits(so, url)) == 2, url
    # Authorization with public: stored (RFC 9111 3.5).
    url = q("/len/300", "auth-public", cc="public, max-age=300")
    fetch(lab, MAIN, url, "Authorization: Basic dTpw")
    r = fetch(lab, MAIN, url, "Authorization: Basic dTpw")
    assert r.cache_status.startswith("nfsplice; hit") and len(origin_hits(so, url)) == 1


def test_vary_keeps_variants_apart(env):
    lab, so, _procs = env
    url = q("/len/400", "vary", cc="max-age=300", vary="X-Lang")
    for lang in ("en", "de"):
        r = fetch(lab, MAIN, url, f"X-Lang: {lang}")
        assert r.cache_status.startswith("nfsplice; fwd=miss") and r.get("x-vary-value") == lang
    for lang in ("en", "de", "en"):
        r = fetch(lab, MAIN, url, f"X-Lang: {lang}")
        assert r.cache_status.startswith("nfsplice; hit") and r.get("x-vary-value") == lang, r.headers
    r = fetch(lab, MAIN, url)                                 # no X-Lang: a third variant
    assert r.cache_status.startswith("nfsplice; fwd=miss") and r.get("x-vary-value") == "-"
    assert len(origin_hits(so, url)) == 3


def test_304_updates_the_stored_head(env):
    """A stale response is validated with If-None-Match; the 304's fields replace the
    stored ones (X-Origin-Seq names the 304) and the body stays; then it is fresh again."""
    lab, so, procs = env
    # max-age 2, not 1: Date has whole seconds, so a response is up to ~1 s old when it
    # arrives; with max-age=1 the revalidated head was sometimes stale again at once.
    url = q("/len/2000", "304", cc="max-age=2", etag="v1", hdr="X-Version: 1")
    first = fetch(lab, MAIN, url)
    time.sleep(2.6)
    second = fetch(lab, MAIN, url)
    assert second.status == 200 and sha(second.body) == expected_sha256("/len/2000")
    assert second.cache_status == "nfsplice; fwd=stale; fwd-status=304", second.headers
    reqs = origin_hits(so, url)
    assert len(reqs) == 2
    sent = {n.lower(): v for n, v in reqs[1]["headers"]}
    assert sent.get("if-none-match") == '"v1"', reqs[1]["headers"]
    assert second.get("x-origin-seq") != first.get("x-origin-seq") or \
        second.get("x-origin-conn") != first.get("x-origin-conn")          # the 304's fields
    assert " cache=revalidated " in procs[MAIN].nth_line(f" GET {url} ", 2)
    third = fetch(lab, MAIN, url)
    assert third.cache_status.startswith("nfsplice; hit") and len(origin_hits(so, url)) == 2
    assert third.get("x-origin-seq") == second.get("x-origin-seq")


def test_client_conditional_answered_from_cache(env):
    lab, so, _procs = env
    url = q("/len/700", "cond", cc="max-age=300", etag="e7", lm="1700000000")
    fetch(lab, MAIN, url)
    r = fetch(lab, MAIN, url, 'If-None-Match: "e7"')
    assert r.status == 304 and r.body == b"" and r.get("etag") == '"e7"', r.headers
    r = fetch(lab, MAIN, url, 'If-None-Match: "other"')
    assert r.status == 200 and sha(r.body) == expected_sha256("/len/700")
    r = fetch(lab, MAIN, url, "If-Modified-Since: Wed, 15 Nov 2023 00:00:00 GMT")
    assert r.status == 304
    assert len(origin_hits(so, url)) == 1


def test_invalidation_by_post(env):
    """A successful POST to a stored URL invalidates it (RFC 9111 4.4)."""
    lab, so, procs = env
    url = q("/len/600", "invalidate", cc="max-age=300")
    fetch(lab, MAIN, url)
    assert fetch(lab, MAIN, url).cache_status.startswith("nfsplice; hit")
    r = fetch(lab, MAIN, url, method="POST", data="x=1")
    assert r.status == 200 and r.cache_status == "nfsplice; fwd=bypass"
    assert " cache=bypass " in procs[MAIN].nth_line(f" POST {url} ", 1)
    r = fetch(lab, MAIN, url)
    assert r.cache_status.startswith("nfsplice; fwd=miss"), r.headers
    assert len(origin_hits(so, url)) == 2


def test_range_from_a_complete_object(env):
    lab, so, _procs = env
    n = 100000
    url = q(f"/len/{n}", "range", cc="max-age=300", etag="r1")
    whole = stream_bytes(n)
    fetch(lab, MAIN, url)
    r = fetch(lab, MAIN, url, "Range: bytes=100-199")
    assert r.status == 206 and r.body == whole[100:200] and r.get("content-range") == f"bytes 100-199/{n}"
    r = fetch(lab, MAIN, url, "Range: bytes=-50")
    assert r.status == 206 and r.body == whole[-50:]
    r = fetch(lab, MAIN, url, "Range: bytes=99990-")
    assert r.status == 206 and r.body == whole[99990:]
    r = fetch(lab, MAIN, url, f"Range: bytes={n}-")
    assert r.status == 416 and r.get("content-range") == f"bytes */{n}" and r.body == b""
    r = fetch(lab, MAIN, url, "Range: bytes=0-1, 5-6")            # several: the whole object
    assert r.status == 200 and r.body == whole
    r = fetch(lab, MAIN, url, "Range: bytes=10-19", 'If-Range: "r1"')
    assert r.status == 206 and r.body == whole[10:20]
    r = fetch(lab, MAIN, url, "Range: bytes=10-19", 'If-Range: "changed"')
    assert r.status == 200 and r.body == whole
    assert len(origin_hits(so, url)) == 1


def test_head_from_a_stored_get_and_age(env):
    lab, so, _procs = env
    url = q("/len/1500", "head", cc="max-age=300")
    first = fetch(lab, MAIN, url)
    time.sleep(2.1)
    r = fetch(lab, MAIN, url, method="HEAD")
    assert r.status == 200 and r.body == b"" and r.get("content-length") == "1500", r.headers
    assert r.cache_status.startswith("nfsplice; hit")
    assert int(r.get("age")) >= 2 and r.get("date") == first.get("date")     # the origin's Date
    assert len(origin_hits(so, url)) == 1 and not origin_hits(so, url, "HEAD")


def test_only_if_cached(env):
    lab, so, _procs = env
    url = q("/len/100", "only-if-cached", cc="max-age=300")
    r = fetch(lab, MAIN, url, "Cache-Control: only-if-cached")
    assert r.status == 504 and not origin_hits(so, url)


def test_stale_while_revalidate_and_stale_if_error(env):
    lab, so, procs = env
    url = q("/len/800", "swr", cc="max-age=1, stale-while-revalidate=60")
    fetch(lab, MAIN, url)
    time.sleep(1.6)
    r = fetch(lab, MAIN, url)
    assert r.status == 200 and sha(r.body) == expected_sha256("/len/800")
    assert "detail=stale-while-revalidate" in r.cache_status, r.headers
    deadline = time.monotonic() + 5
    while len(origin_hits(so, url)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(origin_hits(so, url)) == 2                         # validated in the background
    procs[MAIN].access_line("(background revalidation)")
    assert fetch(lab, MAIN, url).cache_status.startswith("nfsplice; hit")
    # stale-if-error: the origin answers 503 from its second request on.
    url = q("/len/900", "sie", cc="max-age=1, stale-if-error=60", fail_after="1")
    fetch(lab, MAIN, url)
    time.sleep(1.6)
    r = fetch(lab, MAIN, url)
    assert r.status == 200 and sha(r.body) == expected_sha256("/len/900"), (r.status, r.headers)
    assert r.cache_status == "nfsplice; fwd=stale; fwd-status=503; detail=stale-if-error", r.headers


# -- PURGE, the cache command, counters --------------------------------------------------------

def wait_stored(lab, cache_dir: str, key: str, timeout: float = 10.0) -> None:
    """Until the store has committed KEY (the writer thread commits after the response
    went out, so a request right behind it may not find it yet)."""
    deadline = time.monotonic() + timeout
    while cache_cli(lab, "stat", key, "--cache-dir", cache_dir).returncode != 0:
        assert time.monotonic() < deadline, f"{key} never stored"
        time.sleep(0.1)


def test_purge(env):
    lab, so, procs = env
    url = q("/len/500", "purge", cc="max-age=300")
    fetch(lab, MAIN, url)
    wait_stored(lab, procs[MAIN].cache_dir, f"http://{TAGGED}{url}")
    r = fetch(lab, MAIN, url, method="PURGE")
    assert r.status == 200 and b"1 stored response" in r.body, r.body
    assert fetch(lab, MAIN, url, method="PURGE").status == 404
    assert fetch(lab, MAIN, url).cache_status.startswith("nfsplice; fwd=miss")
    # Through the command, while the proxy runs: it asks the proxy (PURGE from 127.0.0.1).
    out = cache_cli(lab, "purge", f"http://{TAGGED}{url}", "--cache-dir", procs[MAIN].cache_dir)
    assert out.returncode == 0 and b"purged" in out.stdout and b"through the running proxy" in out.stdout, out
    assert fetch(lab, MAIN, url).cache_status.startswith("nfsplice; fwd=miss")
    assert len(origin_hits(so, url)) == 3
    # Only from --purge-from addresses (the small proxy keeps the default, 127.0.0.1/32).
    fetch(lab, SMALL, url)
    assert fetch(lab, SMALL, url, method="PURGE").status == 403
    assert fetch(lab, SMALL, url).cache_status.startswith("nfsplice; hit")


def test_cache_command_ls_and_stat(env):
    lab, _so, procs = env
    url = q("/len/1234", "cli", cc="max-age=300", etag="c1")
    fetch(lab, MAIN, url)
    key = f"http://{TAGGED}{url}"
    ls = cache_cli(lab, "ls", "--cache-dir", procs[MAIN].cache_dir)
    assert ls.returncode == 0
    assert any(line.split()[-1] == key and line.split()[0] == "1234" for line in ls.stdout.decode().splitlines()), ls
    st = cache_cli(lab, "stat", key, "--cache-dir", procs[MAIN].cache_dir)
    text = st.stdout.decode()
    assert st.returncode == 0 and "size:      1234" in text and 'ETag: "c1"' in text and "fresh" in text, text
    assert f"sha256:    {expected_sha256('/len/1234')}" in text
    missing = cache_cli(lab, "stat", f"http://{TAGGED}/nothing", "--cache-dir", procs[MAIN].cache_dir)
    assert missing.returncode == 2 and b"not in the cache" in missing.stderr


def test_counters(env):
    lab, _so, _procs = env
    st = stats("chx-main", time.time())
    for k in ("cache.hits", "cache.misses", "cache.revalidated", "cache.stale", "cache.bypass",
              "cache.bytes_stored", "cache.dropped_incomplete", "cache.collapsed"):
        assert st.get(k, 0) > 0, (k, {k: v for k, v in st.items() if k.startswith("cache.")})
    assert st.get("cache.io_errors", 0) == 0


def test_eviction_keeps_the_size_bound(env):
    """A 1 MiB cache and eight 300 KB objects: the least recently used go, the store
    never holds more than 1 MiB, the newest are hits."""
    lab, so, procs = env
    urls = [q("/len/300000", f"evict-{i}", cc="max-age=300") for i in range(8)]
    for url in urls:
        assert sha(fetch(lab, SMALL, url).body) == expected_sha256("/len/300000")
    ls = cache_cli(lab, "ls", "--cache-dir", procs[SMALL].cache_dir).stdout.decode().splitlines()
    total = int(ls[-1].split()[3])
    assert total <= 1 << 20 and len(ls) - 1 == 3, ls
    assert fetch(lab, SMALL, urls[-1]).cache_status.startswith("nfsplice; hit")
    assert fetch(lab, SMALL, urls[0]).cache_status.startswith("nfsplice; fwd=miss")
    assert stats("chx-small", time.time()).get("cache.evictions", 0) >= 5


# -- restarts, crashes, a full disk ----------------------------------------------------------------

def test_restart_keeps_the_cache(env, tmp_path):
    lab, so, _procs = env
    d = str(tmp_path / "chx-restart")
    os.mkdir(d)
    url = q("/len/2097152", "restart", cc="max-age=300")
    p = Proc(lab, so, 8100, d, "--queue", "4", "--ports", "62000-62499", instance="chx-restart")
    try:
        assert sha(fetch(lab, 8100, url).body) == expected_sha256("/len/2097152")
    finally:
        assert p.stop() == 0, p.text()
    p = Proc(lab, so, 8100, d, "--queue", "4", "--ports", "62000-62499", instance="chx-restart")
    try:
        r = fetch(lab, 8100, url)
        assert r.cache_status.startswith("nfsplice; hit") and sha(r.body) == expected_sha256("/len/2097152")
    finally:
        assert p.stop() == 0, p.text()
    assert len(origin_hits(so, url)) == 1


def test_sigkill_during_fills_leaves_nothing_servable(env, tmp_path):
    """SIGKILL while five large objects are being filled (the origin pauses halfway):
    afterwards every row of the index names its exact body (re-hashed), none of the
    five is stored, and a new proxy fetches them whole from the origin."""
    lab, so, _procs = env
    d = str(tmp_path / "chx-kill")
    os.mkdir(d)
    tapdev = fastpath.tap_device_name(fastpath.tc_priority("chx-kill"))
    paths = [q("/stall/4194304/2097152/4", f"kill-{i}", cc="max-age=300") for i in range(5)]
    done = q("/len/100000", "kill-done", cc="max-age=300")
    args = ("--queue", "6", "--ports", "62500-62999")
    p = Proc(lab, so, 8110, d, *args, instance="chx-kill")
    try:
        fetch(lab, 8110, done)
        clients = [lab.popen(lab.client, "curl", "-sS", "-o", "/dev/null", "--max-time", "30",
                             f"http://{PROXY}:8110{u}", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for u in paths]
        time.sleep(1.5)
        assert tapdev in tap_devices(lab)
        p.proc.send_signal(signal.SIGKILL)
        p.proc.wait(10)
    finally:
        p.stop()
        # What the launcher does after a SIGKILL: the rules of the dead instance go,
        # and its clone tap device.
        lab.run(lab.proxy, sys.executable, "-m", "nfsplice", "cleanup", cwd=REPO, check=False)
    assert tapdev not in tap_devices(lab)
    for c in clients:
        c.wait(40)
    with Store(d, 1 << 40, verify=True) as store:          # (recovery runs, bodies re-hashed)
        keys = {e.key for e in store.ls()}
        assert store.recovered["bad_rows"] == 0, store.recovered
    assert keys == {f"http://{PROXY}:8110{done}"}, keys
    p = Proc(lab, so, 8110, d, *args, instance="chx-kill")
    try:
        r = fetch(lab, 8110, paths[0])
        assert r.rc == 0 and sha(r.body) == expected_sha256("/stall/4194304/2097152/4")
        assert r.cache_status.startswith("nfsplice; fwd=miss")
        assert fetch(lab, 8110, done).cache_status.startswith("nfsplice; hit")
    finally:
        assert p.stop() == 0, p.text()
    assert tapdev not in tap_devices(lab)


def tap_devices(lab) -> list[str]:
    """The clone tap devices (not their peers) in the proxy namespace."""
    out = lab.run(lab.proxy, "ip", "-o", "link", "show").stdout.decode()
    return [dev for line in out.splitlines() for dev in [line.split(":")[1].strip().split("@")[0]]
            if dev.startswith(fastpath.TAP_DEV_PREFIX) and not dev.endswith("p")]


def test_disk_full_keeps_proxying(env, tmp_path):
    """The cache directory is a 2 MiB tmpfs (the cache believes it has 1 GiB): bodies
    that do not fit are not stored, every response is still byte-exact, and the log says
    so once."""
    lab, so, _procs = env
    d = str(tmp_path / "chx-full")
    os.mkdir(d)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", d], check=True)
    try:
        p = Proc(lab, so, 8120, d, "--queue", "8", "--ports", "63000-63499", instance="chx-full")
        try:
            for i in range(4):
                for path in ("/len/1048576", "/len/60000"):
                    url = q(path, f"full-{i}", cc="max-age=300")
                    r = fetch(lab, 8120, url)
                    assert r.rc == 0 and sha(r.body) == expected_sha256(path), (url, r.stderr)
            st = stats("chx-full", time.time())
        finally:
            assert p.stop() == 0, p.text()
        log = p.text()
        assert log.count("No space left on device") == 1, log
        assert "only not stored (this is said once)" in log
        assert st.get("cache.io_errors", 0) >= 1, st
    finally:
        subprocess.run(["umount", d], check=False)
