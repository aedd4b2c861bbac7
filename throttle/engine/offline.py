"""Offline classification: a capture file through the same engine, its timestamps as the clock.

Nothing is dropped or delayed here: for limited flows the report says what the policer would have
dropped, or the shaper delayed, had the censor sat on the path where the capture was taken.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

from throttle.engine import Engine, Flow, FlowStarted
from throttle.scenario import Scenario
from throttle.wire import pcap


@dataclass(frozen=True, slots=True)
class FlowReport:
    client: str
    server: str
    transport: str
    name: str | None
    name_source: str | None
    rule: str | None
    verdict: str  # limited | passed | inspecting (the capture ended while it was inspected)
    packets: int
    bytes: int
    upload_bytes: int
    download_bytes: int
    dropped_packets: int
    dropped_bytes: int
    delayed_packets: int
    delayed_bytes: int
    delay_seconds: float
    first_seen: float
    last_seen: float
    names_seen: list[str]

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def report(flow: Flow) -> FlowReport:
    up, down = flow.sides
    return FlowReport(
        client=flow.client_endpoint,
        server=flow.server_endpoint,
        transport=flow.transport,
        name=flow.name,
        name_source=flow.name_source,
        rule=flow.rule.name if flow.rule else None,
        verdict=flow.verdict,
        packets=up.packets + down.packets,
        bytes=up.bytes + down.bytes,
        upload_bytes=up.bytes,
        download_bytes=down.bytes,
        dropped_packets=up.dropped_packets + down.dropped_packets,
        dropped_bytes=up.dropped_bytes + down.dropped_bytes,
        delayed_packets=up.delayed_packets + down.delayed_packets,
        delayed_bytes=up.delayed_bytes + down.delayed_bytes,
        delay_seconds=round(up.delay_total + down.delay_total, 6),
        first_seen=flow.first_seen,
        last_seen=flow.last_seen,
        names_seen=[f"{name} ({source})" for name, source in flow.names_seen],
    )


def classify_packets(packets: Iterable[tuple[float, bytes]], scenario: Scenario,
                     progress: Callable[[int], None] | None = None) -> list[FlowReport]:
    """Run (timestamp, IP packet) pairs through a fresh engine; one report per flow, in order seen."""
    engine = Engine(scenario.model, scenario.rules)
    flows: list[Flow] = []
    for count, (ts, packet) in enumerate(packets, 1):
        timer = engine.next_timer()
        if timer is not None and timer <= ts:
            engine.handle_timer(ts)
        engine.process(packet, ts)
        for event in engine.drain_events():
            if isinstance(event, FlowStarted):
                flows.append(event.flow)
        if progress is not None and count % 65536 == 0:
            progress(count)
    return [report(f) for f in flows]


def classify_file(path: str | os.PathLike[str], scenario: Scenario,
                  progress: Callable[[int], None] | None = None) -> list[FlowReport]:
    """Classify a pcap or pcapng file; raises CaptureError (after nothing is reported) if unreadable."""
    return classify_packets(pcap.read_packets(path), scenario, progress)


def iter_rows(reports: Iterable[FlowReport]) -> Iterator[list[str]]:
    for r in reports:
        effect = ""
        if r.dropped_packets:
            effect = f"would drop {r.dropped_packets} pkts / {r.dropped_bytes} B"
        elif r.delayed_packets:
            effect = f"would delay {r.delayed_packets} pkts / {r.delayed_bytes} B ({r.delay_seconds:.2f} s)"
        yield [r.client, r.server, r.transport, r.name or "-", r.name_source or "-", r.rule or "-",
               r.verdict, str(r.packets), effect]
