"""Child processes that run beside a measurement: started until they say they are ready, and
always stopped with SIGINT (so they clean up: the censor removes its rules, tcpdump flushes)."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence
from typing import Any

from throttle.errors import ThrottleError


class Background:
    def __init__(self, argv: Sequence[str], ready: str, what: str, fix: str = "", stop_timeout: float = 20) -> None:
        self.argv = list(argv)
        self.ready = ready  # text of the first stderr line when the process is ready
        self.what = what
        self.fix = fix  # what to do when it cannot be started at all
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.tail = ""  # what it printed on stderr after the ready line, read when it stopped

    def __enter__(self) -> Any:
        try:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        except OSError as exc:
            raise ThrottleError(f"{self.what} could not start ({exc}){'; ' + self.fix if self.fix else ''}") from None
        line = self.proc.stderr.readline()  # type: ignore[union-attr]
        if self.ready not in line:
            self.proc.wait(timeout=10)
            rest = self.proc.stderr.read()  # type: ignore[union-attr]
            raise ThrottleError(f"{self.what} did not start: {(line + rest).strip()}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            _, self.tail = self.proc.communicate(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
