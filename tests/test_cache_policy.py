"""nfsplice.cache.policy: RFC 9111 / RFC 5861 rules over http1 heads, no I/O, no clock."""
from __future__ import annotations

import json

import pytest
from hypothesis import assume, given, strategies as st

from nfsplice.cache import policy
from nfsplice.cache.policy import (
    DELTA_MAX, GATEWAY_TIMEOUT, HIT, INVALID, MISS, STALE, STALE_REVALIDATE, VALIDATE,
    CacheConfig, StoredResponse, cache_key, conditional_hit, current_age, effective_uri,
    format_http_date, freshen, freshen_with_head, freshness_lifetime, hit_fields,
    invalidations, lookup_allowed, miss, normalize_field, normalize_uri, not_modified_fields,
    parse_cache_control, parse_http_date, request_directives, reuse, stale_on_error,
    storable, stored_response, validation_request, variant, variant_key, variant_matches,
    vary_names,
)
from nfsplice.proxy.http1 import forwarding_head, parse_request_head, parse_response_head

T0 = 1_700_000_000          # a fixed "now" for every test: nothing here reads a clock
DATE0 = format_http_date(T0)
PRIVATE = CacheConfig(shared=False)
HEURISTIC = CacheConfig(heuristic=True, heuristic_max=3600)


def req(*lines: str, method: str = "GET", target: str = "/x", host: str | None = "example.com"):
    head = f"{method} {target} HTTP/1.1\r\n"
    if host is not None:
        head += f"Host: {host}\r\n"
    head += "".join(line + "\r\n" for line in lines) + "\r\n"
    r = parse_request_head(head.encode("latin-1"))
    assert r is not None
    return r[0]


def resp(status: int = 200, *lines: str, method: str = "GET", date: str | None = DATE0):
    head = f"HTTP/1.1 {status} Whatever\r\n"
    if date is not None:
        head += f"Date: {date}\r\n"
    head += "".join(line + "\r\n" for line in lines) + "\r\n"
    r = parse_response_head(head.encode("latin-1"), method)
    assert r is not None
    return r[0]


def stored(status: int = 200, *lines: str, request: tuple[str, ...] = (), t_req: float = T0,
           t_resp: float = T0, date: str | None = DATE0) -> StoredResponse:
    return stored_response(req(*request), resp(status, *lines, date=date), t_req, t_resp)


# -- Cache-Control parsing (RFC 9111 5.2, 4.2.1, 1.2.2) --------------------------------------------

class TestDirectives:
    def test_basic_and_case_insensitive(self):
        d = parse_cache_control(["Max-Age=60, NO-STORE", "public"])
        assert d.delta("max-age") == 60
        assert "no-store" in d and "public" in d and "private" not in d
        assert not d.malformed

    def test_quoted_arguments(self):
        d = parse_cache_control(['max-age="60", no-cache="Set-Cookie, X-Foo", private="a\\"b"'])
        assert d.delta("max-age") == 60                  # both forms accepted (5.2)
        assert d.args("no-cache") == ["Set-Cookie, X-Foo"]   # the comma stays inside the quotes
        assert d.args("private") == ['a"b']
        assert not d.malformed

    def test_whitespace_around_equals(self):
        assert parse_cache_control(["max-age = 7"]).delta("max-age") == 7

    @pytest.mark.parametrize("text", ["max-age=abc", "max-age=-1", "max-age=1.5", "max-age=",
                                      "max-age", 'max-age="1 2"', "max-age=+5", "max-age=5 6"])
    def test_bad_numbers_are_invalid(self, text):
        assert parse_cache_control([text]).delta("max-age") is INVALID

    def test_huge_number_is_2_31(self):
        assert parse_cache_control(["max-age=99999999999999999999"]).delta("max-age") == DELTA_MAX

    def test_duplicates(self):
        assert parse_cache_control(["max-age=5, max-age=5"]).delta("max-age") == 5
        d = parse_cache_control(["max-age=5", "max-age=10"])
        assert d.delta("max-age") is INVALID               # conflicting: stale (4.2.1)
        assert d.delta("max-age", "min") == 5
        assert d.delta("max-age", "max") == 10
        with pytest.raises(ValueError):
            d.delta("max-age", "first")

    def test_garbage_is_skipped_but_names_kept(self):
        d = parse_cache_control(['=5, ,, max-age=3 junk, "quoted, thing", no-store=, private'])
        assert d.malformed
        assert "no-store" in d                 # a mangled no-store still forbids storing
        assert "private" in d
        assert d.delta("max-age") is INVALID   # "3 junk"
        assert "quoted" not in d

    def test_unterminated_quote(self):
        d = parse_cache_control(['max-age=5, no-cache="abc, def'])
        assert d.delta("max-age") == 5
        assert "no-cache" in d and d.malformed

    def test_absent(self):
        d = parse_cache_control([])
        assert d.delta("max-age") is None and "no-store" not in d and not d.malformed

    def test_pragma_only_without_cache_control(self):
        assert "no-cache" in request_directives(req("Pragma: no-cache"))
        assert "no-cache" not in request_directives(req("Pragma: no-cache", "Cache-Control: max-age=5"))
        assert "no-cache" not in request_directives(req("Pragma: x-other"))

    @given(st.lists(st.text(max_size=60), max_size=4))
    def test_parsing_never_raises(self, values):
        d = parse_cache_control(values)
        for name in ("max-age", "s-maxage", "max-stale", "min-fresh", "stale-if-error"):
            for combine in ("same", "min", "max"):
                v = d.delta(name, combine)
                assert v is None or v is INVALID or (isinstance(v, int) and 0 <= v <= DELTA_MAX)

    @given(st.lists(st.sampled_from(["max-age", "no-store", "private", "s-maxage", "no-cache", "x"]),
                    min_size=1, max_size=5),
           st.lists(st.one_of(st.none(), st.integers(0, 10**6)), min_size=5, max_size=5))
    def test_well_formed_round_trip(self, names, args):
        text = ", ".join(n if a is None else f"{n}={a}" for n, a in zip(names, args))
        d = parse_cache_control([text])
        assert not d.malformed
        for n in names:
            assert n in d


