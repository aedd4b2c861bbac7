"""The options several commands share, so that one concept has one name everywhere.

- The lab: `--lab NAME` (namespaces NAME-client, NAME-censor, NAME-server; `--name` is kept as an
  alias for `throttle lab`).
- The scenario: `-s/--scenario NAME|FILE` in every command that takes one; where the scenario is
  what the command acts on (`run`, `bench`, `censor`, `scenarios show|validate`) it may also be
  given as the first argument. Bundled names complete in the shell.
- Output: `--json` prints JSON on stdout (one document); `-o FILE` writes it to FILE instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from throttle.errors import ThrottleError
from throttle.files import atomic_write
from throttle.scenario import Scenario, load_scenario
from throttle.scenario.library import find_scenario, names

DEFAULT_LAB = "throttle"
LAB_HELP = "Lab name: namespaces NAME-client, NAME-censor, NAME-server."
SCENARIO_HELP = "Scenario: a bundled name (see `throttle scenarios list`) or a TOML file."


def complete_scenario(incomplete: str) -> list[str]:
    """Shell completion: the bundled scenario names starting with what was typed."""
    return [n for n in names() if n.startswith(incomplete)]


def lab_option(*aliases: str) -> Any:
    return typer.Option(DEFAULT_LAB, "--lab", *aliases, help=LAB_HELP)


def scenario_argument() -> Any:
    return typer.Argument(None, help=SCENARIO_HELP, show_default=False, autocompletion=complete_scenario)


def scenario_option(default: Optional[str] = None) -> Any:
    return typer.Option(default, "--scenario", "-s", help=SCENARIO_HELP, autocompletion=complete_scenario)


def metrics_option() -> Any:
    return typer.Option(None, "--metrics-listen", metavar="ADDR:PORT|off",
                        help="Where the censor serves its Prometheus metrics and its live page (default "
                             "127.0.0.1:18130, where a busy port is only a warning), or off.")


def json_option() -> Any:
    return typer.Option(False, "--json", help="Print the result as one JSON document on stdout.")


def output_option() -> Any:
    return typer.Option(None, "--output", "-o", help="Write the JSON result to this file.", dir_okay=False)


def pick_scenario(positional: Optional[str], option: Optional[str]) -> Scenario:
    """The scenario given either way (not both), loaded."""
    if positional and option and positional != option:
        raise ThrottleError(f"two scenarios given ({positional} and --scenario {option}): give one")
    name = positional or option
    if not name:
        raise ThrottleError("which scenario? Name one, e.g. `twitter-2021-03-10` (`throttle scenarios list`)")
    return load_scenario(find_scenario(name))


def emit_json(data: Any, as_json: bool, output: Optional[Path]) -> None:
    """`--json`: the document on stdout; `-o FILE`: into FILE (and a note on stderr)."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if output is not None:
        atomic_write(output, text.encode())
        typer.echo(f"written: {output}", err=True)
    if as_json:
        typer.echo(text, nl=False)
