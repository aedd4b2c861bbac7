"""The byte plans of the evasion tricks: what the client writes before its junk, segment by segment.

Pure apart from OpenSSL's randomness: a plan is a tuple of `Segment`s, each one write on a socket
with TCP_NODELAY followed by a pause, so each write leaves as its own TCP segment (or, for `pad`,
as many as the MSS forces). The tricks are those of docs/incidents.md §7, aimed at the 2021 TSPU
model of §5-6: it looks at the first data packet of a direction, keeps looking for 15-20 more only
if that packet was a TLS record, gives up on an unparseable first packet of 101 bytes or more,
reads one TLS record per segment and never reassembles TCP.

The ClientHello is a real one, written by Python's ssl module (OpenSSL) into a memory BIO.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from struct import unpack_from
from typing import Callable

from throttle.errors import ThrottleError
from throttle.scenario import EVASIONS  # one list: what scenario files may name
from throttle.wire.tls import TLSParseError, parse_client_hello

__all__ = ["EVASIONS", "FAKE_SNI", "Segment", "add_ech", "client_hello", "ech_outer", "plan", "replace_sni", "segment_count",
           "sni_span"]

FAKE_SNI = "example.org"  # the innocent name of the `fake` trick's decoy hello
PAUSE = 0.05  # seconds after a write: on an idle connection the next write is a new segment
PAD_MIN = 1600  # the `pad` hello must not fit one 1,500-byte packet, whatever the MSS
# Eight 200-byte ALPN names grow OpenSSL's hello (about 300 bytes before its padding to 517)
# to about 1,900 bytes.
PAD_ALPN = tuple(f"throttle-pad-{i}-" + "x" * 184 for i in range(8))
CCS_RECORD = bytes.fromhex("140303000101")  # ChangeCipherSpec, TLS 1.2, length 1, value 1
SCRAMBLE_MIN, SCRAMBLE_MAX = 101, 200


@dataclass(frozen=True, slots=True)
class Segment:
    """One write, then a pause (seconds) before the next write."""

    data: bytes
    pause: float = PAUSE


def client_hello(sni: str | None, alpn: tuple[str, ...] = ()) -> bytes:
    """The first flight of a real OpenSSL client: one TLS record holding a ClientHello."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    try:
        conn = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    except (ValueError, UnicodeError) as exc:
        raise ThrottleError(f"SNI {sni!r}: {exc}") from None
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass  # the hello is written; the handshake waits for a server that is not there
    return outgoing.read()


def _sni_offsets(hello: bytes) -> tuple[int, int, int, int]:
    """(extensions length, server_name extension, host_name start, end) offsets in a one-record
    ClientHello, as the parser found them; ThrottleError when it has no server_name."""
    try:
        parsed = parse_client_hello(hello)
    except TLSParseError as exc:
        raise ThrottleError(f"not a ClientHello: {exc}") from None
    if parsed is None or parsed.records != 1 or parsed.server_name_offset < 0:
        raise ThrottleError("the ClientHello has no server_name extension")
    body = 9  # record header (5) and handshake header (4)
    exts, ext = body + parsed.extensions_offset, body + parsed.server_name_offset
    # server_name: type (2), length (2), list length (2), name_type (1), host_name length (2), name
    nlen = unpack_from("!H", hello, ext + 7)[0]
    return exts, ext, ext + 9, ext + 9 + nlen


def sni_span(hello: bytes) -> tuple[int, int]:
    """Where the host_name bytes of the SNI lie in `hello` (start, end)."""
    return _sni_offsets(hello)[2:]


def replace_sni(hello: bytes, name: bytes) -> bytes:
    """`hello` with another host_name, every enclosing length fixed (record, handshake,
    extensions, server_name extension, its list, the name)."""
    exts, ext, start, end = _sni_offsets(hello)
    delta = len(name) - (end - start)
    out = bytearray(hello[:start] + name + hello[end:])
    for off, width in ((3, 2), (6, 3), (exts, 2), (ext + 2, 2), (ext + 4, 2), (ext + 7, 2)):
        out[off : off + width] = (int.from_bytes(out[off : off + width], "big") + delta).to_bytes(width, "big")
    return bytes(out)


def ech_outer(noise: Callable[[int], bytes] = os.urandom) -> bytes:
    """The body of an outer encrypted_client_hello extension (RFC 9849 §5): HPKE suite HKDF-SHA256
    and AES-128-GCM, a random config id, a 32-byte encapsulated key, a random 208-byte payload."""
    enc, payload = noise(32), noise(208)
    return (b"\x00" + (1).to_bytes(2, "big") + (1).to_bytes(2, "big") + noise(1)
            + len(enc).to_bytes(2, "big") + enc + len(payload).to_bytes(2, "big") + payload)


