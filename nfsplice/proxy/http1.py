"""HTTP/1.1 message heads and chunked framing, without I/O (RFC 9112, RFC 9110).

The proxy reads bytes, hands them here and gets back a parsed head, a framing decision
or a verdict; this module never touches a socket.  Whose fault an error is:

  * `HTTPError(status, reason)`: the client sent a bad request; answer `status` and
    close (`error_response`).  400 for a malformed message, 501 for an unknown transfer
    coding, 505 for another HTTP version, 414 / 431 for limits.
  * `UpstreamError(reason)`: the upstream sent a bad response; answer 502 and close.
  * anything else (RuntimeError, ValueError, TypeError): our bug or a bad
    configuration value; let it be loud.

Why a hand-written parser and not h11 or httptools (llhttp): the point of this layer is
a short list of strictness rules, each with its own status and reason, and a chunked
scanner that counts body bytes the splicer moves without reading them.  h11 owns the
connection state machine and hands bodies over as Data events (every byte through
Python), accepts obs-fold in requests and has no separate 501/505/414 verdicts;
llhttp's callbacks also deliver the body and its lenient/strict switches are C build
flags.  The whole head grammar here is a few regular expressions and one function per
rule, which a reader can check against the RFC sections cited next to them.

Decisions where the RFCs leave a choice (RFC 9112 unless said otherwise):

  * Line ends are CRLF only; a bare CR or bare LF anywhere in the head is an error
    (2.2 allows a lone LF; we do not).  Empty lines before a request line are skipped
    (2.2); before a status line they are an error.
  * Content-Length: several field lines or a list are accepted only if every value is
    the same ("5, 5" -> 5; 6.3 point 5); the forwarded head carries one value.
    Empty list elements are ignored (RFC 9110 5.6.1); values must be below 2**63.
  * Transfer-Encoding must end in chunked, exactly once, in requests AND responses
    (6.3 would let a response without final chunked be read until close; we refuse
    it), only HTTP/1.1, never with Content-Length, codings without parameters.
    Known codings: chunked, gzip, x-gzip, deflate, compress, x-compress; any other is
    501 (request) or 502 (response).  A CONNECT request carries no body: any
    Transfer-Encoding or a non-zero Content-Length is 400.  1xx and 204 responses
    must not carry Transfer-Encoding or a non-zero Content-Length (RFC 9110 8.6,
    6.1); in a 2xx answer to CONNECT both are ignored (RFC 9110 9.3.6) and dropped
    when forwarding.
  * Field values: CR, LF, NUL and every other CTL except HTAB are errors (RFC 9110
    5.5 allows keeping other CTLs; we do not).  Field names are tokens; whitespace
    before the colon is an error (5.1).
  * obs-fold: a request is rejected (5.2); in a response each fold is replaced by one
    SP (5.2 allows this for a proxy) because the head is re-serialised anyway.  A
    whitespace-started first field line is an error in both (2.2).  In trailers a fold
    is an error in both directions: the trailer section is spliced verbatim.
  * Host: required and single in HTTP/1.1 requests, single and valid in any request,
    never empty (3.2).  With an absolute-form target the received Host is ignored and
    replaced by the target's authority (3.2.2), never compared.  userinfo in an
    absolute-form target is an error (RFC 9110 4.2.4); ports are 1..65535.
  * Request line: exactly `token SP target SP HTTP/d.d`; the target is visible ASCII
    without '#'.  HTTP/1.0 and HTTP/1.1 only; another HTTP/x.y is 505 (RFC 9110 6.2
    would treat 1.2 as 1.1).  Forms: origin-form "/..."; absolute-form with the http
    scheme only; authority-form host:port exactly for CONNECT; "*" only for OPTIONS.
  * Status line: `HTTP/1.x SP 3DIGIT [SP reason]`, code 100..599; a missing SP before
    an empty reason is accepted (the reason carries no meaning).  A 101 must name
    Upgrade (RFC 9110 15.2.2).
  * Connection may not name Content-Length, Transfer-Encoding or Host: dropping them
    as hop-by-hop would change framing or routing downstream.

Forwarding (`forwarding_head`) keeps field order and name case, removes hop-by-hop
fields, and keeps the body framing as received (chunked stays chunked).  A request is
forwarded with the client's version: a 1.0 request stays 1.0, so the origin will not
answer chunked, which a 1.0 client cannot read and which we do not re-frame (RFC 9110
6.2 allows this purposeful downgrade).  A response is forwarded as HTTP/1.1.
"""
from __future__ import annotations

import email.utils
import ipaddress
import re
from dataclasses import dataclass
from http import HTTPStatus

__all__ = [
    "Limits", "DEFAULT_LIMITS", "PeerError", "HTTPError", "UpstreamError",
    "Request", "Response", "parse_request_head", "parse_response_head",
    "ChunkedScanner", "forwarding_head", "keep_alive", "expects_continue",
    "is_upgrade", "error_response", "MAX_LENGTH",
]

