"""The figures of `throttle bench`, drawn with matplotlib's Agg backend (no display needed).

This module owns the look of the figures only; the numbers come from `throttle.measure.bench`. Every
function takes plain data (rows with a probe, its speed and expectation; flows with
`passed_bins`/`drop_bins` of `BIN` seconds)
and writes one PNG. Rates are drawn in kbit/s on a log axis, as the measurement papers do, so a
130 kbit/s policer and a multi-Mbit/s control fit one figure.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from throttle.files import atomic_write  # noqa: E402

__all__ = ["plot_drops", "plot_evasion_matrix", "plot_speeds", "plot_throughput"]

BIN = 0.1
FLOOR = 1.0  # kbit/s: where an empty bin is drawn on the log axis
THROTTLED, NORMAL, RATE = "#c0392b", "#2471a3", "#555555"


def _save(fig: Figure, path: Path) -> None:
    """The PNG written whole (a reader never sees half a figure), and the figure freed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


class Row(Protocol):
    @property
    def probe(self) -> str: ...
    @property
    def speed_bps(self) -> float: ...
    @property
    def expected(self) -> str: ...


class Flow(Protocol):
    probe: str
    repeat: int
    passed_bins: list[int]
    drop_bins: list[int]


def _kbit(bytes_per_bin: float, width: float = BIN) -> float:
    return bytes_per_bin * 8 / width / 1000


def _rate_line(ax: Axes, rate: float) -> None:
    if rate > 0:
        ax.axhline(rate * 8 / 1000, color=RATE, linestyle="--", linewidth=1.2,
                   label=f"scenario rate {rate * 8 / 1000:.0f} kbit/s")


