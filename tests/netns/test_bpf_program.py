"""The eBPF program itself, run on crafted Ethernet frames with BPF_PROG_TEST_RUN (root; nothing is
attached to any interface and nothing is sent, so it runs in this process's own namespace): every
return to the normal path counts its reason exactly once, a hit counts none, the verdicts are the
ones the fast path has always given, and the codecs of throttle/kernel/layout.py read the counters
the program wrote. An object whose structs differ from the definition is refused before use.
Fails, never skips, without root or clang."""

from __future__ import annotations

import ipaddress
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.all import ARP, ICMP, IP, TCP, UDP, Ether, ICMPv6EchoRequest, IPv6, IPv6ExtHdrHopByHop, Raw, raw  # type: ignore[import-untyped]

from tests.test_bpf_layout import program_copy, swap_lines
from throttle.errors import ThrottleError
from throttle.kernel import libbpf
from throttle.kernel.layout import BUCKET, FALLBACKS, FLOW_KEY, FLOW_VALUE

pytestmark = pytest.mark.netns

PROGRAM = "throttle_ingress"
MAPS = ("flows", "buckets", "hits", "lease", "fallbacks")
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
ZERO = struct.pack("=I", 0)
CLIENT, SERVER = "198.18.0.2", "198.18.2.2"
CLIENT6, SERVER6 = "fd00:18::2", "fd00:18:2::2"
CLIENT_MAC, CENSOR_MAC, NEXT_HOP_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03"
EGRESS = 7  # an ifindex: a test run redirects nowhere, it only returns the verdict
PAYLOAD = b"x" * 100


def frame(l3: object) -> bytes:
    return bytes(raw(Ether(src=CLIENT_MAC, dst=CENSOR_MAC) / l3))


def tcp(flags: str = "A", ttl: int = 64, sport: int = 40000) -> bytes:
    return frame(IP(src=CLIENT, dst=SERVER, ttl=ttl) / TCP(sport=sport, dport=443, flags=flags) / Raw(PAYLOAD))


def key(proto: int, src: str, sport: int, dst: str, dport: int) -> bytes:
    """The flows map's key of one direction, as the fast path writes it."""
    a, b = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    return FLOW_KEY.pack(proto=proto, family=4 if len(a) == 4 else 6, src=a.ljust(16, b"\0"),
                         dst=b.ljust(16, b"\0"), sport=sport, dport=dport)


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


@pytest.fixture
def program() -> Iterator[libbpf.BpfObject]:
    """The program as the fast path loads it (a fresh object: every map empty, no lease)."""
    if os.geteuid() != 0:
        pytest.fail("BPF_PROG_TEST_RUN needs root: run the namespace tier with sudo")
    obj = libbpf.BpfObject(libbpf.object_path(), PROGRAM, MAPS)
    try:
        yield obj
    finally:
        obj.close()


def run(obj: libbpf.BpfObject, data: bytes) -> tuple[int, bytes, dict[str, int], int]:
    """(verdict, frame out, what moved in `fallbacks` by reason, what moved in `hits`)."""
    before, hits = libbpf.fallbacks(obj.map_fds["fallbacks"]), libbpf.percpu_sum(obj.map_fds["hits"], ZERO)
    verdict, out = libbpf.run_program(obj.program_fd, data)
    after = libbpf.fallbacks(obj.map_fds["fallbacks"])
    moved = {reason: after[reason] - before[reason] for reason in after if after[reason] != before[reason]}
    return verdict, out, moved, libbpf.percpu_sum(obj.map_fds["hits"], ZERO) - hits


def add(obj: libbpf.BpfObject, k: bytes, *, routed: bool = False, **fields: int) -> None:
    macs = {"dst_mac": mac(NEXT_HOP_MAC), "src_mac": mac(CENSOR_MAC)} if routed else {}
    libbpf.map_update(obj.map_fds["flows"], k, FLOW_VALUE.pack(ifindex=EGRESS, **macs, **fields))


