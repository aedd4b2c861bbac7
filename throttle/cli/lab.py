"""`throttle lab up|down|status|exec`: the namespace lab from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from throttle.children import call
from throttle.errors import ThrottleError
from throttle.cli.options import emit_json, json_option, lab_option, output_option, scenario_option
from throttle.extras import require
from throttle.lab.topology import PATH_STAGE, ROLES, Lab, LabStatus, Link
from throttle.scenario import Scenario, load_scenario
from throttle.scenario.library import find_scenario
from throttle.units import format_rate, parse_duration, parse_rate

lab_app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="The namespace lab: client, censor, router and server namespaces with HTTPS, HTTP/3 and DNS (needs root).",
)

LAB_NEEDS = ("pyroute2", "cryptography")


def _lab(name: str) -> Lab:
    require("live", "throttle lab", LAB_NEEDS)
    return Lab(name)


def _scenario_hosts(scen: Scenario) -> list[str]:
    """The names a scenario's probes will ask for (host, and an SNI that differs from it)."""
    hosts: list[str] = []
    for probe in scen.probes:
        for host in (probe.host, probe.sni if isinstance(probe.sni, str) else None):
            if host and host not in hosts:
                hosts.append(host)
    return hosts


def _link(rtt: Optional[str], jitter: Optional[str], bottleneck: Optional[str], scen: Optional[Scenario]) -> Link:
    """The link asked for: each option given, else the scenario's value, else none."""
    values = [0.0 if scen is None else scen.rtt, 0.0 if scen is None else scen.jitter,
              0.0 if scen is None else scen.bottleneck]
    for i, (option, text, parse) in enumerate((("--rtt", rtt, parse_duration), ("--jitter", jitter, parse_duration),
                                               ("--bottleneck", bottleneck, parse_rate))):
        if text is not None:
            try:
                values[i] = parse(text)
            except ValueError as exc:
                raise ThrottleError(f"{option}: {exc}") from None
    try:
        return Link(*values)
    except ValueError as exc:
        raise ThrottleError(f"--rtt/--jitter/--bottleneck: {exc}") from None


@lab_app.command()
def up(
    name: str = lab_option("--name"),
    scenario: Optional[str] = scenario_option(),
    rtt: Optional[str] = typer.Option(None, "--rtt", help="Round-trip time the router adds, half each way "
                                      "(e.g. 50ms; default: the scenario's, else none)."),
    jitter: Optional[str] = typer.Option(None, "--jitter", help="How much a round trip varies, +- (e.g. 2ms); "
                                         "packets keep their order."),
    bottleneck: Optional[str] = typer.Option(None, "--bottleneck", help="A link of this rate each way, with 50 ms "
                                             "of queue (e.g. 5mbit): congestion no censor caused."),
) -> None:
    """Create the lab, or repair it; running it again is harmless. With a scenario, its probe hosts
    get certificates at start, and its rtt, jitter and bottleneck are the link's unless given here.
    Without either, the link has no delay (the lab's own RTT, about 0.1 ms)."""
    scen = load_scenario(find_scenario(scenario)) if scenario else None
    link = _link(rtt, jitter, bottleneck, scen)
    typer.echo(format_status(_lab(name).up(_scenario_hosts(scen) if scen else [], link)))


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
    lines.extend(format_link(st))
    if st.up:
        lines.append(f"  try:        sudo ip netns exec {st.roles['client'].namespace} curl https://pbs.twimg.com/")
    return "\n".join(lines)


def format_link(st: LabStatus) -> list[str]:
    """The router's link: delay, jitter, bottleneck, the path that delays, the stage's counts."""
    ln = st.link
    link = ln.link
    if not link.delayed and not link.bottleneck:
        return ["  link        no delay added (the lab's own RTT, about 0.1 ms), no bottleneck"]
    parts = []
    if link.delayed:
        jitter = f" +- {link.jitter * 1e3:g} ms" if link.jitter else ""
        parts.append(f"rtt {link.rtt * 1e3:g} ms{jitter} ({link.one_way * 1e3:g} ms each way, by {ln.path or '?'})")
    if link.bottleneck:
        parts.append(f"bottleneck {format_rate(link.bottleneck)} each way")
    lines = [f"  link        {', '.join(parts)}"]
    if ln.path == PATH_STAGE:
        c = ln.counts or {}
        if ln.stage is None:
            lines.append("  delay       not running: the router forwards nothing (`throttle lab up` starts it)")
        else:
            lines.append(f"  delay       pid {ln.stage}{' (not SCHED_FIFO)' if c.get('fifo') is False else ''}: "
                         f"{c.get('delayed', 0)} packets delayed, {c.get('late', 0)} released over 1 ms late "
                         f"(latest {c.get('max_late_ms', 0.0):.2f} ms), {c.get('queue_dropped', 0)} dropped "
                         f"with its queue full, {c.get('holding', 0)} held")
    return lines
