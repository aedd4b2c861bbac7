"""`throttle infer --check`: an inferred scenario run in the lab, captured where the original was
captured, inferred again and compared with what the capture showed.

Where: the vantage of the original's traces says which end the capture was taken at (a client-side
capture sees its uploads before any loss and its downloads after it; a server-side one the
reverse), so the lab run is captured with tcpdump in that end's namespace. The comparison is pure
(`compare`): each connection's transfer (the direction that carried the most) is paired with the
lab's of the same name, transport and direction, the largest with the largest; a pair differs when
its mechanisms differ or its rates are more than `RATE_TOLERANCE` apart.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from throttle.infer.scenario_out import transfers
from throttle.infer.trace import Inference

__all__ = ["RATE_TOLERANCE", "CheckResult", "Row", "capture_side", "check_scenario", "compare", "describe"]

RATE_TOLERANCE = 0.10
Side = Literal["client", "server"]


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    direction: str
    original: str  # what the capture showed
    again: str  # what the lab's capture showed
    difference: str  # "" when the same
    same: bool


@dataclass(frozen=True, slots=True)
class CheckResult:
    vantage: Side
    rows: tuple[Row, ...]
    capture: Path  # the lab run's capture
    probes_passed: bool  # the run's own verdicts (the probes' expectations)

    @property
    def passed(self) -> bool:
        return all(r.same for r in self.rows)


def capture_side(infs: Sequence[Inference]) -> Side:
    """Where the original capture was taken: the end whose view the traces' vantages agree with
    (the client's when they do not say)."""
    votes = {"client": 0, "server": 0}
    for inf in infs:
        t = inf.trace
        if t.vantage == "unknown":
            continue
        sender = "client" if t.direction == "upload" else "server"
        votes[sender if t.vantage == "sender" else ("server" if sender == "client" else "client")] += 1
    return "server" if votes["server"] > votes["client"] else "client"


def describe(inf: Inference | None) -> str:
    if inf is None:
        return "no such flow"
    text: str = inf.mechanism
    if inf.rate_bps is not None:
        text += f" {inf.rate_bps.value / 1000:.1f} kbit/s"
    if inf.burst_bytes is not None:
        text += f", burst {inf.burst_bytes.value:,.0f} B"
    if inf.after_bytes is not None:
        text += f", after {inf.after_bytes:,} B"
    return text


def _difference(a: Inference, b: Inference | None) -> str:
    if b is None:
        return "the lab's capture has no such flow"
    if a.mechanism != b.mechanism:
        return f"mechanism {a.mechanism} -> {b.mechanism}"
    if (a.rate_bps is None) != (b.rate_bps is None):
        return "rate " + ("lost" if b.rate_bps is None else "appeared")
    if a.rate_bps is not None and b.rate_bps is not None and a.rate_bps.value > 0:
        off = b.rate_bps.value / a.rate_bps.value - 1
        if abs(off) > RATE_TOLERANCE:
            return f"rate {off:+.1%}"
    return ""


def compare(original: Sequence[Inference], again: Sequence[Inference]) -> tuple[Row, ...]:
    """Each transfer of the original (a connection's direction that carried the most, as the
    written scenario's probes repeat them) against the lab's transfer of the same name, transport
    and direction, the largest with the largest."""
    def key(inf: Inference) -> tuple[str, str, str]:
        return inf.trace.server_name or "", "tcp" if inf.trace.transport == "tcp" else "udp", inf.trace.direction

    pool: dict[tuple[str, str, str], list[Inference]] = defaultdict(list)
    for inf in sorted(transfers(again), key=lambda i: -i.trace.payload):
        pool[key(inf)].append(inf)
    rows = []
    for inf in sorted(transfers(original), key=lambda i: -i.trace.payload):
        if inf.trace.server_name is None:
            continue  # not in the scenario: nothing of it was reproduced
        matches = pool[key(inf)]
        other = matches.pop(0) if matches else None
        diff = _difference(inf, other)
        rows.append(Row(inf.trace.server_name, inf.trace.direction, describe(inf), describe(other), diff, not diff))
    return tuple(sorted(rows, key=lambda r: (r.name, r.direction)))


def check_scenario(scenario_path: Path, original: Sequence[Inference],
                   infer_capture: Callable[[Path], Sequence[Inference]], *, lab_name: str = "throttle",
                   on_phase: Callable[[str], None] | None = None) -> CheckResult:
    """Run the scenario at `scenario_path` in the lab, captured at the original's side; infer again
    (`infer_capture`: the reader and the fitter, as `throttle infer` composes them); compare. The
    capture is kept beside the scenario (`NAME.check.pcap`). Needs root."""
    from throttle.lab.topology import CLIENT_IF, SERVER_IF, Lab
    from throttle.measure.bench import Capture
    from throttle.measure.runner import run_scenario
    from throttle.scenario import load_scenario

    phase = on_phase or (lambda text: None)
    scenario = load_scenario(scenario_path)
    side = capture_side(original)
    path = scenario_path.with_suffix(".check.pcap")
    lab = Lab(lab_name)
    was_up = lab.status().up
    lab.up(sorted({p.host for p in scenario.probes}))
    try:
        phase(f"capturing at the {side} while {scenario.name} runs")
        with Capture(lab, side, CLIENT_IF if side == "client" else SERVER_IF, path, snaplen=0):
            # no metrics: the default port is the one `throttle demo` and a user's censor expect
            report = run_scenario(scenario, lab_name=lab_name, keep=True, on_phase=phase, baseline=False,
                                  metrics_listen="off")
            time.sleep(0.3)  # the last packets reach the capture file
    finally:
        if not was_up:
            phase("taking the lab down")
            lab.down()
    phase("inferring again")
    return CheckResult(side, compare(original, infer_capture(path)), path, report.passed)
