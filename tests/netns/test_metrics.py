"""The exporter, scraped by a real Prometheus server while a throttled and a control upload run.

The censor runs in the lab's namespace but serves its metrics on the host's loopback; Prometheus
(Debian's) scrapes it every second; the test asks Prometheus, not the censor, what it saw, and
promtool checks the page.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests import pace
from tests.conftest import ROOT
from throttle.lab.topology import Lab
from throttle.measure.judge import SPEED_FACTOR

from .conftest import SHARED_LAB

pytestmark = pytest.mark.netns

LAB = SHARED_LAB
METRICS_PORT = 19464
PROM_PORT = 19090
RATE = 16250.0


def require_prometheus() -> None:
    for tool in ("prometheus", "promtool"):
        if not any(os.path.exists(f"{d}/{tool}") for d in ("/usr/bin", "/usr/local/bin")):
            pytest.fail(f"{tool} is missing: apt-get install prometheus (scripts/setup does)")


@pytest.fixture(scope="module")
def lab(shared_lab: Lab) -> Lab:
    return shared_lab


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=pace.seconds(5)) as response:
        return response.read().decode()


def query(expr: str) -> list[dict]:
    data = json.loads(get(f"http://127.0.0.1:{PROM_PORT}/api/v1/query?query={urllib.parse.quote(expr)}"))
    assert data["status"] == "success", data
    return data["data"]["result"]


def test_prometheus_scrapes_the_speeds_of_a_throttled_and_a_control_upload(lab, tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        f"scrape_configs:\n  - job_name: throttle\n    static_configs:\n      - targets: ['127.0.0.1:{METRICS_PORT}']\n"
    )
    censor = subprocess.Popen(
        [sys.executable, "-m", "throttle", "censor", "--scenario", "twitter-2021-03-10", "--netns", f"{LAB}-censor",
         "--metrics-listen", f"127.0.0.1:{METRICS_PORT}", "--quiet"],
        stderr=subprocess.PIPE, text=True, cwd=ROOT)
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{PROM_PORT}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    photo, video = tmp_path / "photo", tmp_path / "video"
    photo.write_bytes(os.urandom(300 * 1024))
    video.write_bytes(b"\0" * (32 << 20))
    upload = None
    try:
        assert "active" in censor.stderr.readline()  # type: ignore[union-attr]
        upload = subprocess.Popen(lab.exec_argv("client", ["curl", "-4", "-sS", "-o", "/dev/null", "-T", str(photo),
                                                           "https://pbs.twimg.com/upload"]))
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:  # control uploads keep the unlimited speed up meanwhile
            subprocess.run(lab.exec_argv("client", ["curl", "-4", "-sS", "-o", "/dev/null", "-T", str(video),
                                                    "https://example.org/upload"]), check=True, capture_output=True)
            time.sleep(0.3)
        up = query('up{job="throttle"}')
        assert up and up[0]["value"][1] == "1", up
        twitter = query('throttle_achieved_bytes_per_second{rule="twitter",direction="upload"}')
        control = query('max_over_time(throttle_achieved_bytes_per_second{rule="none",direction="upload"}[10s])')
        drops = query('sum(throttle_packets_total{rule="twitter",verdict="dropped"})')
        page = get(f"http://127.0.0.1:{METRICS_PORT}/metrics")
    finally:
        for proc in (upload, prometheus):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=pace.seconds(10))
        censor.send_signal(signal.SIGINT)
        censor.wait(timeout=pace.seconds(20))
    twitter_speed = float(twitter[0]["value"][1])
    control_speed = float(control[0]["value"][1])
    print(f"Prometheus saw: twitter upload {twitter_speed * 8 / 1000:.0f} kbit/s, control "
          f"{control_speed * 8e-6:.0f} Mbit/s, {float(drops[0]['value'][1]):.0f} packets dropped")
    assert abs(twitter_speed - RATE) / RATE < 0.35
    assert control_speed > SPEED_FACTOR * RATE  # unlimited by the judge's bound, on any machine
    assert float(drops[0]["value"][1]) > 0
    # The eBPF program says why packets reached the censor: every new connection's SYN, and the
    # packets of flows not yet decided, at the least.
    fallbacks = {m.group(1): float(m.group(2)) for m in
                 re.finditer(r'^throttle_fastpath_fallbacks_total\{reason="(\w+)"\} (\S+)$', page, re.M)}
    assert fallbacks["tcp_syn"] > 0 and fallbacks["no_flow"] > 0, fallbacks
    check = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in ("throttle_packets_total", "throttle_bytes_total", "throttle_flows_classified_total",
                 "throttle_flows_active", "throttle_queue_delay_seconds_bucket", "throttle_queue_held_packets",
                 "throttle_engine_errors_total", "throttle_achieved_bytes_per_second"):
        assert name in page or name.replace("_total", "") in page, name
