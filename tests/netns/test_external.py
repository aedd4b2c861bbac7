"""`throttle run --external`: the probes start where the command runs (here the lab's client
namespace, standing in for the three-VM lab's client VM), through a censor this run did not start,
to a lab server that is already up. The censor runs in the lab's censor namespace as a user would
start it; without it the policed probe must read "normal" and the run fail."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import pace
from tests.conftest import ROOT
from throttle.lab.topology import Lab

from .conftest import running_censor

pytestmark = pytest.mark.netns

# The day-one Twitter censor (scenarios/twitter-2021-03-10.toml), cut to one policed upload and
# its control, so the run stays short.
SCENARIO = """
[scenario]
name = "external-twitter"
title = "the day-one Twitter policer, one upload and its control"

[model]
window_packets = 1
window_extension = 16
give_up_bytes = 101
name_sources = ["tls"]

[[rule]]
name = "twitter"
match = ["*t.co*", "*.twimg.com", "*twitter.com"]
action = "police"
rate = "130kbit"
burst = "16KB"
meter = "window"
direction = "both"
scope = "flow"

[[probe]]
name = "twitter-photo-upload"
host = "pbs.twimg.com"
direction = "upload"
size = "160KB"
expect = "throttled"

[[probe]]
name = "control-upload"
host = "example.org"
direction = "upload"
size = "160KB"
expect = "normal"
control = true
"""


@pytest.fixture(scope="module")
def lab(shared_lab: Lab) -> Lab:
    return shared_lab


@pytest.fixture
def scenario(tmp_path: Path) -> Path:
    path = tmp_path / "external-twitter.toml"
    path.write_text(SCENARIO)
    return path


def run_external(lab: Lab, scenario: Path) -> tuple[int, dict[str, Any], str]:
    """`throttle run --external` in the lab's client namespace: exit code, JSON, stderr."""
    argv = lab.exec_argv("client", [sys.executable, "-m", "throttle", "run", "--external", str(scenario), "--json"])
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=pace.seconds(120))
    print(result.stderr)
    assert result.stdout.strip(), f"no JSON on stdout (exit {result.returncode}): {result.stderr[-2000:]}"
    return result.returncode, json.loads(result.stdout), result.stderr


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in report["probes"]}


def test_probes_from_the_client_through_a_censor_it_did_not_start(lab: Lab, scenario: Path) -> None:
    with running_censor(str(scenario), lab.name):
        code, report, err = run_external(lab, scenario)
    probes = by_name(report)
    upload, control = probes["twitter-photo-upload"], probes["control-upload"]
    assert upload["observed"] == "throttled" and upload["passed"], upload  # within its predicted band too
    assert control["observed"] == "normal" and control["passed"], control
    assert code == 0 and report["passed"]
    # No baseline: the censor is not this run's to stop; the footnote says so.
    assert control["baseline_speed_bytes_per_second"] is None
    assert report["external"]["baseline"] is False and report["external"]["server"] == "198.18.1.2"
    assert "no no-censor baseline" in " ".join(err.split())


def test_without_the_censor_the_policed_probe_reads_normal_and_the_run_fails(lab: Lab, scenario: Path) -> None:
    code, report, _ = run_external(lab, scenario)
    probes = by_name(report)
    assert probes["twitter-photo-upload"]["observed"] == "normal"
    assert not probes["twitter-photo-upload"]["passed"] and probes["control-upload"]["passed"]
    assert code == 1 and not report["passed"]


def test_the_lab_ca_from_a_file_given_with_ca(lab: Lab, scenario: Path) -> None:
    # nsenter: the client's network without `ip netns exec`'s /etc (whose trust store holds the lab
    # CA), so only --ca can make the lab server's certificate trusted.
    enter = [shutil.which("nsenter") or "nsenter", f"--net=/run/netns/{lab.ns('client')}"]
    base = [*enter, sys.executable, "-m", "throttle", "run", "--external", str(scenario), "--json"]
    results = {}
    for name, extra in (("without", []), ("with", ["--ca", str(lab.ca_cert)])):
        result = subprocess.run(base + extra, capture_output=True, text=True, cwd=ROOT, timeout=pace.seconds(120))
        results[name] = by_name(json.loads(result.stdout))["control-upload"]
    assert results["without"]["cause"] == "lab" and "certificate" in results["without"]["error"], results["without"]
    assert results["with"]["cause"] == "completed" and results["with"]["observed"] == "normal", results["with"]
