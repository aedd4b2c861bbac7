"""The judge: a probe's verdict from what its client measured, never from the engine's opinion.

Pure: `judge(measured, probe, figures)` returns a `Judgement` and changes nothing. The runner
stores it. The verdicts (docs/incidents.md §3.22-23):

- blocked    the transfer did not complete: it stalled until its timeout (cause "timeout") or the
             network ended it with a reset (cause "reset");
- error      the lab failed, not the censor (cause "lab"): the run fails naming it;
- throttled  its speed is below 3 x its rate, and below a tenth of the control probes' speed
             (OONI's "extreme throttling" is a 10x slowdown); a control instead is throttled
             100 x below its own speed with no censor (its baseline), in every scenario, or
             below 3 x the rate in a scenario with one;
- normal     otherwise (a completed probe of a scenario whose rules only stop flows, rate 0, or only
             lose packets at random: a loss rule has no rate, so its probes are held to the
             scenario's slowest rate, if any rule has one, and to the controls).

A probe expected and observed throttled must also reach the speed it is expected at, within its
tolerance (`rate_check`): its `expect_rate`, else what its rule predicts for the transfer
(`throttle.measure.predict`); a censor that polices at twice or half the rate fails it. A probe
observed throttled under a rule that predicts no speed (no rule, a direction it does not limit, a
rate-0 or a loss rule) fails unless it gives `expect_rate`. A probe
with `freeze_bytes` must stall having delivered that many bytes, one with `blocked_by` must end
that way, and one with `expect_handshake` is judged by its TLS (or QUIC) handshake time against
the controls' and its floor (`handshake_verdict`); what is not met is a failed check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from throttle.measure.clients import CAUSE_LAB, CAUSE_TIMEOUT
from throttle.measure.predict import Expected
from throttle.scenario import Probe, Scenario
from throttle.units import format_rate

SPEED_FACTOR = 3.0  # a throttled probe is below 3 x the scenario's rate ...
CONTROL_FACTOR = 10.0  # ... and at least 10 x slower than the control (§23)
# A control is throttled below 3 x the rate, or 100 x slower than itself with no censor. Not 10 x:
# inspection costs a small transfer's first packets a trip through Python (measured, 64 KB on an
# idle machine: 301 Mbit/s alone, 76 Mbit/s through the censor), which a busy machine multiplies.
# Any rule's rate (kbit/s) is still thousands of times below a baseline of hundreds of Mbit/s.
BASELINE_FACTOR = 100.0
HANDSHAKE_FACTOR = 10.0  # a "slow" handshake takes at least 10 x the controls' (§3.23) ...
HANDSHAKE_FLOOR = 0.5  # ... and at least half a second (a loaded machine's jitter is not a censor)
INCOMPLETE = "incomplete"  # a handshake with a floor (a published time) that never completed


class Measured(Protocol):
    """What a probe's client measured (a `ProbeRun` is one)."""

    @property
    def cause(self) -> str: ...  # completed, timeout, reset, lab

    @property
    def completed(self) -> bool: ...

    @property
    def bytes(self) -> int: ...  # transferred (or delivered before a stall)

    @property
    def speed(self) -> float: ...  # bytes/s

    @property
    def handshake(self) -> float | None: ...  # seconds, when the client says

    @property
    def tcp_received(self) -> int: ...  # TCP payload received, from `ss` (curl's downloads only)


@dataclass(frozen=True, slots=True)
class Figures:
    """What a probe is judged against."""

    rate: float  # bytes/s: its rule's, or the scenario's slowest
    control_speed: float | None = None  # the fastest control of its transport (QUIC or TCP)
    control_handshake: float | None = None  # the slowest control handshake of its transport
    baseline: float | None = None  # a control's own speed with no censor, when measured
    expected: Expected | None = None  # what its speed is held to when throttled (None: not judged)


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: str  # throttled, normal, blocked, error
    handshake: str  # slow or normal when the probe expects one, else ""
    failures: tuple[str, ...]  # its expected rate, freeze_bytes, blocked_by and expect_handshake checks not met


def reference_rate(scenario: Scenario) -> float:
    """The slowest rate any rule limits to (bytes/s); what 'throttled' is measured against."""
    rates = [r.rate for r in scenario.rules if r.rate > 0]
    return min(rates) if rates else 0.0


def stalled_bytes(measured: Measured, probe: Probe) -> int | None:
    """What the probe had received (downloads) or delivered (uploads) when it stalled: for curl's
    downloads the TCP payload its socket received (TLS included), else the client's own count."""
    if measured.cause != CAUSE_TIMEOUT:
        return None
    if probe.direction == "download" and measured.tcp_received:
        return measured.tcp_received
    return measured.bytes


