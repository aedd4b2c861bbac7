"""`scripts/bench-bypass`: iperf3 through the lab four ways, side by side in one run.

1. no censor, and the censor's bridge hands nothing to netfilter (`bridge-nf-call-iptables` and
   `-ip6tables` off in the censor namespace for that step, the lab's values back after it): the
   fastest this bridge goes, the reference every ratio is taken against; 2. no censor, the bridge
   as the lab leaves it, every packet through br_netfilter's iptables hooks (which the fast path
   skips, so this one flatters the censor); 3. the censor with a scenario that matches nothing
   (decided flows are handed back to the kernel); 4. the censor with every packet kept in Python
   (`--no-bypass`). Each round runs the four in turn; a step's figure is its best round.
   `measure` returns the steps, `report_lines` says them, and `throttle.cli.bypass` prints them.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from throttle.children import Background
from throttle.children import capture
from throttle.errors import ThrottleError
from throttle.files import atomic_write
from throttle.kernel.tools import require_tool
from throttle.lab.layout import SYSCTLS_BRIDGE
from throttle.lab.network import write_sysctls
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
TARGET = 0.95  # the bypassed censor's throughput over the reference's
STEPS = ("no censor, bridge without netfilter", "no censor, bridge through netfilter",
         "censor, matches nothing (bypass)", "censor, every packet in Python")
REFERENCE, NETFILTER, BYPASS, PYTHON = range(len(STEPS))
# The switches that hand the bridge's IP packets to iptables and ip6tables (arptables' is off already).
NETFILTER_SWITCHES = tuple(key for key, value in SYSCTLS_BRIDGE if value == "1")


@dataclass(frozen=True, slots=True)
class Step:
    label: str
    runs: tuple[float, ...]  # bits per second, one per round
    packets_per_second: float | None  # what the hook sustained, with every packet in Python

    @property
    def bits_per_second(self) -> float:
        return max(self.runs)


@contextmanager
def bridge_without_netfilter(lab: Lab) -> Iterator[None]:
    """The censor's bridge hands no packet to iptables or ip6tables inside the block; the lab's own
    values are written back after it, whatever happened."""
    ns = lab.ns("censor")
    write_sysctls(ns, [(key, "0") for key in NETFILTER_SWITCHES])
    try:
        yield
    finally:
        write_sysctls(ns, [(key, value) for key, value in SYSCTLS_BRIDGE if key in NETFILTER_SWITCHES])


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


def _run(lab: Lab, index: int, nothing: Path, seconds: float) -> tuple[float, float | None]:
    """One step once: (bits per second, the hook's packets per second for the Python step)."""
    if index == REFERENCE:
        with bridge_without_netfilter(lab):
            return _iperf(lab, SERVER_V4, seconds), None
    if index == NETFILTER:
        return _iperf(lab, SERVER_V4, seconds), None
    # No metrics: nothing here reads them, and the default port is one a user's censor may hold.
    censor = CensorProcess(str(nothing), lab.ns("censor"), "--metrics-listen", "off",
                           *([] if index == BYPASS else ["--no-bypass"]))
    with censor:
        t0 = time.monotonic()
        bps = _iperf(lab, SERVER_V4, seconds)
        elapsed = time.monotonic() - t0
    return bps, (_queued(censor) / elapsed if index == PYTHON else None)


def measure(seconds: float = 10.0, lab_name: str = "bench", rounds: int = 1,
            starting: Callable[[int, int], None] | None = None,
            measured: Callable[[int, int, float], None] | None = None) -> list[Step]:
    """The four steps, `rounds` times in turn, in a lab of their own (taken down at the end);
    `starting(round, step)` and `measured(round, step, bits_per_second)` are told as each run
    begins and ends (rounds and steps count from 0)."""
    if rounds < 1:
        raise ThrottleError(f"rounds must be at least 1, not {rounds}")
    lab = Lab(lab_name)
    lab.down()
    begin = starting or (lambda r, i: None)
    done = measured or (lambda r, i, bps: None)
    runs: list[list[float]] = [[] for _ in STEPS]
    hook_rates: list[float] = []
    try:
        lab.up([])
        iperf_server = Background(lab.exec_argv("server", [require_tool("iperf3", "iperf3"), "-s", "-B", SERVER_V4]),
                                  ready="", what="the iperf3 server", fix="apt-get install iperf3", stop_timeout=5)
        with iperf_server, tempfile.TemporaryDirectory() as tmp:
            time.sleep(0.5)  # iperf3 binds its port
            nothing = Path(tmp) / "matches-nothing.toml"
            atomic_write(nothing, NOTHING.encode())
            for r in range(rounds):
                for i in range(len(STEPS)):
                    begin(r, i)
                    bps, pps = _run(lab, i, nothing, seconds)
                    runs[i].append(bps)
                    if pps is not None:
                        hook_rates.append(pps)
                    done(r, i, bps)
    finally:
        lab.down()
    return [Step(label, tuple(runs[i]), max(hook_rates) if i == PYTHON and hook_rates else None)
            for i, label in enumerate(STEPS)]


def report_lines(steps: list[Step]) -> list[str]:
    """The table of throughputs and their ratios to both references, the bypassed ratio (against
    the no-netfilter reference) and the target, the hook's rate."""
    ref, through_nf = steps[REFERENCE].bits_per_second, steps[NETFILTER].bits_per_second
    rounds = len(steps[REFERENCE].runs)
    width = max(len(label) for label in STEPS)
    lines = ["", f"  {'':{width + 3}} {'throughput':>17} {'ratio':>7} {'ratio to 2':>10}"
                 + (f"   runs (best of {rounds})" if rounds > 1 else "")]
    for n, step in enumerate(steps, 1):
        runs = "   " + ", ".join(f"{bps / 1e6:.0f}" for bps in step.runs) if rounds > 1 else ""
        lines.append(f"  {n}. {step.label:{width}} {step.bits_per_second / 1e6:10.1f} Mbit/s "
                     f"{step.bits_per_second / ref:7.3f} {step.bits_per_second / through_nf:10.3f}{runs}")
    bypass_ratio = steps[BYPASS].bits_per_second / ref
    lines.append(f"\n  references: {ref / 1e6:.1f} Mbit/s with no netfilter on the bridge (1, every ratio's base), "
                 f"{through_nf / 1e6:.1f} Mbit/s through its netfilter hooks (2)")
    lines.append(f"  bypassed ratio {bypass_ratio:.3f} against 1 (target >= {TARGET}): "
                 f"{'ok' if bypass_ratio >= TARGET else 'BELOW TARGET'}; "
                 f"{steps[BYPASS].bits_per_second / through_nf:.3f} against 2")
    lines.append(f"  hook with every packet in Python: {steps[PYTHON].packets_per_second or 0:,.0f} packets/s sustained")
    return lines
