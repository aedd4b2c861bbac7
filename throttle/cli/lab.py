"""`throttle lab up|down|status|exec`: the namespace lab from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from throttle.children import call
from throttle.errors import ThrottleError
from throttle.cli.options import emit_json, json_option, lab_option, output_option, scenario_option
from throttle.extras import require
from throttle.lab.topology import ROLES, Lab, LabStatus
from throttle.scenario import load_scenario
from throttle.scenario.library import find_scenario

lab_app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="The namespace lab: client, censor, router and server namespaces with HTTPS, HTTP/3 and DNS (needs root).",
)

LAB_NEEDS = ("pyroute2", "cryptography")


def _lab(name: str) -> Lab:
    require("live", "throttle lab", LAB_NEEDS)
    return Lab(name)


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
    name: str = lab_option("--name"),
    scenario: Optional[str] = scenario_option(),
) -> None:
    """Create the lab, or repair it; running it again is harmless. With a scenario, its probe hosts
    get certificates at start."""
    hosts = _scenario_hosts(scenario) if scenario else []
    typer.echo(format_status(_lab(name).up(hosts)))


@lab_app.command()
def down(name: str = lab_option("--name")) -> None:
    """Remove the lab: its processes, namespaces, /etc/netns files and state directory."""
    _lab(name).down()
    typer.echo(f"lab {name} is down")


@lab_app.command()
def status(
    name: str = lab_option("--name"),
    as_json: bool = json_option(),
    output: Optional[Path] = output_option(),
) -> None:
    """Show whether the lab is up, its addresses and its processes."""
    st = _lab(name).status()
    emit_json(st.to_json(), as_json, output)
    if not as_json:
        typer.echo(format_status(st))


@lab_app.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
def exec_(
    command: List[str] = typer.Argument(..., help="The command and its arguments; put -- before it.",
                                        show_default=False),
    name: str = lab_option("--name"),
) -> None:
    """Run a command in the lab's client namespace, as the probes run: the lab's DNS (every name is
    the server) and its CA in the system bundle. Its exit status is passed through.

    Example: throttle lab exec --lab probetest -- curl -sS https://pbs.twimg.com/info"""
    lab = _lab(name)
    st = lab.status()
    if not st.roles["client"].exists:
        raise ThrottleError(f"lab {name} is down (no namespace {lab.ns('client')}); `throttle lab up --lab {name}` "
                            "brings it up")
    if not st.up:
        typer.echo(f"throttle: lab {name} is not whole (see `throttle lab status --lab {name}`); running anyway",
                   err=True)
    try:
        code = call(lab.exec_argv("client", command))
    except OSError as exc:
        raise ThrottleError(f"could not run {command[0]} in {lab.ns('client')}: {exc}") from None
    raise typer.Exit(code if code >= 0 else 128 - code)


def format_status(st: LabStatus) -> str:
    lines = [f"lab {st.name}: {'up' if st.up else 'down'}"]
    for role in ROLES:
        r = st.roles[role]
        state = "" if r.exists else "  (missing)"
        addresses = ", ".join(r.ipv4_all + r.ipv6_all) or "no address (an in-path bridge)"
        lines.append(f"  {r.namespace:<22} {addresses}  [{', '.join(r.interfaces)}]{state}")
    lines.append(f"  dns         {st.dns}, {st.dns6} (every name resolves to the server)")
    lines.append(f"  ca          {st.ca or '-'}")
    for proc, pid in (("labserver", st.labserver), ("h3server", st.h3server), ("dnsmasq", st.dnsmasq)):
        lines.append(f"  {proc:<11} {'pid ' + str(pid) if pid else 'not running'}")
    if st.up:
        lines.append(f"  try:        sudo ip netns exec {st.roles['client'].namespace} curl https://pbs.twimg.com/")
    return "\n".join(lines)
