"""Connection semantics through the running proxy, spliced and copied: HTTP/1.0
clients, responses without a body, hop-by-hop fields of responses, Via, and the
Connection: close a response carries when its connection ends after it.

(http1's unit tests check the functions; these check what a client gets.)
"""
from __future__ import annotations

from urllib.parse import quote

import pytest

from netns_lab.origins import parse_response, raw_request, stream_bytes
from tests import test_http_proxy
from tests.test_http_proxy import COPIED, PROXY, SPLICED

pytestmark = pytest.mark.root
env = test_http_proxy.env       # its fixture: the lab, the scripted origin, both listeners

BIG = 300000        # spliced on the SPLICED listener (its threshold is 64 KiB)


def _tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in (value or "").split(",") if t.strip()}


@pytest.mark.parametrize("port", [SPLICED, COPIED])
@pytest.mark.parametrize("keep_alive", [False, True])
def test_http10_client_gets_its_body_then_the_connection_closes(env, port, keep_alive):
    """RFC 9112 9.3: a proxy keeps no persistent connection with an HTTP/1.0 client,
    even one that asks for keep-alive; the request goes on as HTTP/1.0 (so the origin
    answers without chunked), the body arrives whole, then the proxy closes."""
    lab, so, _ngx, procs = env
    target = f"/len/{BIG}?v10={port}-{int(keep_alive)}"
    ask = b"Connection: keep-alive\r\n" if keep_alive else b""
    res = raw_request(lab, b"GET %s HTTP/1.0\r\nHost: x\r\n%s\r\n" % (target.encode(), ask),
                      addr=PROXY, port=port, idle=5.0)
    resp = res.response()
    assert resp.status == 200, res.data[:300]
    assert res.data[resp.head_len:] == stream_bytes(BIG)
    assert res.end == "eof", res.end
    assert "close" in _tokens(resp.get("connection")), resp.headers
    got = [r for r in so.requests() if r["target"] == target]
    assert len(got) == 1 and got[0]["version"] == "HTTP/1.0", got
    line = procs[port].access_line(f" GET {target} ")
    assert (" spliced " if port == SPLICED else " copied ") in line, line


@pytest.mark.parametrize("port", [SPLICED, COPIED])
def test_bodyless_responses_stay_bodyless(env, port):
    """HEAD (also of a body large enough to splice), 204 and 304 (one with a
    Content-Length) have no body: pipelined on one connection, each response starts
    right where the head before it ended, and the connection stays open after them."""
    lab, _so, _ngx, _procs = env
    reqs = [("HEAD", f"/len/{BIG}", 200), ("GET", "/204", 204), ("GET", "/304?cl=5", 304),
            ("HEAD", "/head-only/70000", 200), ("GET", "/len/10", 200)]
    raw = b"".join(f"{m} {t} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for m, t, _ in reqs)
    res = raw_request(lab, raw, addr=PROXY, port=port, idle=1.5)
    pos = 0
    for method, target, status in reqs:
        resp = parse_response(res.data, pos)
        assert resp.status == status, (target, res.data[pos:pos + 200])
        pos += resp.head_len
    assert resp.get("content-length") == "10"
    assert res.data[pos:] == stream_bytes(10), res.data[pos - 50:]
    assert res.end == "idle", res.end       # kept alive: the proxy did not close it


@pytest.mark.parametrize("port", [SPLICED, COPIED])
@pytest.mark.parametrize("size", [1000, BIG])
def test_response_hop_by_hop_fields_removed_and_via_added(env, port, size):
    """A response's Connection and the fields it names, Keep-Alive, Proxy-Connection,
    Trailer and Upgrade (not upgrading) stay with the hop they came on; other fields
    pass; Via names the proxy.  Spliced bodies get the same head treatment."""
    lab, _so, _ngx, procs = env
    fields = ["Connection: keep-alive, X-Hop", "X-Hop: 1", "Keep-Alive: timeout=5",
              "Proxy-Connection: keep-alive", "Trailer: X-Sum", "Upgrade: h2c", "X-Keep: yes"]
    target = f"/len/{size}?hop={port}&" + "&".join("hdr=" + quote(f) for f in fields)
    res = raw_request(lab, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), addr=PROXY, port=port, idle=1.5)
    resp = res.response()
    assert resp.status == 200, res.data[:300]
    names = {n.lower() for n, _ in resp.headers}
    assert not names & {"x-hop", "keep-alive", "proxy-connection", "trailer", "upgrade"}, resp.headers
    assert resp.get("x-keep") == "yes"
    assert resp.get("via", "").endswith("nfsplice"), resp.headers
    assert not _tokens(resp.get("connection")) - {"close", "keep-alive"}, resp.headers
    assert res.data[resp.head_len:] == stream_bytes(size)
    if port == SPLICED and size == BIG:
        line = procs[port].access_line(f" GET {target} ")
        assert " spliced " in line or " copied " in line, line   # (copied if it came whole first)


@pytest.mark.parametrize("port", [SPLICED, COPIED])
def test_close_delimited_response_says_close(env, port):
    """A body that ends at the origin's FIN ends the client connection too, and the
    forwarded head says so (Connection: close), spliced or copied."""
    lab, _so, _ngx, procs = env
    target = f"/close/{BIG}?say={port}"
    res = raw_request(lab, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), addr=PROXY, port=port, idle=5.0)
    resp = res.response()
    assert resp.status == 200 and "close" in _tokens(resp.get("connection")), resp.headers
    assert res.data[resp.head_len:] == stream_bytes(BIG)
    assert res.end == "eof", res.end
    line = procs[port].access_line(f" GET {target} ")
    assert (" spliced " if port == SPLICED else " copied ") in line, line


@pytest.mark.parametrize("port", [SPLICED, COPIED])
@pytest.mark.parametrize("size", [1000, BIG])
def test_origin_closing_after_a_copied_response_keeps_the_client(env, port, size):
    """An origin that answers Connection: close ends its own hop: a copied response goes
    to the client without it and the client's next (pipelined) request is answered on
    the same connection, from a new upstream connection.  A spliced one passes the
    close on: the client is told, and its pipelined request is not answered there."""
    lab, _so, _ngx, _procs = env
    first = f"GET /len/{size}?oc={port}&hdr={quote('Connection: close')} HTTP/1.1\r\nHost: x\r\n\r\n"
    second = f"GET /len/700?after-oc={port}-{size} HTTP/1.1\r\nHost: x\r\n\r\n"
    res = raw_request(lab, (first + second).encode(), addr=PROXY, port=port, idle=1.5)
    resp = res.response()
    assert resp.status == 200, res.data[:300]
    end = resp.head_len + size
    assert res.data[resp.head_len:end] == stream_bytes(size)
    if port == SPLICED and size == BIG:
        # (The connection then ends when one side closes: this origin does not.)
        assert "close" in _tokens(resp.get("connection")) and len(res.data) == end, res.data[end:][:300]
        return
    assert "close" not in _tokens(resp.get("connection")), resp.headers
    nxt = parse_response(res.data, end)
    assert nxt.status == 200 and res.data[end + nxt.head_len:] == stream_bytes(700), res.data[end:][:300]
    assert res.end == "idle", res.end
