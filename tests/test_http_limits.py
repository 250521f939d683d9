"""The limits and timeouts of `nfsplice http`, end to end in the lab, with short
timeouts so each test takes a few seconds.

One process serves five listeners (a config file): the scripted origin with short
header, keep-alive and response timeouts (and the command line's field limit); an
upstream whose SYNs are dropped (connect timeout); an origin that accepts and never
answers (response timeout); max_connections = 3; a field limit of its own.  The
engine's --inactivity-timeout is 2 s.  What a client sees is measured on the client's
side (when its connection ended, how, what it got); what the proxy freed, in its stats.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

from netns_lab.origins import ScriptedOrigin, raw_exchange, raw_request, stream_bytes
from netns_lab.topology import ORIGIN_ADDR, Lab
from tests.splicer import REPO, instance_stats, proxy_sockets, raw_rules, socket_counters
from tests.test_http_proxy import PROXY, SLOWLORIS, HTTPProxyProc, curl, slowloris_ends

pytestmark = pytest.mark.root

INSTANCE = "lim"
MAIN, BLACKHOLE, SILENT, FEW, FIELDS, QUEUED = 8080, 8081, 8082, 8083, 8084, 8085
HEADER, KEEPALIVE, CONNECT, RESPONSE, INACTIVITY = 1.2, 2.5, 1.0, 1.5, 2.0
CLI_FIELDS, FILE_FIELDS, MAX_CONNECTIONS = 20, 10, 3
DROPPED = "198.18.3.3"          # routed to the origin namespace, where a rule drops it
SILENT_PORT = 8009
NFT_TABLE = "nfslimits"


def config(origin: int) -> str:
    """The listeners, ORIGIN the scripted origin's port."""
    return f"""\
[[listener]]
listen = "{PROXY}:{MAIN}"
upstreams = ["http://{ORIGIN_ADDR}:{origin}"]
ports = "61000-61399"
timeouts = {{ header = {HEADER}, keepalive = {KEEPALIVE}, response = {RESPONSE} }}

[[listener]]
listen = "{PROXY}:{BLACKHOLE}"
upstreams = ["http://{DROPPED}:80"]
ports = "61400-61499"
timeouts.connect = {CONNECT}

[[listener]]
listen = "{PROXY}:{SILENT}"
upstreams = ["http://{ORIGIN_ADDR}:{SILENT_PORT}"]
ports = "61500-61599"
timeouts.response = {RESPONSE}

[[listener]]
listen = "{PROXY}:{FEW}"
upstreams = ["http://{ORIGIN_ADDR}:{origin}"]
ports = "61600-61699"
max_connections = {MAX_CONNECTIONS}

[[listener]]
listen = "{PROXY}:{FIELDS}"
upstreams = ["http://{ORIGIN_ADDR}:{origin}"]
ports = "61700-61799"
splice = false
max_header_fields = {FILE_FIELDS}
"""

# Accepts and never reads nor answers (an origin that hangs before its response head).
SILENT_ORIGIN = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(64)
print("ready", flush=True)
held = []
while True:
    held.append(s.accept()[0])
