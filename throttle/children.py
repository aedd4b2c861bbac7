"""Child processes that run beside a measurement (the censor, tcpdump, iperf3): started until they
say they are ready, and always stopped with SIGINT (so they clean up: the censor removes its rules,
tcpdump flushes its capture), then killed if they do not stop in time.

A child that does not print its ready line within `start_timeout` seconds, or that exits first, is
killed and reported with what it printed; it is never left behind.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from throttle.errors import ThrottleError


class Background:
    def __init__(self, argv: Sequence[str], ready: str, what: str, fix: str = "", stop_timeout: float = 20,
                 start_timeout: float = 30) -> None:
        self.argv = list(argv)
        self.ready = ready  # text of the first stderr line when the process is ready ("" : at once)
        self.what = what
        self.fix = fix  # what to do when it cannot be started at all
        self.stop_timeout = stop_timeout
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.tail = ""  # what it printed on stderr after the ready line, read when it stopped

    def __enter__(self) -> Self:
        try:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        except OSError as exc:
            raise ThrottleError(f"{self.what} could not start ({exc}){'; ' + self.fix if self.fix else ''}") from None
        if not self.ready:
            return self
        try:
            line = self._first_line()
        except BaseException:
            self._kill()
            raise
        if self.ready not in line:
            self._kill()
            assert self.proc.stderr is not None
            rest = self.proc.stderr.read()
            raise ThrottleError(f"{self.what} did not start: {(line + rest).strip() or 'it printed nothing'}")
        return self

    def _first_line(self) -> str:
        """The child's first stderr line, or "" when it exits or the start timeout passes first."""
        assert self.proc is not None and self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + self.start_timeout
        chunks = b""
        while b"\n" not in chunks:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return chunks.decode(errors="replace") + f" (no ready line after {self.start_timeout:.0f} s)"
            chunk = os.read(fd, 1)  # one byte at a time: the rest stays in the pipe for `tail`
            if not chunk:
                break
            chunks += chunk
        return chunks.decode(errors="replace")

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            _, self.tail = self.proc.communicate(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
