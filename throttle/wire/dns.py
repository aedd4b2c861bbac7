"""Sans-I/O parsing of DNS responses into "which name led to which address" facts.

This module owns reading a DNS response message (the UDP payload, or the TCP form with its
two-byte length prefix) far enough to learn the question name and every IN A/AAAA answer,
together with the CNAME chain that leads from the question to that address and the TTL for
which the whole chain is valid. The censor uses this to map server IPs back to domain names.

It does no I/O and keeps no state. It runs on the per-packet path, so it reads the header and
records with `struct.unpack_from` over one `bytes` object and skips everything it does not
need (authority and additional sections, other record types and classes).

Malformed input of any kind raises `DNSParseError` and nothing else: the engine counts and
passes malformed packets, so an escaping `IndexError` would be a crash, not a verdict.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from throttle.errors import ParseError

__all__ = [
    "AddressRecord",
    "DNSParseError",
    "DNSResponse",
    "looks_like_dns",
    "parse_dns_response",
    "parse_dns_tcp",
]


class DNSParseError(ParseError):
    """A DNS message that is truncated, malformed, or not a response."""


@dataclass(frozen=True, slots=True)
class AddressRecord:
    """One A/AAAA answer and how the client's question reached it."""

    address: bytes
    """Packed address: 4 bytes (A) or 16 bytes (AAAA)."""
    names: tuple[str, ...]
    """The CNAME chain from the question name to this record's owner, e.g.
    ``("pbs.twimg.com", "cs196.wac.edgecastcdn.net")``; just ``(owner,)`` when the owner is the
    question name or is not reachable from it. Lower-case, no trailing dot."""
    ttl: int
    """Seconds: the smallest TTL along the chain (every CNAME's and the address record's)."""


@dataclass(frozen=True, slots=True)
class DNSResponse:
    id: int
    qname: str | None
    """First question name, lower-case, no trailing dot; None when there is no question."""
    records: tuple[AddressRecord, ...]
    """One per IN A/AAAA answer, in answer-section order; empty for RCODE != 0."""


_HEADER = struct.Struct("!6H")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength

_TYPE_A = 1
_TYPE_CNAME = 5
_TYPE_AAAA = 28
_CLASS_IN = 1

# RFC 1035 3.1: a name is at most 255 octets on the wire, counting every length octet and the
# terminating root octet; `total` below counts label octets plus their length octets, so the
# root octet is the +1. Every label costs at least two octets, so this also caps labels at 127.
_MAX_NAME_WIRE = 255 - 1

# The smallest wire sizes, used to reject absurd section counts before looping over them:
# a question is a root name (1) + type + class; a record adds ttl + rdlength to that.
_MIN_QUESTION = 5
_MIN_RR = 11


def looks_like_dns(payload: bytes | memoryview) -> bool:
    """Cheap pre-filter: could this be a DNS message at all (is there a full header)?"""
    return len(payload) >= 12


def _read_name(buf: bytes, off: int, end: int) -> tuple[str, int]:
    """Read a possibly compressed name at `off`; return it and the offset just past it.

    `end` bounds every read (the message end, or the end of the rdata holding the name).
    Termination: every pointer must point strictly before the start of the run of labels it
    ends, so each jump moves to a smaller offset; the 255-octet cap bounds the labels read.
    """
    labels: list[bytes] = []
    total = 0
    after = -1  # offset past the name in the original position; set at the first pointer
    run_start = off
    while True:
        if off >= end:
            raise DNSParseError("name runs past the end")
        length = buf[off]
        if length == 0:
            if after < 0:
                after = off + 1
            break
        kind = length & 0xC0
        if kind == 0xC0:
            if off + 1 >= end:
                raise DNSParseError("truncated compression pointer")
            target = ((length & 0x3F) << 8) | buf[off + 1]
            if target >= run_start:
                # Forward pointers and self-loops are never produced by a real compressor.
                raise DNSParseError("compression pointer does not point backwards")
            if after < 0:
                after = off + 2
            off = run_start = target
            continue
        if kind:
            # 0x40 (EDNS0 extended labels, obsolete) and 0x80 (reserved): nothing uses them.
            raise DNSParseError("unsupported label type")
        off += 1
        stop = off + length
        if stop > end:
            raise DNSParseError("label runs past the end")
        total += length + 1
        if total > _MAX_NAME_WIRE:
            raise DNSParseError("name longer than 255 octets")
        labels.append(buf[off:stop])
        off = stop
    # bytes.lower() touches ASCII letters only, which is exactly DNS case-insensitivity;
    # latin-1 maps every other byte to one code point, so decoding never fails.
    return b".".join(labels).lower().decode("latin-1"), after


