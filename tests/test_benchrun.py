"""throttle.measure.bench's pure parts and throttle.measure.plots: no root, no lab, literal packets and times."""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import pytest
from scapy.all import IP, TCP, UDP, IPv6, IPv6ExtHdrHopByHop, raw  # type: ignore[import-untyped]

from throttle.measure.bench import (
    BIN,
    BenchRow,
    FlowStats,
    Segment,
    analyse_flow,
    bin_payload,
    count_bins,
    drop_times,
    flow_segments,
    middle_rate,
    parse_segment,
    pick_flows,
    summary_markdown,
    write_csv,
    write_json,
)
from throttle.measure.ports import ProbePorts
from throttle.scenario import Probe, parse_scenario

PNG = b"\x89PNG\r\n\x1a\n"
BASE = 31000
PORTS = ProbePorts(BASE)
C, S = "198.18.0.2", "198.18.1.2"


def seg(t: float, sport: int, dport: int, seq: int, length: int, src: str = C, dst: str = S) -> Segment:
    return Segment(t, src, dst, sport, dport, 6, seq, length)


# ---- parsing -------------------------------------------------------------------------------------
def test_parse_segment_ipv4_tcp_counts_payload_from_ip_length_even_when_truncated() -> None:
    pkt = raw(IP(src=C, dst=S) / TCP(sport=31000, dport=443, seq=1234, flags="PA") / (b"x" * 1448))
    s = parse_segment(1.5, pkt[:128])  # as `tcpdump -s 128` leaves it
    assert s == Segment(1.5, C, S, 31000, 443, 6, 1234, 1448)


def test_parse_segment_ipv6_with_extension_header_and_udp() -> None:
    pkt = raw(IPv6(src="2001:2:0:1::2", dst="2001:2:0:2::2") / IPv6ExtHdrHopByHop()
              / TCP(sport=5, dport=443, seq=9) / b"ab")
    assert parse_segment(0.0, pkt) == Segment(0.0, "2001:2:0:1::2", "2001:2:0:2::2", 5, 443, 6, 9, 2)
    u = parse_segment(2.0, raw(IP(src=C, dst=S) / UDP(sport=53, dport=5353) / b"hello"))
    # A datagram's "sequence number" is a checksum of its first bytes: the same copy on both sides.
    assert u is not None and (u.proto, u.length, u.seq) == (17, 5, zlib.crc32(b"hello"))
    other = parse_segment(2.0, raw(IP(src=C, dst=S) / UDP(sport=53, dport=5353) / b"hellO"))
    assert other is not None and other.seq != u.seq


@pytest.mark.parametrize("data", [b"", b"\x45", b"\x60" + b"\x00" * 10, b"\x20" * 40, b"\x45" + b"\x00" * 15,
                                  raw(IP(src=C, dst=S, proto=1) / b"icmp-ish")])
def test_parse_segment_returns_none_for_what_is_not_tcp_or_udp(data: bytes) -> None:
    assert parse_segment(0.0, data) is None


def test_parse_segment_skips_later_fragments() -> None:
    pkt = raw(IP(src=C, dst=S, frag=100) / TCP() / b"x")
    assert parse_segment(0.0, pkt) is None


# ---- flows ---------------------------------------------------------------------------------------
def test_flow_segments_by_client_port_range_tls_included() -> None:
    probes = [Probe("up", "a"), Probe("ctl", "b", control=True), Probe("raw1", "c", protocol="tls"),
              Probe("rawctl", "d", protocol="tls", control=True)]
    segs = [seg(0.0, BASE + 3, 443, 1, 10), seg(0.1, 443, BASE + 3, 5, 0, S, C), seg(0.2, BASE + 15, 443, 1, 10),
            seg(0.3, BASE + 30, 8443, 1, 10), seg(0.5, BASE + 21, 8443, 1, 10), seg(0.6, 8443, BASE + 30, 1, 0, S, C),
            seg(0.7, 50000, 80, 1, 10)]
    flows = flow_segments(segs, probes, PORTS)
    assert [s.time for s in flows[0]] == [0.0, 0.1]
    assert [s.time for s in flows[1]] == [0.2]
    assert [s.time for s in flows[3]] == [0.3, 0.6]  # the TLS control's own port range
    assert [s.time for s in flows[2]] == [0.5]
    assert all(s.sport != 50000 for f in flows.values() for s in f)


def test_raw_tls_probes_started_together_are_told_apart_by_port() -> None:
    # Once the TLS probes were paired with 8443 connections by order of first appearance, which two
    # probes started at once could swap. Their ports say whose a connection is, whatever the order.
    probes = [Probe("ctl", "b", control=True), Probe("raw1", "c", protocol="tls"), Probe("raw2", "d", protocol="tls"),
              Probe("cmd", "e", protocol="command", command="true")]
    segs = [seg(0.0, BASE + 20, 8443, 1, 10), seg(0.01, BASE + 10, 8443, 1, 10), seg(0.02, 8443, BASE + 20, 1, 0, S, C),
            seg(0.03, BASE + 31, 443, 1, 10), seg(0.04, 41000, 8443, 1, 10)]
    flows = flow_segments(segs, probes, PORTS)
    assert [s.time for s in flows[1]] == [0.01] and [s.time for s in flows[2]] == [0.0, 0.02]
    assert 3 not in flows and 0 not in flows  # a command takes no port range; nothing was the control's


