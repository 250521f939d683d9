"""HTTP caching rules as pure functions over parsed heads (RFC 9111, RFC 9110, RFC 5861).

Nothing here does I/O or reads a clock: every function takes the heads `http1` parsed
(`Request`, `Response`, or a plain `fields` tuple of (name, value) pairs in received
order, which is how `http1` represents a header section) and the times it needs, and
returns a value plus a reason slug for the access log.  The store (`store.py`) keeps
bodies; this module decides what to store, when a stored response may be reused, how
to validate it and what to send.

The flow a caching proxy follows with it:

    key = cache_key(req)                            # None: not a GET/HEAD we can answer
    ok, why = lookup_allowed(req)                   # Range, If-Match, ...: go to the origin
    stored = StoredResponse.from_meta(entry.meta)   # what the store found for (key, req)
    r = reuse(stored, req, now)                     # HIT / STALE / STALE_REVALIDATE /
                                                    # VALIDATE / GATEWAY_TIMEOUT
    miss(req)                                       # nothing stored: MISS or 504
    validation_request(req, stored)                 # the conditional request to send
    freshen(stored, resp304, t_req, t_resp)         # a 304 came back: new stored head
    stale_on_error(stored, req, now, status)        # the origin failed: serve stale?
    conditional_hit(stored, req)                    # the client's own If-None-Match...
    hit_fields / not_modified_fields                # the head to send (Age, Date, ...)
    storable(req, resp)                             # may this response be stored?
    stored_response(req, resp, t_req, t_resp)       # what to store (RFC 9111 3.1)
    invalidations(req, resp)                        # URIs an unsafe method invalidates

Decisions where the RFCs leave a choice (each is also stated where it is made):

  * A shared cache (`CacheConfig.shared`, the default): s-maxage and proxy-revalidate
    apply, `private` is not stored, Authorization needs public/must-revalidate/s-maxage.
  * Only GET responses are stored; HEAD is answered from a stored GET (RFC 9110 9.3.2).
    The cache key is the normalised effective request URI; the method is implied.
  * 206 Partial Content is never stored; a Range or If-Range request goes to the
    origin unless the caller answers ranges from complete stored responses itself
    (`lookup_allowed(ranges=True)`, as the proxy does); If-Match and
    If-Unmodified-Since always go to the origin.  A 200 to a Range request (the origin
    ignored Range) may be stored.
  * Invalid or conflicting freshness information counts as stale (RFC 9111 4.2.1):
    an s-maxage/max-age/Expires/Age that does not parse, or that occurs twice with
    different values, gives a lifetime of 0 (or an age of 2**31).  In requests the most
    restrictive occurrence wins (smallest max-age and max-stale, largest min-fresh); an
    invalid request max-age or min-fresh means "validate", an invalid max-stale is
    ignored (no stale response).
  * Qualified no-cache="field" and private="field" are treated as unqualified (RFC
    9111 5.2.2.4 and 5.2.2.7 allow it): always validate, never store in a shared cache.
  * must-understand (5.2.2.3): with it, no-store is overridden for the status codes
    this cache implements (`UNDERSTOOD_STATUS`); any other status is not stored.
  * Vary: * (and a Vary element that is not a token) can never match, so such a
    response is not stored at all (reason "vary-star").
  * Heuristic freshness (4.2.2) only when configured: `heuristic_fraction` (10 %) of
    Date - Last-Modified, capped at `heuristic_max`.
  * Pragma: no-cache in a request without Cache-Control counts as no-cache (the
    HTTP/1.0 rule of RFC 7234 5.4; RFC 9111 5.4 deprecates Pragma, this is harmless).
  * Conditional requests toward the origin replace the client's If-None-Match and
    If-Modified-Since with the stored response's validators (RFC 9111 4.3.1: both
    ETag and Last-Modified when present); the client's conditional is then answered
    from the refreshed stored response (`conditional_hit`).  A 304 without any
    validator refreshes the response we validated (we sent its validators only).
"""
from __future__ import annotations

import calendar
import email.utils
import json
import math
import re
import time
import urllib.parse
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from ..proxy.http1 import Request, Response

__all__ = [
    "CacheConfig", "DEFAULT_CONFIG", "Directives", "INVALID", "DELTA_MAX",
    "parse_cache_control", "request_directives", "parse_http_date", "format_http_date",
    "normalize_uri", "effective_uri", "cache_key", "same_origin",
    "Verdict", "storable", "lookup_allowed", "StoredResponse", "stored_response",
    "freshness_lifetime", "current_age", "date_value",
    "Reuse", "HIT", "STALE", "STALE_REVALIDATE", "VALIDATE", "MISS", "GATEWAY_TIMEOUT",
    "reuse", "miss", "stale_on_error",
    "vary_names", "variant", "variant_key", "variant_matches", "normalize_field",
    "validation_request", "freshen", "freshen_with_head", "conditional_hit",
    "hit_fields", "not_modified_fields", "invalidations", "SAFE_METHODS",
    "HEURISTIC_STATUS", "UNDERSTOOD_STATUS", "ERROR_STATUS",
]

Fields = tuple[tuple[str, str], ...]

# RFC 9111 1.2.2: delta-seconds larger than we can represent count as 2**31.
DELTA_MAX = 1 << 31

# RFC 9110 15.1: heuristically cacheable status codes, without 206 (not supported here).
HEURISTIC_STATUS = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# Status codes whose caching rules this module implements (RFC 9111 3, 5.2.2.3): the
# heuristic ones plus redirects that are cacheable only with explicit freshness.
UNDERSTOOD_STATUS = HEURISTIC_STATUS | {302, 303, 307}
# RFC 9110 9.2.1.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# RFC 5861 4: the errors stale-if-error applies to (None: the origin was unreachable).
ERROR_STATUS = frozenset({500, 502, 503, 504})