def parse_dns_response(payload: bytes | memoryview) -> DNSResponse:
    """Parse a DNS response message (a UDP payload).

    Raises `DNSParseError` for anything malformed and for queries (QR=0). A response whose
    RCODE is not NOERROR, or whose opcode is not QUERY, parses to empty `records`.
    """
    buf = payload if type(payload) is bytes else bytes(payload)
    end = len(buf)
    if end < 12:
        raise DNSParseError("truncated header")
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(buf)
    if not flags & 0x8000:
        raise DNSParseError("not a response")
    # Counts are attacker-controlled 16-bit numbers; reject impossible ones before looping.
    if qdcount * _MIN_QUESTION + (ancount + nscount + arcount) * _MIN_RR > end - 12:
        raise DNSParseError("section counts larger than the message")

    off = 12
    qname: str | None = None
    for i in range(qdcount):
        name, off = _read_name(buf, off, end)
        off += 4  # qtype, qclass: any class is fine, only the answers' classes matter
        if off > end:
            raise DNSParseError("truncated question")
        if i == 0:
            qname = name

    # Opcode (bits 11-14) other than QUERY or RCODE other than NOERROR: no usable answers.
    if flags & 0x780F:
        return DNSResponse(ident, qname, ())

    cnames: dict[str, tuple[str, int]] = {}
    addresses: list[tuple[str, bytes, int]] = []
    for _ in range(ancount):
        owner, off = _read_name(buf, off, end)
        if off + 10 > end:
            raise DNSParseError("truncated record")
        rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(buf, off)
        off += 10
        rdend = off + rdlength
        if rdend > end:
            raise DNSParseError("rdata runs past the end")
        if ttl & 0x80000000:
            ttl = 0  # RFC 2181 8: a TTL with the top bit set is treated as zero
        if rclass == _CLASS_IN:
            if rtype == _TYPE_A:
                if rdlength != 4:
                    raise DNSParseError("A record rdata is not 4 bytes")
                addresses.append((owner, buf[off:rdend], ttl))
            elif rtype == _TYPE_AAAA:
                if rdlength != 16:
                    raise DNSParseError("AAAA record rdata is not 16 bytes")
                addresses.append((owner, buf[off:rdend], ttl))
            elif rtype == _TYPE_CNAME:
                target, name_end = _read_name(buf, off, rdend)
                if name_end != rdend:
                    raise DNSParseError("CNAME rdata length does not match its name")
                # An owner may have only one CNAME (RFC 2181 10.1); keep the first if not.
                cnames.setdefault(owner, (target, ttl))
        off = rdend
    # The authority and additional sections carry nothing the censor needs: stop here.

    if not addresses:
        return DNSResponse(ident, qname, ())

    # Walk the CNAME chain forward from the question once; answers may come in any order, so
    # the dictionary built above is what makes a reversed chain work. `seen` stops loops.
    chain: dict[str, tuple[tuple[str, ...], int]] = {}
    if qname is not None:
        names: tuple[str, ...] = (qname,)
        min_ttl = 0xFFFFFFFF
        cur = qname
        chain[cur] = (names, min_ttl)
        while cur in cnames:
            cur, ttl = cnames[cur]
            if cur in chain:
                break
            names += (cur,)
            if ttl < min_ttl:
                min_ttl = ttl
            chain[cur] = (names, min_ttl)

    records = []
    for owner, address, ttl in addresses:
        found = chain.get(owner)
        if found is None:
            records.append(AddressRecord(address, (owner,), ttl))
        else:
            names, min_ttl = found
            records.append(AddressRecord(address, names, ttl if ttl < min_ttl else min_ttl))
    return DNSResponse(ident, qname, tuple(records))


def parse_dns_tcp(stream: bytes | memoryview) -> DNSResponse | None:
    """Parse the first DNS message of a DNS-over-TCP byte stream (RFC 1035 4.2.2).

    Returns None while the two-byte length prefix or the message it announces is incomplete.
    Only the first message is parsed; pipelined later ones are the caller's business.
    """
    if len(stream) < 2:
        return None
    length = (stream[0] << 8) | stream[1]
    if len(stream) < 2 + length:
        return None
    return parse_dns_response(stream[2 : 2 + length])
