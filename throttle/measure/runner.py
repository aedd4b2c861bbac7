"""`throttle run`: a scenario end to end, in the lab, with real clients, judged by measured speed.

The runner brings the lab up (or reuses it), starts `throttle censor` with the scenario in the
lab's censor namespace, runs every probe with a real client in the client namespace (curl for
HTTPS and HTTP, `throttle.lab.evasion` for hand-made ClientHellos, `throttle.lab.h3probe` for
HTTP/3 over QUIC), and judges each probe from what it measured, never from the engine's opinion
(docs/incidents.md §3.22-23):

- blocked    the transfer did not complete: it stalled until its timeout (cause "timeout") or the
             network ended it with a reset (cause "reset");
- error      the lab failed, not the censor (cause "lab": connection refused, a certificate or TLS
             error, an HTTP error status, a client that could not run): the run fails naming it;
- throttled  its speed is below 3 x the slowest limiting rate of the scenario, and below a tenth of
             the control probe's speed (OONI's "extreme throttling" is a 10x slowdown);
- normal     otherwise.

Each probe's cause (`classify_curl`, `classify_quic`, `classify_raw`) and its TLS handshake time
(curl's time_appconnect - time_connect, the QUIC client's time to its handshake) are in the
report. A probe with `freeze_bytes` must stall having delivered that many bytes (downloads: the TCP
payload its socket received, from `ss`); one with `expect_handshake` is judged by its handshake
against the controls' (`handshake_verdict`).

Controls run first so their speed is known; the other probes then run together when the scenario's
buckets are per flow and nothing is sticky, else one after another in file order.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from throttle.children import Background
from throttle.errors import ThrottleError
from throttle.lab.topology import SERVER_V4, Lab
from throttle.scenario import Probe, Scenario, probe_rule

SPEED_FACTOR = 3.0  # a throttled probe is below 3 x the scenario's rate ...
CONTROL_FACTOR = 10.0  # ... and at least 10 x slower than the control (§23)
# A control is throttled below 3 x the rate, or 100 x slower than itself with no censor. Not 10 x:
# inspection costs a small transfer's first packets a trip through Python (measured, 64 KB on an
# idle machine: 301 Mbit/s alone, 76 Mbit/s through the censor), which a busy machine multiplies.
# Any rule's rate (kbit/s) is still thousands of times below a baseline of hundreds of Mbit/s.
BASELINE_FACTOR = 100.0
SINK_PORT = 8443
SPEED_WINDOW = 4.0  # seconds the live speed is averaged over
PORT_BASE = 31000  # probe i uses client ports PORT_BASE + 10 i ... + 9, so `ss` can find it
WRAP_PORT_BASE = 41000  # probe i's wrap helper listens on WRAP_PORT_BASE + i in the client namespace
WRAP_READY = 10.0  # seconds a wrap helper has to start listening
HANDSHAKE_FACTOR = 10.0  # a "slow" handshake takes at least 10 x the controls' (§3.23) ...
HANDSHAKE_FLOOR = 0.5  # ... and at least half a second (a loaded machine's jitter is not a censor)

# Why a probe did not complete. "timeout" and "reset" are the network's doing (blocked); "lab" is
# the lab's own failure and fails the run instead of reading as blocked.
CAUSE_COMPLETED, CAUSE_TIMEOUT, CAUSE_RESET, CAUSE_LAB = "completed", "timeout", "reset", "lab"

# curl exit codes (curl(1), EXIT CODES) that mean the lab is broken, with what they say
_CURL_LAB = {
    6: "could not resolve the host (the lab's DNS)",
    7: "connection refused: nothing listens where the lab server should",
    22: "HTTP error status",
    35: "TLS handshake failed",
    51: "the server's certificate does not name the host",
    52: "the server replied nothing",
    58: "client certificate problem",
    60: "certificate not trusted (the lab CA)",
    77: "CA bundle unreadable (the lab CA)",
    16: "HTTP/2 framing error",
    92: "HTTP/2 stream error",
}


def classify_curl(code: int | None, http_code: str | None, message: str = "") -> tuple[str, str]:
    """(cause, detail) of a curl run: its exit code, the HTTP status of -w, its error message."""
    said = f": {message}" if message else ""
    if code is not None and code < 0:
        return CAUSE_TIMEOUT, "killed by the runner's watchdog after its timeout"
    if code == 0:
        if http_code == "200":
            return CAUSE_COMPLETED, ""
        return CAUSE_LAB, f"HTTP status {http_code or 'missing'} from the lab server"
    if code == 28:
        return CAUSE_TIMEOUT, "curl exit 28: stalled until its timeout"
    if "reset" in message.lower() or code in (55, 56):
        return CAUSE_RESET, f"curl exit {code}: the connection was reset{said}"
    if code in _CURL_LAB:
        return CAUSE_LAB, f"curl exit {code}: {_CURL_LAB[code]}{said}"
    return CAUSE_LAB, f"curl exit {code}{said}"


# throttle.lab.h3probe's exit codes
_QUIC = {
    7: (CAUSE_LAB, "nothing listens on UDP 443 (ICMP port unreachable): the lab's HTTP/3 server"),
    22: (CAUSE_LAB, "HTTP error status from the lab's HTTP/3 server"),
    28: (CAUSE_TIMEOUT, "the transfer (or the handshake) stalled until its timeout"),
    35: (CAUSE_LAB, "the QUIC handshake failed (certificate, ALPN)"),
    56: (CAUSE_RESET, "the connection or stream ended before the transfer did"),
}


def classify_quic(code: int | None, message: str = "") -> tuple[str, str]:
    """(cause, detail) of a `throttle.lab.h3probe` run from its exit code and error line."""
    if code == 0:
        return CAUSE_COMPLETED, ""
    if code is not None and code < 0:
        return CAUSE_TIMEOUT, message or "killed by the runner's watchdog after its timeout"
    if code in (35, 56) and "idle timeout" in message.lower():
        # aioquic gave up on a silent path before --max-time: nothing came back, as a timeout
        return CAUSE_TIMEOUT, message
    cause, what = _QUIC.get(code if code is not None else -1, (CAUSE_LAB, f"the QUIC client exited with {code}"))
    return cause, message or what  # its own message says more than the code


def classify_raw(final: dict[str, Any] | None, code: int | None) -> tuple[str, str]:
    """(cause, detail) of a `throttle.lab.evasion` run from its closing JSON report."""
    if final is not None and final.get("ok"):
        return CAUSE_COMPLETED, ""
    if code is not None and code < 0:
        return CAUSE_TIMEOUT, "killed by the runner's watchdog after its timeout"
    if final is None:
        return CAUSE_LAB, f"the raw TLS client exited with {code} without a report"
    error = str(final.get("error", ""))
    low = error.lower()
    if low.startswith("timed out"):
        return CAUSE_TIMEOUT, error
    if "reset" in low or "broken pipe" in low:
        return CAUSE_RESET, error
    if "refused" in low:
        return CAUSE_LAB, f"connection refused: nothing listens on the lab's sink ({error})"
    return CAUSE_LAB, error or "the raw TLS client failed without saying why"


@dataclass
class ProbeRun:
    """One probe while it runs and after: what the client measured."""

    probe: Probe
    bytes: int = 0  # transferred so far
    seconds: float = 0.0
    started: float = 0.0
    current_speed: float = 0.0  # bytes/s over the last update
    done: bool = False
    completed: bool = False  # the whole transfer finished
    error: str = ""
    observed: str = ""
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes) over time
    final: dict[str, Any] | None = None  # the raw TLS client's closing report
    client_error: str = ""  # the QUIC client's own account of a failure
    rate: float = 0.0  # the rate (bytes/s) it was judged against: its rule's, or the scenario's slowest
    cause: str = ""  # completed, timeout, reset, lab (see classify_curl)
    handshake: float | None = None  # seconds of the TLS (or QUIC) handshake, when the client says
    tcp_received: int = 0  # TCP payload bytes the client's socket received (ss), downloads over TCP
    observed_handshake: str = ""  # slow or normal, when the probe expects one
    check_failures: list[str] = field(default_factory=list)  # freeze_bytes, expect_handshake
    baseline: float | None = None  # a control's speed (bytes/s) with no censor running, when measured

    @property
    def stalled_bytes(self) -> int | None:
        """What the probe had received (downloads) or delivered (uploads) when it stalled."""
        if self.cause != CAUSE_TIMEOUT:
            return None
        if self.probe.direction == "download" and self.probe.protocol in ("https", "http") and self.tcp_received:
            return self.tcp_received
        return self.bytes

    @property
    def speed(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def passed(self) -> bool:
        return self.observed == self.probe.expect and not self.check_failures


@dataclass
class RunReport:
    scenario: str
    path: str
    runs: list[ProbeRun]
    rate: float  # the reference rate (bytes/s)
    control_speed: float | None
    started: float
    seconds: float

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.runs)

    @property
    def lab_failures(self) -> list[str]:
        """One line per probe the lab failed (cause "lab"): these say nothing about the censor."""
        return [f"{r.probe.name}: {r.error}" for r in self.runs if r.cause == CAUSE_LAB]

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "path": self.path,
            "passed": self.passed,
            "rate_bytes_per_second": self.rate,
            "control_speed_bytes_per_second": self.control_speed,
            "seconds": round(self.seconds, 3),
            "probes": [
                {
                    "name": r.probe.name, "host": r.probe.host, "direction": r.probe.direction,
                    "protocol": r.probe.protocol, "evasion": r.probe.evasion, "address": r.probe.address,
                    "sni": r.probe.sni, "size": r.probe.size, "bytes": r.bytes, "seconds": round(r.seconds, 4),
                    "speed_bytes_per_second": round(r.speed, 1), "completed": r.completed, "error": r.error,
                    "expected": r.probe.expect, "observed": r.observed, "passed": r.passed,
                    "control": r.probe.control, "rate_bytes_per_second": r.rate, "cause": r.cause,
                    "handshake_seconds": None if r.handshake is None else round(r.handshake, 4),
                    "expected_handshake": r.probe.expect_handshake or None,
                    "observed_handshake": r.observed_handshake or None,
                    "stalled_bytes": r.stalled_bytes,
                    "expected_freeze_bytes": list(r.probe.freeze_bytes) if r.probe.freeze_bytes else None,
                    "check_failures": r.check_failures,
                    "baseline_speed_bytes_per_second": None if r.baseline is None else round(r.baseline, 1),
                }
                for r in self.runs
            ],
        }


def reference_rate(scenario: Scenario) -> float:
    """The slowest rate any rule limits to (bytes/s); what 'throttled' is measured against."""
    rates = [r.rate for r in scenario.rules if r.rate > 0]
    return min(rates) if rates else 0.0


def judge(run: ProbeRun, rate: float, control_speed: float | None) -> str:
    if run.cause == CAUSE_LAB:
        return "error"
    if not run.completed:
        return "blocked"
    if rate <= 0:  # rules that only freeze (rate 0, §19) block flows; they cannot slow one
        return "normal"
    below_rate = run.speed < SPEED_FACTOR * rate
    if run.probe.control:  # by the rate, and against itself with no censor (when measured)
        far_below_baseline = run.baseline is not None and run.speed < run.baseline / BASELINE_FACTOR
        return "throttled" if below_rate or far_below_baseline else "normal"
    below_control = control_speed is None or run.speed < control_speed / CONTROL_FACTOR
    return "throttled" if below_rate and below_control else "normal"


def handshake_verdict(run: ProbeRun, control_handshake: float | None) -> str:
    """slow or normal: a handshake that never completed on a probe that stalled is slow (§2.17's
    crawl past the timeout); else slow when at least HANDSHAKE_FACTOR x the controls' and
    HANDSHAKE_FLOOR seconds. With no control handshake, the floor alone decides."""
    if run.handshake is None:
        return "slow" if run.cause == CAUSE_TIMEOUT else "normal"
    bound = max(HANDSHAKE_FLOOR, HANDSHAKE_FACTOR * (control_handshake or 0.0))
    return "slow" if run.handshake >= bound else "normal"


def check_expectations(run: ProbeRun, control_handshake: float | None) -> list[str]:
    """What a probe's freeze_bytes and expect_handshake found wrong (empty: all met)."""
    failures: list[str] = []
    probe = run.probe
    if probe.freeze_bytes is not None:
        low, high = probe.freeze_bytes
        got = run.stalled_bytes
        if got is None:
            failures.append(f"freeze_bytes: expected a stall after {low}-{high} bytes, but the probe "
                            f"{'completed' if run.completed else 'ended by ' + (run.cause or 'an error')}")
        elif not low <= got <= high:
            failures.append(f"freeze_bytes: stalled after {got} bytes, expected {low}-{high}")
    if probe.blocked_by and not run.completed and run.cause != probe.blocked_by:
        failures.append(f"blocked_by: expected a {probe.blocked_by}, but the probe ended by "
                        f"{run.cause or 'an error'}")
    if probe.expect_handshake:
        run.observed_handshake = handshake_verdict(run, control_handshake)
        if run.observed_handshake != probe.expect_handshake:
            shown = "none" if run.handshake is None else f"{run.handshake:.3f} s"
            ref = "none" if control_handshake is None else f"{control_handshake:.3f} s"
            failures.append(f"handshake: expected {probe.expect_handshake}, observed {run.observed_handshake} "
                            f"({shown}; controls {ref})")
    return failures


