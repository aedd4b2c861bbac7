"""The QUIC client Initial parser: what a censor reads of a QUIC connection to find its server name.

A QUIC client's first flight is one or more UDP datagrams holding Initial packets (RFC 9000 §17.2.2).
They are encrypted, but with keys anyone can derive from the packet's own Destination Connection ID
(RFC 9001 §5.2; RFC 9369 §3.3 for QUIC v2), so an on-path device can decrypt them and read the TLS
ClientHello carried in their CRYPTO frames, split over several frames and, for large (post-quantum)
hellos, over several datagrams.

The contract is the one of `throttle.wire.tls`: a result, `None` for "need more", or
`QuicParseError` (a `ParseError`, hence a `ValueError`) for bytes that are not what they claim to
be. No other exception escapes, whatever the input (the tests fuzz this, the plaintext included).

- `peek` reads the long header only, with no cryptography: the packet kind, version and CIDs.
- `parse_initials` decrypts every client Initial packet coalesced in one datagram and walks its
  frames (PADDING, PING, CRYPTO, ACK, CONNECTION_CLOSE; anything else is malformed in an Initial).
- `CryptoStream` reassembles the CRYPTO frames of one connection's Initials, in any order, with
  memory bounded by its `limit` (also against many tiny out-of-order pieces).
- `client_hello` parses the ClientHello handshake message at the start of a CRYPTO stream.
- `first_datagram_hello` is the censor that reads one datagram and nothing more: the hello is
  found only if its in-order bytes from offset 0 are all in that datagram.

`cryptography` (AES) is imported by the functions that decrypt, not at import time; the key
schedule itself is HKDF over SHA-256 from the standard library. Derived keys are cached per
(version, DCID) in a bounded LRU.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from bisect import bisect_left, bisect_right
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from throttle.errors import ParseError
from throttle.wire import tls

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "QUIC_V1",
    "QUIC_V2",
    "QuicParseError",
    "LongHeader",
    "Initial",
    "CryptoStream",
    "peek",
    "parse_initials",
    "client_hello",
    "first_datagram_hello",
]

QUIC_V1 = 0x00000001  # RFC 9000
QUIC_V2 = 0x6B3343CF  # RFC 9369

MAX_CID = 20  # RFC 9000 §17.2: a v1/v2 connection ID is at most 20 bytes
MAX_CID_INVARIANT = 255  # RFC 8999 §5.1: any other version (and Version Negotiation)
MAX_VARINT = (1 << 62) - 1
MAX_STREAM_OFFSET = MAX_VARINT  # RFC 9000 §19.6: offset + length of CRYPTO data

# Initial salts and HKDF labels per version (RFC 9001 §5.2 and §5.1; RFC 9369 §3.3.1 and §3.3.2).
_SALTS = {
    QUIC_V1: bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
    QUIC_V2: bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
}
_LABELS = {
    QUIC_V1: (b"quic key", b"quic iv", b"quic hp"),
    QUIC_V2: (b"quicv2 key", b"quicv2 iv", b"quicv2 hp"),
}
# Long-header packet type bits -> kind (RFC 9000 §17.2, Table 5; RFC 9369 §3.2 permutes them).
_TYPES: dict[int, tuple[str, str, str, str]] = {
    QUIC_V1: ("initial", "0rtt", "handshake", "retry"),
    QUIC_V2: ("retry", "initial", "0rtt", "handshake"),
}

_Kind = Literal["initial", "0rtt", "handshake", "retry", "version_negotiation", "unknown_version"]

# Frame types allowed in an Initial packet (RFC 9000 §12.4, Table 3).
_PADDING, _PING, _ACK, _ACK_ECN, _CRYPTO, _CLOSE = 0x00, 0x01, 0x02, 0x03, 0x06, 0x1C
_NONZERO = re.compile(b"[^\x00]").search  # the end of a run of PADDING, found without copying


class QuicParseError(ParseError):
    """The bytes are not a (decryptable, well-formed) QUIC client Initial."""


class LongHeader(NamedTuple):
    kind: _Kind
    version: int
    dcid: bytes
    scid: bytes


class Initial(NamedTuple):
    version: int
    dcid: bytes
    scid: bytes
    token: bytes
    packet_number: int
    crypto: tuple[tuple[int, bytes], ...]  # CRYPTO frames as (offset, data), in packet order
    pings: int  # PING frames seen
    padding: int  # PADDING bytes seen


# --------------------------------------------------------------------------------------------
# The long header, without cryptography
# --------------------------------------------------------------------------------------------


def _header(data: bytes, pos: int) -> tuple[_Kind, int, bytes, bytes, int]:
    """(kind, version, dcid, scid, offset after the SCID) of the long header at `pos`."""
    n = len(data)
    if n - pos < 7:
        raise QuicParseError("long header is truncated")
    first = data[pos]
    version = int.from_bytes(data[pos + 1 : pos + 5], "big")
    kinds = _TYPES.get(version)
    kind: _Kind
    if version == 0:
        kind, max_cid = "version_negotiation", MAX_CID_INVARIANT
    elif kinds is None:
        kind, max_cid = "unknown_version", MAX_CID_INVARIANT
    else:
        kind, max_cid = kinds[(first >> 4) & 3], MAX_CID  # type: ignore[assignment]
    dlen = data[pos + 5]
    if dlen > max_cid:
        raise QuicParseError(f"destination connection ID length {dlen} is over {max_cid}")
    p = pos + 6 + dlen
    if p >= n:
        raise QuicParseError("long header is truncated in the connection IDs")
    slen = data[p]
    if slen > max_cid:
        raise QuicParseError(f"source connection ID length {slen} is over {max_cid}")
    if p + 1 + slen > n:
        raise QuicParseError("long header is truncated in the source connection ID")
    return kind, version, data[pos + 6 : pos + 6 + dlen], data[p + 1 : p + 1 + slen], p + 1 + slen


def peek(datagram: bytes) -> LongHeader | None:
    """The long header at the start of `datagram`; None without the long-header bit."""
    if not datagram or not datagram[0] & 0x80:
        return None
    kind, version, dcid, scid, _ = _header(datagram if isinstance(datagram, bytes) else bytes(datagram), 0)
    return LongHeader(kind, version, dcid, scid)


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, next position) of the variable-length integer at `pos` (RFC 9000 §16)."""
    if pos >= end:
        raise QuicParseError("variable-length integer runs past the end")
    first = data[pos]
    prefix = first >> 6
    if prefix == 0:
        return first, pos + 1
    if prefix == 1:
        if pos + 2 > end:
            raise QuicParseError("variable-length integer runs past the end")
        return (first & 0x3F) << 8 | data[pos + 1], pos + 2
    size = 4 if prefix == 2 else 8
    if pos + size > end:
        raise QuicParseError("variable-length integer runs past the end")
    return int.from_bytes(data[pos : pos + size], "big") & ((1 << (8 * size - 2)) - 1), pos + size


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 §7.1) with an empty context, for lengths up to 32 bytes."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes((len(full),)) + full + b"\x00"
    return hmac.new(secret, info + b"\x01", hashlib.sha256).digest()[:length]


