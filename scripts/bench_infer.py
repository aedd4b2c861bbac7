"""`scripts/bench-infer`: how well `throttle infer` finds the censor, with the lab as ground truth.

Each case is a censor we know (a rule written for it) or loss no censor caused (random drops by a
`loss` rule, congestion from a competing flow through the lab's shaped bottleneck), one transfer of
`pbs.twimg.com` through it (upload or download, TCP or QUIC, at a lab RTT), captured with tcpdump
at the client and at the server (two samples per run), each capture read and inferred by the same
code as `throttle infer`, and the inference for that transfer compared with the truth. Cases
"shared" add a second flow (`video.twimg.com`, same direction) that shares the policer's bucket
(scope rule) for the whole transfer.

It prints a confusion matrix of mechanisms (truth in rows), police precision and recall (the
single-flow cases), the rate and burst errors of the cases called police or window (median, p90;
rates at the IP layer, as the rules are), the fraction of random-loss and congestion cases called
police, and police found in the shared cases, each beside the issue's target with PASS or FAIL.
Progress (case i of N, ETA) goes to stderr. `--reduced` runs the small grid CI runs (a few
minutes); the default is the full grid (hours). Cases that need a lab feature this checkout lacks
(the `rtt` and `bottleneck` scenario keys, the `loss` action) are skipped and counted. Needs root;
builds its own lab (`binfer`) and always takes it down. `--rescore DIR` needs neither: it infers
again the captures an earlier `--keep DIR` kept, to see a change to the fitter on the same packets.

    scripts/bench-infer [--reduced] [--every K [--offset N]] [--only TEXT] [--json] [--lab NAME] [--keep DIR]
    scripts/bench-infer [--reduced] [--every K [--offset N]] [--only TEXT] [--json] --rescore DIR
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from throttle.children import Background
from throttle.kernel.tools import require_tool
from throttle.lab.topology import CLIENT_IF, SERVER_IF, SERVER_V4, Lab
from throttle.measure.bench import Capture
from throttle.measure.clients import upload_file
from throttle.measure.runner import run_scenario
from throttle.scenario import Scenario
from throttle.scenario.load import load_scenario
from throttle.scenario.model import ACTIONS

LAB = "binfer"
NAME, SECOND, CONTROL, OTHER = "pbs.twimg.com", "video.twimg.com", "example.org", "example.net"
TRUTHS = ("police", "window", "shape", "freeze", "reset", "none")
NOT_CENSOR = ("loss", "congestion")  # loss no censor caused: the truth is "none"
TARGETS = {"police_precision": 0.95, "police_recall": 0.95, "rate_error_median": 0.03, "rate_error_p90": 0.10,
           "burst_error_median": 0.25, "not_censor_called_police": 0.05, "shared_police_found": 0.5}


@dataclass(frozen=True)
class Case:
    kind: str  # police, window, shape, freeze, reset, none, loss, congestion
    direction: str = "download"
    transport: str = "tcp"  # tcp (curl over TLS) or quic (the lab's HTTP/3 client)
    size: int = 1 << 20
    rtt_ms: int = 50
    rate_bps: float = 0.0  # police, window, shape: IP-layer bits/s; congestion: the bottleneck
    burst: int = 0
    after_bytes: int = 0  # freeze
    probability: float = 0.0  # loss
    shared: bool = False  # a second flow shares the policer's bucket (scope rule)

    @property
    def truth(self) -> str:
        return "none" if self.kind in NOT_CENSOR else self.kind

    @property
    def label(self) -> str:
        parts = [self.kind, self.direction, self.transport, f"{self.size >> 10}KB", f"rtt {self.rtt_ms}ms"]
        if self.rate_bps:
            parts.append(f"{self.rate_bps / 1000:g}kbit")
        if self.burst:
            parts.append(f"burst {self.burst}")
        if self.probability:
            parts.append(f"p={self.probability}")
        if self.after_bytes:
            parts.append(f"after {self.after_bytes}")
        return " ".join(parts) + (" shared" if self.shared else "")

    def needs(self) -> list[str]:
        """Lab features this case needs that this checkout may lack."""
        need = ["rtt"] if self.rtt_ms else []
        if self.kind == "loss":
            need.append("loss")
        if self.kind == "congestion":
            need.append("bottleneck")
        return need

    def seconds(self) -> float:
        """About how long the transfer takes (for the grid's bound and the ETA)."""
        rate = self.rate_bps or 20e6
        if self.kind in ("freeze", "reset"):
            return 15.0
        return max(self.size - self.burst, 0) * 8 / rate + 3 * self.rtt_ms / 1000 + 2


@dataclass
class Sample:
    case: Case
    side: str  # client or server: where the capture was taken
    called: str  # the inferred mechanism ("missing": no flow of that name and direction)
    confidence: float = 0.0
    rate_bps: float | None = None
    burst: float | None = None
    reason: str = ""
    second_called: str | None = None  # shared cases: the second flow's mechanism
    floor: bool = False  # rate_bps is only a lower bound (the capture showed no more)

    def rate_error(self) -> float | None:
        """The rate's relative error; None for a floor (see `score`'s floors)."""
        if self.rate_bps is None or not self.case.rate_bps or self.floor:
            return None
        return abs(self.rate_bps / self.case.rate_bps - 1)

    def burst_error(self) -> float | None:
        if self.burst is None or not self.case.burst:
            return None
        return abs(self.burst / self.case.burst - 1)


@dataclass
class Summary:
    samples: list[Sample] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


# ---- the grids ------------------------------------------------------------------------------------
def reduced_grid() -> list[Case]:
    """What CI runs: every mechanism once or twice at 50 ms, two police rates and bursts, both
    directions, QUIC once, random loss and congestion, and a shared bucket (about 3-5 minutes)."""
    return [
        Case("police", "upload", rate_bps=1e6, burst=16384, size=1 << 20),
        Case("police", "download", rate_bps=256e3, burst=65536, size=512 << 10),
        Case("police", "download", rate_bps=4e6, burst=131072, size=4 << 20),
        Case("police", "download", transport="quic", rate_bps=1e6, burst=16384, size=1 << 20),
        Case("police", "upload", rate_bps=1e6, burst=32768, size=1 << 20, rtt_ms=150),
        Case("window", "download", rate_bps=130e3, burst=16384, size=256 << 10),
        Case("shape", "download", rate_bps=1e6, burst=16384, size=1 << 20),
        Case("freeze", "download", after_bytes=16384, size=256 << 10),
        Case("reset", "upload", size=256 << 10),
        Case("none", "download", size=4 << 20),
        Case("loss", "download", probability=0.02, size=2 << 20),
        Case("congestion", "download", rate_bps=4e6, size=2 << 20),
        Case("police", "upload", rate_bps=1e6, burst=16384, size=1 << 20, shared=True),
        Case("police", "download", rate_bps=1e6, burst=16384, size=1 << 20, shared=True),
    ]


def full_grid(longest: float = 90.0) -> list[Case]:
    """The benchmark: police 64 kbit/s-20 Mbit/s x bursts 2 KB-2 MB, window, shape, freeze, reset,
    none, random loss 1-2%, congestion; uploads and downloads 256 KB-8 MB, TCP and QUIC; RTT 10,
    50, 150 ms; transfers longer than `longest` seconds left out (64 kbit/s moves 8 MB in 17 min)."""
    cases: list[Case] = []
    rtts, dirs, sizes = (10, 50, 150), ("upload", "download"), (256 << 10, 1 << 20, 8 << 20)
    for rtt, direction, transport, size in itertools.product(rtts, dirs, ("tcp", "quic"), sizes):
        for rate, burst in itertools.product((64e3, 256e3, 1e6, 5e6, 20e6), (2048, 16384, 131072, 2 << 20)):
            cases.append(Case("police", direction, transport, size, rtt, rate, burst))
        cases.append(Case("window", direction, transport, size, rtt, 130e3, 16384))
        cases.append(Case("shape", direction, transport, size, rtt, 1e6, 16384))
        cases.append(Case("none", direction, transport, size, rtt))
        cases += [Case("loss", direction, transport, size, rtt, probability=p) for p in (0.01, 0.02)]
        cases.append(Case("congestion", direction, transport, size, rtt, rate_bps=5e6))
        cases.append(Case("police", direction, transport, size, rtt, 1e6, 16384, shared=True))
        if size == 256 << 10:
            cases.append(Case("freeze", direction, transport, size, rtt, after_bytes=16384))
            if transport == "tcp":
                cases.append(Case("reset", direction, transport, size, rtt))
    # a burst larger than the transfer never empties the bucket: no policing to find
    return [c for c in cases if c.seconds() <= longest and c.burst < c.size // 2]


# ---- one case -------------------------------------------------------------------------------------
def supported() -> set[str]:
    fields = {f.name for f in dataclasses.fields(Scenario)}
    return {k for k in ("rtt", "bottleneck") if k in fields} | ({"loss"} if "loss" in ACTIONS else set())


def scenario_toml(case: Case) -> str:
    """The scenario of one case: its censor (or none), the transfer, and a small control."""
    q = json.dumps
    lines = []
    if case.rtt_ms:
        lines.append(f'rtt = "{case.rtt_ms}ms"')
    if case.kind == "congestion":
        lines.append(f'bottleneck = "{case.rate_bps / 1000:g}kbit"')
    lines += ["[scenario]", f"name = {q('bench-infer')}", f"sources = [{q('scripts/bench-infer: ' + case.label)}]",
              "[model]", "reassemble = true", 'name_sources = ["tls", "quic"]', "[[rule]]", 'name = "truth"',
              f"match = [{q(NAME)}, {q(SECOND)}]", 'direction = "both"']
    if case.kind in ("police", "window", "shape"):
        lines.append(f'scope = "{"rule" if case.shared else "flow"}"')
    if case.kind in ("police", "window", "shape"):
        lines += [f'action = "{"shape" if case.kind == "shape" else "police"}"',
                  f'rate = "{case.rate_bps / 1000:g}kbit"', f'burst = "{case.burst}"']
        if case.kind == "window":
            lines.append('meter = "window"')
    elif case.kind == "freeze":
        lines += ['action = "drop"', f'after_bytes = "{case.after_bytes}"']
    elif case.kind == "reset":
        lines.append('action = "rst"')
    elif case.kind == "loss":
        lines += ['action = "loss"', f"probability = {case.probability}"]
    else:  # none, congestion: a rule that names nothing here
        lines[lines.index(f"match = [{q(NAME)}, {q(SECOND)}]")] = 'match = ["nothing.invalid"]'
        lines.append('action = "drop"')
    expect = {"freeze": "blocked", "reset": "blocked"}.get(case.kind, "normal" if case.truth == "none" else "throttled")
    lines += ["[[probe]]", 'name = "transfer"', f"host = {q(NAME)}", f'direction = "{case.direction}"',
              f'size = "{case.size}"', f'protocol = "{"quic" if case.transport == "quic" else "https"}"',
              f'expect = "{expect}"']
    if expect == "blocked":
        lines.append('timeout = "12s"')
    lines += ["[[probe]]", 'name = "control"', f"host = {q(CONTROL)}", 'direction = "download"', 'size = "64KB"',
              'expect = "normal"', "control = true", ""]
    return "\n".join(lines)


def competing(lab: Lab, case: Case, workdir: Path) -> Background:
    """A TCP transfer in the case's direction beside the case's: to SECOND (sharing the bucket) or
    to OTHER (through the bottleneck)."""
    host = SECOND if case.shared else OTHER
    # about as long as the transfer: sharing the bucket (or the bottleneck), each gets about half
    size = case.size if case.shared else 2 * case.size
    curl = require_tool("curl", "curl")
    argv = [curl, "-4", "-k", "-sS", "-o", "/dev/null", "--max-time", str(int(case.seconds() * 3 + 30)),
            "--resolve", f"{host}:443:{SERVER_V4}"]
    if case.direction == "upload":
        argv += ["-T", str(upload_file(workdir, size)), f"https://{host}/upload"]
    else:
        argv += [f"https://{host}/bytes/{size}"]
    return Background(lab.exec_argv("client", argv), ready="", what="the competing transfer", stop_timeout=5)


def run_case(lab: Lab, case: Case, workdir: Path, infer: Callable[[Path], list[Any]],
             keep: Path | None = None) -> list[Sample]:
    """One run of a case, captured at both ends; a sample per capture (the captures copied to
    `keep`, named after the case, when given)."""
    scen_path = workdir / "case.toml"
    scen_path.write_text(scenario_toml(case))
    scenario = load_scenario(scen_path)
    caps = {side: workdir / f"{side}.pcap" for side in ("client", "server")}
    with Capture(lab, "client", CLIENT_IF, caps["client"], 0), Capture(lab, "server", SERVER_IF, caps["server"], 0), \
            contextlib.ExitStack() as stack:

        def phase(text: str) -> None:
            # The competing flow starts once the censor runs (one it never saw begin would pass
            # unlimited) and before the transfer, so that it is under way for all of it.
            if text == "running the probes" and (case.shared or case.kind == "congestion"):
                stack.enter_context(competing(lab, case, workdir))
                time.sleep(1.0 + 4 * case.rtt_ms / 1000)

        run_scenario(scenario, lab_name=lab.name, keep=True, baseline=False, on_phase=phase,
                     metrics_listen="off")  # the machine-wide default port is the demo's
        time.sleep(0.3)  # the last packets reach the capture files
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        for side, path in caps.items():
            shutil.copyfile(path, kept(keep, case, side))
    return samples_of(case, caps, infer)


def kept(folder: Path, case: Case, side: str) -> Path:
    """Where --keep puts a case's capture at `side` (and where --rescore looks for it)."""
    return folder / (re.sub(r"[^A-Za-z0-9]+", "-", case.label) + f"-{side}.pcap")


def samples_of(case: Case, caps: dict[str, Path], infer: Callable[[Path], list[Any]]) -> list[Sample]:
    """A sample per capture of one run of `case`."""
    samples = []
    for side, path in caps.items():
        infs = infer(path)
        main = _pick(infs, NAME, case)
        second = _pick(infs, SECOND, case) if case.shared else None
        if main is None:
            samples.append(Sample(case, side, "missing", reason="no flow of that name and direction"))
            continue
        samples.append(Sample(case, side, main.mechanism, main.confidence,
                              main.rate_bps.value if main.rate_bps is not None else None,
                              main.burst_bytes.value if main.burst_bytes is not None else None, main.reason,
                              second.mechanism if second is not None else None, main.rate_floor))
    return samples


def _pick(infs: Sequence[Any], name: str, case: Case) -> Any:
    """The inference of `name`'s transfer in the case's direction (the one that carried the most)."""
    transport = "tcp" if case.transport == "tcp" else "quic"
    found = [i for i in infs if i.trace.server_name == name and i.trace.direction == case.direction
             and (i.trace.transport == "tcp") == (transport == "tcp")]
    return max(found, key=lambda i: i.trace.payload, default=None)


def run_grid(cases: Sequence[Case], lab: Lab, infer: Callable[[Path], list[Any]],
             say: Callable[[str], None], keep: Path | None = None) -> Summary:
    summary = Summary()
    have = supported()
    todo = []
    for case in cases:
        missing = [n for n in case.needs() if n not in have]
        if missing:
            summary.skipped[", ".join(missing)] += 1
        else:
            todo.append(case)
    # cases of one RTT together: the lab's delay is set once per RTT, not once per case
    todo.sort(key=lambda c: c.rtt_ms)
    left = sum(c.seconds() + 6 for c in todo)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        for i, case in enumerate(todo, 1):
            done = time.monotonic() - started
            eta = left if i == 1 else done / (i - 1) * (len(todo) - i + 1)
            say(f"case {i} of {len(todo)}: {case.label} (ETA {eta / 60:.1f} min)")
            try:
                got = run_case(lab, case, Path(tmp), infer, keep)
            except Exception as exc:  # a case the lab could not run: counted, the grid goes on
                summary.errors.append(f"{case.label}: {type(exc).__name__}: {exc}")
                say(f"  error: {exc}")
                continue
            summary.samples += got
            say("  " + "; ".join(f"{s.side}: {s.called} ({s.confidence:.2f})"
                                 + (f" {s.rate_bps / 1000:.0f} kbit/s" if s.rate_bps else "") for s in got))
    return summary


# ---- scoring --------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def score(summary: Summary) -> dict[str, Any]:
    single = [s for s in summary.samples if not s.case.shared]
    shared = [s for s in summary.samples if s.case.shared]
    called_police = [s for s in single if s.called == "police"]
    truly_police = [s for s in single if s.case.truth == "police"]
    hits = [s for s in truly_police if s.called == "police"]
    limited = [s for s in single if s.case.truth in ("police", "window") and s.called == s.case.truth]
    rate_errors = [e for s in limited if (e := s.rate_error()) is not None]
    # A floor is no estimate to score against the truth; what it claims (the rate is at least
    # this) is checked instead, within the 3% a TCP sender runs under a bucket's rate.
    floors = [s for s in limited if s.floor and s.rate_bps is not None]
    burst_errors = [e for s in limited if s.case.truth == "police" and (e := s.burst_error()) is not None]
    not_censor = [s for s in single if s.case.kind in NOT_CENSOR]
    labels = list(TRUTHS) + sorted({s.called for s in single} - set(TRUTHS))
    matrix = {t: {c: sum(1 for s in single if s.case.truth == t and s.called == c) for c in labels} for t in TRUTHS}
    return {
        "samples": len(summary.samples), "skipped": dict(summary.skipped), "errors": summary.errors,
        "confusion": matrix, "called": labels,
        "police_precision": len(hits) / len(called_police) if called_police else None,
        "police_recall": len(hits) / len(truly_police) if truly_police else None,
        "rate_error_median": statistics.median(rate_errors) if rate_errors else None,
        "rate_error_p90": percentile(rate_errors, 0.9),
        "burst_error_median": statistics.median(burst_errors) if burst_errors else None,
        "not_censor_called_police": (sum(s.called == "police" for s in not_censor) / len(not_censor)
                                     if not_censor else None),
        "shared_police_found": sum(s.called == "police" for s in shared) / len(shared) if shared else None,
        "rate_floors": len(floors),
        "rate_floors_held": sum(1 for s in floors if s.rate_bps is not None and s.rate_bps <= 1.03 * s.case.rate_bps),
        "counts": {"police": len(truly_police), "rate": len(rate_errors), "burst": len(burst_errors),
                   "not_censor": len(not_censor), "shared": len(shared)},
    }


def verdicts(result: dict[str, Any]) -> dict[str, bool | None]:
    """Each target met (True), missed (False) or not measured (None)."""
    out: dict[str, bool | None] = {}
    for key, target in TARGETS.items():
        value = result[key]
        if value is None:
            out[key] = None
        elif key.startswith(("police_", "shared_")):
            out[key] = value >= target
        else:
            out[key] = value <= target
    return out


def report(result: dict[str, Any]) -> str:
    labels = result["called"]
    lines = ["confusion matrix (rows: the truth; columns: what infer said; client and server captures)",
             "truth \\ called  " + "  ".join(f"{c:>8}" for c in labels)]
    for truth, row in result["confusion"].items():
        lines.append(f"{truth:<15} " + "  ".join(f"{row[c]:>8}" for c in labels))
    lines.append("")
    met = verdicts(result)
    names = {"police_precision": ("police precision", ">="), "police_recall": ("police recall", ">="),
             "rate_error_median": ("rate error, median", "<="), "rate_error_p90": ("rate error, p90", "<="),
             "burst_error_median": ("burst error, median", "<="),
             "not_censor_called_police": ("random loss / congestion called police", "<="),
             "shared_police_found": ("police found, bucket shared", ">=")}
    for key, (text, op) in names.items():
        value = result[key]
        shown = "-" if value is None else f"{value:.3f}"
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[met[key]]
        lines.append(f"{text:<42} {shown:>7}   target {op} {TARGETS[key]:<5}  {verdict}")
    if result.get("rate_floors"):
        lines.append(f"rates given as a floor only (the capture bounds them from below): {result['rate_floors']}, "
                     f"of which {result['rate_floors_held']} at or under the truth (+3%); not in the rate errors")
    lines.append(f"\n{result['samples']} samples; counts {result['counts']}")
    if result["skipped"]:
        lines.append("skipped (this checkout lacks): " + ", ".join(f"{k}: {n}" for k, n in result["skipped"].items()))
    for err in result["errors"]:
        lines.append(f"error: {err}")
    return "\n".join(lines)


def infer_capture(path: Path) -> list[Any]:
    """The reader and the fitter, as `throttle infer` composes them."""
    from throttle.infer.fit import infer
    from throttle.infer.reader import read_traces

    traces, _ = read_traces([str(path)])
    result: list[Any] = infer(traces)
    return result


def bench(cases: Sequence[Case], lab_name: str, say: Callable[[str], None],
          keep: Path | None = None) -> dict[str, Any]:
    lab = Lab(lab_name)
    lab.down()
    try:
        lab.up([NAME, SECOND, CONTROL, OTHER])
        summary = run_grid(cases, lab, infer_capture, say, keep)
    finally:
        lab.down()
    return score(summary)


def rescore(cases: Sequence[Case], folder: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """The captures an earlier run kept (--keep) inferred again, with no lab: the fitter's
    accuracy on the same packets after a change to it."""
    summary = Summary()
    found = [c for c in cases if all(kept(folder, c, side).exists() for side in ("client", "server"))]
    summary.skipped["no kept captures"] = len(cases) - len(found)
    for i, case in enumerate(found, 1):
        say(f"case {i} of {len(found)}: {case.label}")
        summary.samples += samples_of(case, {side: kept(folder, case, side) for side in ("client", "server")},
                                      infer_capture)
    return score(summary)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench-infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--reduced", action="store_true", help="the small grid CI runs (a few minutes)")
    p.add_argument("--lab", default=LAB, help=f"lab name (default {LAB}); taken down first and at the end")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--list", action="store_true", help="list the grid's cases and exit")
    p.add_argument("--only", metavar="TEXT", help="only the cases whose label contains TEXT")
    p.add_argument("--keep", metavar="DIR", type=Path, help="keep each case's two captures in DIR")
    p.add_argument("--rescore", metavar="DIR", type=Path,
                   help="no lab: infer again the captures an earlier --keep DIR kept (after a change to the fitter)")
    p.add_argument("--every", metavar="K", type=int, default=1,
                   help="every K-th case of the grid only (a sample of the full grid in 1/K of its time)")
    p.add_argument("--offset", metavar="N", type=int, default=0,
                   help="with --every: start at the N-th case (0-based), for a sample the first one did not take")
    a = p.parse_args(argv)
    cases = reduced_grid() if a.reduced else full_grid()
    if a.only:
        cases = [c for c in cases if a.only in c.label]
    if a.every < 1 or not 0 <= a.offset < a.every:
        p.error("--every takes a whole number of 1 or more, and --offset one from 0 to K-1")
    cases = cases[a.offset::a.every]
    if a.list:
        for case in cases:
            print(case.label)
        print(f"{len(cases)} cases, about {sum(c.seconds() + 6 for c in cases) / 60:.0f} min", file=sys.stderr)
        return 0
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if a.rescore is not None:
        if not a.rescore.is_dir():
            p.error(f"--rescore {a.rescore}: no such folder (make one with --keep)")
        result = rescore(cases, a.rescore, say)
    else:
        result = bench(cases, a.lab, say, a.keep)
    print(json.dumps(result, indent=2) if a.json else report(result))
    return 0 if all(v is not False for v in verdicts(result).values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