# -- HTTP-date (RFC 9110 5.6.7) ----------------------------------------------------------------

class TestHttpDate:
    def test_three_formats(self):
        t = 784111777
        assert parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT") == t
        assert parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT") == t
        assert parse_http_date("Sun Nov  6 08:49:37 1994") == t
        assert parse_http_date("sun, 06 nov 1994 08:49:37 gmt") == t

    @pytest.mark.parametrize("text", ["0", "", "-1", "Sun, 31 Feb 1994 08:49:37 GMT",
                                      "Sun, 06 Nov 1994 25:00:00 GMT", "Sun, 06 Foo 1994 08:49:37 GMT",
                                      "Sun, 06 Nov 1994 08:49:37 UTC", "tomorrow"])
    def test_invalid(self, text):
        assert parse_http_date(text) is None

    def test_rfc850_two_digit_year(self):
        # 20yy unless that is more than 50 years after now (RFC 9110 5.6.7)
        assert parse_http_date("Monday, 06-Nov-30 08:49:37 GMT", now=T0) == parse_http_date(
            "Wed, 06 Nov 2030 08:49:37 GMT")
        assert parse_http_date("Monday, 06-Nov-99 08:49:37 GMT", now=T0) == parse_http_date(
            "Sat, 06 Nov 1999 08:49:37 GMT")

    @given(st.integers(0, 4_000_000_000))
    def test_round_trip(self, t):
        assert parse_http_date(format_http_date(t)) == t

    @given(st.text(max_size=40))
    def test_never_raises(self, text):
        parse_http_date(text)


# -- URIs and keys (RFC 9111 2, RFC 9110 4.2.3) ------------------------------------------------------

class TestKey:
    def test_origin_form(self):
        assert cache_key(req(target="/x?y=1")) == "http://example.com/x?y=1"

    def test_host_case_and_default_port(self):
        assert cache_key(req(host="Example.COM:80")) == "http://example.com/x"
        assert cache_key(req(host="example.com:8080")) == "http://example.com:8080/x"

    def test_absolute_form_normalised(self):
        r = req(target="http://Example.com:8080/a%7eb?q=%2f")
        assert cache_key(r) == "http://example.com:8080/a~b?q=%2F"
        assert cache_key(req(target="http://a")) == "http://a/"

    def test_head_shares_the_get_key(self):
        assert cache_key(req(method="HEAD")) == cache_key(req())

    def test_not_cacheable_methods_and_forms(self):
        assert cache_key(req(method="POST")) is None
        assert cache_key(req(method="OPTIONS", target="*")) is None
        assert cache_key(req(method="CONNECT", target="a:443", host="a:443")) is None

    def test_http10_without_host(self):
        r = parse_request_head(b"GET /x HTTP/1.0\r\n\r\n")[0]
        assert cache_key(r) is None
        assert cache_key(r, default_authority="origin.test") == "http://origin.test/x"

    def test_scheme(self):
        assert effective_uri(req(), scheme="https") == "https://example.com/x"

    @pytest.mark.parametrize("uri", ["ftp://a/b", "http://u@a/b", "/relative", "http://", "http://a:99999/"])
    def test_normalize_rejects(self, uri):
        assert normalize_uri(uri) is None

    def test_normalize_details(self):
        assert normalize_uri("HTTP://A.example:80") == "http://a.example/"
        assert normalize_uri("http://a/p?") == "http://a/p?"
        assert normalize_uri("http://a/p#frag") == "http://a/p"
        assert normalize_uri("https://[::1]:443/%41") == "https://[::1]/A"

    @given(st.from_regex(r"http://[a-zA-Z0-9.]{1,10}(:[0-9]{1,4})?(/[a-zA-Z0-9%._~]{0,8}){0,3}"
                         r"(\?[a-z0-9=&%]{0,8})?", fullmatch=True))
    def test_normalize_idempotent(self, uri):
        n = normalize_uri(uri)
        assume(n is not None)
        assert normalize_uri(n) == n


# -- storing (RFC 9111 3) -------------------------------------------------------------------------