def default_timeout(probe: Probe, rate: float) -> float:
    if probe.timeout > 0:
        return probe.timeout
    expected = probe.size / rate if rate > 0 else 10.0
    return min(300.0, 2.5 * expected + 15.0)


_QUIC_PROGRESS = re.compile(rb"^progress (\d+)$")


def quic_progress(line: bytes) -> int | None:
    """The byte count of one of `throttle.lab.h3probe`'s progress lines (stderr), else None: bytes
    received for a download, bytes the server reports it has received for an upload."""
    m = _QUIC_PROGRESS.match(line.strip())
    return int(m.group(1)) if m else None


_RESULT = re.compile(r"RESULT (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+)(?: ([\d.]+) ([\d.]+))?")


@dataclass(frozen=True)
class ClientResult:
    """The RESULT line curl (-w) and the QUIC client print, on success and on failure alike."""

    status: str
    uploaded: int
    downloaded: int
    total: float
    pretransfer: float
    connect: float | None = None  # curl only
    appconnect: float | None = None

    def handshake(self, *, quic: bool, tls: bool = True) -> float | None:
        """Seconds of the TLS handshake: curl's time_appconnect - time_connect (0 when it never
        completed); the QUIC client's time to its completed handshake (none on a failure)."""
        if not tls:
            return None
        if quic:
            return self.pretransfer if self.status != "000" and self.pretransfer > 0 else None
        if self.connect is None or self.appconnect is None or self.appconnect <= 0:
            return None
        return max(0.0, self.appconnect - self.connect)


