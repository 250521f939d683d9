"""Origins that half-close or stall in the middle of a body, through the running proxy,
spliced and copied.  (Truncations, resets and malformed bodies: test_http_proxy.)"""
from __future__ import annotations

import os
import tempfile
import time

import pytest

from netns_lab.origins import parse_response, raw_exchange, stream_bytes
from tests import test_http_proxy
from tests.splicer import instance_stats, socket_counters
from tests.test_http_proxy import COPIED, PROXY, SPLICED, HTTPProxyProc, curl, sha

pytestmark = pytest.mark.root
env = test_http_proxy.env       # its fixture: the lab, the scripted origin, both listeners

BIG = 300000        # spliced on a splicing listener (its threshold is 64 KiB)
QUICK_SPLICED, QUICK_COPIED = 8084, 8085
TIMEOUT = 2.0


@pytest.mark.parametrize("port", [SPLICED, COPIED])
@pytest.mark.parametrize("size", [1000, BIG])
def test_origin_half_close_after_its_response(env, port, size):
    """The origin sends a whole response (no Connection: close), then its FIN while it
    still reads.  The client gets the body exactly.  A copied body leaves the client
    connection usable: the next request goes to a new upstream connection.  A spliced
    one (resumed at its end) passes the origin's FIN on, right after the body: the
    client sees the server close a keep-alive connection, and a request it sent
    meanwhile is refused with a RST, never answered wrongly.  Either way the origin's
    read ends (EOF or that RST), not by its timeout."""
    lab, so, _ngx, _procs = env
    tag = f"{port}-{size}"
    first = f"GET /half-close/{size}?t={tag} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    second = f"GET /len/700?after={tag} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    res = raw_exchange(lab, [first, ("until", b"\r\n\r\n"), ("sleep", 0.5), second], addr=PROXY, port=port,
                       idle=1.5)
    resp = res.response()
    assert resp.status == 200, res.data[:300]
    body_end = resp.head_len + size
    assert res.data[resp.head_len:body_end] == stream_bytes(size)
    if port == SPLICED and size == BIG:
        assert len(res.data) == body_end and res.end in ("eof", "reset"), (res.end, res.data[body_end:][:300])
    else:
        nxt = parse_response(res.data, body_end)
        assert nxt.status == 200 and res.data[body_end + nxt.head_len:] == stream_bytes(700), res.data[body_end:]
    ev = so.wait_event(lambda e: e["event"] == "half-close-read" and
                       any(r["conn"] == e["conn"] and r["target"].endswith(f"t={tag}") for r in so.requests()),
                       timeout=10)
    assert ev["end"] in (("eof", "reset") if port == SPLICED and size == BIG else ("eof",)), ev


@pytest.fixture(scope="module")
def quick(env):
    """Listeners with a short upstream response timeout (copied) and a short inactivity
    timeout for spliced bodies."""
    lab, so, _ngx, _procs = env
    up = ["--upstream", f"http://{so.addr}:{so.port}", "--response-timeout", str(TIMEOUT)]
    spliced = HTTPProxyProc(lab, QUICK_SPLICED, *up, "--queue", "8", "--inactivity-timeout", str(TIMEOUT),
                            "--ports", "60000-60499", instance="hpx-quick-spliced")
    copied = HTTPProxyProc(lab, QUICK_COPIED, *up, "--no-splice", "--ports", "60500-60999",
                           instance="hpx-quick-copied")
    try:
        yield lab, {QUICK_SPLICED: spliced, QUICK_COPIED: copied}
    finally:
        # (Each must exit 0; that no rule is left is checked once env's listeners stop.)
        assert {p.instance: p.stop() for p in (spliced, copied)} == {spliced.instance: 0, copied.instance: 0}


@pytest.mark.parametrize("port", [QUICK_SPLICED, QUICK_COPIED])
def test_origin_stalling_mid_body_leaves_client_truncated(quick, port):
    """The origin sends the head and part of the body, then nothing for longer than
    the proxy waits: the client sees a truncated message (a reset, never a
    complete-looking one) after about the timeout, not after the origin's stall."""
    lab, procs = quick
    stall = 8.0
    t0 = time.monotonic()
    r = curl(lab, "-o", "-", f"http://{PROXY}:{port}/stall/{BIG}/100000/{stall:g}?p={port}")
    took = time.monotonic() - t0
    assert r.returncode != 0, "curl took a stalled body for a complete one"
    assert 100000 <= len(r.stdout) < BIG and r.stdout == stream_bytes(len(r.stdout))
    st = instance_stats(procs[port].instance, time.time()) if port == QUICK_SPLICED else {}
    assert TIMEOUT * 0.9 <= took < stall - 1, (took, len(r.stdout), r.stderr, socket_counters(st),
                                             {k: v for k, v in st.items() if k.startswith(("pairs", "fastpath"))})
    line = procs[port].access_line(f"/stall/{BIG}/100000/{stall:g}?p={port}", timeout=10)
    assert (" spliced" if port == QUICK_SPLICED else " copied") in line, line
    if port == QUICK_SPLICED:
        assert st.get("pairs.reset_by_engine.inactivity", 0) >= 1, \
            {k: v for k, v in st.items() if "reset" in k or "forgot" in k}


@pytest.mark.parametrize("port", [SPLICED, COPIED])
def test_tunnel_reset_by_the_origin_resets_the_client(env, port):
    """A 101 tunnel whose origin resets it after echoing a first message: the client
    gets the echo, then a reset, never a FIN (which would look like the tunnel's clean
    end).  Spliced, the engine passes the origin's RST on; copied, the proxy closes the
    client's side with SO_LINGER 0."""
    lab, _so, _ngx, _procs = env
    req = f"GET /upgrade?reset=1&t={port} HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n"
    payload = b"m" * 5000
    res = raw_exchange(lab, [req.encode(), ("until", b"\r\n\r\n"), ("send", payload)], addr=PROXY, port=port,
                       idle=5.0)
    resp = res.response()
    assert resp.status == 101, res.data[:300]
    assert res.data[resp.head_len:] == payload and res.end == "reset", (res.end, len(res.data))


@pytest.mark.parametrize("port", [SPLICED, COPIED])
def test_early_hints_while_waiting_for_100_continue(env, port):
    """The origin answers an Expect: 100-continue with a 103 Early Hints and then waits
    for the body without a 100: the 103 is passed on and the body still goes to the
    origin after the proxy's short wait (a 1xx is not the final answer)."""
    lab, so, _ngx, _procs = env
    body = stream_bytes(200000, seed=7)
    path = os.path.join(tempfile.mkdtemp(), "body.bin")
    with open(path, "wb") as f:
        f.write(body)
    target = f"/echo?discard=1&ignore_expect=1&hints=1&p={port}"
    t0 = time.monotonic()
    r = curl(lab, "-D", "-", "-o", "/dev/null", "-H", "Expect: 100-continue", "--expect100-timeout", "1",
             "--data-binary", f"@{path}", f"http://{PROXY}:{port}{target}")
    took = time.monotonic() - t0
    heads = r.stdout.decode(errors="replace")
    assert r.returncode == 0 and "HTTP/1.1 103" in heads and "HTTP/1.1 200" in heads, (heads, r.stderr)
    got = [q for q in so.requests() if q["target"] == target]
    assert [(q["body_length"], q["body_sha256"]) for q in got] == [(len(body), sha(body))], got
    assert took < 10, took
