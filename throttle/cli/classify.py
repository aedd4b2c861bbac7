"""`throttle classify`: captures through the censor engine offline, one row per flow."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import typer

from throttle.cli.options import emit_json, json_option, output_option, scenario_option
from throttle.cli.output import format_table
from throttle.engine.offline import classify_file, iter_rows
from throttle.scenario import load_scenario
from throttle.scenario.library import DEFAULT_SCENARIO, find_scenario

VERDICTS = ("limited: a rule matched and the flow was policed or shaped; passed: decided, no rule matched; "
            "inspecting: the capture ended while the censor was still reading the flow (e.g. a TCP handshake "
            "with no data yet, or a ClientHello split across segments that this model does not join)")


def classify(
    captures: list[Path] = typer.Argument(..., help="pcap or pcapng files (tcpdump -w, tshark, Wireshark).",
                                          show_default=False),
    scenario: str = scenario_option(DEFAULT_SCENARIO),
    as_json: bool = json_option(),
    output: Optional[Path] = output_option(),
    reassemble: Optional[bool] = typer.Option(
        None, "--reassemble/--no-reassemble",
        help="Override the scenario's model: reassemble split ClientHellos (a modern censor) or not (the 2021 device).",
    ),
) -> None:
    """Run captures through the censor engine offline: one row per flow. No root needed.

    Verdicts: limited, passed, or inspecting (the capture ended while the flow was still being read)."""
    scen = load_scenario(find_scenario(scenario))
    if reassemble is not None:
        scen = dataclasses.replace(scen, model=dataclasses.replace(scen.model, reassemble=reassemble))
    per_capture = [(capture, classify_file(capture, scen)) for capture in captures]  # all read before output
    if as_json or output is not None:
        flows: list[dict[str, Any]] = [{"capture": str(capture), **r.to_json()}
                                       for capture, reports in per_capture for r in reports]
        emit_json({"scenario": scen.name, "scenario_file": scen.path, "reassemble": scen.model.reassemble,
                   "captures": [str(c) for c in captures], "flows": flows}, as_json, output)
        if as_json:
            return
    header = ["client", "server", "proto", "name", "source", "rule", "verdict", "pkts", "effect"]
    total = limited = 0
    for i, (capture, reports) in enumerate(per_capture):
        if len(captures) > 1:
            typer.secho(("\n" if i else "") + str(capture), bold=True)
        typer.echo(format_table(header, list(iter_rows(reports))))
        total += len(reports)
        limited += sum(r.verdict == "limited" for r in reports)
    inspecting = sum(r.verdict == "inspecting" for _, reports in per_capture for r in reports)
    several = f" in {len(captures)} captures" if len(captures) > 1 else ""
    typer.echo(f"\n{total} flows, {limited} limited under {scen.name} ({scen.path}){several}")
    if inspecting:
        typer.echo(f"{inspecting} still inspecting: the capture ended before the censor decided (only a handshake, "
                   "or a ClientHello this model cannot read in one segment)")
