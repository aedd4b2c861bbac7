"""`throttle run`: a scenario end to end, in the lab, with real clients, judged by measured speed.

The runner brings the lab up (or reuses it), starts `throttle censor` with the scenario in the
lab's censor namespace, runs every probe with its client (`throttle.measure.clients`) in the
client namespace, and has each judged by what it measured (`throttle.measure.judge`). With a lab
that runs elsewhere (`throttle run --external`), `throttle.measure.external` gives the `Runner` its
lab object instead and starts nothing.

Controls run first so their speed is known; the other probes then run together when the scenario's
buckets are per flow and nothing is sticky (and no client would crowd the others), else one after
another in file order. Every control also runs once before the censor starts, on an ephemeral port,
for its speed with no censor (its baseline).

Threads, and who owns what:

- one thread per probe running at once (the caller's thread when they run one at a time): it owns
  its client and its process (`throttle.children.watch`), reading both pipes until its deadline;
- the `ss` poller: uploads' progress over TCP (what the server acknowledged), downloads' TCP bytes;
- in demo mode (`busy_controls`), one thread repeating the controls while the others run.

Every `ProbeRun` of `Runner.runs` is read and written under `Runner._lock` while they run; the
`on_update` callback gets snapshots taken under it, never the runs themselves. Once those threads
are joined, the caller's thread judges the runs (still under the lock, as a thread that outlived its
join could still write).
"""

from __future__ import annotations

import functools
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from throttle.children import Background, capture, watch
from throttle.errors import ThrottleError
from throttle.kernel.tools import require_tool
from throttle.lab.topology import Lab, Link
from throttle.measure.clients import (CAUSE_LAB, SINK_PORT, CurlClient, Exit, Outcome, ProbeClient, QuicClient,
                                      RawTlsClient, Setup, default_timeout)
from throttle.measure.commands import BrowserClient, CommandClient
from throttle.measure.judge import Figures, judge, reference_rate
from throttle.measure.predict import expected, limiting_rule
from throttle.measure.ports import PORTS, ProbePorts
from throttle.measure.report import ProbeRun, RunReport
from throttle.scenario import Probe, Scenario

__all__ = ["CLIENTS", "SINK_PORT", "CensorProcess", "ProbeLab", "ProbeRun", "RunReport", "Runner", "client_class",
           "run_scenario", "ss_counts"]

SPEED_WINDOW = 4.0  # seconds the live speed is averaged over

CLIENTS: dict[str, type[ProbeClient]] = {"https": CurlClient, "http": CurlClient, "tls": RawTlsClient,
                                         "quic": QuicClient, "command": CommandClient, "browser": BrowserClient}


def client_class(protocol: str) -> type[ProbeClient]:
    """The client of a probe kind (`Probe.protocol`)."""
    return CLIENTS[protocol]


def ss_counts(out: str) -> dict[int, tuple[int | None, int | None]]:
    """Local port -> (bytes_acked, bytes_received) of `ss -tinH` output (a socket's line, then its
    indented info line)."""
    counts: dict[int, tuple[int | None, int | None]] = {}
    port: int | None = None
    for line in out.splitlines():
        if not line.startswith(("\t", " ")):
            fields = line.split()
            local = fields[3].rsplit(":", 1)[-1] if len(fields) >= 4 else ""
            port = int(local) if local.isdigit() else None
            continue
        if port is not None:
            acked, received = re.search(r"bytes_acked:(\d+)", line), re.search(r"bytes_received:(\d+)", line)
            counts[port] = (int(acked.group(1)) if acked else None, int(received.group(1)) if received else None)
    return counts


class ProbeLab(Protocol):
    """What the runner needs of a lab: a `Lab`, or `throttle.measure.external.ExternalLab`."""

    state_dir: Path  # the lab CA's files (a browser probe's leaf key)

    def exec_argv(self, role: str, argv: list[str]) -> list[str]: ...


