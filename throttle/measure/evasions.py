"""`throttle evasions`: every built-in ClientHello trick against chosen censor models, as a matrix.

For each scenario (a censor model and its rules) the matrix is built from one run of the scenario's
censor in the lab, with probes generated here instead of the file's own:

- one raw-client upload (`protocol = "tls"`) per built-in trick of `throttle.lab.evasion`, "none"
  (the undisguised hello) included as the baseline, all for one name the scenario's rules police;
- a control: the same upload for a name no rule matches, so speed is judged against it;
- every `protocol = "command"` or `"browser"` probe the scenario already has (the user's own
  tricks, a real browser over TCP or HTTP/3) but its controls, with the scenario's own controls as
  their reference; a browser over HTTP/3 is judged against its rule for QUIC (`probe_rule`).

Each probe's verdict (the runner's, from measured speed) becomes an outcome (`outcome`):
evaded, caught or broke. A lab failure is no outcome: the command fails instead.

`EXPECTED_2021` is what docs/incidents.md §1.7 reports for the 2021 device, so a run against that
model can be checked trick by trick.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from throttle.errors import ThrottleError
from throttle.measure.clients import CAUSE_LAB, CAUSE_RESET, CAUSE_TIMEOUT, SINK_PORT
from throttle.measure.report import ProbeRun, RunReport
from throttle.scenario import EVASIONS, Evasion, Model, Probe, Rule, Scenario, probe_rule

Outcome = Literal["evaded", "caught", "broke"]
OUTCOMES: tuple[Outcome, ...] = ("evaded", "caught", "broke")

SOURCE_2021 = "docs/incidents.md §1.7 [CP]"
# What §1.7 says each trick did against the 2021 device ("none" is the undisguised hello, which
# the device caught: §1.1). What evaded: a hello split over TCP segments, one padded past 1,500
# bytes, a scrambled packet of 101+ bytes first, a ChangeCipherSpec record ahead of the hello in
# the same segment, a trailing dot on the SNI. What did not: a single fake ClientHello first.
EXPECTED_2021: dict[str, Outcome] = {
    "none": "caught",
    "split": "evaded",
    "pad": "evaded",
    "scramble": "evaded",
    "ccs": "evaded",
    "dot": "evaded",
    "fake": "caught",
}
assert set(EXPECTED_2021) == set(EVASIONS)

DEFAULT_SCENARIOS = ("twitter-2021-03-10", "media-upload")
PROBE_PREFIX = "evasion-"
CONTROL_NAME = "evasion-control"
CONTROL_NAMES = ("example.org", "example.net", "control.example", "not-censored.test")
MIN_SIZE = 160 * 1024  # as twitter-2021-evasions: about 9 s at 130 kbit/s after the burst
THROTTLED_SECONDS = 8.0  # past burst and after_bytes, a throttled upload runs this long at the rate
BLOCK_TIMEOUT = 20.0  # seconds before a probe of a dropping rule is judged stalled
OWN_PROBES = ("command", "browser")  # a scenario's probes that join the matrix as rows of their own


def is_2021_device(model: Model) -> bool:
    """Whether the model inspects as the 2021 device of §1.5-7 does, in every knob a trick aims
    at: the SNI of TLS ClientHellos, no reassembly, the first packet only, giving up on an
    unparseable 101-byte packet, a trailing dot kept, inspection going on after a non-matching name.
    (A model that reads QUIC alone is no 2021 device, however its other knobs are set.)"""
    return ("tls" in model.name_sources and not model.reassemble and model.window_packets == 1
            and model.give_up_bytes == 101 and not model.strip_trailing_dot and model.inspect_after_name)


def rule_blocks(rule: Rule) -> bool:
    """Whether a flow the rule catches stalls or is reset (drop, rst, or a rate-0 freeze) rather
    than slowing down."""
    return rule.action in ("drop", "rst") or rule.rate <= 0


def outcome(verdict: str, cause: str, rule: Rule | None) -> Outcome | None:
    """The matrix cell of one probe: its runner verdict (throttled, normal, blocked, error) and
    cause (completed, timeout, reset, lab), read against the rule it was aimed at.

    evaded  the transfer ran at normal speed;
    caught  it was throttled, or it stalled or was reset the way its rule's action does (drop:
            a stall; rst: a reset or a stall; a rate-0 rule: a stall);
    broke   it failed for a reason the rule's action does not explain (a policed flow that was
            reset, or stalled until its timeout): the trick broke the connection.
    None    the lab failed (cause "lab"): no outcome at all; the caller must not read it as one.
    """
    if cause == CAUSE_LAB or verdict == "error":
        return None
    if verdict == "normal":
        return "evaded"
    if verdict == "throttled":
        return "caught"
    if verdict == "blocked" and rule is not None:
        if rule.action == "rst" and cause in (CAUSE_RESET, CAUSE_TIMEOUT):
            return "caught"
        if rule_blocks(rule) and cause == CAUSE_TIMEOUT:
            return "caught"
    return "broke"


def _unfit(rule: Rule) -> str:
    """Why the raw client's upload cannot trigger `rule` ("" when it can)."""
    if not rule.patterns:
        return "matches by address, not by name"
    if rule.action == "loss":
        return "drops packets at random, which slows nothing to evade"
    if rule.transport == "udp":
        return "is QUIC only"
    if rule.ech is True:
        return "needs an ECH extension"
    if rule.direction not in ("upload", "both"):
        return "limits downloads only"
    if rule.ports and SINK_PORT not in rule.ports:
        return f"is for ports {', '.join(map(str, rule.ports))}"
    return ""