# Largest Content-Length or chunk-size we accept: what fits a signed 64-bit off_t.
MAX_LENGTH = (1 << 63) - 1


@dataclass(frozen=True)
class Limits:
    max_head_bytes: int = 32 * 1024   # whole head incl. start line and final CRLFCRLF -> 431
    max_fields: int = 100             # field lines in a head or a trailer section -> 431
    max_chunk_ext: int = 1024         # bytes after the chunk-size digits, before CRLF
    max_line: int = 8 * 1024          # request line (-> 414), field line (-> 431), chunk-size line

    def __post_init__(self):
        for name in ("max_head_bytes", "max_fields", "max_chunk_ext", "max_line"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)}")


DEFAULT_LIMITS = Limits()


# -- errors: whose fault -----------------------------------------------------------------

class PeerError(Exception):
    """The peer sent something we refuse.  `status` is what we answer downstream."""
    status: int
    reason: str
    close: bool


class HTTPError(PeerError):
    """A bad request from the client: answer `status` (`error_response`) and close."""

    def __init__(self, status: int, reason: str, close: bool = True):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.close = close


class UpstreamError(PeerError):
    """A bad response from the upstream: answer 502 to the client and close both."""

    def __init__(self, reason: str):
        super().__init__(f"upstream: {reason}")
        self.status = 502
        self.reason = reason
        self.close = True


def _error(upstream: bool, status: int, reason: str) -> PeerError:
    return UpstreamError(reason) if upstream else HTTPError(status, reason)


def _show(b: bytes | str, n: int = 40) -> str:
    """A peer's bytes, quoted and cut, for an error reason."""
    if isinstance(b, str):
        b = b.encode("latin-1")
    return repr(b[:n]) + ("..." if len(b) > n else "")


# -- grammar (RFC 9110 5.6.2, 5.5; RFC 9112 2.2, 3, 4, 5, 7.1) -------------------------------

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN = re.compile(rb"[%s]+" % _TCHAR)
_TOKEN_S = re.compile(r"[%s]+" % _TCHAR.decode())
# field-value after trimming OWS: field-vchar / SP / HTAB (no CTL but HTAB)
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_BARE_CR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_HTTP_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_TARGET = re.compile(rb"[\x21-\x7e]+")       # VCHAR; '#' checked apart
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?]*)(.*)", re.S)
# authority = host [":" port]; host = IP-literal / reg-name (no userinfo, no IPvFuture)
_AUTHORITY = re.compile(
    r"(\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+)(?::([0-9]*))?")
_STATUS_LINE = re.compile(rb"(HTTP/[0-9]\.[0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_DIGITS = re.compile(r"[0-9]+")
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )   (7.1.1)
_CHUNK_EXT = re.compile(
    rb"(?:[ \t]*;[ \t]*[%s]+(?:[ \t]*=[ \t]*(?:[%s]+|%s))?)+" % (_TCHAR, _TCHAR, _QUOTED))

_KNOWN_CODINGS = frozenset({"chunked", "gzip", "x-gzip", "deflate", "compress", "x-compress"})
# RFC 9110 7.6.1 plus the brief's list; Transfer-Encoding stays (we never re-frame).
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"})
# Connection may not name these: dropping them would change framing or routing.
_NOT_CONNECTION_OPTIONS = frozenset({"content-length", "transfer-encoding", "host"})


# -- messages ------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class _Message:
    version: str                          # "HTTP/1.0" or "HTTP/1.1"
    fields: tuple[tuple[str, str], ...]   # (name as received, value without OWS), in order
    content_length: int | None            # the one value, if framing by length
    transfer_codings: tuple[str, ...]     # lowercased; non-empty means chunked is last
    connection: frozenset[str]            # Connection options, lowercased

    @property
    def chunked(self) -> bool:
        return bool(self.transfer_codings)

    def values(self, name: str) -> list[str]:
        """Every value of field `name` (case-insensitive), in received order."""
        name = name.lower()
        return [v for n, v in self.fields if n.lower() == name]


@dataclass(frozen=True, kw_only=True)
class Request(_Message):
    method: str
    target: str            # as received
    form: str              # "origin" | "absolute" | "authority" | "asterisk"
    host: str | None       # effective host, lowercased, IPv6 without brackets; None: no Host (1.0)
    port: int | None       # explicit port of the effective authority, else None
    authority: str | None  # effective authority as a Host value ("[::1]:8080")
    path: str              # target to send upstream: origin-form, "*" or the CONNECT authority

    def body_framing(self) -> tuple:
        """RFC 9112 6.3 for a request: ("chunked",), ("length", n) or ("none",)."""
        if self.chunked:
            return ("chunked",)
        if self.content_length is not None:
            return ("length", self.content_length)
        return ("none",)


