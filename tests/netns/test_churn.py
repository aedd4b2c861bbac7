"""New flows arriving fast, reduced: a few seconds of `scripts/bench-churn` (short TLS flows, half
to a limited name, each a real connection through the live censor) at a rate a loaded machine
still reaches. Every flow naming the limited domain is limited, and the censor's counts of flows
add up to the flows opened: each was limited, passed, or counted as closed while inspected.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest

from tests import pace
from tests.conftest import ROOT
from throttle.lab.topology import Lab

pytestmark = pytest.mark.netns

METRICS_PORT = 19475
# new flows a second (fewer only on a machine too slow to open them: tests/pace.py), for SECONDS
RATE, SECONDS = float(round(pace.load(100.0, 5.0))), 4.0


def bench_churn() -> ModuleType:
    """scripts/bench_churn.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_churn", ROOT / "scripts" / "bench_churn.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_churn"] = module  # (dataclasses look their module up by name)
    spec.loader.exec_module(module)
    return module


def test_every_flow_naming_a_limited_domain_is_limited_and_the_counts_add_up(shared_lab: Lab) -> None:
    bench = bench_churn()
    scenario = str(ROOT / "scenarios" / "twitter-2021-03-10.toml")
    (row,) = bench.churn(shared_lab, scenario, [RATE], SECONDS, "pbs.twimg.com", "example.org", METRICS_PORT)
    print(f"\n{row}")
    opened = row.limited_opened + row.other_opened
    assert opened == int(RATE * SECONDS) and row.failed == 0 and row.ports_reused == 0, row
    assert (row.limited_completed, row.other_completed) == (row.limited_opened, row.other_opened), row
    # Every limited-name flow limited (a queue drop delays an inspection, it loses none).
    assert row.limited == row.limited_opened and row.shortfall == 0, row
    # Each flow counted once, by what became of it: limited, passed, or closed before a verdict
    # (this model reads on past a hello that names nothing it limits).
    assert row.limited + row.passed + row.ended_inspecting == opened, row