def tls_rule(scenario: Scenario) -> Rule | None:
    """The first rule a TLS SNI over TCP triggers on uploads to the lab's sink port: what the raw
    client can test."""
    if "tls" not in scenario.model.name_sources:
        return None
    return next((rule for rule in scenario.rules if not _unfit(rule)), None)


def no_tls_rule(scenario: Scenario) -> str:
    """Why no rule of the scenario is one the built-in tricks can aim at."""
    if "tls" not in scenario.model.name_sources:
        why = "its model's name_sources has no tls"
    else:
        why = "; ".join(f"rule {rule.name} {_unfit(rule)}" for rule in scenario.rules) or "it has no rules"
    return (f"no rule of {scenario.name} is triggered by the SNI of a TLS ClientHello uploaded over TCP ({why}), "
            "so the built-in tricks have nothing to evade")


def _name_for(text: str) -> str | None:
    """A name a simple pattern matches (the caller checks it): `a.b` itself, `*.a.b` as `www.a.b`,
    `*a.b` and `*a.b*` as `a.b`, `a*` as `a.example`; None for other globs and regular expressions."""
    body = text.strip().lower()
    if body.startswith("re:"):
        return None
    core = body.strip("*")
    if not core or "*" in core:
        return None
    if body.endswith("*") and not body.startswith("*"):
        return core.rstrip(".") + ".example"
    return "www" + core if core.startswith(".") else core


def pick_host(scenario: Scenario, rule: Rule) -> str | None:
    """A name `rule` catches: the host of the scenario's own probe expected to be caught by it
    (an upload first), else one made from its patterns; None when neither works."""
    caught = ("blocked",) if rule_blocks(rule) else ("throttled",)
    own = sorted((p for p in scenario.probes if p.expect in caught and p.protocol in ("https", "tls", "http")
                  and p.sni is not False and probe_rule(scenario, p) is rule),
                 key=lambda p: (p.direction != "upload", p.address is not None, isinstance(p.sni, str)))
    names = [p.sni if isinstance(p.sni, str) else p.host for p in own]
    names += [n for n in (_name_for(p.text) for p in rule.patterns) if n]
    for name in names:
        if probe_rule(scenario, _tls_probe("x", name, "none", 1)) is rule:
            return name
    return None