@dataclass(frozen=True, kw_only=True)
class Response(_Message):
    status: int
    reason: str
    request_method: str

    def body_framing(self, request_method: str | None = None) -> tuple:
        """RFC 9112 6.3 for a response to `request_method` (default: the one parsed with).

        ("none",) HEAD request, 1xx but 101, 204, 304 (point 1);
        ("tunnel",) 101 Switching Protocols, and 2xx to CONNECT (point 2): from here on
            both directions are raw bytes; the proxy must have checked that it asked for
            this (`is_upgrade` and its policy; CONNECT it sent itself);
        ("chunked",) Transfer-Encoding (points 3, 4: chunked is last, checked at parse);
        ("length", n) Content-Length (point 6);
        ("close",) none of these: the body runs until the upstream closes (point 8).
        """
        method = self.request_method if request_method is None else request_method
        if self.status == 101:
            return ("tunnel",)
        if method == "CONNECT" and 200 <= self.status < 300:
            return ("tunnel",)
        if method == "HEAD" or self.status < 200 or self.status in (204, 304):
            return ("none",)
        if self.chunked:
            return ("chunked",)
        if self.content_length is not None:
            return ("length", self.content_length)
        return ("close",)


# -- head parsing --------------------------------------------------------------------------

def parse_request_head(buf: bytes | bytearray | memoryview,
                       limits: Limits = DEFAULT_LIMITS) -> tuple[Request, int] | None:
    """Parse a request head at the start of `buf`.

    Returns (Request, consumed) where `consumed` counts the head including its final
    CRLFCRLF (and empty lines skipped before the request line); the body starts there.
    Returns None if the head is not complete yet and no rule is broken so far; the
    caller reads more and calls again with the whole buffer.  Raises HTTPError.
    """
    split = _split_head(buf, limits, upstream=False)
    if split is None:
        return None
    start, lines, consumed = split
    method, target, version = _request_line(start)
    fields = _fields(lines, limits, upstream=False)
    connection = _connection_options(fields, upstream=False)
    form, host, port, authority, path = _request_target(method, target)
    hosts = [v for n, v in fields if n.lower() == "host"]
    if len(hosts) > 1:
        raise HTTPError(400, f"{len(hosts)} Host fields (RFC 9112 3.2)")
    if not hosts and version == "HTTP/1.1":
        raise HTTPError(400, "HTTP/1.1 request without Host (RFC 9112 3.2)")
    if hosts:
        h, p, a = _authority(hosts[0], upstream=False, what="Host", port_required=False)
        if form in ("origin", "asterisk"):
            host, port, authority = h, p, a
        # absolute-form / authority-form: the target's authority wins (RFC 9112 3.2.2)
    content_length, codings = _framing(fields, version, upstream=False)
    if method == "CONNECT" and (codings or content_length):
        raise HTTPError(400, "CONNECT request with a body (RFC 9110 9.3.6)")
    req = Request(version=version, fields=fields, content_length=content_length,
                  transfer_codings=codings, connection=connection, method=method,
                  target=target, form=form, host=host, port=port, authority=authority,
                  path=path)
    return req, consumed


def parse_response_head(buf: bytes | bytearray | memoryview, request_method: str,
                        limits: Limits = DEFAULT_LIMITS) -> tuple[Response, int] | None:
    """Parse a response head (to a request with `request_method`) at the start of `buf`.

    Returns (Response, consumed) or None (incomplete), as `parse_request_head`.
    A 1xx other than 101 is returned like any response: forward it and parse the next
    head.  Raises UpstreamError.
    """
    split = _split_head(buf, limits, upstream=True)
    if split is None:
        return None
    start, lines, consumed = split
    m = _STATUS_LINE.fullmatch(start)
    if not m:
        raise UpstreamError(f"malformed status line {_show(start)} (RFC 9112 4)")
    version = m.group(1).decode()
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise UpstreamError(f"unsupported version {version} in the status line")
    status = int(m.group(2))
    if not 100 <= status <= 599:
        raise UpstreamError(f"status code {status} outside 100..599 (RFC 9110 15)")
    reason = (m.group(3) or b"").decode("latin-1")
    fields = _fields(lines, limits, upstream=True)
    connection = _connection_options(fields, upstream=True)
    if request_method == "CONNECT" and 200 <= status < 300:
        content_length, codings = None, ()   # ignored (RFC 9110 9.3.6), dropped on forwarding
    else:
        content_length, codings = _framing(fields, version, upstream=True)
    if (status < 200 or status == 204) and (codings or content_length):
        raise UpstreamError(f"{status} response with a body length or Transfer-Encoding "
                            "(RFC 9110 8.6, RFC 9112 6.1)")
    if status == 101 and not any(n.lower() == "upgrade" for n, _ in fields):
        raise UpstreamError("101 response without Upgrade (RFC 9110 15.2.2)")
    resp = Response(version=version, fields=fields, content_length=content_length,
                    transfer_codings=codings, connection=connection, status=status,
                    reason=reason, request_method=request_method)
    return resp, consumed


