"""The command line: one typer app, one module per command group, and the one place where errors
become messages and exit codes.

Exit codes: 0 success, 1 an expectation failed, 2 bad input, a missing tool or a missing extra (the
message says which and how to fix it), 130 interrupted. Commands raise `ThrottleError`; `main`
prints it as `throttle: <message>` on stderr, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from throttle import __version__
from throttle.cli.censor import censor
from throttle.cli.classify import classify
from throttle.cli.cleanup import cleanup
from throttle.cli.demo import demo
from throttle.cli.evasions import evasions
from throttle.cli.infer import infer
from throttle.cli.kernel import kernel_app
from throttle.cli.lab import lab_app
from throttle.cli.run import bench, run
from throttle.cli.scenarios import scenarios_app
from throttle.errors import ThrottleError

HELP = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings=HELP,
    help="A lab simulator of selective throttling censorship (SNI-triggered slowdowns).",
)
app.command()(classify)
app.command()(censor)
app.command()(run)
app.command()(bench)
app.command()(evasions)
app.command()(infer)
app.add_typer(scenarios_app, name="scenarios", context_settings=HELP)
app.command()(demo)
app.add_typer(lab_app, name="lab", context_settings=HELP)
app.command()(cleanup)
app.add_typer(kernel_app, name="kernel", context_settings=HELP, hidden=True)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"throttle {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", "-V", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    """A lab simulator of selective throttling censorship (SNI-triggered slowdowns)."""


@app.command("version")
def version_command() -> None:
    """Print the version (as --version does)."""
    _print_version(True)


def main(argv: Optional[list[str]] = None) -> None:
    try:
        app(args=argv, prog_name="throttle")
    except ThrottleError as exc:
        typer.echo(f"throttle: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("throttle: interrupted", err=True)
        sys.exit(130)
