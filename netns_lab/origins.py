"""Origin servers for the HTTP proxy tests, run inside the lab's origin namespace.

    with Lab("org") as lab, NginxOrigin(lab) as ngx, ScriptedOrigin(lab) as so:
        sha = ngx.add_file("big.bin", 256 << 20, seed=7)      # http://198.18.2.2:8000/big.bin
        lab.run(lab.client, "curl", "-s", so.url("/chunked/100000/4096?trailer=1"))
        so.requests()                                          # what the origin received

`NginxOrigin` is a real server (nginx 1.22, throw-away config and prefix): static files
with Content-Length, sendfile, Range, HEAD and keep-alive; `/chunked/<file>` serves the
same files chunked (a never-matching `sub_filter` drops Content-Length); `PUT
/upload/<file>` stores an upload in the docroot (dav); `= /204` returns 204.  nginx
cannot echo a body: `ScriptedOrigin` does that.

`ScriptedOrigin` is `python -m netns_lab.origins serve`: HTTP/1.1 over raw sockets, a
thread per connection, keep-alive and pipelining; the request path picks the behaviour
(numbers are byte counts, bodies are the first bytes of `stream_bytes(..., seed=0)`):

    /len/<n>                  Content-Length body
    /chunked/<n>/<c>          chunked, chunks of c bytes; ?trailer=1 adds a trailer
                              (X-Trailer-SHA256), ?ext=1 chunk extensions ";i=<index>",
                              ?mix=<seed> chunk sizes drawn from 1..c (a quarter of them
                              1 byte), ?pause=<k> sleeps 0.3 s once k body bytes went
                              (the proxy hands off meanwhile), ?bad_at=<k> puts a malformed
                              chunk-size line ("zz") in front of the first chunk from
                              body offset k on and carries on as if nothing happened
    /close/<n>                no Content-Length, body ends with the connection
                              (Connection: close is sent unless ?bare=1)
    /head-only/<n>            HEAD: headers announcing n bytes, no body; other methods 405
    /204, /304                no body (/304?cl=N adds Content-Length: N)
    /echo                     the request body back (CL or chunked request), with
                              X-Body-SHA256 and X-Body-Length; ?discard=1: headers only;
                              ?ignore_expect=1: no 100 Continue to an Expect, the body is
                              awaited (as many servers do); ?hints=1: a 103 Early Hints
                              right after the head of a request with Expect
    /expect                   "100 Continue" right after the request head, whether or not
                              it asked (?count=K sends K of them), then like /echo;
                              ?reject=1: 417 without reading the body, then close
    /upgrade                  with "Upgrade: echo": 101, then echoes raw bytes until EOF
                              (?reset=1: a RST after echoing the first bytes)
                              (?force=1: 101 also to a request that did not ask)
    /truncate/<n>/<k>         Content-Length n, k < n bytes, then FIN
    /truncate-chunked/<n>[/<c>]  chunked body without its last-chunk, then FIN
    /reset-chunked/<n>[/<c>]  the same, then RST (once everything sent is acknowledged)
    /reset/<n>/<k>            Content-Length n, k bytes (waits until acknowledged), RST
    /reset-close/<k>          close-delimited (no Content-Length, Connection: close), k
                              bytes (waits until acknowledged), then RST instead of the FIN
    /half-close/<n>           Content-Length body, shutdown(SHUT_WR), keeps reading until
                              EOF; logs an event "half-close-read" with what it read
    /stall/<n>/<k>/<secs>     Content-Length n, k bytes, sleeps secs, sends the rest
                              (?cut=1: closes instead of sending the rest)
    /bad/<case>               BAD_CASES[case].raw verbatim, then FIN; /bad lists them
    /extra/<n>                Content-Length n body followed by EXTRA_GARBAGE (100 bytes
                              that look like a response) on the same kept-alive connection

Cache headers (for the cache tests), as query parameters of /len, /chunked, /close,
/stall, /truncate and /reset (values URL-encoded):

    cc=<value>                Cache-Control: <value>
    expires=<s>               Expires: now + s (negative: in the past)
    etag=<tag>                ETag: "<tag>"; a request whose If-None-Match names it gets 304
    lm=<epoch s>              Last-Modified; If-Modified-Since at or after it gets 304
                              (ETag first: with both, If-None-Match decides, RFC 9110 13.2.2)
    vary=<name>               Vary: <name>, and X-Vary-Value: the request's <name> (or -)
    hdr=<Name: value>         an extra field (repeatable); also sent with a 304
    fail_after=<k>            after k requests for this exact target, 503 to the next ones

A 304 carries Date, X-Origin-Conn/-Seq, ETag, Last-Modified, Cache-Control, Expires and
the extra fields: what a cache takes over into its stored response (RFC 9111 4.3.4).
Each such request is logged like any other, so `requests()` counts what reached the origin.

Any other method than HEAD is served alike; HEAD gets the head only on /len, /chunked,
/close, /head-only, /204, /304, /echo.  A request carrying "Expect: 100-continue" and a
body gets "100 Continue" before the origin reads the body (not with ?ignore_expect=1).  Every response except
/bad carries X-Origin-Conn (connection number) and X-Origin-Seq (request number on it).

Each request is logged to a JSON-lines file before the answer is sent (`requests()`):
conn, seq, peer, method, target, version, headers (order and case kept), head (raw,
latin-1), body_length, body_sha256, chunked, trailers.  That entry is written once the
body was read; an event "head" (conn, seq, peer, method, target, chunked, content_length)
is written as soon as a request head is parsed, before its body (`heads()`): a request
whose body never arrives leaves that trace only.

`expected_sha256(path)` gives the sha256 of the body bytes the scripted origin sends
for a path; `raw_exchange` / `raw_request` talk to a server with plain sockets from a
namespace (for the misbehaving cases); `parse_response` and `decode_chunked` take the
bytes apart.  Standard library only: the server side runs with any python3.
"""
from __future__ import annotations

import argparse
import base64
import email.utils
import fcntl
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

REPO = Path(__file__).resolve().parent.parent
ORIGIN_ADDR = "198.18.2.2"
NGINX_PORT = 8000
SCRIPTED_PORT = 8001
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

