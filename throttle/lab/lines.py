"""What the lab's probe clients print and how they exit: the one definition of those lines.

The clients (`throttle.lab.h3probe`, `throttle.lab.evasion`, and curl through its `-w` template)
write them; `throttle.measure` reads them. Both sides use the functions here, so a format cannot
change on one side alone.

    QUIC client (h3probe)  stderr `progress N` while it runs, `h3probe: MESSAGE` on a failure;
                           stdout `RESULT STATUS UPLOADED DOWNLOADED TOTAL PRETRANSFER` at the end;
                           exits with one of EXIT_CODES
    curl                   stdout `RESULT ...` as above plus CONNECT APPCONNECT (CURL_WRITE_OUT)
    raw TLS client         stdout JSON lines (`--json`): {"event": "progress", ...} about every
                           0.5 s, then one {"event": "done", ...}

Client ports are given as `LO-HI` ranges (`--local-port`), as curl writes them.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from typing import Any, TextIO

# ---- the QUIC client's exit codes (curl's numbers for the same failures) -------------------------
EXIT_OK, EXIT_REFUSED, EXIT_HTTP, EXIT_TIMEOUT, EXIT_HANDSHAKE, EXIT_LOST = 0, 7, 22, 28, 35, 56
EXIT_CODES = {
    EXIT_REFUSED: "nothing listens on UDP 443 (ICMP port unreachable): the lab's HTTP/3 server",
    EXIT_HTTP: "HTTP error status from the lab's HTTP/3 server",
    EXIT_TIMEOUT: "the transfer (or the handshake) stalled until its timeout",
    EXIT_HANDSHAKE: "the QUIC handshake failed (certificate, ALPN)",
    EXIT_LOST: "the connection or stream ended before the transfer did",
}


def emit(line: str, stream: TextIO) -> None:
    """One line to the runner, at once: a client's lines are read while it runs."""
    stream.write(line + "\n")
    stream.flush()


# ---- progress and error lines (h3probe, stderr) --------------------------------------------------
_PROGRESS = re.compile(rb"^progress (\d+)$")
ERROR_PREFIX = "h3probe: "


def progress_line(count: int) -> str:
    return f"progress {count}"


def parse_progress(line: bytes) -> int | None:
    """The byte count of a progress line, else None: bytes received for a download, bytes the
    server reports it has received for an upload."""
    m = _PROGRESS.match(line.strip())
    return int(m.group(1)) if m else None


def error_line(message: str) -> str:
    return ERROR_PREFIX + message


def error_message(line: bytes) -> str:
    """The message of an error line (any other non-progress line is taken whole)."""
    return line.decode(errors="replace").strip().removeprefix(ERROR_PREFIX)


# ---- the RESULT line (curl's -w, and h3probe's stdout) -------------------------------------------
CURL_WRITE_OUT = ("\nRESULT %{http_code} %{size_upload} %{size_download} %{time_total} %{time_pretransfer} "
                  "%{time_connect} %{time_appconnect}\n")
_RESULT = re.compile(r"RESULT (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+)(?: ([\d.]+) ([\d.]+))?")


def result_line(status: int, uploaded: int, downloaded: int, total: float, pretransfer: float) -> str:
    return f"RESULT {status} {uploaded} {downloaded} {total:.6f} {pretransfer:.6f}"


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


# ---- the raw TLS client's JSON lines -------------------------------------------------------------
PROGRESS_EVENT, DONE_EVENT = "progress", "done"


def event_line(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"))


def progress_event(count: int, seconds: float) -> dict[str, Any]:
    return {"event": PROGRESS_EVENT, "bytes": count, "seconds": round(seconds, 3)}


def parse_event(line: bytes) -> dict[str, Any] | None:
    """One JSON line as a dict, else None (anything else the client may have written)."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


# ---- client port ranges --------------------------------------------------------------------------
def port_range(ports: tuple[int, int]) -> str:
    return f"{ports[0]}-{ports[1]}"


def port_range_argument(text: str) -> tuple[int, int]:
    """`parse_port_range` as an argparse `type` (the clients' --local-port LO-HI)."""
    try:
        return parse_port_range(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_port_range(text: str) -> tuple[int, int]:
    """`LO-HI` (or one port) as (lo, hi); ValueError when it is not a range of ports."""
    lo, _, hi = text.partition("-")
    if not (lo.isdigit() and (hi or lo).isdigit()) or not 0 < int(lo) <= int(hi or lo) < 65536:
        raise ValueError(f"{text!r} is not a port range; write e.g. 40000-40009")
    return int(lo), int(hi or lo)