class TestStorable:
    @pytest.mark.parametrize("status", sorted(policy.HEURISTIC_STATUS))
    def test_heuristically_cacheable(self, status):
        assert storable(req(), resp(status)) == policy.Verdict(True, "status")

    @pytest.mark.parametrize("status", [302, 303, 307, 403, 500, 503])
    def test_not_by_default_but_with_explicit_freshness(self, status):
        assert storable(req(), resp(status)).reason == "not-cacheable"
        assert storable(req(), resp(status, "Cache-Control: max-age=60")).reason == "max-age"
        assert storable(req(), resp(status, "Expires: " + DATE0)).reason == "expires"
        assert storable(req(), resp(status, "Cache-Control: s-maxage=60")).reason == "s-maxage"
        assert storable(req(), resp(status, "Cache-Control: public")).reason == "public"

    def test_s_maxage_only_counts_in_a_shared_cache(self):
        assert not storable(req(), resp(302, "Cache-Control: s-maxage=60"), PRIVATE)

    @pytest.mark.parametrize("status,reason", [(206, "partial-content"), (304, "not-modified"),
                                               (100, "interim"), (103, "interim")])
    def test_never(self, status, reason):
        assert storable(req(), resp(status, "Cache-Control: max-age=60")) == policy.Verdict(False, reason)

    def test_only_get(self):
        assert storable(req(method="HEAD"), resp(200, method="HEAD")).reason == "method"
        assert storable(req(method="POST"), resp(200, "Cache-Control: max-age=5")).reason == "method"

    def test_no_store(self):
        assert storable(req(), resp(200, "Cache-Control: max-age=60, no-store")).reason == "no-store"
        assert storable(req("Cache-Control: no-store"), resp()).reason == "no-store-request"
        assert storable(req(), resp(200, "Cache-Control: NO-STORE")).reason == "no-store"

    def test_must_understand(self):
        # 5.2.2.3: overrides no-store for a status we implement, refuses the others
        assert storable(req(), resp(200, "Cache-Control: must-understand, no-store")).ok
        assert storable(req(), resp(418, "Cache-Control: must-understand, max-age=5")).reason == "must-understand"
        assert not storable(req("Cache-Control: no-store"), resp(200, "Cache-Control: must-understand, no-store"))

    def test_private(self):
        assert storable(req(), resp(200, "Cache-Control: private, max-age=60")).reason == "private"
        assert storable(req(), resp(200, 'Cache-Control: private="Set-Cookie"')).reason == "private"
        assert storable(req(), resp(302, "Cache-Control: private"), PRIVATE) == policy.Verdict(True, "private-cache")

    def test_authorization(self):
        auth = "Authorization: Basic eDp5"
        assert storable(req(auth), resp(200, "Cache-Control: max-age=60")).reason == "authorization"
        for cc in ("public", "must-revalidate, max-age=5", "s-maxage=5"):
            assert storable(req(auth), resp(200, "Cache-Control: " + cc)).ok, cc
        assert storable(req(auth), resp(200), PRIVATE).ok

    def test_vary(self):
        assert storable(req(), resp(200, "Vary: *")).reason == "vary-star"
        assert storable(req(), resp(200, "Vary: Accept, *")).reason == "vary-star"
        assert storable(req(), resp(200, "Vary: Accept-Encoding")).ok

    def test_no_cache_may_be_stored(self):
        assert storable(req(), resp(200, "Cache-Control: no-cache")).ok

    def test_lookup_allowed(self):
        assert lookup_allowed(req()).ok and lookup_allowed(req(method="HEAD")).ok
        assert lookup_allowed(req(method="POST")).reason == "method"
        assert lookup_allowed(req("Range: bytes=0-1")).reason == "range"
        assert lookup_allowed(req('If-Range: "a"')).reason == "range"
        assert lookup_allowed(req('If-Match: "a"')).reason == "precondition"
        assert lookup_allowed(req("If-Unmodified-Since: " + DATE0)).reason == "precondition"
        assert lookup_allowed(req(method="OPTIONS", target="*")).reason == "method"
        # A caller that answers ranges from complete stored responses looks them up.
        assert lookup_allowed(req("Range: bytes=0-1", 'If-Range: "a"'), ranges=True).ok
        assert lookup_allowed(req("Range: bytes=0-1", 'If-Match: "a"'), ranges=True).reason == "precondition"

    def test_stored_fields(self):
        s = stored(200, "Connection: close, X-Hop", "X-Hop: 1", "Keep-Alive: timeout=5",
                   "Proxy-Authenticate: Basic", "Content-Length: 5", "Content-Type: text/plain",
                   "X-End: 2")
        names = [n for n, _ in s.fields]
        assert names == ["Date", "Content-Type", "X-End"]      # RFC 9111 3.1, order kept

    def test_date_added_when_missing_or_invalid(self):
        assert stored(date=None, t_resp=T0 + 5).values("Date") == [format_http_date(T0 + 5)]
        assert stored(date="yesterday", t_resp=T0 + 5).values("Date") == [format_http_date(T0 + 5)]

    def test_meta_round_trip(self):
        s = stored(200, "Vary: Accept-Encoding", "ETag: \"x\"", request=("Accept-Encoding: gzip",))
        again = StoredResponse.from_meta(json.loads(json.dumps(s.to_meta())))
        assert again == s
        assert again.variant == (("accept-encoding", "gzip"),)


# -- freshness (RFC 9111 4.2.1, 4.2.2) ---------------------------------------------------------------

