"""The TLS ClientHello parser: the part of a TSPU-style censor that reads the server name.

One contract, as in mitmproxy's `parse_client_hello`: given the bytes of one direction of a TCP
connection from its start, `parse_client_hello` returns
- a `ClientHello` when the whole handshake message is there,
- `None` when the bytes so far are a valid beginning and more are needed,
- raises `TLSParseError` (a `ValueError`) when the bytes are not a ClientHello or are malformed.
No other exception escapes, whatever the input (the tests fuzz this).

A handshake message may span several TLS records; they are joined. `first_record_only=True` is the
2021 device's view (docs/incidents.md §6): it reads only the first record of a segment, so a
ClientHello split over two records, or over two TCP segments, is never complete for it.
"""

from __future__ import annotations

from struct import Struct
from typing import NamedTuple

from throttle.errors import ParseError

__all__ = ["ClientHello", "TLSParseError", "parse_client_hello", "parse_handshake", "is_tls_record", "is_grease"]

CONTENT_CHANGE_CIPHER_SPEC = 20
CONTENT_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43
EXT_ECH = 0xFE0D
MAX_RECORD = 16384 + 2048  # TLSCiphertext bound (RFC 8446 §5.2); plaintext hellos are smaller
MAX_HELLO = 65536
_HH = Struct("!HH").unpack_from  # no ClientHello in the wild comes near; bounds what a censor buffers


class TLSParseError(ParseError):
    """The bytes are not a TLS ClientHello, or it is malformed."""


class ClientHello(NamedTuple):
    sni: str | None  # the (outer) server name as sent, not normalised; None without SNI
    alpn: tuple[str, ...]
    versions: tuple[int, ...]  # supported_versions without GREASE, else (legacy_version,)
    legacy_version: int
    has_ech: bool  # an encrypted_client_hello extension: `sni` is the outer name
    grease: bool  # the client sent GREASE values (RFC 8701)
    length: int  # bytes of the stream the hello occupied, record headers included
    records: int  # how many TLS records the handshake message spanned
    # Where the extensions block (its length field) and the server_name extension (its type field)
    # start, counted from the start of the handshake body (after its 4-byte header); -1 if absent.
    # In a one-record hello the body starts at byte 9 of the stream.
    extensions_offset: int = -1
    server_name_offset: int = -1


def is_grease(value: int) -> bool:
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


def is_tls_record(data: bytes | memoryview) -> bool:
    """Whether `data` starts like any TLS record header (what opens the 2021 inspection window)."""
    return len(data) >= 3 and 20 <= data[0] <= 23 and data[1] == 3 and data[2] <= 4


def parse_client_hello(data: bytes | memoryview, *, first_record_only: bool = False) -> ClientHello | None:
    """Parse a ClientHello at the start of `data` (see the module docstring for the contract)."""
    if not isinstance(data, bytes):
        data = bytes(data)
    n = len(data)
    # The common case: one record that holds the whole handshake message.
    if n >= 9 and data[0] == CONTENT_HANDSHAKE and data[1] == 3 and data[2] <= 4 and data[5] == HANDSHAKE_CLIENT_HELLO:
        rlen = data[3] << 8 | data[4]
        hlen = data[6] << 16 | data[7] << 8 | data[8]
        if 0 < rlen <= MAX_RECORD and 38 <= hlen <= MAX_HELLO and 4 + hlen <= rlen <= n - 5:
            return _parse_body(data[9 : 9 + hlen], 9 + hlen, 1)
    pos = 0
    records = 0
    message = b""
    need = -1  # total handshake message length once its 4-byte header is known
    while need < 0 or len(message) < need:
        if first_record_only and records == 1:
            return None
        if n - pos < 5:
            _check_prefix(data, pos, n)
            return None
        ctype = data[pos]
        if ctype != CONTENT_HANDSHAKE:
            raise TLSParseError(f"record type {ctype} is not a handshake (22)")
        if data[pos + 1] != 3 or data[pos + 2] > 4:
            raise TLSParseError(f"record version {data[pos + 1]:#x}{data[pos + 2]:02x} is not TLS")
        rlen = data[pos + 3] << 8 | data[pos + 4]
        if rlen == 0 or rlen > MAX_RECORD:
            raise TLSParseError(f"record length {rlen} is out of range")
        if n - pos - 5 < rlen:
            # Validate the handshake header from what is there, then wait for more.
            _check_handshake_header(message + data[pos + 5 : n])
            return None
        message += data[pos + 5 : pos + 5 + rlen]
        pos += 5 + rlen
        records += 1
        if need < 0 and len(message) >= 4:
            need = 4 + _check_handshake_header(message)
    return _parse_body(message[4:need], pos - (len(message) - need), records)


def parse_handshake(data: bytes | memoryview) -> ClientHello | None:
    """Parse a ClientHello handshake message at the start of `data`, without record headers (as
    QUIC's CRYPTO frames carry it); the same contract as `parse_client_hello`. `length` is the bytes
    of the handshake message (its 4-byte header included) and `records` is 0."""
    if not isinstance(data, bytes):
        data = bytes(data)
    length = _check_handshake_header(data[:4])
    if length < 0 or len(data) < 4 + length:
        return None
    return _parse_body(data[4 : 4 + length], 4 + length, 0)


def _check_prefix(data: bytes | memoryview, pos: int, n: int) -> None:
    """Reject a short tail early when even its first bytes cannot start a handshake record."""
    if pos < n and data[pos] != CONTENT_HANDSHAKE:
        raise TLSParseError(f"record type {data[pos]} is not a handshake (22)")
    if pos + 1 < n and data[pos + 1] != 3:
        raise TLSParseError("record version is not TLS")


