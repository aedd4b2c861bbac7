"""The command line. The only place errors become messages and exit codes.

Exit codes: 0 success, 1 an expectation failed, 2 bad input or a missing tool (the message says
which and how to fix it), 130 interrupted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from throttle import __version__
from throttle.errors import ThrottleError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="A lab simulator of selective throttling censorship (SNI-triggered slowdowns).",
)

SCENARIO_DIRS = (Path(__file__).resolve().parent.parent / "scenarios", Path(__file__).resolve().parent / "scenarios")
DEFAULT_SCENARIO = "twitter-2021-03-10"


def find_scenario(name_or_path: str) -> Path:
    """A scenario file by path, or a bundled one by name (`twitter-2021-03-10`)."""
    p = Path(name_or_path)
    if p.exists() or p.suffix == ".toml" or "/" in name_or_path:
        return p
    for d in SCENARIO_DIRS:
        candidate = d / f"{name_or_path}.toml"
        if candidate.exists():
            return candidate
    raise ThrottleError(f"{name_or_path}: no such scenario file or bundled scenario name")


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"throttle: {message}", err=True)
    return typer.Exit(code)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


@app.command()
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
    import dataclasses

    from throttle.classify import classify_file, iter_rows
    from throttle.scenario import load_scenario

    try:
        scen = load_scenario(find_scenario(scenario))
        if reassemble is not None:
            scen = dataclasses.replace(scen, model=dataclasses.replace(scen.model, reassemble=reassemble))
        reports = classify_file(capture, scen)
    except ThrottleError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        for r in reports:
            typer.echo(json.dumps(r.to_json(), sort_keys=True))
        return
    header = ["client", "server", "proto", "name", "source", "rule", "verdict", "pkts", "effect"]
    typer.echo(format_table(header, list(iter_rows(reports))))
    limited = sum(r.verdict == "limited" for r in reports)
    typer.echo(f"\n{len(reports)} flows, {limited} limited under {scen.name} ({scen.path})")


@app.command()
def censor(
    scenario: str = typer.Option(..., "--scenario", "-s", help="Scenario file or bundled name."),
    netns: Optional[str] = typer.Option(
        None, "--netns", help="Network namespace to run in. Default: the lab's throttle-censor, unless --inside and "
        "--outside name interfaces of this machine (gateway mode)."),
    queue: int = typer.Option(0, "--queue", help="Netfilter queue number."),
    inside_if: Optional[str] = typer.Option(
        None, "--inside", "--inside-if", help="Interface of the censored side; connections opened from it are eligible "
        "(censor-behaviors §4). In the lab: to-client."),
    outside_if: Optional[str] = typer.Option(
        None, "--outside", "--outside-if", help="Interface towards the servers. In the lab: to-server."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No periodic counters."),
    metrics_listen: Optional[str] = typer.Option(
        None, "--metrics-listen", help="Serve Prometheus metrics on ADDR:PORT (default 127.0.0.1:9464, reachable from "
        "the host even inside the lab), or off."),
    bypass: bool = typer.Option(
        True, "--bypass/--no-bypass", help="Hand decided flows back to the kernel (default), or keep every packet in Python (a benchmark baseline)."),
) -> None:
    """Run the censor live, in the foreground, until Ctrl-C (SIGINT) or SIGTERM.

    In the lab by default. On a real Linux router, name its interfaces instead (gateway mode):
    `throttle censor --scenario FILE --inside wlan0 --outside eth0` — rules only between those two,
    removed on exit."""
    from throttle.hook import run_censor
    from throttle.scenario import load_scenario

    try:
        scen = load_scenario(find_scenario(scenario))
        if netns is None and not (inside_if and outside_if):
            netns = "throttle-censor"  # the lab's; gateway mode needs both interfaces named
        if netns is not None and netns.endswith("-censor"):  # the lab's interface names (throttle.lab)
            inside_if = inside_if or "to-client"
            outside_if = outside_if or "to-server"
        code = run_censor(scen, netns=netns, queue=queue, inside_if=inside_if, outside_if=outside_if,
                          quiet=quiet, bypass=bypass, metrics_listen=metrics_listen)
    except ThrottleError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


@app.command()
def run(
    scenario: str = typer.Argument(..., help="Scenario file or bundled name (see `throttle scenarios list`)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON to this file."),
    keep: bool = typer.Option(False, "--keep", help="Leave the lab up afterwards."),
    lab_name: str = typer.Option("throttle", "--lab", help="Name of the lab to use (namespaces NAME-client ...)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also capture the run and write the figures of "
                                        "`throttle bench` (one repeat) to this folder."),
) -> None:
    """Run a scenario in the lab: censor on, every probe with real clients, judged by measured speed."""
    if plot is not None:
        bench(scenario, repeat=1, out=plot, lab_name=lab_name)
        return
    from throttle.runner import run_scenario
    from throttle.scenario import load_scenario
    from throttle.views import Progress, footnote, result_table, stdout_console

    try:
        scen = load_scenario(find_scenario(scenario))
        progress = Progress(f"{scen.name}: {scen.title}")
        progress.phase(f"{scen.name}: {len(scen.probes)} probes")
        with progress.shown():
            report = run_scenario(scen, lab_name=lab_name, keep=keep, on_update=progress.update, on_phase=progress.phase)
    except ThrottleError as exc:
        raise _fail(str(exc)) from None
    out = stdout_console()
    out.print(result_table(report))
    out.print(footnote(report), style="dim", highlight=False)
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        out.print(f"results written to {json_out}", style="dim")
    raise typer.Exit(0 if report.passed else 1)


@app.command()
def bench(
    scenario: str = typer.Argument(..., help="Scenario file or bundled name."),
    repeat: int = typer.Option(3, "--repeat", "-n", min=1, help="How many times to run every probe."),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Folder for results.json/.csv, summary.md and the PNGs."),
    lab_name: str = typer.Option("throttle", "--lab", help="Name of the lab to use."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed recorded for reproduction (random if not given)."),
) -> None:
    """Run a scenario N times with captures on both sides of the censor; write results and plots."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from throttle.benchrun import bench as run_bench
    from throttle.scenario import load_scenario
    from throttle.views import stderr_console, stdout_console

    try:
        scen = load_scenario(find_scenario(scenario))
        out.mkdir(parents=True, exist_ok=True)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} repeats"),
                      TimeElapsedColumn(), console=stderr_console()) as bar:
            task = bar.add_task(f"{scen.name}", total=repeat)

            def progress(done: int, total: int, text: str) -> None:
                bar.update(task, completed=done, total=total, description=f"{scen.name}: {text}"[:90])

            result = run_bench(scen, repeat, out, lab_name=lab_name, progress=progress, seed=seed)
    except ThrottleError as exc:
        raise _fail(str(exc)) from None
    console = stdout_console()
    console.print((out / "summary.md").read_text(), markup=False, highlight=False)
    console.print("written: " + ", ".join(str(p) for p in result.files.values()), style="dim", highlight=False)
    raise typer.Exit(0 if result.passed else 1)


