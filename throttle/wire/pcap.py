"""Reading IP packets and their timestamps out of pcap and pcapng capture files.

This module owns the capture file formats and the link layers found in them: it detects the
format by its magic number (classic pcap in microsecond or nanosecond resolution, either byte
order, and pcapng with any number of sections, interfaces and byte orders), walks the records
or blocks, converts each timestamp to float seconds, strips the link-layer header (loopback,
Ethernet with VLAN tags, raw IP, Linux cooked v1/v2) and yields the IP packet itself. Frames
that do not carry IPv4/IPv6 (ARP, LLDP, ...) are skipped. Link-layer padding and trailing FCS
beyond the IP header's own length are cut off; a snaplen-truncated packet is yielded as it is.

It reads the file as a stream, a chunk at a time (`_Chunks`: at most one chunk and one record
held, so a capture of any size is read in bounded memory), and walks each chunk with
`struct.unpack_from`; it needs nothing outside the standard library. Every problem with the file (unreadable, not a capture, cut
short, corrupt, an unsupported link type) raises `CaptureError` with a one-line message that
names the file, and is raised lazily where the problem is, after the good packets before it
have been yielded, so a caller can report partial results.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

from throttle.errors import CaptureError
from throttle.wire.ip import ip_end

__all__ = ["read_packets"]

_TRUNCATED_HINT = "the capture was cut short; re-capture or trim it with editcap"

# Classic pcap magic numbers as read little-endian from the first four bytes:
# value -> (byte order, timestamp fraction units per second, record header length).
_PCAP_MAGICS: dict[int, tuple[str, int, int]] = {
    0xA1B2C3D4: ("<", 1_000_000, 16),  # microseconds, little-endian writer
    0xD4C3B2A1: (">", 1_000_000, 16),  # microseconds, big-endian writer
    0xA1B23C4D: ("<", 1_000_000_000, 16),  # nanoseconds, little-endian writer
    0x4D3CB2A1: (">", 1_000_000_000, 16),  # nanoseconds, big-endian writer
    0xA1B2CD34: ("<", 1_000_000, 24),  # Kuznetzov's patched libpcap (extra 8 bytes/record)
    0x34CDB2A1: (">", 1_000_000, 24),
}

_PCAPNG_SHB = 0x0A0D0D0A  # a palindrome, so it reads the same in both byte orders
_PCAPNG_BOM = 0x1A2B3C4D

_ETHERTYPE_IPV4 = 0x0800
_ETHERTYPE_IPV6 = 0x86DD
_ETHERTYPE_VLANS = frozenset((0x8100, 0x88A8, 0x9100))

_AF_INET = 2
_AF_INET6 = frozenset((24, 28, 30))  # NetBSD/OpenBSD, FreeBSD, macOS

# A stripper takes (buffer, start, end) of one frame and returns (ip_start, ip_version) for an
# IP packet, or None for a frame to skip.
_Stripped = tuple[int, int] | None
_Stripper = Callable[[bytes, int, int], _Stripped]


def _strip_raw(buf: bytes, start: int, end: int) -> _Stripped:
    if start >= end:
        return None
    version = buf[start] >> 4
    if version == 4 or version == 6:
        return start, version
    return None


def _after_ethertype(buf: bytes, ethertype: int, pos: int, end: int) -> _Stripped:
    """Skip VLAN tags starting at `pos` (ethertype already read) and map the final ethertype."""
    while ethertype in _ETHERTYPE_VLANS:
        if pos + 4 > end:
            return None
        ethertype = (buf[pos + 2] << 8) | buf[pos + 3]
        pos += 4
    if pos >= end:
        return None
    if ethertype == _ETHERTYPE_IPV4:
        return pos, 4
    if ethertype == _ETHERTYPE_IPV6:
        return pos, 6
    return None


def _strip_ethernet(buf: bytes, start: int, end: int) -> _Stripped:
    if start + 14 > end:
        return None
    return _after_ethertype(buf, (buf[start + 12] << 8) | buf[start + 13], start + 14, end)


def _strip_sll(buf: bytes, start: int, end: int) -> _Stripped:
    # packet type, ARPHRD type, address length, 8-byte address, protocol (all big-endian)
    if start + 16 > end:
        return None
    return _after_ethertype(buf, (buf[start + 14] << 8) | buf[start + 15], start + 16, end)


def _strip_sll2(buf: bytes, start: int, end: int) -> _Stripped:
    # protocol, reserved, interface index, ARPHRD type, packet type, address length, address
    if start + 20 > end:
        return None
    return _after_ethertype(buf, (buf[start] << 8) | buf[start + 1], start + 20, end)


def _strip_null(buf: bytes, start: int, end: int) -> _Stripped:
    # A 4-byte address family in the writer's byte order (big-endian for LINKTYPE_LOOP). The
    # values are small, so whichever reading fits in 16 bits is the right one.
    if start + 4 > end:
        return None
    family = int.from_bytes(buf[start : start + 4], "little")
    if family > 0xFFFF:
        family = int.from_bytes(buf[start : start + 4], "big")
    if start + 4 >= end:
        return None
    if family == _AF_INET:
        return start + 4, 4
    if family in _AF_INET6:
        return start + 4, 6
    return None


_STRIPPERS: dict[int, _Stripper] = {
    0: _strip_null,  # DLT_NULL (BSD loopback)
    1: _strip_ethernet,  # DLT_EN10MB
    12: _strip_raw,  # DLT_RAW on most BSDs / as written by some tools
    14: _strip_raw,  # DLT_RAW on OpenBSD
    101: _strip_raw,  # LINKTYPE_RAW
    108: _strip_null,  # LINKTYPE_LOOP (OpenBSD loopback, network byte order)
    113: _strip_sll,  # LINKTYPE_LINUX_SLL ("any" interface)
    228: _strip_raw,  # LINKTYPE_IPV4 (by the nibble: scapy writes IPv6 under it too)
    229: _strip_raw,  # LINKTYPE_IPV6
    276: _strip_sll2,  # LINKTYPE_LINUX_SLL2
}


def _unsupported(path: str, linktype: int, what: str) -> CaptureError:
    supported = ", ".join(str(n) for n in sorted(_STRIPPERS))
    return CaptureError(
        f"{path}: {what} uses link type {linktype}, which throttle cannot read "
        f"(supported: {supported}); capture on an Ethernet, loopback or 'any' interface"
    )


_CHUNK = 1 << 20  # bytes read at a time: large enough that reads cost little, small enough to hold
_MAX_UNSIZED = 1 << 26  # the largest record read from a file of unknown size (a pipe)


class _Chunks:
    """The capture file as a stream: `get(offset, n)` holds bytes [offset, offset + n) in one
    buffer, reading forward as needed and dropping what lies before `offset` (offsets only grow)."""

    __slots__ = ("handle", "size", "buf", "base", "eof")

    def __init__(self, handle: BinaryIO, size: int | None) -> None:
        self.handle = handle
        self.size = size  # of a regular file when opened; None for a pipe or device
        self.buf = b""
        self.base = 0  # the file offset of buf[0]
        self.eof = False

    def get(self, offset: int, n: int) -> tuple[bytes, int, int]:
        """(buffer, where `offset` is in it, how many of the `n` bytes are there: fewer at the end)."""
        local = offset - self.base
        if local + n > len(self.buf) and not self.eof:
            keep = self.buf[local:]
            need = n - len(keep)
            want = max(need, _CHUNK)
            pieces = [keep]
            got = 0
            while got < need:  # not `want`: a pipe gives what its writer has written so far
                more = self.handle.read(want - got)
                if not more:
                    self.eof = True
                    break
                pieces.append(more)
                got += len(more)
            self.buf = b"".join(pieces)
            self.base = offset
            local = 0
        return self.buf, local, min(n, len(self.buf) - local)

    def remaining(self, offset: int) -> int | None:
        """Bytes of the file from `offset` on, when its size is known."""
        return None if self.size is None else self.size - offset


def _open(path: str) -> tuple[BinaryIO, int | None]:
    try:
        handle = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by read_packets)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CaptureError(f"{path}: cannot read the capture: {reason}") from exc
    try:
        info = os.fstat(handle.fileno())
    except OSError:
        return handle, None
    return handle, info.st_size if stat.S_ISREG(info.st_mode) else None


def read_packets(path: str | os.PathLike[str]) -> Iterator[tuple[float, bytes]]:
    """Yield (timestamp_seconds, ip_packet_bytes) for every IPv4/IPv6 packet in a pcap or pcapng file.

    The file is opened when iteration starts and read as a stream. Non-IP frames are skipped. Any
    problem with the file raises `CaptureError` at the point where it is found, after every good
    packet before it.
    """
    name = os.fsdecode(path)
    handle, size = _open(name)
    with handle:
        try:
            chunks = _Chunks(handle, size)
            head, _, have = chunks.get(0, 8)
        except OSError as exc:
            raise CaptureError(f"{name}: cannot read the capture: {exc.strerror or exc}") from exc
        if have < 4:
            detail = "the file is empty" if not have else f"it is only {have} bytes long"
            raise CaptureError(
                f"{name}: not a pcap or pcapng capture ({detail}); "
                "give a file written by tcpdump, tshark or Wireshark"
            )
        magic = int.from_bytes(head[:4], "little")
        try:
            if magic in _PCAP_MAGICS:
                yield from _read_pcap(name, chunks, *_PCAP_MAGICS[magic])
                return
            if magic == _PCAPNG_SHB:
                yield from _read_pcapng(name, chunks)
                return
        except (struct.error, IndexError, ValueError, OverflowError) as exc:  # defensive: a bug
            raise CaptureError(f"{name}: malformed capture ({exc}); the file is corrupt") from exc
        except OSError as exc:
            raise CaptureError(f"{name}: cannot read the capture: {exc.strerror or exc}") from exc
        raise CaptureError(
            f"{name}: not a pcap or pcapng capture (starts with bytes 0x{head[:8].hex()}); "
            f"{_not_capture_hint(head)}"
        )


def _not_capture_hint(buf: bytes) -> str:
    if buf[:2] == b"\x1f\x8b":
        return "it looks gzip-compressed: gunzip it first"
    if buf[:3] == b"BZh" or buf[:6] == b"\xfd7zXZ\x00" or buf[:4] == b"\x28\xb5\x2f\xfd":
        return "it looks compressed: decompress it first"
    return "give a file written by tcpdump, tshark or Wireshark"


def _record(chunks: _Chunks, path: str, start: int, n: int, what: str) -> tuple[bytes, int]:
    """(buffer, where in it) the `n` bytes of a record's data at file offset `start` are held;
    CaptureError when the file ends first. `what` names the record for the message."""
    remaining = chunks.remaining(start)
    if remaining is None and n > _MAX_UNSIZED:
        raise CaptureError(f"{path}: {what} claims {n} bytes, more than any capture holds; the file is corrupt")
    if remaining is None or n <= remaining:
        buf, local, have = chunks.get(start, n)
        if have == n:
            return buf, local
        remaining = have
    raise CaptureError(
        f"{path}: truncated at {what}: the record holds {n} bytes but only {remaining} remain; "
        f"{_TRUNCATED_HINT}"
    )


def _read_pcap(
    path: str, chunks: _Chunks, order: str, units: int, record_len: int
) -> Iterator[tuple[float, bytes]]:
    buf, local, have = chunks.get(0, 24)
    if have < 24:
        raise CaptureError(
            f"{path}: truncated in the pcap file header ({have} of 24 bytes); {_TRUNCATED_HINT}"
        )
    (network,) = struct.unpack_from(order + "I", buf, local + 20)
    linktype = network & 0x03FFFFFF  # the top bits may carry FCS information
    strip = _STRIPPERS.get(linktype)
    record = struct.Struct(order + "IIII")
    unpack_record = record.unpack_from
    offset = 24
    number = 0
    while True:
        buf, local, have = chunks.get(offset, record_len)
        if not have:
            return
        number += 1
        if have < record_len:
            raise CaptureError(
                f"{path}: truncated at packet {number} (byte offset {offset}): the record header "
                f"needs {record_len} bytes but only {have} remain; {_TRUNCATED_HINT}"
            )
        seconds, fraction, caplen, _origlen = unpack_record(buf, local)
        start = offset + record_len
        buf, local = _record(chunks, path, start, caplen, f"packet {number} (byte offset {offset})")
        if strip is None:
            raise _unsupported(path, linktype, f"packet {number} (byte offset {offset})")
        offset = start + caplen
        end = local + caplen
        stripped = strip(buf, local, end)
        if stripped is None:
            continue
        ip_start, version = stripped
        yield (
            seconds + fraction / units,
            buf[ip_start : ip_end(buf, version, ip_start, end)],
        )


class _Interface:
    __slots__ = ("linktype", "strip", "units", "offset")

    def __init__(self, linktype: int, strip: _Stripper | None, units: int, offset: int) -> None:
        self.linktype = linktype
        self.strip = strip
        self.units = units
        self.offset = offset


def _interface_options(buf: bytes, order: str, pos: int, end: int) -> tuple[int, int]:
    """(units per second, offset in seconds) from an Interface Description Block's options."""
    units = 1_000_000
    tsoffset = 0
    while pos + 4 <= end:
        code, length = struct.unpack_from(order + "HH", buf, pos)
        pos += 4
        if code == 0 or pos + length > end:  # opt_endofopt, or a malformed option: stop
            break
        if code == 9 and length >= 1:  # if_tsresol
            value = buf[pos]
            units = 2 ** (value & 0x7F) if value & 0x80 else 10**value
        elif code == 14 and length >= 8:  # if_tsoffset
            (tsoffset,) = struct.unpack_from(order + "q", buf, pos)
        pos += (length + 3) & ~3
    return units, tsoffset


