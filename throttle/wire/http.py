"""Sans-I/O parsing of the head of an HTTP/1.x request, to learn the host it is for.

This module owns deciding, from the client-to-server bytes of a TCP connection seen so far,
one of three things (the same three-way contract as mitmproxy's parsers):

* the request head is complete: an `HTTPRequestHead` with the method, target, version and the
  host the request names (Host header, else the absolute-form or CONNECT target);
* the bytes are a plausible prefix of a request head: `None`, feed me more;
* the bytes cannot be an HTTP/1.x request: `HTTPParseError`.

It does no I/O and keeps no state; the caller re-offers the growing stream. It runs on the
per-packet path, so it works with `bytes.find`/`split`/`translate` (C loops) rather than
per-byte Python or regular expressions, and validates only what the verdict needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from throttle.errors import ParseError

__all__ = [
    "MAX_HEAD",
    "HTTPParseError",
    "HTTPRequestHead",
    "looks_like_http_request",
    "parse_http_host",
]

MAX_HEAD = 16384
"""A request head (request line, headers and blank line) must end within this many bytes."""

# No registered method is longer than 17 characters (UPDATEREDIRECTREF); a longer run of token
# characters with no space is almost certainly not a request line, so say so early.
_MAX_METHOD = 32

# RFC 9110 5.6.2 tchar, used as the `delete` table of bytes.translate: a byte string is a
# token exactly when translating it deletes everything.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Request-target: visible ASCII; bytes >= 0x80 too, because sloppy clients send raw UTF-8 and
# servers accept it. No controls, no spaces.
_TARGET_CHARS = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))

# RFC 3986 3.1 scheme characters after the first letter (translate `delete` table, as above).
_SCHEME_CHARS = b"+-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

_VERSION_PREFIX = b"HTTP/1."
_FOLD = (b" ", b"\t")
_AUTHORITY_END = (b"/", b"?", b"#")

_METHOD_PREFIXES = (
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"CONNECT ",
    b"OPTIONS ",
    b"DELETE ",
    b"PATCH ",
    b"TRACE ",
)
_LONGEST_PREFIX = max(map(len, _METHOD_PREFIXES))


class HTTPParseError(ParseError):
    """Bytes that cannot be (the start of) an HTTP/1.x request head."""


@dataclass(frozen=True, slots=True)
class HTTPRequestHead:
    method: str
    target: str
    """The request-target exactly as sent (latin-1 decoded)."""
    host: str | None
    """Host header value without port, brackets or surrounding whitespace, not lower-cased;
    else the host of an absolute-form or CONNECT target; else None. Latin-1 decoded."""
    version: str
    """``"HTTP/1.0"``, ``"HTTP/1.1"``, ..."""


def looks_like_http_request(data: bytes | memoryview) -> bool:
    """Cheap pre-filter on the first bytes of a connection: do they start a common method?

    Also True when `data` is shorter than a method and still a prefix of one (``b"GE"``):
    a client, or an evasion tool, may split the request line across segments, and the
    inspection window must not give up on the flow for that.
    """
    head = bytes(data[:_LONGEST_PREFIX])
    if head.startswith(_METHOD_PREFIXES):
        return True
    return bool(head) and any(p.startswith(head) for p in _METHOD_PREFIXES)


def parse_http_host(data: bytes | memoryview) -> HTTPRequestHead | None:
    """Parse the request head at the start of `data` (the client-to-server stream).

    Returns the head when it is complete, None when `data` is a plausible incomplete prefix,
    and raises `HTTPParseError` when it cannot be an HTTP/1.x request or its head would exceed
    `MAX_HEAD` bytes. CRLF and bare LF line endings are both accepted.
    """
    n = len(data)
    if not n:
        return None
    if type(data) is not bytes:
        # Nothing past MAX_HEAD is ever looked at, so never copy more than that.
        data = bytes(data[:MAX_HEAD])
    first = data[0]
    if first < 0x41 or first > 0x5A:
        # Methods are upper-case tokens in practice; this rejects TLS, SSH, binary at once.
        raise HTTPParseError("not an HTTP request")

    limit = n if n < MAX_HEAD else MAX_HEAD
    # The head ends at the first empty line, written as LF LF or LF CR LF.
    end = data.find(b"\n\n", 0, limit)
    if end >= 0:
        end += 2
    crlf = data.find(b"\n\r\n", 0, limit if end < 0 else end)
    if crlf >= 0:
        end = crlf + 3

    if end < 0:
        window = data if n <= limit else data[:limit]
        if b"\x00" in window:
            raise HTTPParseError("NUL byte in request head")
        _check_prefix(window.split(b"\n"))
        if n >= MAX_HEAD:
            raise HTTPParseError(f"request head over {MAX_HEAD} bytes")
        return None

    head = data[:end]
    if b"\x00" in head:
        raise HTTPParseError("NUL byte in request head")
    # The last two pieces are the empty line (b"" or b"\r") and what follows its LF (b"").
    lines = head.split(b"\n")
    del lines[-2:]

    method, target, version = _request_line(_strip_cr(lines[0]))
    host: bytes | None = None
    for i in range(1, len(lines)):
        line = _strip_cr(lines[i])
        colon = _header_colon(line)
        # Only the first Host counts; later headers are still validated.
        if host is None and colon == 4 and line[:4].lower() == b"host":
            host = line[5:].strip(b" \t")

    if host:
        host = _strip_port(host)
    elif method == b"CONNECT":
        host = _strip_port(target)  # authority-form: host:port
    else:
        host = _absolute_form_host(target)
    return HTTPRequestHead(
        method.decode("ascii"),
        target.decode("latin-1"),
        host.decode("latin-1") if host else None,
        version.decode("ascii"),
    )


def _strip_cr(line: bytes) -> bytes:
    """Drop the CR of a CRLF ending; a CR anywhere else is a bare CR (RFC 9112 2.2)."""
    if line[-1:] == b"\r":
        line = line[:-1]
    if b"\r" in line:
        raise HTTPParseError("bare CR in request head")
    return line


def _request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HTTPParseError("request line is not METHOD SP target SP version")
    method, target, version = parts
    if not method or len(method) > _MAX_METHOD or method.translate(None, _TCHAR):
        raise HTTPParseError("bad method")
    if not target or target.translate(None, _TARGET_CHARS):
        raise HTTPParseError("bad request target")
    if len(version) != 8 or not version.startswith(_VERSION_PREFIX) or not version[7:].isdigit():
        raise HTTPParseError("not HTTP/1.x")
    return method, target, version


def _header_colon(line: bytes) -> int:
    """Validate a complete header line; return the index of its colon."""
    if line.startswith(_FOLD):
        # Obsolete line folding (RFC 9112 5.2) or whitespace before the first header; servers
        # reject it, and accepting it would let "Host" hide in a continuation.
        raise HTTPParseError("header line starts with whitespace")
    colon = line.find(b":")
    if colon < 0:
        raise HTTPParseError("header line without a colon")
    if not colon or line[:colon].translate(None, _TCHAR):
        raise HTTPParseError("bad header name")
    return colon


def _check_prefix(pieces: list[bytes]) -> None:
    """Raise unless `pieces` (the stream split at LF, no empty line yet) can start a head.

    Every piece but the last is a complete line and must be valid; the last is a line still
    arriving and must be a prefix of a valid one. This keeps "plausible prefix" consistent with
    what the complete parse accepts, so feeding a valid request byte by byte never raises.
    """
    last = len(pieces) - 1
    line = _strip_cr(pieces[0])
    if last:
        _request_line(line)
    else:
        _request_line_prefix(line)
        return
    for i in range(1, last):
        _header_colon(_strip_cr(pieces[i]))
    line = _strip_cr(pieces[last])
    if not line:
        return
    if line.startswith(_FOLD):
        raise HTTPParseError("header line starts with whitespace")
    colon = line.find(b":")
    name = line if colon < 0 else line[:colon]
    if colon == 0 or name.translate(None, _TCHAR):
        raise HTTPParseError("bad header name")


def _request_line_prefix(line: bytes) -> None:
    parts = line.split(b" ")
    if len(parts) > 3:
        raise HTTPParseError("request line is not METHOD SP target SP version")
    method = parts[0]
    if len(method) > _MAX_METHOD or method.translate(None, _TCHAR):
        raise HTTPParseError("bad method")
    if len(parts) == 1:
        return
    target = parts[1]
    if target.translate(None, _TARGET_CHARS):
        raise HTTPParseError("bad request target")
    if len(parts) == 2:
        return
    if not target:
        raise HTTPParseError("bad request target")
    version = parts[2]
    if (
        len(version) > 8
        or not _VERSION_PREFIX.startswith(version[:7])
        or (len(version) == 8 and not version[7:].isdigit())
    ):
        raise HTTPParseError("not HTTP/1.x")


def _strip_port(authority: bytes) -> bytes:
    """``host:port`` -> ``host``; ``[v6]:port`` and ``[v6]`` -> ``v6``; else unchanged."""
    if authority.startswith(b"["):
        close = authority.find(b"]")
        return authority[1:close] if close > 0 else authority
    colon = authority.find(b":")
    # More than one colon without brackets is a bare IPv6 literal (invalid, but not a port).
    if colon >= 0 and authority.find(b":", colon + 1) < 0:
        return authority[:colon]
    return authority


def _absolute_form_host(target: bytes) -> bytes | None:
    """The host of ``scheme://[userinfo@]host[:port][/...]``, else None (origin-form, ``*``)."""
    sep = target.find(b"://")
    if sep <= 0 or not target[:1].isalpha() or target[:sep].translate(None, _SCHEME_CHARS):
        return None
    start = sep + 3
    stop = len(target)
    for ch in _AUTHORITY_END:
        i = target.find(ch, start, stop)
        if i >= 0:
            stop = i
    at = target.rfind(b"@", start, stop)
    if at >= 0:
        start = at + 1
    return _strip_port(target[start:stop]) or None
