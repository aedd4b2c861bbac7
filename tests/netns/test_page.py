"""The live page in a real browser: while a policed upload and a control upload run through the
lab's censor, headless Chromium loads the page from the censor's metrics address; the DOM it
built shows the throttled flow's name at the policed goodput (within 25%) and the control far
above it. A screenshot of the page is saved with the test's output (the path is printed)."""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests import pace
from tests.conftest import ROOT, lab_name
from throttle.lab.topology import Lab
from throttle.measure.judge import SPEED_FACTOR
from throttle.measure.page import browser_argv
from throttle.measure.predict import payload_share, predict_goodput
from throttle.scenario import load_scenario

pytestmark = pytest.mark.netns

METRICS_PORT = 19481
WEB_PORT = 19482
WEB_LAB = lab_name("web")
SCENARIO = "twitter-2021-03-10"
URL = f"http://127.0.0.1:{METRICS_PORT}/"


@pytest.fixture(scope="module")
def lab(shared_lab: Lab) -> Lab:
    return shared_lab


class Rows(html.parser.HTMLParser):
    """The flow table's rows of a dumped DOM: their data-* attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if tag == "tr" and "data-name" in found:
            self.rows.append(found)


def chromium(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=pace.seconds(120))


def test_chromium_shows_the_policed_flow_at_its_rate_and_the_control_at_full_speed(lab: Lab, tmp_path: Path) -> None:
    rule = next(r for r in load_scenario(ROOT / f"scenarios/{SCENARIO}.toml").rules if r.name == "twitter")
    goodput = predict_goodput(rule, "upload")
    assert goodput is not None
    photo, control_file = tmp_path / "photo", tmp_path / "control"
    photo.write_bytes(os.urandom(4 << 20))  # lasts minutes at 130 kbit/s: killed at the end
    with control_file.open("wb") as f:
        f.truncate(8 << 30)  # sparse: unlimited, it runs for the whole test
    censor = subprocess.Popen(
        [sys.executable, "-m", "throttle", "censor", "--scenario", SCENARIO, "--netns", lab.ns("censor"),
         "--metrics-listen", f"127.0.0.1:{METRICS_PORT}", "--quiet"],
        stderr=subprocess.PIPE, text=True, cwd=ROOT)
    uploads: list[subprocess.Popen[bytes]] = []
    profile = tempfile.mkdtemp(prefix="chromium-page-")
    try:
        assert "active" in censor.stderr.readline()  # type: ignore[union-attr]
        for name, path in (("pbs.twimg.com", photo), ("example.org", control_file)):
            uploads.append(subprocess.Popen(lab.exec_argv("client", [
                "curl", "-4", "-sS", "-o", "/dev/null", "-T", str(path), f"https://{name}/upload"]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(10)  # past the policer's burst, and 5 s of the page's mean
        assert all(u.poll() is None for u in uploads), "an upload ended early"
        dumped = chromium(browser_argv(URL, profile))
        screenshot = tmp_path / "page.png"
        shot = chromium(browser_argv(URL, profile, screenshot=str(screenshot)))
    finally:
        for upload in uploads:
            upload.kill()
            upload.wait()
        censor.terminate()
        censor.wait(timeout=pace.seconds(30))
        shutil.rmtree(profile, ignore_errors=True)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    rows = Rows()
    rows.feed(dumped.stdout)
    by_name = {row["data-name"]: row for row in rows.rows}
    assert "pbs.twimg.com" in by_name and "example.org" in by_name, [r["data-name"] for r in rows.rows]
    twitter, control = by_name["pbs.twimg.com"], by_name["example.org"]
    assert (twitter["data-verdict"], twitter["data-rule"], control["data-verdict"]) == ("limited", "twitter", "passed")
    shown = float(twitter["data-upload-bps"]) * payload_share()  # the page shows IP bytes; goodput is payload
    print(f"page: pbs.twimg.com at {shown * 8 / 1000:.0f} kbit/s goodput (predicted {goodput * 8 / 1000:.0f}), "
          f"example.org at {float(control['data-upload-bps']) * 8 / 1e6:.0f} Mbit/s")
    assert abs(shown - goodput) <= 0.25 * goodput
    assert float(control["data-upload-bps"]) > SPEED_FACTOR * goodput  # unlimited (the judge's bound, not the machine's speed)
    assert f'class="flow limited" data-name="pbs.twimg.com"' in dumped.stdout  # charted on a card, too
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    print(f"screenshot: {screenshot}")


def test_demo_web_serves_the_page_and_the_photo_page_until_ctrl_c(tmp_path: Path) -> None:
    """`throttle demo --web` brings its lab up, says the page's URL, serves the page and (in the
    lab) the upload page a real browser opens, and on Ctrl-C stops and takes its lab down."""
    import signal
    import urllib.request

    demo = subprocess.Popen([sys.executable, "-m", "throttle", "demo", "--web", "--lab", WEB_LAB,
                             "--metrics-listen", f"127.0.0.1:{WEB_PORT}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    said: list[str] = []
    profile = tempfile.mkdtemp(prefix="chromium-photo-")
    lab = Lab(WEB_LAB)
    try:
        for line in demo.stdout:  # type: ignore[union-attr]
            said.append(line)
            if line.startswith("Ctrl-C"):
                break
        assert any(f"http://127.0.0.1:{WEB_PORT}/" in line for line in said), said
        with urllib.request.urlopen(f"http://127.0.0.1:{WEB_PORT}/", timeout=pace.seconds(5)) as response:
            assert b'id="pause"' in response.read()
        page = chromium(lab.exec_argv("client", [*browser_argv("https://pbs.twimg.com/photo", profile)[:-1],
                                                 "--ignore-certificate-errors", "https://pbs.twimg.com/photo"]))
        assert page.returncode == 0 and 'id="go"' in page.stdout and "<progress" in page.stdout, page.stderr[-2000:]
    finally:
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=pace.seconds(60))
        shutil.rmtree(profile, ignore_errors=True)
    assert demo.returncode == 0, "".join(said) + rest
    assert not lab.status().up, "demo --web left its lab up"
