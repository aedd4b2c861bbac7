"""The command line: one typer app, one module per command group, and the one place where errors
become messages and exit codes.

Exit codes: 0 success, 1 an expectation failed, 2 bad input or a missing tool (the message says
which and how to fix it), 130 interrupted. Commands raise `ThrottleError`; `main` prints it as
`throttle: <message>` on stderr, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from throttle import __version__
from throttle.cli.censor import censor
from throttle.cli.classify import classify
from throttle.cli.demo import demo
from throttle.cli.lab import lab_app
from throttle.cli.run import bench, run
from throttle.cli.scenarios import scenarios_app
from throttle.errors import ThrottleError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="A lab simulator of selective throttling censorship (SNI-triggered slowdowns).",
)
app.command()(classify)
app.command()(censor)
app.command()(run)
app.command()(bench)
app.add_typer(scenarios_app, name="scenarios")
app.command()(demo)
app.add_typer(lab_app, name="lab")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"throttle {__version__}")


def main(argv: Optional[list[str]] = None) -> None:
    try:
        app(args=argv, prog_name="throttle")
    except ThrottleError as exc:
        typer.echo(f"throttle: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("throttle: interrupted", err=True)
        sys.exit(130)