def _split_head(buf, limits: Limits, upstream: bool):
    """Find the head; None if incomplete.  Returns (start line, field lines, consumed).

    Checks what can be checked on an incomplete head too (bare CR/LF, the start line's
    length, the head's size), so a peer cannot make us wait for a head we will refuse.
    """
    window = bytes(buf[:limits.max_head_bytes])
    skip = 0
    if not upstream:   # RFC 9112 2.2: ignore empty lines before the request-line
        while window.startswith(b"\r\n", skip):
            skip += 2
    end = window.find(b"\r\n\r\n", skip)
    if end < 0:
        region = window[skip:-1] if window.endswith(b"\r") else window[skip:]
    else:
        region = window[skip:end + 2]
    first = re.search(rb"[\r\n]", region)
    first_len = first.start() if first else len(region)
    if first_len > limits.max_line:
        raise _error(upstream, 414, f"{'status' if upstream else 'request'} line longer "
                     f"than {limits.max_line} bytes")
    bare = _BARE_CR_LF.search(region)
    if bare:
        what = "CR" if region[bare.start()] == 13 else "LF"
        raise _error(upstream, 400, f"bare {what} at byte {skip + bare.start()} of the head "
                     "(lines end in CRLF, RFC 9112 2.2)")
    if end < 0:
        if len(buf) >= limits.max_head_bytes:
            raise _error(upstream, 431, f"head longer than {limits.max_head_bytes} bytes")
        return None
    lines = window[skip:end].split(b"\r\n")
    return lines[0], lines[1:], end + 4


def _request_line(line: bytes) -> tuple[str, str, str]:
    """request-line = method SP request-target SP HTTP-version (RFC 9112 3)."""
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts):
        raise HTTPError(400, f"malformed request line {_show(line)}: "
                        "expected METHOD SP target SP HTTP-version (RFC 9112 3)")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HTTPError(400, f"method {_show(method)} is not a token (RFC 9110 9.1)")
    if not _TARGET.fullmatch(target):
        raise HTTPError(400, f"request-target {_show(target)} has bytes outside visible ASCII")
    if b"#" in target:
        raise HTTPError(400, f"request-target {_show(target)} has a fragment")
    m = _HTTP_VERSION.fullmatch(version)
    if not m:
        raise HTTPError(400, f"malformed HTTP-version {_show(version)} (RFC 9112 2.3)")
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise HTTPError(505, f"{version.decode()} is not supported (HTTP/1.0 and HTTP/1.1 are)")
    return method.decode(), target.decode(), version.decode()


def _request_target(method: str, target: str):
    """RFC 9112 3.2.  Returns (form, host, port, authority, path)."""
    if method == "CONNECT":   # authority-form, and only that (3.2.3)
        host, port, authority = _authority(target, upstream=False, what="CONNECT target",
                                           port_required=True)
        return "authority", host, port, authority, authority
    if target == "*":
        if method != "OPTIONS":
            raise HTTPError(400, f"asterisk-form target with {method} (only OPTIONS, RFC 9112 3.2.4)")
        return "asterisk", None, None, None, "*"
    if target.startswith("/"):
        return "origin", None, None, None, target
    m = _ABSOLUTE.fullmatch(target)
    if not m:
        raise HTTPError(400, f"request-target {_show(target)} is neither origin-form, "
                        "absolute-form nor asterisk-form (RFC 9112 3.2)")
    scheme, auth, rest = m.groups()
    if scheme.lower() != "http":
        raise HTTPError(400, f"absolute-form with scheme {scheme!r}: only http:// is proxied")
    if "@" in auth:
        raise HTTPError(400, "userinfo in the request-target (RFC 9110 4.2.4)")
    host, port, authority = _authority(auth, upstream=False, what="request-target authority",
                                       port_required=False)
    path = rest if rest.startswith("/") else "/" + rest   # "" -> "/", "?q" -> "/?q"
    return "absolute", host, port, authority, path


def _authority(text: str, *, upstream: bool, what: str, port_required: bool):
    """uri-host [":" port] (RFC 9110 4.2.3, 7.2).  Returns (host, port, authority)."""
    m = _AUTHORITY.fullmatch(text)
    if not m:
        raise _error(upstream, 400, f"{what} {_show(text)} is not host[:port]")
    host, port_s = m.groups()
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _error(upstream, 400, f"{what} {_show(text)}: bad IPv6 literal") from None
        host = host[1:-1]
    port = None
    if port_s is not None:
        if not port_s or len(port_s) > 5 or not 1 <= int(port_s) <= 65535:
            raise _error(upstream, 400, f"{what} {_show(text)}: port must be 1..65535")
        port = int(port_s)
    elif port_required:
        raise _error(upstream, 400, f"{what} {_show(text)} has no port (host:port required)")
    host = host.lower()
    authority = ("[%s]" % host if ":" in host else host) + ("" if port is None else f":{port}")
    return host, port, authority


