"""One signal stops a loaded censor (issue 20, item 5).

A censor with its metrics on, loaded by censor_load.py's churn (short TCP flows, shaped, policed
and unlimited, and bursts of new UDP flows: its queue, the netlink worker and the walker busy) and
scraped like Prometheus does, gets exactly one SIGINT or SIGTERM at a random moment; every other
time during a flood of new UDP flows faster than it reads its queue (which once kept its loop in
one callback, and the signal waiting, until the flood ended). It must stop,
remove its rules and say so in its last line, and exit 0, every time. The bound (15 s) only catches
a hang; the measured stop times are printed (the issue's target is 2 s).

`THROTTLE_SIGNAL_TRIES` (default 20) sets the number of signals.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import pace
from throttle.lab.topology import CENSOR_CLIENT_IF, CENSOR_SERVER_IF, Lab
from throttle.measure.runner import CensorProcess

pytestmark = pytest.mark.netns

TRIES = int(os.environ.get("THROTTLE_SIGNAL_TRIES", "20"))
HANG = pace.seconds(15.0)  # seconds: only a hang takes this long (more on a slow machine)
LOAD = Path(__file__).with_name("censor_load.py")
LOAD_PORT = 9170
LOAD_SCENARIO = """
[scenario]
name = "signal-load"
title = "signals under load: one name shaped per flow, one policed"
[model]
window_packets = 1
window_extension = 16
name_sources = ["tls"]
idle_timeout = "3s"
[[rule]]
name = "shaped"
match = ["pbs.twimg.com"]
action = "shape"
rate = "130kbit"
burst = "16KB"
direction = "both"
scope = "flow"
[[rule]]
name = "policed"
match = ["upload.twitter.com"]
action = "police"
rate = "130kbit"
burst = "16KB"
direction = "both"
"""


@pytest.fixture(scope="module")
def lab(shared_lab: Lab) -> Lab:
    return shared_lab


@pytest.fixture(scope="module")
def load(lab: Lab) -> Iterator[None]:
    """The sink in the server namespace and the churn in the client's, for the whole module."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for role, argv in (("server", ["sink", str(LOAD_PORT)]), ("client", ["churn", str(LOAD_PORT), "3600"])):
            proc = subprocess.Popen(lab.exec_argv(role, [sys.executable, str(LOAD), *argv]),
                                    stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                pytest.fail(f"the load's {argv[0]} did not start in the {role} namespace")
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Scraper:
    """GET /metrics every 50-300 ms from a thread, as a Prometheus server with a short interval."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(random.uniform(0.05, 0.3)):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    response.read()
                self.scrapes += 1
            except OSError:
                pass  # stopping, or stopped

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def threads(pid: int) -> str:
    """Where each of the process's threads waits (for the failure message of a hang)."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        try:
            name = (task / "comm").read_text().strip()
            wchan = (task / "wchan").read_text().strip()
            stack = (task / "stack").read_text().strip().splitlines()[:3]
        except OSError:
            continue
        lines.append(f"{task.name} {name}: {wchan} | {' < '.join(s.split()[-1] for s in stack)}")
    return "\n".join(lines)


def leftovers(lab: Lab) -> str:
    """The censor's queue rules and fast-path filters still in its namespace."""
    out = []
    for argv in (["iptables", "-w", "-t", "mangle", "-S"], ["ip6tables", "-w", "-t", "mangle", "-S"],
                 ["tc", "filter", "show", "dev", CENSOR_CLIENT_IF, "ingress"],
                 ["tc", "filter", "show", "dev", CENSOR_SERVER_IF, "ingress"]):
        found = subprocess.run(lab.exec_argv("censor", argv), capture_output=True, text=True).stdout
        out += [line for line in found.splitlines() if "THROTTLE" in line or "bpf" in line]
    return "; ".join(out)


def test_one_signal_stops_a_loaded_censor_every_time(lab: Lab, load: None, tmp_path: Path) -> None:
    scenario = tmp_path / "signal-load.toml"
    scenario.write_text(LOAD_SCENARIO)
    rng = random.Random()
    stops: list[tuple[str, float, int]] = []
    for i in range(TRIES):
        port = free_port()
        sig = rng.choice((signal.SIGINT, signal.SIGTERM))
        censor = CensorProcess(str(scenario), lab.ns("censor"), "--metrics-listen", f"127.0.0.1:{port}")
        censor.stop_timeout = HANG
        with censor:
            scraper = Scraper(port)
            flood = start_flood(lab) if i % 2 else None
            try:
                time.sleep(rng.uniform(0.2, 2.5))
                assert censor.poll() is None, "the censor ended before it was signalled"
                sent = time.monotonic()
                os.kill(censor.pid, sig)
                try:
                    code = censor.wait(HANG)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"one {sig.name} did not stop the censor within {HANG:.0f} s "
                                f"(after {len(stops)} that did); its threads:\n{threads(censor.pid)}")
                took = time.monotonic() - sent
            finally:
                scraper.stop()
                if flood is not None:
                    flood.kill()
                    flood.wait()
        stops.append((sig.name + (" (flood)" if flood is not None else ""), took, scraper.scrapes))
        last = censor.tail.strip().splitlines()[-1] if censor.tail.strip() else ""
        assert code == 0, f"the censor exited {code} on {sig.name}: {censor.tail[-2000:]}"
        assert "stopped; rules removed" in last, f"its last line: {last!r}"
        assert leftovers(lab) == "", f"after {sig.name}, the censor left: {leftovers(lab)}"
    times = sorted(t for _, t, _ in stops)
    print(f"\n{len(stops)} signals, each stopped the censor; seconds from the signal to its exit: "
          f"median {times[len(times) // 2]:.2f}, max {times[-1]:.2f} (target 2); "
          + ", ".join(f"{name[3:]} {t:.2f}" for name, t, _ in stops))


def start_flood(lab: Lab) -> subprocess.Popen[str]:
    """censor_load.py's flood in the client namespace, started (it outlasts any try: killed after)."""
    proc = subprocess.Popen(lab.exec_argv("client", [sys.executable, str(LOAD), "flood", str(LOAD_PORT), "30"]),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        pytest.fail("the flood did not start in the client namespace")
    return proc