def plot_speeds(path: Path, scenario: str, rate: float, rows: Sequence[Row]) -> None:
    """Median speed per probe over the repeats, min-max as error bars, and the scenario's rate."""
    by_probe: dict[str, list[Row]] = {}
    for row in rows:
        by_probe.setdefault(row.probe, []).append(row)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(by_probe) + 3), 5.2))
    seen: set[str] = set()
    values: list[float] = [rate * 8 / 1000] if rate > 0 else []
    for x, (name, rs) in enumerate(by_probe.items()):
        speeds = [max(r.speed_bps / 1000, FLOOR) for r in rs]
        med = statistics.median(speeds)
        expected = rs[0].expected
        color = THROTTLED if expected == "throttled" else NORMAL
        label = f"expected {expected}" if expected not in seen else None
        seen.add(expected)
        ax.errorbar([x], [med], yerr=[[med - min(speeds)], [max(speeds) - med]], fmt="o", color=color,
                    capsize=5, markersize=8, label=label)
        ax.scatter([x] * len(speeds), speeds, color=color, alpha=0.35, s=14, zorder=3)
        ax.annotate(f"{med:,.0f}", (x, med), textcoords="offset points", xytext=(10, -4), fontsize=8)
        values += speeds
    _rate_line(ax, rate)
    ax.set_yscale("log")
    if values:
        ax.set_ylim(min(values) / 3, max(values) * 3)
    ax.set_xlim(-0.6, len(by_probe) - 0.4)
    ax.set_xticks(range(len(by_probe)))
    ax.set_xticklabels(list(by_probe), rotation=25, ha="right")
    ax.set_ylabel("achieved speed (kbit/s, log)")
    n = max((len(rs) for rs in by_probe.values()), default=0)
    repeats = f"{n} repeat{'s' if n != 1 else ''}"
    ax.set_title(f"{scenario}: speed per probe\n(median, min-max bars, dots per repeat; {repeats})", fontsize=11)
    ax.grid(True, which="both", axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_throughput(path: Path, scenario: str, rate: float, throttled: Flow | None, control: Flow | None) -> None:
    """Throughput per 100 ms bin over time of a throttled and a control flow (log kbit/s)."""
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for flow, color, what in ((control, NORMAL, "control"), (throttled, THROTTLED, "throttled")):
        if flow is None:
            continue
        ys = [max(_kbit(b), FLOOR) for b in flow.passed_bins]
        xs = [k * BIN for k in range(len(ys))]
        ax.step(xs, ys, where="post", color=color, linewidth=1.0,
                label=f"{what}: {flow.probe} (repeat {flow.repeat}), 100 ms bins")
        if what == "throttled" and len(ys) >= 10:
            avg = [sum(flow.passed_bins[max(0, k - 9): k + 1]) / min(k + 1, 10) for k in range(len(ys))]
            ax.plot(xs, [max(_kbit(a), FLOOR) for a in avg], color="black", linewidth=1.6,
                    label="throttled, 1 s moving average")
    _rate_line(ax, rate)
    ax.set_yscale("log")
    ax.set_ylim(bottom=FLOOR * 0.8)
    ax.set_xlabel("time since the flow's first packet (s)")
    ax.set_ylabel("throughput past the censor (kbit/s, log)")
    ax.set_title(f"{scenario}: throughput over time (empty bins drawn at {FLOOR:g} kbit/s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_drops(path: Path, scenario: str, flow: Flow) -> None:
    """Dropped segments per 100 ms bin of a throttled flow, with the cumulative bytes let through."""
    fig, ax = plt.subplots(figsize=(9, 4.8))
    xs = [k * BIN for k in range(len(flow.drop_bins))]
    ax.bar(xs, flow.drop_bins, width=BIN, align="edge", color=THROTTLED, label="dropped segments per 100 ms")
    ax.set_xlabel("time since the flow's first packet (s)")
    ax.set_ylabel("dropped segments per 100 ms")
    ax2 = ax.twinx()
    total, cumulative = 0, []
    for b in flow.passed_bins:
        total += b
        cumulative.append(total / 1024)
    ax2.plot([k * BIN for k in range(len(cumulative))], cumulative, color=NORMAL, linewidth=1.6,
             label="bytes let through (cumulative)")
    ax2.set_ylabel("bytes let through (KB, cumulative)")
    ax2.set_ylim(bottom=0)
    ax.set_title(f"{scenario}: policer drops of {flow.probe} (repeat {flow.repeat}), "
                 f"{sum(flow.drop_bins)} dropped")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(handles, labels, loc="upper left", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


OUTCOME_COLOURS = {"evaded": "#27ae60", "caught": THROTTLED, "broke": "#e67e22", "lab": "#222222"}
EMPTY = "#dddddd"


def plot_evasion_matrix(path: Path, rows: Sequence[str], columns: Sequence[str],
                        cells: dict[tuple[str, str], tuple[str, str, bool]]) -> None:
    """`throttle evasions --plot`: a trick x model grid, each cell coloured by its outcome (evaded,
    caught, broke, lab) and labelled with it and the measured speed; a cell that contradicts
    docs/incidents.md §1.7 gets a thick black frame. `cells` maps (row, column) to (outcome, label,
    mismatch); a missing cell is drawn grey (not run for that model)."""
    from matplotlib.patches import Patch, Rectangle

    fig, ax = plt.subplots(figsize=(2.0 + 2.6 * len(columns), 1.2 + 0.75 * len(rows)))
    for y, row in enumerate(rows):
        for x, column in enumerate(columns):
            outcome, label, mismatch = cells.get((row, column), ("", "n/a", False))
            colour = OUTCOME_COLOURS.get(outcome, EMPTY)
            ax.add_patch(Rectangle((x, y), 1, 1, facecolor=colour, edgecolor="black" if mismatch else "white",
                                   linewidth=3.0 if mismatch else 1.5))
            ax.text(x + 0.5, y + 0.5, label, ha="center", va="center", fontsize=8,
                    color="white" if outcome in ("caught", "lab") else "black")
    ax.set_xlim(0, len(columns))
    ax.set_ylim(len(rows), 0)
    ax.set_xticks([x + 0.5 for x in range(len(columns))])
    ax.set_xticklabels(list(columns), fontsize=9)
    ax.xaxis.tick_top()
    ax.set_yticks([y + 0.5 for y in range(len(rows))])
    ax.set_yticklabels(list(rows), fontsize=9)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    handles = [Patch(facecolor=c, label=k) for k, c in OUTCOME_COLOURS.items() if k != "lab"]
    handles.append(Patch(facecolor="white", edgecolor="black", linewidth=2.5, label="contradicts §1.7"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=len(handles), fontsize=8,
              frameon=False)
    ax.set_title("evasion matrix: trick x censor model (docs/incidents.md §1.7)", fontsize=10, pad=28)
    fig.tight_layout()
    _save(fig, path)
