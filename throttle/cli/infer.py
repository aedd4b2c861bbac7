"""`throttle infer`: captures in, the censor that explains each flow out (a table, JSON, a figure),
and with `--write` a scenario that reproduces them, which `--check` runs in the lab and compares.

Reading is robust: a capture cut short reports the flows before the cut, with a warning; a file
that is missing or not a capture at all is a one-line error naming it (exit 2). `--check` exits 1
when the lab's run differs from the capture (a mechanism, or a rate more than 10% off).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import typer

from throttle.cli.options import emit_json, json_option, lab_option, output_option
from throttle.errors import ThrottleError
from throttle.infer.trace import Estimate, FlowTrace, Inference

CAPTURE_FIX = "give a pcap or pcapng file (tcpdump -w FILE, tshark, Wireshark)"
REASONS = ("police: losses when a fitted token bucket is empty; window: losses in periodic blackouts; shape: delay "
           "grows while the rate holds; freeze: nothing after N bytes; reset: a RST the endpoint did not send; "
           "timeout: nothing after the hello; crawl: a handshake taking seconds; none: no loss a censor explains")


def _value(e: Estimate | None) -> float | None:
    return None if e is None else e.value


def _error(e: Estimate | None) -> float | None:
    return None if e is None else e.error


def flow_json(inf: Inference) -> dict[str, Any]:
    """One inference as `--json` prints it: every key always present, null when not applicable."""
    t = inf.trace
    return {
        "client": t.client, "server": t.server, "server_name": t.server_name, "name_source": t.name_source,
        "transport": t.transport, "direction": t.direction, "vantage": t.vantage,
        "started_mid_flow": t.started_mid_flow, "mechanism": inf.mechanism, "confidence": round(inf.confidence, 3),
        "reason": inf.reason, "rate_bps": _value(inf.rate_bps), "rate_error_bps": _error(inf.rate_bps),
        "rate_is_floor": inf.rate_floor,
        "burst_bytes": _value(inf.burst_bytes), "burst_error_bytes": _error(inf.burst_bytes),
        "after_bytes": inf.after_bytes, "period_s": _value(inf.period), "period_error_s": _error(inf.period),
        "duty": _value(inf.duty), "duty_error": _error(inf.duty), "queue_delay_s": _value(inf.queue_delay),
        "queue_delay_error_s": _error(inf.queue_delay), "base_rtt_s": t.base_rtt, "payload_bytes": t.payload,
        "delivered_bytes": t.delivered, "packets": t.packets, "losses": t.lost,
        "scores": {k: round(v, 4) for k, v in sorted(inf.scores.items())},
    }


def _kbit(e: Estimate | None) -> str:
    if e is None:
        return ""
    return f"{e.value / 1000:.1f} ± {e.error / 1000:.1f}"


def _bytes(e: Estimate | None) -> str:
    return "" if e is None else f"{e.value:,.0f} ± {e.error:,.0f}"


def table_rows(infs: Sequence[Inference]) -> list[list[str]]:
    rows = []
    for inf in infs:
        t = inf.trace
        period = "" if inf.period is None else f"{inf.period.value:.3g} s"
        if inf.duty is not None:
            period += f" / {inf.duty.value:.0%}"
        delay = "" if inf.queue_delay is None else f"{inf.queue_delay.value * 1000:.0f} ms"
        rows.append([t.client, t.server, t.server_name or "", t.transport, t.direction, inf.mechanism,
                     f"{inf.confidence:.2f}", (">= " if inf.rate_floor else "") + _kbit(inf.rate_bps),
                     _bytes(inf.burst_bytes),
                     "" if inf.after_bytes is None else f"{inf.after_bytes:,}", period, delay, inf.reason])
    return rows


HEADER = ("client", "server", "name", "transport", "direction", "mechanism", ">confidence", ">rate kbit/s",
          ">burst B", ">after B", "period/duty", ">queue delay", "reason")


def _readable(captures: Sequence[Path]) -> None:
    """A file that gives nothing (missing, not a capture, broken before its first packet) is an
    error naming it and the fix."""
    from throttle.wire.pcap import read_packets

    for path in captures:
        if not path.is_file():
            raise ThrottleError(f"{path}: {'is a folder' if path.is_dir() else 'no such file'}; {CAPTURE_FIX}")
        # its header and first packet say whether it is a capture at all (CaptureError names the fix)
        next(iter(read_packets(str(path))), None)


def _warnings(problems: Sequence[str]) -> list[str]:
    return [f"{problem}; the flows before that point are reported" for problem in problems]


def read_captures(captures: Sequence[Path]) -> tuple[list[FlowTrace], list[str]]:
    """Every capture's traces, and a warning per capture cut short."""
    _readable(captures)
    from throttle.infer.reader import read_traces

    traces, problems = read_traces([str(p) for p in captures])
    return traces, _warnings(problems)


def fit(traces: list[FlowTrace]) -> list[Inference]:
    from throttle.infer.fit import infer as fit_traces

    result: list[Inference] = fit_traces(traces)
    return result