def _fields(lines: list[bytes], limits: Limits, upstream: bool) -> tuple[tuple[str, str], ...]:
    """field-line = field-name ":" OWS field-value OWS (RFC 9112 5), with obs-fold (5.2)."""
    out: list[list[str]] = []
    for line in lines:
        if len(line) > limits.max_line:
            raise _error(upstream, 431, f"field line longer than {limits.max_line} bytes")
        if line[:1] in (b" ", b"\t"):
            if not out:
                raise _error(upstream, 400, "whitespace before the first field line (RFC 9112 2.2)")
            if not upstream:
                raise HTTPError(400, f"obs-fold (line folding) in field {out[-1][0]!r} (RFC 9112 5.2)")
            # response: replace the fold by one SP (RFC 9112 5.2, as a proxy may)
            more = line.strip(b" \t")
            _check_value(more, out[-1][0], upstream)
            out[-1][1] = (out[-1][1] + " " + more.decode("latin-1")).strip(" \t")
            continue
        name, value = _field_line(line, upstream)
        out.append([name, value])
        if len(out) > limits.max_fields:
            raise _error(upstream, 431, f"more than {limits.max_fields} field lines")
    return tuple((n, v) for n, v in out)


def _field_line(line: bytes, upstream: bool) -> tuple[str, str]:
    colon = line.find(b":")
    if colon < 0:
        raise _error(upstream, 400, f"field line {_show(line)} without a colon")
    name = line[:colon]
    if not name:
        raise _error(upstream, 400, f"field line {_show(line)} with an empty name")
    if not _TOKEN.fullmatch(name):
        if name.rstrip(b" \t") != name and _TOKEN.fullmatch(name.rstrip(b" \t")):
            raise _error(upstream, 400, f"whitespace before the colon in field {_show(name)} "
                         "(RFC 9112 5.1)")
        raise _error(upstream, 400, f"field name {_show(name)} is not a token (RFC 9110 5.1)")
    value = line[colon + 1:].strip(b" \t")
    name_s = name.decode()
    _check_value(value, name_s, upstream)
    return name_s, value.decode("latin-1")


def _check_value(value: bytes, name: str, upstream: bool) -> None:
    if not _FIELD_VALUE.fullmatch(value):
        bad = next(b for b in value if b != 9 and (b < 32 or b == 127))
        raise _error(upstream, 400, f"control byte 0x{bad:02x} in the value of field {name!r} "
                     "(RFC 9110 5.5)")


def _list(values: list[str]) -> list[str]:
    """#rule elements of all field lines, OWS trimmed, empty elements dropped (RFC 9110 5.6.1)."""
    return [e.strip(" \t") for v in values for e in v.split(",") if e.strip(" \t")]


def _connection_options(fields, upstream: bool) -> frozenset[str]:
    opts = _list([v for n, v in fields if n.lower() == "connection"])
    for o in opts:
        if not _TOKEN_S.fullmatch(o):
            raise _error(upstream, 400, f"Connection option {_show(o)} is not a token (RFC 9110 7.6.1)")
    opts_l = frozenset(o.lower() for o in opts)
    named = opts_l & _NOT_CONNECTION_OPTIONS
    if named:
        raise _error(upstream, 400, f"Connection names {', '.join(sorted(named))}, which must "
                     "reach the next hop (RFC 9110 7.6.1)")
    return opts_l


def _framing(fields, version: str, upstream: bool) -> tuple[int | None, tuple[str, ...]]:
    """Content-Length and Transfer-Encoding (RFC 9112 6.1, 6.2, 6.3; RFC 9110 8.6)."""
    te = [v for n, v in fields if n.lower() == "transfer-encoding"]
    cl = [v for n, v in fields if n.lower() == "content-length"]
    codings: tuple[str, ...] = ()
    if te:
        if version == "HTTP/1.0":
            raise _error(upstream, 400, "Transfer-Encoding in an HTTP/1.0 message (RFC 9112 6.1)")
        codings = _transfer_codings(te, upstream)
        if cl:
            raise _error(upstream, 400, "Content-Length together with Transfer-Encoding "
                         "(RFC 9112 6.1, 6.3)")
        return None, codings
    if not cl:
        return None, ()
    length = None
    for item in _list(cl) or [""]:
        if not _DIGITS.fullmatch(item):
            raise _error(upstream, 400, f"invalid Content-Length {_show(item)} (RFC 9110 8.6)")
        n = int(item)
        if n > MAX_LENGTH:
            raise _error(upstream, 400, f"Content-Length {item[:30]} too large")
        if length is not None and n != length:
            raise _error(upstream, 400, f"differing Content-Length values {length} and {n} "
                         "(RFC 9112 6.3)")
        length = n
    return length, ()