class TestFreshness:
    def test_precedence(self):
        exp = "Expires: " + format_http_date(T0 + 30)
        s = stored(200, "Cache-Control: max-age=20, s-maxage=10", exp)
        assert freshness_lifetime(s) == (10, "s-maxage")
        assert freshness_lifetime(s, PRIVATE) == (20, "max-age")
        assert freshness_lifetime(stored(200, exp)) == (30, "expires")
        assert freshness_lifetime(stored(200, "Cache-Control: max-age=0", exp)) == (0, "max-age")

    def test_expires_minus_date(self):
        s = stored(200, "Expires: " + format_http_date(T0 + 100), date=format_http_date(T0 - 50))
        assert freshness_lifetime(s) == (150, "expires")
        s = stored(200, "Expires: " + format_http_date(T0 - 100))
        assert freshness_lifetime(s) == (0, "expires")

    @pytest.mark.parametrize("lines,source", [
        (("Expires: 0",), "invalid-expires"),
        (("Expires: " + DATE0, "Expires: " + format_http_date(T0 + 9)), "invalid-expires"),
        (("Cache-Control: max-age=ten",), "invalid-max-age"),
        (("Cache-Control: max-age=5, max-age=50",), "invalid-max-age"),
        (("Cache-Control: s-maxage=x, max-age=50",), "invalid-s-maxage"),
    ])
    def test_invalid_is_stale(self, lines, source):
        assert freshness_lifetime(stored(200, *lines)) == (0, source)

    def test_duplicate_equal_values_are_fine(self):
        assert freshness_lifetime(stored(200, "Cache-Control: max-age=5", "Cache-Control: max-age=5")) == (5, "max-age")

    def test_heuristic(self):
        lm = "Last-Modified: " + format_http_date(T0 - 10_000)
        assert freshness_lifetime(stored(200, lm)) == (0, "none")          # not configured
        assert freshness_lifetime(stored(200, lm), HEURISTIC) == (1000, "heuristic")
        old = "Last-Modified: " + format_http_date(T0 - 10**7)
        assert freshness_lifetime(stored(200, old), HEURISTIC) == (3600, "heuristic")   # capped
        assert freshness_lifetime(stored(302, lm), HEURISTIC) == (0, "none")           # not heuristic status
        assert freshness_lifetime(stored(302, lm, "Cache-Control: public"), HEURISTIC) == (1000, "heuristic")
        assert freshness_lifetime(stored(200), HEURISTIC) == (0, "none")               # no Last-Modified
        future = "Last-Modified: " + format_http_date(T0 + 10)
        assert freshness_lifetime(stored(200, future), HEURISTIC) == (0, "none")

    def test_config_checked(self):
        with pytest.raises(ValueError):
            CacheConfig(heuristic_fraction=2)
        with pytest.raises(ValueError):
            CacheConfig(heuristic_max=-1)


# -- age (RFC 9111 4.2.3) --------------------------------------------------------------------------

class TestAge:
    def test_resident_time(self):
        assert current_age(stored(), T0 + 10) == 10

    def test_age_header_and_response_delay(self):
        s = stored(200, "Age: 100", t_req=T0 - 2, t_resp=T0)
        assert current_age(s, T0) == 102            # corrected_age_value = 100 + 2
        assert current_age(s, T0 + 8) == 110

    def test_apparent_age(self):
        s = stored(date=format_http_date(T0 - 50))
        assert current_age(s, T0) == 50
        s = stored(200, "Age: 10", date=format_http_date(T0 - 50))
        assert current_age(s, T0) == 50             # max(apparent, corrected)

    def test_date_in_the_future(self):
        assert current_age(stored(date=format_http_date(T0 + 500)), T0 + 1) == 1

    def test_clock_backwards(self):
        assert current_age(stored(t_req=T0 + 5, t_resp=T0), T0 - 100) == 0

    @pytest.mark.parametrize("age", ["Age: x", "Age: -1", "Age: 1.5"])
    def test_invalid_age_is_old(self, age):
        assert current_age(stored(200, age), T0) == DELTA_MAX

    def test_conflicting_age(self):
        assert current_age(stored(200, "Age: 1", "Age: 2"), T0) == DELTA_MAX

    @pytest.mark.parametrize("lines", [("Age: 0", "Age: 0"), ("Age: 0, 0",), ("Age: 0,7200",)])
    def test_repeated_age_is_old(self, lines):
        """Age is a singleton: a list or repeated lines, even equal, are not trusted."""
        assert current_age(stored(200, *lines), T0) == DELTA_MAX

    @given(t_req=st.floats(0, 2e9), delay=st.floats(-100, 1000), date=st.integers(0, 2_100_000_000),
           age=st.one_of(st.none(), st.integers(0, 10**12).map(str), st.text(max_size=6)),
           now=st.floats(0, 3e9), later=st.floats(0, 1e9))
    def test_never_negative_and_monotone(self, t_req, delay, date, age, now, later):
        lines = () if age is None or any(c in age for c in "\r\n\x00") else (f"Age: {age}".rstrip(),)
        try:
            s = stored(200, *lines, t_req=t_req, t_resp=t_req + delay, date=format_http_date(date))
        except Exception:
            assume(False)     # a field value http1 refuses never reaches the cache
        a1, a2 = current_age(s, now), current_age(s, now + later)
        assert 0 <= a1 <= a2


# -- reuse (RFC 9111 4, 5.2; RFC 5861) -------------------------------------------------------------