def read_and_fit(captures: Sequence[Path], keep_packets: bool) -> tuple[list[Inference], list[str]]:
    """The captures' inferences and a warning per capture cut short. One capture is fitted as it is
    read, in memory that does not grow with its length (`throttle.infer.stream`), unless the
    inferences must keep their packets (`keep_packets`: a plot); two are matched packet by packet."""
    if keep_packets or len(captures) != 1:
        traces, warnings = read_captures(captures)
        return fit(traces), warnings
    _readable(captures)
    from throttle.infer.stream import infer_capture as fit_as_read

    infs, problem = fit_as_read(str(captures[0]))
    return infs, _warnings([] if problem is None else [problem])


def infer_capture(path: Path) -> list[Inference]:
    """A capture the lab wrote (`--check`, the benchmark): its inferences, warnings dropped."""
    return read_and_fit([path], False)[0]


def infer(
    captures: list[Path] = typer.Argument(..., help="pcap or pcapng files: one capture, or the client's and the "
                                          "server's of the same connections together.", show_default=False),
    as_json: bool = json_option(),
    output: Optional[Path] = output_option(),
    write: Optional[Path] = typer.Option(None, "--write", help="Write a scenario that reproduces the capture "
                                         "(TOML; it loads with `throttle scenarios validate`).", dir_okay=False),
    check: bool = typer.Option(False, "--check", help="Run that scenario in the lab, capture at the same place, "
                               "infer again and compare; exit 1 when a mechanism differs or a rate is >10% off. "
                               "Needs root."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw each limited flow (sequence against time, "
                                        "losses, the fitted bucket) into this PNG.", dir_okay=False),
    lab_name: str = lab_option(),
) -> None:
    """Infer the censor from captures: for each flow direction that carried data, the mechanism
    (police, window, shape, freeze, reset, timeout, crawl or none), its parameters and why. No root
    needed (but `--check`)."""
    if check:
        from throttle.extras import require
        from throttle.kernel.tools import require_root

        require_root("throttle infer --check runs the scenario in the lab and needs root")
        require("live", "throttle infer --check")
    if plot is not None:
        from throttle.extras import require

        require("plots", "throttle infer --plot", ("matplotlib",))
    infs, warnings = read_and_fit(captures, keep_packets=plot is not None)
    for warning in warnings:
        typer.echo(f"throttle: warning: {warning}", err=True)
    if as_json or output is not None:
        emit_json({"flows": [flow_json(i) for i in infs]}, as_json, output)
    if not as_json:
        _print_table(infs, captures)
    if plot is not None:
        from throttle.infer.plot import plot_inferences

        drawn = plot_inferences(infs, plot)
        typer.echo(f"written: {plot} ({drawn} limited flows)" if drawn else
                   f"written: {plot} (nothing limited to draw)", err=True)
    scenario_path = write
    if write is not None or check:
        from throttle.infer.scenario_out import write_scenario

        if scenario_path is None:
            scenario_path = Path(tempfile.mkdtemp(prefix="throttle-infer-")) / "inferred.toml"
        write_scenario(scenario_path, infs, captures)
        typer.echo(f"written: {scenario_path} (`throttle run {scenario_path}` runs it)", err=True)
    if check:
        assert scenario_path is not None
        raise typer.Exit(_check(scenario_path, infs, lab_name))


def _print_table(infs: Sequence[Inference], captures: Sequence[Path]) -> None:
    from throttle.cli.output import format_table

    typer.echo(format_table([h.lstrip(">") for h in HEADER], table_rows(infs)))
    limited = sum(i.mechanism != "none" for i in infs)
    typer.echo(f"\n{len(infs)} flow directions with data in {', '.join(map(str, captures))}, {limited} limited.\n"
               f"{REASONS}.")


def _check(scenario_path: Path, infs: list[Inference], lab_name: str) -> int:
    from rich.table import Table

    from throttle.cli.views import Progress, stdout_console
    from throttle.infer.check import check_scenario

    progress = Progress(f"checking {scenario_path} in lab {lab_name}")
    with progress.shown():
        result = check_scenario(scenario_path, infs, infer_capture, lab_name=lab_name, on_phase=progress.phase)
    table = Table(title=f"capture against the lab ({result.vantage} side): "
                        + ("the same" if result.passed else "DIFFERENT"), title_justify="left")
    for name in ("name", "direction", "capture", "lab", "difference"):
        table.add_column(name)
    for row in result.rows:
        table.add_row(row.name, row.direction, row.original, row.again, row.difference,
                      style=None if row.same else "bold red")
    console = stdout_console()
    console.print(table)
    console.print(f"the lab's capture: {result.capture}; the run's own verdicts: "
                  + ("every probe as expected" if result.probes_passed else "some probes not as expected"
                     " (`throttle run` on the scenario shows which)"), style="dim", highlight=False)
    return 0 if result.passed else 1