# -- deterministic content ---------------------------------------------------------------
PERIOD = 1_048_573          # a prime just under 1 MiB: the stream repeats every PERIOD bytes,
                            # so a block moved by a power-of-two offset changes the hash
_blocks: dict[int, memoryview] = {}
_sha_cache: dict[tuple[int, int], str] = {}


def _block(seed: int) -> memoryview:
    """PERIOD bytes of SHAKE-256 output for SEED, twice: any slice up to PERIOD is contiguous."""
    b = _blocks.get(seed)
    if b is None:
        one = hashlib.shake_256(b"nfsplice-origin-stream:%d" % seed).digest(PERIOD)
        b = _blocks[seed] = memoryview(one + one)
    return b


def iter_stream(offset: int, size: int, seed: int = 0):
    """Memoryviews covering bytes [offset, offset+size) of the stream of SEED."""
    blk = _block(seed)
    while size > 0:
        o = offset % PERIOD
        n = min(size, PERIOD)
        yield blk[o:o + n]
        offset += n
        size -= n


def stream_bytes(size: int, seed: int = 0, offset: int = 0) -> bytes:
    """Bytes [offset, offset+size) of the stream of SEED (content of files and bodies)."""
    return b"".join(iter_stream(offset, size, seed))


def stream_sha256(size: int, seed: int = 0) -> str:
    """sha256 (hex) of the first SIZE bytes of the stream of SEED."""
    key = (size, seed)
    if key not in _sha_cache:
        h = hashlib.sha256()
        for v in iter_stream(0, size, seed):
            h.update(v)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
EXTRA_GARBAGE = (b"HTTP/1.1 200 OK\r\nX-Smuggled: yes\r\nContent-Length: 16\r\n\r\n"
                 b"smuggled-garbage").ljust(100, b"#")
assert len(EXTRA_GARBAGE) == 100


def _path_only(path: str) -> str:
    path = path.split("?", 1)[0]
    m = re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*", path)       # absolute-form
    if m:
        path = path[m.end():] or "/"
    return path


def expected_length(path: str) -> int:
    """Number of body bytes (after chunked decoding) the scripted origin sends for PATH
    on GET: the first N bytes of stream_bytes(N, seed=0)."""
    p = _path_only(path).strip("/").split("/")
    kind, nums = p[0], p[1:]
    try:
        args = [int(x) for x in nums]
    except ValueError:
        raise ValueError(f"not a numeric path: {path}") from None
    if kind in ("len", "close", "half-close", "extra", "truncate-chunked", "reset-chunked", "reset-close") and args:
        return args[0]
    if kind == "chunked" and len(args) == 2:
        return args[0]
    if kind in ("truncate", "reset") and len(args) == 2:
        return min(args)
    if kind == "stall" and len(args) == 3:
        return args[0]
    if kind in ("204", "304", "head-only"):
        return 0
    raise ValueError(f"no deterministic body for {path} (echo, expect, upgrade and bad depend on more)")


def expected_sha256(path: str) -> str:
    """sha256 of the body bytes the scripted origin sends for PATH (GET); for /truncate
    and /reset only the k bytes sent, for /extra without the garbage."""
    return stream_sha256(expected_length(path))


# -- catalogue of malformed responses ------------------------------------------------------
@dataclass(frozen=True)
class BadCase:
    raw: bytes          # exactly what the origin sends, then it closes (FIN)
    what: str           # what is wrong, and what a careful proxy does with it