# Never stored (RFC 9111 3.1): hop-by-hop fields (RFC 9110 7.6.1) and the proxy-specific
# authentication fields; Content-Length and Transfer-Encoding are framing: the store
# knows the body's length and a hit sends Content-Length from it.
_NOT_STORED = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authentication-info", "proxy-authorization",
    "content-length",
})
# Not taken over from a 304 or HEAD response (RFC 9111 3.2): the above; Content-Range,
# which describes that message only; and what describes the stored bytes themselves,
# which a 304 does not resend: Content-Encoding and Content-MD5 ("header fields that
# the cache's stored response depends upon").
_NOT_UPDATED = _NOT_STORED | {"content-range", "content-encoding", "content-md5"}
# What a 304 carries (RFC 9110 15.4.5), Last-Modified only without an ETag.
_NOT_MODIFIED_FIELDS = ("cache-control", "content-location", "date", "etag", "expires", "vary")
# Request fields compared case-insensitively when matching variants (RFC 9111 4.1):
# content codings, charsets and language tags are case-insensitive.
_CASELESS_VALUES = frozenset({"accept-encoding", "accept-charset", "accept-language"})

_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class CacheConfig:
    """What RFC 9111 leaves to the cache."""
    shared: bool = True                 # a proxy cache (RFC 9111 1): s-maxage, private, ...
    heuristic: bool = False             # heuristic freshness (4.2.2) for responses without
    heuristic_fraction: float = 0.1     # explicit freshness: this share of Date - Last-Modified,
    heuristic_max: int = 86400          # at most this many seconds

    def __post_init__(self):
        if not 0 <= self.heuristic_fraction <= 1:
            raise ValueError(f"heuristic_fraction {self.heuristic_fraction} outside 0..1")
        if self.heuristic_max < 0:
            raise ValueError(f"heuristic_max {self.heuristic_max} is negative")


DEFAULT_CONFIG = CacheConfig()


# -- field access ------------------------------------------------------------------------------

def _fields(x) -> Fields:
    """The header section of a Request, Response or StoredResponse, or fields themselves."""
    f = getattr(x, "fields", x)
    return f if isinstance(f, tuple) else tuple((n, v) for n, v in f)


def _get(fields: Fields, name: str) -> list[str]:
    """Every value of field `name` (case-insensitive), in received order."""
    name = name.lower()
    return [v for n, v in fields if n.lower() == name]


def _split(text: str) -> list[str]:
    """#rule elements (RFC 9110 5.6.1), commas inside quoted strings kept; OWS trimmed."""
    out, i = [], 0
    while i <= len(text):
        j = _skip_element(text, i)
        e = text[i:j].strip(" \t")
        if e:
            out.append(e)
        i = j + 1
    return out


def _list(fields: Fields, name: str) -> list[str]:
    return [e for v in _get(fields, name) for e in _split(v)]


# -- Cache-Control (RFC 9111 5.2) --------------------------------------------------------------

class _Invalid:
    """A directive present with an argument that is not usable (RFC 9111 4.2.1)."""
    __slots__ = ()

    def __repr__(self) -> str:
        return "INVALID"

    def __bool__(self) -> bool:
        return False


INVALID = _Invalid()


@dataclass(frozen=True)
class Directives:
    """Parsed Cache-Control: every directive in order as (name lowercased, argument, ok).

    `argument` is the token or the unescaped quoted-string after "=", or None; `ok` is
    False when that element was malformed (its name is still recorded, so presence
    checks see it: a mangled "no-store=" still forbids storing).  `malformed` says
    some element could not be read at all.
    """
    items: tuple[tuple[str, str | None, bool], ...] = ()
    malformed: bool = False

    def __contains__(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.items)

    def args(self, name: str) -> list[str | None]:
        return [a for n, a, _ in self.items if n == name]

    def delta(self, name: str, combine: str = "same"):
        """delta-seconds argument of `name` (RFC 9111 1.2.2).

        None if absent; INVALID if an occurrence has no argument, a malformed one or one
        that is not 1*DIGIT; values above 2**31 count as 2**31.  Several occurrences:
        combine="same" gives INVALID unless all agree (4.2.1: conflicting freshness is
        stale), "min" / "max" pick the most restrictive for the caller.
        """
        found = [(a, ok) for n, a, ok in self.items if n == name]
        if not found:
            return None
        values = []
        for a, ok in found:
            if not ok or a is None or not _DIGITS.fullmatch(a):
                return INVALID
            values.append(min(int(a), DELTA_MAX))
        if combine == "min":
            return min(values)
        if combine == "max":
            return max(values)
        if combine != "same":
            raise ValueError(f"combine={combine!r}")
        return values[0] if len(set(values)) == 1 else INVALID


def parse_cache_control(values: Iterable[str]) -> Directives:
    """Parse Cache-Control field values (all lines; RFC 9111 5.2).  Never raises.

    cache-directive = token [ "=" ( token / quoted-string ) ]; names are compared
    case-insensitively; both argument forms are accepted for every directive (5.2);
    whitespace around "=" is tolerated.  An element that does not fit is skipped up to
    the next comma outside a quoted string and marked (name kept when there was one).
    """
    items: list[tuple[str, str | None, bool]] = []
    malformed = False
    for text in values:
        i, n = 0, len(text)
        while i < n:
            if text[i] in " \t,":
                i += 1
                continue
            j = i
            while j < n and text[j] in _TCHARS:
                j += 1
            if j == i:                              # not a token: skip the element
                malformed = True
                i = _skip_element(text, i)
                continue
            name, ok, arg = text[i:j].lower(), True, None
            i = _skip_ws(text, j)
            if i < n and text[i] == "=":
                i = _skip_ws(text, i + 1)
                if i < n and text[i] == '"':
                    arg, i, ok = _quoted_string(text, i)
                else:
                    j = i
                    while j < n and text[j] in _TCHARS:
                        j += 1
                    arg, ok, i = text[i:j], j > i, j
                i = _skip_ws(text, i)
            if i < n and text[i] != ",":
                ok = False
                i = _skip_element(text, i)
            malformed |= not ok
            items.append((name, arg, ok))
    return Directives(tuple(items), malformed)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def _skip_element(text: str, i: int) -> int:
    """Index of the next comma outside a quoted string (or the end)."""
    quoted = escaped = False
    while i < len(text):
        c = text[i]
        if quoted:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                quoted = False
        elif c == ",":
            return i
        elif c == '"':
            quoted = True
        i += 1
    return i


