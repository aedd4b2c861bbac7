"""`throttle run` and `throttle bench`: a scenario end to end in the lab, once or N times."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from throttle.scenario import Scenario, load_scenario
from throttle.scenario.library import find_scenario


def run(
    scenario: str = typer.Argument(..., help="Scenario file or bundled name (see `throttle scenarios list`)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON to this file."),
    keep: bool = typer.Option(False, "--keep", help="Leave the lab up afterwards."),
    lab_name: str = typer.Option("throttle", "--lab", help="Name of the lab to use (namespaces NAME-client ...)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also capture the run and write the figures of "
                                        "`throttle bench` (one repeat) to this folder."),
) -> None:
    """Run a scenario in the lab: censor on, every probe with real clients, judged by measured speed."""
    scen = load_scenario(find_scenario(scenario))
    if plot is not None:
        raise typer.Exit(run_bench(scen, 1, plot, lab_name, seed=None))
    from throttle.cli.views import Progress, footnote, result_table, stdout_console
    from throttle.measure.runner import run_scenario

    progress = Progress(f"{scen.name}: {scen.title}")
    progress.phase(f"{scen.name}: {len(scen.probes)} probes")
    with progress.shown():
        report = run_scenario(scen, lab_name=lab_name, keep=keep, on_update=progress.update, on_phase=progress.phase)
    out = stdout_console()
    out.print(result_table(report))
    out.print(footnote(report), style="dim", highlight=False)
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        out.print(f"results written to {json_out}", style="dim")
    raise typer.Exit(0 if report.passed else 1)


def bench(
    scenario: str = typer.Argument(..., help="Scenario file or bundled name."),
    repeat: int = typer.Option(3, "--repeat", "-n", min=1, help="How many times to run every probe."),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Folder for results.json/.csv, summary.md and the PNGs."),
    lab_name: str = typer.Option("throttle", "--lab", help="Name of the lab to use."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed recorded for reproduction (random if not given)."),
) -> None:
    """Run a scenario N times with captures on both sides of the censor; write results and plots."""
    raise typer.Exit(run_bench(load_scenario(find_scenario(scenario)), repeat, out, lab_name, seed))


def run_bench(scen: Scenario, repeat: int, out: Path, lab_name: str, seed: int | None) -> int:
    """The benchmark with a progress bar; prints the summary; the exit code (1: an expectation failed)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from throttle.cli.views import stderr_console, stdout_console
    from throttle.measure.bench import bench as measure

    out.mkdir(parents=True, exist_ok=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} repeats"),
                  TimeElapsedColumn(), console=stderr_console()) as bar:
        task = bar.add_task(f"{scen.name}", total=repeat)

        def progress(done: int, total: int, text: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{scen.name}: {text}"[:90])

        result = measure(scen, repeat, out, lab_name=lab_name, progress=progress, seed=seed)
    console = stdout_console()
    console.print((out / "summary.md").read_text(), markup=False, highlight=False)
    console.print("written: " + ", ".join(str(p) for p in result.files.values()), style="dim", highlight=False)
    return 0 if result.passed else 1