def _transfer_codings(values: list[str], upstream: bool) -> tuple[str, ...]:
    codings = []
    for item in _list(values):
        if not _TOKEN_S.fullmatch(item):
            raise _error(upstream, 400, f"transfer-coding {_show(item)} is not a plain token "
                         "(parameters are not accepted)")
        c = item.lower()
        if c not in _KNOWN_CODINGS:
            raise _error(upstream, 501, f"unknown transfer-coding {item!r} (RFC 9112 6.1)")
        codings.append(c)
    if not codings:
        raise _error(upstream, 400, "empty Transfer-Encoding")
    if codings.count("chunked") > 1:
        raise _error(upstream, 400, "chunked applied more than once (RFC 9112 6.1)")
    if codings[-1] != "chunked":
        raise _error(upstream, 400, "Transfer-Encoding without chunked as the final coding "
                     "(RFC 9112 6.3)")
    return tuple(codings)


# -- chunked body (RFC 9112 7.1) -------------------------------------------------------------

class ChunkedScanner:
    """Walks the chunked framing of one message body without keeping its data.

    chunked-body = *chunk last-chunk trailer-section CRLF
    chunk        = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
    last-chunk   = 1*("0") [ chunk-ext ] CRLF

    `feed(data)` takes the next bytes of the body (any split) and returns how many of
    them belong to the message; fewer than len(data) only when the message ended
    inside `data` (`done` is then True and the rest is the next message's).
    While the scanner is inside chunk-data, `data_end` is the body offset where that
    data ends: a splicer may move `data_remaining` bytes without reading them, then
    call `advance(n)` for what it moved, and must feed everything else.  `offset` is
    the number of body bytes accounted for so far.  Only the chunk-size line (bounded
    by max_line and max_chunk_ext) and one trailer line are ever held.

    Errors are the peer's: HTTPError(400) for a request body, UpstreamError for a
    response body (`upstream=True`).  Feeding after `done`, or advancing outside
    chunk-data, is the caller's bug (RuntimeError).
    """

    # states (each names what the next byte must be)
    SIZE_FIRST = "size-first"   # first HEXDIG of chunk-size
    SIZE = "size"               # HEXDIG, or BWS/";" (ext), or CR
    EXT = "ext"                 # chunk-ext bytes up to CR
    SIZE_LF = "size-lf"         # LF ending the chunk-size line
    DATA = "data"               # chunk-data, `_remaining` bytes
    DATA_CR = "data-cr"         # CR after chunk-data
    DATA_LF = "data-lf"         # LF after chunk-data
    TRAILER = "trailer"         # a trailer field line (or the final empty line) up to CR
    TRAILER_LF = "trailer-lf"   # LF ending that line
    DONE = "done"

    def __init__(self, *, upstream: bool = False, limits: Limits = DEFAULT_LIMITS):
        self.upstream = upstream
        self.limits = limits
        self.offset = 0
        self.state = self.SIZE_FIRST
        self._size = 0
        self._digits = 0
        self._line = bytearray()      # chunk-ext or trailer line being read
        self._remaining = 0
        self._trailer_bytes = 0
        self._trailer_fields = 0

    @property
    def done(self) -> bool:
        return self.state is self.DONE

    @property
    def data_remaining(self) -> int:
        return self._remaining if self.state is self.DATA else 0

    @property
    def data_end(self) -> int | None:
        """Body offset where the current chunk-data ends; None outside chunk-data."""
        return self.offset + self._remaining if self.state is self.DATA else None

    def advance(self, n: int) -> None:
        """Account for n chunk-data bytes moved without being fed (spliced)."""
        if self.state is not self.DATA or not 0 <= n <= self._remaining:
            raise RuntimeError(f"advance({n}) in state {self.state} "
                               f"with {self.data_remaining} data bytes left")
        self.offset += n
        self._remaining -= n
        if self._remaining == 0:
            self.state = self.DATA_CR

    def _fail(self, reason: str) -> PeerError:
        return _error(self.upstream, 400, f"chunked body at offset {self.offset}: {reason}")

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        if self.state is self.DONE:
            raise RuntimeError("feed() after the chunked message ended")
        mv = memoryview(data).cast("B")
        n = len(mv)
        pos = 0
        while pos < n and self.state is not self.DONE:
            st = self.state
            if st is self.DATA:
                take = min(self._remaining, n - pos)
                pos += take
                self.offset += take
                self._remaining -= take
                if self._remaining == 0:
                    self.state = self.DATA_CR
                continue
            if st is self.EXT or st is self.TRAILER:
                pos = self._line_until_cr(mv, pos, n)
                continue
            b = mv[pos]
            pos += 1
            self.offset += 1
            self._byte(b)
        return pos

    def _byte(self, b: int) -> None:
        """One framing byte outside chunk-ext, chunk-data and trailer lines."""
        st = self.state
        if st is self.SIZE_FIRST or st is self.SIZE:
            d = _HEX.get(b)
            if d is not None:
                self._size = self._size * 16 + d
                self._digits += 1
                if self._size > MAX_LENGTH:
                    raise self._fail("chunk-size overflows 2**63")
                if self._digits > self.limits.max_line:
                    raise self._fail(f"chunk-size longer than {self.limits.max_line} digits")
                self.state = self.SIZE
            elif st is self.SIZE_FIRST:
                raise self._fail(f"chunk-size must start with a hex digit, got {bytes([b])!r} "
                                 "(RFC 9112 7.1)")
            elif b == 13:
                self.state = self.SIZE_LF
            elif b in (0x3B, 0x20, 0x09):   # ";", or BWS before ";"
                self._line = bytearray([b])
                self.state = self.EXT
            else:
                raise self._fail(f"byte {bytes([b])!r} after chunk-size digits (plain hex only)")
        elif st is self.SIZE_LF:
            if b != 10:
                raise self._fail("bare CR in the chunk-size line")
            if self._size == 0:
                self.state = self.TRAILER
                self._line = bytearray()
            else:
                self._remaining = self._size
                self.state = self.DATA
            self._size = self._digits = 0
        elif st is self.DATA_CR:
            if b != 13:
                raise self._fail("chunk-data not followed by CRLF (RFC 9112 7.1)")
            self.state = self.DATA_LF
        elif st is self.DATA_LF:
            if b != 10:
                raise self._fail("chunk-data not followed by CRLF (RFC 9112 7.1)")
            self.state = self.SIZE_FIRST
        elif st is self.TRAILER_LF:
            if b != 10:
                raise self._fail("bare CR in the trailer section")
            self._end_trailer_line()
        else:
            raise RuntimeError(f"ChunkedScanner in state {st}")

    def _line_until_cr(self, mv: memoryview, pos: int, n: int) -> int:
        """Collect chunk-ext or trailer-line bytes up to CR; the CR is consumed."""
        if self.state is self.EXT:
            room = self.limits.max_chunk_ext - len(self._line)
        else:
            room = min(self.limits.max_line,
                       self.limits.max_head_bytes - self._trailer_bytes - 2) - len(self._line)
        window = bytes(mv[pos:min(n, pos + max(room, 0) + 1)])
        cr = window.find(b"\r")
        lf = window.find(b"\n")
        if lf >= 0 and (cr < 0 or lf < cr):
            raise self._fail("bare LF (lines end in CRLF, RFC 9112 2.2)")
        piece = window if cr < 0 else window[:cr]
        self._line += piece
        if len(piece) > room:
            raise self._fail("chunk extension longer than %d bytes" % self.limits.max_chunk_ext
                             if self.state is self.EXT else "trailer line or section too large")
        self.offset += len(piece)
        if cr < 0:
            return pos + len(piece)
        self.offset += 1
        if self.state is self.EXT:
            if not _CHUNK_EXT.fullmatch(self._line):
                raise self._fail(f"malformed chunk extension {_show(bytes(self._line))} "
                                 "(RFC 9112 7.1.1)")
            self.state = self.SIZE_LF
        else:
            self.state = self.TRAILER_LF
        return pos + cr + 1

    def _end_trailer_line(self) -> None:
        line = bytes(self._line)
        self._line = bytearray()
        if not line:
            self.state = self.DONE
            return
        if line[:1] in (b" ", b"\t"):
            raise self._fail("obs-fold or leading whitespace in the trailer section")
        try:
            _field_line(line, self.upstream)
        except PeerError as e:
            raise self._fail(f"trailer: {e.reason}") from None
        self._trailer_bytes += len(line) + 2
        self._trailer_fields += 1
        if self._trailer_fields > self.limits.max_fields:
            raise self._fail(f"more than {self.limits.max_fields} trailer fields")
        self.state = self.TRAILER


