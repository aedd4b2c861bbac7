"""What `throttle run` and `throttle demo` show: a live view while probes run, then the table.

On a terminal the live view redraws in place once a second (rich); in a log or a pipe it prints a
plain progress line every few seconds instead, so CI logs stay readable.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from throttle.measure.report import ProbeRun, RunReport
from throttle.units import format_rate, format_size


def _bar(speed: float, top: float, width: int = 24) -> Text:
    """A bar on a log scale from 10 kbit/s to `top`, so 130 kbit/s and 1 Gbit/s both show."""
    import math

    lo = 10_000 / 8
    if speed <= lo or top <= lo:
        filled = 0
    else:
        filled = round(width * min(1.0, math.log(speed / lo) / math.log(top / lo)))
    return Text("█" * filled + "·" * (width - filled), style="green" if filled > width / 2 else "red")


def _columns(table: Table, *names: str) -> None:
    """Add columns by name; a name starting with ">" is right-justified (numbers)."""
    for name in names:
        table.add_column(name.lstrip(">"), justify="right" if name.startswith(">") else "left")


def live_table(runs: list[ProbeRun], title: str, top: float) -> Table:
    table = Table(title=title, title_justify="left", expand=False)
    _columns(table, "probe", "host", "dir", ">bytes", ">speed", "", "state")
    for r in runs:
        speed = r.current_speed if not r.done and r.current_speed else r.speed if r.done else r.current_speed
        if not r.started:
            state = "waiting"
        elif r.done:
            state = "done" if r.completed else "failed"
        else:
            state = "repeating" if r.probe.control and r.completed else "running"
        table.add_row(r.probe.name, r.probe.host, r.probe.direction, format_size(r.bytes),
                      format_rate(speed) if r.started else "", _bar(speed, top), state)
    return table


def result_table(report: RunReport) -> Table:
    table = Table(title=f"{report.scenario}: {'all expectations met' if report.passed else 'EXPECTATIONS FAILED'}",
                  title_justify="left")
    _columns(table, "probe", "host", "direction", ">bytes", ">speed", ">handshake", "expected", "observed", "")
    for r in report.runs:
        host = r.probe.host + (f" @{r.probe.address}" if r.probe.address else "")
        if r.probe.protocol == "tls" and r.probe.evasion != "none":
            host += f" [{r.probe.evasion}]"
        if r.probe.sni is False:
            host += " (no SNI)"
        speed = format_rate(r.speed) if r.completed else (r.error or "-")
        mark = Text("✓", style="green") if r.passed else Text("✗", style="bold red")
        observed = r.observed + (f" ({r.cause})" if r.cause not in ("", "completed") else "")
        expected: str = r.probe.expect
        if r.expected_rate is not None:
            expected += f" at {format_rate(r.expected_rate)} ±{r.probe.tolerance * 100:g}%"
        stalled = r.stalled_bytes
        size = format_size(r.bytes) if stalled is None else f"stalled at {format_size(stalled)}"
        if r.probe.freeze_bytes:
            lo, hi = r.probe.freeze_bytes
            expected += f", stall at {format_size(lo)}-{format_size(hi)}"
        shake = "-" if r.handshake is None else f"{r.handshake * 1000:.0f} ms"
        if r.probe.blocked_by:
            expected += f" ({r.probe.blocked_by})"
        if r.probe.expect_handshake:
            expected += f", {r.probe.expect_handshake} handshake"
            if r.probe.handshake_at_least:
                expected += f" (≥ {r.probe.handshake_at_least:g} s)"
            shake += f" ({r.observed_handshake})"
        table.add_row(r.probe.name, host, r.probe.direction, size, speed, shake, expected, observed, mark)
    return table


def check_failures(report: RunReport) -> list[str]:
    """One line per failed check (expected rate, freeze_bytes, blocked_by, expect_handshake), to
    print under the table."""
    return [f"{r.probe.name}: {failure}" for r in report.runs for failure in r.check_failures]


def _baselines(report: RunReport) -> str:
    """How the controls were judged: against themselves with no censor, when measured."""
    shown = [f"{r.probe.name} {format_rate(r.baseline)}" for r in report.runs if r.probe.control and r.baseline]
    if not shown:
        return ""
    return f" Controls are throttled when 100 x slower than with no censor ({', '.join(shown)})."


def footnote(report: RunReport) -> str:
    control = format_rate(report.control_speed) if report.control_speed else "none"
    rates = sorted({r.rate for r in report.runs if r.rate > 0} or {report.rate})
    if rates[0] <= 0:  # rules that drop or freeze only
        return (f"no rule here slows a flow (they drop); blocked = stalled until its timeout, or reset (control "
                f"{control}).{_baselines(report)} {report.seconds:.0f} s in all.")
    if len(rates) > 1:  # rules of different rates (youtube-2024: TCP and QUIC)
        below = f"below 3 x its rule's rate ({', '.join(format_rate(r) for r in rates)})"
    else:
        below = f"below {format_rate(3 * rates[0])} (3 x the scenario's {format_rate(rates[0])})"
    return (f"throttled = {below} and 10 x slower than the control ({control}; QUIC probes against QUIC "
            f"controls when there are some), and within its tolerance of the speed its rule predicts for the "
            f"transfer (or its expect_rate); blocked = not done: stalled until its timeout, or reset."
            f"{_baselines(report)} {report.seconds:.0f} s in all.")


class Progress:
    """Receives runner updates; draws them live on a terminal, or as periodic lines elsewhere."""

    def __init__(self, title: str, console: Console | None = None, top: float = 1e9 / 8) -> None:
        self.console = console or stderr_console()
        self.title = title
        self.top = top
        self.runs: list[ProbeRun] = []
        self._last_line = 0.0
        self._live: Live | None = None
        self._lock = threading.Lock()

    def update(self, runs: list[ProbeRun]) -> None:
        with self._lock:
            self.runs = runs
            if self._live is not None:
                return  # redrawn by the Live thread
            now = time.monotonic()
            if now - self._last_line >= 5.0:
                self._last_line = now
                parts = [f"{r.probe.name} {format_size(r.bytes)} {format_rate(r.current_speed or r.speed)}"
                         for r in runs if r.started and not r.done]
                if parts:
                    self.console.print("  running: " + "; ".join(parts), highlight=False)

    def phase(self, text: str) -> None:
        self.console.print(f"[dim]· {text}[/dim]")

    def _render(self) -> Table:
        return live_table(self.runs, self.title, self.top)

    @contextmanager
    def shown(self) -> Iterator[Progress]:
        if self.console.is_terminal:
            class _View:
                def __init__(self, outer: Progress) -> None:
                    self.outer = outer

                def __rich__(self) -> Any:
                    return self.outer._render()

            with Live(_View(self), console=self.console, refresh_per_second=1, transient=False) as live:
                self._live = live
                try:
                    yield self
                finally:
                    self._live = None
        else:
            yield self


def _width(stream: Any) -> int | None:
    """Wide enough for the tables in a log or pipe (rich assumes 80 columns there)."""
    return None if stream.isatty() else 140


def stdout_console() -> Console:
    return Console(file=sys.stdout, width=_width(sys.stdout))


def stderr_console() -> Console:
    return Console(stderr=True, width=_width(sys.stderr))
