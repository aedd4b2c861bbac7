"""`throttle lab up|down|status`: the namespace lab from the command line (registered in cli.py).

Errors become `throttle: <message>` on stderr and exit code 2, as everywhere in the command line.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from throttle.errors import ThrottleError

lab_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="The namespace lab: client, censor and server namespaces with HTTPS and DNS (needs root).",
)

NAME_HELP = "Lab name: namespaces NAME-client, NAME-censor, NAME-server."


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"throttle: {message}", err=True)
    return typer.Exit(code)


def _scenario_hosts(scenario: str) -> list[str]:
    """The names a scenario's probes will ask for (host, and an SNI that differs from it)."""
    from throttle.cli import find_scenario
    from throttle.scenario import load_scenario

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
    from throttle.lab import Lab

    try:
        hosts = _scenario_hosts(scenario) if scenario else []
        status = Lab(name).up(hosts)
    except ThrottleError as exc:
        raise _fail(str(exc)) from None
    typer.echo(format_status(status))


@lab_app.command()
def down(name: str = typer.Option("throttle", "--name", help=NAME_HELP)) -> None:
    """Remove the lab: its processes, namespaces, /etc/netns files and state directory."""
    from throttle.lab import Lab

    try:
        Lab(name).down()
    except ThrottleError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"lab {name} is down")


@lab_app.command()
def status(
    name: str = typer.Option("throttle", "--name", help=NAME_HELP),
    as_json: bool = typer.Option(False, "--json", help="The status as one JSON object."),
) -> None:
    """Show whether the lab is up, its addresses and its processes."""
    from throttle.lab import Lab

    try:
        st = Lab(name).status()
    except ThrottleError as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps(st, sort_keys=True) if as_json else format_status(st))


def format_status(st: dict[str, Any]) -> str:
    ns = st["namespaces"]
    procs = st["processes"]
    lines = [f"lab {st['name']}: {'up' if st['up'] else 'down'}"]
    for role in ("client", "censor", "server"):
        a = st["addresses"][role]
        ifaces = ", ".join(st["interfaces"][role])
        state = "" if ns[role]["exists"] else "  (missing)"
        lines.append(
            f"  {ns[role]['name']:<22} {', '.join(a['ipv4_all'] + a['ipv6_all'])}  [{ifaces}]{state}"
        )
    lines.append(f"  dns         {st['dns']}, {st['dns6']} (every name resolves to the server)")
    lines.append(f"  ca          {st['ca'] or '-'}")
    for proc in ("labserver", "dnsmasq"):
        pid = procs[proc]
        lines.append(f"  {proc:<11} {'pid ' + str(pid) if pid else 'not running'}")
    if st["up"]:
        client = ns["client"]["name"]
        lines.append(f"  try:        sudo ip netns exec {client} curl https://pbs.twimg.com/")
    return "\n".join(lines)
