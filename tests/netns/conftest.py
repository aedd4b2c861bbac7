"""Fixtures for the namespace tier: a `labtest` lab that is always taken down.

These tests need root and the lab's tools. When they are missing the tests fail and say how to
fix it; they never skip, so a green run means the lab really works on this machine.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Iterator

import pytest

if TYPE_CHECKING:
    from throttle.lab import Lab

LAB_NAME = "labtest"  # never "throttle": that lab may be in use on this machine
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
    from throttle.lab import Lab

    lab = Lab(LAB_NAME)
    lab.down()  # the remains of an interrupted earlier run
    try:
        lab.up(["pbs.twimg.com"])
        yield lab
    finally:
        lab.down()

