"""`throttle evasions` without a lab: the probes it generates, the outcome of a verdict, the JSON."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from throttle.measure.evasions import (
    CONTROL_NAME,
    EXPECTED_2021,
    MIN_SIZE,
    Matrix,
    build_column,
    is_2021_device,
    outcome,
    plan_scenario,
    probe_size,
    tls_rule,
)
from throttle.measure.runner import ProbeRun, RunReport
from throttle.scenario import EVASIONS, Rule, Scenario, compile_pattern, load_scenario, probe_rule
from throttle.scenario.library import find_scenario


def scenario(name: str) -> Scenario:
    return load_scenario(find_scenario(name))


POLICE = Rule("r", action="police")
DROP = Rule("r", action="drop")
RST = Rule("r", action="rst")
FREEZE = Rule("r", action="police", rate=0.0)


@pytest.mark.parametrize(("verdict", "cause", "rule", "expected"), [
    ("normal", "completed", POLICE, "evaded"),
    ("throttled", "completed", POLICE, "caught"),
    ("blocked", "timeout", POLICE, "broke"),  # a policed flow does not stall
    ("blocked", "reset", POLICE, "broke"),
    ("blocked", "timeout", DROP, "caught"),
    ("blocked", "reset", DROP, "broke"),  # dropping does not reset
    ("blocked", "reset", RST, "caught"),
    ("blocked", "timeout", RST, "caught"),
    ("blocked", "timeout", FREEZE, "caught"),
    ("normal", "completed", DROP, "evaded"),
    ("blocked", "timeout", None, "broke"),  # a command probe no rule names
    ("error", "lab", POLICE, None),  # the lab failed: no outcome
    ("blocked", "lab", DROP, None),
])
def test_outcome(verdict: str, cause: str, rule: Rule | None, expected: str | None) -> None:
    assert outcome(verdict, cause, rule) == expected


def test_the_2021_plan_is_one_upload_per_trick_and_a_control() -> None:
    scen = scenario("twitter-2021-03-10")
    plan = plan_scenario(scen)
    assert plan.rule is not None and plan.rule.name == "twitter" and plan.host == "pbs.twimg.com"
    assert list(plan.tricks) == list(EVASIONS) and "none" in plan.tricks
    probes = {p.name: p for p in plan.scenario.probes}
    assert len(probes) == len(EVASIONS) + 1
    control = probes[CONTROL_NAME]
    assert control.control and control.protocol == "tls" and probe_rule(scen, control) is None
    for trick, name in plan.tricks.items():
        p = probes[name]
        assert (p.protocol, p.direction, p.evasion, p.host) == ("tls", "upload", trick, "pbs.twimg.com")
        assert not p.control
        assert probe_rule(scen, p) is plan.rule
        assert p.size == control.size == plan.size >= MIN_SIZE
    # the derived scenario keeps the censor: model, rules and the file the censor loads
    assert (plan.scenario.model, plan.scenario.rules, plan.scenario.path) == (scen.model, scen.rules, scen.path)
    assert is_2021_device(scen.model) and plan.runnable and not plan.note


def test_uploads_go_past_after_bytes_and_the_burst() -> None:
    scen = scenario("media-upload")
    plan = plan_scenario(scen)
    assert plan.rule is not None and plan.rule.after_bytes == 64 * 1024
    assert plan.host is not None and plan.rule.matches_name(plan.host)
    # 64 KB free, 16 KB of burst, then at least 8 s at 130 kbit/s
    assert plan.size >= 64 * 1024 + 16 * 1024 + 8 * plan.rule.rate
    assert not is_2021_device(scen.model) and scen.model.reassemble
    big = Rule("r", after_bytes=1 << 20, burst=16384, rate=16250.0)
    assert probe_size(big) >= (1 << 20) + 16384 + 8 * 16250 and probe_size(big) % 1024 == 0
    assert probe_size(Rule("r")) == MIN_SIZE


def test_a_host_is_made_from_the_patterns_when_no_probe_names_one() -> None:
    scen = dataclasses.replace(scenario("twitter-2021-03-10"), probes=())
    plan = plan_scenario(scen)
    assert plan.host is not None and plan.rule is not None and probe_rule(scen, plan.scenario.probes[1]) is plan.rule


@pytest.mark.parametrize("name", ["tele2-3g-shaper", "russia-2023-quic-sni", "ech-2024", "tcp-16-20-2025"])
def test_no_tls_triggered_rule_is_said_and_nothing_runs(name: str) -> None:
    plan = plan_scenario(scenario(name))
    assert tls_rule(scenario(name)) is None and plan.host is None and not plan.tricks
    assert "no rule" in plan.note and "SNI" in plan.note
    assert not plan.runnable


def test_a_rule_whose_host_no_pattern_yields_is_said() -> None:
    scen = scenario("twitter-2021-03-10")
    regex = dataclasses.replace(scen.rules[0], patterns=(compile_pattern("re:^pbs\\d+\\.x$"),))
    plan = plan_scenario(dataclasses.replace(scen, rules=(regex,), probes=()))
    assert plan.host is None and "no probe" in plan.note and not plan.runnable


def test_command_probes_join_with_the_scenarios_controls() -> None:
    scen = scenario("browser-chromium")
    plan = plan_scenario(scen)
    commands = [p for p in scen.probes if p.protocol == "command"]
    assert commands
    for p in commands:
        assert f"command:{p.name}" in plan.tricks
    names = [p.name for p in plan.scenario.probes]
    assert len(names) == len(set(names))
    own_controls = [p for p in scen.probes if p.control]
    assert all(p in plan.scenario.probes for p in own_controls)


def test_a_browser_over_http3_is_a_row_judged_by_its_quic_rule() -> None:
    # One row for the HTTP/3 browser download in both models; its controls (a browser among them)
    # are the reference, not rows; the QUIC-only first-datagram model is no 2021 device.
    row = "browser:video-download-chromium-h3"
    first, reassembling = scenario("browser-chromium-quic"), scenario("youtube-2024")
    for scen in (first, reassembling):
        plan = plan_scenario(scen)
        assert [r for r in plan.tricks if ":" in r] == [row]
        assert all(p in plan.scenario.probes for p in scen.probes if p.control)
        probe = next(p for p in plan.scenario.probes if p.name == plan.tricks[row])
        assert probe_rule(plan.scenario, probe) is scen.rules[-1] and scen.rules[-1].transport == "udp"
    assert not is_2021_device(first.model) and not plan_scenario(first).tricks.keys() & set(EVASIONS)
    results = {"browser-chromium-quic": {"video-download-chromium-h3": ("normal", "completed", 4e6)},
               "youtube-2024": {"video-download-chromium-h3": ("throttled", "completed", 61000.0)}}
    matrix = matrix_of("browser-chromium-quic", "youtube-2024", results=results)
    assert [c.cells[row].outcome for c in matrix.columns] == ["evaded", "caught"]
    assert not matrix.to_json()["models"][0]["device_2021"]


def fake_report(scen: Scenario, results: dict[str, tuple[str, str, float]]) -> RunReport:
    """A report as the runner returns it: probe name -> (observed, cause, speed bytes/s)."""
    runs = []
    for p in scen.probes:
        observed, cause, speed = results.get(p.name, ("normal", "completed", 5e6))
        run = ProbeRun(p, bytes=p.size if speed else 0, seconds=p.size / speed if speed else 9.0, done=True,
                       completed=cause == "completed",
                       observed=observed, cause=cause, error="" if cause == "completed" else f"{cause} happened")
        runs.append(run)
    return RunReport(scen.name, scen.path, runs, 16250.0, 5e6, 0.0, 12.0)


def matrix_of(*names: str, results: dict[str, dict[str, tuple[str, str, float]]]) -> Matrix:
    columns = []
    for name in names:
        scen = scenario(name)
        plan = plan_scenario(scen)
        columns.append(build_column(scen, plan, fake_report(plan.scenario, results.get(name, {}))))
    return Matrix(columns)


CAUGHT = ("throttled", "completed", 16000.0)


def test_the_json_shape_and_the_2021_expectations() -> None:
    results = {
        "twitter-2021-03-10": {"evasion-none": CAUGHT, "evasion-fake": CAUGHT,
                               "evasion-pad": ("blocked", "reset", 0.0)},
        "media-upload": {f"evasion-{t}": CAUGHT for t in EVASIONS if t != "scramble"},
    }
    matrix = matrix_of("twitter-2021-03-10", "media-upload", results=results)
    data = json.loads(json.dumps(matrix.to_json()))
    assert data["tricks"] == list(EVASIONS)
    assert [m["scenario"] for m in data["models"]] == ["twitter-2021-03-10", "media-upload"]
    assert data["models"][0]["device_2021"] and not data["models"][1]["device_2021"]
    assert data["models"][1]["reassemble"] and data["models"][1]["host"] == "pbs.twimg.com"
    assert data["expected_2021"]["outcomes"] == EXPECTED_2021 and "§1.7" in data["expected_2021"]["source"]
    old, new = "twitter-2021-03-10", "media-upload"
    cell = data["matrix"]["split"][old]
    assert set(cell) >= {"outcome", "verdict", "cause", "speed_bytes_per_second", "expected_2021", "matches_2021"}
    assert (cell["outcome"], cell["expected_2021"], cell["matches_2021"]) == ("evaded", "evaded", True)
    assert data["matrix"]["none"][old]["outcome"] == "caught"
    assert data["matrix"]["pad"][old]["outcome"] == "broke" and data["matrix"]["pad"][old]["matches_2021"] is False
    assert data["matrix"]["split"][new]["outcome"] == "caught" and data["matrix"]["split"][new]["expected_2021"] is None
    assert data["matrix"]["scramble"][new]["outcome"] == "evaded"
    assert data["mismatches_2021"] == [f"{old}: pad: broke, but docs/incidents.md §1.7 [CP] reports evaded"]
    assert data["lab_failures"] == []


def test_a_lab_failure_is_no_outcome() -> None:
    results = {"twitter-2021-03-10": {"evasion-none": CAUGHT, "evasion-fake": CAUGHT,
                                      "evasion-ccs": ("error", "lab", 0.0)}}
    matrix = matrix_of("twitter-2021-03-10", results=results)
    assert matrix.columns[0].cells["ccs"].outcome is None
    assert matrix.lab_failures == ["twitter-2021-03-10: ccs: lab happened"]
    assert not matrix.mismatches  # a lab failure contradicts nothing
    assert matrix.to_json()["matrix"]["ccs"]["twitter-2021-03-10"]["outcome"] is None


def test_a_failed_control_is_a_lab_failure_and_an_uncaught_baseline_is_noted() -> None:
    results = {"twitter-2021-03-10": {CONTROL_NAME: ("error", "lab", 0.0)}}
    matrix = matrix_of("twitter-2021-03-10", results=results)
    assert any(CONTROL_NAME in line for line in matrix.lab_failures)
    notes = matrix.columns[0].notes
    assert any("was not caught" in n for n in notes)


def test_the_table_marks_mismatches_and_the_plot_draws(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from throttle.cli.evasions import cell_text, matrix_table, plot_data
    from throttle.measure.plots import plot_evasion_matrix

    results = {"twitter-2021-03-10": {"evasion-none": CAUGHT, "evasion-fake": ("normal", "completed", 5e6)}}
    matrix = matrix_of("twitter-2021-03-10", "media-upload", results=results)
    fake = matrix.columns[0].cells["fake"]
    assert fake.mismatch and "✗ (§1.7: caught)" in cell_text(fake)
    assert cell_text(matrix.columns[0].cells["none"]) == "caught 128.0 kbit/s"
    table = matrix_table(matrix)
    assert len(table.columns) == 4  # trick, two models, §1.7
    rows, columns, cells = plot_data(matrix)
    assert rows == list(EVASIONS) and len(columns) == 2 and cells[("fake", columns[0])][2]
    out = tmp_path / "m.png"
    plot_evasion_matrix(out, rows, columns, cells)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_an_unknown_scenario_before_touching_anything() -> None:
    result = subprocess.run([sys.executable, "-m", "throttle", "evasions", "no-such-scenario", "--lab", "evmnone"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "no-such-scenario" in result.stderr


def test_own_probes_are_replaced() -> None:
    scen = scenario("twitter-2021-03-10")
    plan = plan_scenario(scen)
    assert not {p.name for p in scen.probes} & {p.name for p in plan.scenario.probes}


def test_cli_lists_models_it_cannot_test_with_the_reason_and_runs_nothing() -> None:
    result = subprocess.run([sys.executable, "-m", "throttle", "evasions", "ech-2024", "tele2-3g-shaper", "--lab",
                             "evmnone", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [m["scenario"] for m in data["models"]] == ["ech-2024", "tele2-3g-shaper"]
    assert "needs an ECH extension" in data["models"][0]["notes"][0]
    assert "matches by address" in data["models"][1]["notes"][0]
    assert all(cell is None for by in data["matrix"].values() for cell in by.values())
    assert "n/a" in result.stderr and "Evasion matrix" in result.stderr  # the table goes to stderr with --json


def test_a_sticky_model_runs_each_probe_with_a_censor_of_its_own() -> None:
    from throttle.measure.evasions import merge_reports

    scen = scenario("turkey-2022")
    plan = plan_scenario(scen)
    assert plan.isolate and any(r.sticky > 0 for r in scen.rules)
    parts = plan.runs()
    assert len(parts) == len(EVASIONS)
    for part, trick in zip(parts, EVASIONS):
        assert [p.name for p in part.probes] == [CONTROL_NAME, f"evasion-{trick}"]
        assert part.path == scen.path and part.rules == scen.rules
    reports = [fake_report(part, {f"evasion-{t}": CAUGHT} if t in ("none", "fake") else {})
               for part, t in zip(parts, EVASIONS)]
    merged = merge_reports(reports)
    assert [r.probe.name for r in merged.runs] == [CONTROL_NAME] + [f"evasion-{t}" for t in EVASIONS]
    column = build_column(scen, plan, merged)
    assert {t: c.outcome for t, c in column.cells.items()} == EXPECTED_2021
    assert any("censor of its own" in n for n in column.notes)
    whole = plan_scenario(scenario("twitter-2021-03-10"))
    assert not whole.isolate and whole.runs() == [whole.scenario]
