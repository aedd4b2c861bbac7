"""HTTP/1.x request head parsing: the host, the three-way contract, and malformed input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from throttle.errors import ParseError
from throttle.wire.http import MAX_HEAD, HTTPParseError, HTTPRequestHead, looks_like_http_request, parse_http_host

from .packets import mutate

GET = (
    b"GET /index.html HTTP/1.1\r\nHost: example.org\r\nUser-Agent: curl/8.5.0\r\n"
    b"Accept: */*\r\n\r\n"
)


def host_of(data: bytes) -> str | None:
    res = parse_http_host(data)
    assert isinstance(res, HTTPRequestHead)
    return res.host


# --- complete heads ---------------------------------------------------------------------------


def test_get_with_host() -> None:
    assert parse_http_host(GET) == HTTPRequestHead("GET", "/index.html", "example.org", "HTTP/1.1")


def test_body_and_pipelined_bytes_after_head_are_ignored() -> None:
    assert parse_http_host(GET + b"POST / HTTP/1.1\r\n\x00\x01garbage") == parse_http_host(GET)


def test_memoryview_input() -> None:
    assert parse_http_host(memoryview(GET)) == parse_http_host(GET)
    assert parse_http_host(bytearray(GET)) == parse_http_host(GET)


@pytest.mark.parametrize(
    ("value", "host"),
    [
        (b"example.org:8080", "example.org"),
        (b"  Example.ORG  ", "Example.ORG"),  # stripped, not lower-cased
        (b"\texample.org:80\t", "example.org"),
        (b"[::1]:80", "::1"),
        (b"[2001:db8::1]", "2001:db8::1"),
        (b"192.0.2.1:8443", "192.0.2.1"),
        (b"pbs.twimg.com.", "pbs.twimg.com."),  # the trailing dot is the normaliser's business
        (b"::1", "::1"),  # a bare IPv6 literal is invalid, but its colons are not a port
    ],
)
def test_host_header_forms(value: bytes, host: str) -> None:
    assert host_of(b"GET / HTTP/1.1\r\nHost:" + value + b"\r\n\r\n") == host


def test_lower_case_host_header_and_first_host_wins() -> None:
    data = b"GET / HTTP/1.1\r\nx-a: 1\r\nhost: first.example\r\nHOST: second.example\r\n\r\n"
    assert host_of(data) == "first.example"


def test_header_named_like_host_is_not_host() -> None:
    data = b"GET / HTTP/1.1\r\nHost-Name: x.example\r\nX-Host: y.example\r\n\r\n"
    assert host_of(data) is None


@pytest.mark.parametrize(
    ("target", "host"),
    [
        (b"http://example.org/x", "example.org"),
        (b"http://example.org", "example.org"),
        (b"https://user:pw@example.org:8443/a?b#c", "example.org"),
        (b"http://[2001:db8::2]:8080/", "2001:db8::2"),
        (b"http://example.org?q=a/b", "example.org"),
        (b"/relative", None),
        (b"*", None),
        (b"http:///nohost", None),
    ],
)
def test_absolute_form_without_host_header(target: bytes, host: str | None) -> None:
    assert host_of(b"GET " + target + b" HTTP/1.1\r\n\r\n") == host


def test_host_header_beats_absolute_form() -> None:
    assert host_of(b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n") == "b.example"


def test_empty_host_header_falls_back_to_target() -> None:
    assert host_of(b"GET http://a.example/ HTTP/1.1\r\nHost: \r\n\r\n") == "a.example"
    assert host_of(b"GET / HTTP/1.1\r\nHost:\r\n\r\n") is None


def test_connect() -> None:
    res = parse_http_host(b"CONNECT example.org:443 HTTP/1.1\r\nUser-Agent: x\r\n\r\n")
    assert res == HTTPRequestHead("CONNECT", "example.org:443", "example.org", "HTTP/1.1")
    assert host_of(b"CONNECT [2001:db8::3]:443 HTTP/1.1\r\n\r\n") == "2001:db8::3"
    # With a Host header, the header wins, as for any other method.
    assert host_of(b"CONNECT a.example:443 HTTP/1.1\r\nHost: b.example:443\r\n\r\n") == "b.example"


def test_no_host_at_all() -> None:
    res = parse_http_host(b"GET / HTTP/1.0\r\n\r\n")
    assert res == HTTPRequestHead("GET", "/", None, "HTTP/1.0")


def test_bare_lf_and_mixed_line_endings() -> None:
    assert host_of(b"GET / HTTP/1.1\nHost: lf.example\n\n") == "lf.example"
    assert host_of(b"GET / HTTP/1.1\r\nHost: mix.example\n\r\n") == "mix.example"
    assert host_of(b"GET / HTTP/1.1\nHost: mix.example\r\n\n") == "mix.example"


def test_other_token_methods() -> None:
    res = parse_http_host(b"PROPFIND /d HTTP/1.1\r\nHost: dav.example\r\n\r\n")
    assert res is not None and res.method == "PROPFIND"
    res = parse_http_host(b"M-SEARCH * HTTP/1.1\r\nHost: 239.255.255.250:1900\r\n\r\n")
    assert res is not None and res.host == "239.255.255.250"


def test_non_ascii_target_and_host_bytes_are_latin1() -> None:
    res = parse_http_host(b"GET /\xc3\xa9 HTTP/1.1\r\nHost: \xc3\xa9.example\r\n\r\n")
    assert res is not None
    assert res.target == "/\xc3\xa9" and res.host == "\xc3\xa9.example"


def test_head_exactly_at_the_cap() -> None:
    start = b"GET / HTTP/1.1\r\nHost: cap.example\r\nX-Pad: "
    end = b"\r\n\r\n"
    data = start + b"a" * (MAX_HEAD - len(start) - len(end)) + end
    assert len(data) == MAX_HEAD
    assert host_of(data) == "cap.example"
    assert host_of(data + b"body") == "cap.example"


# --- incomplete: None ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"G",
        b"GET",
        b"GET ",
        b"GET /index",
        b"GET / ",
        b"GET / HT",
        b"GET / HTTP/1.1",
        b"GET / HTTP/1.1\r",
        b"GET / HTTP/1.1\r\n",
        b"GET / HTTP/1.1\r\nHost: example.org",
        b"GET / HTTP/1.1\r\nHost: example.org\r\n",
        b"GET / HTTP/1.1\r\nHost: example.org\r\n\r",
        b"GET / HTTP/1.1\nHost: example.org\n",
    ],
)
def test_incomplete_is_none(data: bytes) -> None:
    assert parse_http_host(data) is None


def test_byte_by_byte() -> None:
    for request in (GET, b"CONNECT a.example:443 HTTP/1.0\nProxy-Authorization: x\n\n"):
        for i in range(len(request)):
            assert parse_http_host(request[:i]) is None, request[:i]
        assert parse_http_host(request) is not None


# --- not HTTP: HTTPParseError -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "not an HTTP request"),  # TLS ClientHello
        (b"SSH-2.0-OpenSSH_9.6\r\n", "request line"),
        (b"\x00\x01\x02\x03", "not an HTTP request"),
        (b"get / HTTP/1.1\r\n\r\n", "not an HTTP request"),
        (b" GET / HTTP/1.1\r\n", "not an HTTP request"),
        (b"\r\nGET / HTTP/1.1\r\n", "not an HTTP request"),
        (b"G\xffT / HTTP/1.1\r\n\r\n", "method"),
        (b"G\xffT", "method"),
        (b"GET\t/ HTTP/1.1\r\n\r\n", "request line"),
        (b"GET  / HTTP/1.1\r\n\r\n", "request line"),
        (b"GET  /", "request target"),
        (b"GET / HTTP/2.0\r\n\r\n", "HTTP/1.x"),
        (b"GET / HTTP/2", "HTTP/1.x"),
        (b"GET / HTTP/1.10", "HTTP/1.x"),
        (b"GET / HTTP/1.1 extra\r\n\r\n", "request line"),
        (b"GET /\x01 HTTP/1.1\r\n\r\n", "request target"),
        (b"GET /\x00", "NUL"),
        (b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", "NUL"),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", "colon"),
        (b"GET / HTTP/1.1\r\nno colon here\r\n", "colon"),
        (b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n", "header name"),
        (b"GET / HTTP/1.1\r\nHo st", "header name"),
        (b"GET / HTTP/1.1\r\n: value\r\n\r\n", "header name"),
        (b"GET / HTTP/1.1\r\n Host: a.example\r\n\r\n", "whitespace"),
        (b"GET / HTTP/1.1\r\nX: 1\r\n\tHost: a.example\r\n\r\n", "whitespace"),
        (b"GET / HTTP/1.1\r\nX: 1\rHost: a.example\r\n\r\n", "bare CR"),
        (b"GET / HTTP/1.1\r\nX: 1\rHo", "bare CR"),
        (b"GET /\r\n\r\n", "request line"),  # HTTP/0.9
        (b"ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHIJ", "method"),
    ],
)
def test_not_http(data: bytes, reason: str) -> None:
    with pytest.raises(HTTPParseError, match=reason):
        parse_http_host(data)


def test_over_16k_without_end_of_head() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Pad: " + b"a" * MAX_HEAD
    with pytest.raises(HTTPParseError, match="request head over 16384 bytes"):
        parse_http_host(data)
    with pytest.raises(HTTPParseError, match="over 16384"):
        parse_http_host(data[:MAX_HEAD])  # the blank line can no longer fit
    assert parse_http_host(data[: MAX_HEAD - 1]) is None


def test_blank_line_just_past_the_cap() -> None:
    start = b"GET / HTTP/1.1\r\nX-Pad: "
    data = start + b"a" * (MAX_HEAD - len(start) - 3) + b"\r\n\r\n"
    assert len(data) == MAX_HEAD + 1
    with pytest.raises(HTTPParseError, match="over 16384"):
        parse_http_host(data)


def test_parse_error_is_a_value_error() -> None:
    assert issubclass(HTTPParseError, ParseError) and issubclass(HTTPParseError, ValueError)


# --- looks_like_http_request --------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.1\r\n", b"POST /x", b"PUT ", b"HEAD /", b"CONNECT a:443", b"OPTIONS *",
     b"DELETE /", b"PATCH /", b"TRACE /", b"G", b"CONN", memoryview(b"GET /")],
)
def test_looks_like_http(data: bytes) -> None:
    assert looks_like_http_request(data)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x16\x03\x01\x00", b"GETX / HTTP/1.1", b"get / ", b"PROPFIND / HTTP/1.1", b"SSH-2.0"],
)
def test_does_not_look_like_http(data: bytes) -> None:
    assert not looks_like_http_request(data)


# --- properties ---------------------------------------------------------------------------------

_token = st.text("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                 min_size=1, max_size=20)
_method = st.tuples(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), st.text(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ-_", max_size=10)).map("".join)
_target = st.text(
    "".join(map(chr, range(0x21, 0x7F))), min_size=1, max_size=40).map(lambda t: "/" + t)
_value = st.text("".join(map(chr, range(0x20, 0x7F))) + "\t", max_size=40)
_host = st.text("abcdefghijklmnopqrstuvwxyz0123456789.-", min_size=1, max_size=30)


@st.composite
def requests(draw) -> tuple[bytes, str, str | None]:
    method = draw(_method)
    target = draw(_target)
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    headers = draw(st.lists(st.tuples(_token, _value), max_size=6))
    host = draw(st.one_of(st.none(), _host))
    headers = [(n, v) for n, v in headers if n.lower() != "host"]
    if host is not None:
        port = draw(st.integers(1, 65535))
        headers.insert(draw(st.integers(0, len(headers))), ("Host", f" {host}:{port}"))
    text = f"{method} {target} HTTP/1.{draw(st.integers(0, 1))}{eol}"
    text += "".join(f"{n}:{v}{eol}" for n, v in headers) + eol
    return text.encode("latin-1"), method, host


@settings(max_examples=300, deadline=None)
@given(requests())
def test_every_prefix_of_a_valid_request_is_none(req: tuple[bytes, str, str | None]) -> None:
    data, method, host = req
    for i in range(len(data)):
        assert parse_http_host(data[:i]) is None
    res = parse_http_host(data)
    assert res is not None and res.method == method and res.host == host


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    try:
        parse_http_host(data)
    except HTTPParseError:
        pass
    assert isinstance(looks_like_http_request(data), bool)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_after_a_valid_request_line(data: bytes) -> None:
    try:
        parse_http_host(b"GET / HTTP/1.1\r\n" + data)
    except HTTPParseError:
        pass


VALID = [
    GET,
    b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n\r\n",
    b"GET http://user@a.example:81/p?q HTTP/1.0\nAccept: */*\n\n",
]

_mutation = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
    st.integers(0, 1000),
    st.sampled_from([0, 9, 10, 13, 32, 58, 64, 91, 93, 47, 0x41, 0x7F, 0xFF]) | st.integers(0, 255),
)



@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(VALID), st.lists(_mutation, min_size=1, max_size=4))
def test_fuzz_mutated_valid_requests(msg: bytes, ops: list[tuple[str, int, int]]) -> None:
    data = mutate(msg, ops)
    try:
        res = parse_http_host(data)
    except HTTPParseError as exc:
        assert str(exc)
        return
    if res is not None:
        assert res.version.startswith("HTTP/1.") and res.method and res.target