def flow(obj: libbpf.BpfObject, k: bytes) -> dict[str, int]:
    value = libbpf.map_lookup(obj.map_fds["flows"], k, FLOW_VALUE.size)
    assert value is not None
    return FLOW_VALUE.unpack(value)


TCP_KEY = key(6, CLIENT, 40000, SERVER, 443)

# Each reason, and frames that must fall back for it (with the flow entry added first where the
# reason comes after the lookup).
# (A frame cut inside its IP header cannot be run: BPF_PROG_TEST_RUN refuses one with EINVAL.)
SHORT = [
    frame(IP(src=CLIENT, dst=SERVER, proto=6) / Raw(b"\0" * 10)),  # half a TCP header
    frame(IP(src=CLIENT, dst=SERVER, proto=17) / Raw(b"\0" * 4)),  # half a UDP header
    frame(IPv6(src=CLIENT6, dst=SERVER6, nh=6) / Raw(b"\0" * 19)),  # a TCP header a byte short
]
UNPARSED = {
    "not_ip": [frame(ARP(psrc=CLIENT, pdst=SERVER)), bytes(raw(Ether(type=0x8100) / Raw(b"\0" * 46)))],
    "ipv4_options": [frame(IP(src=CLIENT, dst=SERVER, options=b"\x01\x01\x01\x00") / TCP(flags="A"))],
    "ipv4_fragment": [frame(IP(src=CLIENT, dst=SERVER, flags="MF") / TCP(flags="A")),
                      frame(IP(src=CLIENT, dst=SERVER, frag=100) / Raw(b"\0" * 20))],
    "ipv6_extension": [frame(IPv6(src=CLIENT6, dst=SERVER6) / IPv6ExtHdrHopByHop() / TCP(flags="A"))],
    "not_tcp_udp": [frame(IP(src=CLIENT, dst=SERVER) / ICMP()),
                    frame(IPv6(src=CLIENT6, dst=SERVER6) / ICMPv6EchoRequest())],
    "tcp_syn": [tcp("S"), tcp("SA")],
    "no_flow": [tcp("A"), tcp("PA", sport=40001)],
}


def test_every_fallback_counts_its_reason_once_and_passes_the_packet(program: libbpf.BpfObject) -> None:
    cases = [("short", f) for f in SHORT] + [(reason, f) for reason, frames in UNPARSED.items() for f in frames]
    for reason, data in cases:
        verdict, out, moved, hits = run(program, data)
        assert (verdict, moved, hits) == (TC_ACT_OK, {reason: 1}, 0), (reason, Ether(data).summary())
        assert out == data  # the normal path gets the frame as it came
    # After the lookup: a flow the censor decided, its lease run out.
    add(program, TCP_KEY)
    libbpf.map_update(program.map_fds["lease"], ZERO, struct.pack("=Q", 1))  # 1 ns after boot: long past
    verdict, _, moved, hits = run(program, tcp())
    assert (verdict, moved, hits) == (TC_ACT_OK, {"lease_expired": 1}, 0)
    libbpf.map_update(program.map_fds["lease"], ZERO, struct.pack("=Q", 0))  # no lease: decisions hold
    # A routed direction whose TTL / hop limit would expire: the kernel must answer it.
    add(program, TCP_KEY, routed=True)
    verdict, _, moved, hits = run(program, tcp(ttl=1))
    assert (verdict, moved, hits) == (TC_ACT_OK, {"ttl_expiring": 1}, 0)
    udp6 = key(17, CLIENT6, 5353, SERVER6, 443)
    add(program, udp6, routed=True)
    data = frame(IPv6(src=CLIENT6, dst=SERVER6, hlim=1) / UDP(sport=5353, dport=443) / Raw(PAYLOAD))
    assert run(program, data)[::2] == (TC_ACT_OK, {"ttl_expiring": 1})
    assert flow(program, TCP_KEY)["packets"] == 0 and flow(program, udp6)["packets"] == 0
    # "store_failed" needs a store inside a header already read to fail, which no frame can make
    # happen; it is counted like the others and must have stayed at zero.
    counts = libbpf.fallbacks(program.map_fds["fallbacks"])
    assert counts["store_failed"] == 0 and set(counts) == {r.name for r in FALLBACKS}
    assert sum(counts.values()) == len(cases) + 3