def initial_secrets(version: int, dcid: bytes) -> tuple[bytes, bytes, bytes]:
    """The client's Initial (key, iv, hp) for `dcid` (RFC 9001 §5.2, RFC 9369 §3.3)."""
    salt = _SALTS.get(version)
    if salt is None:
        raise QuicParseError(f"no Initial keys for QUIC version {version:#010x}")
    initial = hmac.new(salt, dcid, hashlib.sha256).digest()  # HKDF-Extract
    client = _expand_label(initial, b"client in", 32)
    key_label, iv_label, hp_label = _LABELS[version]
    return _expand_label(client, key_label, 16), _expand_label(client, iv_label, 12), _expand_label(client, hp_label, 16)


class _Keys(NamedTuple):
    aead: AESGCM
    hp: Any  # a reusable AES-128-ECB encryptor (ECB keeps no state between blocks; one thread)
    iv: int
    invalid_tag: type[Exception]  # cryptography's InvalidTag, imported with the rest


@functools.lru_cache(maxsize=1024)
def _keys(version: int, dcid: bytes) -> _Keys:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key, iv, hp = initial_secrets(version, dcid)
    hp_encryptor = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    return _Keys(AESGCM(key), hp_encryptor, int.from_bytes(iv, "big"), InvalidTag)


# --------------------------------------------------------------------------------------------
# Initial packets
# --------------------------------------------------------------------------------------------


