"""`throttle evasions` as a user runs it, against the 2021 device and a reassembling model.

One lab (`evmtest`) serves both models and is always taken down. The outcomes are the runner's
verdicts (judged by speed against the control), read from the JSON; nothing here times anything.
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

from .conftest import SHARED_LAB

pytestmark = pytest.mark.netns

LAB = SHARED_LAB
OLD, NEW = "twitter-2021-03-10", "media-upload"


@pytest.fixture(scope="module")
def lab(shared_lab: Lab) -> Lab:
    return shared_lab


def test_the_matrix_of_the_2021_device_and_a_reassembling_model(lab: object, tmp_path: Path) -> None:
    out, png = tmp_path / "matrix.json", tmp_path / "matrix.png"
    result = subprocess.run(
        [sys.executable, "-m", "throttle", "evasions", OLD, NEW, "--lab", LAB, "--metrics-listen", "off", "-o", str(out),
         "--plot", str(png)],
        capture_output=True, text=True, cwd=ROOT, timeout=pace.seconds(600),
    )
    print(result.stdout)
    assert out.exists(), result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["lab_failures"] == [], data["lab_failures"]
    assert [m["scenario"] for m in data["models"]] == [OLD, NEW]
    assert all(m["control_observed"] == "normal" for m in data["models"])
    cells = {(row, model): cell["outcome"] for row, by in data["matrix"].items() for model, cell in by.items()}
    # The 2021 device does what docs/incidents.md §1.7 reports, trick by trick.
    assert data["mismatches_2021"] == []
    for trick, expected in data["expected_2021"]["outcomes"].items():
        assert cells[(trick, OLD)] == expected, (trick, data["matrix"][trick][OLD])
    assert cells[("split", OLD)] == "evaded" and cells[("none", OLD)] == "caught"
    # A reassembling device that strips the trailing dot catches what the 2021 one missed (§1.8).
    for trick in ("none", "split", "pad", "dot", "fake"):
        assert cells[(trick, NEW)] == "caught", (trick, data["matrix"][trick][NEW])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Evasion matrix" in result.stdout and "§1.7" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chromium_over_http3_is_a_row_evaded_by_a_first_datagram_model_and_caught_by_a_reassembling_one(
        lab: object, tmp_path: Path) -> None:
    """The HTTP/3 browser probe of browser-chromium-quic as a row of the matrix, against its own
    first-datagram model and the same scenario with the model reassembling (what youtube-2024
    does; its own run of the same probe is in tests/netns/test_run.py): Chromium's two-datagram hello
    (§4.28) walks past the one and is caught by the other, at its QUIC rule's rate."""
    first = "browser-chromium-quic"
    text = (ROOT / "scenarios" / f"{first}.toml").read_text()
    reassembling = text.replace(f'name = "{first}"', 'name = "chromium-quic-reassembling"').replace(
        "reassemble = false", "reassemble = true")
    assert reassembling.count("reassemble = true") == 1, "the scenario's model line moved: update this test"
    variant = tmp_path / "chromium-quic-reassembling.toml"
    variant.write_text(reassembling)
    out = tmp_path / "matrix.json"
    result = subprocess.run(
        [sys.executable, "-m", "throttle", "evasions", first, str(variant), "--lab", LAB, "--metrics-listen", "off",
         "-o", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=pace.seconds(600),
    )
    print(result.stdout)
    assert out.exists(), result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["lab_failures"] == [] and result.returncode == 0, result.stderr[-2000:]
    row = data["matrix"]["browser:video-download-chromium-h3"]
    assert row[first]["outcome"] == "evaded", row
    assert row["chromium-quic-reassembling"]["outcome"] == "caught", row
    assert [r for r in data["matrix"] if r.startswith("browser:")] == ["browser:video-download-chromium-h3"]
    assert not any(m["device_2021"] for m in data["models"])
    assert "Evasion matrix" in result.stdout