def test_hits_count_no_fallback_and_keep_their_verdicts(program: libbpf.BpfObject) -> None:
    # Bridged (no MACs): redirected as it came, counted in the flow's counters and in `hits`.
    add(program, TCP_KEY)
    data = tcp()
    verdict, out, moved, hits = run(program, data)
    assert (verdict, moved, hits, out) == (TC_ACT_REDIRECT, {}, 1, data)
    counters = flow(program, TCP_KEY)
    ip_len = len(data) - 14
    assert (counters["bytes"], counters["packets"], counters["dropped_packets"]) == (ip_len, 1, 0)
    assert counters["payload"] == 0  # counted only for a limited direction
    run(program, data)
    assert (flow(program, TCP_KEY)["bytes"], flow(program, TCP_KEY)["packets"]) == (2 * ip_len, 2)

    # Routed: the next hop's MAC written, the TTL one less, the IPv4 checksum still right.
    add(program, TCP_KEY, routed=True)
    verdict, out, moved, hits = run(program, tcp(ttl=64))
    assert (verdict, moved, hits) == (TC_ACT_REDIRECT, {}, 1)
    sent = Ether(out)
    assert (sent.dst, sent.src, sent[IP].ttl) == (NEXT_HOP_MAC, CENSOR_MAC, 63)
    checked = IP(bytes(sent[IP]))
    del checked.chksum
    assert IP(bytes(raw(checked))).chksum == sent[IP].chksum

    # Policed, its bucket empty: dropped (TC_ACT_SHOT), counted as dropped, not as a fallback.
    libbpf.map_update(program.map_fds["buckets"], struct.pack("=I", 1),
                      BUCKET.pack(rate=1, burst=1, fill_ns=10**9, tokens=0, stamp_ns=2**62))
    add(program, TCP_KEY, bucket=1)
    verdict, _, moved, hits = run(program, data)
    assert (verdict, moved, hits) == (TC_ACT_SHOT, {}, 0)
    counters = flow(program, TCP_KEY)
    assert (counters["dropped_bytes"], counters["dropped_packets"], counters["packets"]) == (ip_len, 1, 0)
    assert counters["payload"] == len(PAYLOAD)
    # The same direction with `after_bytes` still to carry free: forwarded.
    add(program, TCP_KEY, bucket=1, after_bytes=10 * len(PAYLOAD))
    assert run(program, data)[::2] == (TC_ACT_REDIRECT, {})

    # UDP over IPv6, bridged.
    udp6 = key(17, CLIENT6, 5353, SERVER6, 443)
    add(program, udp6)
    data6 = frame(IPv6(src=CLIENT6, dst=SERVER6) / UDP(sport=5353, dport=443) / Raw(PAYLOAD))
    assert run(program, data6)[::2] == (TC_ACT_REDIRECT, {})
    assert flow(program, udp6)["bytes"] == len(data6) - 14
    assert sum(libbpf.fallbacks(program.map_fds["fallbacks"]).values()) == 0


def test_an_object_whose_structs_differ_is_refused_before_use(tmp_path: Path) -> None:
    """bytes and packets of flow_value swapped in a copy of the program: both __u64, so the map's
    sizes agree, and without the check Python would read packets as bytes. The kernel accepts the
    program; the load still fails, naming the struct and the fields."""
    if os.geteuid() != 0:
        pytest.fail("loading a BPF program needs root: run the namespace tier with sudo")
    obj = program_copy(tmp_path, swap_lines("__u64 bytes;", "__u64 packets;"))
    with pytest.raises(ThrottleError, match=r"struct flow_value has field bytes at byte 32.*it has packets"):
        libbpf.BpfObject(obj, PROGRAM, MAPS)
