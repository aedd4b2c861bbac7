"""The one IPv4/IPv6, TCP and UDP header decoder: where a packet's transport header and payload are.

Everything in throttle that looks inside an IP packet goes through here: the engine on its
per-packet path (`locate`, `ip_end`, `flow_key`, `addresses`, and the header fields: `ports`,
`tcp_seq`, `tcp_ack`, `tcp_flags`, `tcp_header_length`, `opens_connection`, `ipv4_header_length`),
the RST injector (`source`), the capture reader (`ip_end`, to cut link-layer padding), and the
offline tools (`decode`, for bench analysis and benchmarks; `hop_limit`, `ipv4_id`, `tcp_ack`
and `tcp_options` for `throttle infer`).

`locate` and the field accessors are on the per-packet path, so they index bytes directly and
allocate nothing but their result. The accessors take the transport header's offset from `locate`
and trust the caller to have checked the packet is long enough, except where they say otherwise. It raises IndexError
for a packet cut short inside its fixed IP header (callers count that as malformed); every other
oddity is a defined result:

- the transport protocol and the offset of its header, walking IPv6 extension headers;
- protocol `NO_PORTS` (-1) for a TCP/UDP packet that has no transport header to key by: an IPv4 or
  IPv6 non-first fragment, or IPv6 extension headers cut short.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "ACK", "FIN", "NO_PORTS", "RST", "SYN", "TCP", "TCP_HEADER", "UDP", "UDP_HEADER", "Decoded", "addresses", "decode",
    "TCPOptions", "flow_key", "hop_limit", "ip_end", "ipv4_header_length", "ipv4_id", "tcp_options", "locate", "opens_connection", "ports", "source", "tcp_ack", "tcp_flags",
    "tcp_header_length", "tcp_seq",
]

TCP, UDP = 6, 17
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
NO_PORTS = -1
TCP_HEADER, UDP_HEADER = 20, 8  # bytes: a TCP header without options, a UDP header
# IPv6 extension headers that may sit between the fixed header and TCP/UDP: hop-by-hop, routing,
# destination options, mobility, HIP, shim6, experimental (all (len + 1) * 8 bytes long).
_IPV6_EXT = frozenset((0, 43, 60, 135, 139, 140, 253, 254))
_IPV6_FRAGMENT, _IPV6_AH = 44, 51
_MAX_EXTENSIONS = 8
_U32 = struct.Struct("!I").unpack_from  # the fastest read of a 32-bit field (measured against shifts, from_bytes)


def locate(packet: bytes) -> tuple[int, int, int]:
    """(IP version, transport protocol, transport header offset) of an IP packet.

    Version 0 means "not IPv4 or IPv6" (the other two values are then 0). Raises IndexError when
    the packet ends inside its fixed IP header."""
    head = packet[0] >> 4
    if head == 4:
        proto = packet[9]
        if (proto == TCP or proto == UDP) and (packet[6] & 0x1F or packet[7]):
            return 4, NO_PORTS, 0  # a non-first fragment: no ports to key by
        return 4, proto, (packet[0] & 0x0F) << 2
    if head == 6:
        nxt = packet[6]
        off = 40
        for _ in range(_MAX_EXTENSIONS):
            if nxt in _IPV6_EXT:
                nxt, off = packet[off], off + ((packet[off + 1] + 1) << 3)
            elif nxt == _IPV6_FRAGMENT:
                if (packet[off + 2] << 8 | packet[off + 3]) & 0xFFF8:
                    return 6, NO_PORTS, off
                nxt, off = packet[off], off + 8
            elif nxt == _IPV6_AH:
                nxt, off = packet[off], off + ((packet[off + 1] + 2) << 2)
            else:
                return 6, nxt, off
        return 6, NO_PORTS, off
    return 0, 0, 0


def ip_end(packet: bytes, version: int, start: int = 0, end: int | None = None) -> int:
    """Where the IP packet that starts at `start` ends: at `end` (default: the buffer's end), or
    earlier when its header says the rest is link-layer padding or a trailing FCS. A header that
    claims more than is there (a snaplen-truncated capture) does not move the end."""
    stop = len(packet) if end is None else end
    available = stop - start
    if version == 4:
        if available >= 4:
            total = (packet[start + 2] << 8) | packet[start + 3]
            if total < available:
                return start + total
    elif version == 6 and available >= 6:
        payload = (packet[start + 4] << 8) | packet[start + 5]
        if payload and 40 + payload < available:  # 0 means a jumbogram: keep everything
            return start + 40 + payload
    return stop


def flow_key(packet: bytes, version: int, proto: int, l4: int) -> bytes:
    """The flow table key of a TCP/UDP packet in its own orientation: protocol, source and
    destination address, source and destination port, as they stand in the packet. Shorter than
    13 (IPv4) or 37 (IPv6) bytes when the packet ends inside its ports."""
    if version == 4:
        return packet[9:10] + packet[12:20] + packet[l4 : l4 + 4]
    return bytes((proto,)) + packet[8:40] + packet[l4 : l4 + 4]


def reverse_key(key: bytes) -> bytes:
    """The key of the other direction of the same flow (a `flow_key` with both ends swapped)."""
    half = (len(key) - 5) // 2
    return key[:1] + key[1 + half : 1 + 2 * half] + key[1 : 1 + half] + key[-2:] + key[-4:-2]


def addresses(packet: bytes, version: int) -> tuple[bytes, bytes]:
    """(source, destination) address, packed: 4 bytes for IPv4, 16 for IPv6."""
    if version == 4:
        return packet[12:16], packet[16:20]
    return packet[8:24], packet[24:40]


def source(packet: bytes) -> bytes:
    """The source address of an IPv4 or IPv6 packet, packed (the caller checked it is one)."""
    return packet[12:16] if packet[0] >> 4 == 4 else packet[8:24]


def ipv4_header_length(packet: bytes) -> int:
    """An IPv4 header's length in bytes, as its IHL field says (20 and up when well formed)."""
    return (packet[0] & 0x0F) << 2


def ports(packet: bytes, l4: int) -> tuple[int, int]:
    """(source port, destination port) of the TCP or UDP header at `l4`."""
    return (packet[l4] << 8) | packet[l4 + 1], (packet[l4 + 2] << 8) | packet[l4 + 3]


def tcp_seq(packet: bytes, l4: int) -> int:
    """The sequence number of the TCP header at `l4`."""
    return int(_U32(packet, l4 + 4)[0])


def tcp_ack(packet: bytes, l4: int) -> int:
    """The acknowledgement number of the TCP header at `l4`."""
    return int(_U32(packet, l4 + 8)[0])


def tcp_flags(packet: bytes, l4: int) -> int:
    """The flags byte (FIN, SYN, RST, PSH, ACK, ...) of the TCP header at `l4`."""
    return packet[l4 + 13]


def tcp_header_length(packet: bytes, l4: int) -> int:
    """The TCP header's length in bytes, from its data offset (20 and up when well formed)."""
    return (packet[l4 + 12] >> 4) << 2


def opens_connection(packet: bytes, l4: int) -> bool:
    """Whether the TCP header at `l4` is a SYN without ACK (a client opening a connection); False
    when the packet ends before the flags."""
    return len(packet) > l4 + 13 and packet[l4 + 13] & (SYN | ACK) == SYN


class Decoded(NamedTuple):
    """A TCP or UDP packet's headers, for tools that read whole packets (not the engine)."""

    version: int
    proto: int
    src: bytes  # packed address
    dst: bytes
    sport: int
    dport: int
    seq: int  # 0 for UDP
    flags: int  # TCP flags; 0 for UDP
    payload_offset: int  # where the transport payload starts in the packet
    payload_length: int  # from the IP and transport headers' own lengths (see `decode`)

    @property
    def payload_end(self) -> int:
        return self.payload_offset + self.payload_length


def decode(packet: bytes) -> Decoded | None:
    """The TCP or UDP headers of an IP packet; None for anything else, or headers cut short.

    `payload_length` comes from the headers' length fields, so a capture cut at a small snap length
    (`tcpdump -s 128`) still counts every byte; slice `packet[d.payload_offset : d.payload_end]`
    for the bytes that were captured."""
    try:
        version, proto, l4 = locate(packet)
        if proto != TCP and proto != UDP:
            return None
        if version == 4:
            ihl = l4
            if ihl < 20:
                return None
            end = (packet[2] << 8) | packet[3]
        else:
            end = 40 + ((packet[4] << 8) | packet[5])
        src, dst = addresses(packet, version)
        sport = (packet[l4] << 8) | packet[l4 + 1]
        dport = (packet[l4 + 2] << 8) | packet[l4 + 3]
        if proto == TCP:
            seq = int.from_bytes(packet[l4 + 4 : l4 + 8], "big")
            if len(packet) < l4 + 14:
                return None
            header = (packet[l4 + 12] >> 4) << 2
            return Decoded(version, proto, src, dst, sport, dport, seq, packet[l4 + 13], l4 + header,
                           max(0, end - l4 - header))
        ulen = (packet[l4 + 4] << 8) | packet[l4 + 5]
        return Decoded(version, proto, src, dst, sport, dport, 0, 0, l4 + 8, max(0, ulen - 8))
    except IndexError:
        return None


def hop_limit(packet: bytes) -> int:
    """An IPv4 packet's TTL or an IPv6 packet's hop limit (the caller checked the fixed header is there)."""
    return packet[8] if packet[0] >> 4 == 4 else packet[7]


def ipv4_id(packet: bytes) -> int | None:
    """An IPv4 packet's identification field; None for IPv6 (it has none outside fragments)."""
    return (packet[4] << 8) | packet[5] if packet[0] >> 4 == 4 else None


class TCPOptions(NamedTuple):
    mss: int | None  # the MSS option (SYNs)
    sack: tuple[tuple[int, int], ...]  # SACK blocks as sent: absolute sequence numbers, [left, right)
    tsval: int | None  # the timestamps option (RFC 7323)
    tsecr: int | None


NO_OPTIONS = TCPOptions(None, (), None, None)


def tcp_options(packet: bytes, l4: int) -> TCPOptions:
    """The MSS, SACK and timestamps options of the TCP header at `l4`. Never raises: the walk
    stops at the header's end, the captured bytes' end, or an option whose length is malformed."""
    if len(packet) < l4 + 14:
        return NO_OPTIONS
    end = min(l4 + ((packet[l4 + 12] >> 4) << 2), len(packet))
    pos = l4 + TCP_HEADER
    if pos >= end:
        return NO_OPTIONS
    mss: int | None = None
    sack: list[tuple[int, int]] = []
    tsval: int | None = None
    tsecr: int | None = None
    while pos < end:
        kind = packet[pos]
        if kind == 0:
            break
        if kind == 1:
            pos += 1
            continue
        if pos + 1 >= end:
            break
        size = packet[pos + 1]
        if size < 2 or pos + size > end:
            break
        if kind == 2 and size == 4:
            mss = (packet[pos + 2] << 8) | packet[pos + 3]
        elif kind == 5 and size >= 10:
            for at in range(pos + 2, pos + size - 7, 8):
                sack.append((int(_U32(packet, at)[0]), int(_U32(packet, at + 4)[0])))
        elif kind == 8 and size == 10:
            tsval, tsecr = int(_U32(packet, pos + 2)[0]), int(_U32(packet, pos + 6)[0])
        pos += size
    return TCPOptions(mss, tuple(sack), tsval, tsecr)