class TestReuse:
    def test_fresh_and_stale(self):
        s = stored(200, "Cache-Control: max-age=60")
        r = reuse(s, req(), T0 + 59)
        assert (r.action, r.reason, r.age, r.lifetime) == (HIT, "fresh", 59, 60) and r.serve
        r = reuse(s, req(), T0 + 60)
        assert (r.action, r.reason) == (VALIDATE, "stale") and not r.serve and r.staleness == 0
        assert reuse(s, req(), T0 + 70).staleness == 10

    def test_no_freshness_validates(self):
        assert reuse(stored(), req(), T0).action == VALIDATE

    def test_response_no_cache(self):
        r = reuse(stored(200, "Cache-Control: no-cache, max-age=60"), req(), T0)
        assert (r.action, r.reason) == (VALIDATE, "no-cache")
        r = reuse(stored(200, 'Cache-Control: no-cache="Set-Cookie", max-age=60'), req(), T0)
        assert (r.action, r.reason) == (VALIDATE, "no-cache")

    def test_request_no_cache_and_pragma(self):
        s = stored(200, "Cache-Control: max-age=60")
        assert reuse(s, req("Cache-Control: no-cache"), T0).reason == "no-cache-request"
        assert reuse(s, req("Pragma: no-cache"), T0).reason == "no-cache-request"
        assert reuse(s, req("Pragma: no-cache", "Cache-Control: max-age=100"), T0).action == HIT

    def test_request_max_age(self):
        s = stored(200, "Cache-Control: max-age=600")
        assert reuse(s, req("Cache-Control: max-age=0"), T0 + 1).reason == "max-age-request"
        assert reuse(s, req("Cache-Control: max-age=100"), T0 + 50).action == HIT
        assert reuse(s, req("Cache-Control: max-age=100"), T0 + 101).reason == "max-age-request"
        assert reuse(s, req("Cache-Control: max-age=100, max-age=10"), T0 + 50).reason == "max-age-request"
        assert reuse(s, req("Cache-Control: max-age=soon"), T0).reason == "max-age-request"

    def test_min_fresh(self):
        s = stored(200, "Cache-Control: max-age=100")
        assert reuse(s, req("Cache-Control: min-fresh=30"), T0 + 60).action == HIT
        assert reuse(s, req("Cache-Control: min-fresh=50"), T0 + 60).reason == "min-fresh"
        assert reuse(s, req("Cache-Control: min-fresh=x"), T0).reason == "min-fresh"

    def test_max_stale(self):
        s = stored(200, "Cache-Control: max-age=10")
        assert (reuse(s, req("Cache-Control: max-stale"), T0 + 10**6).action) == STALE
        assert reuse(s, req("Cache-Control: max-stale=5"), T0 + 15).action == STALE
        assert reuse(s, req("Cache-Control: max-stale=5"), T0 + 16).action == VALIDATE
        assert reuse(s, req("Cache-Control: max-stale, max-stale=5"), T0 + 16).action == VALIDATE
        assert reuse(s, req("Cache-Control: max-stale=never"), T0 + 11).action == VALIDATE
        assert reuse(s, req('Cache-Control: max-stale="5"'), T0 + 15).reason == "max-stale"

    @pytest.mark.parametrize("cc,reason", [("must-revalidate", "must-revalidate"),
                                           ("proxy-revalidate", "proxy-revalidate"),
                                           ("s-maxage=10", "s-maxage")])
    def test_revalidate_when_stale_beats_max_stale(self, cc, reason):
        s = stored(200, f"Cache-Control: max-age=10, {cc}")
        assert reuse(s, req("Cache-Control: max-stale"), T0 + 5).action == HIT
        r = reuse(s, req("Cache-Control: max-stale"), T0 + 50)
        assert (r.action, r.reason) == (VALIDATE, reason)

    def test_proxy_revalidate_is_for_shared_caches(self):
        s = stored(200, "Cache-Control: max-age=10, proxy-revalidate")
        assert reuse(s, req("Cache-Control: max-stale"), T0 + 50, PRIVATE).action == STALE

    def test_stale_while_revalidate(self):
        s = stored(200, "Cache-Control: max-age=10, stale-while-revalidate=30")
        assert reuse(s, req(), T0 + 5).action == HIT
        r = reuse(s, req(), T0 + 40)
        assert (r.action, r.reason) == (STALE_REVALIDATE, "stale-while-revalidate") and r.serve
        assert reuse(s, req(), T0 + 41).action == VALIDATE
        s = stored(200, "Cache-Control: max-age=10, stale-while-revalidate=30, must-revalidate")
        assert reuse(s, req(), T0 + 20).reason == "must-revalidate"
        assert reuse(stored(200, "Cache-Control: max-age=10, stale-while-revalidate=x"),
                     req(), T0 + 20).action == VALIDATE

    def test_only_if_cached(self):
        s = stored(200, "Cache-Control: max-age=10")
        oic = req("Cache-Control: only-if-cached")
        assert reuse(s, oic, T0).action == HIT
        r = reuse(s, oic, T0 + 20)
        assert (r.action, r.reason) == (GATEWAY_TIMEOUT, "only-if-cached")
        assert reuse(s, req("Cache-Control: only-if-cached, max-stale"), T0 + 20).action == STALE
        assert miss(oic).action == GATEWAY_TIMEOUT
        assert miss(req()).action == MISS

    def test_head_from_stored_get(self):
        s = stored(200, "Cache-Control: max-age=60", "Content-Type: text/plain")
        head = req(method="HEAD")
        assert lookup_allowed(head).ok and cache_key(head) == cache_key(req())
        assert reuse(s, head, T0 + 1).action == HIT
        assert hit_fields(s, T0 + 1, 1234) == hit_fields(s, T0 + 1, 1234)
        assert ("Content-Length", "1234") in hit_fields(s, T0 + 1, 1234)

    @given(st.sampled_from(["max-age=100", "s-maxage=50, max-age=100", "no-cache", "max-age=x",
                            "max-age=30, stale-while-revalidate=10", "must-revalidate, max-age=5", ""]),
           st.sampled_from(["", "max-age=40", "min-fresh=10", "max-stale=5", "max-stale", "no-cache"]),
           st.integers(0, 10**6), st.integers(0, 10**6), st.integers(-100, 100))
    def test_freshness_is_monotone_in_time(self, rcc, qcc, t1, dt, skew):
        """A response usable at some time was usable at every earlier time (and age/lifetime
        make sense)."""
        lines = (f"Cache-Control: {rcc}",) if rcc else ()
        s = stored(200, *lines, date=format_http_date(T0 + skew))
        r = req(f"Cache-Control: {qcc}") if qcc else req()
        later, earlier = reuse(s, r, T0 + t1 + dt), reuse(s, r, T0 + t1)
        order = {HIT: 0, STALE: 1, STALE_REVALIDATE: 1, VALIDATE: 2}
        assert order[earlier.action] <= order[later.action]
        assert later.age >= earlier.age >= 0 and later.lifetime == earlier.lifetime >= 0


