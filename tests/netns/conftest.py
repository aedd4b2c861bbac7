"""Fixtures for the namespace tier: labs that are always taken down, and the censor as a child.

`shared_lab` is one lab per pytest worker, up for the whole run, for the modules that only use a
lab (run censors and probes in it and leave it as they found it); each such module starts with
`Lab.up()`, which repairs what an earlier one may have broken. Modules that take their lab down,
kill its servers or leave rules behind on purpose keep a lab of their own (`lab_session`).

These tests need root and the lab's tools. When they are missing the tests fail and say how to
fix it; they never skip, so a green run means the lab really works on this machine.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import pytest

from tests.conftest import lab_name

if TYPE_CHECKING:
    from throttle.lab.topology import Lab
    from throttle.measure.runner import CensorProcess

LAB_NAME = lab_name("labtest")  # never "throttle": that lab may be in use on this machine
SHARED_LAB = lab_name("shared")
SHARED_HOSTS = ("pbs.twimg.com", "example.org", "upload.twitter.com")
TOOLS = {"ip": "iproute2", "ethtool": "ethtool", "dnsmasq": "dnsmasq-base", "curl": "curl"}
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"


def require_lab_prerequisites() -> None:
    if os.geteuid() != 0:
        pytest.fail("the namespace tests need root: run them with sudo (e.g. sudo scripts/test)")
    missing = [pkg for tool, pkg in TOOLS.items() if not (shutil.which(tool) or shutil.which(tool, path=SBIN_PATH))]
    if missing:
        pytest.fail(f"tools for the namespace tests are missing: apt-get install {' '.join(missing)}")
    for module in ("pyroute2", "cryptography"):
        try:
            __import__(module)
        except ImportError:
            pytest.fail(f"the Python package {module} is missing: .venv/bin/pip install {module}")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """The `labtest` lab, up for the module; down afterwards whatever happened."""
    yield from lab_session(LAB_NAME, ["pbs.twimg.com"])


@pytest.fixture(scope="session")
def worker_lab() -> Iterator[Lab]:
    """This worker's shared lab, up until the end of the run (see the module docstring)."""
    yield from lab_session(SHARED_LAB, SHARED_HOSTS)


@pytest.fixture(scope="module")
def shared_lab(worker_lab: Lab) -> Iterator[Lab]:
    """The shared lab, repaired for the module that asks for it. A module that leaves a process
    behind in the client, censor or router namespace fails here, and the process is stopped: a
    client still running (a browser retrying, a probe past its test) would otherwise send its
    traffic through the next module's censor and change that module's counts."""
    from throttle.lab.topology import Link

    worker_lab.up(list(SHARED_HOSTS), Link())  # no delay: a module that set an RTT does not pass it on
    yield worker_lab
    left = leftovers(worker_lab)
    if left:
        from throttle import children

        children.stop(set(left), 5)
        pytest.fail("this module left processes in the shared lab (now stopped): "
                    + "; ".join(f"{pid} {cmd}" for pid, cmd in left.items()))


def leftovers(lab: Lab) -> dict[int, str]:
    """Processes in the lab's client, censor and router namespaces (the lab itself runs none
    there but the delay stage of a link with an RTT, which is the lab's own), with their command
    lines."""
    from throttle.lab import procs

    found = procs.pids_in({role: lab.ns(role) for role in ("client", "censor", "router")})
    out: dict[int, str] = {}
    for pid in sorted({p for pids in found.values() for p in pids} - {os.getpid()}):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                line = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
            if "throttle.lab.delay" not in line:
                out[pid] = line
        except OSError:
            continue  # gone already
    return out


@contextmanager
def running_censor(scenario: str, lab_name: str, *extra: str) -> Iterator[CensorProcess]:
    """`throttle censor` as a user runs it (`throttle run`'s own CensorProcess), in a lab's censor
    namespace, without metrics unless `extra` asks; stopped with SIGINT, and the test fails if that
    does not stop it within 15 s. After the block, `.tail` holds what it printed on the way out
    (its final counters)."""
    from throttle.measure.runner import CensorProcess

    censor = CensorProcess(scenario, f"{lab_name}-censor", "--metrics-listen", "off", *extra)
    censor.stop_timeout = 15
    with censor:
        yield censor
    if censor.killed:
        pytest.fail("the censor did not stop within 15 s of SIGINT")


def lab_session(name: str, hostnames: list[str] | tuple[str, ...] = ()) -> Iterator[Lab]:
    """Body of a module fixture: lab `name` up (after clearing an interrupted run's remains),
    yielded, and always taken down."""
    require_lab_prerequisites()
    from throttle.lab.topology import Lab

    lab = Lab(name)
    lab.down()
    try:
        lab.up(list(hostnames))
        yield lab
    finally:
        lab.down()