class Runner:
    """Runs one scenario's probes in a lab whose censor already runs (see `run_scenario`)."""

    def __init__(self, scenario: Scenario, lab: ProbeLab, workdir: Path,
                 on_update: Callable[[list[ProbeRun]], None] | None = None, busy_controls: bool = False,
                 ports: ProbePorts = PORTS) -> None:
        self.scenario = scenario
        self.lab = lab
        self.workdir = workdir
        self.on_update = on_update
        self.rate = reference_rate(scenario)
        self.runs = [ProbeRun(p) for p in scenario.probes]
        self.ports = ports
        self._lock = threading.Lock()  # over every ProbeRun of self.runs (module doc)
        # Demo mode: repeat the control transfers while the other probes run, so the control's
        # speed stays visible (live view, exporter) instead of being over in the first second.
        self.busy_controls = busy_controls

    def rate_for(self, probe: Probe) -> float:
        """The rate a throttled probe is measured against: its rule's, when the scenario's rules
        differ (youtube-2024: 128 kbit/s over TCP, 512 kbit/s over QUIC), else the slowest."""
        rule = limiting_rule(self.scenario, probe)
        return rule.rate if rule is not None and rule.rate > 0 else self.rate

    def _index(self, probe: Probe) -> int:
        return next((k for k, r in enumerate(self.runs) if r.probe is probe), len(self.runs))

    def client(self, probe: Probe, timeout: float | None = None, fixed_port: bool = True) -> ProbeClient:
        """A new client for one run of `probe`: from its own port range unless `fixed_port` is off
        (then any port, outside every capture and `ss` poll), for `timeout` seconds (default: the
        probe's own, or from its size and rate)."""
        kind = client_class(probe.protocol)
        index = self._index(probe)
        setup = Setup(functools.partial(self.lab.exec_argv, "client"), self.workdir,
                      default_timeout(probe, self.rate_for(probe)) if timeout is None else timeout,
                      self.ports.client(index) if fixed_port and kind.takes_ports else None, self.ports.wrap(index),
                      self.lab.state_dir)
        return kind(probe, setup)

    # ---- one probe ----------------------------------------------------------------------
    def run_probe(self, run: ProbeRun, fixed_port: bool = True) -> None:
        client = self.client(run.probe, fixed_port=fixed_port)
        try:
            with client.prepared() as problem:
                outcome = Outcome(CAUSE_LAB, problem) if problem else client.outcome(self._execute(run, client))
        except (OSError, ThrottleError) as exc:  # a tool missing, a client that cannot be run
            outcome = Outcome(CAUSE_LAB, f"{client.what} could not start: {exc}")
        self.finish(run, outcome)

    def _execute(self, run: ProbeRun, client: ProbeClient) -> Exit:
        """The client's process from start to exit, in this thread (`children.watch`): its progress
        stream fed to it as it comes; killed at its deadline."""
        argv = client.argv()
        with self._lock:
            run.started = time.monotonic()
        done = watch(argv, deadline=run.started + client.deadline, session=client.session,
                     progress=client.progress_stream, on_progress=functools.partial(self.feed, run, client))
        return Exit(done.out.decode(errors="replace"), done.err.decode(errors="replace"), done.code,
                    time.monotonic() - run.started, done.killed)

    def finish(self, run: ProbeRun, outcome: Outcome) -> None:
        with self._lock:
            run.finish(outcome)
        self._changed()

    def feed(self, run: ProbeRun, client: ProbeClient, data: bytes) -> None:
        """Bytes of a client's progress stream, as `_execute` hands them over."""
        value = client.feed(data)
        if value is not None:
            self._progress(run, value)

    def _progress(self, run: ProbeRun, value: int) -> None:
        with self._lock:
            t = time.monotonic() - run.started
            run.bytes, run.seconds = value, t
            run.samples.append((round(t, 3), value))
            # Speed over the last few seconds: one second of a policed flow is too jumpy.
            for t_old, b_old in run.samples:
                if t - t_old <= SPEED_WINDOW:
                    if t > t_old:
                        run.current_speed = (value - b_old) / (t - t_old)
                    break
        self._changed()

    def _changed(self) -> None:
        if self.on_update is not None:
            with self._lock:
                runs = [r.snapshot() for r in self.runs]
            self.on_update(runs)

    def _ss_argv(self) -> list[str]:
        """`ss` over every probe's client ports (found here, so that a missing tool is said at once)."""
        lo, hi = self.ports.span
        return self.lab.exec_argv("client", [require_tool("ss", "iproute2"), "-tinH",
                                             f"( sport >= :{lo} and sport <= :{hi} )"])

    def _poll_acked(self, stop: threading.Event, argv: list[str]) -> None:
        """Upload progress as TCP sees it: bytes the server acknowledged (ss), once a second; and
        what downloads' sockets received, TLS included (freeze_bytes).

        curl counts bytes handed to its socket, and a socket buffer holds hundreds of KB, so its
        own count runs far ahead of what a policer lets through."""
        by_port: dict[int, ProbeRun] = {}
        for i, run in enumerate(self.runs):
            if client_class(run.probe.protocol).polled:
                first, last = self.ports.client(i)
                by_port.update({p: run for p in range(first, last + 1)})
        while not stop.wait(1.0):
            try:
                out = capture(argv, "ss", timeout=5).out
            except ThrottleError:
                continue
            for port, (acked, received) in ss_counts(out).items():
                polled = by_port.get(port)
                if polled is None:
                    continue
                with self._lock:
                    if polled.done:
                        continue
                    upload = polled.probe.direction == "upload"
                    if not upload and received is not None:
                        polled.tcp_received = max(polled.tcp_received, received)
                if upload and acked is not None:
                    self._progress(polled, min(acked, polled.probe.size))

    # ---- running ------------------------------------------------------------------------
    def measure_baseline(self) -> None:
        """Run every control once before the censor starts, and keep its speed: a control is then
        judged against itself with no censor (normal unless 100 x slower), not against the rules'
        rate alone, which a broken path to an unlimited name could still beat. Ephemeral ports, so
        that captures and `ss` polls of the probes' own ports never see these transfers."""
        for run in self.runs:
            if run.probe.control:
                alone = ProbeRun(run.probe)  # this thread's own
                self.run_probe(alone, fixed_port=False)
                if alone.completed and alone.speed > 0:
                    with self._lock:
                        run.baseline = alone.speed

    def _keep_controls_busy(self, controls: Sequence[ProbeRun], until: threading.Event) -> None:
        """Run the controls again and again until `until` is set; the first runs stay the judged ones."""
        while not until.is_set():
            for shown in controls:
                again = ProbeRun(shown.probe)  # this thread's own
                self.run_probe(again, fixed_port=False)
                if again.completed:
                    with self._lock:
                        shown.current_speed = again.speed
                        shown.done = False  # drawn as running while it repeats
                    self._changed()
            until.wait(0.5)
        with self._lock:
            for shown in controls:
                shown.done = True
                shown.current_speed = 0.0

    def _parallel(self) -> bool:
        if any(client_class(p.protocol).crowds for p in self.scenario.probes):
            return False  # a browser's start-up would crowd the others' measurements
        return all(r.scope == "flow" and r.sticky == 0 for r in self.scenario.rules)

    def run(self) -> RunReport:
        started = time.time()
        t0 = time.monotonic()
        controls = [r for r in self.runs if r.probe.control]
        others = [r for r in self.runs if not r.probe.control]
        stop = threading.Event()
        poller = threading.Thread(target=self._poll_acked, args=(stop, self._ss_argv()), daemon=True)
        poller.start()
        for run in controls:
            self.run_probe(run)
        others_done = threading.Event()
        busy = threading.Thread(target=self._keep_controls_busy, args=(controls, others_done), daemon=True)
        if self.busy_controls and controls:
            busy.start()
        if self._parallel():
            threads = [threading.Thread(target=self.run_probe, args=(r,), daemon=True) for r in others]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for run in others:
                self.run_probe(run)
        others_done.set()
        if busy.is_alive():
            busy.join(timeout=30)
        stop.set()
        poller.join(timeout=5)
        with self._lock:
            control_speed = self._judge(controls)
        return RunReport(self.scenario.name, self.scenario.path, self.runs, self.rate, control_speed,
                         started, time.monotonic() - t0)

    def _judge(self, controls: Sequence[ProbeRun]) -> float | None:
        """Judge every run against the controls of its transport; the fastest control's speed.

        A QUIC probe is compared with QUIC controls, a TCP one with TCP controls, when there are
        such (the lab's HTTP/3 runs far below curl over TCP)."""
        control_speed = max((r.speed for r in controls if r.completed), default=None)
        speeds: dict[bool, float | None] = {}
        shakes: dict[bool, float | None] = {}
        for udp in (False, True):
            mine = [r for r in controls if client_class(r.probe.protocol).udp == udp]
            same = [r.speed for r in mine if r.completed]
            speeds[udp] = max(same) if same else control_speed
            times = [r.handshake for r in mine if r.handshake is not None]
            shakes[udp] = max(times) if times else None
        for run in self.runs:
            udp = client_class(run.probe.protocol).udp
            expect = expected(self.scenario, run.probe) if run.probe.expect == "throttled" else None
            figures = Figures(self.rate_for(run.probe), speeds[udp], shakes[udp], run.baseline, expect)
            run.judged(figures.rate, judge(run, run.probe, figures), expect)
        return control_speed


