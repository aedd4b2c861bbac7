"""`scripts/bench-bypass`: iperf3 through the lab three ways, side by side in one run.

1. no censor; 2. the censor with a scenario that matches nothing (decided flows are handed back
to the kernel); 3. the censor with every packet kept in Python (`--no-bypass`). `measure` returns
each throughput and the packets per second the hook sustained in 3; `report_lines` says it, and
`throttle.cli.bypass` prints it.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from throttle.children import Background
from throttle.children import capture
from throttle.errors import ThrottleError
from throttle.files import atomic_write
from throttle.kernel.tools import require_tool
from throttle.lab.topology import SERVER_V4, Lab
from throttle.measure.runner import CensorProcess

NOTHING = """
[scenario]
name = "matches-nothing"
sources = ["docs/incidents.md §1: the 2021 device, with a rule no lab name matches"]

[[rule]]
name = "nothing"
match = ["nothing.invalid"]
rate = "130kbit"
"""
TARGET = 0.95  # the bypassed censor's throughput over none's
STEPS = ("no censor", "censor, matches nothing (bypass)", "censor, every packet in Python")


@dataclass(frozen=True, slots=True)
class Step:
    label: str
    bits_per_second: float
    packets_per_second: float | None  # what the hook sustained, with every packet in Python


def _iperf(lab: Lab, server: str, seconds: float) -> float:
    argv = lab.exec_argv("client", [require_tool("iperf3", "iperf3"), "-c", server, "-t", str(seconds), "-J",
                                    "-O", "1"])
    result = capture(argv, "iperf3", timeout=seconds + 30)
    try:
        data = json.loads(result.out)
        return float(data["end"]["sum_received"]["bits_per_second"])
    except (ValueError, KeyError) as exc:
        raise ThrottleError(f"iperf3 failed ({exc}): {result.err.strip() or result.out[-300:]}") from None


def _queued(censor: CensorProcess) -> int:
    """Packets the stopped censor says it queued (its last line)."""
    m = re.search(r"(\d+) pkts queued", censor.tail)
    return int(m.group(1)) if m else 0


def measure(seconds: float = 10.0, lab_name: str = "bench",
            starting: Callable[[int, str], None] | None = None,
            measured: Callable[[Step], None] | None = None) -> list[Step]:
    """The three steps in a lab of their own (taken down at the end); `starting(i, label)` and
    `measured(step)` are told as each begins and ends."""
    lab = Lab(lab_name)
    lab.down()
    begin = starting or (lambda i, label: None)
    done = measured or (lambda step: None)
    steps: list[Step] = []
    try:
        lab.up([])
        iperf_server = Background(lab.exec_argv("server", [require_tool("iperf3", "iperf3"), "-s", "-B", SERVER_V4]),
                                  ready="", what="the iperf3 server", fix="apt-get install iperf3", stop_timeout=5)
        with iperf_server, tempfile.TemporaryDirectory() as tmp:
            time.sleep(0.5)  # iperf3 binds its port
            nothing = Path(tmp) / "matches-nothing.toml"
            atomic_write(nothing, NOTHING.encode())
            begin(0, STEPS[0])
            steps.append(Step(STEPS[0], _iperf(lab, SERVER_V4, seconds), None))
            done(steps[-1])
            for i, (label, bypass) in enumerate(zip(STEPS[1:], (True, False)), 1):
                begin(i, label)
                censor = CensorProcess(str(nothing), lab.ns("censor"), *([] if bypass else ["--no-bypass"]))
                with censor:
                    t0 = time.monotonic()
                    bps = _iperf(lab, SERVER_V4, seconds)
                    elapsed = time.monotonic() - t0
                steps.append(Step(label, bps, _queued(censor) / elapsed))
                done(steps[-1])
    finally:
        lab.down()
    return steps


def report_lines(steps: list[Step]) -> list[str]:
    """The table of throughputs and ratios, the bypassed ratio against TARGET, the hook's rate."""
    base = steps[0].bits_per_second
    lines = ["", f"  {'':36} {'throughput':>14} {'ratio':>7}"]
    for step in steps:
        lines.append(f"  {step.label:36} {step.bits_per_second / 1e6:10.1f} Mbit/s {step.bits_per_second / base:7.3f}")
    bypass_ratio = steps[1].bits_per_second / base
    lines.append(f"\n  bypassed ratio {bypass_ratio:.3f} (target >= {TARGET}): "
                 f"{'ok' if bypass_ratio >= TARGET else 'BELOW TARGET'}")
    lines.append(f"  hook with every packet in Python: {steps[2].packets_per_second or 0:,.0f} packets/s sustained")
    return lines
