"""The ClientHello parser on real captured hellos (tests/vectors) and under fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from throttle.wire.tls import TLSParseError, is_tls_record, parse_client_hello

from .packets import client_segments, python_hello

# file, SNI, segments the hello spans (from tests/vectors/README.md)
VECTORS = [
    ("curl-tls13-pbs.twimg.com.pcap", "pbs.twimg.com", 1),
    ("curl-tls12-www.microsoft.com.pcap", "www.microsoft.com", 1),
    ("openssl-tls13-video.twimg.com.pcap", "video.twimg.com", 1),
    ("openssl-tls12-reddit.com.pcap", "reddit.com", 1),
    ("openssl-nosni.pcap", None, 1),
    ("python-ssl-upload.twitter.com.pcap", "upload.twitter.com", 1),
    ("chromium-pbs.twimg.com.pcap", "pbs.twimg.com", 2),
    ("curl-tls13-ipv6-pbs.twimg.com.pcap", "pbs.twimg.com", 1),
]


@pytest.mark.parametrize("capture,sni,segments", VECTORS)
def test_captured_hellos(capture: str, sni: str | None, segments: int) -> None:
    segs = client_segments(capture)
    stream = b"".join(segs)
    hello = parse_client_hello(stream)
    assert hello is not None
    assert hello.sni == sni
    assert hello.length == sum(len(s) for s in segs[:segments])
    # The 2021 device sees only the first segment: a one-segment hello is complete in it,
    # a two-segment one is not.
    first = parse_client_hello(segs[0], first_record_only=True)
    assert (first is not None and first.sni == sni) is (segments == 1)
    # Every proper prefix says "need more", never an error.
    for cut in range(0, hello.length, 7):
        assert parse_client_hello(stream[:cut]) is None


def test_client_details() -> None:
    chromium = parse_client_hello(b"".join(client_segments("chromium-pbs.twimg.com.pcap")))
    assert chromium is not None and chromium.grease and "h2" in chromium.alpn
    # Chromium sends a GREASE encrypted_client_hello extension: the SNI read is the outer name.
    assert chromium.has_ech and chromium.sni == "pbs.twimg.com"
    assert 0x0304 in chromium.versions
    tls12 = parse_client_hello(client_segments("curl-tls12-www.microsoft.com.pcap")[0])
    assert tls12 is not None and tls12.versions == (0x0303,)
    py = parse_client_hello(client_segments("python-ssl-upload.twitter.com.pcap")[0])
    assert py is not None and py.alpn == ("h2", "http/1.1")


def test_hello_split_over_two_records_in_one_segment() -> None:
    hello = python_hello("pbs.twimg.com")
    body = hello[5:]
    split = b"\x16\x03\x01" + (100).to_bytes(2, "big") + body[:100] + b"\x16\x03\x01" + (len(body) - 100).to_bytes(2, "big") + body[100:]
    parsed = parse_client_hello(split)
    assert parsed is not None and parsed.sni == "pbs.twimg.com" and parsed.records == 2
    assert parse_client_hello(split, first_record_only=True) is None


def _mutate(hello: bytes, offset: int, value: int) -> bytes:
    b = bytearray(hello)
    b[offset] = value
    return bytes(b)


def test_the_2021_parser_checks() -> None:
    """docs/incidents.md §6: each of these corruptions disables the trigger."""
    hello = python_hello("pbs.twimg.com")
    for offset, value in ((0, 0x17), (5, 0x02)):  # record type, handshake type
        with pytest.raises(TLSParseError):
            parse_client_hello(_mutate(hello, offset, value))
    sid_len = 5 + 4 + 34
    assert hello[sid_len] == 32
    with pytest.raises(TLSParseError):
        parse_client_hello(_mutate(hello, sid_len, 33))
    with pytest.raises(TLSParseError):
        parse_client_hello(_mutate(hello, sid_len, 31))
    # name_type other than host_name: no SNI.
    i = hello.index(b"pbs.twimg.com")
    assert hello[i - 3] == 0
    assert parse_client_hello(_mutate(hello, i - 3, 1)).sni is None
    # server_name extension type changed: no SNI.
    ext = i - 9
    assert hello[ext : ext + 2] == b"\x00\x00"
    assert parse_client_hello(_mutate(hello, ext + 1, 0x99)).sni is None


def test_not_tls() -> None:
    for data in (b"GET / HTTP/1.1\r\n", b"\x17\x03\x03\x00\x10", b"\x16\x02", b"\x16\x03\x01\x00\x00"):
        with pytest.raises(TLSParseError):
            parse_client_hello(data)
    assert is_tls_record(b"\x14\x03\x03") and not is_tls_record(b"GET")


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        result = parse_client_hello(data)
    except TLSParseError:
        return
    assert result is None or result.length <= len(data)


@settings(max_examples=2000, deadline=None)
@given(st.data())
def test_fuzz_mutated_real_hellos(data) -> None:
    capture = data.draw(st.sampled_from([v[0] for v in VECTORS]))
    hello = bytearray(b"".join(client_segments(capture)))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        i = data.draw(st.integers(0, max(0, len(hello) - 1)))
        if op == "flip" and hello:
            hello[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            hello[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del hello[i : i + data.draw(st.integers(1, 8))]
        else:
            del hello[i:]
    for first_only in (False, True):
        try:
            parse_client_hello(bytes(hello), first_record_only=first_only)
        except TLSParseError:
            pass
