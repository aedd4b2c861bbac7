"""throttle.infer.reader never raises on what a capture holds: mangled files, nonsense packets,
TCP segments with any numbers in them. Whatever it returns is well formed."""

from __future__ import annotations

import functools
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import IP, TCP, UDP, IPv6, raw  # type: ignore[import-untyped]

from tests.packets import mutate, quic_initials
from tests.test_infer_reader import Transfer, write_pcap, write_pcapng
from throttle.infer.reader import read_traces
from throttle.infer.trace import FlowTrace

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_mutation = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                      st.integers(0, 1 << 20), st.integers(0, 255))


def _well_formed(traces: list[FlowTrace], problems: list[str]) -> None:
    for trace in traces:
        assert trace.payload > 0 and trace.sent and trace.direction in ("upload", "download")
        assert trace.vantage in ("sender", "receiver", "unknown")
        assert all(s.length > 0 and s.start >= 0 and s.wire >= s.length for s in trace.sent)
        assert all(loss.length > 0 and loss.start >= 0 for loss in trace.losses)
        assert trace.base_rtt is None or trace.base_rtt >= 0
    assert all(isinstance(p, str) and "\n" not in p for p in problems)


@functools.lru_cache(maxsize=None)
def _captures() -> tuple[bytes, ...]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        x, y = Transfer(), Transfer(v6=True, rst=(60, 0))
        quic = [(5.0 + i, raw(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=5000, dport=443) / d))
                for i, d in enumerate(quic_initials("a.example"))]
        return (write_pcap(Path(tmp) / "a", x.at_client + quic).read_bytes(),
                write_pcapng(Path(tmp) / "b", y.at_server).read_bytes())


@FUZZ
@given(which=st.integers(0, 1), ops=st.lists(_mutation, min_size=1, max_size=6))
def test_a_mangled_capture_never_raises(tmp_path: Path, which: int, ops: list[tuple[str, int, int]]) -> None:
    path = tmp_path / "m.cap"
    path.write_bytes(mutate(_captures()[which], ops))
    _well_formed(*read_traces([path]))


@FUZZ
@given(st.lists(st.binary(min_size=0, max_size=120), max_size=12))
def test_packets_of_any_bytes_never_raise(tmp_path: Path, packets: list[bytes]) -> None:
    heads = [b"\x45", b"\x46", b"\x60"]  # IPv4, IPv4 with options, IPv6: past the version check
    data = [(1.0 + i, heads[i % 3] + p) for i, p in enumerate(packets)]
    _well_formed(*read_traces([write_pcap(tmp_path / "p.pcap", data)]))


_segment = st.tuples(
    st.booleans(),  # from the client
    st.integers(0, (1 << 32) - 1),  # seq
    st.integers(0, (1 << 32) - 1),  # ack
    st.sampled_from(["S", "SA", "A", "PA", "FA", "R", "RA", "SF", "FPU"]),
    st.integers(0, 3000),  # payload length
    st.lists(st.integers(0, (1 << 32) - 1), max_size=6),  # SACK edges
    st.booleans(),  # IPv6
    st.floats(0, 5),  # time step
)


@FUZZ
@given(st.lists(_segment, max_size=40))
def test_tcp_segments_with_any_numbers_never_raise(tmp_path: Path, segments: list[tuple[bool, int, int, str, int, list[int], bool, float]]) -> None:
    data = []
    t = 100.0
    for from_client, seq, ack, flags, length, edges, v6, step in segments:
        t += step
        if v6:
            a, b = ("fd00::1", "fd00::2") if from_client else ("fd00::2", "fd00::1")
            net = IPv6(src=a, dst=b)
        else:
            a, b = ("10.0.0.1", "10.0.0.2") if from_client else ("10.0.0.2", "10.0.0.1")
            net = IP(src=a, dst=b)
        sport, dport = (40000, 443) if from_client else (443, 40000)
        options = [("SAck", tuple(edges[: len(edges) // 2 * 2]))] if len(edges) >= 2 else []
        data.append((t, raw(net / TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, options=options) / (b"\x16" * length))))
    _well_formed(*read_traces([write_pcap(tmp_path / "t.pcap", data)]))
