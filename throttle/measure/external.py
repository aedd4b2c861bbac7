"""`throttle run --external`: a scenario's probes from this machine, through a censor and to a lab
server that run elsewhere and are already up (the three-VM lab of docs/vm.md, scripts/vm-lab).

Nothing here builds a lab or starts a censor. `ExternalLab` is the small lab object the `Runner`
needs: commands run as they are (this machine is the lab's client), and the state folder a browser
probe reads the lab CA's files from. The lab server is the namespace lab's address (198.18.1.2 /
2001:2:0:2::2, as the Vagrantfile and scripts/vm-lab give it); the probes' clients name it
themselves, so this machine's resolver is only reported, not relied on. The lab CA: a PEM file or a
folder holding ca.pem (`--ca`), else this machine's trust store (the client VM trusts the lab CA).

The controls get no baseline with no censor: the censor is not this run's to stop, so a control is
judged against the rules' rate alone.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from throttle.errors import ThrottleError
from throttle.kernel.tools import require_tool
from throttle.lab.topology import SERVER_V4
from throttle.measure.clients import SINK_PORT
from throttle.measure.report import ProbeRun, RunReport
from throttle.measure.runner import Runner
from throttle.scenario import Scenario

__all__ = ["NO_BASELINE", "ExternalLab", "ExternalStatus", "lab_ca_file", "run_external"]

NO_BASELINE = ("--external: the controls have no no-censor baseline (the censor runs elsewhere and is not "
               "this run's to stop); they are judged against the rules' rate alone.")
SERVER_PORTS = (443, SINK_PORT)  # HTTPS (curl, HTTP/3's certificate) and the raw TLS clients' sink
ANSWER_TIMEOUT = 5.0  # seconds a lab server's port gets to accept a connection


def lab_ca_file(ca: Path) -> Path:
    """The lab CA's PEM: `ca` itself, or ca.pem in it when it is a folder (a lab's state folder)."""
    pem = ca / "ca.pem" if ca.is_dir() else ca
    try:
        text = pem.read_text(errors="replace")
    except OSError as exc:
        raise ThrottleError(f"--ca {ca}: cannot read {pem} ({exc.strerror})") from None
    if "BEGIN CERTIFICATE" not in text:
        raise ThrottleError(f"--ca {ca}: {pem} holds no PEM certificate")
    return pem


@dataclass(frozen=True, slots=True)
class ExternalStatus:
    """What this machine can tell of a lab it does not run."""

    server: str  # the address probed
    answering: tuple[int, ...]  # the server's ports that accepted a connection
    resolved: dict[str, list[str]]  # a probe's name -> what this machine's resolver answers
    ca: str  # where the lab CA is trusted from

    @property
    def up(self) -> bool:
        return set(SERVER_PORTS) <= set(self.answering)

    def describe(self) -> str:
        missing = [p for p in SERVER_PORTS if p not in self.answering]
        server = (f"the lab server {self.server} answers on {', '.join(map(str, self.answering))}" if not missing
                  else f"the lab server {self.server} does not answer on {', '.join(map(str, missing))}")
        names = "; ".join(f"{name} resolves to {', '.join(found) or 'nothing'}" for name, found in self.resolved.items())
        return f"{server}; {names or 'no names looked up'}; the lab CA from {self.ca}"

    def to_json(self) -> dict[str, Any]:
        return {"server": self.server, "answering_ports": list(self.answering), "resolved": self.resolved,
                "ca": self.ca, "baseline": False}


def _answers(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=ANSWER_TIMEOUT):
            return True
    except OSError:
        return False


def _resolve(name: str) -> list[str]:
    try:
        return sorted({str(info[4][0]) for info in socket.getaddrinfo(name, 443, proto=socket.IPPROTO_TCP)})
    except OSError:
        return []


class ExternalLab:
    """The lab object of `Runner` when this machine is the client of a lab that runs elsewhere."""

    name = "external"

    def __init__(self, state_dir: Path, ca: Path | None = None) -> None:
        self.state_dir = state_dir  # the probes' CA files (a browser's leaf key), when --ca is a lab's folder
        self.ca_file = lab_ca_file(ca) if ca is not None else None
        if ca is not None and ca.is_dir():
            self.state_dir = ca

    def exec_argv(self, role: str, argv: list[str]) -> list[str]:
        """`argv` as this machine runs it; with --ca, curl and the HTTP/3 client trust that CA."""
        if role != "client":
            raise ThrottleError(f"--external runs only the lab's client here, not its {role}")
        if self.ca_file is None:
            return list(argv)
        bundle = str(self.ca_file)
        return [require_tool("env", "coreutils"), f"CURL_CA_BUNDLE={bundle}", f"SSL_CERT_FILE={bundle}", *argv]

    def status(self, names: list[str] | tuple[str, ...] = ()) -> ExternalStatus:
        answering = tuple(p for p in SERVER_PORTS if _answers(SERVER_V4, p))
        ca = str(self.ca_file) if self.ca_file is not None else "this machine's trust store"
        return ExternalStatus(SERVER_V4, answering, {name: _resolve(name) for name in names}, ca)


def run_external(scenario: Scenario, *, ca: Path | None = None,
                 on_update: Callable[[list[ProbeRun]], None] | None = None,
                 on_phase: Callable[[str], None] | None = None) -> tuple[RunReport, ExternalStatus]:
    """The scenario's probes from here through a censor that runs elsewhere: its report, and what
    this machine saw of the lab before the probes. A lab server that does not answer, before or
    after, is an error (the probes would say nothing about the censor)."""
    if not scenario.probes:
        raise ThrottleError(f"{scenario.path}: no [[probe]] tables; `throttle run` needs traffic to try")
    phase = on_phase or (lambda text: None)
    names = sorted({p.host for p in scenario.probes})[:3]
    with tempfile.TemporaryDirectory(prefix="throttle-run-") as tmp:
        lab = ExternalLab(Path(tmp), ca)
        status = lab.status(names)
        phase(status.describe())
        if not status.up:
            raise ThrottleError(f"--external: {status.describe()}; is the lab (its server, and the censor's "
                                "forwarding) up?")
        phase("running the probes (through the censor of the lab, which this run does not start)")
        report = Runner(scenario, lab, Path(tmp), on_update).run()
        if not lab.status().up:
            raise ThrottleError(f"--external: the lab server {SERVER_V4} stopped answering during the run, so its "
                                "probes say nothing about the censor")
        return report, status
