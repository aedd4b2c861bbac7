"""The 2021 drop pattern, live (docs/incidents.md §1.11; issue 20 item 2): a 384 KB upload under
twitter-2021-03-10, whose rule uses the window meter, carried out by the kernel's fast path.

Captured by `throttle bench` on the censor's server-side interface (what leaves the censor toward
the server; nothing between there and the server drops or reorders): after the burst, payload
arrives in at most a quarter of the 100-ms bins, the on/off pattern of 16 KB per 1.008 s. A token
bucket at the same rate and burst passes a packet every ~90 ms instead (about half the bins), so
this fails if the scenario, the hand-over or the kernel falls back to the token bucket. The goodput
is printed, and asserted only within a generous band (a busy machine must not fail it).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, lab_name
from throttle.lab.topology import Lab
from throttle.measure.bench import BIN, bench
from throttle.scenario import load_scenario

from .conftest import require_lab_prerequisites

pytestmark = pytest.mark.netns

LAB = lab_name("window")
INTERVAL = 16384 / 16250  # the rule's burst / rate, seconds: one window


def one_upload_scenario(tmp_path: Path) -> Path:
    """twitter-2021-03-10 with two probes: its photo upload, grown to 384 KB, and its control (a run
    needs one)."""
    text = (ROOT / "scenarios" / "twitter-2021-03-10.toml").read_text()
    assert re.search(r'(?m)^meter = "window"', text), "the scenario's rule must use the window meter"
    head, *probes = re.split(r"(?m)^(?=\[\[probe\]\])", text)
    (upload,) = [p for p in probes if 'name = "twitter-photo-upload"' in p]
    (control,) = [p for p in probes if 'name = "control-upload"' in p]
    path = tmp_path / "twitter-384k.toml"
    path.write_text(head + upload.replace('size = "160KB"', 'size = "384KB"') + control)
    return path


def after_the_burst(bins: list[int], width: float) -> list[int]:
    """The bins from one window after the first payload to the last payload."""
    nonempty = [k for k, b in enumerate(bins) if b > 0]
    assert nonempty, "no payload reached the server side"
    first = nonempty[0] + round(INTERVAL / width)
    return bins[first : nonempty[-1] + 1]


def test_a_windowed_upload_arrives_in_bursts_a_window_apart(tmp_path: Path) -> None:
    require_lab_prerequisites()
    scenario = load_scenario(one_upload_scenario(tmp_path))
    assert shutil.which("tcpdump"), "tcpdump is missing: apt-get install tcpdump"
    Lab(LAB).down()  # the remains of an interrupted earlier run
    result = bench(scenario, repeat=1, out=tmp_path / "bench", lab_name=LAB, seed=1, metrics_listen="off")
    (flow,) = [f for f in result.flows if f.probe == "twitter-photo-upload"]
    (row,) = [r for r in result.rows if r.probe == "twitter-photo-upload"]
    assert not row.error, row.error
    assert flow.capture_bytes >= 384 * 1024  # the whole upload got through, and was captured
    assert flow.drops > 0

    bins = after_the_burst(flow.passed_bins, BIN)
    share = sum(b > 0 for b in bins) / len(bins)
    goodput = sum(bins) * 8 / (len(bins) * BIN) / 1000  # kbit/s of payload
    print(f"\nwindow (16 KB per {INTERVAL:.3f} s): payload in {sum(b > 0 for b in bins)} of {len(bins)} "
          f"100-ms bins after the burst ({100 * share:.1f}%), goodput {goodput:.1f} kbit/s at the server side, "
          f"{row.speed_bps / 1000:.1f} kbit/s at the client; {flow.drops} drops")
    assert share <= 0.25, (share, bins)
    assert 50 <= goodput <= 250, goodput  # issue 20 asks 100-150 kbit/s; reported above
    assert not Lab(LAB).status().up
