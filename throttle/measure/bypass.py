"""`scripts/bench-bypass`: iperf3 through the lab three ways, side by side in one run.

1. no censor; 2. the censor with a scenario that matches nothing (decided flows are handed back
to the kernel); 3. the censor with every packet kept in Python (`--no-bypass`). Prints each
throughput, its ratio to the first, and the packets per second the hook sustained in 3.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throttle.children import Background
from throttle.errors import ThrottleError
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


def _iperf(lab: str, server: str, seconds: float) -> float:
    argv = ["ip", "netns", "exec", f"{lab}-client", "iperf3", "-c", server, "-t", str(seconds), "-J", "-O", "1"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    try:
        data = json.loads(result.stdout)
        return float(data["end"]["sum_received"]["bits_per_second"])
    except (ValueError, KeyError) as exc:
        raise ThrottleError(f"iperf3 failed ({exc}): {result.stderr.strip() or result.stdout[-300:]}") from None


def _queued(censor: CensorProcess) -> int:
    """Packets the stopped censor says it queued (its last line)."""
    m = re.search(r"(\d+) pkts queued", censor.tail)
    return int(m.group(1)) if m else 0


def main(seconds: float = 10.0, lab_name: str = "bench") -> int:
    lab = Lab(lab_name)
    lab.down()
    print(f"bench-bypass: iperf3 client -> server through the lab's censor namespace, {seconds:.0f} s each", flush=True)
    try:
        lab.up([])
        iperf_server = Background(lab.exec_argv("server", ["iperf3", "-s", "-B", SERVER_V4]), ready="",
                                  what="the iperf3 server", fix="apt-get install iperf3", stop_timeout=5)
        with iperf_server, tempfile.TemporaryDirectory() as tmp:
            time.sleep(0.5)  # iperf3 binds its port
            nothing = Path(tmp) / "matches-nothing.toml"
            nothing.write_text(NOTHING)
            results: list[tuple[str, float, float | None]] = []
            print("  1/3 no censor ...", end="", flush=True)
            results.append(("no censor", _iperf(lab_name, SERVER_V4, seconds), None))
            print(f" {results[-1][1] / 1e6:.0f} Mbit/s", flush=True)
            for label, bypass in (("censor, matches nothing (bypass)", True), ("censor, every packet in Python", False)):
                print(f"  {len(results) + 1}/3 {label} ...", end="", flush=True)
                censor = CensorProcess(str(nothing), lab.ns("censor"), *([] if bypass else ["--no-bypass"]))
                with censor:
                    t0 = time.monotonic()
                    bps = _iperf(lab_name, SERVER_V4, seconds)
                    elapsed = time.monotonic() - t0
                results.append((label, bps, _queued(censor) / elapsed))
                print(f" {bps / 1e6:.0f} Mbit/s", flush=True)
    finally:
        lab.down()
    base = results[0][1]
    print()
    print(f"  {'':36} {'throughput':>14} {'ratio':>7}")
    for label, bps, _ in results:
        print(f"  {label:36} {bps / 1e6:10.1f} Mbit/s {bps / base:7.3f}")
    bypass_ratio = results[1][1] / base
    print(f"\n  bypassed ratio {bypass_ratio:.3f} (target >= 0.95): {'ok' if bypass_ratio >= 0.95 else 'BELOW TARGET'}")
    print(f"  hook with every packet in Python: {results[2][2]:,.0f} packets/s sustained")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0))
    except ThrottleError as exc:
        print(f"bench-bypass: {exc}", file=sys.stderr)
        sys.exit(2)
