"""What both tiers share: where the repository and its bundled scenarios are, and the names of the
labs the namespace tests make.

`THROTTLE_TEST_LAB_PREFIX` (default empty) is put before every test lab's name, so that two
checkouts can run their namespace tests on one machine at once without taking each other's labs
down (`THROTTLE_TEST_LAB_PREFIX=a- scripts/test tests/netns/test_censor.py`).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"
VECTORS = ROOT / "tests" / "vectors"
LAB_PREFIX = os.environ.get("THROTTLE_TEST_LAB_PREFIX", "")


def scenario_path(name: str) -> Path:
    """A bundled scenario's file, by its name."""
    return SCENARIOS / f"{name}.toml"


def lab_name(base: str) -> str:
    """A test lab's name: `base`, after this run's prefix."""
    name = LAB_PREFIX + base
    assert len(name) <= 24, f"lab name {name!r} is over 24 characters: shorten THROTTLE_TEST_LAB_PREFIX"
    return name
