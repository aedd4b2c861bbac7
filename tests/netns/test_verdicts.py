"""The verdicts can fail: every bundled scenario with a rate, run live with its rules' rates doubled,
and again halved, must fail `throttle run` (exit 1, the report not passed).

The probes stay as they are; each throttled probe that its rule predicts a speed for gets
`expect_rate` naming what the original rule predicts, so the mutant is judged by the original's
expectations. The throttled probes then miss their band (kazakhstan-2023's 100-byte probe, too
short to have a rate, and twitter-2022-03's, which crawls until its timeout, miss their handshake
floor, or complete no handshake before it). The originals pass: tests/netns/test_run.py runs each.

Each case is in SPREAD (tests/conftest.py): it runs on any worker, in that worker's shared lab.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import pace
from tests.conftest import ROOT, scenario_path
from throttle.lab.topology import Lab
from throttle.measure.predict import expected
from throttle.scenario import load_scenario
from throttle.units import parse_rate

from .conftest import SHARED_LAB

pytestmark = pytest.mark.netns

RATED = sorted(p.stem for p in (ROOT / "scenarios").glob("*.toml") if any(r.rate > 0 for r in load_scenario(p).rules))
FACTORS = {"doubled": 2.0, "halved": 0.5}
RATE_LINE = re.compile(r'^(\s*rate\s*=\s*)"([^"]*)"(.*)$')


@pytest.fixture(scope="module")
def lab(shared_lab: Lab) -> Lab:
    return shared_lab


def bits(rate: float) -> str:
    """A rate in bytes/s as a scenario writes it, in plain digits (parse_rate takes no exponent)."""
    return f"{rate * 8:.3f}".rstrip("0").rstrip(".") + "bit"


def mutant(name: str, factor: float, folder: Path) -> Path:
    """The scenario's file with every rule's rate times `factor`, and each throttled probe's
    expect_rate what the original predicts for it."""
    original = load_scenario(scenario_path(name))
    pinned = [expected(original, p) for p in original.probes]
    lines, probe = [], 0
    for line in scenario_path(name).read_text().splitlines():
        m = RATE_LINE.match(line)
        if m:  # `rate` is a key of [[rule]] tables only
            line = f'{m.group(1)}"{bits(parse_rate(m.group(2)) * factor)}"{m.group(3)}'
        lines.append(line)
        if line.strip() == "[[probe]]":
            pin = pinned[probe]
            if original.probes[probe].expect == "throttled" and pin.kind == "predicted" and pin.rate:
                lines.append(f'expect_rate = "{bits(pin.rate)}"')
            probe += 1
    assert probe == len(original.probes)
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    mutated = load_scenario(path)
    assert [r.rate for r in mutated.rules] == pytest.approx([r.rate * factor for r in original.rules])
    return path


def test_every_scenario_with_a_rate_is_mutated(tmp_path: Path) -> None:
    """Every mutant loads (no lab needed), its rates written as parse_rate reads them (1,024 kbit/s
    doubled is "1024000bit", not "1.024e+06bit")."""
    assert len(RATED) >= 10 and "twitter-2021-03-10" in RATED and "tcp-16-20-2025" not in RATED
    for how, factor in FACTORS.items():
        (tmp_path / how).mkdir()
        for name in RATED:
            mutant(name, factor, tmp_path / how)


@pytest.mark.parametrize("how", FACTORS)
@pytest.mark.parametrize("scenario", RATED)
def test_mutated_scenario_fails(lab: object, scenario: str, how: str, tmp_path: Path) -> None:
    path = mutant(scenario, FACTORS[how], tmp_path)
    out = tmp_path / "run.json"
    result = subprocess.run(
        [sys.executable, "-m", "throttle", "run", str(path), "--lab", SHARED_LAB, "--keep", "--metrics-listen", "off",
         "-o", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=pace.seconds(600),
    )
    print(result.stdout)
    assert out.exists(), result.stderr[-2000:]
    report = json.loads(out.read_text())
    failed = [f"{p['name']}: expected {p['expected']}, observed {p['observed']}; " + "; ".join(p["check_failures"])
              for p in report["probes"] if not p["passed"]]
    print(f"{scenario} with its rates {how}:", *failed, sep="\n  ")
    assert result.returncode == 1 and not report["passed"] and failed, (
        f"{scenario} with its rates {how} passed `throttle run` (exit {result.returncode}): its verdicts cannot "
        f"tell that rate from the original's")
