"""`throttle infer --plot`: one panel per limited flow direction, sequence against time.

Each panel draws the packets that passed (the capture's data packets, less the inferred losses),
the inferred losses, and the fitted limit: a token bucket's envelope (burst, then the rate: no
more can pass than lies under it), a window meter's staircase (burst bytes per period), a shaper's
rate line, or a freeze's ceiling. Sequence is payload bytes, so an IP-layer rate is drawn at its
payload share (MSS over MSS plus headers). matplotlib (Agg) is imported here, inside the function:
the CLI starts without it (the [plots] extra).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

from throttle.files import atomic_write
from throttle.infer.trace import Inference

__all__ = ["MAX_PANELS", "envelope", "plot_inferences"]

MAX_PANELS = 12
PASSED, LOST, LIMIT = "#2471a3", "#c0392b", "#555555"


def envelope(inf: Inference, t0: float, t1: float, steps: int = 200) -> list[tuple[float, float]]:
    """The fitted limit as (seconds from t0, payload bytes) points; empty when there is none."""
    t = inf.trace
    share = t.mss / (t.mss + t.header_bytes) if t.mss > 0 else 1.0
    rate = inf.rate_bps.value / 8 * share if inf.rate_bps is not None else None
    burst = inf.burst_bytes.value if inf.burst_bytes is not None else 0.0
    start = float(inf.after_bytes or 0)
    span = max(t1 - t0, 1e-6)
    if inf.mechanism == "freeze" and inf.after_bytes is not None:
        return [(0.0, start), (span, start)]
    if rate is None:
        return []
    if inf.mechanism == "window" and inf.period is not None and inf.period.value > 0 and burst > 0:
        points: list[tuple[float, float]] = []
        for k in range(min(int(span / inf.period.value) + 2, 2000)):
            at = k * inf.period.value
            points += [(at, start + k * burst), (at, start + (k + 1) * burst)]
        return points
    return [(span * i / steps, start + burst + rate * span * i / steps) for i in range(steps + 1)]


def plot_inferences(infs: Sequence[Inference], path: Path) -> int:
    """The limited flows drawn into one PNG at `path`; how many were drawn (at most MAX_PANELS).
    With none limited, the figure says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limited = [i for i in infs if i.mechanism != "none" and i.trace.sent][:MAX_PANELS]
    cols = 1 if len(limited) <= 1 else 2
    rows = max(1, math.ceil(len(limited) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 3.6 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, inf in zip(flat, limited):
        t = inf.trace
        t0 = t.sent[0].t
        lost = {(loss.start, loss.t) for loss in t.losses}
        passed = [s for s in t.sent if (s.start, s.t) not in lost]
        ax.scatter([s.t - t0 for s in passed], [s.start for s in passed], s=3, color=PASSED, label="passed")
        if t.losses:
            ax.scatter([loss.t - t0 for loss in t.losses], [loss.start for loss in t.losses], s=14, marker="x",
                       color=LOST, label="lost (inferred)")
        line = envelope(inf, t0, t.last)
        if line:
            ax.plot([x for x, _ in line], [y for _, y in line], color=LIMIT, linewidth=1, linestyle="--",
                    label=f"fitted {inf.mechanism}")
        name = t.server_name or t.server
        ax.set_title(f"{name} {t.transport} {t.direction}: {inf.mechanism} ({inf.confidence:.2f})", fontsize=9)
        ax.set_xlabel("seconds")
        ax.set_ylabel("sequence (payload bytes)")
        top = max((s.start + s.length for s in t.sent), default=1)
        ax.set_ylim(0, top * 1.05)
        ax.legend(fontsize=7, loc="upper left")
    for ax in flat[len(limited):]:
        ax.axis("off")
    if not limited:
        flat[0].text(0.5, 0.5, "no limited flow in the capture", ha="center", va="center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return len(limited)