class TestStaleIfError:
    def test_response_window(self):
        s = stored(200, "Cache-Control: max-age=10, stale-if-error=60")
        assert stale_on_error(s, req(), T0 + 30, 503).action == STALE
        assert stale_on_error(s, req(), T0 + 30, None).reason == "stale-if-error"   # unreachable
        assert stale_on_error(s, req(), T0 + 71, 503).reason == "error"
        assert stale_on_error(s, req(), T0 + 30, 404).reason == "not-an-error"

    def test_request_window(self):
        s = stored(200, "Cache-Control: max-age=10")
        assert stale_on_error(s, req("Cache-Control: stale-if-error=100"), T0 + 30, 500).reason == \
            "stale-if-error-request"
        assert stale_on_error(s, req(), T0 + 30, 500).reason == "error"
        assert stale_on_error(s, req("Cache-Control: max-stale=30"), T0 + 30, 502).reason == "max-stale"

    def test_forbidden(self):
        for cc in ("must-revalidate", "no-cache", "proxy-revalidate", "s-maxage=10"):
            s = stored(200, f"Cache-Control: max-age=10, stale-if-error=600, {cc}")
            assert stale_on_error(s, req("Cache-Control: stale-if-error=600"), T0 + 30, 503).action == MISS

    def test_client_demands(self):
        s = stored(200, "Cache-Control: max-age=10, stale-if-error=600")
        assert stale_on_error(s, req("Cache-Control: no-cache"), T0 + 30, 503).reason == "no-cache-request"
        assert stale_on_error(s, req("Cache-Control: max-age=0, stale-if-error=60"), T0 + 30,
                              503).action == STALE


# -- Vary (RFC 9111 4.1) -------------------------------------------------------------------------

class TestVary:
    def test_names(self):
        assert vary_names(resp(200, "Vary: Accept-Encoding, accept-encoding", "Vary: User-Agent").fields) == \
            ("accept-encoding", "user-agent")
        assert vary_names(resp(200).fields) == ()
        assert vary_names(resp(200, "Vary: *").fields) is None
        assert vary_names(resp(200, "Vary: a b").fields) is None

    def test_normalisation(self):
        assert normalize_field("Accept-Encoding", ["GZIP ,  br"]) == "gzip,br"
        assert normalize_field("Accept-Encoding", ["gzip", "br"]) == "gzip,br"
        assert normalize_field("Accept-Language", ["en ; q = 0.5"]) == "en;q=0.5"
        assert normalize_field("X-Token", ["AbC"]) == "AbC"          # case kept for unknown fields
        assert normalize_field("X", []) is None

    def test_match(self):
        r = resp(200, "Vary: Accept-Encoding")
        key = variant_key(variant(r.fields, req("Accept-Encoding: gzip, br").fields))
        assert variant_matches(key, req("Accept-Encoding: GZIP,br"))
        assert variant_matches(key, req("Accept-Encoding: gzip", "Accept-Encoding: br").fields)
        assert not variant_matches(key, req("Accept-Encoding: br, gzip"))    # order can matter
        assert not variant_matches(key, req())

    def test_absent_matches_absent(self):
        key = variant_key(variant(resp(200, "Vary: Cookie").fields, req().fields))
        assert variant_matches(key, req())
        assert not variant_matches(key, req("Cookie: a=1"))

    def test_no_vary_and_garbage(self):
        assert variant_key(()) == ""
        assert variant_matches("", req("Anything: 1"))
        assert not variant_matches("{not json", req())
        assert not variant_matches("[[1, 2]]", req())

    @given(st.lists(st.tuples(st.sampled_from(["Accept", "Accept-Encoding", "Cookie", "X-A"]),
                              st.from_regex(r"[a-zA-Z0-9;=, ]{0,12}", fullmatch=True)), max_size=5))
    def test_a_request_matches_its_own_variant(self, lines):
        r = req(*[f"{n}: {v}" for n, v in lines])
        rs = resp(200, "Vary: accept, Accept-Encoding, cookie, x-a")
        assert variant_matches(variant_key(variant(rs.fields, r.fields)), r)


