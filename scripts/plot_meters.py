"""`scripts/plot-meters`: the two policing meters' delivered bytes over time, for the same offered load.

A sender offers full-size packets (1,500 bytes) at a steady rate, well above the limit, to a meter
of 130 kbit/s with a 16 KB burst (docs/incidents.md §1.10-11): the token bucket (`meter = "bucket"`,
refilled continuously) and the window meter (`meter = "window"`: each interval of burst / rate
seconds passes its first `burst` bytes, then drops the rest). Draws cumulative delivered bytes and
each dropped packet over time, and prints the longest run of drops for each: ~900 ms for the
window meter, as §11's capture showed, ~90 ms for the bucket. The clock is simulated.

    scripts/plot-meters [-o meters.png] [--seconds 4] [--offered 1mbit]
"""

from __future__ import annotations

import argparse

from throttle.engine import Policer, WindowMeter
from throttle.units import parse_rate, parse_size

SIZE = 1500


def simulate(meter: Policer | WindowMeter, seconds: float, offered: float) -> tuple[list[float], list[int], list[float]]:
    """(times, cumulative delivered bytes, times of drops) for packets offered at `offered` bytes/s."""
    gap = SIZE / offered
    times: list[float] = []
    delivered: list[int] = []
    drops: list[float] = []
    total = 0
    for i in range(int(seconds / gap)):
        t = i * gap
        if meter.allow(SIZE, t):
            total += SIZE
        else:
            drops.append(t)
        times.append(t)
        delivered.append(total)
    return times, delivered, drops


def longest_drop_run(times: list[float], delivered: list[int]) -> float:
    """The longest time between two delivered packets."""
    passed = [t for t, a, b in zip(times, [0] + delivered, delivered) if b > a]
    return max((b - a for a, b in zip(passed, passed[1:])), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="meters.png")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--offered", default="1mbit", help="offered load, e.g. 1mbit")
    ap.add_argument("--rate", default="130kbit")
    ap.add_argument("--burst", default="16KB")
    args = ap.parse_args()
    offered, rate, burst = parse_rate(args.offered), parse_rate(args.rate), parse_size(args.burst)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, meter, colour in (("token bucket (meter = \"bucket\")", Policer(rate, burst, 0.0), "tab:blue"),
                                 ("window (meter = \"window\")", WindowMeter(rate, burst, 0.0), "tab:red")):
        times, delivered, drops = simulate(meter, args.seconds, offered)
        ax.step(times, [d / 1024 for d in delivered], where="post", label=label, color=colour)
        ax.plot(drops, [-1.5 if colour == "tab:blue" else -3.0] * len(drops), "|", color=colour, markersize=6)
        print(f"{label}: {delivered[-1] / 1024:.1f} KB in {args.seconds:g} s "
              f"({delivered[-1] * 8 / args.seconds / 1000:.0f} kbit/s), longest run of drops "
              f"{longest_drop_run(times, delivered) * 1000:.0f} ms")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("delivered (KB); ticks below 0: drops")
    ax.set_title(f"{args.offered} offered to {args.rate} with a {args.burst} burst (docs/incidents.md §1.11)")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
