"""`scripts/bench-bypass` (`python -m throttle.cli.bypass [SECONDS]`): the bypass benchmark of
`throttle.measure.bypass`, printed as it runs; errors become one line and exit code 2."""

from __future__ import annotations

import sys

from throttle.errors import ThrottleError
from throttle.measure.bypass import STEPS, Step, measure, report_lines


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 10.0
    print(f"bench-bypass: iperf3 client -> server through the lab's censor namespace, {seconds:.0f} s each", flush=True)

    def starting(index: int, label: str) -> None:
        print(f"  {index + 1}/{len(STEPS)} {label} ...", end="", flush=True)

    def measured(step: Step) -> None:
        print(f" {step.bits_per_second / 1e6:.0f} Mbit/s", flush=True)

    try:
        steps = measure(seconds, starting=starting, measured=measured)
    except ThrottleError as exc:
        print(f"bench-bypass: {exc}", file=sys.stderr)
        return 2
    for line in report_lines(steps):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