def pick_control(scenario: Scenario) -> str:
    for name in CONTROL_NAMES:
        if probe_rule(scenario, _tls_probe("x", name, "none", 1)) is None:
            return name
    raise ThrottleError(f"{scenario.name}: its rules match every control name tried ({', '.join(CONTROL_NAMES)})")


def probe_size(rule: Rule) -> int:
    """Upload bytes for a trick probe: past the rule's after_bytes and burst, then long enough at
    its rate that a throttled transfer is far below a normal one (at least MIN_SIZE), in KB."""
    size = rule.after_bytes + rule.burst + rule.rate * THROTTLED_SECONDS
    return max(MIN_SIZE, 1024 * math.ceil(size / 1024))


def _tls_probe(name: str, host: str, evasion: Evasion, size: int, *, control: bool = False,
               timeout: float = 0.0) -> Probe:
    return Probe(name=name, host=host, direction="upload", size=size, protocol="tls",
                 evasion=evasion,
                 expect="normal" if control else "throttled", control=control, timeout=timeout)


@dataclass(frozen=True)
class Plan:
    """What the matrix runs for one scenario: the derived scenario, and why tricks are missing."""

    scenario: Scenario  # the original with the generated probes
    rule: Rule | None  # the rule the tricks aim at
    host: str | None
    size: int
    tricks: dict[str, str]  # row (trick name, or "command:NAME", "browser:NAME") -> probe name
    note: str = ""  # why the built-in tricks do not apply, when they do not

    @property
    def runnable(self) -> bool:
        return any(not p.control for p in self.scenario.probes)

    @property
    def isolate(self) -> bool:
        """Whether each probe needs a censor of its own: a sticky rule's mark (§2.20) would slow
        every probe after the first caught one, whatever its trick."""
        return any(rule.sticky > 0 for rule in self.scenario.rules)

    def runs(self) -> list[Scenario]:
        """The scenarios to run, one censor each: the whole plan at once, or (`isolate`) the
        controls with one probe at a time."""
        if not self.isolate:
            return [self.scenario]
        controls = tuple(p for p in self.scenario.probes if p.control)
        return [dataclasses.replace(self.scenario, probes=controls + (p,))
                for p in self.scenario.probes if not p.control]


def plan_scenario(scenario: Scenario) -> Plan:
    """The probes of `scenario`'s column: the built-in tricks (with a control) when a rule is
    triggered by a TLS SNI on uploads, plus the scenario's command and browser probes (with its controls)."""
    rule = tls_rule(scenario)
    host: str | None = None
    note = ""
    probes: list[Probe] = []
    tricks: dict[str, str] = {}
    size = 0
    if rule is None:
        note = no_tls_rule(scenario)
    else:
        host = pick_host(scenario, rule)
        if host is None:
            note = (f"rule {rule.name} of {scenario.name}: no probe of the scenario names a host it catches and "
                    "none could be made from its patterns, so the built-in tricks have no name to disguise")
    if rule is not None and host is not None:
        size = probe_size(rule)
        timeout = BLOCK_TIMEOUT if rule_blocks(rule) else 0.0
        probes.append(_tls_probe(CONTROL_NAME, pick_control(scenario), "none", size, control=True))
        for trick in EVASIONS:
            name = PROBE_PREFIX + trick
            probes.append(_tls_probe(name, host, trick, size, timeout=timeout))
            tricks[trick] = name
    commands = [p for p in scenario.probes if p.protocol in OWN_PROBES and not p.control]  # controls are no trick
    if commands:
        taken = {p.name for p in probes}
        for p in scenario.probes:
            if p.control and p.name not in taken:
                probes.append(p)
                taken.add(p.name)
        for p in commands:
            name = p.name if p.name not in taken else f"{p.protocol}-{p.name}"
            probes.append(dataclasses.replace(p, name=name))
            taken.add(name)
            tricks[f"{p.protocol}:{p.name}"] = name
    derived = dataclasses.replace(scenario, probes=tuple(probes))
    return Plan(derived, rule, host, size, tricks, note)