"""


@pytest.fixture(scope="module")
def env():
    with Lab("lim") as lab, ScriptedOrigin(lab) as so:
        lab.ip(lab.proxy, "route", "add", f"{DROPPED}/32", "via", ORIGIN_ADDR)
        lab.run(lab.origin, "nft", "-f", "-", input=(
            f"table inet {NFT_TABLE} {{\n chain pre {{\n  type filter hook prerouting priority -300;\n"
            f"  ip daddr {DROPPED} counter drop\n }}\n}}\n").encode())
        silent = lab.popen(lab.origin, sys.executable, "-c", SILENT_ORIGIN, ORIGIN_ADDR, str(SILENT_PORT),
                           stdout=subprocess.PIPE)
        proc = None
        try:
            assert silent.stdout.readline() == b"ready\n"
            path = os.path.join(tempfile.mkdtemp(prefix="nfsplice-lim-"), "limits.toml")
            with open(path, "w") as f:
                f.write(config(so.port))
            proc = HTTPProxyProc(lab, None, "--config", path, "--queue", "20", "--inactivity-timeout",
                                 str(INACTIVITY), "--max-header-fields", str(CLI_FIELDS), instance=INSTANCE)
            yield lab, so, proc
        finally:
            silent.kill()
            silent.wait()
            if proc is not None:
                assert proc.stop() == 0, proc.text()
                assert "NFSPLICE" not in raw_rules(lab)


@pytest.fixture(scope="module")
def queued(env):
    """A second process like the first's MAIN listener, without the fast path: the
    engine sees every packet."""
    lab, so, _proc = env
    proc = HTTPProxyProc(lab, QUEUED, "--upstream", f"http://{ORIGIN_ADDR}:{so.port}", "--fastpath", "off",
                         "--queue", "22", "--ports", "61900-61999", "--inactivity-timeout", str(INACTIVITY),
                         instance=f"{INSTANCE}-queued")
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.text()


def stats(instance: str = INSTANCE) -> dict:
    """The instance's counters, written after this call began."""
    return instance_stats(instance, time.time())


def delta(before: dict, after: dict, *keys: str) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys}


