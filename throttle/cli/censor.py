"""`throttle censor`: the live censor in the foreground, in the lab or between two interfaces."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from throttle.censor import DEFAULT_METRICS, run_censor
from throttle.cli.options import LAB_HELP, pick_scenario, scenario_argument, scenario_option
from throttle.extras import require
from throttle.lab.topology import CENSOR_CLIENT_IF, CENSOR_SERVER_IF



def censor(
    scenario: Optional[str] = scenario_argument(),
    scenario_opt: Optional[str] = scenario_option(),
    lab_name: Optional[str] = typer.Option(None, "--lab", help=LAB_HELP + " Default: throttle, unless --netns, or "
                                           "--inside and --outside (gateway mode), say otherwise."),
    netns: Optional[str] = typer.Option(
        None, "--netns", help="Run in this network namespace instead of a lab's NAME-censor."),
    queue: int = typer.Option(0, "--queue", help="Netfilter queue number."),
    inside_if: Optional[str] = typer.Option(
        None, "--inside", "--inside-if", help="Interface of the censored side; connections opened from it are eligible "
        "(incidents §4). In the lab: to-client."),
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
    `throttle censor twitter-2021-03-10 --inside wlan0 --outside eth0` — rules only between those
    two, removed on exit."""
    scen = pick_scenario(scenario, scenario_opt)
    require("live", "throttle censor", ("netfilterqueue", "pyroute2"))
    if metrics_listen != "off":
        require("live", "throttle censor's metrics (--metrics-listen off runs without)", ("prometheus_client",))
    if lab_name is not None and netns is not None:
        raise typer.BadParameter("give --lab NAME or --netns NAMESPACE, not both")
    if lab_name is not None:
        netns = f"{lab_name}-censor"
    elif netns is None and not (inside_if and outside_if):
        netns = "throttle-censor"  # the default lab's; gateway mode needs both interfaces named
    if netns is not None and netns.endswith("-censor"):  # a lab's censor namespace: its interface names
        inside_if = inside_if or CENSOR_CLIENT_IF
        outside_if = outside_if or CENSOR_SERVER_IF
    code = run_censor(scen, netns_name=netns, queue=queue, inside_if=inside_if, outside_if=outside_if, say=say,
                      quiet=quiet, bypass=bypass, metrics_listen=metrics_listen)
    raise typer.Exit(code)


def say(text: str) -> None:
    """One line of the running censor's, on stderr at once (a test, or systemd, reads it live)."""
    print(f"throttle censor: {text}", file=sys.stderr, flush=True)