@dataclass
class Cell:
    """One trick against one model."""

    outcome: Outcome | None  # None: the lab failed (see `error`)
    verdict: str
    cause: str
    speed: float  # bytes/s
    completed: bool
    error: str = ""
    probe: str = ""
    expected: Outcome | None = None  # §1.7, for the 2021 device only

    @property
    def mismatch(self) -> bool:
        return self.expected is not None and self.outcome is not None and self.outcome != self.expected

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome, "verdict": self.verdict, "cause": self.cause,
            "speed_bytes_per_second": round(self.speed, 1), "completed": self.completed, "error": self.error,
            "probe": self.probe, "expected_2021": self.expected,
            "matches_2021": None if self.expected is None or self.outcome is None else not self.mismatch,
        }


@dataclass
class Column:
    """One model's results."""

    scenario: Scenario
    plan: Plan
    cells: dict[str, Cell] = field(default_factory=dict)  # row -> cell
    control_speed: float | None = None
    control_observed: str = ""
    rate: float = 0.0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def device_2021(self) -> bool:
        return is_2021_device(self.scenario.model)

    @property
    def lab_failures(self) -> list[str]:
        return [f"{self.scenario.name}: {row}: {c.error or 'the lab failed'}" for row, c in self.cells.items()
                if c.outcome is None]

    def to_json(self) -> dict[str, Any]:
        rule = self.plan.rule
        return {
            "scenario": self.scenario.name, "title": self.scenario.title, "path": self.scenario.path,
            "reassemble": self.scenario.model.reassemble, "device_2021": self.device_2021,
            "rule": rule.name if rule is not None else None, "action": rule.action if rule is not None else None,
            "host": self.plan.host, "size": self.plan.size or None,
            "rate_bytes_per_second": self.rate, "control_speed_bytes_per_second": self.control_speed,
            "control_observed": self.control_observed or None, "seconds": round(self.seconds, 3),
            "notes": ([self.plan.note] if self.plan.note else []) + self.notes,
        }


def expected_for(column: Column, row: str) -> Outcome | None:
    """§1.7's outcome of a built-in trick when the model is the 2021 device; none for command probes,
    other models, and a dot trick whose dotted name still matches a pattern (not §1.7's case)."""
    if not column.device_2021 or row not in EXPECTED_2021:
        return None
    rule, host = column.plan.rule, column.plan.host
    if row == "dot" and rule is not None and host is not None and rule.matches_name(host + "."):
        return None
    return EXPECTED_2021[row]


def build_column(scenario: Scenario, plan: Plan, report: RunReport | None) -> Column:
    """A model's cells from its run (None: nothing ran)."""
    column = Column(scenario, plan)
    if report is None:
        return column
    column.rate, column.control_speed, column.seconds = report.rate, report.control_speed, report.seconds
    by_name: dict[str, ProbeRun] = {r.probe.name: r for r in report.runs}
    for row, name in plan.tricks.items():
        run = by_name[name]
        rule = plan.rule if row in EVASIONS else probe_rule(plan.scenario, run.probe)
        column.cells[row] = Cell(outcome(run.observed, run.cause, rule), run.observed, run.cause, run.speed,
                                 run.completed, run.error, name)
        column.cells[row].expected = expected_for(column, row)
    controls = [r for r in report.runs if r.probe.control]
    for r in controls:
        if r.cause == CAUSE_LAB:
            column.cells.setdefault(f"control:{r.probe.name}", Cell(None, r.observed, r.cause, r.speed, r.completed,
                                                                     r.error, r.probe.name))
    column.control_observed = next((r.observed for r in controls if r.probe.name == CONTROL_NAME),
                                   controls[0].observed if controls else "")
    bad = [r for r in controls if r.cause != CAUSE_LAB and r.observed != "normal"]
    if bad:
        column.notes.append("control " + ", ".join(f"{r.probe.name} was {r.observed}" for r in bad)
                            + ": the speeds here are judged against a control the censor slowed")
    base = column.cells.get("none")
    if base is not None and base.outcome == "evaded":
        column.notes.append(f"the undisguised hello for {plan.host} was not caught, so no trick here had "
                            "anything to evade: 'evaded' means nothing in this column")
    if plan.isolate:
        column.notes.append("a rule is sticky (a caught flow marks the server address, §2.20), so each probe ran "
                            "with a censor of its own (and the controls again): no probe's mark slowed another")
    return column