def add_ech(hello: bytes, noise: Callable[[int], bytes] = os.urandom) -> bytes:
    """`hello` with an encrypted_client_hello extension (0xfe0d) appended, as a client that
    greases ECH, or offers it, sends: the outer form (RFC 9849 §5) with HPKE suite X25519,
    HKDF-SHA256, AES-128-GCM, a random config id, a 32-byte encapsulated key and a random 208-byte
    payload. The SNI stays the outer name: docs/incidents.md §4.29's signature is this extension
    next to the SNI `cloudflare-ech.com`. Every enclosing length is fixed."""
    exts = _sni_offsets(hello)[0] if parse_client_hello(hello) is not None else -1
    if exts < 0:
        raise ThrottleError("not a one-record ClientHello")
    body = ech_outer(noise)
    ext = (0xFE0D).to_bytes(2, "big") + len(body).to_bytes(2, "big") + body
    end = exts + 2 + int.from_bytes(hello[exts : exts + 2], "big")  # the end of the extensions block
    out = bytearray(hello[:end] + ext + hello[end:])
    for off, width in ((3, 2), (6, 3), (exts, 2)):
        out[off : off + width] = (int.from_bytes(out[off : off + width], "big") + len(ext)).to_bytes(width, "big")
    return bytes(out)


def _dotted_hello(sni: str) -> bytes:
    name = sni if sni.endswith(".") else sni + "."
    hello = client_hello(name)
    parsed = parse_client_hello(hello)
    if parsed is None or parsed.sni != name:
        # Some ssl builds drop the dot; the sink does not care whether the hello is valid TLS.
        hello = replace_sni(hello, name.encode("ascii"))
    return hello


def plan(evasion: str, sni: str | None, *, noise: Callable[[int], bytes] = os.urandom,
         ech: bool = False) -> tuple[Segment, ...]:
    """The segments a trick sends before the junk. `noise(n)` gives n random bytes (`scramble`).
    `ech`: the real hello carries an encrypted_client_hello extension (`add_ech`).
    ThrottleError for an unknown trick, or one that needs an SNI when there is none."""
    segments = _plan(evasion, sni, noise)
    if not ech:
        return segments
    if evasion not in ("none", "fake", "ccs"):
        raise ThrottleError(f"ech works with the evasions none, fake and ccs, not {evasion!r}")
    last = segments[-1]
    if evasion == "ccs":
        return (Segment(CCS_RECORD + add_ech(last.data[len(CCS_RECORD):], noise), last.pause),)
    return (*segments[:-1], Segment(add_ech(last.data, noise), last.pause))


def _plan(evasion: str, sni: str | None, noise: Callable[[int], bytes]) -> tuple[Segment, ...]:
    if evasion not in EVASIONS:
        raise ThrottleError(f"evasion {evasion!r}: use one of {', '.join(EVASIONS)}")
    if evasion in ("split", "dot") and not sni:
        raise ThrottleError(f"evasion {evasion!r} works on the SNI: give --sni")
    if evasion == "none":
        # The control: the whole hello in the first data packet, where the device looks (§5).
        return (Segment(client_hello(sni)),)
    if evasion == "split":
        # Cut inside the name: the first segment is a TLS record too short for its length, and
        # the device reads no further than one segment (no reassembly, §6); the second segment
        # starts mid-record, is not TLS, and holds only the end of the name.
        hello = client_hello(sni)
        start, end = sni_span(hello)
        cut = (start + end) // 2
        return (Segment(hello[:cut]), Segment(hello[cut:]))
    if evasion == "pad":
        # A hello longer than any 1,500-byte packet: the kernel must cut it at the MSS, so the
        # first segment again holds an incomplete record (§6, §8). OpenSSL pads it for us with
        # long ALPN names, so the hello stays a valid one.
        hello = client_hello(sni, PAD_ALPN)
        if len(hello) < PAD_MIN:
            raise ThrottleError(f"the padded ClientHello is only {len(hello)} bytes")
        return (Segment(hello),)
    if evasion == "scramble":
        # An unparseable first packet of 101+ bytes makes the device stop inspecting the flow
        # for good (§5). Byte 0 is 0x80-0xff: not a TLS record type (20-23), not an HTTP method
        # letter, not a SOCKS version, the things that would keep the device looking.
        n = SCRAMBLE_MIN + noise(1)[0] % (SCRAMBLE_MAX - SCRAMBLE_MIN + 1)
        junk = noise(n)
        return (Segment(bytes((junk[0] | 0x80,)) + junk[1:]), Segment(client_hello(sni)))
    if evasion == "ccs":
        # The device parses only the first record of a segment (§6): a ChangeCipherSpec record
        # is TLS, but not a handshake, so the ClientHello behind it in the same segment is unread.
        return (Segment(CCS_RECORD + client_hello(sni)),)
    if evasion == "dot":
        # `pbs.twimg.com.` is the same name to DNS, but the 2021 device matched it literally
        # against `*.twimg.com` and missed (§7).
        return (Segment(_dotted_hello(sni)),)  # type: ignore[arg-type]
    # fake: a complete hello for an innocent name first. The device does not settle on the first
    # name it sees; it keeps inspecting and catches the real hello next (§7: does NOT evade).
    return (Segment(client_hello(FAKE_SNI)), Segment(client_hello(sni)))


def segment_count(segments: tuple[Segment, ...], mss: int) -> int:
    """How many TCP segments the plan takes on the wire with this MSS."""
    return sum(-(-len(s.data) // mss) for s in segments)