# -- validation (RFC 9111 4.3) ------------------------------------------------------------------------

LM = "Last-Modified: " + format_http_date(T0 - 3600)


class TestValidation:
    def test_validation_request(self):
        s = stored(200, 'ETag: "v1"', LM)
        client = req('If-None-Match: "other"', "If-Modified-Since: " + DATE0, "Accept: */*")
        v = validation_request(client, s)
        assert v.values("If-None-Match") == ['"v1"']
        assert v.values("If-Modified-Since") == [format_http_date(T0 - 3600)]
        assert v.values("Accept") == ["*/*"] and v.method == "GET" and v.path == "/x"
        head = forwarding_head(v, via="nfsplice")
        assert b'If-None-Match: "v1"\r\n' in head and b"other" not in head

    def test_without_validators_unconditional(self):
        v = validation_request(req('If-None-Match: "x"'), stored(200, 'ETag: broken'))
        assert v.values("If-None-Match") == [] and v.values("If-Modified-Since") == []

    def test_freshen_from_304(self):
        s = stored(200, "Cache-Control: max-age=10", 'ETag: "v1"', "Content-Type: text/plain",
                   "Age: 5", "X-Old: 1", "X-Old: 2")
        r304 = resp(304, 'ETag: "v1"', "Cache-Control: max-age=100", "X-Old: 3", "Content-Length: 99",
                    "Connection: X-Hop", "X-Hop: 1", date=format_http_date(T0 + 500))
        assert reuse(s, req(), T0 + 500).action == VALIDATE
        new, why = freshen(s, r304, T0 + 499, T0 + 500)
        assert why == "freshened"
        assert new.values("Cache-Control") == ["max-age=100"]
        assert new.values("Content-Type") == ["text/plain"]
        assert new.values("X-Old") == ["3"]                       # all old lines replaced
        assert new.values("Content-Length") == [] and new.values("X-Hop") == []
        assert new.values("Age") == []                            # the 304's age counts now
        assert new.values("Date") == [format_http_date(T0 + 500)]
        assert (new.request_time, new.response_time) == (T0 + 499, T0 + 500)
        assert reuse(new, req(), T0 + 550).action == HIT

    def test_freshen_keeps_what_describes_the_stored_bytes(self):
        """Content-Encoding and Content-MD5 describe the stored body, which a 304 does
        not resend: they are not taken over (RFC 9111 3.2)."""
        s = stored(200, 'ETag: "v1"', "Content-Encoding: gzip", "Content-MD5: AAA=", "X-A: 1")
        new, why = freshen(s, resp(304, 'ETag: "v1"', "Content-Encoding: br", "Content-MD5: BBB=", "X-A: 2"),
                           T0, T0)
        assert why == "freshened" and new.values("Content-Encoding") == ["gzip"]
        assert new.values("Content-MD5") == ["AAA="] and new.values("X-A") == ["2"]

    def test_freshen_adds_date(self):
        new, _ = freshen(stored(200, 'ETag: "a"'), resp(304, 'ETag: "a"', date=None), T0 + 9, T0 + 10)
        assert new.values("Date") == [format_http_date(T0 + 10)]

    @pytest.mark.parametrize("stored_tag,new_tag,ok", [
        ('"a"', '"a"', True), ('"a"', '"b"', False), ('W/"a"', 'W/"a"', True),
        ('"a"', 'W/"a"', True), ('W/"a"', '"a"', False), (None, '"a"', False)])
    def test_freshen_selection(self, stored_tag, new_tag, ok):
        s = stored(200, *([f"ETag: {stored_tag}"] if stored_tag else []))
        new, why = freshen(s, resp(304, f"ETag: {new_tag}"), T0, T0)
        assert (new is not None) == ok and why == ("freshened" if ok else "etag-mismatch")

    def test_freshen_by_last_modified_or_nothing(self):
        s = stored(200, LM)
        assert freshen(s, resp(304, LM), T0, T0)[1] == "freshened"
        other = "Last-Modified: " + format_http_date(T0 - 1)
        assert freshen(s, resp(304, other), T0, T0) == (None, "last-modified-mismatch")
        assert freshen(s, resp(304), T0, T0)[1] == "freshened"
        assert freshen(s, resp(200), T0, T0) == (None, "not-304")

    def test_freshen_with_head(self):
        s = stored(200, 'ETag: "a"', "Cache-Control: max-age=1")
        new, why = freshen_with_head(s, 10, resp(200, 'ETag: "a"', "Content-Length: 10",
                                                 "Cache-Control: max-age=99", method="HEAD"), T0, T0 + 1)
        assert why == "freshened" and new.values("Cache-Control") == ["max-age=99"]
        assert freshen_with_head(s, 10, resp(200, "Content-Length: 11", method="HEAD"), T0, T0)[1] == \
            "content-length-differs"
        assert freshen_with_head(s, 10, resp(200, 'ETag: "b"', method="HEAD"), T0, T0)[1] == "etag-differs"
        assert freshen_with_head(s, 10, resp(404, method="HEAD"), T0, T0)[1] == "not-200"


