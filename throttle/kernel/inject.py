"""RST injection: what a rule with `action = "rst"` asks of the censor (docs/incidents.md §2.17
from 2022-03-04, §4.30). The engine decides and reports `ResetRequested` with the sequence numbers
each end expects; this adapter builds one RST from the client to the server and one from the
server to the client, and puts them on the wire, as an in-path device does.

`rst_packet` is pure. `Injector` sends:

- on a bridge (the lab's in-path censor), as Ethernet frames on the port towards each end
  (AF_PACKET), with the MAC addresses that end's own packets came from: the censor has no address
  and no neighbour table, so it learns, from the packets it inspects, which MAC and port each IP
  address is behind (`learn`, called by the queue hook for every packet it reads);
- on a router (gateway mode), as IP packets through a raw socket, routed like the host's own.

Injected packets leave through the output path, not FORWARD, so the censor's own queue never sees
them. `close()` closes the sockets; nothing else is left.
"""

from __future__ import annotations

import socket
import struct
from collections import OrderedDict
from typing import Protocol

from throttle.engine import ResetRequested
from throttle.errors import ThrottleError
from throttle.wire.ip import source

__all__ = ["Injector", "rst_packet"]

TCP_RST_ACK = 0x14
TTL = 64
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
MAX_ADDRESSES = 65536  # learned addresses kept (the oldest forgotten first)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def rst_packet(src: bytes, sport: int, dst: bytes, dport: int, seq: int, ack: int) -> bytes:
    """An IPv4 (4-byte addresses) or IPv6 (16-byte) packet holding a TCP RST+ACK with these
    sequence and acknowledgement numbers, checksums filled in."""
    if len(src) != len(dst) or len(src) not in (4, 16):
        raise ValueError("addresses must both be IPv4 (4 bytes) or both IPv6 (16 bytes)")
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, TCP_RST_ACK, 0, 0, 0)
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    else:
        pseudo = src + dst + struct.pack("!I3xB", len(tcp), socket.IPPROTO_TCP)
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    if len(src) == 4:
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, TTL, socket.IPPROTO_TCP, 0, src, dst)
        return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + tcp
    return struct.pack("!IHBB16s16s", 6 << 28, len(tcp), socket.IPPROTO_TCP, TTL, src, dst) + tcp


class Seen(Protocol):
    """What the injector reads of a queued packet (netfilterqueue's Packet has it)."""

    physindev: int

    def get_hw(self) -> bytes | None: ...


class Injector:
    """Sends the RSTs of `ResetRequested` events; see the module docstring."""

    def __init__(self) -> None:
        self._where: OrderedDict[bytes, tuple[bytes, int]] = OrderedDict()  # address -> (MAC, port ifindex)
        self._packet: socket.socket | None = None
        self._raw: dict[int, socket.socket] = {}
        self.sent = 0
        self.failed = 0  # RSTs that could not be sent (an end's MAC not yet seen, a socket error)
        self.errors = 0  # bugs caught sending them (each also counts its two RSTs as failed)

    # -- learning where each address is (bridged) ---------------------------------------------

    def learn(self, pkt: Seen, data: bytes) -> None:
        """Remember the MAC and bridge port a packet from this source address came from."""
        port = pkt.physindev
        if not port or len(data) < 20:
            return  # routed: the kernel's own neighbour table is used
        src = source(data)
        hw = pkt.get_hw()
        if hw is None or len(hw) < 6:
            return
        where = (bytes(hw[:6]), port)
        if self._where.get(src) != where:
            self._where[src] = where
            self._where.move_to_end(src)
            if len(self._where) > MAX_ADDRESSES:
                self._where.popitem(last=False)

    # -- sending -----------------------------------------------------------------------------

    def on_reset(self, ev: ResetRequested) -> None:
        """The two RSTs an engine's `ResetRequested` asks for. Never raises: a bug here must not
        stop the packet loop (it is counted in `errors`)."""
        f = ev.flow
        try:
            self.reset(f.client, f.client_port, f.server, f.server_port, ev.to_server, ev.to_client)
        except Exception:  # noqa: BLE001 - see above
            self.failed += 2
            self.errors += 1

    def reset(self, client: bytes, cport: int, server: bytes, sport: int,
              to_server: tuple[int, int], to_client: tuple[int, int]) -> int:
        """A RST to each end of a TCP flow; returns how many were sent (0 to 2)."""
        sent = 0
        for src, sp, dst, dp, (seq, ack) in ((client, cport, server, sport, to_server),
                                             (server, sport, client, cport, to_client)):
            try:
                self._send(rst_packet(src, sp, dst, dp, seq, ack), src, dst)
                sent += 1
            except (OSError, ThrottleError):
                self.failed += 1
        self.sent += sent
        return sent

    def _send(self, packet: bytes, src: bytes, dst: bytes) -> None:
        target, sender = self._where.get(dst), self._where.get(src)
        if target is not None and sender is not None:  # bridged: a frame out of the port dst is behind
            mac, port = target
            if self._packet is None:
                self._packet = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            ethertype = ETH_P_IP if len(dst) == 4 else ETH_P_IPV6
            name = socket.if_indextoname(port)
            self._packet.sendto(mac + sender[0] + struct.pack("!H", ethertype) + packet, (name, ethertype))
            return
        if self._where:  # bridged, but one end has not been seen yet
            raise ThrottleError("no MAC address known for one end of the flow")
        family = socket.AF_INET if len(dst) == 4 else socket.AF_INET6
        sock = self._raw.get(family)
        if sock is None:
            sock = self._raw[family] = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
        address = socket.inet_ntop(family, dst)
        sock.sendto(packet, (address, 0) if family == socket.AF_INET else (address, 0, 0, 0))

    def close(self) -> None:
        for sock in (self._packet, *self._raw.values()):
            if sock is not None:
                sock.close()
        self._packet = None
        self._raw.clear()
