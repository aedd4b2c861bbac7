"""`throttle evasions`: the evasion matrix, every built-in trick (and the scenarios' command probes)
against chosen censor models, in the lab (see `throttle.measure.evasions`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from throttle.cli.options import (complete_scenario, emit_json, json_option, lab_option, metrics_option,
                                  output_option)
from throttle.errors import ThrottleError
from throttle.extras import require
from throttle.scenario import Scenario, load_scenario
from throttle.scenario.library import find_scenario

if TYPE_CHECKING:
    from rich.table import Table

    from throttle.measure.evasions import Cell, Matrix


def load_all(names: list[str]) -> list[Scenario]:
    """The scenarios named (bundled names or files), each once, in the order given; the defaults
    when none is named."""
    from throttle.measure.evasions import DEFAULT_SCENARIOS

    out: list[Scenario] = []
    for name in names or list(DEFAULT_SCENARIOS):
        scen = load_scenario(find_scenario(name))
        if all(s.name != scen.name for s in out):
            out.append(scen)
    return out


def evasions(
    scenarios: Optional[list[str]] = typer.Argument(
        None, help="Censor models: bundled scenario names or TOML files (default: twitter-2021-03-10 media-upload).",
        show_default=False, metavar="[SCENARIO]...", autocompletion=complete_scenario),
    as_json: bool = json_option(),
    output: Optional[Path] = output_option(),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the matrix (trick x model, coloured by "
                                        "outcome, speed in each cell) into this PNG.", dir_okay=False),
    lab_name: str = lab_option(),
    metrics_listen: Optional[str] = metrics_option(),
) -> None:
    """Run every built-in ClientHello trick, and each scenario's command probes, against censor models.

    Prints the matrix trick x model: evaded (normal speed), caught (slowed, or stopped the way the
    rule's action stops flows) or broke (the connection failed otherwise), with the measured speed;
    for the 2021 device also what docs/incidents.md §1.7 reports, mismatches marked. Exit 1 when a
    cell of the 2021 device contradicts §1.7, 2 when the lab failed."""
    scens = load_all(list(scenarios or []))
    require("live", "throttle evasions")
    if plot is not None:
        require("plots", "throttle evasions --plot", ("matplotlib",))
    from throttle.cli.views import Progress, stderr_console, stdout_console
    from throttle.measure.evasions import Plan, run_matrix

    progress = Progress("throttle evasions")
    current = [""]  # the scenario running, for the phase lines

    def started(scen: Scenario, plan: Plan) -> None:
        current[0] = scen.name
        progress.title = f"{scen.name}: the evasion tricks"
        progress.runs = []
        if plan.note:
            progress.phase(f"{scen.name}: {plan.note}")
        if plan.runnable:
            progress.phase(f"{scen.name}: {len(plan.scenario.probes)} probes"
                           + (f", uploads of {plan.size // 1024} KB for {plan.host}" if plan.host else ""))
        else:
            progress.phase(f"{scen.name}: nothing to run")

    def phase(text: str) -> None:
        progress.phase(f"{current[0]}: {text}" if current[0] else text)

    with progress.shown():
        matrix = run_matrix(scens, lab_name=lab_name, on_start=started, on_update=progress.update, on_phase=phase,
                            metrics_listen=metrics_listen)
    out = stderr_console() if as_json else stdout_console()
    out.print(matrix_table(matrix))
    for line in matrix_notes(matrix):
        out.print(line, style="dim", highlight=False, markup=False)
    for line in matrix.mismatches:
        out.print(line, style="bold red", highlight=False, markup=False)
    if plot is not None:
        from throttle.measure.plots import plot_evasion_matrix

        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_evasion_matrix(plot, *plot_data(matrix))
        out.print(f"written: {plot}", style="dim", highlight=False)
    emit_json(matrix.to_json(), as_json, output)
    if matrix.lab_failures:  # the lab broke: those cells say nothing about the censor
        raise ThrottleError(f"lab {lab_name} failed, so these probes say nothing about the censor:\n  "
                            + "\n  ".join(matrix.lab_failures))
    raise typer.Exit(1 if matrix.mismatches else 0)


STYLES = {"evaded": "green", "caught": "red", "broke": "yellow"}


def cell_text(cell: Cell | None) -> str:
    """One cell as words: outcome and speed (or why it ended), and a §1.7 mismatch."""
    from throttle.units import format_rate

    if cell is None:
        return "-"
    if cell.outcome is None:
        return "LAB ERROR"
    how = format_rate(cell.speed) if cell.completed else (cell.cause or "failed")
    text = f"{cell.outcome} {how}"
    if cell.mismatch:
        text += f" ✗ (§1.7: {cell.expected})"
    return text


def matrix_table(matrix: Matrix) -> Table:
    from rich.table import Table
    from rich.text import Text

    from throttle.measure.evasions import EXPECTED_2021, SOURCE_2021

    table = Table(title="Evasion matrix: trick x censor model", title_justify="left")
    table.add_column("trick")
    for c in matrix.columns:
        kind = "2021 device" if c.device_2021 else "reassembles" if c.scenario.model.reassemble else "other model"
        table.add_column(f"{c.scenario.name}\n({kind})")
    show_expected = any(c.device_2021 for c in matrix.columns)
    if show_expected:
        table.add_column(f"2021 device per\n{SOURCE_2021}")
    for row in matrix.rows:
        cells: list[str | Text] = [row]
        for c in matrix.columns:
            cell = c.cells.get(row)
            if cell is None:
                cells.append(Text("n/a" if c.plan.note and row in EXPECTED_2021 else "-", style="dim"))
                continue
            style = "bold red" if cell.mismatch else STYLES.get(cell.outcome or "", "bold magenta")
            cells.append(Text(cell_text(cell), style=style))
        if show_expected:
            cells.append(EXPECTED_2021.get(row, "-"))
        table.add_row(*cells)
    return table


def matrix_notes(matrix: Matrix) -> list[str]:
    from throttle.units import format_rate

    lines = ["evaded = normal speed; caught = throttled (below 3 x the rule's rate and 10 x slower than the "
             "control), or stalled/reset as a drop or rst rule does; broke = the connection failed otherwise "
             "(a reset or a stall the rule's action does not explain). Read it against docs/incidents.md §1.7."]
    for c in matrix.columns:
        if c.plan.host and c.plan.rule is not None:
            control = format_rate(c.control_speed) if c.control_speed else "none"
            lines.append(f"{c.scenario.name}: rule {c.plan.rule.name} ({c.plan.rule.action}), {c.plan.size // 1024} KB "
                         f"uploads for {c.plan.host}; control {control}")
        for note in ([c.plan.note] if c.plan.note else []) + c.notes:
            lines.append(f"{c.scenario.name}: {note}")
    return lines


def plot_data(matrix: Matrix) -> tuple[list[str], list[str], dict[tuple[str, str], tuple[str, str, bool]]]:
    """The plot's plain data: rows, column titles, and (row, column) -> (outcome, label, mismatch)."""
    from throttle.units import format_rate

    columns = [c.scenario.name + ("\n(2021 device)" if c.device_2021 else "\n(reassembles)"
                                  if c.scenario.model.reassemble else "") for c in matrix.columns]
    cells: dict[tuple[str, str], tuple[str, str, bool]] = {}
    for c, title in zip(matrix.columns, columns):
        for row, cell in c.cells.items():
            if row not in matrix.rows:
                continue
            if cell.outcome is None:
                cells[(row, title)] = ("lab", "lab error", False)
                continue
            how = format_rate(cell.speed) if cell.completed else cell.cause
            label = f"{cell.outcome}\n{how}" + (f"\n§1.7: {cell.expected}" if cell.mismatch else "")
            cells[(row, title)] = (cell.outcome, label, cell.mismatch)
    return matrix.rows, columns, cells