def test_tcp_ports_of_a_quic_probe_and_udp_ports_of_a_tls_probe_are_not_theirs() -> None:
    probes = [Probe("raw", "a", protocol="tls"), Probe("quic", "b", protocol="quic")]
    segs = [seg(0.0, BASE, 8443, 1, 10)._replace(proto=17), seg(0.1, BASE + 10, 443, 1, 10)]
    assert flow_segments(segs, probes, PORTS) == {}


def test_flow_segments_quic_probes_by_port_and_udp_only() -> None:
    probes = [Probe("tcp", "a"), Probe("quic", "b", protocol="quic")]
    segs = [seg(0.0, BASE + 1, 443, 1, 10), seg(0.1, BASE + 11, 443, 1, 10)._replace(proto=17),
            seg(0.2, 443, BASE + 11, 2, 10, S, C)._replace(proto=17), seg(0.3, BASE + 12, 443, 1, 10),
            seg(0.4, BASE + 2, 443, 1, 10)._replace(proto=17)]
    flows = flow_segments(segs, probes, PORTS)
    assert [s.time for s in flows[0]] == [0.0]  # not the UDP datagram in its port range
    assert [s.time for s in flows[1]] == [0.1, 0.2]  # not the TCP segment in its port range


# ---- binning and drops ---------------------------------------------------------------------------
def test_bin_payload_sums_bytes_per_100ms_from_t0() -> None:
    bins = bin_payload([(10.0, 100), (10.05, 50), (10.25, 7), (9.0, 999)], t0=10.0)
    assert bins == [150, 0, 7]
    assert bin_payload([(10.0, 1)], t0=10.0, until=10.45) == [1, 0, 0, 0, 0]
    assert bin_payload([], t0=3.0) == [0]


def test_drop_times_nothing_dropped_when_every_segment_leaves() -> None:
    ins = [(0.0, 1, 100), (0.1, 101, 100)]
    outs = [(0.0002, 1, 100), (0.1003, 101, 100)]
    assert drop_times(ins, outs) == []


def test_drop_times_a_policed_segment_and_its_retransmission() -> None:
    # seq 101 dropped at 0.1, its retransmission at 0.4 passes: one drop, at 0.1 (not 0.4).
    ins = [(0.0, 1, 100), (0.1, 101, 100), (0.4, 101, 100), (0.5, 201, 100)]
    outs = [(0.0, 1, 100), (0.4, 101, 100)]
    assert drop_times(ins, outs) == [0.1, 0.5]


def test_drop_times_a_copy_queued_while_its_retransmission_arrives_is_not_a_drop() -> None:
    # Both copies entered before the first left (a queue in the censor): both left, so no drop.
    ins = [(0.0, 1, 100), (0.2, 1, 100)]
    outs = [(0.3, 1, 100), (0.5, 1, 100)]
    assert drop_times(ins, outs) == []


def test_drop_times_ignores_pure_acks_and_segments_that_left_without_entering() -> None:
    assert drop_times([(0.0, 1, 0), (0.1, 1, 0)], []) == []
    assert drop_times([], [(0.0, 5, 10)]) == []
    # A copy cannot leave before it entered (beyond the slack): that departure pairs with nothing.
    assert drop_times([(1.0, 1, 10)], [(0.5, 1, 10)]) == [1.0]
    assert drop_times([(1.0, 1, 10)], [(0.9995, 1, 10)]) == []


def test_count_bins_and_middle_rate() -> None:
    assert count_bins([0.05, 0.06, 0.31, 9.0, -1.0], t0=0.0, nbins=4) == [2, 0, 0, 1]
    # A policed flow: a 16 KB burst, then alternating empty bins and two segments (the saw-tooth).
    bins = [16384] + [0, 2896] * 40
    median, mean = middle_rate(bins)
    assert mean == pytest.approx(2896 / 2 / BIN, rel=0.05)
    assert median == pytest.approx(2896 / 2 / BIN, rel=0.05)
    assert middle_rate([0, 0]) == (0.0, 0.0)
    assert middle_rate([5000, 5000]) == (50000.0, 50000.0)  # shorter than a window: the mean


