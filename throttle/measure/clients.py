"""The probe clients: for each kind of probe, the command that runs it and how its output is read.

One small interface (`ProbeClient`) per kind: its argv in the client namespace, the progress its
output shows while it runs, and its `Outcome` once it has exited: the cause (completed, timeout,
reset, or lab), the detail of a failure, bytes, seconds and the TLS (or QUIC) handshake time. The
runner (`throttle.measure.runner`) starts the process, feeds it the output and stores the outcome.

    https, http  curl, with the `-w` RESULT line of `throttle.lab.lines`; its progress meter on stderr
    tls          `throttle.lab.evasion` (hand-made ClientHellos to the lab's sink): JSON lines
    quic         `throttle.lab.h3probe` (HTTP/3): progress and error lines, RESULT, its exit codes
    command      any command of the scenario's own (`throttle.measure.commands`)
    browser      headless Chromium loading the lab server's upload or download page, over HTTP/3 too
                 (`throttle.measure.commands`)

"timeout" and "reset" are the network's doing (the probe is blocked); "lab" is the lab's own
failure (connection refused, a certificate or TLS error, an HTTP error status, a client that could
not run), which fails the run instead of reading as blocked.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from throttle.kernel.tools import require_tool
from throttle.lab.lines import (CURL_WRITE_OUT, DONE_EVENT, EXIT_CODES, EXIT_HANDSHAKE, EXIT_HTTP, EXIT_LOST,
                                EXIT_OK, EXIT_REFUSED, EXIT_TIMEOUT, PROGRESS_EVENT, ClientResult, error_message,
                                parse_event, parse_progress, parse_result, port_range)
from throttle.lab.topology import SERVER_V4
from throttle.scenario import Probe

CAUSE_COMPLETED, CAUSE_TIMEOUT, CAUSE_RESET, CAUSE_LAB = "completed", "timeout", "reset", "lab"
SINK_PORT = 8443  # the lab server's raw sink, the raw TLS client's server
WATCHDOG = 15.0  # seconds past its own timeout before the runner kills a client that has its own


def default_timeout(probe: Probe, rate: float) -> float:
    """Seconds a probe gets: its own `timeout`, else 2.5 x its size at `rate` and 15 s more."""
    if probe.timeout > 0:
        return probe.timeout
    expected = probe.size / rate if rate > 0 else 10.0
    return min(300.0, 2.5 * expected + 15.0)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a client's run came to."""

    cause: str  # completed, timeout, reset, lab
    detail: str = ""  # why it did not complete
    bytes: int = 0  # transferred; on a failure, what the client counted by then
    seconds: float = 0.0  # the transfer's own time when completed; on a failure, the wall time
    handshake: float | None = None  # seconds of the TLS (or QUIC) handshake, when the client says

    @property
    def completed(self) -> bool:
        return self.cause == CAUSE_COMPLETED


@dataclass(frozen=True, slots=True)
class Exit:
    """How a client's process ended, with what it printed besides its progress stream."""

    out: str  # stdout (unless that is its progress stream)
    err: str  # stderr (unless that is its progress stream)
    code: int  # exit status, negative when a signal ended it
    elapsed: float  # seconds from its start
    killed: bool = False  # the runner killed it at its deadline


@dataclass(frozen=True)
class Setup:
    """What a client needs from the run it is part of."""

    exec_argv: Callable[[list[str]], list[str]]  # a command as run in the lab's client namespace
    workdir: Path  # upload files, a browser's profile
    timeout: float  # seconds: the probe's, or from its size and rate (`default_timeout`)
    ports: tuple[int, int] | None = None  # its client port range (`measure.ports`); None: any port
    wrap_port: int = 0  # a command probe's helper port
    ca_dir: Path | None = None  # the lab's CA files (`lab.ca`): the leaf key a browser over HTTP/3 accepts


def upload_file(workdir: Path, size: int) -> Path:
    path = workdir / f"upload-{size}"
    if not path.exists():
        with path.open("wb") as f:  # incompressible, like a photo
            chunk = os.urandom(1 << 20)
            left = size
            while left > 0:
                f.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
    return path


