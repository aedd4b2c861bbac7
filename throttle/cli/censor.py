"""`throttle censor`: the live censor in the foreground, in the lab or between two interfaces."""

from __future__ import annotations

from typing import Optional

import typer

from throttle.censor import DEFAULT_METRICS, run_censor
from throttle.lab.topology import CENSOR_CLIENT_IF, CENSOR_SERVER_IF
from throttle.scenario import load_scenario
from throttle.scenario.library import find_scenario

LAB_CENSOR = "throttle-censor"  # the default lab's censor namespace


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
        None, "--metrics-listen", help=f"Serve Prometheus metrics on ADDR:PORT (default {DEFAULT_METRICS}, reachable "
        "from the host even inside the lab), or off."),
    bypass: bool = typer.Option(
        True, "--bypass/--no-bypass", help="Hand decided flows back to the kernel (default), or keep every packet in "
        "Python (a benchmark baseline)."),
) -> None:
    """Run the censor live, in the foreground, until Ctrl-C (SIGINT) or SIGTERM.

    In the lab by default. On a real Linux router, name its interfaces instead (gateway mode):
    `throttle censor --scenario FILE --inside wlan0 --outside eth0` — rules only between those two,
    removed on exit."""
    scen = load_scenario(find_scenario(scenario))
    if netns is None and not (inside_if and outside_if):
        netns = LAB_CENSOR  # the lab's; gateway mode needs both interfaces named
    if netns is not None and netns.endswith("-censor"):  # a lab's censor namespace: its interface names
        inside_if = inside_if or CENSOR_CLIENT_IF
        outside_if = outside_if or CENSOR_SERVER_IF
    code = run_censor(scen, netns_name=netns, queue=queue, inside_if=inside_if, outside_if=outside_if,
                      quiet=quiet, bypass=bypass, metrics_listen=metrics_listen)
    raise typer.Exit(code)