_HEX = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}


# -- connection semantics (RFC 9112 9.3, RFC 9110 10.1.1, 7.8) --------------------------------

def keep_alive(msg: Request | Response) -> bool:
    """May the connection this message came on carry another message after it?

    RFC 9112 9.3: "close" ends it; HTTP/1.1 persists by default.  HTTP/1.0 persists
    only with "keep-alive" and, since we are a proxy, only for responses: a proxy
    must not keep a persistent connection with an HTTP/1.0 client.  A response whose
    body runs until close, or that turns into a tunnel, ends it too.
    """
    if "close" in msg.connection:
        return False
    if isinstance(msg, Request):
        return msg.version == "HTTP/1.1"
    if msg.body_framing()[0] in ("close", "tunnel"):
        return False
    return msg.version == "HTTP/1.1" or "keep-alive" in msg.connection


def expects_continue(req: Request) -> bool:
    """Expect: 100-continue in an HTTP/1.1 request (1.0: ignored, RFC 9110 10.1.1)."""
    if req.version != "HTTP/1.1":
        return False
    return any(e.lower() == "100-continue" for e in _list(req.values("Expect")))


def is_upgrade(req: Request) -> bool:
    """An HTTP/1.1 request asking to switch protocols: Upgrade named in Connection.

    RFC 9110 7.8: the sender of Upgrade must send the "upgrade" option; an Upgrade in
    an HTTP/1.0 request is ignored.  Whether to allow it is the proxy's policy.
    """
    return (req.version == "HTTP/1.1" and req.method != "CONNECT"
            and "upgrade" in req.connection and bool(_list(req.values("Upgrade"))))


