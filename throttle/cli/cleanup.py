"""`throttle cleanup`: remove what a killed censor left behind (its firewall rules)."""

from __future__ import annotations

from typing import Optional

import typer

from throttle.cli.options import LAB_HELP
from throttle.kernel import firewall, netns
from throttle.kernel.tools import require_root


def cleanup(
    lab_name: Optional[str] = typer.Option(None, "--lab", help=LAB_HELP + " Clean its censor namespace."),
    namespace: Optional[str] = typer.Option(None, "--netns", help="Clean this network namespace."),
) -> None:
    """Remove the firewall rules a killed censor left behind (needs root). Without options, in this
    machine's own namespace (gateway mode; what the systemd unit runs after the service stops).
    `throttle lab down` removes a whole lab, rules included."""
    if lab_name is not None and namespace is not None:
        raise typer.BadParameter("give --lab NAME or --netns NAMESPACE, not both")
    require_root("removing firewall rules needs root")
    where = f"{lab_name}-censor" if lab_name is not None else namespace
    removed = netns.run_in(where, firewall.cleanup) if where is not None else firewall.cleanup()
    typer.echo("removed: " + (", ".join(removed) if removed else "nothing (no throttle rules here)"))
