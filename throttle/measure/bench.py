"""`throttle bench`: a scenario run N times with packet captures, and what the captures show.

This module owns the repeat loop, the two captures per repeat (tcpdump on both interfaces of the
censor namespace), the analysis of those captures, and the files written for a benchmark:
`results.json`, `results.csv`, `flows.json`, `summary.md`, the plots (`throttle.measure.plots`) and the
captures themselves under `captures/`.

The analysis measures the censor from the outside, as the measurement papers did (docs/incidents.md
§1.9-11, §1.16), independently of the censor's own counters:

- throughput: payload bytes per 100 ms of the probe's direction on the far side of the censor
  (uploads on `to-server`, downloads on `to-client`), i.e. what got through;
- drops: segments seen entering the censor that never left it. Each (seq, len) leaving is paired
  with the earliest copy of it that entered no later, so a retransmission that gets through does
  not hide the drop of an earlier copy.

The analysis functions are pure: packet records in, bins and counts out, tested without root.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import ipaddress
import json
import os
import platform
import random
import statistics
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from throttle import __version__
from throttle.children import Background
from throttle.errors import ThrottleError
from throttle.files import atomic_write
from throttle.kernel.tools import require_tool
from throttle.lab.topology import CENSOR_CLIENT_IF, CENSOR_SERVER_IF, Lab, Link
from throttle.measure.judge import reference_rate
from throttle.measure.ports import PORTS, ProbePorts
from throttle.measure.report import RunReport
from throttle.measure.runner import client_class, run_scenario
from throttle.scenario import Probe, Scenario
from throttle.units import format_rate
from throttle.wire.ip import TCP, UDP, decode
from throttle.wire.pcap import read_packets

__all__ = [
    "BIN", "BenchResult", "BenchRow", "FlowStats", "Segment", "bench", "bin_payload", "drop_times", "flow_segments",
    "middle_rate", "parse_segment", "summary_markdown", "write_csv", "write_json",
]

BIN = 0.1  # seconds per throughput / drop bin
PACKAGES = ("netfilterqueue", "pyroute2", "cryptography", "prometheus-client", "typer", "rich", "matplotlib", "numpy")
CSV_FIELDS = ("repeat", "probe", "host", "direction", "bytes", "seconds", "speed_bps", "expected", "observed",
              "passed", "control", "error", "capture_bytes", "drops", "middle_bps", "middle_median_bps")


class Segment(NamedTuple):
    """One TCP/UDP packet from a capture; `length` is the transport payload, from the IP lengths."""

    time: float
    src: str
    dst: str
    sport: int
    dport: int
    proto: int
    seq: int
    length: int


# ---- parsing -------------------------------------------------------------------------------------
def parse_segment(ts: float, ip: bytes) -> Segment | None:
    """A TCP or UDP packet's addressing, sequence number and payload length; None for anything else.

    The payload length comes from the IP header's length fields, so captures cut at a small snap
    length (`tcpdump -s 128`) still count every byte."""
    d = decode(ip)
    if d is None:
        return None
    seq = d.seq
    if d.proto == UDP:
        # No sequence number: a datagram is known by its first payload bytes, the same on both
        # sides of the censor (a QUIC packet's are its encrypted header and payload).
        seq = zlib.crc32(ip[d.payload_offset : d.payload_offset + 64])
    return Segment(ts, _address(d.src), _address(d.dst), d.sport, d.dport, d.proto, seq, d.payload_length)


def _address(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def read_segments(path: Path) -> list[Segment]:
    out = []
    for ts, ip in read_packets(str(path)):
        seg = parse_segment(ts, ip)
        if seg is not None:
            out.append(seg)
    return out


# ---- flows ---------------------------------------------------------------------------------------
def probe_index(port: int, probes: Sequence[Probe], ports: ProbePorts = PORTS) -> int | None:
    """The probe whose client port range (`throttle.measure.ports`) holds `port`, among the probes
    whose clients take one (every kind but a command or a browser, whose packets bench cannot find)."""
    index = ports.owner(port)
    if index is None or index >= len(probes) or not client_class(probes[index].protocol).takes_ports:
        return None
    return index


def flow_segments(segments: Iterable[Segment], probes: Sequence[Probe],
                  ports: ProbePorts = PORTS) -> dict[int, list[Segment]]:
    """Probe index -> its TCP segments or UDP datagrams (both directions), in capture order: the
    packets from or to its client port range, over its transport (UDP for QUIC, else TCP)."""
    out: dict[int, list[Segment]] = defaultdict(list)
    for seg in segments:
        if seg.proto != TCP and seg.proto != UDP:
            continue
        index = probe_index(seg.sport, probes, ports)
        if index is None:
            index = probe_index(seg.dport, probes, ports)
        if index is not None and (seg.proto == UDP) == client_class(probes[index].protocol).udp:
            out[index].append(seg)
    return dict(out)


def from_client(seg: Segment, index: int, ports: ProbePorts = PORTS) -> bool:
    """Whether a segment travels client to server (its source port is the client's)."""
    lo, hi = ports.client(index)
    return lo <= seg.sport <= hi


# ---- analysis (pure) -----------------------------------------------------------------------------
def bin_payload(times_and_lengths: Iterable[tuple[float, int]], t0: float, width: float = BIN,
                until: float | None = None) -> list[int]:
    """Payload bytes per `width`-second bin from `t0`; bins run to the last packet (or `until`)."""
    items = [(t, n) for t, n in times_and_lengths if t >= t0]
    last = max([t for t, _ in items], default=t0) if until is None else until
    bins = [0] * (int((last - t0) / width) + 1)
    for t, n in items:
        k = int((t - t0) / width)
        if k < len(bins):
            bins[k] += n
    return bins


def drop_times(entering: Iterable[tuple[float, int, int]], leaving: Iterable[tuple[float, int, int]],
               slack: float = 0.001) -> list[float]:
    """Times of segments that entered (time, seq, len) and never left; payload-carrying ones only.

    For each (seq, len), the copies that left are paired with copies that entered no later (plus
    `slack` for the two captures' timestamps), as many pairs as possible; copies left unpaired were
    dropped. Among the copies waiting when one leaves, the latest is taken: a policer forwards at
    once, so an older copy still waiting was the one dropped. (Since every copy waiting for one
    departure also waits for the later ones, this greedy choice still pairs as many as possible,
    so a copy held in the censor's queue while its retransmission passes is not a drop.)"""
    entered: dict[tuple[int, int], list[float]] = defaultdict(list)
    left: dict[tuple[int, int], list[float]] = defaultdict(list)
    for t, seq, n in entering:
        if n > 0:
            entered[(seq, n)].append(t)
    for t, seq, n in leaving:
        if n > 0:
            left[(seq, n)].append(t)
    drops: list[float] = []
    for key, ins in entered.items():
        ins.sort()
        waiting: list[float] = []
        i = 0
        for t_out in sorted(left.get(key, ())):
            while i < len(ins) and ins[i] <= t_out + slack:
                waiting.append(ins[i])
                i += 1
            if waiting:
                waiting.pop()
        drops.extend(waiting)
        drops.extend(ins[i:])
    return sorted(drops)


def count_bins(times: Iterable[float], t0: float, nbins: int, width: float = BIN) -> list[int]:
    bins = [0] * nbins
    for t in times:
        k = int((t - t0) / width)
        if 0 <= k < nbins:
            bins[k] += 1
    return bins


def middle_rate(bins: Sequence[int], width: float = BIN, lo: float = 0.25, hi: float = 0.75,
                window: float = 1.0) -> tuple[float, float]:
    """(median, mean) bytes/s over the part between fractions `lo` and `hi` of the flow's active time.

    The active time runs from the first to the last non-empty bin; the middle leaves out the initial
    burst and the tail. The median is over whole `window`-second spans, not single bins: a policed
    TCP flow alternates between empty bins and bins of two or three segments (the saw-tooth), so the
    median of 100 ms bins says more about the round-trip time than about the rate. A middle part
    shorter than one window gives its mean for both."""
    nz = [k for k, b in enumerate(bins) if b > 0]
    if not nz:
        return 0.0, 0.0
    first, last = nz[0], nz[-1]
    a = first + int((last - first + 1) * lo)
    b = max(a + 1, first + int((last - first + 1) * hi))
    part = list(bins[a:b])
    mean = sum(part) / (len(part) * width)
    per = max(1, round(window / width))
    spans = [sum(part[k : k + per]) / (per * width) for k in range(0, len(part) - per + 1, per)]
    return (statistics.median(spans) if spans else mean), mean


@dataclass
class FlowStats:
    """What the captures show for one probe in one repeat."""

    repeat: int
    index: int
    probe: str
    direction: str
    t0: float = 0.0  # capture time of the flow's first packet
    passed_bins: list[int] = field(default_factory=list)  # payload bytes per bin, far side
    drop_bins: list[int] = field(default_factory=list)  # dropped segments per bin
    capture_bytes: int = 0
    drops: int = 0
    middle_median: float = 0.0  # bytes/s, median of 1 s spans of the middle part (`middle_rate`)
    middle_mean: float = 0.0  # bytes/s, mean of the middle part

    def to_json(self) -> dict[str, Any]:
        return {"repeat": self.repeat, "probe": self.probe, "direction": self.direction, "bin_seconds": BIN,
                "capture_bytes": self.capture_bytes, "drops": self.drops,
                "middle_median_bytes_per_second": round(self.middle_median, 1),
                "middle_mean_bytes_per_second": round(self.middle_mean, 1),
                "passed_bytes_per_bin": self.passed_bins, "drops_per_bin": self.drop_bins}


def analyse_flow(repeat: int, index: int, probe: Probe, client_side: Sequence[Segment],
                 server_side: Sequence[Segment], ports: ProbePorts = PORTS) -> FlowStats:
    """Throughput and drops of one probe from its segments on both censor interfaces."""
    stats = FlowStats(repeat, index, probe.name, probe.direction)
    everything = [*client_side, *server_side]
    if not everything:
        return stats
    stats.t0 = min(s.time for s in everything)
    up = probe.direction == "upload"

    def forward(s: Segment) -> bool:
        return from_client(s, index, ports) == up

    entering = [s for s in (client_side if up else server_side) if forward(s)]
    leaving = [s for s in (server_side if up else client_side) if forward(s)]
    until = max(s.time for s in everything)
    stats.passed_bins = bin_payload(((s.time, s.length) for s in leaving), stats.t0, until=until)
    drops = drop_times(((s.time, s.seq, s.length) for s in entering), ((s.time, s.seq, s.length) for s in leaving))
    stats.drop_bins = count_bins(drops, stats.t0, len(stats.passed_bins))
    stats.capture_bytes = sum(stats.passed_bins)
    stats.drops = len(drops)
    stats.middle_median, stats.middle_mean = middle_rate(stats.passed_bins)
    return stats


# ---- writers (pure but for the file) -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BenchRow:
    """One probe in one repeat: what its client measured, and what the captures showed."""

    repeat: int
    probe: str
    host: str
    direction: str
    bytes: int
    seconds: float
    speed_bps: float  # bits per second, as the client measured
    expected: str
    observed: str
    passed: bool
    control: bool
    error: str
    capture_bytes: int
    drops: int
    middle_bps: float  # bits per second, mean of the middle part of the flow (captures)
    middle_median_bps: float  # bits per second, median of its 1 s spans
    capture_lost_packets: int = 0  # packets tcpdump itself dropped in that repeat

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_json(path: Path, rows: Sequence[BenchRow], reproduce: dict[str, Any], extra: dict[str, Any]) -> None:
    data = {**extra, "reproduce": reproduce, "rows": [r.to_json() for r in rows]}
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def write_csv(path: Path, rows: Sequence[BenchRow]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow(row.to_json())
    atomic_write(path, buf.getvalue().encode())


def _kbit(bytes_per_second: float) -> str:
    return f"{bytes_per_second * 8 / 1000:.1f}"


def summary_markdown(scenario_name: str, rate: float, repeat: int, rows: Sequence[BenchRow]) -> str:
    """One table line per probe: median speed, min-max, expected, observed in k of n repeats."""
    lines = [f"# {scenario_name}: {repeat} repeat{'s' if repeat != 1 else ''}", "",
             f"Scenario rate: {format_rate(rate) if rate > 0 else 'none'}. Speeds are kbit/s as the client "
             "measured them; drops and the middle rate come from the captures on the censor's interfaces.", "",
             "| probe | direction | median kbit/s | min-max kbit/s | capture middle kbit/s | drops (median) "
             "| expected | observed | passed |",
             "|---|---|---:|---:|---:|---:|---|---|---|"]
    by_probe: dict[str, list[BenchRow]] = {}
    for row in rows:
        by_probe.setdefault(row.probe, []).append(row)
    for name, rs in by_probe.items():
        speeds = [r.speed_bps / 8 for r in rs]
        observed = [r.observed for r in rs]
        counts = ", ".join(f"{o} {observed.count(o)} of {len(rs)}" for o in dict.fromkeys(observed))
        middle = statistics.median(r.middle_bps / 8 for r in rs)
        drops = statistics.median(r.drops for r in rs)
        lines.append(f"| {name} | {rs[0].direction} | {_kbit(statistics.median(speeds))} | "
                     f"{_kbit(min(speeds))}-{_kbit(max(speeds))} | {_kbit(middle)} | {drops:g} | {rs[0].expected} | "
                     f"{counts} | {sum(r.passed for r in rs)} of {len(rs)} |")
    return "\n".join(lines) + "\n"


# ---- the run -------------------------------------------------------------------------------------
@dataclass
class BenchResult:
    out: Path
    rows: list[BenchRow]
    flows: list[FlowStats]
    files: dict[str, Path]  # results.json, results.csv, flows.json, summary.md, the PNGs
    reproduce: dict[str, Any]
    reports: list[RunReport] = field(default_factory=list)  # each repeat's judged run

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)


class Capture(Background):
    """tcpdump on one interface of a namespace, writing a pcap; stopped with SIGINT, always.

    `--immediate-mode`: without it libpcap hands packets over a ring block at a time, and on SIGINT
    tcpdump exits without the block it had not been given yet: up to a second of a flow's end lost."""

    def __init__(self, lab: Lab, role: str, iface: str, path: Path) -> None:
        tcpdump = require_tool("tcpdump", "tcpdump")
        super().__init__(lab.exec_argv(role, [tcpdump, "-n", "-i", iface, "-s", "128", "-U", "--immediate-mode",
                                              "-Z", "root", "-w", str(path), "tcp", "or", "udp"]),
                         ready="listening on", what="tcpdump", fix="apt-get install tcpdump", stop_timeout=10)
        self.path = path

    @property
    def kernel_drops(self) -> int:
        for line in self.tail.splitlines():
            if "dropped by kernel" in line:
                return int(line.split()[0])
        return 0


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def constraints() -> dict[str, Any]:
    """The pinned versions the project was tested with (throttle/data/constraints.txt), and whether
    what is installed here matches them: `pip install -c FILE` with these pins reproduces the run."""
    text = (resources.files("throttle") / "data" / "constraints.txt").read_text()
    pins = dict(line.split("==", 1) for line in text.splitlines() if "==" in line and not line.startswith("#"))
    differ = {}
    for name, pinned in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if installed != pinned:
            differ[name] = installed
    return {"file": "throttle/data/constraints.txt", "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "pins": pins, "installed_differs": differ}


def reproduce_block(scenario: Scenario, repeat: int, seed: int) -> dict[str, Any]:
    path = Path(scenario.path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return {"scenario": scenario.name, "scenario_file": str(path.resolve()) if path.is_file() else scenario.path,
            "scenario_sha256": digest, "throttle": __version__, "kernel": os.uname().release,
            "python": platform.python_version(), "packages": _versions(), "constraints": constraints(), "seed": seed,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "repeat": repeat}


def bench(scenario: Scenario, repeat: int, out: Path, lab_name: str = "bench5",
          progress: Callable[[int, int, str], None] | None = None, seed: int | None = None,
          keep: bool = False, metrics_listen: str | None = None) -> BenchResult:
    """Run `scenario` `repeat` times in one lab, capture every repeat, write the results to `out`.

    `progress(done, total, text)` is called as repeats start and finish; `done` is the number of
    repeats finished. The lab is brought up once and taken down at the end, unless it was up
    before or `keep` is set."""

    if repeat < 1:
        raise ThrottleError(f"--repeat {repeat}: repeat at least once")
    seed = random.SystemRandom().randrange(2**32) if seed is None else seed
    # Nothing in a bench draws randomness yet (the runner writes its own upload files); the seed is
    # recorded so that anything random added later draws from random.Random(seed).
    out = Path(out)
    captures = out / "captures"
    captures.mkdir(parents=True, exist_ok=True)
    tell = progress or (lambda done, total, text: None)
    reproduce = reproduce_block(scenario, repeat, seed)
    rate = reference_rate(scenario)
    rows: list[BenchRow] = []
    flows: list[FlowStats] = []
    lab = Lab(lab_name)
    keep = keep or lab.status().up
    reports: list[RunReport] = []
    done = 0
    try:
        tell(0, repeat, "bringing the lab up")
        lab.up(sorted({p.host for p in scenario.probes}), Link.of(scenario))
        for r in range(1, repeat + 1):
            tell(r - 1, repeat, f"repeat {r} of {repeat}: running the probes")
            paths = {i: captures / f"repeat-{r}-{i}.pcap" for i in (CENSOR_CLIENT_IF, CENSOR_SERVER_IF)}
            with Capture(lab, "censor", CENSOR_CLIENT_IF, paths[CENSOR_CLIENT_IF]) as cap_c, \
                    Capture(lab, "censor", CENSOR_SERVER_IF, paths[CENSOR_SERVER_IF]) as cap_s:
                report = run_scenario(scenario, lab_name=lab_name, keep=True, metrics_listen=metrics_listen,
                                      on_phase=functools.partial(_tell_repeat, tell, r, repeat))
                time.sleep(0.3)  # the last packets reach the capture files
            reports.append(report)
            tell(r - 1, repeat, f"repeat {r} of {repeat}: reading the captures")
            client_side = flow_segments(read_segments(paths[CENSOR_CLIENT_IF]), scenario.probes)
            server_side = flow_segments(read_segments(paths[CENSOR_SERVER_IF]), scenario.probes)
            lost = cap_c.kernel_drops + cap_s.kernel_drops
            for i, run in enumerate(report.runs):
                stats = analyse_flow(r, i, run.probe, client_side.get(i, []), server_side.get(i, []))
                flows.append(stats)
                rows.append(BenchRow(
                    repeat=r, probe=run.probe.name, host=run.probe.host, direction=run.probe.direction,
                    bytes=run.bytes, seconds=round(run.seconds, 4), speed_bps=round(run.speed * 8, 1),
                    expected=run.probe.expect, observed=run.observed, passed=run.passed,
                    control=run.probe.control, error=run.error, capture_bytes=stats.capture_bytes,
                    drops=stats.drops, middle_bps=round(stats.middle_mean * 8, 1),
                    middle_median_bps=round(stats.middle_median * 8, 1), capture_lost_packets=lost,
                ))
            done = r
            tell(r, repeat, f"repeat {r} of {repeat}: {sum(run.passed for run in report.runs)} of "
                            f"{len(report.runs)} probes as expected")
    finally:
        if not keep:
            tell(done, repeat, "taking the lab down")
            lab.down()

    files = {name: out / name for name in ("results.json", "results.csv", "flows.json", "summary.md")}
    extra = {"scenario": scenario.name, "rate_bytes_per_second": rate, "bin_seconds": BIN,
             "speed_unit": "speed_bps, middle_bps and middle_median_bps are bits per second"}
    write_json(files["results.json"], rows, reproduce, extra)
    write_csv(files["results.csv"], rows)
    atomic_write(files["flows.json"], (json.dumps([f.to_json() for f in flows]) + "\n").encode())
    atomic_write(files["summary.md"], summary_markdown(scenario.name, rate, repeat, rows).encode())
    files.update(write_plots(scenario, rate, rows, flows, out))
    return BenchResult(out, rows, flows, files, reproduce, reports)


def _tell_repeat(tell: Callable[[int, int, str], None], r: int, repeat: int, text: str) -> None:
    tell(r - 1, repeat, f"repeat {r} of {repeat}: {text}")


def pick_flows(scenario: Scenario, flows: Sequence[FlowStats]) -> tuple[FlowStats | None, FlowStats | None]:
    """The first repeat's most telling throttled flow (most drops) and its first control flow."""
    first = [f for f in flows if f.repeat == min((g.repeat for g in flows), default=1)]
    by_name = {p.name: p for p in scenario.probes}
    throttled = [f for f in first if by_name[f.probe].expect == "throttled" and f.passed_bins]
    control = [f for f in first if by_name[f.probe].control and f.passed_bins]
    best = max(throttled, key=lambda f: (f.drops, f.capture_bytes), default=None)
    return best, (control[0] if control else None)


def write_plots(scenario: Scenario, rate: float, rows: Sequence[BenchRow], flows: Sequence[FlowStats],
                out: Path) -> dict[str, Path]:
    from throttle.measure import plots

    files = {"speeds.png": out / "speeds.png"}
    plots.plot_speeds(files["speeds.png"], scenario.name, rate, rows)
    throttled, control = pick_flows(scenario, flows)
    if throttled is not None or control is not None:
        files["throughput.png"] = out / "throughput.png"
        plots.plot_throughput(files["throughput.png"], scenario.name, rate, throttled, control)
    if throttled is not None and any(r.action == "police" for r in scenario.rules):
        files["drops.png"] = out / "drops.png"
        plots.plot_drops(files["drops.png"], scenario.name, throttled)
    return files