def parse_result(out: str) -> ClientResult | None:
    m = _RESULT.search(out)
    if m is None:
        return None
    return ClientResult(m.group(1), int(m.group(2)), int(m.group(3)), float(m.group(4)), float(m.group(5)),
                        float(m.group(6)) if m.group(6) else None, float(m.group(7)) if m.group(7) else None)


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kMGT]?)$")
_MULT = {"": 1, "k": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _curl_size(text: str) -> int | None:
    m = _SIZE.match(text)
    return int(float(m.group(1)) * _MULT[m.group(2)]) if m else None


def _kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Stop a child started in its own session, with everything it started (a browser's helpers)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


_SERVER_REPLY = re.compile(r'"received":\s*(\d+),\s*"seconds":\s*([\d.]+)')


def finish_command(run: ProbeRun, out: str, err: str, code: int | None, wall: float) -> None:
    """Judge a command probe from its exit, and an upload from the lab server's reply, which the
    command must show (`{"received": N, "seconds": T}`, as `curl -T` prints and the upload page
    writes): the server's own count of the body and its time to receive it; an upload that shows no
    reply is a lab failure, never a guess. A download's zero exit is the whole transfer in the
    command's own time (`wall`, its start-up included)."""
    probe = run.probe
    said = err.strip().splitlines()[-1] if err.strip() else ""
    run.seconds = wall
    run.done = True
    run.current_speed = 0.0
    if code is None:
        run.cause, run.error = CAUSE_TIMEOUT, "the command did not finish before its timeout (killed)"
        return
    words = shlex.split(probe.command)[:1] if probe.command.strip() else []
    if code != 0:
        if words and os.path.basename(words[0]) == "curl":  # curl's exit codes say why
            run.cause, run.error = classify_curl(code, None, said)
        else:
            run.cause, run.error = CAUSE_LAB, f"the command exited with {code}" + (f": {said}" if said else "")
        return
    replies = _SERVER_REPLY.findall(out) if probe.direction == "upload" else []
    if replies:
        received, seconds = int(replies[-1][0]), float(replies[-1][1])
        if received < probe.size:
            run.cause, run.error = CAUSE_LAB, f"the lab server received {received} of {probe.size} bytes"
            run.bytes = received
            return
        run.bytes = received
        run.seconds = seconds if seconds > 0 else wall
    elif probe.direction == "upload":
        run.cause, run.error = CAUSE_LAB, ('the command did not show the lab server\'s reply {"received": N, ...}, '
                                           "so what the server received is unknown (let it print the reply: "
                                           "curl -T without -o)")
        return
    else:  # a download: a bare number on the last line of its output is the bytes it received
        last = out.strip().splitlines()[-1].strip() if out.strip() else ""
        if last.isdigit() and int(last) < probe.size:
            run.cause, run.error = CAUSE_LAB, f"the command received {last} of {probe.size} bytes"
            run.bytes = int(last)
            return
        run.bytes = int(last) if last.isdigit() else probe.size
    run.cause, run.completed = CAUSE_COMPLETED, True


class Runner:
    """Runs one scenario's probes in a lab whose censor already runs (see `run_scenario`)."""

    def __init__(self, scenario: Scenario, lab: Lab, workdir: Path,
                 on_update: Callable[[list[ProbeRun]], None] | None = None, busy_controls: bool = False) -> None:
        self.scenario = scenario
        self.lab = lab
        self.workdir = workdir
        self.on_update = on_update
        self.rate = reference_rate(scenario)
        self.runs = [ProbeRun(p) for p in scenario.probes]
        self._lock = threading.Lock()
        # Demo mode: repeat the control transfers while the other probes run, so the control's
        # speed stays visible (live view, exporter) instead of being over in the first second.
        self.busy_controls = busy_controls

    def rate_for(self, probe: Probe) -> float:
        """The rate a throttled probe is measured against: its rule's, when the scenario's rules
        differ (youtube-2024: 128 kbit/s over TCP, 512 kbit/s over QUIC), else the slowest."""
        rule = probe_rule(self.scenario, probe)
        return rule.rate if rule is not None and rule.rate > 0 else self.rate

    # ---- commands -----------------------------------------------------------------------
    def _address(self, probe: Probe) -> str:
        return probe.address or SERVER_V4

    def _upload_file(self, size: int) -> Path:
        path = self.workdir / f"upload-{size}"
        if not path.exists():
            with path.open("wb") as f:  # incompressible, like a photo
                chunk = os.urandom(1 << 20)
                left = size
                while left > 0:
                    f.write(chunk[: min(left, len(chunk))])
                    left -= len(chunk)
        return path

    def command(self, probe: Probe, timeout: float, fixed_port: bool = True) -> list[str]:
        address = self._address(probe)
        if probe.protocol == "tls":
            argv = [sys.executable, "-m", "throttle.lab.evasion", "--address", address, "--port", str(SINK_PORT),
                    "--size", str(probe.size), "--evasion", probe.evasion, "--timeout", f"{max(timeout, 1):.0f}", "--json"]
            if probe.sni is False:
                argv.append("--no-sni")
            else:
                argv += ["--sni", probe.sni if isinstance(probe.sni, str) else probe.host]
            if probe.ech:
                argv.append("--ech")
            return self.lab.exec_argv("client", argv)
        if probe.protocol == "quic":
            # HTTP/3 GET /bytes/N or POST of N bytes to the address; the SNI as for curl below.
            argv = [sys.executable, "-m", "throttle.lab.h3probe", probe.host, "--address", address,
                    f"--{probe.direction}", str(probe.size), "--max-time", f"{max(timeout, 1):.0f}"]
            if fixed_port:  # captures (throttle bench) find the probe by its port, as curl's
                lo, hi = self._ports(probe)
                argv += ["--local-port", f"{lo}-{hi}"]
            if probe.sni is False:
                argv.append("--no-sni")
            elif isinstance(probe.sni, str):
                argv += ["--sni", probe.sni]
            if probe.ech:
                argv.append("--ech")
            return self.lab.exec_argv("client", argv)
        family = "-6" if ":" in address else "-4"
        scheme, port = ("http", 80) if probe.protocol == "http" else ("https", 443)
        name = probe.sni if isinstance(probe.sni, str) else probe.host
        host = f"[{address}]" if ":" in address else address
        if probe.protocol == "https" and probe.sni is False:
            base = f"https://{host}"  # an address in the URL: curl sends no SNI
            resolve: list[str] = []
        else:
            base = f"{scheme}://{name}"
            resolve = ["--resolve", f"{name}:{port}:{address}"]
        ports = self._ports(probe)
        port_args = ["--local-port", f"{ports[0]}-{ports[1]}"] if fixed_port else []
        argv = ["curl", family, "-o", "/dev/null", "--max-time", f"{max(timeout, 1):.0f}", *port_args, "-w",
                "\nRESULT %{http_code} %{size_upload} %{size_download} %{time_total} %{time_pretransfer} %{time_connect} "
                "%{time_appconnect}\n", *resolve]
        if probe.direction == "upload":
            argv += ["-T", str(self._upload_file(probe.size)), f"{base}/upload"]
        else:
            argv += [f"{base}/bytes/{probe.size}"]
        if probe.protocol == "http" and probe.host != name:
            argv += ["-H", f"Host: {probe.host}"]
        return self.lab.exec_argv("client", argv)

    def command_values(self, probe: Probe) -> dict[str, str]:
        """What a command probe's placeholders stand for (unquoted)."""
        upload = probe.direction == "upload"
        return {
            "url": f"https://{probe.host}/upload" if upload else f"https://{probe.host}/bytes/{probe.size}",
            "host": probe.host,
            "address": self._address(probe),
            "file": str(self._upload_file(probe.size)) if upload else "",
            "size": str(probe.size),
            "port": str(WRAP_PORT_BASE + self._index(probe)),
        }

    def shell_command(self, probe: Probe, template: str) -> list[str]:
        """A command probe's `command` or `wrap`, its placeholders filled in (shell-quoted), as
        `sh -c` in the client namespace."""
        values = {k: shlex.quote(v) for k, v in self.command_values(probe).items()}
        return self.lab.exec_argv("client", ["sh", "-c", template.format(**values)])

    def _index(self, probe: Probe) -> int:
        return next((k for k, r in enumerate(self.runs) if r.probe is probe), len(self.runs))

    def _ports(self, probe: Probe) -> tuple[int, int]:
        i = self._index(probe)
        return PORT_BASE + 10 * i, PORT_BASE + 10 * i + 9

    def _poll_acked(self, stop: threading.Event) -> None:
        """Upload progress as TCP sees it: bytes the server acknowledged (ss), once a second.

        curl counts bytes handed to its socket, and a socket buffer holds hundreds of KB, so its
        own count runs far ahead of what a policer lets through."""
        argv = self.lab.exec_argv("client", ["ss", "-tinH", f"( sport >= :{PORT_BASE} and sport <= :{PORT_BASE + 999} )"])
        by_port: dict[int, ProbeRun] = {}
        for run in self.runs:
            if run.probe.protocol in ("https", "http"):
                lo, hi = self._ports(run.probe)
                for p in range(lo, hi + 1):
                    by_port[p] = run
        while not stop.wait(1.0):
            try:
                out = subprocess.run(argv, capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.TimeoutExpired):
                continue
            port: int | None = None
            for line in out.splitlines():
                if not line.startswith(("\t", " ")):
                    fields = line.split()
                    port = int(fields[3].rsplit(":", 1)[1]) if len(fields) >= 4 and ":" in fields[3] else None
                    continue
                polled = by_port.get(port) if port is not None else None
                if polled is None or polled.done:
                    continue
                if polled.probe.direction == "download":  # what arrived, TLS included (freeze_bytes)
                    got = re.search(r"bytes_received:(\d+)", line)
                    if got:
                        polled.tcp_received = max(polled.tcp_received, int(got.group(1)))
                    continue
                m = re.search(r"bytes_acked:(\d+)", line)
                if m:
                    self._progress(polled, min(int(m.group(1)), polled.probe.size))

    def _progress(self, run: ProbeRun, value: int) -> None:
        t = time.monotonic() - run.started
        with self._lock:
            run.bytes, run.seconds = value, t
            run.samples.append((round(t, 3), value))
            # Speed over the last few seconds: one second of a policed flow is too jumpy.
            for t_old, b_old in run.samples:
                if t - t_old <= SPEED_WINDOW:
                    if t > t_old:
                        run.current_speed = (value - b_old) / (t - t_old)
                    break
        if self.on_update is not None:
            self.on_update(self.runs)

    # ---- running ------------------------------------------------------------------------
    def measure_baseline(self) -> None:
        """Run every control once before the censor starts, and keep its speed: a control is then
        judged against itself with no censor (normal unless 10 x slower), not against the rules'
        rate, which a broken path to an unlimited name could still beat. Ephemeral ports, so that
        captures and `ss` polls of the probes' own ports never see these transfers."""
        for run in self.runs:
            if run.probe.control:
                alone = ProbeRun(run.probe)
                self.run_probe(alone, fixed_port=False)
                if alone.completed and alone.speed > 0:
                    run.baseline = alone.speed

    def run_probe(self, run: ProbeRun, fixed_port: bool = True) -> None:
        probe = run.probe
        timeout = default_timeout(probe, self.rate_for(probe))
        if probe.protocol == "command":
            self._run_command(run, timeout)
            return
        argv = self.command(probe, timeout, fixed_port)
        run.started = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        except OSError as exc:
            run.error, run.done, run.cause = f"the client could not start: {exc}", True, CAUSE_LAB
            return
        # One thread reads the progress stream (curl's stderr, the raw client's stdout); this one
        # reads the other to its end. A watchdog kills a client that outlives its own timeout.
        reader = threading.Thread(target=self._read_progress, args=(run, proc), daemon=True)
        reader.start()
        watchdog = threading.Timer(timeout + 15, proc.kill)
        watchdog.start()
        try:
            other = proc.stderr if run.probe.protocol == "tls" else proc.stdout
            out = other.read() if other is not None else b""
            proc.wait()
        finally:
            watchdog.cancel()
        reader.join(timeout=5)
        self._finish(run, "" if run.probe.protocol == "tls" else out.decode(errors="replace"), proc.returncode)

    def _run_command(self, run: ProbeRun, timeout: float) -> None:
        """A command probe: its wrap helper (if any) listening first, then the command, killed with
        its whole process group at the timeout; the helper always stopped."""
        probe = run.probe
        helper: subprocess.Popen[bytes] | None = None
        out, err, code = b"", b"", None
        try:
            if probe.wrap:
                helper = subprocess.Popen(self.shell_command(probe, probe.wrap), stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, start_new_session=True)
                port = self.command_values(probe)["port"]
                problem = self._wait_listening(helper, int(port))
                if problem:
                    run.cause, run.error, run.done = CAUSE_LAB, f"the wrap helper {problem}", True
                    return
            run.started = time.monotonic()
            try:
                proc = subprocess.Popen(self.shell_command(probe, probe.command), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True)
            except OSError as exc:
                run.error, run.done, run.cause = f"the command could not start: {exc}", True, CAUSE_LAB
                return
            try:
                out, err = proc.communicate(timeout=timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                out, err = proc.communicate()
                code = None
            wall = time.monotonic() - run.started
        finally:
            if helper is not None:
                _kill_group(helper, signal.SIGTERM)
        finish_command(run, out.decode(errors="replace"), err.decode(errors="replace"), code, wall)
        if self.on_update is not None:
            self.on_update(self.runs)

    def _wait_listening(self, helper: subprocess.Popen[bytes], port: int) -> str:
        """"" once something listens on `port` in the client namespace, else what went wrong."""
        argv = self.lab.exec_argv("client", ["ss", "-ltnH", f"sport = :{port}"])
        deadline = time.monotonic() + WRAP_READY
        while time.monotonic() < deadline:
            if helper.poll() is not None:
                said = helper.stderr.read().decode(errors="replace").strip() if helper.stderr else ""
                return f"exited with {helper.returncode} before listening on port {port}" + (f": {said}" if said else "")
            try:
                if subprocess.run(argv, capture_output=True, text=True, timeout=5).stdout.strip():
                    return ""
            except (OSError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.2)
        return f"did not listen on port {port} within {WRAP_READY:g} s"

    def _read_progress(self, run: ProbeRun, proc: subprocess.Popen[bytes]) -> None:
        """curl's progress meter (stderr, lines ended by CR), the evasion client's JSON lines, or the
        QUIC client's `progress N` lines (stderr; any other line there is its error message)."""
        assert proc.stderr is not None and proc.stdout is not None
        stream = proc.stdout if run.probe.protocol == "tls" else proc.stderr
        buf = b""
        while True:
            chunk = stream.read(512) if run.probe.protocol != "tls" else stream.readline()
            if not chunk:
                break
            if run.probe.protocol == "tls":
                try:
                    event = json.loads(chunk)
                except ValueError:
                    continue
                if event.get("event") == "done":
                    run.final = event
                    continue
                value = int(event.get("bytes", 0))
            else:
                buf += chunk
                *lines, buf = re.split(rb"[\r\n]", buf)
                value = -1
                if run.probe.protocol == "quic":
                    for line in lines:
                        got = quic_progress(line)
                        if got is not None:
                            value = got
                        elif line.strip():
                            run.client_error = line.decode(errors="replace").strip().removeprefix("h3probe: ")
                    if value >= 0:  # uploads too: the count is what the server says it received
                        self._progress(run, value)
                    continue
                for line in lines:
                    if line.startswith(b"curl: ("):
                        run.client_error = line.decode(errors="replace").strip()
                        continue
                    parts = line.decode(errors="replace").split()
                    if len(parts) >= 12 and parts[0].isdigit():
                        got, sent = _curl_size(parts[3]), _curl_size(parts[5])
                        if got is not None and sent is not None:
                            value = got + sent
                if value < 0:
                    continue
            if run.probe.protocol != "tls" and run.probe.direction == "upload":
                continue  # uploads: the `ss` poller reports what the server acknowledged
            self._progress(run, value)

    def _finish(self, run: ProbeRun, out: str, code: int | None) -> None:
        probe = run.probe
        if probe.protocol == "tls":
            final = run.final
            run.cause, detail = classify_raw(final, code)
            if run.cause == CAUSE_COMPLETED and final is not None:
                run.bytes, run.seconds, run.completed = int(final["bytes"]), float(final["seconds"]), True
            else:
                run.error = detail
                run.seconds = time.monotonic() - run.started
        else:
            result = parse_result(out)
            if probe.protocol == "quic":
                run.cause, detail = classify_quic(code, run.client_error)
            else:
                run.cause, detail = classify_curl(code, result.status if result else None, run.client_error)
            if result is not None:
                run.handshake = result.handshake(quic=probe.protocol == "quic", tls=probe.protocol != "http")
            if run.cause == CAUSE_COMPLETED and result is not None:
                run.bytes = result.uploaded if probe.direction == "upload" else result.downloaded
                # Goodput of the transfer itself: connection and TLS set-up are not the payload's
                # time (a small request on a fast path would look slow otherwise).
                total, setup = result.total, result.pretransfer
                run.seconds = total - setup if total > setup > 0 else total
                run.completed = True
            else:
                if run.cause == CAUSE_COMPLETED:  # exit 0 without a RESULT line: not the client we know
                    run.cause, detail = CAUSE_LAB, "the client printed no RESULT line"
                run.seconds = time.monotonic() - run.started
                run.error = detail
                if result is not None:  # curl writes -w on a failure too: what it had by then
                    run.bytes = max(run.bytes, result.uploaded if probe.direction == "upload" else result.downloaded)
        run.done = True
        run.current_speed = 0.0
        if self.on_update is not None:
            self.on_update(self.runs)

    def _keep_controls_busy(self, controls: list[ProbeRun], until: threading.Event) -> None:
        """Run the controls again and again until `until` is set; the first runs stay the judged ones."""
        while not until.is_set():
            for shown in controls:
                again = ProbeRun(shown.probe)
                self.run_probe(again, fixed_port=False)
                if again.completed:
                    with self._lock:
                        shown.current_speed = again.speed
                        shown.done = False  # drawn as running while it repeats
                    if self.on_update is not None:
                        self.on_update(self.runs)
            until.wait(0.5)
        for shown in controls:
            shown.done = True
            shown.current_speed = 0.0

    def _parallel(self) -> bool:
        if any(p.protocol == "command" for p in self.scenario.probes):
            return False  # a browser's start-up would crowd the others' measurements
        return all(r.scope == "flow" and r.sticky == 0 for r in self.scenario.rules)

    def run(self) -> RunReport:
        started = time.time()
        t0 = time.monotonic()
        controls = [r for r in self.runs if r.probe.control]
        others = [r for r in self.runs if not r.probe.control]
        stop = threading.Event()
        poller = threading.Thread(target=self._poll_acked, args=(stop,), daemon=True)
        poller.start()
        for run in controls:
            self.run_probe(run)
        control_speed = max((r.speed for r in controls if r.completed), default=None)
        # A QUIC probe is compared with QUIC controls, a TCP one with TCP controls, when there are
        # such (the lab's HTTP/3 runs far below curl over TCP).
        same: dict[bool, float | None] = {}
        for quic in (False, True):
            speeds = [r.speed for r in controls if r.completed and (r.probe.protocol == "quic") == quic]
            same[quic] = max(speeds) if speeds else control_speed
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
        shakes: dict[bool, float | None] = {}
        for quic in (False, True):
            times = [r.handshake for r in controls if r.handshake is not None and (r.probe.protocol == "quic") == quic]
            shakes[quic] = max(times) if times else None
        for run in self.runs:
            run.rate = self.rate_for(run.probe)
            run.observed = judge(run, run.rate, same[run.probe.protocol == "quic"])
            run.check_failures = check_expectations(run, shakes[run.probe.protocol == "quic"])
        return RunReport(self.scenario.name, self.scenario.path, self.runs, self.rate, control_speed,
                         started, time.monotonic() - t0)


class CensorProcess(Background):
    """`throttle censor` in the lab's censor namespace, as a child; always stopped."""

    def __init__(self, scenario_path: str, netns: str, *extra: str) -> None:
        super().__init__([sys.executable, "-m", "throttle", "censor", "--scenario", scenario_path, "--netns", netns,
                          "--quiet", *extra], ready="active", what="the censor")


def run_scenario(scenario: Scenario, *, lab_name: str = "throttle", keep: bool = False,
                 on_update: Callable[[list[ProbeRun]], None] | None = None,
                 on_phase: Callable[[str], None] | None = None, busy_controls: bool = False,
                 baseline: bool = True) -> RunReport:
    """Lab up (or reused), the controls alone (their no-censor baseline), censor on, probes,
    censor off, lab down unless kept or already up."""
    if not scenario.probes:
        raise ThrottleError(f"{scenario.path}: no [[probe]] tables; `throttle run` needs traffic to try")
    if not any(p.control for p in scenario.probes):
        raise ThrottleError(f"{scenario.path}: no probe has control = true; add one to a name no rule matches")
    lab = Lab(lab_name)
    was_up = lab.status().up
    phase = on_phase or (lambda text: None)
    phase("reusing the running lab" if was_up else "bringing the lab up")
    lab.up(sorted({p.host for p in scenario.probes}))
    try:
        with tempfile.TemporaryDirectory(prefix="throttle-run-") as tmp:
            runner = Runner(scenario, lab, Path(tmp), on_update, busy_controls)
            if baseline:
                phase("measuring the controls without the censor (their baseline)")
                runner.measure_baseline()
            phase(f"starting the censor with {scenario.name}")
            with CensorProcess(scenario.path, lab.ns("censor")):
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
