"""`throttle kernel build` (hidden; scripts/setup runs it): the eBPF program built beside its source,
its header first written from throttle/kernel/layout.py when that changed, the object checked
against the layout, and where it is printed."""

from __future__ import annotations

import typer

from throttle.kernel import libbpf

kernel_app = typer.Typer(no_args_is_help=True, help="Build the kernel's part of the censor (for scripts/setup).")


@kernel_app.command("build")
def build() -> None:
    """Write bpf/layout.h from layout.py if it changed, compile the eBPF program beside its source
    unless it is up to date, check it against the layout, and print its path."""
    typer.echo(f"built {libbpf.build()}")