def test_analyse_flow_upload_and_download() -> None:
    up = Probe("up", "pbs.twimg.com", direction="upload")
    client_side = [seg(0.0, BASE, 443, 1, 0), seg(0.01, BASE, 443, 1, 1000), seg(0.02, BASE, 443, 1001, 1000),
                   seg(0.03, 443, BASE, 7, 500, S, C), seg(0.35, BASE, 443, 1001, 1000)]
    server_side = [seg(0.0001, BASE, 443, 1, 0), seg(0.0101, BASE, 443, 1, 1000), seg(0.0299, 443, BASE, 7, 500, S, C),
                   seg(0.3501, BASE, 443, 1001, 1000)]
    st = analyse_flow(1, 0, up, client_side, server_side, PORTS)
    assert st.passed_bins == [1000, 0, 0, 1000]
    assert st.drop_bins == [1, 0, 0, 0] and st.drops == 1 and st.capture_bytes == 2000
    down = Probe("down", "pbs.twimg.com", direction="download")
    st = analyse_flow(1, 0, down, client_side, server_side, PORTS)
    assert st.passed_bins == [500, 0, 0, 0] and st.drops == 0
    assert analyse_flow(1, 0, up, [], [], PORTS).passed_bins == []


# ---- writers -------------------------------------------------------------------------------------
ROWS = [
    BenchRow(repeat=r, probe=name, host=host, direction="upload", bytes=163840, seconds=secs,
             speed_bps=163840 * 8 / secs, expected=exp, observed=obs, passed=exp == obs, control=ctl,
             error="", capture_bytes=164000, drops=drops, middle_bps=128000.0, middle_median_bps=130000.0)
    for r, (name, host, secs, exp, obs, ctl, drops) in [
        (1, ("up", "pbs.twimg.com", 10.0, "throttled", "throttled", False, 250)),
        (1, ("ctl", "example.org", 0.1, "normal", "normal", True, 0)),
        (2, ("up", "pbs.twimg.com", 9.0, "throttled", "normal", False, 240)),
        (2, ("ctl", "example.org", 0.12, "normal", "normal", True, 0)),
    ]
]


def test_write_json_and_csv(tmp_path: Path) -> None:
    write_json(tmp_path / "r.json", ROWS, {"seed": 3}, {"scenario": "s"})
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["scenario"] == "s" and data["reproduce"] == {"seed": 3} and data["rows"] == [r.to_json() for r in ROWS]
    write_csv(tmp_path / "r.csv", ROWS)
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == 4 and rows[0]["probe"] == "up" and rows[2]["passed"] == "False"
    assert list(rows[0])[:10] == ["repeat", "probe", "host", "direction", "bytes", "seconds", "speed_bps",
                                  "expected", "observed", "passed"]


def test_summary_markdown_has_a_line_per_probe_with_median_spread_and_counts() -> None:
    text = summary_markdown("twitter", 16250.0, 2, ROWS)
    assert "130.0 kbit/s" in text and "2 repeats" in text
    up = next(line for line in text.splitlines() if line.startswith("| up "))
    assert "| 138.4 |" in up  # median of 131.1 and 145.6 kbit/s
    assert "131.1-145.6" in up and "throttled 1 of 2, normal 1 of 2" in up and "1 of 2 |" in up
    ctl = next(line for line in text.splitlines() if line.startswith("| ctl "))
    assert "normal 2 of 2" in ctl and "2 of 2 |" in ctl


# ---- plots ---------------------------------------------------------------------------------------
def _flow(name: str, repeat: int, bins: list[int], drops: list[int]) -> FlowStats:
    f = FlowStats(repeat, 0, name, "upload")
    f.passed_bins, f.drop_bins = bins, drops
    f.drops, f.capture_bytes = sum(drops), sum(bins)
    return f


def test_plots_write_pngs(tmp_path: Path) -> None:
    from throttle.measure import plots

    throttled = _flow("up", 1, [16384] + [0, 2896] * 30, [20] + [5, 0] * 30)
    control = _flow("ctl", 1, [160000, 4000], [0, 0])
    plots.plot_speeds(tmp_path / "s.png", "twitter", 16250.0, ROWS)
    plots.plot_throughput(tmp_path / "t.png", "twitter", 16250.0, throttled, control)
    plots.plot_throughput(tmp_path / "t2.png", "twitter", 0.0, None, control)
    plots.plot_drops(tmp_path / "d.png", "twitter", throttled)
    for name in ("s.png", "t.png", "t2.png", "d.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, name


def test_pick_flows_takes_the_first_repeat_most_dropped_throttled_flow_and_the_control() -> None:
    sc = parse_scenario(
        '[scenario]\nname = "x"\n[[rule]]\nname = "r"\nmatch = ["*.twimg.com"]\nrate = "130kbit"\n'
        '[[probe]]\nname = "up"\nhost = "pbs.twimg.com"\n[[probe]]\nname = "up2"\nhost = "video.twimg.com"\n'
        '[[probe]]\nname = "ctl"\nhost = "example.org"\nexpect = "normal"\ncontrol = true\n')
    flows = [_flow("up", 2, [1], [9]), _flow("up", 1, [1], [3]), _flow("up2", 1, [1], [4]), _flow("ctl", 1, [5], [0])]
    throttled, control = pick_flows(sc, flows)
    assert throttled is flows[2] and control is flows[3]