def parse_initials(datagram: bytes) -> list[Initial]:
    """Every client Initial packet in `datagram`, decrypted (see the module docstring).

    The first packet must be a decryptable v1/v2 Initial, or QuicParseError is raised. After it,
    coalesced packets (RFC 9000 §12.2) are handled as a server would: further Initials with the same
    DCID are parsed, other long-header packets skipped by their length, and the walk stops at a short
    header (it fills the rest of the datagram), at a packet with another DCID, at one without a length
    field (Retry, Version Negotiation, unknown version) or at one that does not decrypt."""
    data = datagram if isinstance(datagram, bytes) else bytes(datagram)
    if not data or not data[0] & 0x80:
        raise QuicParseError("not a QUIC long-header packet")
    first, pos = _initial(data, 0, None)
    out = [first]
    dcid = first.dcid
    n = len(data)
    while pos < n:
        if not data[pos] & 0x80:
            break  # a short-header packet, or trailing junk: nothing more for a censor
        try:
            kind, version, pdcid, _, p = _header(data, pos)
            if pdcid != dcid or kind in ("retry", "version_negotiation", "unknown_version"):
                break
            if kind == "initial":
                initial, pos = _initial(data, pos, first.version)
                out.append(initial)
                continue
            length, p = _varint(data, p, n)  # 0-RTT or Handshake: skip it
            if p + length > n:
                break
            pos = p + length
        except QuicParseError:
            break
    return out


def _initial(data: bytes, pos: int, expect_version: int | None) -> tuple[Initial, int]:
    """The Initial packet at `pos`, decrypted, and the offset after it."""
    kind, version, dcid, scid, p = _header(data, pos)
    if kind != "initial":
        raise QuicParseError(f"not an Initial packet but {kind.replace('_', ' ')}")
    if expect_version is not None and version != expect_version:
        raise QuicParseError("coalesced Initial of another version")
    n = len(data)
    token_len, p = _varint(data, p, n)
    if p + token_len > n:
        raise QuicParseError("token runs past the datagram")
    token = data[p : p + token_len]
    p += token_len
    length, pn_offset = _varint(data, p, n)
    end = pn_offset + length
    if end > n:
        raise QuicParseError(f"packet length {length} runs past the datagram")
    # The header protection sample starts 4 bytes after the packet number's start (RFC 9001 §5.4.2);
    # the shortest packet number (1 byte) then leaves at least a 16-byte AEAD tag.
    if pn_offset + 20 > end:
        raise QuicParseError("packet is too short to sample for header protection")
    keys = _keys(version, dcid)
    mask = keys.hp.update(data[pn_offset + 4 : pn_offset + 20])
    first = data[pos] ^ (mask[0] & 0x0F)
    pn_len = (first & 3) + 1
    pn = int.from_bytes(data[pn_offset : pn_offset + pn_len], "big") ^ int.from_bytes(mask[1 : 1 + pn_len], "big")
    header = bytes((first,)) + data[pos + 1 : pn_offset] + pn.to_bytes(pn_len, "big")
    nonce = (keys.iv ^ pn).to_bytes(12, "big")
    try:
        plain = keys.aead.decrypt(nonce, data[pn_offset + pn_len : end], header)
    except keys.invalid_tag as exc:
        raise QuicParseError("Initial packet does not authenticate (not a client Initial for this DCID)") from exc
    if first & 0x0C:
        raise QuicParseError("reserved header bits are set")  # RFC 9000 §17.2: PROTOCOL_VIOLATION
    crypto, pings, padding = _frames(plain)
    # Read alone, an Initial has no earlier packet number to decode against: the truncated number is
    # taken as the full one. It is, for a sender following RFC 9000 §17.1 / Appendix A.2: with nothing
    # acknowledged in the Initial space it must encode enough bits for the whole number.
    return Initial(version, dcid, scid, token, pn, crypto, pings, padding), end


def _frames(plain: bytes) -> tuple[tuple[tuple[int, bytes], ...], int, int]:
    """(CRYPTO frames, PINGs, PADDING bytes) of an Initial packet's plaintext."""
    end = len(plain)
    if not end:
        raise QuicParseError("an Initial packet without frames")
    crypto: list[tuple[int, bytes]] = []
    pings = padding = 0
    pos = 0
    while pos < end:
        ftype = plain[pos]
        if ftype == _PADDING:
            found = _NONZERO(plain, pos)
            stop = end if found is None else found.start()
            padding += stop - pos
            pos = stop
        elif ftype == _CRYPTO:
            offset, pos = _varint(plain, pos + 1, end)
            length, pos = _varint(plain, pos, end)
            if pos + length > end:
                raise QuicParseError(f"CRYPTO frame of {length} bytes runs past the packet")
            if offset + length > MAX_STREAM_OFFSET:
                raise QuicParseError("CRYPTO frame ends past 2**62-1")
            crypto.append((offset, plain[pos : pos + length]))
            pos += length
        elif ftype == _PING:
            pings += 1
            pos += 1
        elif ftype == _ACK or ftype == _ACK_ECN:
            _, pos = _varint(plain, pos + 1, end)  # largest acknowledged
            _, pos = _varint(plain, pos, end)  # ACK delay
            ranges, pos = _varint(plain, pos, end)
            _, pos = _varint(plain, pos, end)  # first ACK range
            if 2 * ranges > end - pos:  # each range is a gap and a length, a byte at least each
                raise QuicParseError(f"ACK frame claims {ranges} ranges, more than the packet holds")
            for _ in range(2 * ranges + (3 if ftype == _ACK_ECN else 0)):
                _, pos = _varint(plain, pos, end)
        elif ftype == _CLOSE:
            _, pos = _varint(plain, pos + 1, end)  # error code
            _, pos = _varint(plain, pos, end)  # frame type
            reason, pos = _varint(plain, pos, end)
            if pos + reason > end:
                raise QuicParseError("CONNECTION_CLOSE reason runs past the packet")
            break  # the connection is closing: nothing after it matters
        else:
            if ftype & 0xC0:
                raise QuicParseError(f"frame type encoded in {1 << (ftype >> 6)} bytes in an Initial")
            raise QuicParseError(f"frame type {ftype:#x} is not allowed in an Initial packet")
    return tuple(crypto), pings, padding