# -- forwarding ------------------------------------------------------------------------------

_PSEUDONYM = re.compile(r"[%s]+(?::[0-9]+)?" % _TCHAR.decode())


def forwarding_head(msg: Request | Response, *, via: str, client_addr: str | None = None,
                    reverse: bool = False, upgrade_allowed: bool = False,
                    close: bool = False) -> bytes:
    """The head to send on for `msg` (which was parsed here).

    - start line: a request keeps its version (see the module docstring) and its
      target in origin-form (absolute-form becomes path + query; CONNECT keeps its
      authority, OPTIONS its "*"); a response is sent as HTTP/1.1 with its status and
      reason;
    - field order and name case are kept; CRLF line ends; obs-fold already unfolded;
    - one Content-Length with the single value; Transfer-Encoding kept as received
      (the body is spliced, not re-framed); both dropped from a 2xx to CONNECT;
    - hop-by-hop fields removed: Connection and every field it names, Keep-Alive,
      Proxy-Connection, TE, Trailer, and Upgrade unless this message upgrades
      (`upgrade_allowed` and `is_upgrade(request)`, or a 101): then Upgrade is kept and
      "Connection: upgrade" sent; else "Connection: close" if `close`;
    - an absolute-form request gets Host from its target, as the first field (RFC
      9112 3.2.2, 3.2);
    - "Via: <received version> <via>" appended (RFC 9110 7.6.3);
    - reverse mode (requests only): X-Forwarded-For gets `client_addr` appended, all
      received X-Forwarded-For lines merged into one.
    Bad `via` or `client_addr` values are configuration errors (ValueError).
    """
    if not _PSEUDONYM.fullmatch(via):
        raise ValueError(f"Via pseudonym {via!r} must be a token or host[:port]")
    is_request = isinstance(msg, Request)
    if is_request and reverse:
        if client_addr is None:
            raise ValueError("reverse mode needs client_addr for X-Forwarded-For")
        ipaddress.ip_address(client_addr)   # ValueError if not an address
    if is_request:
        upgrading = upgrade_allowed and is_upgrade(msg)
    else:
        upgrading = upgrade_allowed and msg.status == 101
    drop = set(_HOP_BY_HOP | msg.connection)
    if upgrading:
        drop.discard("upgrade")
    out: list[tuple[str, str]] = []
    if is_request:
        target = msg.path
        if msg.form == "absolute":
            drop.add("host")
            out.append(("Host", msg.authority))
        start = f"{msg.method} {target} {msg.version}"
    else:
        start = f"HTTP/1.1 {msg.status} {msg.reason}"   # SP even before an empty reason (4)
        if msg.body_framing() == ("tunnel",) and msg.status != 101:
            drop |= {"content-length", "transfer-encoding"}
    xff: list[str] = []
    length_sent = False
    for name, value in msg.fields:
        lname = name.lower()
        if lname in drop:
            continue
        if lname == "content-length":
            if length_sent:
                continue
            value = str(msg.content_length)
            length_sent = True
        elif lname == "x-forwarded-for" and is_request and reverse:
            xff.append(value)
            continue
        out.append((name, value))
    if upgrading:
        out.append(("Connection", "upgrade"))
    elif close:
        out.append(("Connection", "close"))
    out.append(("Via", f"{msg.version[5:]} {via}"))
    if is_request and reverse:
        out.append(("X-Forwarded-For", ", ".join(_list(xff) + [client_addr])))
    lines = [start] + [f"{n}: {v}" for n, v in out]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- our own answers -------------------------------------------------------------------------

def error_response(status: int, reason_text: str, *, head_only: bool = False,
                   now: float | None = None) -> bytes:
    """A small complete response that ends the connection: plain text `reason_text`.

    `head_only` (answering a HEAD request) keeps the Content-Length but sends no body.
    `now` (seconds since the epoch) fixes Date for tests.
    """
    phrase = HTTPStatus(status).phrase        # ValueError for a status we do not know
    body = (reason_text.rstrip("\n") + "\n").encode("utf-8")
    head = (f"HTTP/1.1 {status} {phrase}\r\n"
            f"Date: {email.utils.formatdate(now, usegmt=True)}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "X-Content-Type-Options: nosniff\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode("ascii")
    return head if head_only else head + body
