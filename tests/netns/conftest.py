"""Fixtures for the namespace tier: a `labtest` lab that is always taken down.

These tests need root and the lab's tools. When they are missing the tests fail and say how to
fix it; they never skip, so a green run means the lab really works on this machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

from tests.conftest import lab_name

if TYPE_CHECKING:
    from throttle.lab.topology import Lab

LAB_NAME = lab_name("labtest")  # never "throttle": that lab may be in use on this machine
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
    require_lab_prerequisites()
    from throttle.lab.topology import Lab

    lab = Lab(LAB_NAME)
    lab.down()  # the remains of an interrupted earlier run
    try:
        lab.up(["pbs.twimg.com"])
        yield lab
    finally:
        lab.down()


@contextmanager
def running_censor(scenario: str, lab_name: str, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """`throttle censor` as a user runs it, in a lab's censor namespace; stopped with SIGINT.

    After the block, `proc.tail` holds what it printed on the way out (its final counters)."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "throttle", "censor", "--scenario", scenario, "--netns", f"{lab_name}-censor",
         "--quiet", "--metrics-listen", "off", *extra],
        stderr=subprocess.PIPE, text=True, cwd=root,
    )
    try:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        assert "active in namespace" in line, line + proc.stderr.read()  # type: ignore[union-attr]
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail("the censor did not stop within 15 s of SIGINT")
        proc.tail = proc.stderr.read() if proc.stderr else ""  # type: ignore[attr-defined]


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
