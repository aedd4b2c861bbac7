"""`scripts/bench-bypass` (`python -m throttle.cli.bypass [SECONDS [ROUNDS]]`): the bypass benchmark
of `throttle.measure.bypass`, printed as it runs; errors become one line and exit code 2."""

from __future__ import annotations

import sys

from throttle.errors import ThrottleError
from throttle.measure.bypass import STEPS, measure, report_lines

USAGE = "usage: bench-bypass [SECONDS [ROUNDS]]  (seconds per iperf3 run, default 10; rounds, default 1)"


def main(argv: list[str]) -> int:
    try:
        seconds = float(argv[0]) if argv else 10.0
        rounds = int(argv[1]) if len(argv) > 1 else 1
    except ValueError:
        print(USAGE, file=sys.stderr)
        return 2
    if len(argv) > 2 or seconds <= 0 or rounds < 1:
        print(USAGE, file=sys.stderr)
        return 2
    print(f"bench-bypass: iperf3 client -> server through the lab's censor namespace, {seconds:g} s each, "
          f"{rounds} round{'s' if rounds > 1 else ''}", flush=True)

    def starting(round_no: int, index: int) -> None:
        head = f"round {round_no + 1}/{rounds} " if rounds > 1 else ""
        print(f"  {head}{index + 1}/{len(STEPS)} {STEPS[index]} ...", end="", flush=True)

    def measured(round_no: int, index: int, bits_per_second: float) -> None:
        print(f" {bits_per_second / 1e6:.0f} Mbit/s", flush=True)

    try:
        steps = measure(seconds, rounds=rounds, starting=starting, measured=measured)
    except ThrottleError as exc:
        print(f"bench-bypass: {exc}", file=sys.stderr)
        return 2
    for line in report_lines(steps):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