@dataclass
class Matrix:
    columns: list[Column]

    @property
    def rows(self) -> list[str]:
        """The built-in tricks in their order, then every command probe."""
        rows: list[str] = list(EVASIONS)
        for c in self.columns:
            rows += [r for r in c.plan.tricks if r not in rows]
        return rows

    @property
    def lab_failures(self) -> list[str]:
        return [line for c in self.columns for line in c.lab_failures]

    @property
    def mismatches(self) -> list[str]:
        return [f"{c.scenario.name}: {row}: {cell.outcome}, but {SOURCE_2021} reports {cell.expected}"
                for c in self.columns for row, cell in c.cells.items() if cell.mismatch]

    def to_json(self) -> dict[str, Any]:
        return {
            "models": [c.to_json() for c in self.columns],
            "tricks": self.rows,
            "expected_2021": {"source": SOURCE_2021, "outcomes": dict(EXPECTED_2021)},
            "matrix": {row: {c.scenario.name: (c.cells[row].to_json() if row in c.cells else None)
                             for c in self.columns} for row in self.rows},
            "lab_failures": self.lab_failures,
            "mismatches_2021": self.mismatches,
        }


def merge_reports(reports: Sequence[RunReport]) -> RunReport:
    """One report of a plan run piecewise (`Plan.isolate`): the first run's controls, every run's
    other probes; the fastest control speed; the times added up."""
    first = reports[0]
    runs = [r for r in first.runs if r.probe.control]
    runs += [r for report in reports for r in report.runs if not r.probe.control]
    speeds = [report.control_speed for report in reports if report.control_speed is not None]
    return RunReport(first.scenario, first.path, runs, first.rate, max(speeds) if speeds else None, first.started,
                     sum(report.seconds for report in reports))


def run_matrix(scenarios: Sequence[Scenario], *, lab_name: str = "throttle",
               on_start: Callable[[Scenario, Plan], None] | None = None,
               on_update: Callable[[list[ProbeRun]], None] | None = None,
               on_phase: Callable[[str], None] | None = None, metrics_listen: str | None = None) -> Matrix:
    """Each scenario's plan run in one lab (brought up for the matrix unless it was up, and taken
    down afterwards then), one scenario after another, a censor started for each run; the matrix."""
    from throttle.lab.topology import Lab
    from throttle.measure.runner import run_scenario

    plans = [(scenario, plan_scenario(scenario)) for scenario in scenarios]
    phase = on_phase or (lambda text: None)
    lab = Lab(lab_name)
    was_up = False
    if any(plan.runnable for _, plan in plans):
        was_up = lab.status().up
        phase(f"reusing the running lab {lab_name}" if was_up else f"bringing the lab {lab_name} up")
        lab.up(sorted({p.host for _, plan in plans for p in plan.scenario.probes}))
    columns: list[Column] = []
    try:
        for scenario, plan in plans:
            if on_start is not None:
                on_start(scenario, plan)
            report = None
            if plan.runnable:
                parts = [run_scenario(part, lab_name=lab_name, on_update=on_update, on_phase=on_phase,
                                      metrics_listen=metrics_listen)
                         for part in plan.runs()]
                report = merge_reports(parts)
            columns.append(build_column(scenario, plan, report))
    finally:
        if not was_up and any(plan.runnable for _, plan in plans):
            phase(f"taking the lab {lab_name} down")
            lab.down()
    return Matrix(columns)
