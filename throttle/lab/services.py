"""The lab's services: in the server namespace dnsmasq (every name resolves to the server),
`throttle.lab.server` (HTTPS for any name, HTTP, the raw sink) and `throttle.lab.h3` (HTTP/3 on
UDP 443); in the router namespace, when the link is delayed and the kernel has no netem,
`throttle.lab.delay` (the delay stage, started and stopped with the link's values). Each is a daemon with a pid file and a log in the lab's state directory, so
a later process (`throttle lab status`, `lab down`, the next `lab up`) finds it again.

Starting one that runs is a no-op (unless the lab CA changed: the servers sign with it); before a
start, strays are stopped: a server of this kind in the namespace that its pid file does not name
(its pid file was lost, or it signs with a CA that no longer exists) holds the ports. The Python
servers are started with the running interpreter (`sys.executable`), which has throttle installed
and so imports this same package (the child inherits the environment, so an editable install's
finder or a PYTHONPATH works for it as for us); their pid file, written once every socket is
bound, is their ready signal. dnsmasq daemonises itself once it has bound its sockets, so its
start is a command run to its end, and ready once its pid file names a live process.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from throttle import children
from throttle.errors import ThrottleError
from throttle.lab import procs
from throttle.lab.layout import SERVER_ADDRESSES, SERVER_V4, SERVER_V6, namespace

START_TIMEOUT = 60.0  # a hang guard: a server that fails exits at once; an emulated VM is slow to start one


@dataclass(frozen=True, slots=True)
class Service:
    key: str  # its pid file is KEY.pid and its log KEY.log in the state directory
    what: str  # for messages
    module: Optional[str] = None  # a Python server: `python -m MODULE`
    role: str = "server"  # the namespace it runs in


LABSERVER = Service("labserver", "the lab server", "throttle.lab.server")
# The HTTP/3 server is a process of its own, so its pure-Python QUIC work never takes the GIL from
# the TCP servers' threads (a QUIC probe beside a curl control would slow both).
H3SERVER = Service("h3server", "the HTTP/3 server", "throttle.lab.h3")
DNSMASQ = Service("dnsmasq", "dnsmasq")
DELAY = Service("delay", "the delay stage", "throttle.lab.delay", role="router")
SERVICES = (LABSERVER, H3SERVER, DNSMASQ, DELAY)


class Services:
    """The services of lab `lab`, whose files are in `state_dir`."""

    def __init__(self, lab: str, state_dir: Path) -> None:
        self.lab = lab
        self.namespace = namespace(lab, "server")
        self.state_dir = state_dir

    def pid_file(self, service: Service) -> Path:
        return self.state_dir / f"{service.key}.pid"

    def log(self, service: Service) -> Path:
        return self.state_dir / f"{service.key}.log"

    def running(self, service: Service) -> Optional[int]:
        """The service's pid if its pid file names a live process in its namespace."""
        return procs.running_in(children.read_pid(self.pid_file(service)), namespace(self.lab, service.role))

    def start(self, ip: str, dnsmasq: str, hostnames: list[str], restart: bool) -> None:
        """Start whichever is not running; `restart`: the servers too (the CA changed).
        `hostnames` get their certificates at start."""
        self._start_dnsmasq(ip, dnsmasq)
        for service in (LABSERVER, H3SERVER):
            self._start_server(ip, service, hostnames, restart)

    @property
    def delay_status_file(self) -> Path:
        return self.state_dir / "delay.json"

    def start_delay(self, ip: str, one_way: float, jitter: float) -> None:
        """The delay stage with these values: left alone when it runs with them, else (re)started."""
        argv = [sys.executable, "-m", "throttle.lab.delay", "--delay", repr(one_way), "--jitter", repr(jitter),
                "--pid-file", str(self.pid_file(DELAY)), "--status-file", str(self.delay_status_file)]
        pid = self.running(DELAY)
        if pid is not None and procs.cmdline(pid)[-len(argv) + 1:] == argv[1:]:
            return
        self.stop_delay()
        children.start_daemon([ip, "netns", "exec", namespace(self.lab, DELAY.role), *argv], DELAY.what,
                              self.log(DELAY), pid_file=self.pid_file(DELAY), start_timeout=START_TIMEOUT)

    def stop_delay(self) -> None:
        """The delay stage stopped (it removes its rules on the way out), and any stray of it."""
        pids = {p for p in procs.pids_in({"router": namespace(self.lab, DELAY.role)})["router"]
                if "throttle.lab.delay" in procs.cmdline(p)}
        pid = self.running(DELAY)
        children.stop(pids | ({pid} if pid else set()) - {os.getpid()})
        self.pid_file(DELAY).unlink(missing_ok=True)
        self.delay_status_file.unlink(missing_ok=True)

    def orphans(self) -> set[int]:
        """Live services this lab started whose namespace is gone (unmounted behind our back):
        found through their pid files, and only if their command line names this lab's state
        directory, so that a reused pid is never taken for one."""
        found = set()
        for service in SERVICES:
            pid = children.read_pid(self.pid_file(service))
            if pid and children.alive(pid) and any(str(self.state_dir) in a for a in procs.cmdline(pid)):
                found.add(pid)
        return found

    def _start_dnsmasq(self, ip: str, dnsmasq: str) -> None:
        if self.running(DNSMASQ) is not None:
            return
        pid_file = self.pid_file(DNSMASQ)
        pid_file.unlink(missing_ok=True)
        self._stop_strays(lambda argv: bool(argv) and Path(argv[0]).name == "dnsmasq")
        argv = [
            ip, "netns", "exec", self.namespace, dnsmasq,
            "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--bind-interfaces",
            *(f"--listen-address={a}" for a in SERVER_ADDRESSES),
            f"--address=/#/{SERVER_V4}", f"--address=/#/{SERVER_V6}",
            f"--pid-file={pid_file}",
            f"--log-facility={self.log(DNSMASQ)}", "--log-queries",
        ]
        # dnsmasq reports bind errors and only then forks: exit 0 means it is answering.
        children.run(argv, "dnsmasq")
        deadline = time.monotonic() + START_TIMEOUT
        while self.running(DNSMASQ) is None:
            if time.monotonic() > deadline:
                raise ThrottleError(f"dnsmasq did not start; see {self.log(DNSMASQ)}")
            time.sleep(children.POLL)

    def _start_server(self, ip: str, service: Service, hostnames: list[str], restart: bool) -> None:
        assert service.module is not None
        module = service.module
        if not restart and self.running(service) is not None:
            return
        pid_file = self.pid_file(service)
        pid_file.unlink(missing_ok=True)
        self._stop_strays(lambda argv: module in argv)
        argv = [
            ip, "netns", "exec", self.namespace, sys.executable, "-m", module,
            "--ca-dir", str(self.state_dir), "--state-dir", str(self.state_dir),
            "--pid-file", str(pid_file),
            *(w for a in SERVER_ADDRESSES for w in ("--address", a)),
            *(w for h in hostnames for w in ("--name", h)),
        ]
        children.start_daemon(argv, service.what, self.log(service), pid_file=pid_file, start_timeout=START_TIMEOUT)

    def _stop_strays(self, match: Callable[[list[str]], bool]) -> None:
        """Stop processes in the server namespace that a start would duplicate but cannot track."""
        strays = {p for p in procs.pids_in({"server": self.namespace})["server"] if match(procs.cmdline(p))}
        strays.discard(os.getpid())
        children.stop(strays)