class CensorProcess(Background):
    """`throttle censor` in the lab's censor namespace, as a child; always stopped."""

    def __init__(self, scenario_path: str, netns: str, *extra: str) -> None:
        super().__init__([sys.executable, "-m", "throttle", "censor", "--scenario", scenario_path, "--netns", netns,
                          "--quiet", *extra], ready="active", what="the censor")


def run_scenario(scenario: Scenario, *, lab_name: str = "throttle", keep: bool = False,
                 on_update: Callable[[list[ProbeRun]], None] | None = None,
                 on_phase: Callable[[str], None] | None = None, busy_controls: bool = False,
                 baseline: bool = True, metrics_listen: str | None = None) -> RunReport:
    """Lab up (or reused; its link set to the scenario's rtt, jitter and bottleneck), the controls alone (their no-censor baseline), censor on, probes,
    censor off, lab down unless kept or already up. `metrics_listen` goes to the censor's
    --metrics-listen (None: its default)."""
    if not scenario.probes:
        raise ThrottleError(f"{scenario.path}: no [[probe]] tables; `throttle run` needs traffic to try")
    if not any(p.control for p in scenario.probes):
        raise ThrottleError(f"{scenario.path}: no probe has control = true; add one to a name no rule matches")
    lab = Lab(lab_name)
    was_up = lab.status().up
    phase = on_phase or (lambda text: None)
    phase("reusing the running lab" if was_up else "bringing the lab up")
    lab.up(sorted({p.host for p in scenario.probes}), Link.of(scenario))  # a lab up is re-linked to the scenario's
    try:
        with tempfile.TemporaryDirectory(prefix="throttle-run-") as tmp:
            runner = Runner(scenario, lab, Path(tmp), on_update, busy_controls)
            if baseline:
                phase("measuring the controls without the censor (their baseline)")
                runner.measure_baseline()
            phase(f"starting the censor with {scenario.name}")
            metrics = ("--metrics-listen", metrics_listen) if metrics_listen else ()
            with CensorProcess(scenario.path, lab.ns("censor"), *metrics):
                phase("running the probes")
                report = runner.run()
            if lab.status().labserver is None:  # its probes failed for the lab's sake, not the censor's
                raise ThrottleError(f"the lab server of lab {lab.name} stopped during the run, so its probes say "
                                    f"nothing about the censor (its log: {lab.state_dir / 'labserver.log'}); "
                                    f"`throttle lab up --lab {lab.name}` starts it again")
            return report
    finally:
        if not keep and not was_up:
            phase("taking the lab down")
            lab.down()