def _quoted_string(text: str, i: int) -> tuple[str, int, bool]:
    """quoted-string at text[i] == '"' (RFC 9110 5.6.4): (unescaped, next index, closed)."""
    out = []
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        elif c == '"':
            return "".join(out), i + 1, True
        else:
            out.append(c)
            i += 1
    return "".join(out), i, False


def _directives(x) -> Directives:
    return parse_cache_control(_get(_fields(x), "Cache-Control"))


def request_directives(req) -> Directives:
    """A request's Cache-Control; Pragma: no-cache counts as no-cache without it (RFC 7234 5.4)."""
    fields = _fields(req)
    cc = _get(fields, "Cache-Control")
    if cc:
        return parse_cache_control(cc)
    if any(e.lower() == "no-cache" for e in _list(fields, "Pragma")):
        return Directives((("no-cache", None, True),))
    return Directives()


# -- HTTP-date (RFC 9110 5.6.7) ----------------------------------------------------------------

_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}
_IMF = re.compile(r"(?:mon|tue|wed|thu|fri|sat|sun), ([0-9]{2}) ([a-z]{3}) ([0-9]{4}) "
                  r"([0-9]{2}):([0-9]{2}):([0-9]{2}) gmt")
_RFC850 = re.compile(r"(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday), "
                     r"([0-9]{2})-([a-z]{3})-([0-9]{2}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) gmt")
_ASCTIME = re.compile(r"(?:mon|tue|wed|thu|fri|sat|sun) ([a-z]{3}) ([ 0-9][0-9]) "
                      r"([0-9]{2}):([0-9]{2}):([0-9]{2}) ([0-9]{4})")


def parse_http_date(value: str, now: float | None = None) -> int | None:
    """Seconds since the epoch for an HTTP-date, None if it is not one.

    IMF-fixdate, and the obsolete rfc850-date and asctime-date recipients must accept.
    Names are matched case-insensitively.  A two-digit rfc850 year is 20yy unless that
    is more than 50 years after `now` (then 19yy); without `now`, 70..99 are 19yy and
    00..69 20yy.  Never raises.
    """
    v = value.strip(" \t").lower()
    if m := _IMF.fullmatch(v):
        day, mon, year, hh, mm, ss = m.groups()
    elif m := _RFC850.fullmatch(v):
        day, mon, yy, hh, mm, ss = m.groups()
        year = 2000 + int(yy)
        if now is not None:
            this_year = _year_of(now)
            if year > this_year + 50:
                year -= 100
        elif int(yy) >= 70:
            year -= 100
    elif m := _ASCTIME.fullmatch(v):
        mon, day, hh, mm, ss, year = m.groups()
    else:
        return None
    month = _MONTHS.get(mon)
    day_i, year_i = int(day.strip()), int(year)
    if month is None or not 1 <= day_i <= calendar.monthrange(year_i, month)[1]:
        return None
    if int(hh) > 23 or int(mm) > 59 or int(ss) > 60:
        return None
    return calendar.timegm((year_i, month, day_i, int(hh), int(mm), int(ss)))


def _year_of(t: float) -> int:
    return time.gmtime(t).tm_year


def format_http_date(t: float) -> str:
    """IMF-fixdate for `t` seconds since the epoch (RFC 9110 5.6.7)."""
    return email.utils.formatdate(t, usegmt=True)


def _single_date(fields: Fields, name: str) -> int | None:
    """The one value of a date field, None if absent, invalid or several that differ."""
    vals = _get(fields, name)
    if not vals or len(set(vals)) > 1:
        return None
    return parse_http_date(vals[0])


# -- URIs and the cache key (RFC 9111 2, 4.4; RFC 9110 4.2.3) -------------------------------------

_DEFAULT_PORT = {"http": 80, "https": 443}
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _pct_normalize(s: str) -> str:
    """Percent-encodings in upper case, unreserved characters decoded (RFC 3986 6.2.2)."""
    def one(m):
        c = chr(int(m.group(1), 16))
        return c if c in _UNRESERVED else "%" + m.group(1).upper()
    return _PCT.sub(one, s)


