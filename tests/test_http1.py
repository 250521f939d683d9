"""nfsplice.proxy.http1: strict HTTP/1.1 heads, framing and chunked bodies, no I/O."""
from __future__ import annotations

import email.utils

import pytest
from hypothesis import given, settings, strategies as st

from nfsplice.proxy.http1 import (
    ChunkedScanner, HTTPError, Limits, PeerError, Request, Response, UpstreamError,
    error_response, expects_continue, forwarding_head, is_upgrade, keep_alive,
    parse_request_head, parse_response_head,
)

REQ_START = b"GET / HTTP/1.1\r\nHost: a\r\n"
RESP_START = b"HTTP/1.1 200 OK\r\n"


def req(head: bytes) -> Request:
    r = parse_request_head(head)
    assert r is not None, "head incomplete"
    assert r[1] == len(head)
    return r[0]


def resp(head: bytes, method: str = "GET") -> Response:
    r = parse_response_head(head, method)
    assert r is not None, "head incomplete"
    assert r[1] == len(head)
    return r[0]


def fields(*lines: str) -> bytes:
    return b"".join(line.encode("latin-1") + b"\r\n" for line in lines)


# -- the catalogue: each field-level rule as a request AND as a response ------------------------
# (name, field lines after the start line, status for a request; a response gets 502)

BIG = "v" * 1000
FIELD_CASES = [
    ("cl-and-te", fields("Content-Length: 5", "Transfer-Encoding: chunked"), 400),
    ("te-and-cl", fields("Transfer-Encoding: chunked", "Content-Length: 5"), 400),
    ("chunked-not-last", fields("Transfer-Encoding: chunked, gzip"), 400),
    ("chunked-missing", fields("Transfer-Encoding: gzip"), 400),
    ("chunked-twice-list", fields("Transfer-Encoding: chunked, chunked"), 400),
    ("chunked-twice-lines", fields("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"), 400),
    ("te-unknown-coding", fields("Transfer-Encoding: foo, chunked"), 501),
    ("te-identity", fields("Transfer-Encoding: identity"), 501),
    ("te-parameters", fields("Transfer-Encoding: chunked;q=1"), 400),
    ("te-empty", fields("Transfer-Encoding: "), 400),
    ("te-not-token", fields("Transfer-Encoding: \"chunked\""), 400),
    ("cl-letters", fields("Content-Length: abc"), 400),
    ("cl-plus", fields("Content-Length: +5"), 400),
    ("cl-minus", fields("Content-Length: -1"), 400),
    ("cl-hex", fields("Content-Length: 0x10"), 400),
    ("cl-inner-space", fields("Content-Length: 5 5"), 400),
    ("cl-decimal", fields("Content-Length: 5.0"), 400),
    ("cl-empty", fields("Content-Length: "), 400),
    ("cl-only-commas", fields("Content-Length: , ,"), 400),
    ("cl-unicode-digit", fields("Content-Length: \xb2"), 400),
    ("cl-too-large", fields("Content-Length: %d" % (1 << 63)), 400),
    ("cl-differing-lines", fields("Content-Length: 5", "Content-Length: 6"), 400),
    ("cl-differing-list", fields("Content-Length: 5, 6"), 400),
    ("cr-in-value", fields("X-A: a\rb"), 400),
    ("lf-in-value", b"X-A: a\nb\r\n", 400),
    ("nul-in-value", fields("X-A: a\x00b"), 400),
    ("ctl-in-value", fields("X-A: a\x01b"), 400),
    ("del-in-value", fields("X-A: a\x7fb"), 400),
    ("empty-name", fields(": v"), 400),
    ("no-colon", fields("X-A v"), 400),
    ("name-with-space", fields("X A: v"), 400),
    ("name-with-paren", fields("X(A): v"), 400),
    ("name-non-ascii", fields("X\xe9: v"), 400),
    ("space-before-colon", fields("X-A : v"), 400),
    ("tab-before-colon", fields("X-A\t: v"), 400),
    ("bare-lf-line-end", b"X-A: v\n", 400),
    ("bare-cr-line-end", b"X-A: v\rX-B: w\r\n", 400),
    ("connection-names-cl", fields("Connection: content-length", "Content-Length: 0"), 400),
    ("connection-names-te", fields("Connection: Transfer-Encoding"), 400),
    ("connection-names-host", fields("Connection: host"), 400),
    ("connection-not-token", fields("Connection: a b"), 400),
    ("too-many-fields", fields(*["X-%d: v" % i for i in range(101)]), 431),
    ("head-too-large", fields(*["X-%d: %s" % (i, BIG) for i in range(40)]), 431),
    ("field-line-too-long", fields("X-A: " + "v" * 8200), 431),
]


@pytest.mark.parametrize("extra, status", [c[1:] for c in FIELD_CASES],
                         ids=[c[0] for c in FIELD_CASES])
def test_catalogue_request(extra, status):
    with pytest.raises(HTTPError) as e:
        parse_request_head(REQ_START + extra + b"\r\n")
    assert e.value.status == status, e.value.reason
    assert e.value.close


@pytest.mark.parametrize("extra, status", [c[1:] for c in FIELD_CASES],
                         ids=[c[0] for c in FIELD_CASES])