scenarios_app = typer.Typer(help="The bundled scenarios: list, show, validate.", no_args_is_help=True)
app.add_typer(scenarios_app, name="scenarios")


@scenarios_app.command("list")
def scenarios_list() -> None:
    """The bundled scenarios, one line each."""
    from throttle.scenario import load_scenario

    rows = []
    for d in SCENARIO_DIRS:
        for path in sorted(d.glob("*.toml")):
            try:
                s = load_scenario(path)
                rows.append([s.name, str(len(s.probes)), s.title])
            except ThrottleError as exc:
                rows.append([path.stem, "-", f"BROKEN: {exc}"])
    typer.echo(format_table(["name", "probes", "summary"], rows))


@scenarios_app.command("show")
def scenarios_show(name: str = typer.Argument(..., help="Bundled name or file.")) -> None:
    """One scenario: what it models, its sources, model, rules and probes."""
    from throttle.scenario import load_scenario
    from throttle.units import format_rate, format_size

    try:
        s = load_scenario(find_scenario(name))
    except ThrottleError as exc:
        raise _fail(str(exc)) from None
    typer.secho(f"{s.name}: {s.title}", bold=True)
    typer.echo(f"file: {s.path}\n")
    if s.description:
        typer.echo(s.description.strip() + "\n")
    typer.echo("sources:")
    for src in s.sources:
        typer.echo(f"  - {src}")
    m = s.model
    typer.echo(f"\nmodel: {'reassembling' if m.reassemble else 'no reassembly (2021 device)'}, window "
               f"{m.window_packets}+{m.window_extension} packets, give up at {m.give_up_bytes} B, names from "
               f"{', '.join(m.name_sources)}, idle timeout {m.idle_timeout:.0f} s")
    typer.echo("\nrules:")
    for r in s.rules:
        what = ", ".join([p.text for p in r.patterns] + [str(a) for a in r.addresses])
        extra = f", after {format_size(r.after_bytes)}" if r.after_bytes else ""
        extra += f", sticky {r.sticky:.0f} s" if r.sticky else ""
        typer.echo(f"  {r.name}: {what} -> {r.action} at {format_rate(r.rate)}, burst {format_size(r.burst)}, "
                   f"{r.direction}, per {r.scope}{extra}")
    typer.echo("\nprobes:")
    rows = [[p.name, p.host, p.direction, format_size(p.size), p.protocol + (f"/{p.evasion}" if p.evasion != "none" else ""),
             p.expect + (" (control)" if p.control else "")] for p in s.probes]
    typer.echo(format_table(["probe", "host", "direction", "size", "protocol", "expect"], rows))


@scenarios_app.command("validate")
def scenarios_validate(path: Path = typer.Argument(..., help="A scenario file.")) -> None:
    """Check a scenario file with the loader's own messages."""
    from throttle.scenario import load_scenario

    try:
        s = load_scenario(path)
    except ThrottleError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{path}: ok ({s.name}: {len(s.rules)} rules, {len(s.probes)} probes)")


@app.command()
def demo(
    offline: bool = typer.Option(False, "--offline", help="No lab, no root: classify a bundled capture instead."),
) -> None:
    """The demonstration: Twitter slowed live in the lab, about a minute (needs root)."""
    from throttle.demo import run_demo, run_live_demo

    try:
        code = run_demo() if offline else run_live_demo()
    except ThrottleError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


def _register_lab() -> None:
    from throttle.cli_lab import lab_app

    app.add_typer(lab_app, name="lab")


_register_lab()


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"throttle {__version__}")


def main(argv: Optional[list[str]] = None) -> None:
    try:
        app(args=argv, prog_name="throttle")
    except KeyboardInterrupt:
        typer.echo("throttle: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
