"""throttle.infer.stream: one capture fitted as its connections end gives what reading every trace
and then fitting gives, in memory that grows with the flows reported, not with their packets."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_infer_reader import write_pcap
from throttle.cli.infer import flow_json
from throttle.infer.fit import infer
from throttle.infer.reader import read_traces
from throttle.infer.stream import infer_capture
from throttle.infer.trace import Inference

MSS = 200  # small: the bytes of packets are never held, and small files read fast


_IDS: dict[bytes, int] = {}


def _tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes = b"") -> bytes:
    ident = _IDS[src] = (_IDS.get(src, 0) + 1) & 0xFFFF  # one counter per host, as Linux numbers a flow's packets
    return (struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), ident, 0x4000, 64, 6, 0, src, dst)
            + struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 0x50, flags, 65535, 0, 0) + payload)


def connections(n: int, segments: int = 60, lose_every: int = 0) -> list[tuple[float, bytes]]:
    """`n` downloads one after another, each opened and closed (FIN both ways); with `lose_every`,
    every so many connections one segment is lost and sent again."""
    out: list[tuple[float, bytes]] = []
    t = 1_700_000_000.0
    for k in range(n):
        client, server = bytes((10, 1, k >> 8, k & 0xFF)), bytes((10, 2, 0, 1))
        port, c, s = 30000 + k, 1000, 50_000
        out += [(t, _tcp(client, server, port, 80, c, 0, 0x02)), (t + 0.01, _tcp(server, client, 80, port, s, c + 1, 0x12)),
                (t + 0.02, _tcp(client, server, port, 80, c + 1, s + 1, 0x10))]
        order = list(range(segments))
        if lose_every and k % lose_every == 0:
            order.remove(segments // 2)
            order.append(segments // 2)
        have: set[int] = set()
        for n_sent, i in enumerate(order):
            when = t + 0.03 + n_sent * 0.001
            out.append((when, _tcp(server, client, 80, port, s + 1 + i * MSS, c + 1, 0x18, bytes(MSS))))
            have.add(i)
            upto = next(j for j in range(segments + 1) if j not in have)
            out.append((when + 0.0005, _tcp(client, server, port, 80, c + 1, s + 1 + upto * MSS, 0x10)))
        end = t + 0.04 + segments * 0.001
        out.append((end, _tcp(server, client, 80, port, s + 1 + segments * MSS, c + 1, 0x11)))
        out.append((end + 0.001, _tcp(client, server, port, 80, c + 1, s + 2 + segments * MSS, 0x11)))
        out.append((end + 0.002, _tcp(server, client, 80, port, s + 2 + segments * MSS, c + 2, 0x10)))
        t = end + 0.01
    return sorted(out, key=lambda item: item[0])


def _both(path: Path) -> tuple[list[Inference], list[Inference]]:
    streamed, problem = infer_capture(path)
    assert problem is None
    return streamed, infer(read_traces([path]).traces)


def test_fitted_as_read_is_what_reading_then_fitting_gives(tmp_path: Path) -> None:
    path = write_pcap(tmp_path / "c.pcap", connections(12, segments=20, lose_every=3))
    streamed, whole = _both(path)
    assert len(streamed) == 12
    assert [flow_json(i) for i in streamed] == [flow_json(i) for i in whole]
    assert all(i.trace.released is not None and not i.trace.sent for i in streamed)
    assert {i.trace.packets for i in streamed} == {20} and sum(i.trace.lost > 0 for i in streamed) == 4, [i.trace.lost for i in streamed]


def _peak(run: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        result = run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result
    return peak


def test_memory_grows_with_the_flows_not_their_packets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten times the connections: the fitted-as-read path's peak grows by far less than reading
    every trace first (bytes allocated, counted by tracemalloc, not timed)."""
    monkeypatch.setattr("throttle.wire.pcap._CHUNK", 1 << 14)  # the file's buffer: the same for both sizes
    short = write_pcap(tmp_path / "short.pcap", connections(20))
    long = write_pcap(tmp_path / "long.pcap", connections(200))
    infer_capture(short)  # what a first run allocates once (imports, caches) counts in neither
    infer(read_traces([short]).traces)
    stream_growth = _peak(lambda: infer_capture(long)[0]) - _peak(lambda: infer_capture(short)[0])
    whole_growth = (_peak(lambda: infer(read_traces([long]).traces))
                    - _peak(lambda: infer(read_traces([short]).traces)))
    assert whole_growth > 0
    assert stream_growth < 0.3 * whole_growth, (stream_growth, whole_growth)