def speed_verdict(measured: Measured, probe: Probe, figures: Figures) -> str:
    if measured.cause == CAUSE_LAB:
        return "error"
    if not measured.completed:
        return "blocked"
    below_rate = measured.speed < SPEED_FACTOR * figures.rate
    if probe.control:  # against itself with no censor (when measured), and by the rate
        baseline = figures.baseline
        far_below_baseline = baseline is not None and measured.speed < baseline / BASELINE_FACTOR
        return "throttled" if below_rate or far_below_baseline else "normal"
    if figures.rate <= 0:  # rules that only freeze (rate 0, §19) block flows; they cannot slow one
        return "normal"
    control = figures.control_speed
    below_control = control is None or measured.speed < control / CONTROL_FACTOR
    return "throttled" if below_rate and below_control else "normal"


def handshake_verdict(measured: Measured, control_handshake: float | None, floor: float = 0.0) -> str:
    """slow or normal: slow when at least HANDSHAKE_FACTOR x the controls' and HANDSHAKE_FLOOR; with
    a `floor` (a published time), when at least `floor` and HANDSHAKE_FLOOR over the controls'. A
    published time is what the censor adds, whatever the machine: a multiple of the controls' would
    judge the machine instead (under emulation, 0.5-0.8 s controls put 10 x past kazakhstan-2023's
    4.6 s and twitter-2022-03's 6 s). A handshake that never completed on a probe that
    stalled is slow (a crawl past the timeout), unless it has a floor: published times are of
    handshakes that completed (§2.17: 5.6 s before a 10 s timeout), so it is "incomplete". With no
    control handshake, the floor alone decides."""
    if measured.handshake is None:
        if measured.cause != CAUSE_TIMEOUT:
            return "normal"
        return INCOMPLETE if floor > 0 else "slow"
    if floor > 0:
        bound = max(floor, (control_handshake or 0.0) + HANDSHAKE_FLOOR)
    else:
        bound = max(HANDSHAKE_FLOOR, HANDSHAKE_FACTOR * (control_handshake or 0.0))
    return "slow" if measured.handshake >= bound else "normal"


def rate_check(measured: Measured, probe: Probe, expected: Expected | None, verdict: str) -> str | None:
    """What is wrong with the speed of a probe expected and observed throttled (None: nothing): it
    is outside its tolerance around the speed expected, or nothing predicts one though its rule (or
    no rule) says it should not have been slowed at all."""
    if probe.expect != "throttled" or verdict != "throttled" or expected is None:
        return None
    got = f"throttled at {format_rate(measured.speed)}"
    if expected.kind in ("unmatched", "unslowed", "blocks", "loss"):
        return f"{got}, but {expected.why}, so nothing predicts that; if it is right, give the probe expect_rate"
    rate = expected.rate
    if rate is None or abs(measured.speed - rate) <= probe.tolerance * rate:
        return None
    return f"{got}, expected {format_rate(rate)} ±{probe.tolerance * 100:g}% ({expected.why})"


def check_expectations(measured: Measured, probe: Probe, control_handshake: float | None) -> list[str]:
    """What a probe's freeze_bytes, blocked_by and expect_handshake found wrong (empty: all met)."""
    failures: list[str] = []
    if probe.freeze_bytes is not None:
        low, high = probe.freeze_bytes
        got = stalled_bytes(measured, probe)
        if got is None:
            failures.append(f"freeze_bytes: expected a stall after {low}-{high} bytes, but the probe "
                            f"{'completed' if measured.completed else 'ended by ' + (measured.cause or 'an error')}")
        elif not low <= got <= high:
            failures.append(f"freeze_bytes: stalled after {got} bytes, expected {low}-{high}")
    if probe.blocked_by and not measured.completed and measured.cause != probe.blocked_by:
        failures.append(f"blocked_by: expected a {probe.blocked_by}, but the probe ended by "
                        f"{measured.cause or 'an error'}")
    if probe.expect_handshake:
        floor = probe.handshake_at_least
        observed = handshake_verdict(measured, control_handshake, floor)
        if observed != probe.expect_handshake:
            shown = "none" if measured.handshake is None else f"{measured.handshake:.3f} s"
            ref = "none" if control_handshake is None else f"{control_handshake:.3f} s"
            wanted = f"{probe.expect_handshake} (at least {floor:g} s)" if floor else probe.expect_handshake
            failures.append(f"handshake: expected {wanted}, observed {observed} ({shown}; controls {ref})")
    return failures


def judge(measured: Measured, probe: Probe, figures: Figures) -> Judgement:
    """The verdict, the handshake verdict (when expected) and the failed checks of one probe."""
    shake = ""
    if probe.expect_handshake:
        shake = handshake_verdict(measured, figures.control_handshake, probe.handshake_at_least)
    verdict = speed_verdict(measured, probe, figures)
    failures = check_expectations(measured, probe, figures.control_handshake)
    wrong_rate = rate_check(measured, probe, figures.expected, verdict)
    return Judgement(verdict, shake, tuple(failures if wrong_rate is None else [wrong_rate, *failures]))
