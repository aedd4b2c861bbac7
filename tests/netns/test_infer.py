"""`throttle infer` on a lab capture, the issue's "done when": twitter-2021-03-10 at 50 ms RTT,
captured at the client, is inferred as policed (the window meter of the 2021 scenarios, or a
bucket) at the scenario's rate +-10% for pbs.twimg.com both ways, and none for the control; then
`--write` writes a scenario that `--check` runs in the lab and finds the same.

Only the photo upload, the photo download and the control of the scenario run (the other probes
repeat the same rule and name): about 20 s for the capture and 20 s for the check, in its own lab.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import pace
from tests.conftest import ROOT, lab_name, scenario_path
from tests.netns.conftest import lab_session
from throttle.lab.topology import CLIENT_IF, Lab

pytestmark = pytest.mark.netns

LAB = lab_name("infer")
KEEP = ("twitter-photo-upload", "twitter-photo-download", "control-upload")
RATE_BPS = 130_000.0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from lab_session(LAB, ["pbs.twimg.com", "example.org"])


def trimmed(tmp: Path) -> Path:
    """twitter-2021-03-10 with the probes in KEEP only, at 50 ms RTT."""
    text = scenario_path("twitter-2021-03-10").read_text()
    head, *probes = text.split("[[probe]]")
    kept = [p for p in probes if any(f'name = "{name}"' in p for name in KEEP)]
    assert len(kept) == len(KEEP)
    path = tmp / "twitter-50ms.toml"
    path.write_text('rtt = "50ms"\n' + head + "".join("[[probe]]" + p for p in kept))
    return path


def throttle(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "throttle", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


@pytest.fixture(scope="module")
def capture(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trimmed scenario run once, captured at the client (whole packets: the names)."""
    from throttle.measure.bench import Capture
    from throttle.measure.runner import run_scenario
    from throttle.scenario import load_scenario

    tmp = tmp_path_factory.mktemp("infer")
    scenario = load_scenario(trimmed(tmp))
    path = tmp / "client.pcap"
    with Capture(lab, "client", CLIENT_IF, path, snaplen=0):
        run_scenario(scenario, lab_name=lab.name, keep=True, baseline=False, metrics_listen="off")
        time.sleep(0.3)
    return path


def test_twitter_at_50ms_is_policed_at_its_rate_and_the_control_is_not(capture: Path) -> None:
    result = throttle("infer", str(capture), "--json")
    assert result.returncode == 0, result.stderr
    flows = json.loads(result.stdout)["flows"]
    for flow in flows:
        print(flow["server_name"], flow["direction"], flow["payload_bytes"], flow["mechanism"], flow["rate_bps"],
              flow["reason"])

    def transfer(name: str, direction: str) -> dict[str, object]:
        """The flow direction that carried the probe's transfer (not its handshake's other half)."""
        mine = [f for f in flows if f["server_name"] == name and f["direction"] == direction]
        assert mine, (name, direction)
        return max(mine, key=lambda f: f["payload_bytes"])

    for direction in ("upload", "download"):
        flow = transfer("pbs.twimg.com", direction)
        assert flow["mechanism"] in ("window", "police"), flow
        assert flow["rate_bps"] == pytest.approx(RATE_BPS, rel=0.10), flow
    assert transfer("example.org", "upload")["mechanism"] == "none"


def test_written_scenario_is_checked_in_the_lab(lab: Lab, capture: Path) -> None:
    written = capture.with_name("inferred.toml")
    check = throttle("infer", str(capture), "--write", str(written), "--check", "--lab", lab.name,
                     timeout=pace.seconds(600))
    print(check.stdout, check.stderr)
    assert written.is_file() and "pbs.twimg.com" in written.read_text()
    assert check.returncode == 0, check.stdout + check.stderr
    assert "the same" in check.stdout
