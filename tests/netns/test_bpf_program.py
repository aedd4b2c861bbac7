"""The eBPF program itself, run on crafted Ethernet frames with BPF_PROG_TEST_RUN (root; nothing is
attached to any interface and nothing is sent, so it runs in this process's own namespace): every
return to the normal path counts its reason exactly once, a hit counts none, the verdicts are the
ones the fast path has always given, the window meter passes and drops exactly the frames the
engine's WindowMeter does, and the codecs of throttle/kernel/layout.py read the counters the
program wrote. An object whose structs differ from the definition is refused before use.
Fails, never skips, without root or clang."""

from __future__ import annotations

import ipaddress
import os
import struct
import time
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


def tcp(flags: str = "A", ttl: int = 64, sport: int = 40000, payload: bytes = PAYLOAD) -> bytes:
    return frame(IP(src=CLIENT, dst=SERVER, ttl=ttl) / TCP(sport=sport, dport=443, flags=flags) / Raw(payload))


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


# -- the window meter, frame by frame against the engine's -----------------------------------------
# The program reads the time itself (bpf_ktime_get_ns, CLOCK_MONOTONIC), so a frame cannot be given
# a time. Its meter's only time is where its interval began (`start_ns`), and a window meter depends
# only on how long ago that was: so the bucket is kept in the test's own clock (sim ns, from 100 s)
# and, just before each run, moved to the real clock by the offset real - sim read then. The
# program then sees the frame at its sim time plus the few microseconds the run takes (EPSILON
# bounds it: a run that took longer is undone and run again). Frames are kept MARGIN away from
# the engine's interval boundaries, so those microseconds never change an interval.
RATE, BURST = 16250.0, 16384  # 130 kbit/s, "16KB": an interval of 1.008 s (docs/incidents.md §1.11)
MARGIN, EPSILON = 0.05, 0.02  # seconds
BUCKET_KEY = struct.pack("=I", 1)


class SimClock:
    """The program's bucket 1 and flow TCP_KEY, run at sim times (see above)."""

    def __init__(self, obj: libbpf.BpfObject) -> None:
        self.obj = obj
        self.buckets, self.flows = obj.map_fds["buckets"], obj.map_fds["flows"]
        self.retries = 0

    def bucket(self) -> dict[str, int]:
        raw = libbpf.map_lookup(self.buckets, BUCKET_KEY, BUCKET.size)
        assert raw is not None
        return BUCKET.unpack(raw)

    def _shift(self, fields: dict[str, int], by: int) -> None:
        if fields["start_ns"]:  # 0: not begun, in any clock
            fields = {**fields, "start_ns": fields["start_ns"] + by}
        libbpf.map_update(self.buckets, BUCKET_KEY, BUCKET.pack(**fields))

    def run(self, data: bytes, at: float) -> int:
        """The program's verdict on `data` arriving at sim time `at` (seconds)."""
        for _ in range(20):
            saved = self.bucket(), libbpf.map_lookup(self.flows, TCP_KEY, FLOW_VALUE.size)
            offset = time.monotonic_ns() - int(at * 1e9)
            self._shift(saved[0], offset)
            verdict, _ = libbpf.run_program(self.obj.program_fd, data)
            took = time.monotonic_ns() - offset - int(at * 1e9)
            if took <= EPSILON * 1e9:
                self._shift(self.bucket(), -offset)
                return verdict
            self.retries += 1  # descheduled mid-run: undo it and run again
            libbpf.map_update(self.buckets, BUCKET_KEY, BUCKET.pack(**saved[0]))
            assert saved[1] is not None
            libbpf.map_update(self.flows, TCP_KEY, saved[1])
        pytest.fail("20 runs in a row took longer than EPSILON: the machine is too busy to run this test")


def schedule(start: float, pieces: list[tuple[float, float, float]]) -> list[float]:
    """Frame times: for each (from, to, gap) piece, every `gap` seconds, all relative to `start`
    (where the engine's first interval begins), leaving out those within MARGIN of a boundary."""
    interval = BURST / RATE
    times = []
    for lo, hi, gap in pieces:
        for k in range(round((hi - lo) / gap)):
            t = lo + k * gap
            if t == 0 or MARGIN <= t % interval <= interval - MARGIN:  # 0: the boundary the meter begins at
                times.append(start + t)
    return times


SIZES = [1400, 1400, 600, 1400, 100, 1400, 1000, 1400, 1400, 300]  # payloads in turn: the budget fills unevenly