BAD_CASES: dict[str, BadCase] = {
    "cl-te": BadCase(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "Content-Length and Transfer-Encoding together (RFC 9112 6.3: chunked wins, the "
        "connection must be closed after; forwarding both is request/response smuggling)"),
    "two-cl": BadCase(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "two Content-Length fields with different values: unrecoverable framing error (502)"),
    "cl-list": BadCase(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
        "one Content-Length field with a list of different values: framing error"),
    "cl-negative": BadCase(
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
        "negative Content-Length: not 1*DIGIT, framing error"),
    "cl-plus": BadCase(
        b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
        "Content-Length with a sign (strtol accepts it, the grammar does not)"),
    "bad-chunk-size": BadCase(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        "chunk size that is not hexadecimal"),
    "chunk-size-overflow": BadCase(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n",
        "chunk size of 17 hex digits: overflows 64 bits (wraps to 5 when truncated)"),
    "chunk-missing-crlf": BadCase(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX0\r\n\r\n",
        "chunk data not followed by CRLF"),
    "obs-fold": BadCase(
        b"HTTP/1.1 200 OK\r\nX-Folded: first\r\n second\r\nContent-Length: 5\r\n\r\nhello",
        "obs-fold line (a header continued on a line starting with a space): a proxy "
        "must reject or replace it with spaces before forwarding (RFC 9112 5.2)"),
    "nul-in-value": BadCase(
        b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b\r\nContent-Length: 5\r\n\r\nhello",
        "NUL byte in a field value"),
    "bare-cr": BadCase(
        b"HTTP/1.1 200 OK\r\nX-Cr: a\rb\r\nContent-Length: 5\r\n\r\nhello",
        "bare CR inside a field value"),
    "space-before-colon": BadCase(
        b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello",
        "whitespace between field name and colon (a proxy must remove it or reject)"),
    "invalid-name": BadCase(
        b"HTTP/1.1 200 OK\r\nX Bad: 1\r\nContent-Length: 5\r\n\r\nhello",
        "space inside a field name"),
    "no-colon": BadCase(
        b"HTTP/1.1 200 OK\r\nNot a header line\r\nContent-Length: 5\r\n\r\nhello",
        "header line without a colon"),
    "bare-lf": BadCase(
        b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello",
        "lines ended by LF only (tolerated by many, a strict parser rejects)"),
    "http2-status": BadCase(
        b"HTTP/2.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        "HTTP/2.0 in an HTTP/1.1 status line"),
    "bad-status-code": BadCase(
        b"HTTP/1.1 2000 OK\r\nContent-Length: 5\r\n\r\nhello",
        "status code of four digits"),
    "te-chunked-not-last": BadCase(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "transfer codings not ending in chunked: the body runs until close (RFC 9112 6.3)"),
    "te-unknown": BadCase(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\nhello",
        "unknown transfer coding (501 for a request; here close-delimited at best)"),
    "eof-in-head": BadCase(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n",
        "the connection closes before the head ends"),
    "header-too-long": BadCase(
        b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (100 << 10) + b"\r\nContent-Length: 5\r\n\r\nhello",
        "a 100 KiB field value: beyond any sane head size limit"),
}


# -- small HTTP parsing helpers (for the tests) ------------------------------------------------
@dataclass
class Response:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    head_len: int                    # bytes of the head including the empty line

    def get(self, name: str, default: str | None = None) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


def parse_response(data: bytes, pos: int = 0) -> Response:
    """Parse the response head starting at POS (CRLF lines); ValueError when incomplete."""
    end = data.find(b"\r\n\r\n", pos)
    if end < 0:
        raise ValueError("incomplete response head")
    lines = data[pos:end].decode("latin-1").split("\r\n")
    m = re.fullmatch(r"(HTTP/\d\.\d) (\d{3})(?: (.*))?", lines[0])
    if not m:
        raise ValueError(f"bad status line {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"bad header line {line!r}")
        headers.append((name, value.strip(" \t")))
    return Response(m.group(1), int(m.group(2)), m.group(3) or "", headers, end + 4 - pos)


def decode_chunked(data: bytes, pos: int = 0) -> tuple[bytes, list[tuple[str, str]], int, list[int]]:
    """Decode a chunked body starting at POS: (body, trailers, end position, chunk sizes).
    ValueError when malformed or incomplete."""
    body, sizes, trailers = bytearray(), [], []
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError("incomplete chunk size line")
        size_txt = data[pos:eol].split(b";", 1)[0].strip()
        if not re.fullmatch(rb"[0-9a-fA-F]{1,16}", size_txt):
            raise ValueError(f"bad chunk size {size_txt!r}")
        size = int(size_txt, 16)
        pos = eol + 2
        if size == 0:
            break
        if len(data) < pos + size + 2:
            raise ValueError("incomplete chunk")
        body += data[pos:pos + size]
        sizes.append(size)
        if data[pos + size:pos + size + 2] != b"\r\n":
            raise ValueError("chunk data not followed by CRLF")
        pos += size + 2
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError("incomplete trailer section")
        line = data[pos:eol]
        pos = eol + 2
        if not line:
            return bytes(body), trailers, pos, sizes
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise ValueError(f"bad trailer line {line!r}")
        trailers.append((name, value.strip()))


def request_bytes(method: str, target: str, host: str = ORIGIN_ADDR, headers=(), body: bytes = b"",
                  chunked: bool = False, close: bool = False) -> bytes:
    """An HTTP/1.1 request; Content-Length is added for a body unless CHUNKED."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{n}: {v}" for n, v in headers]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        body = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    elif body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- scripted origin: the server side ---------------------------------------------------------
class _Bad(Exception):
    """A request the origin cannot parse: answered 400, then the connection closes."""


class _Gone(Exception):
    """The peer closed or reset the connection."""


REASONS = {100: "Continue", 101: "Switching Protocols", 200: "OK", 204: "No Content",
           304: "Not Modified", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           417: "Expectation Failed", 426: "Upgrade Required"}
TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
RECV = 256 << 10


@dataclass
class _Request:
    method: str
    target: str
    path: str
    query: dict
    version: str
    headers: list[tuple[str, str]]
    raw_head: bytes
    chunked: bool = False
    length: int = 0
    cl_and_te: bool = False

    def get_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name]

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for v in self.get_all(name) for t in v.split(",") if t.strip()}

    def q(self, name: str, default: str | None = None) -> str | None:
        v = self.query.get(name)
        return v[-1] if v else default


class _Conn:
    def __init__(self, server: "ScriptedServer", sock: socket.socket, peer, cid: int):
        self.server, self.sock, self.cid = server, sock, cid
        self.peer = f"{peer[0]}:{peer[1]}"
        self.buf = bytearray()
        self.seq = 0

    # reading
    def _fill(self) -> bool:
        try:
            data = self.sock.recv(RECV)
        except (ConnectionError, socket.timeout):
            return False
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self) -> bytes | None:
        while True:
            while self.buf[:2] == b"\r\n" or self.buf[:1] == b"\n":    # empty lines before a request
                del self.buf[:2 if self.buf[:1] == b"\r" else 1]
            m = re.search(rb"\r?\n\r?\n", self.buf)
            if m:
                head = bytes(self.buf[:m.end()])
                del self.buf[:m.end()]
                return head
            if len(self.buf) > (64 << 10):
                raise _Bad("request head over 64 KiB")
            if not self._fill():
                if self.buf.strip():
                    raise _Gone("EOF inside a request head")
                return None

    def read_line(self, limit: int = 8192) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line
            if len(self.buf) > limit:
                raise _Bad("line too long")
            if not self._fill():
                raise _Gone("EOF inside a body")

    def read_exact(self, n: int, h, keep: bytearray | None) -> None:
        while n > 0:
            if not self.buf and not self._fill():
                raise _Gone("EOF inside a body")
            take = min(n, len(self.buf))
            piece = self.buf[:take]
            h.update(piece)
            if keep is not None:
                keep += piece
            del self.buf[:take]
            n -= take

    def parse_head(self, head: bytes) -> _Request:
        lines = re.split(rb"\r?\n", head.rstrip(b"\r\n"))
        m = re.fullmatch(rb"(" + TOKEN.pattern + rb") (\S+) (HTTP/\d\.\d)", lines[0])
        if not m:
            raise _Bad(f"bad request line {lines[0][:200]!r}")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t") and headers:          # obs-fold: tolerated, kept in raw head
                n, v = headers[-1]
                headers[-1] = (n, v + " " + line.strip().decode("latin-1"))
                continue
            name, sep, value = line.partition(b":")
            if not sep or not TOKEN.fullmatch(name):
                raise _Bad(f"bad header line {line[:200]!r}")
            headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        target = m.group(2).decode("latin-1")
        path, _, qs = target.partition("?")
        req = _Request(m.group(1).decode(), target, _path_only(path), parse_qs(qs), m.group(3).decode(),
                       headers, head)
        te = [t.strip().lower() for v in req.get_all("transfer-encoding") for t in v.split(",") if t.strip()]
        cls = {t.strip() for v in req.get_all("content-length") for t in v.split(",")}
        if te:
            if te[-1] != "chunked":
                raise _Bad("Transfer-Encoding of a request must end in chunked")
            req.chunked, req.cl_and_te = True, bool(cls)
        elif cls:
            if len(cls) != 1 or not next(iter(cls)).isdigit():
                raise _Bad(f"bad Content-Length {cls}")
            req.length = int(next(iter(cls)))
        return req

    def read_body(self, req: _Request, keep: bool) -> dict:
        h, data, trailers = hashlib.sha256(), (bytearray() if keep else None), []
        total = 0
        if req.chunked:
            while True:
                line = self.read_line()
                size_txt = line.split(b";", 1)[0].strip()
                if not re.fullmatch(rb"[0-9a-fA-F]{1,15}", size_txt):
                    raise _Bad(f"bad chunk size {size_txt[:40]!r}")
                size = int(size_txt, 16)
                if size == 0:
                    break
                self.read_exact(size, h, data)
                total += size
                if self.read_line() not in (b"\r\n", b"\n"):
                    raise _Bad("chunk data not followed by CRLF")
            while True:
                line = self.read_line().rstrip(b"\r\n")
                if not line:
                    break
                n, _, v = line.decode("latin-1").partition(":")
                trailers.append((n, v.strip()))
        else:
            self.read_exact(req.length, h, data)
            total = req.length
        return {"length": total, "sha256": h.hexdigest(), "data": data, "trailers": trailers}

    # writing
    def head(self, req: _Request | None, status: int, headers=(), close: bool = False) -> bytes:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
                 f"Date: {email.utils.formatdate(usegmt=True)}", "Server: nfsplice-scripted-origin",
                 f"X-Origin-Conn: {self.cid}", f"X-Origin-Seq: {self.seq}"]
        lines += [f"{n}: {v}" for n, v in headers]
        if close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def send(self, data) -> None:
        self.sock.sendall(data)

    def send_stream(self, offset: int, n: int, prefix: bytes = b"") -> None:
        if prefix and n <= (64 << 10):
            self.send(prefix + stream_bytes(n, offset=offset))
            return
        if prefix:
            self.send(prefix)
        for v in iter_stream(offset, n):
            self.send(v)

    def send_chunked(self, n: int, c: int, ext: bool, last: bytes | None, mix: int | None = None,
                     pause: int | None = None, bad_at: int | None = None) -> None:
        out, off, i = bytearray(), 0, 0
        rnd = random.Random(mix)
        while off < n:
            size = min(c if mix is None else (1 if rnd.random() < 0.25 else rnd.randint(1, c)), n - off)
            if bad_at is not None and off >= bad_at:
                out += b"zz\r\n"
                bad_at = None
            if pause is not None and off >= pause:
                self.send(out)
                out.clear()
                time.sleep(0.3)
                pause = None
            out += b"%x" % size
            if ext:
                out += b";i=%d" % i
            out += b"\r\n"
            if size > (64 << 10):
                self.send(out)
                out.clear()
                self.send_stream(off, size)
            else:
                out += stream_bytes(size, offset=off)
            out += b"\r\n"
            if len(out) >= RECV:
                self.send(out)
                out.clear()
            off += size
            i += 1
        if last is not None:
            out += last
        if out:
            self.send(out)

    def graceful_close(self, linger: float = 5.0) -> None:
        """FIN, then read until the peer closes (no RST for data still arriving)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(linger)
            while self.sock.recv(RECV):
                pass
        except OSError:
            pass

    def reset(self) -> None:
        """RST once everything sent is acknowledged (so the peer has the bytes)."""
        deadline = time.monotonic() + 5
        buf = bytearray(4)
        while time.monotonic() < deadline:
            fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, buf)
            if struct.unpack("i", buf)[0] == 0:
                break
            time.sleep(0.005)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    # the loop
    def run(self) -> None:
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.settimeout(self.server.idle_timeout)
            while True:
                try:
                    head = self.read_head()
                    if head is None:
                        break
                    self.seq += 1
                    req = self.parse_head(head)
                    self.server.record({"event": "head", "time": time.time(), "conn": self.cid, "seq": self.seq,
                                        "peer": self.peer, "method": req.method, "target": req.target,
                                        "chunked": req.chunked,
                                        "content_length": None if req.chunked else req.length})
                except _Bad as e:
                    self.server.record({"event": "bad-request", "conn": self.cid, "seq": self.seq,
                                        "peer": self.peer, "error": str(e)})
                    body = f"{e}\n".encode()
                    self.send(self.head(None, 400, [("Content-Length", str(len(body)))], close=True) + body)
                    self.graceful_close()
                    break
                outcome = self.handle(req)
                if outcome == "close":
                    self.graceful_close()
                if outcome != "keep":
                    break
        except (_Gone, _Bad, OSError):
            pass
        finally:
            try:
                self.sock.close()
            except OSError:
                pass

    def log(self, req: _Request, body: dict | None, **extra) -> None:
        entry = {"event": "request", "time": time.time(), "conn": self.cid, "seq": self.seq, "peer": self.peer,
                 "method": req.method, "target": req.target, "path": req.path, "version": req.version,
                 "headers": [list(h) for h in req.headers], "head": req.raw_head.decode("latin-1"),
                 "chunked": req.chunked, "body_length": None, "body_sha256": None, "trailers": []}
        if body is not None:
            entry.update(body_length=body["length"], body_sha256=body["sha256"],
                         trailers=[list(t) for t in body["trailers"]])
        entry.update(extra)
        self.server.record(entry)

    def cache_fields(self, req: _Request) -> list[tuple[str, str]]:
        """The fields the query asks for (see the module doc)."""
        out = []
        if req.q("cc") is not None:
            out.append(("Cache-Control", req.q("cc")))
        if req.q("expires") is not None:
            out.append(("Expires", email.utils.formatdate(time.time() + float(req.q("expires")), usegmt=True)))
        if req.q("etag") is not None:
            out.append(("ETag", f'"{req.q("etag")}"'))
        if req.q("lm") is not None:
            out.append(("Last-Modified", email.utils.formatdate(float(req.q("lm")), usegmt=True)))
        if req.q("vary") is not None:
            name = req.q("vary")
            out.append(("Vary", name))
            out.append(("X-Vary-Value", ", ".join(req.get_all(name.lower())) or "-"))
        for h in req.query.get("hdr", []):
            name, _, value = h.partition(":")
            out.append((name.strip(), value.strip()))
        return out

    def not_modified(self, req: _Request) -> bool:
        """If-None-Match names our ETag, or (without If-None-Match) If-Modified-Since is
        at or after our Last-Modified."""
        inm = ", ".join(req.get_all("if-none-match"))
        if inm and req.q("etag") is not None:
            return inm.strip() == "*" or f'"{req.q("etag")}"' in inm
        ims = req.get_all("if-modified-since")
        if not inm and ims and req.q("lm") is not None:
            try:
                since = email.utils.parsedate_to_datetime(ims[0]).timestamp()
            except (TypeError, ValueError):
                return False
            return since >= float(req.q("lm"))
        return False

    def handle(self, req: _Request) -> str:
        parts = req.path.strip("/").split("/")
        kind, args = parts[0], parts[1:]
        close = (req.version == "HTTP/1.0" and "keep-alive" not in req.tokens("connection")) \
            or "close" in req.tokens("connection") or req.cl_and_te
        head_only = req.method == "HEAD"
        has_body = req.chunked or req.length > 0
        sent_100 = 0

        if kind == "expect":
            if req.q("reject"):
                self.log(req, None, body_read=False)
                self.send(self.head(req, 417, [("Content-Length", "0")], close=True))
                return "close"
            sent_100 = max(0, int(req.q("count", "1")))
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n" * sent_100)
        elif has_body and "100-continue" in req.tokens("expect"):
            if req.q("hints"):
                self.send(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            if not req.q("ignore_expect"):
                self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                sent_100 = 1
        try:
            body = self.read_body(req, keep=kind in ("echo", "expect") and not req.q("discard"))
        except _Bad as e:
            self.log(req, None, error=str(e))
            msg = f"{e}\n".encode()
            self.send(self.head(req, 400, [("Content-Length", str(len(msg)))], close=True) + msg)
            return "close"
        self.log(req, body, sent_100=sent_100)

        try:
            nums = [int(a) for a in args]
        except ValueError:
            nums = None
        fin = "close" if close else "keep"

        def need(count: int) -> bool:
            return nums is not None and len(nums) == count

        extra = self.cache_fields(req) if kind in ("len", "chunked", "close", "stall", "truncate", "reset") else []
        limit = req.q("fail_after")
        if limit is not None and self.server.count(req.target) > int(limit):
            msg = b"failing on purpose (fail_after)\n"
            self.send(self.head(req, 503, [("Content-Length", str(len(msg)))], close) + msg)
            return fin
        if extra and self.not_modified(req):
            self.send(self.head(req, 304, [f for f in extra if f[0] != "X-Vary-Value"], close))
            return fin

        if kind == "len" and need(1):
            n = nums[0]
            h = self.head(req, 200, [("Content-Length", str(n))] + extra, close)
            self.send(h) if head_only else self.send_stream(0, n, prefix=h)
            return fin
        if kind == "chunked" and need(2) and nums[1] > 0:
            n, c = nums
            trailer = bool(req.q("trailer"))
            hdrs = [("Transfer-Encoding", "chunked")] + ([("Trailer", "X-Trailer-SHA256")] if trailer else []) + extra
            self.send(self.head(req, 200, hdrs, close))
            if not head_only:
                last = b"0\r\n" + (f"X-Trailer-SHA256: {stream_sha256(n)}\r\n".encode() if trailer else b"") + b"\r\n"
                num = lambda k: None if req.q(k) is None else int(req.q(k))  # noqa: E731
                self.send_chunked(n, c, bool(req.q("ext")), last, mix=num("mix"), pause=num("pause"),
                                  bad_at=num("bad_at"))
            return fin
        if kind == "close" and need(1):
            h = self.head(req, 200, extra, close=not req.q("bare"))
            self.send(h) if head_only else self.send_stream(0, nums[0], prefix=h)
            return "close"
        if kind == "head-only" and (need(1) or not args):
            n = nums[0] if args else 0
            if head_only:
                self.send(self.head(req, 200, [("Content-Length", str(n))], close))
            else:
                self.send(self.head(req, 405, [("Allow", "HEAD"), ("Content-Length", "0")], close))
            return fin
        if kind == "204" and not args:
            self.send(self.head(req, 204, [], close))
            return fin
        if kind == "304" and not args:
            hdrs = [("ETag", '"nfsplice"')] + ([("Content-Length", req.q("cl"))] if req.q("cl") else [])
            self.send(self.head(req, 304, hdrs, close))
            return fin
        if kind in ("echo", "expect") and not args:
            data = body["data"] if body["data"] is not None else b""
            hdrs = [("Content-Length", str(len(data))), ("X-Body-SHA256", body["sha256"]),
                    ("X-Body-Length", str(body["length"])), ("X-Request-Chunked", "1" if req.chunked else "0")]
            h = self.head(req, 200, hdrs, close)
            self.send(h if head_only else h + data)
            return fin
        if kind == "upgrade" and not args:
            if "echo" not in req.tokens("upgrade") and not req.q("force"):
                self.send(self.head(req, 426, [("Upgrade", "echo"), ("Connection", "Upgrade"),
                                               ("Content-Length", "0")], close))
                return fin
            self.send(self.head(req, 101, [("Upgrade", "echo"), ("Connection", "Upgrade")]))
            if self.buf:
                self.send(bytes(self.buf))
                self.buf.clear()
            while True:
                try:
                    data = self.sock.recv(RECV)
                except socket.timeout:
                    break
                if not data:
                    break
                self.send(data)
                if req.q("reset"):
                    self.reset()
                    return "done"
            return "close"
        if kind == "truncate" and need(2) and nums[1] <= nums[0]:
            n, k = nums
            self.send_stream(0, k, prefix=self.head(req, 200, [("Content-Length", str(n))] + extra))
            return "close"
        if kind == "truncate-chunked" and (need(1) or need(2)):
            n, c = nums[0], (nums[1] if len(nums) == 2 else 4096)
            self.send(self.head(req, 200, [("Transfer-Encoding", "chunked")]))
            self.send_chunked(n, max(1, c), False, None)
            return "close"
        if kind == "reset-chunked" and (need(1) or need(2)):
            n, c = nums[0], (nums[1] if len(nums) == 2 else 4096)
            self.send(self.head(req, 200, [("Transfer-Encoding", "chunked")]))
            self.send_chunked(n, max(1, c), False, None)
            self.reset()
            return "done"
        if kind == "reset" and need(2) and nums[1] <= nums[0]:
            n, k = nums
            self.send_stream(0, k, prefix=self.head(req, 200, [("Content-Length", str(n))] + extra))
            self.reset()
            return "done"
        if kind == "reset-close" and need(1):
            self.send_stream(0, nums[0], prefix=self.head(req, 200, close=True))
            self.reset()
            return "done"
        if kind == "half-close" and need(1):
            n = nums[0]
            self.send_stream(0, n, prefix=self.head(req, 200, [("Content-Length", str(n))]))
            self.sock.shutdown(socket.SHUT_WR)
            h, got, end = hashlib.sha256(), len(self.buf), "eof"
            h.update(self.buf)
            self.buf.clear()
            try:
                while True:
                    data = self.sock.recv(RECV)
                    if not data:
                        break
                    h.update(data)
                    got += len(data)
            except socket.timeout:
                end = "timeout"
            except ConnectionError:
                end = "reset"
            self.server.record({"event": "half-close-read", "time": time.time(), "conn": self.cid,
                                "seq": self.seq, "bytes": got, "sha256": h.hexdigest(), "end": end})
            return "done"
        if kind == "stall" and len(args) == 3:
            try:
                n, k, secs = int(args[0]), int(args[1]), float(args[2])
            except ValueError:
                n = k = -1
            if 0 <= k <= n:
                self.send_stream(0, k, prefix=self.head(req, 200, [("Content-Length", str(n))] + extra, close))
                time.sleep(secs)
                if req.q("cut"):
                    return "close"
                self.send_stream(k, n - k)
                return fin
        if kind == "bad":
            if not args or args == [""]:
                listing = json.dumps({k: v.what for k, v in BAD_CASES.items()}, indent=1).encode() + b"\n"
                self.send(self.head(req, 200, [("Content-Type", "application/json"),
                                               ("Content-Length", str(len(listing)))], close) + listing)
                return fin
            case = BAD_CASES.get(args[0])
            if case is not None and len(args) == 1:
                self.send(case.raw)
                return "close"
        if kind == "extra" and need(1):
            n = nums[0]
            self.send_stream(0, n, prefix=self.head(req, 200, [("Content-Length", str(n))], close))
            self.send(EXTRA_GARBAGE)
            return fin
        msg = f"no such behaviour: {req.path}\n".encode()
        self.send(self.head(req, 404, [("Content-Length", str(len(msg)))], close) + msg)
        return fin


class ScriptedServer:
    def __init__(self, addr: tuple[str, int], log_path: str | None, idle_timeout: float = 60.0):
        self.idle_timeout = idle_timeout
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(addr)
        self.lsock.listen(512)
        self.lock = threading.Lock()
        self.logf = open(log_path, "a", encoding="utf-8") if log_path else None
        self.ids = itertools.count(1)
        self.counts: dict[str, int] = {}

    def count(self, target: str) -> int:
        """How many requests for TARGET (this one included) the origin has had."""
        with self.lock:
            self.counts[target] = self.counts.get(target, 0) + 1
            return self.counts[target]

    def record(self, entry: dict) -> None:
        if self.logf is None:
            return
        line = json.dumps(entry) + "\n"
        with self.lock:
            self.logf.write(line)
            self.logf.flush()

    def serve_forever(self) -> None:
        while True:
            sock, peer = self.lsock.accept()
            conn = _Conn(self, sock, peer, next(self.ids))
            threading.Thread(target=conn.run, daemon=True).start()


# -- raw client (runs in a namespace) ------------------------------------------------------
def _raw_client(addr: tuple[str, int], steps: list, idle: float, connect_timeout: float) -> dict:
    t0 = time.monotonic()
    sock = socket.create_connection(addr, timeout=connect_timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(idle)
    data, marks, end = bytearray(), [], None

    def recv() -> bool:
        nonlocal end
        try:
            chunk = sock.recv(RECV)
        except socket.timeout:
            end = "idle"
            return False
        except ConnectionResetError:
            end = "reset"
            return False
        if not chunk:
            end = "eof"
            return False
        data.extend(chunk)
        return True

    for step in steps:
        op, arg = step[0], (step[1] if len(step) > 1 else None)
        if op == "send":
            try:
                sock.sendall(base64.b64decode(arg))
            except (BrokenPipeError, ConnectionResetError):
                end = end or "reset"
        elif op == "until":
            want = base64.b64decode(arg)
            while want not in data and end is None and recv():
                pass
        elif op == "recv":
            while len(data) < arg and end is None and recv():
                pass
        elif op == "eof":
            while end is None and recv():
                pass
        elif op == "sleep":
            time.sleep(arg)
        elif op == "shutdown":
            sock.shutdown(socket.SHUT_WR)
        elif op == "close":
            end = end or "closed"
        else:
            raise ValueError(f"unknown step {op!r}")
        marks.append([time.monotonic() - t0, len(data)])
        if op == "close":
            break
    while end is None and recv():
        pass
    sock.close()
    return {"data": base64.b64encode(bytes(data)).decode(), "end": end,
            "elapsed": time.monotonic() - t0, "marks": marks}


@dataclass
class RawResult:
    data: bytes
    end: str                 # "eof", "reset", "idle" (nothing for IDLE s) or "closed" (a close step)
    elapsed: float
    marks: list[tuple[float, int]] = field(default_factory=list)   # (s since connect, bytes so far) per step

    def response(self, pos: int = 0) -> Response:
        return parse_response(self.data, pos)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def raw_exchange(lab, steps, port: int = SCRIPTED_PORT, addr: str = ORIGIN_ADDR, ns: str | None = None,
                 idle: float = 2.0, timeout: float = 60.0) -> RawResult:
    """Connect from NS (default lab.client) and run STEPS, then read until EOF, RST or IDLE
    seconds of silence.  Steps: bytes (send), ("send", b), ("until", b) read until b was
    received, ("recv", n) until n bytes in all, ("eof",), ("sleep", s), ("shutdown",)
    (SHUT_WR), ("close",) close now without the final read."""
    enc = []
    for s in steps:
        if isinstance(s, (bytes, bytearray)):
            s = ("send", s)
        op, rest = s[0], list(s[1:])
        if rest and isinstance(rest[0], (bytes, bytearray)):
            rest[0] = base64.b64encode(rest[0]).decode()
        enc.append([op, *rest])
    p = lab.run(ns or lab.client, sys.executable, "-m", "netns_lab.origins", "raw", "--connect", f"{addr}:{port}",
                "--idle", str(idle), input=json.dumps(enc).encode(), timeout=timeout, cwd=REPO, env=_env())
    out = json.loads(p.stdout)
    return RawResult(base64.b64decode(out["data"]), out["end"], out["elapsed"], [tuple(m) for m in out["marks"]])


def raw_request(lab, request: bytes, port: int = SCRIPTED_PORT, **kw) -> RawResult:
    """Send REQUEST on a new connection and read until EOF, RST or idle."""
    return raw_exchange(lab, [request], port=port, **kw)


# -- process management (test side) -------------------------------------------------------
def _listening(pid: int, addr: str, port: int) -> bool:
    """Whether ADDR:PORT listens in PID's network namespace (/proc/PID/net/tcp: no probe)."""
    want_ip = "%08X" % int.from_bytes(socket.inet_aton(addr), sys.byteorder)
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        f = line.split()
        ip, _, p = f[1].partition(":")
        if f[3] == "0A" and p == "%04X" % port and ip in (want_ip, "00000000"):
            return True
    return False


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace").strip()
    except OSError:
        return ""


class _Served:
    """A server process in a namespace: started, waited for until it listens, always stopped."""
    stop_signal = signal.SIGTERM
    name = "origin"

    def __init__(self, lab, addr: str, port: int, ns: str | None, keep_dir: bool):
        self.lab, self.addr, self.port = lab, addr, port
        self.ns = ns or lab.origin
        self.keep_dir = keep_dir
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def url(self, path: str = "/") -> str:
        return f"http://{self.addr}:{self.port}/{path.lstrip('/')}"

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        pass

    def _diagnostics(self) -> str:
        return _tail(self.dir / "stderr.log")

    def __enter__(self):
        self.dir = Path(tempfile.mkdtemp(prefix=f"nfsplice-{self.name}-"))
        try:
            self._prepare()
            with open(self.dir / "stdout.log", "wb") as out, open(self.dir / "stderr.log", "wb") as err:
                self.proc = self.lab.popen(self.ns, *self._argv(), stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=err, cwd=REPO, env=_env(), start_new_session=True)
            deadline = time.monotonic() + START_TIMEOUT
            while not _listening(self.proc.pid, self.addr, self.port):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before listening: "
                                       f"{self._diagnostics() or '(no output)'}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not listening on {self.addr}:{self.port} after "
                                       f"{START_TIMEOUT:g} s: {self._diagnostics() or '(no output)'}")
                time.sleep(0.01)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> int | None:
        """stop_signal, then SIGKILL (also the children) after STOP_TIMEOUT; remove the temp dir."""
        p, rc = self.proc, None
        if p is not None:
            kids = _children(p.pid)
            try:
                os.kill(p.pid, self.stop_signal)
            except ProcessLookupError:
                pass
            try:
                p.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                for pid in [p.pid, *kids, *_children(p.pid)]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                p.wait(STOP_TIMEOUT)
            for pid in kids:                     # workers outliving their master
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            rc = p.returncode
        if self.dir is not None and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        return rc


NGINX_CONF = """\
# Written by netns_lab.origins.NginxOrigin; nginx -p @DIR@ -c @DIR@/nginx.conf
daemon off;
master_process on;
worker_processes 1;
@USER@
pid @DIR@/nginx.pid;
error_log @DIR@/error.log info;

events {
    worker_connections 1024;
}

http {
    default_type application/octet-stream;
    types { text/html html; text/plain txt; application/json json; }
    log_format origin escape=json '{"conn":$connection,"n":$connection_requests,"method":"$request_method",'
        '"uri":"$request_uri","protocol":"$server_protocol","status":$status,"bytes_sent":$bytes_sent,'
        '"body_bytes_sent":$body_bytes_sent,"request_length":$request_length,"remote":"$remote_addr",'
        '"host":"$http_host","via":"$http_via","x_forwarded_for":"$http_x_forwarded_for",'
        '"connection":"$http_connection","te":"$http_te","upgrade":"$http_upgrade",'
        '"content_length":"$http_content_length","transfer_encoding":"$http_transfer_encoding",'
        '"user_agent":"$http_user_agent","time":$msec}';
    access_log @DIR@/access.log origin;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 100000;
    gzip off;
    client_max_body_size 0;
    client_body_temp_path @DIR@/tmp/body;
    proxy_temp_path @DIR@/tmp/proxy;
    fastcgi_temp_path @DIR@/tmp/fastcgi;
    uwsgi_temp_path @DIR@/tmp/uwsgi;
    scgi_temp_path @DIR@/tmp/scgi;

    server {
        listen @ADDR@:@PORT@ backlog=512;
        server_name _;
        root @ROOT@;

        location / {
        }
        # The same files, chunked: sub_filter clears Content-Length (it never matches).
        location /chunked/ {
            alias @ROOT@/;
            sub_filter_types *;
            sub_filter "@NEVER@" "";
            sub_filter_last_modified on;
        }
        location /upload/ {
            dav_methods PUT DELETE;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
        }
        location = /204 {
            return 204;
        }
    }
}
"""


class NginxOrigin(_Served):
    """nginx in the origin namespace with a throw-away prefix and docroot (see module doc).

    The docroot is ROOT when given (kept), else DIR/root (removed on exit with DIR)."""
    stop_signal = signal.SIGQUIT
    name = "nginx"

    def __init__(self, lab, addr: str = ORIGIN_ADDR, port: int = NGINX_PORT, root: str | os.PathLike | None = None,
                 ns: str | None = None, keep_dir: bool = False):
        super().__init__(lab, addr, port, ns, keep_dir)
        self._root_arg = Path(root) if root is not None else None
        self.files: dict[str, tuple[int, int, str]] = {}        # path -> (size, seed, sha256)

    @property
    def root(self) -> Path:
        return self._root_arg if self._root_arg is not None else self.dir / "root"

    def _prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").mkdir()
        conf = NGINX_CONF
        for k, v in {"@DIR@": str(self.dir), "@ROOT@": str(self.root), "@ADDR@": self.addr,
                     "@PORT@": str(self.port), "@NEVER@": "nfsplice-sub-filter-never-matches-7f3a9c",
                     "@USER@": "user root;" if os.geteuid() == 0 else ""}.items():
            conf = conf.replace(k, v)
        (self.dir / "nginx.conf").write_text(conf)

    def _argv(self) -> list[str]:
        return ["nginx", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-e", str(self.dir / "error.log")]

    def _diagnostics(self) -> str:
        return (_tail(self.dir / "stderr.log") + "\n" + _tail(self.dir / "error.log")).strip()

    def add_file(self, path: str, size: int, seed: int = 0) -> str:
        """Write stream_bytes(size, seed) to ROOT/PATH (also served at /chunked/PATH); return sha256."""
        rel = Path(path.lstrip("/"))
        if ".." in rel.parts or not rel.parts:
            raise ValueError(f"bad docroot path {path!r}")
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for v in iter_stream(0, size, seed):
                h.update(v)
                while v:
                    v = v[os.write(fd, v):]
        finally:
            os.close(fd)
        sha = h.hexdigest()
        _sha_cache[(size, seed)] = sha
        self.files[str(rel)] = (size, seed, sha)
        return sha

    def file_sha256(self, path: str) -> str:
        """sha256 of a file in the docroot as it is now (e.g. after a PUT to /upload/)."""
        h = hashlib.sha256()
        with open(self.root / path.lstrip("/"), "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    def requests(self, wait_for: int = 0, timeout: float = 3.0) -> list[dict]:
        """Access log entries (JSON; conn and n say which connection, which request on it).
        nginx logs after the response: WAIT_FOR waits until that many entries are there."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                lines = (self.dir / "access.log").read_text().splitlines()
            except FileNotFoundError:
                lines = []
            entries = [json.loads(l) for l in lines if l.strip()]
            if len(entries) >= wait_for or time.monotonic() > deadline:
                return entries
            time.sleep(0.02)

    def error_log(self) -> str:
        return _tail(self.dir / "error.log", 1 << 20)


class ScriptedOrigin(_Served):
    """`python -m netns_lab.origins serve` in the origin namespace (see module doc)."""
    name = "scripted-origin"

    def __init__(self, lab, addr: str = ORIGIN_ADDR, port: int = SCRIPTED_PORT, ns: str | None = None,
                 idle_timeout: float = 60.0, keep_dir: bool = False):
        super().__init__(lab, addr, port, ns, keep_dir)
        self.idle_timeout = idle_timeout

    @property
    def log_path(self) -> Path:
        return self.dir / "requests.jsonl"

    def _argv(self) -> list[str]:
        return [sys.executable, "-m", "netns_lab.origins", "serve", "--listen", f"{self.addr}:{self.port}",
                "--log", str(self.log_path), "--idle-timeout", str(self.idle_timeout)]

    def events(self) -> list[dict]:
        """Every log entry: request heads, requests, bad requests, half-close reads."""
        try:
            text = self.log_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(l) for l in text.splitlines() if l.strip()]

    def requests(self) -> list[dict]:
        """The requests received so far, in order (logged before each answer is sent)."""
        return [e for e in self.events() if e["event"] == "request"]

    def heads(self) -> list[dict]:
        """The request heads parsed so far (logged before each body is read)."""
        return [e for e in self.events() if e["event"] == "head"]

    def wait_event(self, pred, timeout: float = 3.0) -> dict:
        """The first log entry for which PRED is true, waiting up to TIMEOUT."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events():
                if pred(e):
                    return e
            if time.monotonic() > deadline:
                raise TimeoutError("no such origin log entry")
            time.sleep(0.02)

    def clear_log(self) -> None:
        """Forget what was logged (the server appends, so truncating is safe)."""
        os.truncate(self.log_path, 0)


# -- command line ---------------------------------------------------------------------------
def _parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netns_lab.origins", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the scripted origin")
    s.add_argument("--listen", type=_parse_addr, required=True)
    s.add_argument("--log", help="JSON-lines request log")
    s.add_argument("--idle-timeout", type=float, default=60.0)
    r = sub.add_parser("raw", help="raw client: JSON steps on stdin, JSON result on stdout")
    r.add_argument("--connect", type=_parse_addr, required=True)
    r.add_argument("--idle", type=float, default=2.0)
    r.add_argument("--connect-timeout", type=float, default=5.0)
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        server = ScriptedServer(a.listen, a.log, a.idle_timeout)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        return 0
    json.dump(_raw_client(a.connect, json.load(sys.stdin), a.idle, a.connect_timeout), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
