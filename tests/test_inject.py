"""RST packets the censor injects (throttle.kernel.inject): checked by scapy's own parser."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from throttle.kernel.inject import Injector, rst_packet

V4 = ipaddress.ip_address("198.18.0.2").packed, ipaddress.ip_address("198.18.1.2").packed
V6 = ipaddress.ip_address("2001:2:0:1::2").packed, ipaddress.ip_address("2001:2:0:2::2").packed


@pytest.mark.parametrize("layer,addresses", [(IP, V4), (IPv6, V6)])
def test_rst_packet_is_valid(layer: type, addresses: tuple[bytes, bytes]) -> None:
    src, dst = addresses
    raw = rst_packet(src, 40000, dst, 443, 0xFFFFFFF0, 12345)
    pkt = layer(raw)
    tcp = pkt[TCP]
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack) == (40000, 443, 0xFFFFFFF0, 12345)
    assert tcp.flags == "RA"
    # scapy recomputes the checksums of a copy with them deleted: they must match ours
    fresh = pkt.copy()
    del fresh[TCP].chksum
    if layer is IP:
        del fresh[IP].chksum
        assert IP(bytes(fresh))[IP].chksum == pkt[IP].chksum
    assert layer(bytes(fresh))[TCP].chksum == tcp.chksum
    assert len(raw) == (40 if layer is IP else 60)


def test_rst_packet_refuses_mixed_families() -> None:
    with pytest.raises(ValueError):
        rst_packet(V4[0], 1, V6[1], 2, 0, 0)


class Seen:
    def __init__(self, port: int, hw: bytes | None) -> None:
        self.physindev = port
        self._hw = hw

    def get_hw(self) -> bytes | None:
        return self._hw


def test_learn_keeps_mac_and_port_per_source_address() -> None:
    inj = Injector()
    packet = rst_packet(V4[0], 1, V4[1], 2, 0, 0)
    inj.learn(Seen(0, b"\x02" * 8), packet)  # routed: nothing to learn
    assert not inj._where
    inj.learn(Seen(7, b"\x02\x00\x00\x00\x00\x01\x00\x00"), packet)
    assert inj._where[V4[0]] == (b"\x02\x00\x00\x00\x00\x01", 7)
    inj.learn(Seen(7, None), rst_packet(V4[1], 2, V4[0], 1, 0, 0))  # no hardware address: ignored
    assert V4[1] not in inj._where
    # bridged, one end unknown: the RST toward it is counted as not sent, never raises
    assert inj.reset(V4[0], 1, V4[1], 2, (0, 0), (0, 0)) == 0
    assert inj.failed == 2
    inj.close()
