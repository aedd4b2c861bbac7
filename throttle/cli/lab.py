"""`throttle lab up|down|status`: the namespace lab from the command line."""

from __future__ import annotations

import json
from typing import Optional

import typer

from throttle.lab.topology import ROLES, Lab, LabStatus
from throttle.scenario import load_scenario
from throttle.scenario.library import find_scenario

lab_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="The namespace lab: client, censor and server namespaces with HTTPS and DNS (needs root).",
)

NAME_HELP = "Lab name: namespaces NAME-client, NAME-censor, NAME-server."


def _scenario_hosts(scenario: str) -> list[str]:
    """The names a scenario's probes will ask for (host, and an SNI that differs from it)."""
    scen = load_scenario(find_scenario(scenario))
    hosts: list[str] = []
    for probe in scen.probes:
        for host in (probe.host, probe.sni if isinstance(probe.sni, str) else None):
            if host and host not in hosts:
                hosts.append(host)
    return hosts


@lab_app.command()
def up(
    name: str = typer.Option("throttle", "--name", help=NAME_HELP),
    scenario: Optional[str] = typer.Option(
        None, "--scenario", "-s", help="Scenario file or bundled name: its probe hosts get certificates at start."
    ),
) -> None:
    """Create the lab, or repair it; running it again is harmless."""
    hosts = _scenario_hosts(scenario) if scenario else []
    typer.echo(format_status(Lab(name).up(hosts)))


@lab_app.command()
def down(name: str = typer.Option("throttle", "--name", help=NAME_HELP)) -> None:
    """Remove the lab: its processes, namespaces, /etc/netns files and state directory."""
    Lab(name).down()
    typer.echo(f"lab {name} is down")


@lab_app.command()
def status(
    name: str = typer.Option("throttle", "--name", help=NAME_HELP),
    as_json: bool = typer.Option(False, "--json", help="The status as one JSON object."),
) -> None:
    """Show whether the lab is up, its addresses and its processes."""
    st = Lab(name).status()
    typer.echo(json.dumps(st.to_json(), sort_keys=True) if as_json else format_status(st))


def format_status(st: LabStatus) -> str:
    lines = [f"lab {st.name}: {'up' if st.up else 'down'}"]
    for role in ROLES:
        r = st.roles[role]
        state = "" if r.exists else "  (missing)"
        lines.append(f"  {r.namespace:<22} {', '.join(r.ipv4_all + r.ipv6_all)}  [{', '.join(r.interfaces)}]{state}")
    lines.append(f"  dns         {st.dns}, {st.dns6} (every name resolves to the server)")
    lines.append(f"  ca          {st.ca or '-'}")
    for proc, pid in (("labserver", st.labserver), ("dnsmasq", st.dnsmasq)):
        lines.append(f"  {proc:<11} {'pid ' + str(pid) if pid else 'not running'}")
    if st.up:
        lines.append(f"  try:        sudo ip netns exec {st.roles['client'].namespace} curl https://pbs.twimg.com/")
    return "\n".join(lines)