def test_catalogue_response(extra, status):
    with pytest.raises(UpstreamError) as e:
        parse_response_head(RESP_START + extra + b"\r\n", "GET")
    assert e.value.status == 502 and e.value.close


# Cases that need their own start line: (name, request head, status, response head)
HEAD_CASES = [
    ("te-in-http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
     b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("ws-before-first-field", b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400,
     b"HTTP/1.1 200 OK\r\n X-A: v\r\n\r\n"),
    ("bare-cr-in-start-line", b"GET /\r HTTP/1.1\r\nHost: a\r\n\r\n", 400,
     b"HTTP/1.1 200 O\rK\r\n\r\n"),
    ("bare-lf-after-start-line", b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400,
     b"HTTP/1.1 200 OK\nX-A: v\r\n\r\n"),
    ("nul-in-start-line", b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n", 400,
     b"HTTP/1.1 200 O\x00K\r\n\r\n"),
    ("double-sp", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400,
     b"HTTP/1.1  200 OK\r\n\r\n"),
    ("leading-sp", b" GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400,
     b" HTTP/1.1 200 OK\r\n\r\n"),
    ("tab-separator", b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", 400,
     b"HTTP/1.1\t200 OK\r\n\r\n"),
    ("missing-part", b"GET /\r\nHost: a\r\n\r\n", 400,
     b"HTTP/1.1\r\n\r\n"),
    ("lowercase-version", b"GET / http/1.1\r\nHost: a\r\n\r\n", 400,
     b"http/1.1 200 OK\r\n\r\n"),
    ("version-garbage", b"GET / HTTP/1.1.1\r\nHost: a\r\n\r\n", 400,
     b"HTTP/1.1.1 200 OK\r\n\r\n"),
    ("version-two-digits", b"GET / HTTP/10.0\r\nHost: a\r\n\r\n", 400,
     b"HTTP/10.0 200 OK\r\n\r\n"),
    ("version-2.0", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505,
     b"HTTP/2.0 200 OK\r\n\r\n"),
    ("version-1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505,
     b"HTTP/1.2 200 OK\r\n\r\n"),
    ("version-0.9", b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505,
     b"HTTP/0.9 200 OK\r\n\r\n"),
    ("start-line-too-long", b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414,
     b"HTTP/1.1 200 " + b"a" * 8200 + b"\r\n\r\n"),
]


@pytest.mark.parametrize("head, status", [(c[1], c[2]) for c in HEAD_CASES],
                         ids=[c[0] for c in HEAD_CASES])
def test_start_line_catalogue_request(head, status):
    with pytest.raises(HTTPError) as e:
        parse_request_head(head)
    assert e.value.status == status, e.value.reason


@pytest.mark.parametrize("head", [c[3] for c in HEAD_CASES], ids=[c[0] for c in HEAD_CASES])
def test_start_line_catalogue_response(head):
    with pytest.raises(UpstreamError):
        parse_response_head(head, "GET")


# Request-only rules: Host, request-target forms, CONNECT.
REQUEST_ONLY = [
    ("host-missing-1.1", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("host-doubled", b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
    ("host-doubled-1.0", b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("host-empty", b"GET / HTTP/1.1\r\nHost: \r\n\r\n", 400),
    ("host-list", b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n", 400),
    ("host-space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("host-userinfo", b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400),
    ("host-port-0", b"GET / HTTP/1.1\r\nHost: a:0\r\n\r\n", 400),
    ("host-port-big", b"GET / HTTP/1.1\r\nHost: a:65536\r\n\r\n", 400),
    ("host-port-empty", b"GET / HTTP/1.1\r\nHost: a:\r\n\r\n", 400),
    ("host-bad-ipv6", b"GET / HTTP/1.1\r\nHost: [::g]\r\n\r\n", 400),
    ("host-bad-ipv6-literal", b"GET / HTTP/1.1\r\nHost: [1::2::3]\r\n\r\n", 400),
    ("host-missing-absolute", b"GET http://a/ HTTP/1.1\r\n\r\n", 400),
    ("host-invalid-absolute", b"GET http://a/ HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("method-not-token", b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("target-space", b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("target-fragment", b"GET /a#f HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("target-non-ascii", b"GET /\xe9 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("target-del", b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("asterisk-with-get", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("authority-with-get", b"GET a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("relative-target", b"GET a/b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("absolute-https", b"GET https://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("absolute-userinfo", b"GET http://u:p@a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("absolute-empty-host", b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("absolute-bad-port", b"GET http://a:99999/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("connect-origin-form", b"CONNECT /x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("connect-absolute-form", b"CONNECT http://a:443/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("connect-no-port", b"CONNECT a HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("connect-empty-port", b"CONNECT a: HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("connect-port-0", b"CONNECT a:0 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("connect-port-65536", b"CONNECT a:65536 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("connect-port-letters", b"CONNECT a:https HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("connect-no-host", b"CONNECT :443 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("connect-userinfo", b"CONNECT u@a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("connect-ipv6-unbracketed", b"CONNECT ::1:443 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("connect-asterisk", b"CONNECT * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("connect-with-body", b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n", 400),
    ("connect-with-te", b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: v\r\n  w\r\n\r\n", 400),
    ("obs-fold-tab", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: v\r\n\tw\r\n\r\n", 400),
]


@pytest.mark.parametrize("head, status", [c[1:] for c in REQUEST_ONLY],
                         ids=[c[0] for c in REQUEST_ONLY])
def test_request_only_rules(head, status):
    with pytest.raises(HTTPError) as e:
        parse_request_head(head)
    assert e.value.status == status, e.value.reason


RESPONSE_ONLY = [
    ("status-two-digits", b"HTTP/1.1 20 OK\r\n\r\n", "GET"),
    ("status-four-digits", b"HTTP/1.1 2000 OK\r\n\r\n", "GET"),
    ("status-099", b"HTTP/1.1 099 X\r\n\r\n", "GET"),
    ("status-600", b"HTTP/1.1 600 X\r\n\r\n", "GET"),
    ("status-no-sp", b"HTTP/1.1 200OK\r\n\r\n", "GET"),
    ("leading-empty-line", b"\r\nHTTP/1.1 200 OK\r\n\r\n", "GET"),
    ("101-without-upgrade", b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n", "GET"),
    ("204-with-te", b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n", "GET"),
    ("204-with-length", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", "GET"),
    ("100-with-length", b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\n", "GET"),
    ("head-cl-and-te", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", "HEAD"),
]


@pytest.mark.parametrize("head, method", [c[1:] for c in RESPONSE_ONLY],
                         ids=[c[0] for c in RESPONSE_ONLY])
def test_response_only_rules(head, method):
    with pytest.raises(UpstreamError):
        parse_response_head(head, method)


# -- what is accepted --------------------------------------------------------------------------

def test_request_fields_and_origin_form():
    r = req(b"POST /p?q=1 HTTP/1.1\r\nHost: Example.COM:8080\r\nX-A:  v  \r\n"
            b"Content-Length: 007\r\n\r\n")
    assert (r.method, r.target, r.version, r.form) == ("POST", "/p?q=1", "HTTP/1.1", "origin")
    assert (r.host, r.port, r.authority, r.path) == ("example.com", 8080, "example.com:8080", "/p?q=1")
    assert r.values("x-a") == ["v"]
    assert r.content_length == 7 and not r.chunked


def test_content_length_identical_values_collapse():
    assert req(REQ_START + fields("Content-Length: 5, 5") + b"\r\n").content_length == 5
    assert req(REQ_START + fields("Content-Length: 5", "Content-Length: 05,,5") + b"\r\n").content_length == 5
    assert resp(RESP_START + fields("Content-Length: 3, 3") + b"\r\n").content_length == 3


def test_transfer_codings_case_insensitive():
    r = req(REQ_START + fields("Transfer-Encoding: GZip", "transfer-encoding: Chunked") + b"\r\n")
    assert r.transfer_codings == ("gzip", "chunked")
    assert r.body_framing() == ("chunked",)


def test_absolute_form_host_replaced():
    r = req(b"GET http://Origin.example:81 HTTP/1.1\r\nHost: other\r\n\r\n")
    assert (r.form, r.host, r.port, r.authority, r.path) == ("absolute", "origin.example", 81,
                                                           "origin.example:81", "/")
    r = req(b"GET HTTP://[::1]?x=1 HTTP/1.1\r\nHost: other\r\n\r\n")
    assert (r.host, r.port, r.authority, r.path) == ("::1", None, "[::1]", "/?x=1")


def test_connect_and_options():
    r = req(b"CONNECT Example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert (r.form, r.host, r.port, r.path) == ("authority", "example.com", 443, "example.com:443")
    assert r.body_framing() == ("none",)
    r = req(b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (r.host, r.port, r.authority) == ("2001:db8::1", 8443, "[2001:db8::1]:8443")
    assert req(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n").content_length == 0
    r = req(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (r.form, r.path, r.host) == ("asterisk", "*", "a")


def test_http10_without_host_and_leading_empty_lines():
    head = b"\r\n\r\nGET / HTTP/1.0\r\n\r\n"
    r = req(head)
    assert r.host is None and r.version == "HTTP/1.0"


def test_response_obs_fold_replaced_by_sp():
    r = resp(b"HTTP/1.1 200 OK\r\nX-A: one\r\n  two \r\n\tthree\r\nContent-Length: 0\r\n\r\n")
    assert r.values("X-A") == ["one two three"]


def test_response_status_line_variants():
    assert resp(b"HTTP/1.1 200\r\n\r\n").reason == ""
    assert resp(b"HTTP/1.1 200 \r\n\r\n").reason == ""
    assert resp(b"HTTP/1.0 404 Not \tFound\xe9\r\n\r\n").reason == "Not \tFound\xe9"
    r = resp(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert r.connection == frozenset({"upgrade"})
    assert resp(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n").content_length == 0


def test_connect_2xx_ignores_framing_fields():
    r = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", "CONNECT")
    assert r.content_length is None and not r.chunked
    assert r.body_framing() == ("tunnel",)


def test_obs_text_in_values_kept():
    assert req(REQ_START + b"X-A: caf\xe9\r\n\r\n").values("X-A") == ["caf\xe9"]


# -- incremental parsing -------------------------------------------------------------------------

GOOD_REQUESTS = [
    b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\r\n",
    b"\r\nPOST http://h:8/p HTTP/1.1\r\nHost: z\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
]
GOOD_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.0 404\r\n\r\n",
]


@pytest.mark.parametrize("head", GOOD_REQUESTS)
def test_request_every_split(head):
    body = b"5\r\nhello\r\n0\r\n\r\n"
    full = parse_request_head(head + body)
    assert full is not None and full[1] == len(head)
    for i in range(len(head)):
        assert parse_request_head(head[:i]) is None, i
        assert parse_request_head(memoryview(head)[:i]) is None, i
    assert parse_request_head(memoryview(head + body)) == full


@pytest.mark.parametrize("head", GOOD_RESPONSES)
def test_response_every_split(head):
    full = parse_response_head(head + b"abc", "GET")
    assert full is not None and full[1] == len(head)
    for i in range(len(head)):
        assert parse_response_head(head[:i], "GET") is None, i
    assert parse_response_head(bytearray(head), "GET") == full


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
])
def test_bad_request_every_split(head):
    """Every prefix is either incomplete or the same verdict; the whole head is refused."""
    with pytest.raises(HTTPError) as whole:
        parse_request_head(head)
    for i in range(len(head)):
        try:
            assert parse_request_head(head[:i]) is None
        except HTTPError as e:
            assert e.status == whole.value.status


def test_incomplete_heads_hit_limits_early():
    with pytest.raises(HTTPError) as e:
        parse_request_head(b"GET /" + b"a" * 9000)           # no line end yet
    assert e.value.status == 414
    with pytest.raises(HTTPError) as e:
        parse_request_head(REQ_START + b"X-A: v\r\n" * 5000)  # no CRLFCRLF yet
    assert e.value.status == 431
    with pytest.raises(HTTPError) as e:
        parse_request_head(b"GET / HTTP/1.1\r\nHost: a\nX")   # bare LF, head incomplete
    assert e.value.status == 400
    with pytest.raises(UpstreamError):
        parse_response_head(b"HTTP/1.1 200 OK\r\n" + b"X-A: v\r\n" * 5000, "GET")
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r") is None


def test_limits_configurable():
    small = Limits(max_head_bytes=64, max_fields=2, max_line=20)
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n", small)
    for head, status in [(b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\nY: 2\r\n\r\n", 431),
                         (b"GET /" + b"a" * 20 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
                         (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"1" * 20 + b"\r\n\r\n", 431)]:
        with pytest.raises(HTTPError) as e:
            parse_request_head(head, small)
        assert e.value.status == status
    with pytest.raises(ValueError):
        Limits(max_fields=0)


# -- body framing (RFC 9112 6.3) -------------------------------------------------------------------

REQUEST_FRAMING = [
    ("no-body", "GET / HTTP/1.1", [], ("none",)),
    ("length-0", "POST / HTTP/1.1", ["Content-Length: 0"], ("length", 0)),
    ("length", "POST / HTTP/1.1", ["Content-Length: 10"], ("length", 10)),
    ("chunked", "POST / HTTP/1.1", ["Transfer-Encoding: chunked"], ("chunked",)),
    ("gzip-chunked", "POST / HTTP/1.1", ["Transfer-Encoding: gzip, chunked"], ("chunked",)),
    ("http10-length", "POST / HTTP/1.0", ["Content-Length: 4"], ("length", 4)),
    ("connect", "CONNECT a:443 HTTP/1.1", [], ("none",)),
]


@pytest.mark.parametrize("start, extra, want", [c[1:] for c in REQUEST_FRAMING],
                         ids=[c[0] for c in REQUEST_FRAMING])
def test_request_body_framing(start, extra, want):
    r = req(fields(start, "Host: a", *extra) + b"\r\n")
    assert r.body_framing() == want


RESPONSE_FRAMING = [
    ("head-length", "HEAD", "HTTP/1.1 200 OK", ["Content-Length: 10"], ("none",)),
    ("head-chunked", "HEAD", "HTTP/1.1 200 OK", ["Transfer-Encoding: chunked"], ("none",)),
    ("head-nothing", "HEAD", "HTTP/1.1 200 OK", [], ("none",)),
    ("100", "GET", "HTTP/1.1 100 Continue", [], ("none",)),
    ("103", "GET", "HTTP/1.1 103 Early Hints", ["Link: </s.css>"], ("none",)),
    ("101", "GET", "HTTP/1.1 101 Switching Protocols", ["Upgrade: websocket"], ("tunnel",)),
    ("204", "GET", "HTTP/1.1 204 No Content", [], ("none",)),
    ("304-length", "GET", "HTTP/1.1 304 Not Modified", ["Content-Length: 10"], ("none",)),
    ("304-chunked", "GET", "HTTP/1.1 304 Not Modified", ["Transfer-Encoding: chunked"], ("none",)),
    ("connect-200", "CONNECT", "HTTP/1.1 200 Connection established", [], ("tunnel",)),
    ("connect-204", "CONNECT", "HTTP/1.1 204 OK", [], ("tunnel",)),
    ("connect-200-length", "CONNECT", "HTTP/1.1 200 OK", ["Content-Length: 5"], ("tunnel",)),
    ("connect-407-length", "CONNECT", "HTTP/1.1 407 Auth", ["Content-Length: 5"], ("length", 5)),
    ("connect-502-close", "CONNECT", "HTTP/1.1 502 Bad", [], ("close",)),
    ("chunked", "GET", "HTTP/1.1 200 OK", ["Transfer-Encoding: chunked"], ("chunked",)),
    ("length", "GET", "HTTP/1.1 200 OK", ["Content-Length: 7"], ("length", 7)),
    ("length-0", "POST", "HTTP/1.1 201 Created", ["Content-Length: 0"], ("length", 0)),
    ("close", "GET", "HTTP/1.1 200 OK", [], ("close",)),
    ("http10-close", "GET", "HTTP/1.0 200 OK", [], ("close",)),
    ("http10-length", "GET", "HTTP/1.0 200 OK", ["Content-Length: 2"], ("length", 2)),
    ("404-close", "GET", "HTTP/1.1 404 Not Found", [], ("close",)),
]


@pytest.mark.parametrize("method, start, extra, want", [c[1:] for c in RESPONSE_FRAMING],
                         ids=[c[0] for c in RESPONSE_FRAMING])
def test_response_body_framing(method, start, extra, want):
    r = resp(fields(start, *extra) + b"\r\n", method)
    assert r.body_framing() == want
    assert r.body_framing(method) == want


def test_response_body_framing_other_method():
    r = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "GET")
    assert r.body_framing("HEAD") == ("none",)


# -- ChunkedScanner ------------------------------------------------------------------------------

def scan(body: bytes, *, upstream=False, limits=Limits(), step=None) -> tuple[ChunkedScanner, int]:
    s = ChunkedScanner(upstream=upstream, limits=limits)
    used = 0
    step = step or len(body) or 1
    for i in range(0, len(body), step):
        if s.done:
            break
        used += s.feed(body[i:i + step])
    return s, used


@pytest.mark.parametrize("body", [
    b"0\r\n\r\n",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"A\r\n0123456789\r\n000\r\n\r\n",
    b"a;x=1;y=\"q;\\\"z\"\r\n0123456789\r\n0\r\n\r\n",
    b"5 ;x\r\nhello\r\n0\t; y = z\r\n\r\n",                 # BWS before ";" (RFC 9112 7.1.1)
    b"00000005\r\nhello\r\n0\r\nX-T: 1\r\nY: \r\n\r\n",
    b"4\r\n\r\n\r\n\r\n0\r\n\r\n",                           # CR/LF inside data are data
])
def test_chunked_valid(body):
    for step in (1, 2, 3, None):
        s, used = scan(body + b"NEXT", step=step)
        assert s.done and used == len(body) and s.offset == len(body)


@pytest.mark.parametrize("body", [
    b"+5\r\nhello\r\n0\r\n\r\n",
    b"-5\r\nhello\r\n0\r\n\r\n",
    b"0x5\r\nhello\r\n0\r\n\r\n",
    b" 5\r\nhello\r\n0\r\n\r\n",
    b"5 \r\nhello\r\n0\r\n\r\n",
    b"5\t\r\nhello\r\n0\r\n\r\n",
    b"\r\n0\r\n\r\n",
    b"g\r\n",
    b"5\nhello\r\n0\r\n\r\n",
    b"5\rhello\r\n0\r\n\r\n",
    b"8000000000000000\r\n",                                  # 2**63
    b"10000000000000000000\r\n",
    b"5;\r\nhello\r\n0\r\n\r\n",
    b"5;a=\r\nhello\r\n0\r\n\r\n",
    b"5;a b\r\nhello\r\n0\r\n\r\n",
    b"5;a=\"x\r\nhello\r\n0\r\n\r\n",
    b"5;a\x00\r\nhello\r\n0\r\n\r\n",
    b"5;a\nhello\r\n0\r\n\r\n",
    b"5\r\nhelloX\r\n0\r\n\r\n",
    b"5\r\nhello\n0\r\n\r\n",
    b"5\r\nhello\rX0\r\n\r\n",
    b"5\r\nhello0\r\n\r\n",
    b"0\r\nbad line\r\n\r\n",
    b"0\r\nX : y\r\n\r\n",
    b"0\r\n: y\r\n\r\n",
    b"0\r\nX: a\x00\r\n\r\n",
    b"0\r\nX: y\r\n folded\r\n\r\n",
    b"0\r\nX: y\n\r\n",
    b"0\r\n\rX",
    b"0\r\n\n",
])
@pytest.mark.parametrize("upstream", [False, True], ids=["request", "response"])
def test_chunked_invalid(body, upstream):
    for step in (1, None):
        with pytest.raises(UpstreamError if upstream else HTTPError) as e:
            scan(body, upstream=upstream, step=step)
        assert e.value.status == (502 if upstream else 400)


def test_chunked_limits():
    ok = b"1;" + b"a" * 1023 + b"\r\nx\r\n0\r\n\r\n"        # extension of exactly 1024 bytes
    assert scan(ok)[0].done
    with pytest.raises(HTTPError, match="extension longer"):
        scan(b"1;" + b"a" * 1024 + b"\r\nx\r\n0\r\n\r\n")
    with pytest.raises(HTTPError, match="extension longer"):   # fails before any CRLF comes
        scan(b"1;" + b"a" * 5000)
    limits = Limits(max_fields=2)
    assert scan(b"0\r\nA: 1\r\nB: 2\r\n\r\n", limits=limits)[0].done
    with pytest.raises(HTTPError, match="trailer fields"):
        scan(b"0\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", limits=limits)
    with pytest.raises(HTTPError, match="trailer line or section too large"):
        scan(b"0\r\n" + b"A: " + b"v" * 9000 + b"\r\n\r\n")
    with pytest.raises(HTTPError, match="chunk-size longer"):   # leading zeros are bounded too
        scan(b"0" * 9 + b"5\r\nhello\r\n0\r\n\r\n", limits=Limits(max_line=8))
    big = b"7fffffffffffffff\r\n"                             # 2**63 - 1 is a valid size
    s, used = scan(big)
    assert used == len(big) and s.data_remaining == (1 << 63) - 1


def test_chunked_caller_bugs_are_loud():
    s, _ = scan(b"0\r\n\r\n")
    with pytest.raises(RuntimeError):
        s.feed(b"x")
    s = ChunkedScanner()
    s.feed(b"5\r\nhe")
    with pytest.raises(RuntimeError):
        s.advance(4)
    s.feed(b"llo")
    with pytest.raises(RuntimeError):
        s.advance(1)


def test_chunked_splice_walk():
    """A splicer: feed framing, move data blindly with advance(), stop at the end."""
    body = b"5;e=1\r\nhello\r\n3\r\nabc\r\n0\r\nT: x\r\n\r\n"
    s = ChunkedScanner()
    assert s.data_end is None
    assert s.feed(body[:8]) == 8                              # "5;e=1\r\nh"
    assert s.data_end == 12 and s.data_remaining == 4
    s.advance(4)
    assert s.data_end is None and s.offset == 12
    n = s.feed(body[12:] + b"more")
    assert s.done and 12 + n == len(body)


# hypothesis: random chunked bodies, random splits -----------------------------------------------

_tok = st.text("abcxyzABC019-_!", min_size=1, max_size=6)
_qval = st.text("ab ;=,\t\\\"", max_size=6).map(
    lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"')
_ext = st.tuples(st.sampled_from(["", " ", "\t "]), _tok,
                 st.one_of(st.none(), _tok, _qval)).map(
    lambda e: e[0] + ";" + e[1] + ("" if e[2] is None else "=" + e[2]))
_exts = st.lists(_ext, max_size=3).map("".join)
_chunk = st.tuples(st.binary(min_size=1, max_size=300), _exts,
                   st.sampled_from(["%x", "%X", "00%x"]))
_trailer = st.tuples(_tok, st.text("abc :;\t\"xyz", max_size=10).map(lambda v: v.strip(" \t")))


@st.composite
def chunked_bodies(draw):
    """Returns (body, framing byte positions that must not change, data ranges)."""
    out = bytearray()
    framing: list[int] = []
    ranges: list[tuple[int, int]] = []
    for data, ext, fmt in draw(st.lists(_chunk, max_size=6)):
        framing.append(len(out))                          # first chunk-size digit
        out += ((fmt % len(data)) + ext).encode()
        framing += [len(out), len(out) + 1]               # CRLF after the size line
        out += b"\r\n"
        ranges.append((len(out), len(out) + len(data)))
        out += data
        framing += [len(out), len(out) + 1]               # CRLF after chunk-data
        out += b"\r\n"
    framing.append(len(out))
    out += (draw(st.sampled_from(["0", "000"])) + draw(_exts)).encode()
    framing += [len(out), len(out) + 1]
    out += b"\r\n"
    for name, value in draw(st.lists(_trailer, max_size=3)):
        out += f"{name}: {value}".encode()
        framing += [len(out), len(out) + 1]
        out += b"\r\n"
    framing += [len(out), len(out) + 1]                   # the final CRLF
    out += b"\r\n"
    return bytes(out), framing, ranges


def _splits(draw_cuts, n):
    cuts = sorted(set(c % (n + 1) for c in draw_cuts))
    return [0] + cuts + [n]


@settings(max_examples=150, deadline=None)
@given(chunked_bodies(), st.lists(st.integers(0, 10 ** 6), max_size=12), st.booleans())
def test_chunked_random_splits_end_exactly(sample, cuts, upstream):
    body, _, _ = sample
    stream = body + b"GET / HTTP/1.1\r\n"                 # the next message follows
    bounds = _splits(cuts, len(stream))
    s = ChunkedScanner(upstream=upstream)
    used = 0
    for a, b in zip(bounds, bounds[1:]):
        if s.done:
            break
        n = s.feed(stream[a:b])
        assert 0 <= n <= b - a
        if not s.done:
            assert n == b - a
        used += n
    assert s.done and used == len(body) == s.offset


@settings(max_examples=100, deadline=None)
@given(chunked_bodies())
def test_chunked_data_end_is_the_true_chunk_end(sample):
    body, _, ranges = sample
    s = ChunkedScanner()
    seen = []
    for i in range(len(body)):
        if s.data_end is not None:
            seen.append((s.offset, s.data_end))
            assert any(lo <= s.offset < hi and s.data_end == hi for lo, hi in ranges)
        s.feed(body[i:i + 1])
    assert s.done
    assert {hi for _, hi in seen} == {hi for _, hi in ranges}


@settings(max_examples=100, deadline=None)
@given(chunked_bodies(), st.integers(0, 10 ** 6))
def test_chunked_splicer_with_advance(sample, seed):
    """Data bytes moved blindly (advance) and framing fed: same end as feeding all."""
    body, _, _ = sample
    s = ChunkedScanner()
    pos = 0
    step = seed % 7 + 1
    while not s.done:
        if s.data_remaining:
            k = min(s.data_remaining, step)
            s.advance(k)
            pos += k
        else:
            pos += s.feed(body[pos:pos + step])
        assert pos == s.offset
    assert pos == len(body)


@settings(max_examples=150, deadline=None)
@given(chunked_bodies(), st.integers(0, 10 ** 6), st.booleans(), st.integers(1, 5))
def test_chunked_corrupt_framing_byte_is_an_error(sample, pick, upstream, step):
    body, framing, _ = sample
    at = framing[pick % len(framing)]
    bad = body[:at] + b"X" + body[at + 1:]
    with pytest.raises(UpstreamError if upstream else HTTPError):
        scan(bad, upstream=upstream, step=step)


# -- forwarding ---------------------------------------------------------------------------------

def lines_of(head: bytes) -> list[str]:
    assert head.endswith(b"\r\n\r\n") and b"\n" not in head.replace(b"\r\n", b"")
    return head[:-4].decode("latin-1").split("\r\n")


def test_forward_drops_hop_by_hop_and_named_fields():
    r = req(fields("GET /x HTTP/1.1", "Host: a", "Connection: keep-alive, X-Foo, x-baz",
                   "X-Foo: 1", "Keep-Alive: timeout=5", "Proxy-Connection: keep-alive",
                   "TE: trailers", "Trailer: X-T", "Upgrade: websocket", "X-Bar: 2",
                   "X-Baz: 3") + b"\r\n")
    out = lines_of(forwarding_head(r, via="nfsplice"))
    assert out == ["GET /x HTTP/1.1", "Host: a", "X-Bar: 2", "Via: 1.1 nfsplice"]
    out = lines_of(forwarding_head(r, via="nfsplice", close=True))
    assert out[-2:] == ["Connection: close", "Via: 1.1 nfsplice"]


def test_forward_upgrade_only_when_allowed():
    head = fields("GET /chat HTTP/1.1", "Host: a", "Connection: Upgrade, X-Foo", "X-Foo: 1",
                  "Upgrade: websocket", "Sec-WebSocket-Key: k") + b"\r\n"
    r = req(head)
    assert is_upgrade(r)
    out = lines_of(forwarding_head(r, via="p", upgrade_allowed=True))
    assert out == ["GET /chat HTTP/1.1", "Host: a", "Upgrade: websocket", "Sec-WebSocket-Key: k",
                   "Connection: upgrade", "Via: 1.1 p"]
    out = lines_of(forwarding_head(r, via="p", upgrade_allowed=False))
    assert "Upgrade: websocket" not in out and "Connection: upgrade" not in out
    r101 = resp(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
                b"Sec-WebSocket-Accept: x\r\n\r\n")
    assert lines_of(forwarding_head(r101, via="p", upgrade_allowed=True)) == [
        "HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Sec-WebSocket-Accept: x",
        "Connection: upgrade", "Via: 1.1 p"]


def test_forward_absolute_form_to_origin_form_with_host():
    r = req(b"POST http://Origin.example:8080?q=1 HTTP/1.1\r\nX-A: 1\r\nHost: evil\r\n"
            b"Content-Length: 3, 3\r\nContent-Length: 3\r\n\r\n")
    out = lines_of(forwarding_head(r, via="nfsplice"))
    assert out == ["POST /?q=1 HTTP/1.1", "Host: origin.example:8080", "X-A: 1",
                   "Content-Length: 3", "Via: 1.1 nfsplice"]


def test_forward_via_appended_and_version_kept():
    r = req(b"GET / HTTP/1.0\r\nVia: 1.1 other\r\nConnection: keep-alive\r\n\r\n")
    out = lines_of(forwarding_head(r, via="nfsplice:3128"))
    assert out == ["GET / HTTP/1.0", "Via: 1.1 other", "Via: 1.0 nfsplice:3128"]
    with pytest.raises(ValueError):
        forwarding_head(r, via="bad via\r\nX: y")


def test_forward_x_forwarded_for_reverse_only():
    r = req(REQ_START + fields("X-Forwarded-For: 1.1.1.1", "X-A: 1", "x-forwarded-for: 2.2.2.2, 3.3.3.3") + b"\r\n")
    out = lines_of(forwarding_head(r, via="p", client_addr="2001:db8::7", reverse=True))
    assert out[-1] == "X-Forwarded-For: 1.1.1.1, 2.2.2.2, 3.3.3.3, 2001:db8::7"
    assert out.count("X-A: 1") == 1 and sum("orwarded" in x for x in out) == 1
    out = lines_of(forwarding_head(req(REQ_START + b"\r\n"), via="p", client_addr="10.0.0.1",
                                   reverse=True))
    assert out == ["GET / HTTP/1.1", "Host: a", "Via: 1.1 p", "X-Forwarded-For: 10.0.0.1"]
    out = lines_of(forwarding_head(r, via="p", client_addr="10.0.0.1", reverse=False))
    assert "X-Forwarded-For: 1.1.1.1" in out and not any("10.0.0.1" in x for x in out)
    with pytest.raises(ValueError):
        forwarding_head(r, via="p", reverse=True)
    with pytest.raises(ValueError):
        forwarding_head(r, via="p", client_addr="not-an-address", reverse=True)


def test_forward_response_keeps_chunked_and_unfolds():
    r = resp(b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nTransfer-Encoding: chunked\r\n"
             b"Keep-Alive: 5\r\nConnection: keep-alive\r\n\r\n")
    out = lines_of(forwarding_head(r, via="p", client_addr="10.0.0.1", reverse=True))
    assert out == ["HTTP/1.1 200 OK", "X-A: a b", "Transfer-Encoding: chunked", "Via: 1.1 p"]
    r = resp(b"HTTP/1.0 404\r\nContent-Length: 0\r\n\r\n")
    assert lines_of(forwarding_head(r, via="p")) == ["HTTP/1.1 404 ", "Content-Length: 0", "Via: 1.0 p"]


def test_forward_connect_2xx_drops_framing_fields():
    r = resp(b"HTTP/1.1 200 Connection established\r\nContent-Length: 0\r\n"
             b"Transfer-Encoding: chunked\r\nX-A: 1\r\n\r\n", "CONNECT")
    assert lines_of(forwarding_head(r, via="p")) == [
        "HTTP/1.1 200 Connection established", "X-A: 1", "Via: 1.1 p"]


@pytest.mark.parametrize("head", GOOD_REQUESTS[:2] + [
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: x\r\nX: 1\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nProxy-Connection: keep-alive\r\n\r\n",
])
def test_forwarded_request_reparses(head):
    r = req(head)
    out = forwarding_head(r, via="p", client_addr="10.0.0.1", reverse=True)
    again = req(out)
    assert again.body_framing() == r.body_framing()
    assert (again.method, again.host, again.port, again.path) == (r.method, r.host, r.port, r.path)


# -- connection semantics -----------------------------------------------------------------------

@pytest.mark.parametrize("head, want", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x, close\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", False),   # a proxy: never (RFC 9112 9.3)
], ids=["1.1", "1.1-close", "1.1-close-in-list", "1.0", "1.0-keep-alive"])
def test_keep_alive_request(head, want):
    assert keep_alive(req(head)) is want


@pytest.mark.parametrize("head, method, want", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "GET", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", "GET", False),
    (b"HTTP/1.1 200 OK\r\n\r\n", "GET", False),
    (b"HTTP/1.1 200 OK\r\n\r\n", "HEAD", True),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", "GET", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: Keep-Alive\r\n\r\n", "GET", True),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n", "GET", False),
    (b"HTTP/1.0 304 Not Modified\r\nConnection: keep-alive\r\n\r\n", "GET", True),
    (b"HTTP/1.1 101 Switching\r\nUpgrade: h2c\r\n\r\n", "GET", False),
    (b"HTTP/1.1 200 OK\r\n\r\n", "CONNECT", False),
], ids=["1.1", "1.1-close", "1.1-until-close", "1.1-head", "1.0", "1.0-keep-alive",
        "1.0-keep-alive-until-close", "1.0-keep-alive-304", "101", "connect-200"])
def test_keep_alive_response(head, method, want):
    assert keep_alive(resp(head, method)) is want


def test_expects_continue():
    assert expects_continue(req(REQ_START + b"Expect: 100-Continue\r\nContent-Length: 1\r\n\r\n"))
    assert not expects_continue(req(REQ_START + b"\r\n"))
    assert not expects_continue(req(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n"))


def test_is_upgrade():
    assert not is_upgrade(req(REQ_START + b"Upgrade: websocket\r\n\r\n"))
    assert not is_upgrade(req(b"GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"))
    assert not is_upgrade(req(REQ_START + b"Connection: upgrade\r\n\r\n"))
    assert is_upgrade(req(REQ_START + b"Upgrade: h2c\r\nConnection: HTTP2-Settings, Upgrade\r\n\r\n"))


# -- error responses ----------------------------------------------------------------------------

def test_error_response():
    raw = error_response(400, "Content-Length together with Transfer-Encoding", now=0)
    r, n = parse_response_head(raw, "GET")
    body = raw[n:]
    assert (r.status, r.reason) == (400, "Bad Request")
    assert r.content_length == len(body) and body.endswith(b"\n")
    assert r.values("Connection") == ["close"] and not keep_alive(r)
    assert email.utils.parsedate_to_datetime(r.values("Date")[0]).timestamp() == 0
    head = error_response(502, "upstream: bad", head_only=True)
    r, n = parse_response_head(head, "HEAD")
    assert n == len(head) and r.content_length == len("upstream: bad\n")
    with pytest.raises(ValueError):
        error_response(299, "x")


def test_errors_say_whose_fault():
    assert issubclass(HTTPError, PeerError) and issubclass(UpstreamError, PeerError)
    e = HTTPError(400, "x")
    assert (e.status, e.reason, e.close) == (400, "x", True)
    e = UpstreamError("y")
    assert (e.status, e.reason, e.close) == (502, "y", True)
