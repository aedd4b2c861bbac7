"""`throttle run` on every bundled scenario, as a user runs it: real clients, judged by speed.

Each pytest worker's shared lab serves the scenarios it runs (the scenarios are spread over the
workers), and is always taken down. Each scenario must meet all
of its probes' expectations; the JSON report is checked, not the exit code alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import pace
from tests.conftest import ROOT
from throttle.lab.topology import Lab
from throttle.measure.judge import SPEED_FACTOR

from .conftest import SHARED_LAB, require_lab_prerequisites

pytestmark = pytest.mark.netns

SCENARIOS = sorted(p.stem for p in (ROOT / "scenarios").glob("*.toml"))
LAB = SHARED_LAB


@pytest.fixture(scope="module")
def lab(shared_lab: Lab) -> Lab:
    return shared_lab


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_bundled_scenario_meets_its_expectations(lab: object, scenario: str, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    result = subprocess.run(
        [sys.executable, "-m", "throttle", "run", scenario, "--lab", LAB, "--keep", "--metrics-listen", "off", "--json",
         str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=pace.seconds(600),
    )
    print(result.stdout)
    assert out.exists(), result.stderr[-2000:]
    report = json.loads(out.read_text())
    failed = [f"{p['name']}: expected {p['expected']}, observed {p['observed']} "
              f"({p['speed_bytes_per_second'] * 8 / 1000:.1f} kbit/s{', ' + p['error'] if p['error'] else ''})"
              for p in report["probes"] if not p["passed"]]
    assert not failed, "\n".join(failed)
    assert report["passed"] and result.returncode == 0
    assert any(p["control"] and p["observed"] == "normal" for p in report["probes"])


def test_demo_finishes_and_shows_the_slowdown() -> None:
    require_lab_prerequisites()
    import re
    import time

    if Lab("throttle").status().up:
        pytest.fail("a lab named throttle is up: the demo would reuse it; take it down first (throttle lab down)")
    start = time.monotonic()
    demo = subprocess.Popen([sys.executable, "-m", "throttle", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    # Midway, the exporter (on the host's loopback) shows the slowed uploads and the control: read
    # 35 s in, or later on a slow machine, once it has the slowed upload (an emulated VM's demo had
    # not begun its probes by then).
    page = ""
    try:
        import urllib.request

        time.sleep(35)
        while time.monotonic() - start < pace.seconds(35) + 60 and demo.poll() is None:
            try:
                with urllib.request.urlopen("http://127.0.0.1:18130/metrics", timeout=pace.seconds(5)) as response:
                    page = response.read().decode()
            except OSError:
                page = ""
            if re.search(r'throttle_achieved_bytes_per_second\{direction="upload",rule="[^"]+",'
                         r'server_name="pbs\.twimg\.com"\}', page):
                break
            time.sleep(2)
    finally:
        out, err = demo.communicate(timeout=pace.seconds(240))
    result = subprocess.CompletedProcess(demo.args, demo.returncode, out, err)
    gauges = {}
    for line in page.splitlines():
        m = re.match(r'throttle_achieved_bytes_per_second\{direction="upload",rule="([^"]+)",server_name="([^"]+)"\} (\S+)',
                     line)
        if m:
            gauges[m.group(2)] = float(m.group(3))
    print("exporter mid-demo (bytes/s):", gauges)
    assert 0.7 * 16250 <= gauges["pbs.twimg.com"] <= 1.3 * 16250
    assert gauges["other"] > SPEED_FACTOR * 16250  # the control, repeated while the others crawl, unlimited
    elapsed = time.monotonic() - start
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-2000:]
    # About a minute on an idle machine (62 s measured); the bound only catches a hang, so a busy
    # CI machine does not fail the demo for being slow.
    print(f"the demo took {elapsed:.0f} s")
    assert elapsed < pace.seconds(300), f"the demo took {elapsed:.0f} s: hung?"
    speeds = {}
    for line in result.stdout.splitlines():
        m = re.search(r"│ (twitter-photo|reddit-upload|control)\s.*?([\d.]+) (kbit|Mbit|Gbit)/s", line)
        if m:
            speeds[m.group(1)] = float(m.group(2)) * {"kbit": 1e3, "Mbit": 1e6, "Gbit": 1e9}[m.group(3)]
    assert set(speeds) == {"twitter-photo", "reddit-upload", "control"}, result.stdout
    for name in ("twitter-photo", "reddit-upload"):
        assert 100e3 <= speeds[name] <= 160e3, f"{name}: {speeds[name] / 1e3:.0f} kbit/s"
    assert speeds["control"] > SPEED_FACTOR * 130e3  # the judge's bound: under emulation it ran at 14 Mbit/s
    assert not Lab("throttle").status().up, "the demo left its lab up"
