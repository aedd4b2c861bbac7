"""`throttle run` and `throttle bench`: a scenario end to end in the lab, once or N times; `throttle run
--external`: its probes from here through a lab that runs elsewhere (`throttle.measure.external`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from throttle.cli.options import DEFAULT_LAB, emit_json, json_option, lab_option, output_option, pick_scenario
from throttle.cli.options import scenario_argument
from throttle.cli.options import metrics_option, scenario_option
from throttle.errors import ThrottleError
from throttle.extras import require
from throttle.scenario import Scenario

if TYPE_CHECKING:
    from throttle.measure.report import RunReport


def run(
    scenario: Optional[str] = scenario_argument(),
    json_file: Optional[str] = typer.Argument(None, hidden=True, show_default=False),
    scenario_opt: Optional[str] = scenario_option(),
    as_json: bool = json_option(),
    output: Optional[Path] = output_option(),
    keep: bool = typer.Option(False, "--keep", help="Leave the lab up afterwards."),
    lab_name: str = lab_option(),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also capture the run and write the figures of "
                                        "`throttle bench` (one repeat) to this folder."),
    metrics_listen: Optional[str] = metrics_option(),
    external: bool = typer.Option(False, "--external", help="This machine is the client of a lab that runs "
                                  "elsewhere (the three-VM lab, docs/vm.md): run the probes from here, through a "
                                  "censor and to the lab server 198.18.1.2 that are already up; no namespaces, no "
                                  "censor started, no lab up or down, and no no-censor baseline for the controls."),
    ca: Optional[Path] = typer.Option(None, "--ca", help="With --external: the lab CA, a PEM file or a folder "
                                      "holding ca.pem (default: this machine's trust store)."),
) -> None:
    """Run a scenario in the lab: censor on, every probe with real clients, judged by measured speed.

    `--json` prints the results on stdout (the table then goes to stderr); `-o FILE` writes them to
    FILE. `--json FILE`, the older spelling, is the same as `-o FILE`. `--external` runs the probes
    from this machine through a lab that runs elsewhere (the three-VM lab: scripts/vm-lab)."""
    if json_file is not None:  # `--json FILE`: a flag followed by what used to be its value
        if not as_json or output is not None:
            raise ThrottleError(f"unexpected argument {json_file}: one scenario per run (`-o FILE` writes JSON)")
        as_json, output = False, Path(json_file)
    scen = pick_scenario(scenario, scenario_opt)
    require("live", "throttle run")
    if external or ca is not None:
        if not external:
            raise ThrottleError("--ca goes with --external (the namespace lab has its own CA)")
        if keep or plot is not None or metrics_listen is not None or lab_name != DEFAULT_LAB:
            raise ThrottleError("--external starts no lab and no censor: --keep, --plot, --lab and "
                                "--metrics-listen do not apply")
        raise typer.Exit(run_external_cli(scen, ca, as_json, output))
    if plot is not None:
        require("plots", "throttle run --plot", ("matplotlib",))
        raise typer.Exit(run_bench(scen, 1, plot, lab_name, seed=None, keep=keep, as_json=as_json, output=output,
                                   metrics_listen=metrics_listen))
    from throttle.cli.views import Progress
    from throttle.measure.runner import run_scenario

    progress = Progress(f"{scen.name}: {scen.title}")
    progress.phase(f"{scen.name}: {len(scen.probes)} probes")
    with progress.shown():
        report = run_scenario(scen, lab_name=lab_name, keep=keep, on_update=progress.update, on_phase=progress.phase,
                              metrics_listen=metrics_listen)
    raise typer.Exit(show_report(report, report.to_json(), as_json, output, f"lab {lab_name}"))


def run_external_cli(scen: Scenario, ca: Optional[Path], as_json: bool, output: Optional[Path]) -> int:
    """`throttle run --external`: the probes from here through a lab that runs elsewhere."""
    from throttle.cli.views import Progress
    from throttle.measure.external import NO_BASELINE, run_external

    progress = Progress(f"{scen.name}: {scen.title}")
    progress.phase(f"{scen.name}: {len(scen.probes)} probes, from this machine through a lab that runs elsewhere")
    with progress.shown():
        report, status = run_external(scen, ca=ca, on_update=progress.update, on_phase=progress.phase)
    data = report.to_json()
    data["external"] = status.to_json()
    return show_report(report, data, as_json, output, "the external lab", NO_BASELINE)


def show_report(report: RunReport, data: dict[str, Any], as_json: bool, output: Optional[Path], lab: str,
                note: str = "") -> int:
    """The table, the failed checks and the footnote (stderr with --json), the JSON; the exit code."""
    from throttle.cli.views import check_failures, footnote, result_table, stderr_console, stdout_console

    out = stderr_console() if as_json else stdout_console()
    out.print(result_table(report))
    for line in check_failures(report):
        out.print(line, style="bold red", highlight=False, markup=False)
    out.print(footnote(report) + (f" {note}" if note else ""), style="dim", highlight=False)
    emit_json(data, as_json, output)
    if report.lab_failures:  # the lab broke: these probes say nothing about the censor
        raise ThrottleError(f"{lab} failed, so {report.scenario}'s probes below say nothing about the censor:\n  "
                            + "\n  ".join(report.lab_failures))
    return 0 if report.passed else 1


def bench(
    scenario: Optional[str] = scenario_argument(),
    scenario_opt: Optional[str] = scenario_option(),
    repeat: int = typer.Option(3, "--repeat", "-n", min=1, help="How many times to run every probe."),
    out: Path = typer.Option(Path("results"), "--out", help="Folder for results.json/.csv, summary.md and the PNGs."),
    as_json: bool = typer.Option(False, "--json", help="Also print results.json on stdout (the summary goes to stderr)."),
    keep: bool = typer.Option(False, "--keep", help="Leave the lab up afterwards."),
    lab_name: str = lab_option(),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed recorded for reproduction (random if not given)."),
    metrics_listen: Optional[str] = metrics_option(),
) -> None:
    """Run a scenario N times with captures on both sides of the censor; write results and plots."""
    scen = pick_scenario(scenario, scenario_opt)
    require("live", "throttle bench")
    require("plots", "throttle bench")
    raise typer.Exit(run_bench(scen, repeat, out, lab_name, seed, keep=keep, as_json=as_json,
                               metrics_listen=metrics_listen))


def run_bench(scen: Scenario, repeat: int, out: Path, lab_name: str, seed: int | None, *, keep: bool = False,
              as_json: bool = False, output: Path | None = None, metrics_listen: str | None = None) -> int:
    """The benchmark with a progress bar; prints the summary; the exit code (1: an expectation failed).

    With one repeat (`throttle run --plot`), `--json`/`-o` carry that run's report, as `run` writes
    it; with more (`throttle bench --json`), results.json."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from throttle.cli.views import stderr_console, stdout_console
    from throttle.measure.bench import bench as measure

    out.mkdir(parents=True, exist_ok=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} repeats"),
                  TimeElapsedColumn(), console=stderr_console()) as bar:
        task = bar.add_task(f"{scen.name}", total=repeat)

        def progress(done: int, total: int, text: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{scen.name}: {text}"[:90])

        result = measure(scen, repeat, out, lab_name=lab_name, progress=progress, seed=seed, keep=keep,
                         metrics_listen=metrics_listen)
    console = stderr_console() if as_json else stdout_console()
    console.print((out / "summary.md").read_text(), markup=False, highlight=False)
    console.print("written: " + ", ".join(str(p) for p in result.files.values()), style="dim", highlight=False)
    if repeat == 1 and result.reports:
        emit_json(result.reports[0].to_json(), as_json, output)
    else:
        emit_json(json.loads(result.files["results.json"].read_text()), as_json, output)
    return 0 if result.passed else 1
