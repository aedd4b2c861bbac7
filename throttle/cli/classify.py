"""`throttle classify`: a capture through the censor engine offline, one row per flow."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import typer

from throttle.cli.output import format_table
from throttle.engine.offline import classify_file, iter_rows
from throttle.scenario import load_scenario
from throttle.scenario.library import DEFAULT_SCENARIO, find_scenario


def classify(
    capture: Path = typer.Argument(..., help="A pcap or pcapng file (tcpdump -w, tshark, Wireshark)."),
    scenario: str = typer.Option(DEFAULT_SCENARIO, "--scenario", "-s", help="Scenario file or bundled name."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per flow per line."),
    reassemble: Optional[bool] = typer.Option(
        None, "--reassemble/--no-reassemble",
        help="Override the scenario's model: reassemble split ClientHellos (a modern censor) or not (the 2021 device).",
    ),
) -> None:
    """Run a capture through the censor engine offline: one row per flow. No root needed."""
    scen = load_scenario(find_scenario(scenario))
    if reassemble is not None:
        scen = dataclasses.replace(scen, model=dataclasses.replace(scen.model, reassemble=reassemble))
    reports = classify_file(capture, scen)
    if as_json:
        for r in reports:
            typer.echo(json.dumps(r.to_json(), sort_keys=True))
        return
    header = ["client", "server", "proto", "name", "source", "rule", "verdict", "pkts", "effect"]
    typer.echo(format_table(header, list(iter_rows(reports))))
    limited = sum(r.verdict == "limited" for r in reports)
    typer.echo(f"\n{len(reports)} flows, {limited} limited under {scen.name} ({scen.path})")
