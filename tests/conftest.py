"""What both tiers share: where the repository and its bundled scenarios are, and the names of the
labs the namespace tests make.

`THROTTLE_TEST_LAB_PREFIX` (default empty) is put before every test lab's name, so that two
checkouts can run their namespace tests on one machine at once without taking each other's labs
down (`THROTTLE_TEST_LAB_PREFIX=a- scripts/test tests/netns/test_censor.py`). Under pytest-xdist
(`scripts/test` runs the suite on several workers) each worker's labs also carry its number.

Scheduling (`pytest_xdist_make_scheduler` below): a test module runs whole on one worker (its
module fixtures, its order: some unit modules check at their end what their earlier tests did),
except the tests named in SPREAD, each of which may run on any worker, in that worker's own lab
(`throttle run` of one bundled scenario, or of one with its rates doubled or halved). The longest
modules are handed out first, so that they do not start last and finish alone.

Time bounds that guard against hangs stretch on a slow machine (`tests/pace.py`, measured here
once, before the workers start, and printed in the header).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests import pace

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"
VECTORS = ROOT / "tests" / "vectors"
LAB_PREFIX = os.environ.get("THROTTLE_TEST_LAB_PREFIX", "")
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1" ... under pytest-xdist
# Namespace tests that each may run on any worker (by test id, parameters left out).
SPREAD = ("tests/netns/test_run.py::test_bundled_scenario_meets_its_expectations",
          "tests/netns/test_verdicts.py::test_mutated_scenario_fails")
# Namespace test modules by how long they take (longest first); the others follow in file order.
LONG_FIRST = ("test_soak.py", "test_infer_bench.py", "test_run.py", "test_censor.py", "test_counting.py",
              "test_signal.py", "test_fastpath.py", "test_evasions_matrix.py", "test_bench.py", "test_metrics.py",
              "test_gateway.py", "test_probes.py", "test_evasion.py", "test_infer.py", "test_rtt.py", "test_page.py",
              "test_infer_read.py")


def scenario_path(name: str) -> Path:
    """A bundled scenario's file, by its name."""
    return SCENARIOS / f"{name}.toml"


def lab_name(base: str) -> str:
    """A test lab's name: `base`, after this run's prefix and before this worker's number."""
    name = LAB_PREFIX + base + WORKER.removeprefix("gw")
    assert len(name) <= 24, f"lab name {name!r} is over 24 characters: shorten THROTTLE_TEST_LAB_PREFIX"
    return name


def pytest_report_header(config: pytest.Config) -> str:
    return f"time bounds x{pace.SCALE:.1f} ({pace.ENV}; measured unless set)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    netns = ROOT / "tests" / "netns"

    def rank(item: pytest.Item) -> int:
        path = item.path
        if path.parent != netns:
            return len(LONG_FIRST) + 1
        return LONG_FIRST.index(path.name) if path.name in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable: a module's tests keep their order


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's scheduling by scope, where a module is one scope and each SPREAD test one."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return nodeid if nodeid.startswith(SPREAD) else nodeid.split("::", 1)[0]

    return ByModule(config, log)
