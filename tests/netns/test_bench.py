"""`throttle.measure.bench.bench` in a real lab (`bench5`): two repeats, captures, files, the policer seen.

The scenario is twitter-2021-03-10 cut to two probes: a 160 KB upload to pbs.twimg.com (policed at
130 kbit/s) and the example.org control. The captures must show the policer's rate on the far side
of the censor and its drops, and no drops for the control.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT, lab_name

from .conftest import require_lab_prerequisites

pytestmark = pytest.mark.netns

LAB = lab_name("bench5")
KEEP = ("twitter-photo-upload", "control-upload")


def two_probe_scenario(tmp_path: Path) -> Path:
    text = (ROOT / "scenarios" / "twitter-2021-03-10.toml").read_text()
    head, *probes = re.split(r"(?m)^(?=\[\[probe\]\])", text)
    kept = [p for p in probes if re.search(r'name = "([^"]+)"', p).group(1) in KEEP]  # type: ignore[union-attr]
    assert len(kept) == 2
    path = tmp_path / "twitter-two-probes.toml"
    path.write_text(head + "".join(kept))
    return path


def test_bench_two_repeats_measures_the_policer(tmp_path: Path) -> None:
    require_lab_prerequisites()
    import shutil

    if not shutil.which("tcpdump"):
        pytest.fail("tcpdump is missing: apt-get install tcpdump")
    from throttle.lab.topology import Lab
    from throttle.measure.bench import bench
    from throttle.scenario import load_scenario

    Lab(LAB).down()  # the remains of an interrupted earlier run
    scenario = load_scenario(two_probe_scenario(tmp_path))
    calls: list[tuple[int, int, str]] = []
    out = tmp_path / "bench"
    result = bench(scenario, repeat=2, out=out, lab_name=LAB, progress=lambda i, n, t: calls.append((i, n, t)), seed=7,
                   metrics_listen="off")

    files = ("results.json", "results.csv", "flows.json", "summary.md", "speeds.png", "throughput.png", "drops.png")
    for name in files:
        assert (out / name).is_file(), name
        assert result.files[name] == out / name
    for name in ("speeds.png", "throughput.png", "drops.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert len(rows) == 4 and all(r["passed"] for r in rows), rows
    assert data["reproduce"]["seed"] == 7 and data["reproduce"]["repeat"] == 2
    assert len(data["reproduce"]["scenario_sha256"]) == 64
    assert calls[-1][:2] == (2, 2)
    assert len((out / "results.csv").read_text().splitlines()) == 5

    for flow in result.flows:
        if flow.probe == "twitter-photo-upload":
            # The median of 1 s spans of the middle part: single 100 ms bins of a policed flow are
            # empty or hold two or three segments (see `middle_rate`).
            median, mean = flow.middle_median * 8 / 1000, flow.middle_mean * 8 / 1000
            assert 0.7 * 130 <= median <= 1.3 * 130, (flow.repeat, median, mean)
            assert 0.7 * 130 <= mean <= 1.3 * 130, (flow.repeat, median, mean)
            assert sum(flow.drop_bins) == flow.drops
            assert flow.capture_bytes >= 160 * 1024  # the whole upload got through, and was captured
            assert flow.drops > 0
        else:
            assert flow.drops == 0, flow.drops
            assert flow.capture_bytes >= 160_000
    assert not Lab(LAB).status().up