class ProbeClient:
    """One probe's client; a new one for every run of the probe (it keeps what its output said)."""

    what: ClassVar[str] = "the client"  # in "... could not start"
    takes_ports: ClassVar[bool] = False  # its client port comes from the probe's range (ss, captures)
    udp: ClassVar[bool] = False  # over UDP (QUIC): judged against QUIC controls, captured as datagrams
    polled: ClassVar[bool] = False  # `ss` counts what its TCP connection acknowledged and received
    crowds: ClassVar[bool] = False  # its start-up would crowd other probes' measurements: run alone
    session: ClassVar[bool] = False  # own process group, killed whole at the timeout (no own timeout)
    progress_stream: ClassVar[str | None] = None  # "stdout" or "stderr": read while it runs
    line_end: ClassVar[bytes] = rb"[\r\n]"

    def __init__(self, probe: Probe, setup: Setup) -> None:
        self.probe = probe
        self.setup = setup
        self._pending = b""

    @property
    def address(self) -> str:
        return self.probe.address or SERVER_V4

    @property
    def upload(self) -> bool:
        return self.probe.direction == "upload"

    @property
    def deadline(self) -> float:
        """Seconds after its start when the runner kills it: a client with its own --max-time gets
        a watchdog's grace; the others are stopped at their timeout."""
        return self.setup.timeout if self.session else self.setup.timeout + WATCHDOG

    def argv(self) -> list[str]:
        raise NotImplementedError

    @contextlib.contextmanager
    def prepared(self) -> Iterator[str]:
        """Around the run: what must exist while the client runs. Yields "" when ready, else what
        went wrong (a lab failure)."""
        yield ""

    def feed(self, chunk: bytes) -> int | None:
        """The progress stream's next bytes: the latest count its complete lines give, else None."""
        self._pending += chunk
        *lines, self._pending = re.split(self.line_end, self._pending)
        value = None
        for line in lines:
            got = self.read(line)
            if got is not None:
                value = got
        return value

    def read(self, line: bytes) -> int | None:
        """One line of the progress stream: bytes so far, or None."""
        return None

    def outcome(self, exit: Exit) -> Outcome:
        raise NotImplementedError

    def _timed(self) -> list[str]:
        return ["--max-time", f"{max(self.setup.timeout, 1):.0f}"]