def _check_handshake_header(message: bytes) -> int:
    if message and message[0] != HANDSHAKE_CLIENT_HELLO:
        raise TLSParseError(f"handshake type {message[0]} is not a ClientHello (1)")
    if len(message) < 4:
        return -1
    length = int.from_bytes(message[1:4], "big")
    if length > MAX_HELLO:
        raise TLSParseError(f"ClientHello length {length} is implausible")
    if length < 38:
        raise TLSParseError(f"ClientHello length {length} is too short")
    return length


def _parse_body(body: bytes, consumed: int, records: int) -> ClientHello:
    # Plain indexing over bytes: on this path it is faster than struct or memoryview slices.
    end = len(body)
    if end < 38:
        raise TLSParseError("ClientHello body is too short")
    legacy_version = body[0] << 8 | body[1]
    sid_len = body[34]
    if sid_len > 32:
        raise TLSParseError(f"session id length {sid_len} is over 32")
    pos = 35 + sid_len
    if pos + 2 > end:
        raise TLSParseError("cipher suites run past the hello")
    cs_len = body[pos] << 8 | body[pos + 1]
    if cs_len < 2 or cs_len % 2:
        raise TLSParseError(f"cipher suites length {cs_len} is invalid")
    pos += 2
    if pos + cs_len > end:
        raise TLSParseError("cipher suites run past the hello")
    # Clients that GREASE put a GREASE suite first (RFC 8701 §3.1 leaves the place open; all do).
    grease = body[pos] == body[pos + 1] and body[pos] & 0x0F == 0x0A
    pos += cs_len
    if pos >= end:
        raise TLSParseError("compression methods run past the hello")
    comp_len = body[pos]
    if comp_len < 1:
        raise TLSParseError("no compression methods")
    pos += 1 + comp_len
    if pos > end:
        raise TLSParseError("compression methods run past the hello")
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    has_ech = False
    extensions_offset = server_name_offset = -1
    if pos < end:  # extensions are optional (RFC 5246 §7.4.1.2)
        extensions_offset = pos
        if pos + 2 > end:
            raise TLSParseError("extensions length runs past the hello")
        if pos + 2 + (body[pos] << 8 | body[pos + 1]) != end:
            raise TLSParseError("extensions do not fill the hello exactly")
        pos += 2
        seen: list[int] = []
        while pos < end:
            if pos + 4 > end:
                raise TLSParseError("extension header runs past the hello")
            etype, elen = _HH(body, pos)
            pos += 4
            stop = pos + elen
            if stop > end:
                raise TLSParseError(f"extension {etype} runs past the hello")
            seen.append(etype)
            if etype > 43 and etype != EXT_ECH:
                if etype & 0x0F0F == 0x0A0A and etype >> 8 == etype & 0xFF:
                    grease = True
            elif etype == EXT_SERVER_NAME:
                sni = _server_name(body, pos, stop)
                server_name_offset = pos - 4
            elif etype == EXT_ALPN:
                alpn = _alpn(body, pos, stop)
            elif etype == EXT_SUPPORTED_VERSIONS:
                versions, g = _versions(body, pos, stop)
                grease = grease or g
            elif etype == EXT_ECH:
                has_ech = True
            pos = stop
        if len(set(seen)) != len(seen):
            raise TLSParseError("an extension appears twice")
    return ClientHello(
        sni=sni,
        alpn=alpn,
        versions=versions or (legacy_version,),
        legacy_version=legacy_version,
        has_ech=has_ech,
        grease=grease,
        length=consumed,
        records=records,
        extensions_offset=extensions_offset,
        server_name_offset=server_name_offset,
    )


def _server_name(b: bytes, pos: int, end: int) -> str | None:
    if pos == end:
        return None  # a server's empty acknowledgement; not in a ClientHello, but harmless
    if end - pos < 2:
        raise TLSParseError("server_name list length is missing")
    if (b[pos] << 8 | b[pos + 1]) + 2 != end - pos:
        raise TLSParseError("server_name list does not fill the extension")
    pos += 2
    name = None
    while pos < end:
        if pos + 3 > end:
            raise TLSParseError("server_name entry runs past the extension")
        name_type = b[pos]
        nlen = b[pos + 1] << 8 | b[pos + 2]
        pos += 3
        if pos + nlen > end:
            raise TLSParseError("server name runs past the extension")
        # Only host_name (0) is a name; the 2021 devices skipped other types too (§6).
        if name_type == 0 and name is None:
            if nlen == 0:
                raise TLSParseError("empty server name")
            name = b[pos : pos + nlen].decode("latin-1")
        pos += nlen
    return name


def _alpn(b: bytes, pos: int, end: int) -> tuple[str, ...]:
    if end - pos < 2:
        raise TLSParseError("ALPN list length is missing")
    if (b[pos] << 8 | b[pos + 1]) + 2 != end - pos:
        raise TLSParseError("ALPN list does not fill the extension")
    out = []
    pos += 2
    while pos < end:
        plen = b[pos]
        pos += 1
        if plen == 0 or pos + plen > end:
            raise TLSParseError("ALPN protocol name runs past the extension")
        out.append(b[pos : pos + plen].decode("latin-1"))
        pos += plen
    return tuple(out)


def _versions(b: bytes, pos: int, end: int) -> tuple[tuple[int, ...], bool]:
    if end - pos < 1 or b[pos] + 1 != end - pos or b[pos] % 2:
        raise TLSParseError("supported_versions list is malformed")
    versions = []
    grease = False
    for i in range(pos + 1, end, 2):
        if b[i] == b[i + 1] and b[i] & 0x0F == 0x0A:
            grease = True
        else:
            versions.append(b[i] << 8 | b[i + 1])
    return tuple(versions), grease