def test_the_window_meter_drops_exactly_what_the_engines_drops(program: libbpf.BpfObject) -> None:
    """Frames of a limited direction at known times through the program's window meter and the
    engine's WindowMeter (engine/buckets.py), pass for pass: a line-rate burst, a steady stream,
    a gap of several intervals, a second burst. First a meter not begun (the kernel begins it at
    its first frame, as the engine does); then one handed over begun, mid-interval, with bytes
    used, as kernel/maps.window_value writes it for the hand-over."""
    from throttle.engine.buckets import WindowMeter
    from throttle.kernel.maps import window_value

    clock = SimClock(program)
    frames = [tcp(payload=b"x" * n) for n in SIZES]
    add(program, TCP_KEY, bucket=1)

    def compare(meter: WindowMeter, times: list[float]) -> list[tuple[float, int, bool]]:
        log = []
        for i, t in enumerate(times):
            data = frames[i % len(frames)]
            verdict = clock.run(data, t)
            assert verdict in (TC_ACT_REDIRECT, TC_ACT_SHOT), verdict
            log.append((t, len(data) - 14, verdict == TC_ACT_REDIRECT))
            engine = meter.allow(len(data) - 14, t)
            assert (verdict == TC_ACT_REDIRECT) == engine, (i, t, log[-5:])
        return log

    # A meter not begun: the kernel's first interval begins at its first frame, as the engine's.
    libbpf.map_update(program.map_fds["buckets"], BUCKET_KEY, window_value(1, RATE, BURST, None, 0))
    first = 100.0
    log = compare(WindowMeter(RATE, BURST), schedule(first, [(0.0, 0.9, 0.002), (1.1, 3.9, 0.05), (8.1, 9.0, 0.002),
                                                              (9.1, 11.0, 0.02)]))
    kernel = clock.bucket()
    assert kernel["window_ns"] == round(BURST / RATE * 1e9) and kernel["start_ns"] > 0
    counters = flow(program, TCP_KEY)
    passed = [(t, n) for t, n, ok in log if ok]
    assert counters["packets"] == len(passed) and counters["dropped_packets"] == len(log) - len(passed)
    assert counters["bytes"] == sum(n for _, n in passed)
    # And what both decided is the 2021 pattern: every interval offered more than the budget
    # passes the budget, to within a frame, and drops the rest.
    per_interval: dict[int, list[tuple[int, bool]]] = {}
    for t, n, ok in log:
        per_interval.setdefault(int((t - first) // (BURST / RATE)), []).append((n, ok))
    assert {0, 1, 2, 3, 8, 9, 10} <= set(per_interval)  # the gap skipped intervals 4-7
    for k, entries in per_interval.items():
        passed_bytes = sum(n for n, ok in entries if ok)
        assert passed_bytes <= BURST, k
        if sum(n for n, _ in entries) > BURST:
            assert passed_bytes > BURST - max(n for n, _ in entries) and not all(ok for _, ok in entries), k

    # Handed over begun: the engine's meter began at 200 s and passed frames for 0.4 s first.
    meter = WindowMeter(RATE, BURST, now=200.0)
    for i, t in enumerate(schedule(200.0, [(0.0, 0.4, 0.05)])):
        meter.allow(len(frames[i % len(frames)]) - 14, t)
    assert meter.start == 200.0 and 0 < meter.used < BURST
    libbpf.map_update(program.map_fds["buckets"], BUCKET_KEY, window_value(1, RATE, BURST, meter.start, meter.used))
    compare(meter, schedule(200.0, [(0.45, 1.0, 0.004), (1.0, 4.5, 0.03)]))
    print(f"\n{len(log)} + handed-over frames agreed; {clock.retries} runs redone (descheduled)")


def test_an_object_whose_structs_differ_is_refused_before_use(tmp_path: Path) -> None:
    """bytes and packets of flow_value swapped in a copy of the program: both __u64, so the map's
    sizes agree, and without the check Python would read packets as bytes. The kernel accepts the
    program; the load still fails, naming the struct and the fields."""
    if os.geteuid() != 0:
        pytest.fail("loading a BPF program needs root: run the namespace tier with sudo")
    obj = program_copy(tmp_path, swap_lines("__u64 bytes;", "__u64 packets;"))
    with pytest.raises(ThrottleError, match=r"struct flow_value has field bytes at byte 32.*it has packets"):
        libbpf.BpfObject(obj, PROGRAM, MAPS)
