"""Test-side QUIC client Initial builder: frames, packet protection and datagrams (tests only).

Written from RFC 9000 §17.2.2/§19, RFC 9001 §5 and RFC 9369 §3 independently of
`throttle.wire.quic`: the key schedule here uses `cryptography`'s HKDF, not the parser's code, so a
shared mistake would have to be made twice. It protects any plaintext, valid frames or not, so the
fuzz tests can reach the parser's frame walker with bytes that pass AEAD authentication.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

V1 = 0x00000001
V2 = 0x6B3343CF
SALT = {
    V1: bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),  # RFC 9001 §5.2
    V2: bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),  # RFC 9369 §3.3.1
}
PREFIX = {V1: b"quic ", V2: b"quicv2 "}  # RFC 9369 §3.3.2
INITIAL_TYPE = {V1: 0, V2: 1}  # long-header type bits of an Initial (RFC 9369 §3.2)
HANDSHAKE_TYPE = {V1: 2, V2: 3}


def varint(value: int, size: int | None = None) -> bytes:
    """RFC 9000 §16: the shortest encoding, or `size` bytes (1, 2, 4 or 8)."""
    if size is None:
        size = 1 if value < 1 << 6 else 2 if value < 1 << 14 else 4 if value < 1 << 30 else 8
    code = {1: 0, 2: 1, 4: 2, 8: 3}[size]
    assert value < 1 << (8 * size - 2), (value, size)
    return (value | code << (8 * size - 2)).to_bytes(size, "big")


def crypto(offset: int, data: bytes) -> bytes:
    return b"\x06" + varint(offset) + varint(len(data)) + data


def ping() -> bytes:
    return b"\x01"


def padding(n: int) -> bytes:
    return bytes(n)


def ack(largest: int = 0, delay: int = 0, first: int = 0, ranges: Sequence[tuple[int, int]] = (), ecn: tuple[int, int, int] | None = None) -> bytes:
    out = (b"\x03" if ecn else b"\x02") + varint(largest) + varint(delay) + varint(len(ranges)) + varint(first)
    for gap, length in ranges:
        out += varint(gap) + varint(length)
    if ecn:
        out += b"".join(varint(x) for x in ecn)
    return out


def connection_close(code: int = 0, frame_type: int = 0, reason: bytes = b"") -> bytes:
    return b"\x1c" + varint(code) + varint(frame_type) + varint(len(reason)) + reason


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


def client_keys(version: int, dcid: bytes) -> tuple[bytes, bytes, bytes]:
    """(key, iv, hp) of the client's Initial packets."""
    import hashlib
    import hmac

    initial = hmac.new(SALT[version], dcid, hashlib.sha256).digest()  # HKDF-Extract
    client = _expand_label(initial, b"client in", 32)
    p = PREFIX[version]
    return _expand_label(client, p + b"key", 16), _expand_label(client, p + b"iv", 12), _expand_label(client, p + b"hp", 16)


def long_packet(
    version: int,
    dcid: bytes,
    payload: bytes,
    *,
    scid: bytes = b"",
    token: bytes = b"",
    pn: int = 0,
    pn_len: int = 2,
    ptype: int | None = None,
    keys_dcid: bytes | None = None,
    reserved: int = 0,
) -> bytes:
    """One protected long-header packet (an Initial unless `ptype` says otherwise) holding
    `payload` as its plaintext, whatever that is. Keys come from `keys_dcid` (default: `dcid`)."""
    key, iv, hp = client_keys(version, dcid if keys_dcid is None else keys_dcid)
    t = INITIAL_TYPE[version] if ptype is None else ptype
    first = 0xC0 | t << 4 | reserved << 2 | (pn_len - 1)
    head = bytes([first]) + version.to_bytes(4, "big") + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid
    if t == INITIAL_TYPE[version]:
        head += varint(len(token)) + token
    length = pn_len + len(payload) + 16
    head += varint(length, 2 if length < 1 << 14 else 4)
    pn_bytes = (pn & ((1 << (8 * pn_len)) - 1)).to_bytes(pn_len, "big")
    nonce = (int.from_bytes(iv, "big") ^ pn).to_bytes(12, "big")
    sealed = AESGCM(key).encrypt(nonce, payload, head + pn_bytes)
    packet = bytearray(head + pn_bytes + sealed)
    pn_offset = len(head)
    sample = bytes(packet[pn_offset + 4 : pn_offset + 20])
    assert len(sample) == 16, "payload too short to sample: pad it"
    enc = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    mask = enc.update(sample) + enc.finalize()
    packet[0] ^= mask[0] & 0x0F
    for i in range(pn_len):
        packet[pn_offset + i] ^= mask[1 + i]
    return bytes(packet)


def initial(version: int, dcid: bytes, frames: bytes, *, size: int | None = None, **kw: object) -> bytes:
    """A client Initial; with `size`, PADDING frames appended so the packet is `size` bytes long."""
    frames = frames + bytes(max(0, 4 - len(frames)))  # enough to sample with a 1-byte packet number
    if size is not None:
        probe = long_packet(version, dcid, frames, **kw)  # type: ignore[arg-type]
        frames += bytes(max(0, size - len(probe)))
    return long_packet(version, dcid, frames, **kw)  # type: ignore[arg-type]


def split_hello(
    hello: bytes,
    version: int,
    dcid: bytes,
    *,
    first_bytes: int = 1000,
    pieces: int = 6,
    seed: int = 1,
    size: int = 1250,
) -> list[bytes]:
    """A Chromium-like first flight: the handshake message `hello` cut into CRYPTO frames, the
    first `first_bytes` in datagram 1 and the rest in datagram 2, each datagram's frames shuffled,
    with PING and PADDING frames between them, each datagram padded to `size` bytes."""
    rng = random.Random(seed)
    out = []
    for pn, (lo, hi) in enumerate(((0, first_bytes), (first_bytes, len(hello)))):
        cuts = sorted(rng.sample(range(lo + 1, hi), pieces - 1))
        bounds = [lo, *cuts, hi]
        frames = [crypto(a, hello[a:b]) for a, b in zip(bounds, bounds[1:])]
        rng.shuffle(frames)
        body = b""
        for f in frames:
            body += f + rng.choice([b"", ping(), padding(rng.randint(1, 9)), ping() + padding(3)])
        out.append(initial(version, dcid, body, size=size, pn=pn, scid=b"\x01\x02\x03\x04"))
    return out