def normalize_uri(uri: str) -> str | None:
    """Scheme and host lowercased, default port dropped, empty path "/", percent-encoding
    normalised, fragment dropped (RFC 9110 4.2.3, RFC 3986 6.2.2).  None if `uri` is
    not an absolute http(s) URI with a host."""
    try:
        parts = urllib.parse.urlsplit(uri.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORT or not host or parts.username is not None:
        return None
    host = ("[%s]" % host) if ":" in host else host
    authority = host if port in (None, _DEFAULT_PORT[scheme]) else f"{host}:{port}"
    path = _pct_normalize(parts.path) or "/"
    has_query = parts.query or "?" in uri.split("#", 1)[0]
    query = "?" + _pct_normalize(parts.query) if has_query else ""
    return f"{scheme}://{authority}{path}{query}"


def effective_uri(req: Request, *, scheme: str = "http",
                  default_authority: str | None = None) -> str | None:
    """The target URI of `req` (RFC 9112 3.3), normalised; None for CONNECT, "*", or
    an HTTP/1.0 request without Host when no `default_authority` is configured."""
    if req.form not in ("origin", "absolute"):
        return None
    authority = req.authority or default_authority
    if authority is None:
        return None
    return normalize_uri(f"{scheme}://{authority}{req.path}")


def cache_key(req: Request, *, scheme: str = "http",
              default_authority: str | None = None) -> str | None:
    """Primary cache key (RFC 9111 2): the normalised effective URI of a GET or HEAD.

    Only GET responses are stored, so the method is implied and a HEAD looks up the
    same key (RFC 9110 9.3.2: answered from the stored GET).  None: not cacheable.
    """
    if req.method not in ("GET", "HEAD"):
        return None
    return effective_uri(req, scheme=scheme, default_authority=default_authority)


def same_origin(a: str, b: str) -> bool:
    """Same scheme, host and port (RFC 9110 4.3.1), for normalised URIs."""
    pa, pb = urllib.parse.urlsplit(a), urllib.parse.urlsplit(b)
    return (pa.scheme, pa.netloc) == (pb.scheme, pb.netloc)


# -- storing (RFC 9111 3) ----------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def storable(req: Request, resp: Response, config: CacheConfig = DEFAULT_CONFIG) -> Verdict:
    """May a cache store `resp`, the answer to `req`?  RFC 9111 3, in its order.

    Reasons when not: "method" (only GET is stored), "interim" (1xx), "not-modified"
    (a 304 updates, RFC 9111 4.3.4), "partial-content" (206, not supported),
    "no-store-request", "must-understand", "no-store", "private", "authorization"
    (3.5), "vary-star" (4.1), "not-cacheable" (no explicit freshness, public, or
    heuristically cacheable status).  When ok, the reason names what allowed it:
    "public", "s-maxage", "max-age", "expires", "private-cache" or "status".
    """
    if req.method != "GET":
        return Verdict(False, "method")
    status = resp.status
    if status < 200:
        return Verdict(False, "interim")
    if status == 304:
        return Verdict(False, "not-modified")
    if status == 206:
        return Verdict(False, "partial-content")
    if "no-store" in request_directives(req):           # 5.2.1.5
        return Verdict(False, "no-store-request")
    cc = _directives(resp)
    if "must-understand" in cc:                         # 5.2.2.3: overrides no-store
        if status not in UNDERSTOOD_STATUS:
            return Verdict(False, "must-understand")
    elif "no-store" in cc:                              # 5.2.2.5
        return Verdict(False, "no-store")
    if config.shared and "private" in cc:               # 5.2.2.7 (qualified form too)
        return Verdict(False, "private")
    if (config.shared and _get(req.fields, "Authorization")
            and not ("public" in cc or "must-revalidate" in cc or "s-maxage" in cc)):
        return Verdict(False, "authorization")          # 3.5
    if vary_names(resp.fields) is None:
        return Verdict(False, "vary-star")
    if "public" in cc:
        return Verdict(True, "public")
    if config.shared and "s-maxage" in cc:
        return Verdict(True, "s-maxage")
    if "max-age" in cc:
        return Verdict(True, "max-age")
    if _get(resp.fields, "Expires"):
        return Verdict(True, "expires")
    if not config.shared and "private" in cc:
        return Verdict(True, "private-cache")
    if status in HEURISTIC_STATUS:
        return Verdict(True, "status")
    return Verdict(False, "not-cacheable")


def lookup_allowed(req: Request, *, ranges: bool = False) -> Verdict:
    """May the cache answer `req` at all (else: forward it, RFC 9111 4, 4.3.2)?

    "method": not GET/HEAD (so never CONNECT or "*");
    "range": Range or If-Range, unless `ranges` says the caller answers ranges from
    complete stored responses itself (206 is never stored); "precondition": If-Match
    or If-Unmodified-Since, which only the origin can evaluate (4.3.2).
    """
    if req.method not in ("GET", "HEAD"):
        return Verdict(False, "method")
    if not ranges and (_get(req.fields, "Range") or _get(req.fields, "If-Range")):
        return Verdict(False, "range")
    if _get(req.fields, "If-Match") or _get(req.fields, "If-Unmodified-Since"):
        return Verdict(False, "precondition")
    return Verdict(True, "lookup")


@dataclass(frozen=True)
class StoredResponse:
    """A stored response head and the times its age is computed from (RFC 9111 4.2.3).

    `fields` are the response fields as stored (RFC 9111 3.1: no hop-by-hop fields, no
    framing; Date always present); `request_time` is when the request that fetched
    (or last validated) it was sent, `response_time` when that response's head
    arrived, seconds since the epoch; `variant` holds the Vary-nominated request
    fields, normalised (RFC 9111 4.1), as (name, value or None when absent).
    `to_meta` / `from_meta` give the JSON-able dict the store keeps.
    """
    status: int
    reason: str
    fields: Fields
    request_time: float
    response_time: float
    variant: tuple[tuple[str, str | None], ...] = ()

    @property
    def variant_key(self) -> str:
        return variant_key(self.variant)

    def values(self, name: str) -> list[str]:
        return _get(self.fields, name)

    def to_meta(self) -> dict:
        return {"status": self.status, "reason": self.reason,
                "fields": [list(f) for f in self.fields],
                "request_time": self.request_time, "response_time": self.response_time,
                "variant": [list(v) for v in self.variant]}

    @classmethod
    def from_meta(cls, meta: dict) -> StoredResponse:
        return cls(status=int(meta["status"]), reason=str(meta["reason"]),
                   fields=tuple((str(n), str(v)) for n, v in meta["fields"]),
                   request_time=float(meta["request_time"]),
                   response_time=float(meta["response_time"]),
                   variant=tuple((str(n), None if v is None else str(v))
                                 for n, v in meta.get("variant", ())))


def _storable_fields(fields: Fields) -> Fields:
    """RFC 9111 3.1: drop Connection and what it names, hop-by-hop and proxy fields."""
    named = {o.lower() for o in _list(fields, "Connection")}
    return tuple((n, v) for n, v in fields if n.lower() not in _NOT_STORED and n.lower() not in named)


def stored_response(req: Request, resp: Response, request_time: float,
                    response_time: float) -> StoredResponse:
    """What to store for `resp` (answer to `req`): RFC 9111 3.1 fields, Date added.

    A response without a valid Date gets one with `response_time` (RFC 9110 6.6.1: a
    recipient with a clock adds it before caching).  The variant holds the request
    fields Vary names (RFC 9111 4.1); call `storable` first (Vary: * is refused there).
    """
    fields = _storable_fields(resp.fields)
    if _single_date(fields, "Date") is None:
        fields = tuple((n, v) for n, v in fields if n.lower() != "date")
        fields += (("Date", format_http_date(response_time)),)
    var = variant(resp.fields, req.fields) or ()
    return StoredResponse(status=resp.status, reason=resp.reason, fields=fields,
                          request_time=request_time, response_time=response_time, variant=var)


# -- freshness and age (RFC 9111 4.2) -----------------------------------------------------------

def date_value(stored: StoredResponse) -> float:
    """The Date of the stored response; its response_time when Date is missing or bad."""
    d = _single_date(stored.fields, "Date")
    return stored.response_time if d is None else d


def freshness_lifetime(stored: StoredResponse,
                       config: CacheConfig = DEFAULT_CONFIG) -> tuple[int, str]:
    """(seconds, source) per RFC 9111 4.2.1: the first of s-maxage (shared cache),
    max-age, Expires - Date, heuristic (4.2.2, if configured); else (0, "none").

    Invalid or conflicting values make the response stale: (0, "invalid-<name>").
    An Expires that is not a valid date (e.g. "0") is in the past (5.3).
    """
    cc = _directives(stored)
    names = ("s-maxage", "max-age") if config.shared else ("max-age",)
    for name in names:
        v = cc.delta(name)
        if v is INVALID:
            return 0, f"invalid-{name}"
        if v is not None:
            return v, name
    expires = stored.values("Expires")
    if expires:
        if len(set(expires)) > 1:
            return 0, "invalid-expires"
        exp = parse_http_date(expires[0])
        if exp is None:
            return 0, "invalid-expires"
        return int(min(max(0, exp - date_value(stored)), DELTA_MAX)), "expires"
    if config.heuristic and (stored.status in HEURISTIC_STATUS or "public" in cc):
        lm = _single_date(stored.fields, "Last-Modified")
        if lm is not None:
            since = date_value(stored) - lm
            if since > 0:
                return int(min(since * config.heuristic_fraction, config.heuristic_max)), "heuristic"
    return 0, "none"


def _age_value(stored: StoredResponse) -> int:
    """The Age field (RFC 9111 5.1): 0 if absent.  Age is a singleton: a value that is
    not delta-seconds, a list, or several field lines (even with equal values: a
    sender that repeats it is not to be trusted) count as 2**31, stale."""
    vals = stored.values("Age")
    if not vals:
        return 0
    if len(vals) > 1 or not _DIGITS.fullmatch(vals[0]):
        return DELTA_MAX
    return min(int(vals[0]), DELTA_MAX)


def current_age(stored: StoredResponse, now: float) -> float:
    """RFC 9111 4.2.3, in seconds; never negative, never decreasing in `now`.

        apparent_age = max(0, response_time - date_value)
        response_delay = response_time - request_time
        corrected_age_value = age_value + response_delay
        corrected_initial_age = max(apparent_age, corrected_age_value)
        resident_time = now - response_time
        current_age = corrected_initial_age + resident_time

    Clocks that went backwards are clamped: response_delay and resident_time are at
    least 0.
    """
    apparent_age = max(0.0, stored.response_time - date_value(stored))
    response_delay = max(0.0, stored.response_time - stored.request_time)
    corrected_age_value = _age_value(stored) + response_delay
    corrected_initial_age = max(apparent_age, corrected_age_value)
    resident_time = max(0.0, now - stored.response_time)
    return corrected_initial_age + resident_time


# -- reuse (RFC 9111 4, 4.2.4, 5.2; RFC 5861) ----------------------------------------------------

HIT = "hit"                               # fresh (or acceptable): serve it
STALE = "stale"                           # stale, allowed (max-stale, stale-if-error): serve it
STALE_REVALIDATE = "stale-revalidate"     # serve it now, validate in the background (RFC 5861 3)
VALIDATE = "validate"                     # send `validation_request`, then decide
MISS = "miss"                             # nothing usable stored: forward the request
GATEWAY_TIMEOUT = "gateway-timeout"       # only-if-cached and nothing usable: answer 504


@dataclass(frozen=True)
class Reuse:
    """What to do with a request given a stored response, and why (for the log)."""
    action: str
    reason: str
    age: float = 0.0
    lifetime: int = 0

    @property
    def serve(self) -> bool:
        return self.action in (HIT, STALE, STALE_REVALIDATE)

    @property
    def staleness(self) -> float:
        return max(0.0, self.age - self.lifetime)


def _revalidation_required(cc: Directives, config: CacheConfig) -> str | None:
    """Response directives that forbid serving stale (RFC 9111 4.2.4, 5.2.2)."""
    if "no-cache" in cc:
        return "no-cache"
    if "must-revalidate" in cc:
        return "must-revalidate"
    if config.shared and "proxy-revalidate" in cc:
        return "proxy-revalidate"
    if config.shared and "s-maxage" in cc:
        return "s-maxage"              # 5.2.2.10: s-maxage implies proxy-revalidate
    return None


def reuse(stored: StoredResponse, req: Request, now: float,
          config: CacheConfig = DEFAULT_CONFIG) -> Reuse:
    """May `stored` answer `req` at `now` (RFC 9111 4, after `lookup_allowed` and the
    Vary match)?  Reasons, in the order they are checked:

      VALIDATE "no-cache"            response no-cache (5.2.2.4): validate every time
      VALIDATE "no-cache-request"    request no-cache or Pragma (5.2.1.4)
      VALIDATE "max-age-request"     age above the request's max-age (5.2.1.1)
      VALIDATE "min-fresh"           fresh for less than min-fresh more (5.2.1.3)
      HIT      "fresh"
      VALIDATE "must-revalidate" / "proxy-revalidate" / "s-maxage"   stale (5.2.2.2,
               5.2.2.8, 5.2.2.10): never served stale, max-stale notwithstanding
      STALE    "max-stale"           the request accepts this much staleness (5.2.1.2)
      STALE_REVALIDATE "stale-while-revalidate"   within the window (RFC 5861 3)
      VALIDATE "stale"
    and any VALIDATE becomes GATEWAY_TIMEOUT "only-if-cached" when the request says
    only-if-cached (5.2.1.7): the cache must not go to the origin.
    """
    rcc = request_directives(req)
    cc = _directives(stored)
    age = current_age(stored, now)
    lifetime, _source = freshness_lifetime(stored, config)
    staleness = age - lifetime

    def out(action: str, reason: str) -> Reuse:
        if action == VALIDATE and "only-if-cached" in rcc:
            return Reuse(GATEWAY_TIMEOUT, "only-if-cached", age, lifetime)
        return Reuse(action, reason, age, lifetime)

    if "no-cache" in cc:
        return out(VALIDATE, "no-cache")
    demand = _client_demand(rcc, age, lifetime)
    if demand:
        return out(VALIDATE, demand)
    if staleness < 0:
        return out(HIT, "fresh")
    required = _revalidation_required(cc, config)
    if required:
        return out(VALIDATE, required)
    if _max_stale_allows(rcc, staleness):
        return out(STALE, "max-stale")
    if _within(cc, "stale-while-revalidate", staleness):
        return out(STALE_REVALIDATE, "stale-while-revalidate")
    return out(VALIDATE, "stale")


def _client_demand(rcc: Directives, age: float, lifetime: int) -> str | None:
    """Request directives that this stored response does not satisfy without validation."""
    if "no-cache" in rcc:
        return "no-cache-request"                       # 5.2.1.4
    max_age = rcc.delta("max-age", "min")               # 5.2.1.1
    if max_age is INVALID or (max_age is not None and age > max_age):
        return "max-age-request"
    min_fresh = rcc.delta("min-fresh", "max")           # 5.2.1.3
    if min_fresh is INVALID or (min_fresh is not None and lifetime - age < min_fresh):
        return "min-fresh"
    return None


def _max_stale_allows(rcc: Directives, staleness: float) -> bool:
    """max-stale (5.2.1.2): without argument any staleness; with several the smallest
    limit; arguments that are not delta-seconds are ignored."""
    limits = []
    for n, a, ok in rcc.items:
        if n != "max-stale":
            continue
        if a is None and ok:
            limits.append(math.inf)
        elif ok and a is not None and _DIGITS.fullmatch(a):
            limits.append(min(int(a), DELTA_MAX))
    return bool(limits) and staleness <= min(limits)


def miss(req: Request) -> Reuse:
    """Nothing stored matches: MISS (forward), or GATEWAY_TIMEOUT for only-if-cached (5.2.1.7)."""
    if "only-if-cached" in request_directives(req):
        return Reuse(GATEWAY_TIMEOUT, "only-if-cached")
    return Reuse(MISS, "miss")


def stale_on_error(stored: StoredResponse, req: Request, now: float, status: int | None,
                   config: CacheConfig = DEFAULT_CONFIG) -> Reuse:
    """Validation failed (the origin answered `status`, or None: unreachable): may the
    stale `stored` be served instead (RFC 5861 4, RFC 9111 4.2.4)?

    Never when a response directive forbids stale (MISS "no-cache", "must-revalidate",
    ...: forward the origin's answer, or 504 when there is none, as 5.2.2.2 asks).
    The request's own stale-if-error wins over its other demands: STALE
    "stale-if-error-request".  A request that asked for validation (no-cache, max-age,
    min-fresh) gets MISS with that reason.  Else STALE "stale-if-error" within the
    response's window, STALE "max-stale" within the request's, or MISS "error".
    Only 500, 502, 503 and 504 count as errors (MISS "not-an-error" otherwise).
    """
    age = current_age(stored, now)
    lifetime, _ = freshness_lifetime(stored, config)
    if status is not None and status not in ERROR_STATUS:
        return Reuse(MISS, "not-an-error", age, lifetime)
    staleness = max(0.0, age - lifetime)
    cc = _directives(stored)
    rcc = request_directives(req)
    required = _revalidation_required(cc, config)
    if required:
        return Reuse(MISS, required, age, lifetime)
    if _within(rcc, "stale-if-error", staleness):
        return Reuse(STALE, "stale-if-error-request", age, lifetime)
    demand = _client_demand(rcc, age, lifetime)
    if demand:
        return Reuse(MISS, demand, age, lifetime)
    if _within(cc, "stale-if-error", staleness):
        return Reuse(STALE, "stale-if-error", age, lifetime)
    if _max_stale_allows(rcc, staleness):
        return Reuse(STALE, "max-stale", age, lifetime)
    return Reuse(MISS, "error", age, lifetime)


def _within(d: Directives, name: str, staleness: float) -> bool:
    """A valid delta-seconds window `name` (smallest of several) covers `staleness`."""
    window = d.delta(name, "min")
    return window is not INVALID and window is not None and staleness <= window


# -- Vary (RFC 9111 4.1) -----------------------------------------------------------------------

def vary_names(resp_fields) -> tuple[str, ...] | None:
    """Request field names the response varies on, lowercased, sorted, unique.

    None for "*" (never matches), and for an element that is not a field name (a
    Vary we cannot read cannot be matched safely).
    """
    names = set()
    for e in _list(_fields(resp_fields), "Vary"):
        if e == "*" or not _TOKEN.fullmatch(e):
            return None
        names.add(e.lower())
    return tuple(sorted(names))


def normalize_field(name: str, values: Sequence[str]) -> str | None:
    """One request field's value for variant matching (RFC 9111 4.1), None if absent.

    Field lines are combined, list elements' surrounding whitespace and the blanks
    around ";" and "=" inside them removed, empty elements dropped; Accept-Encoding,
    -Charset and -Language are lowercased (case-insensitive values).  Order is kept:
    it can be significant.
    """
    if not values:
        return None
    elems = []
    for v in values:
        for e in _split(v):
            e = re.sub(r"[ \t]*([;=])[ \t]*", r"\1", e)
            elems.append(e)
    out = ",".join(elems)
    return out.lower() if name.lower() in _CASELESS_VALUES else out


def variant(resp_fields, req_fields) -> tuple[tuple[str, str | None], ...] | None:
    """The secondary key: (name, normalised request value) per Vary name; None for "*"."""
    names = vary_names(resp_fields)
    if names is None:
        return None
    req = _fields(req_fields)
    return tuple((n, normalize_field(n, _get(req, n))) for n in names)


def variant_key(var: Sequence[tuple[str, str | None]]) -> str:
    """Canonical text of a variant ("" when the response has no Vary): what the store keeps."""
    if not var:
        return ""
    return json.dumps([[n, v] for n, v in var], separators=(",", ":"))


def variant_matches(key: str, req_fields) -> bool:
    """Does a request select the stored variant `key` (RFC 9111 4.1)?  Never raises:
    a key that does not parse matches nothing."""
    if key == "":
        return True
    try:
        pairs = json.loads(key)
        names = [n for n, _ in pairs]
        if not all(isinstance(n, str) for n in names):
            return False
    except (ValueError, TypeError):
        return False
    req = _fields(req_fields)
    return all(normalize_field(n, _get(req, n)) == v for n, v in pairs)


# -- validation (RFC 9111 4.3; RFC 9110 8.8.3, 13) ------------------------------------------------

_ETAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')


def _etag(fields: Fields) -> tuple[bool, str] | None:
    """(weak, opaque-tag) of the one ETag field; None if absent, several or invalid."""
    vals = _get(fields, "ETag")
    if len(vals) != 1:
        return None
    m = _ETAG.fullmatch(vals[0].strip(" \t"))
    return None if m is None else (bool(m.group(1)), m.group(2))


def _etag_list(text: str):
    """If-None-Match value: "*", a list of (weak, opaque) or None if malformed."""
    if text.strip(" \t") == "*":
        return "*"
    out = []
    for e in _split(text):
        m = _ETAG.fullmatch(e)
        if m is None:
            return None
        out.append((bool(m.group(1)), m.group(2)))
    return out or None


def validation_request(req: Request, stored: StoredResponse) -> Request:
    """The request to send to the origin to validate `stored` (RFC 9111 4.3.1).

    The client's If-None-Match and If-Modified-Since are replaced by If-None-Match with
    the stored ETag and If-Modified-Since with the stored Last-Modified (both when
    both exist, RFC 9110 13.1.3; none: an unconditional request).  The client's own
    conditional is answered afterwards from the refreshed stored response
    (`conditional_hit`).  The result can be passed to `http1.forwarding_head`.
    """
    drop = {"if-none-match", "if-modified-since"}
    fields = tuple((n, v) for n, v in req.fields if n.lower() not in drop)
    if _etag(stored.fields) is not None:
        fields += (("If-None-Match", stored.values("ETag")[0].strip(" \t")),)
    if _single_date(stored.fields, "Last-Modified") is not None:
        fields += (("If-Modified-Since", stored.values("Last-Modified")[0]),)
    return replace(req, fields=fields)


def _merge(stored: Fields, new: Fields) -> Fields:
    """RFC 9111 3.2: each field of `new` replaces the stored lines of that name (at the
    first one's place; new names appended), except _NOT_UPDATED and what `new`'s
    Connection names."""
    named = {o.lower() for o in _list(new, "Connection")}
    incoming: dict[str, list[tuple[str, str]]] = {}
    for n, v in new:
        ln = n.lower()
        if ln in _NOT_UPDATED or ln in named:
            continue
        incoming.setdefault(ln, []).append((n, v))
    out: list[tuple[str, str]] = []
    placed = set()
    for n, v in stored:
        ln = n.lower()
        if ln in incoming:
            if ln not in placed:
                out.extend(incoming[ln])
                placed.add(ln)
            continue
        out.append((n, v))
    for ln, lines in incoming.items():
        if ln not in placed:
            out.extend(lines)
    return tuple(out)


def _updated(stored: StoredResponse, new: Response, request_time: float,
             response_time: float) -> StoredResponse:
    """`stored` with `new`'s fields (3.2) and new times: the age counts from `new`.

    Date and Age describe `new`: a missing Date becomes `response_time` (RFC 9110
    6.6.1), a missing Age means 0, so the stored ones go.
    """
    fields = _merge(stored.fields, new.fields)
    if _single_date(new.fields, "Date") is None:
        fields = tuple((n, v) for n, v in fields if n.lower() != "date")
        fields += (("Date", format_http_date(response_time)),)
    if not new.values("Age"):
        fields = tuple((n, v) for n, v in fields if n.lower() != "age")
    return replace(stored, fields=fields, request_time=request_time, response_time=response_time)


def freshen(stored: StoredResponse, resp304: Response, request_time: float,
            response_time: float) -> tuple[StoredResponse | None, str]:
    """A 304 answered our validation request: the refreshed stored head (RFC 9111 4.3.3,
    4.3.4, 3.2), or (None, reason) when the 304 does not select `stored`.

    Selection (4.3.4): a strong ETag in the 304 must equal the stored one (strong
    comparison); a weak one must match weakly; no ETag but Last-Modified: it must
    equal the stored Last-Modified; no validator at all: it answers the validators we
    sent, which came from `stored`.  The stored body is kept; the head gets the 304's
    fields (3.2), a Date (`response_time` if the 304 has none) and the new request and
    response times, so the age starts again.  Reasons: "freshened", "etag-mismatch",
    "last-modified-mismatch", "not-304".
    """
    if resp304.status != 304:
        return None, "not-304"
    new_tag = _etag(resp304.fields)
    old_tag = _etag(stored.fields)
    if new_tag is not None:
        if old_tag is None or new_tag[1] != old_tag[1] or (not new_tag[0] and old_tag[0]):
            return None, "etag-mismatch"
    elif resp304.values("Last-Modified"):
        if _single_date(resp304.fields, "Last-Modified") != _single_date(stored.fields, "Last-Modified"):
            return None, "last-modified-mismatch"
    return _updated(stored, resp304, request_time, response_time), "freshened"


def freshen_with_head(stored: StoredResponse, body_length: int, head: Response,
                      request_time: float, response_time: float) -> tuple[StoredResponse | None, str]:
    """A 200 to a HEAD request for a stored GET (RFC 9111 4.3.5).

    If its Content-Length, ETag or Last-Modified differ from the stored response's
    (Content-Length: the stored body's length), the stored response is no longer
    current: (None, "<field>-differs"), invalidate it.  Else the head is updated as
    from a 304 (3.2): (new, "freshened").
    """
    if head.status != 200:
        return None, "not-200"
    if head.content_length is not None and head.content_length != body_length:
        return None, "content-length-differs"
    for name in ("ETag", "Last-Modified"):
        if head.values(name) and head.values(name) != stored.values(name):
            return None, f"{name.lower()}-differs"
    return _updated(stored, head, request_time, response_time), "freshened"


def conditional_hit(stored: StoredResponse, req: Request) -> Verdict:
    """Answer the client's own conditional GET/HEAD with 304 from `stored`?  (RFC 9111
    4.3.2, RFC 9110 13.2.)  Call only once `stored` may be served.

    Only for a 2xx stored response (RFC 9110 13.2.1).  If-None-Match takes precedence
    and uses the weak comparison (8.8.3.2): ok "if-none-match" on a match or "*";
    a malformed list is not evaluated (a full response is always correct).  Without
    it, If-Modified-Since (a single valid HTTP-date, else ignored, 13.1.3) is compared
    with Last-Modified, or Date, or the time the response was received: ok
    "not-modified-since".  Not ok: "no-conditional", "modified", "etag-changed", ...
    """
    if req.method not in ("GET", "HEAD") or not 200 <= stored.status < 300:
        return Verdict(False, "not-applicable")
    inm = req.values("If-None-Match")
    if inm:
        tags = _etag_list(", ".join(inm))
        if tags is None:
            return Verdict(False, "if-none-match-malformed")
        if tags == "*":
            return Verdict(True, "if-none-match")
        mine = _etag(stored.fields)
        if mine is not None and any(opaque == mine[1] for _, opaque in tags):
            return Verdict(True, "if-none-match")
        return Verdict(False, "etag-changed")
    ims = req.values("If-Modified-Since")
    if len(ims) == 1:
        since = parse_http_date(ims[0])
        if since is not None:
            lm = _single_date(stored.fields, "Last-Modified")
            if lm is None:
                lm = date_value(stored)
            return Verdict(True, "not-modified-since") if lm <= since else Verdict(False, "modified")
    return Verdict(False, "no-conditional")


# -- responses from the cache (RFC 9111 4, 5.1; RFC 9110 15.4.5, 9.3.2) -----------------------------

def _age_field(stored: StoredResponse, now: float) -> tuple[str, str]:
    return ("Age", str(min(int(current_age(stored, now)), DELTA_MAX)))


def hit_fields(stored: StoredResponse, now: float, body_length: int) -> Fields:
    """Header fields of a response served from the cache, to a GET or a HEAD.

    The stored fields (their Date kept: it is the origin's, RFC 9110 6.6.1; one added
    from response_time if missing), Age replaced by the current age (RFC 9111 5.1,
    4: a cache MUST send Age), Content-Length from the stored body (none for 204,
    RFC 9110 8.6).  A HEAD gets the same fields and no body (RFC 9110 9.3.2).
    """
    fields = tuple((n, v) for n, v in stored.fields if n.lower() not in ("age", "content-length"))
    if not _get(fields, "Date"):
        fields += (("Date", format_http_date(stored.response_time)),)
    fields += (_age_field(stored, now),)
    if stored.status != 204:
        fields += (("Content-Length", str(body_length)),)
    return fields


def not_modified_fields(stored: StoredResponse, now: float) -> Fields:
    """A 304 from the cache (RFC 9110 15.4.5): Cache-Control, Content-Location, Date,
    ETag, Expires, Vary as stored, Last-Modified when there is no ETag, and Age."""
    keep = set(_NOT_MODIFIED_FIELDS)
    if not stored.values("ETag"):
        keep.add("last-modified")
    fields = tuple((n, v) for n, v in stored.fields if n.lower() in keep)
    return fields + (_age_field(stored, now),)


# -- invalidation (RFC 9111 4.4) ---------------------------------------------------------------

def invalidations(req: Request, resp: Response, *, scheme: str = "http",
                  default_authority: str | None = None) -> tuple[list[str], str]:
    """URIs whose stored responses a response to an unsafe request invalidates.

    A non-error (2xx, 3xx) response to a method that is not safe (RFC 9110 9.2.1;
    unknown methods included) invalidates the target URI, and the URIs in Location and
    Content-Location when they have the same origin (4.4: never another origin's).
    Returns (normalised URIs, reason): "unsafe-method", "safe-method", "error-status",
    "no-target".
    """
    if req.method in SAFE_METHODS:
        return [], "safe-method"
    if not 200 <= resp.status < 400:
        return [], "error-status"
    target = effective_uri(req, scheme=scheme, default_authority=default_authority)
    if target is None:
        return [], "no-target"
    uris = [target]
    for name in ("Location", "Content-Location"):
        vals = resp.values(name)
        if len(vals) != 1:
            continue
        try:
            joined = urllib.parse.urljoin(target, vals[0].strip(" \t"))
        except ValueError:
            continue
        uri = normalize_uri(joined)
        if uri is not None and same_origin(uri, target) and uri not in uris:
            uris.append(uri)
    return uris, "unsafe-method"
