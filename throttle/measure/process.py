"""A probe client's process from start to exit, and the stopping of a process group.

`watch` runs a command with both output pipes read in the calling thread (one stream handed over as
it comes, for progress; the other kept), kills it at a deadline (with its whole process group when
it runs in a session of its own: a browser's helpers, a shell's children) and always reaps it, on an
error too. One thread per running client, and no reader threads or timers beside it.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

STRAGGLER = 5.0  # seconds a killed command's pipes may stay open (a child that escaped) before we stop reading


@dataclass(frozen=True, slots=True)
class Watched:
    out: bytes  # stdout, unless it was the progress stream
    err: bytes  # stderr, unless it was the progress stream
    code: int  # exit status, negative when a signal ended it
    killed: bool  # killed at the deadline


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
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


def _stop(proc: subprocess.Popen[bytes], session: bool) -> None:
    if session:
        kill_group(proc)
    elif proc.poll() is None:
        proc.kill()


def watch(argv: Sequence[str], *, deadline: float, session: bool, progress: str | None,
          on_progress: Callable[[bytes], None]) -> Watched:
    """Run `argv` until it exits or `deadline` (time.monotonic()) passes; `progress` ("stdout",
    "stderr" or None) names the stream given to `on_progress` chunk by chunk. An OSError when it
    cannot start."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=session)
    try:
        kept, killed = _read(proc, deadline, session, progress, on_progress)
        try:  # its pipes are closed: it is exiting, unless it closed them itself
            code = proc.wait(timeout=max(0.0, deadline - time.monotonic()) + STRAGGLER)
        except subprocess.TimeoutExpired:
            _stop(proc, session)
            killed, code = True, proc.wait()
    except BaseException:
        _stop(proc, session)
        proc.wait()
        raise
    return Watched(bytes(kept["stdout"]), bytes(kept["stderr"]), code, killed)


def _read(proc: subprocess.Popen[bytes], deadline: float, session: bool, progress: str | None,
          on_progress: Callable[[bytes], None]) -> tuple[dict[str, bytearray], bool]:
    """Both pipes until they close: (what the other streams said, killed at the deadline)."""
    assert proc.stdout is not None and proc.stderr is not None
    kept = {"stdout": bytearray(), "stderr": bytearray()}
    killed = False
    with selectors.DefaultSelector() as sel, proc.stdout, proc.stderr:
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0 and killed:
                break  # something it started still holds the pipes: what it printed is in
            if left <= 0:
                _stop(proc, session)
                killed, deadline = True, time.monotonic() + STRAGGLER
                continue
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.data == progress:
                    on_progress(chunk)
                else:
                    kept[key.data] += chunk
    return kept, killed
