"""`throttle scenarios list|show|validate`: the bundled scenarios, and checking a scenario file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from throttle.cli.options import emit_json, json_option, output_option, pick_scenario, scenario_argument
from throttle.cli.options import scenario_option
from throttle.cli.output import format_table
from throttle.errors import ThrottleError
from throttle.scenario import load_scenario
from throttle.scenario.library import bundled
from throttle.units import format_rate, format_size

scenarios_app = typer.Typer(pretty_exceptions_enable=False, help="The bundled scenarios: list, show, validate.", no_args_is_help=True)


@scenarios_app.command("list")
def scenarios_list(as_json: bool = json_option(), output: Optional[Path] = output_option()) -> None:
    """The bundled scenarios, one line each."""
    rows = []
    for path in bundled():
        try:
            s = load_scenario(path)
            rows.append([s.name, str(len(s.probes)), s.title])
        except ThrottleError as exc:
            rows.append([path.stem, "-", f"BROKEN: {exc}"])
    if not rows:  # an install without its scenarios is broken, not empty
        raise ThrottleError("no bundled scenarios found in the package (throttle.scenarios): reinstall throttle-lab")
    emit_json([{"name": name, "probes": int(n) if n.isdigit() else None, "summary": summary}
               for name, n, summary in rows], as_json, output)
    if not as_json:
        typer.echo(format_table(["name", "probes", "summary"], rows))


@scenarios_app.command("show")
def scenarios_show(name: Optional[str] = scenario_argument(), scenario: Optional[str] = scenario_option()) -> None:
    """One scenario: what it models, its sources, model, rules and probes."""
    s = pick_scenario(name, scenario)
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
        what = ", ".join([p.text for p in r.patterns] + [str(a) for a in r.addresses]
                         + [f"QUIC version {v:#x}" for v in r.quic_versions])
        if r.transport != "any":
            what += f" over {r.transport}"
        if r.ech is not None:
            what += ", with ECH" if r.ech else ", without ECH"
        if r.allow:
            what += f", except to {', '.join(str(a) for a in r.allow)}"
        extra = f", after {format_size(r.after_bytes)}" if r.after_bytes else ""
        extra += f", sticky {r.sticky:.0f} s ({r.sticky_scope.replace('_', ' to ')})" if r.sticky else ""
        if r.meter == "window":
            extra += f", window meter ({format_size(r.burst)} per {r.burst / r.rate:.2f} s)"
        if r.action in ("drop", "rst", "loss"):
            how = {"drop": "drop", "rst": "RST both ways, then drop"}.get(r.action, f"lose {r.probability:.3g} of "
                                                                                     "packets at random")
            typer.echo(f"  {r.name}: {what} -> {how}, {r.direction}{extra}")
        else:
            typer.echo(f"  {r.name}: {what} -> {r.action} at {format_rate(r.rate)}, burst {format_size(r.burst)}, "
                       f"{r.direction}, per {r.scope}{extra}")
    typer.echo("\nprobes:")
    rows = [[p.name, p.host, p.direction, format_size(p.size), p.protocol + (f"/{p.evasion}" if p.evasion != "none" else ""),
             p.expect + (" (control)" if p.control else "")] for p in s.probes]
    typer.echo(format_table(["probe", "host", "direction", "size", "protocol", "expect"], rows))


@scenarios_app.command("validate")
def scenarios_validate(name: Optional[str] = scenario_argument(), scenario: Optional[str] = scenario_option()) -> None:
    """Check a scenario file (or a bundled one, by name) with the loader's own messages."""
    s = pick_scenario(name, scenario)
    typer.echo(f"{s.path}: ok ({s.name}: {len(s.rules)} rules, {len(s.probes)} probes)")
