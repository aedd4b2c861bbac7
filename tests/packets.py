"""Test helpers: TCP/UDP conversations crafted with scapy (tests only, never the per-packet path)."""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass, field

from scapy.all import IP, TCP, UDP, IPv6, IPv6ExtHdrHopByHop, raw  # type: ignore[import-untyped]


@functools.lru_cache(maxsize=64)
def python_hello(name: str | None, alpn: tuple[str, ...] | None = None) -> bytes:
    """A real ClientHello written by Python's ssl module (OpenSSL) into a memory BIO."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


@dataclass
class Conversation:
    """One TCP connection; `client()`/`server()` return raw IP packets with consistent sequence numbers."""

    client_ip: str = "198.18.0.2"
    server_ip: str = "198.18.2.2"
    client_port: int = 40000
    server_port: int = 443
    v6: bool = False
    hop_by_hop: bool = False
    seq: list[int] = field(default_factory=lambda: [1000, 5000])

    def _ip(self, src: str, dst: str):  # type: ignore[no-untyped-def]
        if self.v6:
            base = IPv6(src=src, dst=dst)
            return base / IPv6ExtHdrHopByHop() if self.hop_by_hop else base
        return IP(src=src, dst=dst)

    def _packet(self, d: int, flags: str, payload: bytes = b"") -> bytes:
        src, dst = (self.client_ip, self.server_ip) if d == 0 else (self.server_ip, self.client_ip)
        sport, dport = (self.client_port, self.server_port) if d == 0 else (self.server_port, self.client_port)
        seq = self.seq[d]
        pkt = self._ip(src, dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=self.seq[1 - d])
        if payload:
            pkt = pkt / payload
        self.seq[d] = (seq + len(payload) + (1 if "S" in flags or "F" in flags else 0)) & 0xFFFFFFFF
        return raw(pkt)

    def handshake(self) -> list[bytes]:
        return [self._packet(0, "S"), self._packet(1, "SA"), self._packet(0, "A")]

    def client(self, payload: bytes = b"", flags: str = "PA") -> bytes:
        return self._packet(0, flags, payload)

    def server(self, payload: bytes = b"", flags: str = "PA") -> bytes:
        return self._packet(1, flags, payload)

    def segments(self, d: int, payload: bytes, mss: int) -> list[bytes]:
        return [self._packet(d, "PA", payload[i : i + mss]) for i in range(0, len(payload), mss)]


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    return raw(ip / UDP(sport=sport, dport=dport) / payload)


VECTORS = __import__("pathlib").Path(__file__).resolve().parent / "vectors"


@functools.lru_cache(maxsize=None)
def client_segments(capture: str) -> tuple[bytes, ...]:
    """The TCP payloads the opener of the (single) connection in a captured vector sent, in order."""
    from scapy.all import IP as _IP  # type: ignore[import-untyped]
    from scapy.all import TCP as _TCP
    from scapy.all import IPv6 as _IPv6

    from throttle.wire.pcap import read_packets

    opener = None
    out = []
    for _, data in read_packets(VECTORS / capture):
        pkt = _IP(data) if data[0] >> 4 == 4 else _IPv6(data)
        tcp = pkt[_TCP]
        if opener is None and tcp.flags & 0x02 and not tcp.flags & 0x10:
            opener = (pkt.src, tcp.sport)
        if (pkt.src, tcp.sport) == opener and bytes(tcp.payload):
            out.append(bytes(tcp.payload))
    return tuple(out)


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    """Apply fuzzing edits (flip a bit, set, insert or delete a byte, truncate) to a valid message."""
    buf = bytearray(data)
    for op, pos, value in ops:
        if not buf and op != "insert":
            continue
        i = pos % (len(buf) + (op == "insert"))
        if op == "flip":
            buf[i] ^= 1 << (value % 8)
        elif op == "set":
            buf[i] = value
        elif op == "insert":
            buf.insert(i, value)
        elif op == "delete":
            del buf[i]
        else:
            del buf[i:]
    return bytes(buf)


def quic_initials(sni: str | None, *, version: int = 1, ech: bool = False, alpn: tuple[str, ...] = ("h3",),
                  padding_alpn: int = 0) -> list[bytes]:
    """The first flight of a real QUIC client (aioquic): its Initial datagrams (UDP payloads).
    `ech`: the ClientHello also carries an encrypted_client_hello extension (random contents);
    `padding_alpn`: that many 200-byte ALPN names more, to grow the hello past one datagram."""
    import os

    from aioquic.quic.configuration import QuicConfiguration  # type: ignore[import-untyped]
    from aioquic.quic.connection import QuicConnection  # type: ignore[import-untyped]

    class Connection(QuicConnection):  # type: ignore[misc]
        def _initialize(self, peer_cid: bytes) -> None:
            super()._initialize(peer_cid)
            if ech:  # outer ECH: type 0, HKDF-SHA256, AES-128-GCM, config id, enc, payload
                body = b"\x00\x00\x01\x00\x01\x07" + (32).to_bytes(2, "big") + os.urandom(32) + \
                    (208).to_bytes(2, "big") + os.urandom(208)
                self.tls.handshake_extensions.append((0xFE0D, body))

    names = list(alpn) + [f"pad{i}-" + "x" * 194 for i in range(padding_alpn)]
    config = QuicConfiguration(is_client=True, alpn_protocols=names, server_name=sni,
                               supported_versions=[version])
    conn = Connection(configuration=config)
    conn.connect(("198.18.1.2", 443), now=0.0)
    return [data for data, _addr in conn.datagrams_to_send(now=0.0)]
