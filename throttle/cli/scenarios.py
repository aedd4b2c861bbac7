"""`throttle scenarios list|show|validate`: the bundled scenarios, and checking a scenario file."""

from __future__ import annotations

from pathlib import Path

import typer

from throttle.cli.output import format_table
from throttle.errors import ThrottleError
from throttle.scenario import load_scenario
from throttle.scenario.library import bundled, find_scenario
from throttle.units import format_rate, format_size

scenarios_app = typer.Typer(help="The bundled scenarios: list, show, validate.", no_args_is_help=True)


@scenarios_app.command("list")
def scenarios_list() -> None:
    """The bundled scenarios, one line each."""
    rows = []
    for path in bundled():
        try:
            s = load_scenario(path)
            rows.append([s.name, str(len(s.probes)), s.title])
        except ThrottleError as exc:
            rows.append([path.stem, "-", f"BROKEN: {exc}"])
    typer.echo(format_table(["name", "probes", "summary"], rows))


@scenarios_app.command("show")
def scenarios_show(name: str = typer.Argument(..., help="Bundled name or file.")) -> None:
    """One scenario: what it models, its sources, model, rules and probes."""
    s = load_scenario(find_scenario(name))
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
    s = load_scenario(path)
    typer.echo(f"{path}: ok ({s.name}: {len(s.rules)} rules, {len(s.probes)} probes)")