def _read_pcapng(path: str, chunks: _Chunks) -> Iterator[tuple[float, bytes]]:
    order = "<"
    interfaces: list[_Interface] = []
    last_ts = 0.0
    offset = 0
    number = 0
    while True:
        buf, here, have = chunks.get(offset, 12)
        if not have:
            return
        number += 1
        where = f"block {number} (byte offset {offset})"
        if have < 12:
            raise CaptureError(f"{path}: truncated at {where}: {_TRUNCATED_HINT}")
        if int.from_bytes(buf[here : here + 4], "little") == _PCAPNG_SHB:
            # A new section: its byte-order magic decides how to read everything in it.
            bom = buf[here + 8 : here + 12]
            if bom == b"\x4d\x3c\x2b\x1a":
                order = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                order = ">"
            else:
                raise CaptureError(
                    f"{path}: bad byte-order magic 0x{bom.hex()} in the section header at "
                    f"{where}; the file is corrupt"
                )
            interfaces = []
        block_type, length = struct.unpack_from(order + "II", buf, here)
        if length < 12 or length % 4:
            raise CaptureError(
                f"{path}: bad block length {length} at {where}; the file is corrupt "
                "(a block is at least 12 bytes and a multiple of 4)"
            )
        remaining = chunks.remaining(offset)
        if remaining is None and length > _MAX_UNSIZED:
            raise CaptureError(f"{path}: bad block length {length} at {where}; the file is corrupt")
        if remaining is None or length <= remaining:
            buf, here, have = chunks.get(offset, length)
            remaining = have
        if length > remaining:
            raise CaptureError(
                f"{path}: truncated at {where}: the block holds {length} bytes but only "
                f"{remaining} remain; {_TRUNCATED_HINT}"
            )
        block_end = here + length
        (trailer,) = struct.unpack_from(order + "I", buf, block_end - 4)
        if trailer != length:
            raise CaptureError(
                f"{path}: bad block length at {where}: the block starts with length {length} "
                f"but ends with {trailer}; the file is corrupt"
            )
        body = here + 8
        body_end = block_end - 4
        offset += length

        if block_type == _PCAPNG_SHB:
            if length < 28:
                raise CaptureError(
                    f"{path}: bad block length {length} for the section header at {where}; "
                    "the file is corrupt"
                )
        elif block_type == 1:  # Interface Description Block
            if body + 8 > body_end:
                raise CaptureError(
                    f"{path}: interface description at {where} is too short; the file is corrupt"
                )
            (linktype,) = struct.unpack_from(order + "H", buf, body)
            units, tsoffset = _interface_options(buf, order, body + 8, body_end)
            interfaces.append(_Interface(linktype, _STRIPPERS.get(linktype), units, tsoffset))
        elif block_type == 6 or block_type == 2 or block_type == 3:
            if block_type == 3:  # Simple Packet Block: interface 0, no timestamp
                fixed = 4
                if body + fixed > body_end:
                    raise _short_block(path, where)
                (origlen,) = struct.unpack_from(order + "I", buf, body)
                caplen = min(origlen, body_end - body - fixed)
                interface_id = 0
            else:
                if block_type == 6:  # Enhanced Packet Block
                    fixed = 20
                    if body + fixed > body_end:
                        raise _short_block(path, where)
                    interface_id, ts_high, ts_low, caplen, _ = struct.unpack_from(
                        order + "IIIII", buf, body
                    )
                else:  # obsolete Packet Block
                    fixed = 20
                    if body + fixed > body_end:
                        raise _short_block(path, where)
                    interface_id, _, ts_high, ts_low, caplen, _ = struct.unpack_from(
                        order + "HHIIII", buf, body
                    )
            if interface_id >= len(interfaces):
                raise CaptureError(
                    f"{path}: packet at {where} names interface {interface_id}, but the section "
                    f"describes {len(interfaces)}; the file is corrupt"
                )
            iface = interfaces[interface_id]
            start = body + fixed
            end = start + caplen
            if end > body_end:
                raise CaptureError(
                    f"{path}: packet at {where} claims {caplen} captured bytes but its block "
                    f"holds {body_end - start}; the file is corrupt"
                )
            if iface.strip is None:
                raise _unsupported(path, iface.linktype, f"the packet at {where}")
            if block_type != 3:
                whole, fraction = divmod((ts_high << 32) | ts_low, iface.units)
                last_ts = whole + iface.offset + fraction / iface.units
            stripped = iface.strip(buf, start, end)
            if stripped is not None:
                ip_start, version = stripped
                yield last_ts, buf[ip_start : ip_end(buf, version, ip_start, end)]
        # Any other block type (name resolution, statistics, custom, ...) is skipped.


def _short_block(path: str, where: str) -> CaptureError:
    return CaptureError(f"{path}: packet block at {where} is too short; the file is corrupt")
