"""DNS response parsing: names, CNAME chains, TTLs, compression and malformed input."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR, DNSRR

from throttle.errors import ParseError
from throttle.wire.dns import (
    AddressRecord,
    DNSParseError,
    DNSResponse,
    looks_like_dns,
    parse_dns_response,
    parse_dns_tcp,
)

from .packets import mutate


def v4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def v6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def response(qname: str, *answers: DNSRR, rcode: int = 0, compress: bool = True, **kw) -> bytes:
    question = [DNSQR(qname=qname)]
    pkt = DNS(id=0x1234, qr=1, rd=1, ra=1, rcode=rcode, qd=question, an=list(answers), **kw)
    return bytes(pkt.compress() if compress else pkt)


def a(name: str, addr: str, ttl: int = 300) -> DNSRR:
    return DNSRR(rrname=name, type="A", rdata=addr, ttl=ttl)


def aaaa(name: str, addr: str, ttl: int = 300) -> DNSRR:
    return DNSRR(rrname=name, type="AAAA", rdata=addr, ttl=ttl)


def cname(name: str, target: str, ttl: int = 300) -> DNSRR:
    return DNSRR(rrname=name, type="CNAME", rdata=target, ttl=ttl)


HEADER_RESPONSE_1Q = struct.pack("!6H", 0xBEEF, 0x8180, 1, 1, 0, 0)


# --- well-formed responses --------------------------------------------------------------------


def test_single_a_record() -> None:
    msg = response("example.org", a("example.org", "192.0.2.1", 120), compress=False)
    assert parse_dns_response(msg) == DNSResponse(
        0x1234, "example.org", (AddressRecord(v4("192.0.2.1"), ("example.org",), 120),)
    )


def test_cname_chain_with_compression() -> None:
    msg = response(
        "pbs.twimg.com",
        cname("pbs.twimg.com", "cs196.wac.edgecastcdn.net", 300),
        a("cs196.wac.edgecastcdn.net", "192.0.2.1", 60),
    )
    assert b"\xc0\x0c" in msg  # scapy really compressed the owner names
    res = parse_dns_response(msg)
    assert res.qname == "pbs.twimg.com"
    assert res.records == (
        AddressRecord(v4("192.0.2.1"), ("pbs.twimg.com", "cs196.wac.edgecastcdn.net"), 60),
    )


def test_cname_rdata_and_owner_compressed_by_hand() -> None:
    # Question www.example.org at 12; answer 1: www.example.org (pointer to 12) CNAME
    # cdn.<pointer to example.org at 16>; answer 2: pointer to the CNAME target, A.
    q = b"\x03www\x07example\x03org\x00" + struct.pack("!HH", 1, 1)
    header = struct.pack("!6H", 7, 0x8180, 1, 2, 0, 0)
    rdata = b"\x03cdn\xc0\x10"
    rr1 = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 100, len(rdata)) + rdata
    target_off = 12 + len(q) + 2 + 10
    rr2 = struct.pack("!HHHIH", 0xC000 | target_off, 1, 1, 50, 4) + v4("198.51.100.7")
    res = parse_dns_response(header + q + rr1 + rr2)
    assert res == DNSResponse(
        7,
        "www.example.org",
        (AddressRecord(v4("198.51.100.7"), ("www.example.org", "cdn.example.org"), 50),),
    )


def test_two_deep_chain_mixed_a_and_aaaa_min_ttl() -> None:
    msg = response(
        "Pbs.TWIMG.com.",
        cname("pbs.twimg.com", "pbs.twimg.com.edgekey.net", 30),
        cname("pbs.twimg.com.edgekey.net", "e1234.a.akamaiedge.net", 600),
        a("e1234.a.akamaiedge.net", "192.0.2.10", 20),
        aaaa("e1234.a.akamaiedge.net", "2001:db8::10", 900),
        a("e1234.a.akamaiedge.net", "192.0.2.11", 900),
    )
    res = parse_dns_response(msg)
    chain = ("pbs.twimg.com", "pbs.twimg.com.edgekey.net", "e1234.a.akamaiedge.net")
    assert res.qname == "pbs.twimg.com"
    assert res.records == (
        AddressRecord(v4("192.0.2.10"), chain, 20),
        AddressRecord(v6("2001:db8::10"), chain, 30),
        AddressRecord(v4("192.0.2.11"), chain, 30),
    )


def test_chain_in_reverse_order() -> None:
    msg = response(
        "a.example",
        aaaa("c.example", "2001:db8::1", 500),
        cname("b.example", "c.example", 400),
        cname("a.example", "b.example", 450),
    )
    res = parse_dns_response(msg)
    assert res.records == (
        AddressRecord(v6("2001:db8::1"), ("a.example", "b.example", "c.example"), 400),
    )


def test_answer_unreachable_from_question_keeps_its_owner() -> None:
    msg = response(
        "a.example",
        a("a.example", "192.0.2.1", 10),
        a("other.example", "192.0.2.2", 20),
        cname("x.example", "y.example", 5),
        a("y.example", "192.0.2.3", 30),
    )
    assert parse_dns_response(msg).records == (
        AddressRecord(v4("192.0.2.1"), ("a.example",), 10),
        AddressRecord(v4("192.0.2.2"), ("other.example",), 20),
        AddressRecord(v4("192.0.2.3"), ("y.example",), 30),
    )


def test_cname_loop_terminates() -> None:
    msg = response(
        "a.example",
        cname("a.example", "b.example"),
        cname("b.example", "a.example"),
        a("b.example", "192.0.2.1", 9),
    )
    assert parse_dns_response(msg).records == (
        AddressRecord(v4("192.0.2.1"), ("a.example", "b.example"), 9),
    )


def test_nxdomain_has_no_records() -> None:
    msg = response("nope.example", rcode=3)
    assert parse_dns_response(msg) == DNSResponse(0x1234, "nope.example", ())


def test_servfail_with_answers_ignores_them() -> None:
    msg = response("x.example", a("x.example", "192.0.2.1"), rcode=2)
    assert parse_dns_response(msg).records == ()


def test_no_question() -> None:
    pkt = DNS(id=1, qr=1, qd=[], an=[a("x.example", "192.0.2.1", 5)])
    res = parse_dns_response(bytes(pkt))
    assert res.qname is None
    assert res.records == (AddressRecord(v4("192.0.2.1"), ("x.example",), 5),)


def test_other_types_and_classes_are_skipped() -> None:
    msg = response(
        "x.example",
        DNSRR(rrname="x.example", type="TXT", rdata="hello"),
        DNSRR(rrname="x.example", type="A", rclass="CH", rdata="192.0.2.9"),
        a("x.example", "192.0.2.1", 5),
        ns=[DNSRR(rrname="example", type="NS", rdata="ns.example")],
        ar=[a("ns.example", "192.0.2.53")],
    )
    assert parse_dns_response(msg).records == (AddressRecord(v4("192.0.2.1"), ("x.example",), 5),)


def test_ttl_with_top_bit_counts_as_zero() -> None:
    msg = response("x.example", a("x.example", "192.0.2.1", 0x80000001))
    assert parse_dns_response(msg).records[0].ttl == 0


def test_root_question_name_is_empty_string() -> None:
    msg = HEADER_RESPONSE_1Q[:6] + b"\x00\x00\x00\x00\x00\x00" + b"\x00" + struct.pack("!HH", 2, 1)
    assert parse_dns_response(msg) == DNSResponse(0xBEEF, "", ())


def test_non_ascii_label_bytes_keep_their_value() -> None:
    q = b"\x03\xc3\xa9X\x07example\x00" + struct.pack("!HH", 1, 1)
    msg = struct.pack("!6H", 1, 0x8180, 1, 0, 0, 0) + q
    assert parse_dns_response(msg).qname == "\xc3\xa9x.example"


def test_memoryview_input() -> None:
    msg = response("x.example", a("x.example", "192.0.2.1", 5))
    assert parse_dns_response(memoryview(msg)) == parse_dns_response(msg)


def test_tcp_form() -> None:
    msg = response("x.example", a("x.example", "192.0.2.1", 5))
    framed = struct.pack("!H", len(msg)) + msg
    assert parse_dns_tcp(b"") is None
    assert parse_dns_tcp(framed[:1]) is None
    assert parse_dns_tcp(framed[:-1]) is None
    assert parse_dns_tcp(framed) == parse_dns_response(msg)
    assert parse_dns_tcp(memoryview(framed + b"\x00\x0cnext message")) == parse_dns_response(msg)


def test_looks_like_dns() -> None:
    assert looks_like_dns(b"\x00" * 12)
    assert not looks_like_dns(b"\x00" * 11)


# --- malformed input ---------------------------------------------------------------------------


def test_query_is_an_error() -> None:
    query = bytes(DNS(id=1, qr=0, rd=1, qd=[DNSQR(qname="example.org")]))
    with pytest.raises(DNSParseError, match="not a response"):
        parse_dns_response(query)


@pytest.mark.parametrize("length", [0, 1, 11])
def test_truncated_header(length: int) -> None:
    with pytest.raises(DNSParseError, match="truncated header"):
        parse_dns_response(HEADER_RESPONSE_1Q[:length])


def test_pointer_to_itself() -> None:
    msg = struct.pack("!6H", 1, 0x8180, 1, 0, 0, 0) + b"\xc0\x0c" + struct.pack("!HH", 1, 1)
    with pytest.raises(DNSParseError, match="backwards"):
        parse_dns_response(msg)


def test_pointer_loop_through_labels() -> None:
    # The question is fine; the answer owner is "x" then a pointer back to that same "x".
    q = b"\x01q\x00" + struct.pack("!HH", 1, 1)
    owner_off = 12 + len(q)
    owner = b"\x01x" + struct.pack("!H", 0xC000 | owner_off)
    rr = owner + struct.pack("!HHIH", 1, 1, 5, 4) + b"\x01\x02\x03\x04"
    with pytest.raises(DNSParseError, match="backwards"):
        parse_dns_response(HEADER_RESPONSE_1Q + q + rr)


def test_pointer_ping_pong() -> None:
    # Two names that point at each other: one of the two pointers is necessarily forward.
    q = b"\x01a\xc0\x13" + struct.pack("!HH", 1, 1)  # at 12: "a" -> 19
    # at 19: "b" -> 12
    rr = b"\x01b\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + b"\x01\x02\x03\x04"
    with pytest.raises(DNSParseError):
        parse_dns_response(HEADER_RESPONSE_1Q + q + rr)


def test_forward_pointer() -> None:
    q = b"\xc0\x20" + struct.pack("!HH", 1, 1) + b"\x00" * 30
    with pytest.raises(DNSParseError, match="backwards"):
        parse_dns_response(struct.pack("!6H", 1, 0x8180, 1, 0, 0, 0) + q)


def test_label_past_end() -> None:
    msg = struct.pack("!6H", 1, 0x8180, 1, 0, 0, 0) + b"\x3fabc"
    with pytest.raises(DNSParseError):
        parse_dns_response(msg)


def test_name_too_long() -> None:
    name = b"\x3f" + b"a" * 63
    q = name * 4 + b"\x00" + struct.pack("!HH", 1, 1)  # 4 * 64 + 1 = 257 octets
    with pytest.raises(DNSParseError, match="255"):
        parse_dns_response(struct.pack("!6H", 1, 0x8180, 1, 0, 0, 0) + q)


def test_longest_legal_name() -> None:
    name = (b"\x3f" + b"a" * 63) * 3 + b"\x3d" + b"b" * 61 + b"\x00"  # 255 octets
    assert len(name) == 255
    q = name + struct.pack("!HH", 1, 1)
    res = parse_dns_response(struct.pack("!6H", 1, 0x8180, 1, 0, 0, 0) + q)
    assert res.qname == ".".join(["a" * 63] * 3 + ["b" * 61])


def test_counts_larger_than_data() -> None:
    msg = response("x.example", a("x.example", "192.0.2.1"))
    bad = msg[:6] + b"\xff\xff" + msg[8:]
    with pytest.raises(DNSParseError, match="counts"):
        parse_dns_response(bad)


def test_answer_count_one_too_many() -> None:
    msg = response("x.example", a("x.example", "192.0.2.1"), a("x.example", "192.0.2.2"))
    bad = msg[:6] + b"\x00\x03" + msg[8:]
    with pytest.raises(DNSParseError):
        parse_dns_response(bad)


def test_bad_a_length() -> None:
    q = b"\x01x\x00" + struct.pack("!HH", 1, 1)
    rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 5) + b"\x01\x02\x03\x04\x05"
    with pytest.raises(DNSParseError, match="4 bytes"):
        parse_dns_response(HEADER_RESPONSE_1Q + q + rr)


def test_rdata_past_end() -> None:
    msg = response("x.example", a("x.example", "192.0.2.1"))
    with pytest.raises(DNSParseError):
        parse_dns_response(msg[:-1])


def test_cname_rdlength_mismatch() -> None:
    q = b"\x01x\x00" + struct.pack("!HH", 1, 1)
    rdata = b"\x01y\x00\x00"  # one byte of junk after the name
    rr = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 5, len(rdata)) + rdata
    with pytest.raises(DNSParseError, match="CNAME"):
        parse_dns_response(HEADER_RESPONSE_1Q + q + rr)


def test_reserved_label_type() -> None:
    q = b"\x41x\x00" + struct.pack("!HH", 1, 1)
    with pytest.raises(DNSParseError, match="label type"):
        parse_dns_response(struct.pack("!6H", 1, 0x8180, 1, 0, 0, 0) + q)


# --- properties --------------------------------------------------------------------------------

_labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
_names = st.lists(_labels, min_size=1, max_size=4).map(".".join)


@settings(max_examples=150, deadline=None)
@given(
    chain=st.lists(_names, min_size=1, max_size=5, unique=True),
    ttls=st.lists(st.integers(0, 2**31 - 1), min_size=5, max_size=5),
    addr_ttl=st.integers(0, 2**31 - 1),
    order=st.randoms(use_true_random=False),
)
def test_chain_property(chain: list[str], ttls: list[int], addr_ttl: int, order) -> None:
    rrs = [cname(chain[i], chain[i + 1], ttls[i]) for i in range(len(chain) - 1)]
    rrs.append(a(chain[-1], "192.0.2.99", addr_ttl))
    order.shuffle(rrs)
    res = parse_dns_response(response(chain[0], *rrs))
    expected_ttl = min([addr_ttl, *ttls[: len(chain) - 1]])
    assert res.records == (AddressRecord(v4("192.0.2.99"), tuple(chain), expected_ttl),)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    for parse in (parse_dns_response, parse_dns_tcp):
        try:
            parse(data)
        except DNSParseError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes_as_response(data: bytes) -> None:
    # Most random headers are queries; force QR=1, RCODE=0 and small counts to go deeper.
    msg = data[:2] + b"\x81\x80" + b"\x00\x01\x00\x03\x00\x00\x00\x00" + data[2:]
    try:
        parse_dns_response(msg)
    except DNSParseError:
        pass


VALID = [
    response(
        "pbs.twimg.com",
        cname("pbs.twimg.com", "cs196.wac.edgecastcdn.net", 300),
        a("cs196.wac.edgecastcdn.net", "192.0.2.1", 60),
        aaaa("cs196.wac.edgecastcdn.net", "2001:db8::1", 60),
    ),
    response(
        "a.example",
        cname("b.example", "c.example"),
        cname("a.example", "b.example"),
        a("c.example", "192.0.2.2"),
        compress=False,
    ),
    HEADER_RESPONSE_1Q[:6] + b"\x00\x02\x00\x00\x00\x00"
    + b"\x01q\x00" + struct.pack("!HH", 1, 1)
    + b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 9, 4) + b"\x01r\xc0\x0c"
    + b"\xc0\x1f" + struct.pack("!HHIH", 1, 1, 9, 4) + b"\x0a\x00\x00\x01",
]


def test_valid_corpus_parses() -> None:
    for msg in VALID:
        assert parse_dns_response(msg).records
    assert parse_dns_response(VALID[2]).records[0].names == ("q", "r.q")


_mutation = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
    st.integers(0, 1000),
    st.integers(0, 255),
)



@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(VALID), st.lists(_mutation, min_size=1, max_size=4))
def test_fuzz_mutated_valid_messages(msg: bytes, ops: list[tuple[str, int, int]]) -> None:
    data = mutate(msg, ops)
    try:
        res = parse_dns_response(data)
    except DNSParseError as exc:
        assert isinstance(exc, ParseError) and str(exc)
        return
    for rec in res.records:
        assert len(rec.address) in (4, 16)
        assert rec.names and 0 <= rec.ttl <= 0x7FFFFFFF