def get(path: str, *fields: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n").encode()


def timed_curl(lab, port: int, path: str) -> float:
    """Fetch PATH through PORT, check the body, return the seconds it took."""
    t0 = time.monotonic()
    r = curl(lab, "-o", "-", f"http://{PROXY}:{port}{path}")
    took = time.monotonic() - t0
    assert r.returncode == 0 and len(r.stdout) == int(path.rsplit("/", 1)[1]), r.stderr
    assert r.stdout == stream_bytes(len(r.stdout))
    return took


def plain_error(res, status: int, reason: str) -> None:
    """RES is the proxy's own small error response: STATUS, a plain-text body naming
    REASON, then the connection's end."""
    resp = res.response()
    body = res.data[resp.head_len:]
    assert resp.status == status, res.data[:300]
    assert resp.get("content-type") == "text/plain; charset=utf-8" and resp.get("connection") == "close"
    assert int(resp.get("content-length")) == len(body) < 200 and reason in body.decode(), body
    assert res.end == "eof", res.end


# -- 1. the request-head timeout ----------------------------------------------------------------
def test_stalled_heads_closed_after_the_header_timeout(env):
    """200 connections send half a head and stall, 20 send nothing: each is closed (a
    FIN, no response: the proxy answers nothing) HEADER s after it began, not before;
    a normal client is served at once meanwhile."""
    lab, _so, proc = env
    n, mute = 220, 20
    before = stats()
    slow = lab.popen(lab.client, sys.executable, "-c", SLOWLORIS, PROXY, str(MAIN), str(n), str(HEADER + 4),
                     str(mute), stdout=subprocess.PIPE)
    try:
        assert slow.stdout.readline() == f"open {n}\n".encode()
        assert timed_curl(lab, MAIN, "/len/300000") < HEADER       # (spliced) not behind them
        ends = slowloris_ends(slow)
    finally:
        slow.kill()
        slow.wait()
    assert len(ends) == n, f"{n - len(ends)} connections still open after {HEADER + 4} s"
    assert {(how, got) for _t, how, got in ends} == {("eof", 0)}, ends
    times = sorted(t for t, _how, _got in ends)
    assert HEADER - 0.05 <= times[0] and times[-1] <= HEADER + 1.5, (times[0], times[-1])
    assert delta(before, stats(), "http.header_timeouts") == {"http.header_timeouts": n}


# -- 2. the keep-alive timeout --------------------------------------------------------------------
def test_idle_keepalive_connection_closed_after_the_keepalive_timeout(env):
    """A kept-alive connection idle for longer than the header timeout (but less than
    the keep-alive one) still carries a request; idle after that response it is closed
    KEEPALIVE s later, not before."""
    lab, _so, _proc = env
    pause = (HEADER + KEEPALIVE) / 2
    before = stats()
    res = raw_exchange(lab, [get("/len/10"), ("until", stream_bytes(10)), ("sleep", pause), get("/len/20"),
                             ("until", stream_bytes(20))], addr=PROXY, port=MAIN, idle=KEEPALIVE + 4)
    first = res.response()
    second = res.response(first.head_len + 10)
    assert (first.status, second.status) == (200, 200), res.data[:400]
    assert res.data.endswith(stream_bytes(20)) and res.end == "eof", (res.end, res.data[-100:])
    idle = res.elapsed - res.marks[4][0]          # since the second response was complete
    assert KEEPALIVE - 0.05 <= idle <= KEEPALIVE + 1.0, idle
    assert delta(before, stats(), "http.idle_timeouts", "http.header_timeouts") == \
        {"http.idle_timeouts": 1, "http.header_timeouts": 0}


# -- 3. upstream connect and response timeouts --------------------------------------------------
def nft_drops(lab) -> int:
    out = lab.run(lab.origin, "nft", "list", "table", "inet", NFT_TABLE).stdout.decode().split()
    return int(out[out.index("packets") + 1])


def test_upstream_connect_timeout_answers_504(env):
    lab, _so, proc = env
    before, drops = stats(), nft_drops(lab)
    res = raw_request(lab, get("/len/1"), addr=PROXY, port=BLACKHOLE, idle=CONNECT + 5)
    plain_error(res, 504, f"connecting to {DROPPED}:80 timed out")
    assert CONNECT - 0.05 <= res.elapsed <= CONNECT + 1.0, res.elapsed
    assert nft_drops(lab) > drops                  # its SYNs went out and were dropped
    assert delta(before, stats(), "http.upstream_connect_failed", "http.status_504") == \
        {"http.upstream_connect_failed": 1, "http.status_504": 1}
    assert " 504 " in proc.access_line(" GET /len/1 ")


def test_upstream_response_timeout_answers_504(env):
    """The origin accepts the request and never answers: 504 RESPONSE s later."""
    lab, _so, _proc = env
    before = stats()
    res = raw_request(lab, get("/len/2"), addr=PROXY, port=SILENT, idle=RESPONSE + 5)
    plain_error(res, 504, "timeout")
    assert RESPONSE - 0.05 <= res.elapsed <= RESPONSE + 1.0, res.elapsed
    assert delta(before, stats(), "http.status_504", "http.upstream_errors") == \
        {"http.status_504": 1, "http.upstream_errors": 1}


def test_upstream_stalling_in_a_copied_body_resets_the_client(env):
    """The head and 1,000 bytes of a 30,000-byte (copied) body, then the origin stalls
    for longer than the response timeout: the head went out already, so the client
    gets a reset after RESPONSE s, never a complete-looking message."""
    lab, _so, proc = env
    res = raw_request(lab, get("/stall/30000/1000/6"), addr=PROXY, port=MAIN, idle=RESPONSE + 5)
    resp = res.response()
    assert resp.status == 200 and int(resp.get("content-length")) == 30000
    assert res.data[resp.head_len:] == stream_bytes(1000) and res.end == "reset", (res.end, len(res.data))
    assert RESPONSE - 0.05 <= res.elapsed <= RESPONSE + 1.0, res.elapsed
    assert " aborted" in proc.access_line(" GET /stall/30000/1000/6 ")


# -- 4. max connections -------------------------------------------------------------------------
MAX_CONNECTIONS_CLIENT = r"""
import json, socket, sys, time
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def exchange(s, path):
    '''Send a GET of PATH on S; the response's status and body length, or how S ended.'''
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            got = s.recv(65536)
            if not got:
                return "eof" if not data else "eof after " + data[:20].decode()
            data += got
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += s.recv(65536)
    except ConnectionResetError:
        return "reset"
    return [head.split()[1].decode(), len(body)]

out = {}
held = [socket.create_connection((addr, port)) for _ in range(n)]
out["held"] = [exchange(s, f"/len/{100 + i}") for i, s in enumerate(held)]
t0 = time.monotonic()
extra = socket.create_connection((addr, port))
extra.settimeout(5)
out["extra"] = exchange(extra, "/len/99")
out["extra_after"] = time.monotonic() - t0
out["held_again"] = [exchange(s, f"/len/{200 + i}") for i, s in enumerate(held)]
for s in held:
    s.close()
time.sleep(0.5)
out["after_close"] = exchange(socket.create_connection((addr, port)), "/len/98")
print(json.dumps(out))
"""


def test_max_connections_refuses_one_more_and_serves_after_they_close(env):
    """With max_connections = 3 and three connections open, a fourth is accepted by the
    kernel and closed at once without an answer; the three go on being served; once
    they are closed, a new connection is served."""
    lab, _so, _proc = env
    before = stats()
    p = lab.run(lab.client, sys.executable, "-c", MAX_CONNECTIONS_CLIENT, PROXY, str(FEW), str(MAX_CONNECTIONS),
                timeout=30)
    out = json.loads(p.stdout)
    assert out["held"] == [["200", 100 + i] for i in range(MAX_CONNECTIONS)], out
    assert out["extra"] in ("eof", "reset") and out["extra_after"] < 1.0, out
    assert out["held_again"] == [["200", 200 + i] for i in range(MAX_CONNECTIONS)], out
    assert out["after_close"] == ["200", 98], out
    assert delta(before, stats(), "http.refused_max_connections") == {"http.refused_max_connections": 1}


# -- 5. the engine's inactivity timeout on a spliced body ----------------------------------------
NO_READER = r"""
import json, socket, sys, time
addr, port, path, first, watch = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)       # before connect: a small window
s.connect((addr, port))
s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
got = 0
while got < first:                                           # the head and FIRST bytes, then
    got += len(s.recv(1 << 16))
t0 = time.monotonic()
print(s.getsockname()[1], flush=True)
closed = None
while closed is None and time.monotonic() - t0 < watch:      # nothing more
    if s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == 7:     # TCP_CLOSE: a RST came
        closed = time.monotonic() - t0
    time.sleep(0.02)
end = "open"
s.settimeout(1)
try:
    while True:
        data = s.recv(1 << 16)
        if not data:
            end = "eof"
            break
        got += len(data)
except ConnectionResetError:
    end = "reset"
except socket.timeout:
    pass
print(json.dumps({"closed": closed, "bytes": got, "end": end}))
"""


@pytest.mark.parametrize("fastpath", [True, False], ids=["fastpath", "queue-only"])
def test_spliced_body_to_a_client_that_stops_reading_ends_after_the_inactivity_timeout(env, request, fastpath):
    """A 64 MiB spliced body to a client with a 4 KiB receive buffer that reads the
    first MiB and then nothing: no byte moves once its window is closed; the engine
    resets the pair INACTIVITY s later, the client included (a RST at the highest seq
    sent falls outside its closed window; the engine's ACK after it gets a duplicate
    ACK from the client, answered with a RST at its ack), and the proxy frees the pair,
    while other clients are served.  With the fast path (the engine sees few of the client's ACKs) and without.
    (A client that reads nothing at all, not even the first bytes, may leave the
    hand-off's drain unfinished: the hand-off then fails after 5 s, unspliced.)"""
    lab = env[0]
    proc = env[2] if fastpath else request.getfixturevalue("queued")
    listen, instance = (MAIN, INSTANCE) if fastpath else (QUEUED, proc.instance)
    before = stats(instance)
    path = f"/len/{64 << 20}"
    client = lab.popen(lab.client, sys.executable, "-c", NO_READER, PROXY, str(listen), path, str(1 << 20),
                       str(INACTIVITY + 6), stdout=subprocess.PIPE)
    try:
        port = client.stdout.readline().decode().strip()
        time.sleep(0.5)
        for _ in range(3):                              # served meanwhile, spliced and copied
            assert timed_curl(lab, listen, "/len/1048576") < INACTIVITY
            assert timed_curl(lab, listen, "/len/1000") < 1
        out = json.loads(client.stdout.readline())
    finally:
        client.kill()
        client.wait()
    assert out["closed"] is not None, out
    # (Bytes still move for a moment after the client stops reading, and the fast path
    # reports progress once a second: the timer runs from up to ~1.5 s later.)
    assert INACTIVITY - 0.05 <= out["closed"] <= INACTIVITY + 3.0, out
    assert out["end"] == "reset" and out["bytes"] < 2 << 20, out       # of 64 MiB
    assert " spliced " in proc.access_line(f" GET {path} ")
    # The engine counted the reset and forgot the pair (linger 1 s); its sockets are gone.
    deadline = time.monotonic() + 5
    while True:
        after = stats(instance)
        left = [s for s in proxy_sockets(lab) if f"{PROXY}:{listen} " in s and f":{port} " in s]
        if (after["pairs.active"] == 0 and not left) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert delta(before, after, "pairs.reset_by_engine.inactivity", "pairs.done.reset") == \
        {"pairs.reset_by_engine.inactivity": 1, "pairs.done.reset": 1}, after["pairs.oldest"]
    assert after["pairs.active"] == 0 and not left, (after["pairs.oldest"], left)
    assert after.get("dropped.proxy_socket", 0) == 0, socket_counters(after)


# -- 6. the field-count limit -------------------------------------------------------------------
@pytest.mark.parametrize("port,limit", [(FIELDS, FILE_FIELDS), (MAIN, CLI_FIELDS)],
                         ids=["config-file", "command-line"])
def test_field_count_limit(env, port, limit):
    """A head of LIMIT field lines (Host and LIMIT - 1 others) passes; one more is 431
    and never reaches the origin.  The file's max_header_fields, the command line's
    --max-header-fields."""
    lab, so, _proc = env
    fields = [f"X-N{i}: {i}" for i in range(limit - 1)]
    res = raw_request(lab, get(f"/len/{limit}", *fields), addr=PROXY, port=port, idle=2.0)
    assert res.response().status == 200 and res.data.endswith(stream_bytes(limit)), res.data[:300]
    got = so.requests()[-1]
    assert got["target"] == f"/len/{limit}" and sum(n.startswith("X-N") for n, _v in got["headers"]) == limit - 1
    before = len(so.requests())
    res = raw_request(lab, get(f"/len/{limit + 1}", *fields, "X-One-More: 1"), addr=PROXY, port=port, idle=2.0)
    plain_error(res, 431, f"more than {limit} field lines")
    assert len(so.requests()) == before, "a refused request reached the origin"


# -- 7. stats of a copy-only process --------------------------------------------------------------
def test_copy_only_process_writes_stats(env):
    """A process whose listeners all copy (--no-splice: no engine, no runner) writes its
    HTTP counters to the stats file every second and at exit; `nfsplice stats` shows
    them."""
    lab, so, _proc = env
    name = "lim-plain"
    path = f"/run/nfsplice/{name}.json"
    if os.path.exists(path):
        os.unlink(path)
    plain = HTTPProxyProc(lab, 8090, "--upstream", f"http://{ORIGIN_ADDR}:{so.port}", "--no-splice",
                          "--ports", "62000-62099", instance=name)
    try:
        for n in (1000, 300000):
            timed_curl(lab, 8090, f"/len/{n}")
        st = instance_stats(name, time.time())
        assert st["instance"] == name and st["pid"] == plain.proc.pid, st
        assert (st["http.accepted"], st["http.requests"], st["http.upstream_connects"]) == (2, 2, 1), st
        out = subprocess.run([sys.executable, "-m", "nfsplice", "stats", "--instance", name], cwd=REPO,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == f"== {name} (pid {plain.proc.pid}, running)", lines
        assert "http.requests                        2" in lines, lines
        timed_curl(lab, 8090, "/len/10")
    finally:
        assert plain.stop() == 0, plain.text()
    with open(path) as f:
        final = json.load(f)
    assert final["http.requests"] == 3 and final["pid"] == plain.proc.pid, final
    assert f"nfsplice:{name} " not in raw_rules(lab)          # (no rules of its own, ever)