# ---- curl: https and http ------------------------------------------------------------------------
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


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kMGT]?)$")
_MULT = {"": 1, "k": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _curl_size(text: str) -> int | None:
    m = _SIZE.match(text)
    return int(float(m.group(1)) * _MULT[m.group(2)]) if m else None


def _result_outcome(probe: Probe, cause: str, detail: str, result: ClientResult | None, exit: Exit,
                    handshake: float | None) -> Outcome:
    """curl's and the QUIC client's outcome from their RESULT line, which they print on a failure
    too (what they had by then)."""
    got = 0 if result is None else result.uploaded if probe.direction == "upload" else result.downloaded
    if cause == CAUSE_COMPLETED and result is not None:
        # Goodput of the transfer itself: connection and TLS set-up are not the payload's time (a
        # small request on a fast path would look slow otherwise).
        total, setup = result.total, result.pretransfer
        return Outcome(cause, "", got, total - setup if total > setup > 0 else total, handshake)
    if cause == CAUSE_COMPLETED:  # exit 0 without a RESULT line: not the client we know
        cause, detail = CAUSE_LAB, "the client printed no RESULT line"
    return Outcome(cause, detail, got, exit.elapsed, handshake)


class CurlClient(ProbeClient):
    """curl over TLS (https) or plain HTTP (http): an upload of a file, or a download."""

    takes_ports = True
    polled = True  # curl counts bytes handed to its socket: `ss` says what the server acknowledged
    progress_stream = "stderr"

    def __init__(self, probe: Probe, setup: Setup) -> None:
        super().__init__(probe, setup)
        self.error = ""  # curl's own message, `curl: (N) ...`

    def argv(self) -> list[str]:
        probe, address = self.probe, self.address
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
        ports = ["--local-port", port_range(self.setup.ports)] if self.setup.ports else []
        argv = [require_tool("curl", "curl"), family, "-o", "/dev/null", *self._timed(), *ports,
                "-w", CURL_WRITE_OUT, *resolve]
        if self.upload:
            argv += ["-T", str(upload_file(self.setup.workdir, probe.size)), f"{base}/upload"]
        else:
            argv += [f"{base}/bytes/{probe.size}"]
        if probe.protocol == "http" and probe.host != name:
            argv += ["-H", f"Host: {probe.host}"]
        return self.setup.exec_argv(argv)

    def read(self, line: bytes) -> int | None:
        """curl's progress meter (lines ended by CR) and its error line."""
        if line.startswith(b"curl: ("):
            self.error = line.decode(errors="replace").strip()
            return None
        parts = line.decode(errors="replace").split()
        if self.upload or len(parts) < 12 or not parts[0].isdigit():
            return None  # uploads: `ss` reports what the server acknowledged
        got, sent = _curl_size(parts[3]), _curl_size(parts[5])
        return got + sent if got is not None and sent is not None else None

    def outcome(self, exit: Exit) -> Outcome:
        result = parse_result(exit.out)
        cause, detail = classify_curl(exit.code, result.status if result else None, self.error)
        handshake = result.handshake(quic=False, tls=self.probe.protocol != "http") if result else None
        return _result_outcome(self.probe, cause, detail, result, exit, handshake)


# ---- the raw TLS client (throttle.lab.evasion) ---------------------------------------------------
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


class RawTlsClient(ProbeClient):
    """A disguised ClientHello and junk to the lab's sink; it reports bytes acknowledged itself."""

    takes_ports = True
    progress_stream = "stdout"
    line_end = rb"\n"

    def __init__(self, probe: Probe, setup: Setup) -> None:
        super().__init__(probe, setup)
        self.final: dict[str, Any] | None = None  # its closing report

    def argv(self) -> list[str]:
        probe = self.probe
        argv = [sys.executable, "-m", "throttle.lab.evasion", "--address", self.address, "--port", str(SINK_PORT),
                "--size", str(probe.size), "--evasion", probe.evasion,
                "--timeout", f"{max(self.setup.timeout, 1):.0f}", "--json"]
        if self.setup.ports:
            argv += ["--local-port", port_range(self.setup.ports)]
        if probe.sni is False:
            argv.append("--no-sni")
        else:
            argv += ["--sni", probe.sni if isinstance(probe.sni, str) else probe.host]
        if probe.ech:
            argv.append("--ech")
        return self.setup.exec_argv(argv)

    def read(self, line: bytes) -> int | None:
        event = parse_event(line)
        if event is None:
            return None
        if event.get("event") == DONE_EVENT:
            self.final = event
            return None
        return int(event.get("bytes", 0)) if event.get("event") == PROGRESS_EVENT else None

    def outcome(self, exit: Exit) -> Outcome:
        final = self.final
        cause, detail = classify_raw(final, exit.code)
        if cause == CAUSE_COMPLETED and final is not None:
            return Outcome(cause, "", int(final["bytes"]), float(final["seconds"]))
        return Outcome(cause, detail, 0, exit.elapsed)


# ---- the QUIC client (throttle.lab.h3probe) ------------------------------------------------------
_QUIC_CAUSES = {EXIT_REFUSED: CAUSE_LAB, EXIT_HTTP: CAUSE_LAB, EXIT_TIMEOUT: CAUSE_TIMEOUT,
                EXIT_HANDSHAKE: CAUSE_LAB, EXIT_LOST: CAUSE_RESET}


def classify_quic(code: int | None, message: str = "") -> tuple[str, str]:
    """(cause, detail) of a `throttle.lab.h3probe` run from its exit code and error line."""
    if code == EXIT_OK:
        return CAUSE_COMPLETED, ""
    if code is not None and code < 0:
        return CAUSE_TIMEOUT, message or "killed by the runner's watchdog after its timeout"
    if code in (EXIT_HANDSHAKE, EXIT_LOST) and "idle timeout" in message.lower():
        # aioquic gave up on a silent path before --max-time: nothing came back, as a timeout
        return CAUSE_TIMEOUT, message
    if code in _QUIC_CAUSES:
        return _QUIC_CAUSES[code], message or EXIT_CODES[code]  # its own message says more than the code
    return CAUSE_LAB, message or f"the QUIC client exited with {code}"


class QuicClient(ProbeClient):
    """An HTTP/3 GET /bytes/N or POST of N bytes; the SNI as curl's."""

    takes_ports = True
    udp = True
    progress_stream = "stderr"

    def __init__(self, probe: Probe, setup: Setup) -> None:
        super().__init__(probe, setup)
        self.error = ""  # its own account of a failure

    def argv(self) -> list[str]:
        probe = self.probe
        argv = [sys.executable, "-m", "throttle.lab.h3probe", probe.host, "--address", self.address,
                f"--{probe.direction}", str(probe.size), *self._timed()]
        if self.setup.ports:  # captures (throttle bench) find the probe by its port, as curl's
            argv += ["--local-port", port_range(self.setup.ports)]
        if probe.sni is False:
            argv.append("--no-sni")
        elif isinstance(probe.sni, str):
            argv += ["--sni", probe.sni]
        if probe.ech:
            argv.append("--ech")
        return self.setup.exec_argv(argv)

    def read(self, line: bytes) -> int | None:
        """Progress lines (uploads too: the count is what the server says it received); any other
        line is its error message."""
        got = parse_progress(line)
        if got is None and line.strip():
            self.error = error_message(line)
        return got

    def outcome(self, exit: Exit) -> Outcome:
        result = parse_result(exit.out)
        cause, detail = classify_quic(exit.code, self.error)
        handshake = result.handshake(quic=True) if result else None
        return _result_outcome(self.probe, cause, detail, result, exit, handshake)
