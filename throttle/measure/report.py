"""What `throttle run` reports: each probe's run (`ProbeRun`) and the run as a whole (`RunReport`).

A `ProbeRun` is filled in while its probe runs (bytes and speed so far, then its client's
`Outcome`) and, once every probe is done, given its `Judgement`; `RunReport.to_json` is the JSON
document of `throttle run --json`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from throttle.measure.clients import CAUSE_LAB, Outcome
from throttle.measure.judge import Judgement, stalled_bytes
from throttle.measure.predict import Expected
from throttle.scenario import Probe


@dataclass
class ProbeRun:
    """One probe while it runs and after: what the client measured, and how it was judged."""

    probe: Probe
    bytes: int = 0  # transferred so far
    seconds: float = 0.0
    started: float = 0.0
    current_speed: float = 0.0  # bytes/s over the last update
    done: bool = False
    completed: bool = False  # the whole transfer finished
    error: str = ""
    observed: str = ""
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes) over time
    rate: float = 0.0  # the rate (bytes/s) it was judged against: its rule's, or the scenario's slowest
    cause: str = ""  # completed, timeout, reset, lab (see throttle.measure.clients)
    handshake: float | None = None  # seconds of the TLS (or QUIC) handshake, when the client says
    tcp_received: int = 0  # TCP payload bytes the client's socket received (ss), downloads over TCP
    observed_handshake: str = ""  # slow or normal, when the probe expects one
    check_failures: list[str] = field(default_factory=list)  # freeze_bytes, blocked_by, expect_handshake
    baseline: float | None = None  # a control's speed (bytes/s) with no censor running, when measured
    expected: Expected | None = None  # the speed it is held to when throttled, and where that comes from

    @property
    def stalled_bytes(self) -> int | None:
        """What the probe had received (downloads) or delivered (uploads) when it stalled."""
        return stalled_bytes(self, self.probe)

    @property
    def speed(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def passed(self) -> bool:
        return self.observed == self.probe.expect and not self.check_failures

    def finish(self, outcome: Outcome) -> None:
        """Take the client's outcome: on a failure, the bytes are the most either side counted."""
        self.cause, self.handshake = outcome.cause, outcome.handshake
        if outcome.completed:
            self.bytes, self.seconds, self.completed = outcome.bytes, outcome.seconds, True
        else:
            self.error, self.seconds = outcome.detail, outcome.seconds
            self.bytes = max(self.bytes, outcome.bytes)
        self.done = True
        self.current_speed = 0.0

    @property
    def expected_rate(self) -> float | None:
        """The speed (bytes/s) a throttled probe of this kind is held to, when there is one."""
        return None if self.expected is None else self.expected.rate

    def judged(self, rate: float, judgement: Judgement, expected: Expected | None = None) -> None:
        self.rate, self.expected = rate, expected
        self.observed, self.observed_handshake = judgement.verdict, judgement.handshake
        self.check_failures = list(judgement.failures)

    def snapshot(self) -> ProbeRun:
        """A copy that shares nothing mutable with the run (for readers in other threads)."""
        return dataclasses.replace(self, samples=list(self.samples), check_failures=list(self.check_failures))


@dataclass
class RunReport:
    scenario: str
    path: str
    runs: list[ProbeRun]
    rate: float  # the reference rate (bytes/s)
    control_speed: float | None
    started: float
    seconds: float

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.runs)

    @property
    def lab_failures(self) -> list[str]:
        """One line per probe the lab failed (cause "lab"): these say nothing about the censor."""
        return [f"{r.probe.name}: {r.error}" for r in self.runs if r.cause == CAUSE_LAB]

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "path": self.path,
            "passed": self.passed,
            "rate_bytes_per_second": self.rate,
            "control_speed_bytes_per_second": self.control_speed,
            "seconds": round(self.seconds, 3),
            "probes": [
                {
                    "name": r.probe.name, "host": r.probe.host, "direction": r.probe.direction,
                    "protocol": r.probe.protocol, "evasion": r.probe.evasion, "address": r.probe.address,
                    "sni": r.probe.sni, "size": r.probe.size, "bytes": r.bytes, "seconds": round(r.seconds, 4),
                    "speed_bytes_per_second": round(r.speed, 1), "completed": r.completed, "error": r.error,
                    "expected": r.probe.expect, "observed": r.observed, "passed": r.passed,
                    "control": r.probe.control, "rate_bytes_per_second": r.rate, "cause": r.cause,
                    "handshake_seconds": None if r.handshake is None else round(r.handshake, 4),
                    "expected_handshake": r.probe.expect_handshake or None,
                    "observed_handshake": r.observed_handshake or None,
                    "stalled_bytes": r.stalled_bytes,
                    "expected_freeze_bytes": list(r.probe.freeze_bytes) if r.probe.freeze_bytes else None,
                    "check_failures": r.check_failures,
                    "baseline_speed_bytes_per_second": None if r.baseline is None else round(r.baseline, 1),
                    "expected_rate_bytes_per_second": None if r.expected_rate is None else round(r.expected_rate, 1),
                    "expected_rate_source": None if r.expected is None else r.expected.why or None,
                    "tolerance": r.probe.tolerance,
                }
                for r in self.runs
            ],
        }