# --------------------------------------------------------------------------------------------
# CRYPTO stream reassembly and the ClientHello
# --------------------------------------------------------------------------------------------


class CryptoStream:
    """The CRYPTO stream of one connection's Initials, reassembled from frames in any order.

    Bytes at or after `limit` are dropped; the first copy of a byte wins over later ones. Memory is
    one buffer of at most `limit` bytes and a list of at most `max_pieces` received ranges: a piece
    that would need a range beyond that is dropped (a client that fragments its hello into more
    out-of-order pieces than this is not read, which is the censor's loss, not a memory blow-up).
    """

    __slots__ = ("limit", "max_pieces", "_buf", "_starts", "_ends")

    def __init__(self, limit: int = 16384, max_pieces: int = 256) -> None:
        self.limit = limit
        self.max_pieces = max_pieces
        self._buf = bytearray()
        self._starts: list[int] = []  # disjoint, sorted, non-adjacent received ranges
        self._ends: list[int] = []

    def add(self, offset: int, data: bytes) -> None:
        n = len(data)
        if offset < 0 or offset + n > MAX_STREAM_OFFSET:
            raise QuicParseError(f"CRYPTO offset {offset} is out of range")
        end = offset + n
        if end > self.limit:
            end = self.limit
        if offset >= end:
            return
        starts, ends, buf = self._starts, self._ends, self._buf
        # Ranges touching or overlapping [offset, end): indexes lo..hi-1.
        lo = bisect_left(ends, offset)
        hi = bisect_right(starts, end)
        if len(buf) < end:
            if lo == hi and len(starts) >= self.max_pieces:
                return  # a new separate range, and the table is full
            buf.extend(bytes(end - len(buf)))
        if lo == hi:  # the common case: a piece that touches nothing received
            if len(starts) >= self.max_pieces:
                return
            buf[offset:end] = data if end - offset == n else data[: end - offset]
            starts.insert(lo, offset)
            ends.insert(lo, end)
            return
        # Fill the gaps between the existing ranges; what is there already stays.
        cursor = offset
        for i in range(lo, hi):
            s = starts[i]
            if s > cursor:
                buf[cursor:s] = data[cursor - offset : s - offset]
            if ends[i] > cursor:
                cursor = ends[i]
        if cursor < end:
            buf[cursor:end] = data[cursor - offset : end - offset]
        first, last = starts[lo], ends[hi - 1]
        starts[lo:hi] = [offset if offset < first else first]
        ends[lo:hi] = [end if end > last else last]

    def contiguous(self) -> bytes:
        """The in-order bytes from offset 0 received so far."""
        if self._starts and self._starts[0] == 0:
            return bytes(self._buf[: self._ends[0]])
        return b""

    def __len__(self) -> int:
        """How many bytes are held (received, within the limit)."""
        return sum(e - s for s, e in zip(self._starts, self._ends))


def client_hello(stream: bytes) -> tls.ClientHello | None:
    """The ClientHello at the start of a CRYPTO stream: None when incomplete."""
    try:
        return tls.parse_handshake(stream)
    except tls.TLSParseError as exc:
        raise QuicParseError(f"CRYPTO stream: {exc}") from exc


def first_datagram_hello(datagram: bytes) -> tls.ClientHello | None:
    """The ClientHello as a censor reading this one datagram sees it: None if it is not complete in it."""
    stream = CryptoStream()
    for initial in parse_initials(datagram):
        for offset, data in initial.crypto:
            stream.add(offset, data)
    return client_hello(stream.contiguous())