class TestConditionalHit:
    def test_if_none_match(self):
        s = stored(200, 'ETag: "v1"', LM)
        assert conditional_hit(s, req('If-None-Match: "v0", W/"v1"')) == policy.Verdict(True, "if-none-match")
        assert conditional_hit(s, req("If-None-Match: *")).ok
        assert conditional_hit(s, req('If-None-Match: "v2"')).reason == "etag-changed"
        assert conditional_hit(s, req("If-None-Match: v1")).reason == "if-none-match-malformed"
        assert conditional_hit(stored(200, 'ETag: W/"v1"'), req('If-None-Match: "v1"')).ok   # weak comparison
        assert conditional_hit(s, req('If-None-Match: "a,b", "v1"')).ok

    def test_if_none_match_takes_precedence(self):
        s = stored(200, 'ETag: "v1"', LM)
        assert not conditional_hit(s, req('If-None-Match: "v2"', "If-Modified-Since: " + DATE0))

    def test_if_modified_since(self):
        s = stored(200, LM)
        assert conditional_hit(s, req("If-Modified-Since: " + DATE0)).reason == "not-modified-since"
        before = "If-Modified-Since: " + format_http_date(T0 - 7200)
        assert conditional_hit(s, req(before)).reason == "modified"
        assert conditional_hit(s, req("If-Modified-Since: garbage")).reason == "no-conditional"
        assert not conditional_hit(s, req("If-Modified-Since: " + DATE0, "If-Modified-Since: " + DATE0))
        # without Last-Modified the stored Date counts (RFC 9111 4.3.2)
        assert conditional_hit(stored(200), req("If-Modified-Since: " + DATE0)).ok
        assert not conditional_hit(stored(200), req("If-Modified-Since: " + format_http_date(T0 - 1)))

    def test_only_for_2xx_get_head(self):
        assert conditional_hit(stored(404, 'ETag: "a"'), req("If-None-Match: *")).reason == "not-applicable"
        assert conditional_hit(stored(200), req("If-None-Match: *", method="HEAD")).ok

    def test_not_modified_fields(self):
        s = stored(200, 'ETag: "v1"', LM, "Cache-Control: max-age=9", "Content-Type: a/b", "Vary: Accept",
                   "Expires: " + DATE0, "Content-Location: /y", "Age: 3")
        f = dict(not_modified_fields(s, T0 + 10))
        assert set(f) == {"Date", "ETag", "Cache-Control", "Vary", "Expires", "Content-Location", "Age"}
        assert f["Age"] == "13"
        f = dict(not_modified_fields(stored(200, LM), T0))
        assert "Last-Modified" in f                       # no ETag: Last-Modified helps


class TestHitFields:
    def test_age_length_date(self):
        s = stored(200, "Age: 7", "Content-Type: text/plain", "Content-Length: 3", t_resp=T0)
        f = hit_fields(s, T0 + 3.9, 42)
        assert dict(f)["Age"] == "10" and dict(f)["Content-Length"] == "42"
        assert dict(f)["Date"] == DATE0                   # the origin's Date stays
        assert [n for n, _ in f].count("Age") == 1

    def test_204_has_no_length(self):
        assert "Content-Length" not in dict(hit_fields(stored(204), T0, 0))

    def test_date_from_response_time_if_lost(self):
        s = StoredResponse(200, "OK", (("X", "1"),), T0, T0 + 1)
        assert dict(hit_fields(s, T0 + 1, 0))["Date"] == format_http_date(T0 + 1)


# -- invalidation (RFC 9111 4.4) ---------------------------------------------------------------

class TestInvalidation:
    def test_unsafe_method_invalidates_target_and_same_origin_locations(self):
        r = resp(201, "Location: /new?x=1", "Content-Location: http://other.example/y")
        uris, why = invalidations(req(method="POST", target="/list"), r)
        assert why == "unsafe-method"
        assert uris == ["http://example.com/list", "http://example.com/new?x=1"]

    def test_content_location_same_origin(self):
        r = resp(200, "Content-Location: http://EXAMPLE.com:80/z")
        assert invalidations(req(method="PUT"), r)[0] == ["http://example.com/x", "http://example.com/z"]

    @pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "FROBNICATE"])
    def test_methods(self, method):
        assert invalidations(req(method=method), resp(204))[0] == ["http://example.com/x"]

    def test_not(self):
        assert invalidations(req(), resp(200)) == ([], "safe-method")
        assert invalidations(req(method="HEAD"), resp(200, method="HEAD")) == ([], "safe-method")
        assert invalidations(req(method="POST"), resp(500)) == ([], "error-status")
        assert invalidations(req(method="POST"), resp(404)) == ([], "error-status")
        assert invalidations(req(method="POST"), resp(302, "Location: /a"))[0] == \
            ["http://example.com/x", "http://example.com/a"]

    def test_key_of_invalidated_uri_is_the_cache_key(self):
        uris, _ = invalidations(req(method="DELETE", target="/a%7eb"), resp(200))
        assert uris == [cache_key(req(target="/a~b"))]

