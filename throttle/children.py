"""Every child process throttle starts, in five shapes:

- `run` and `call`: a short command to its end (`ethtool -K`, `modprobe`, dnsmasq's own
  daemonising start; or a user's command in the lab with the terminal's input and output);
  `capture` when the caller judges the exit status itself (iptables, clang, `ss`, iperf3).
- `watch`: a probe's client from start to exit, both output pipes read in the calling thread (one
  stream handed over as it comes, for progress; the other kept), killed at a deadline (with its
  whole process group when it runs in a session of its own: a browser's helpers, a shell's
  children) and always reaped, on an error too: one thread per running client, no reader threads
  or timers beside it.
- `Session`: a helper in a session of its own beside a command (a command probe's `wrap`), its
  whole group stopped at the end of a `with` block.
- `Background`: a child that runs beside a measurement (the censor, tcpdump, iperf3) inside a
  `with` block: started until it says it is ready, and always stopped with SIGINT (so it cleans
  up: the censor removes its rules, tcpdump flushes its capture), then killed if it does not stop
  in time. One that does not print its ready line within `start_timeout` seconds, or that exits
  first, is killed and reported with what it printed; it is never left behind.
- `start_daemon`: a service that outlives the process that starts it (the lab's servers, found
  again later through their pid files): its own session, output appended to a log, ready once its
  pid file names it or its log shows a ready line. `stop` ends such processes by pid, SIGTERM then
  SIGKILL, whoever started them.

A daemon that is a child of this process is watched by a thread that waits for it, so it never
lingers as a zombie, whoever stops it and whenever it dies. The thread holds the only reference to
its Popen (no table of children here), and is named after the pid so that `stop` can wait for the
reaping it does.
"""

from __future__ import annotations

import os
import select
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from throttle.errors import ThrottleError

POLL = 0.02  # seconds between looks at a pid file, a log or a dying process
STRAGGLER = 5.0  # seconds a killed command's pipes may stay open (a child that escaped) before we stop reading
_REAPER = "reap-{pid}"


def run(argv: Sequence[str], what: str) -> str:
    """Run a command to its end with no input; its standard output. A ThrottleError naming `what`,
    with what it printed, when it cannot start or exits with a failure."""
    try:
        proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except OSError as exc:
        raise ThrottleError(f"{what} could not start: {exc}") from None
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip()
        raise ThrottleError(f"{what} failed (exit {proc.returncode}): {err}")
    return proc.stdout


@dataclass(frozen=True, slots=True)
class Captured:
    code: int  # exit status, negative when a signal ended it
    out: str
    err: str


def capture(argv: Sequence[str], what: str, timeout: float | None = None) -> Captured:
    """Run a command to its end with no input, whatever its exit status (the caller judges it).
    A ThrottleError naming `what` when it cannot start or outlives `timeout` seconds (then killed)."""
    try:
        proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except OSError as exc:
        raise ThrottleError(f"{what} could not start: {exc}") from None
    except subprocess.TimeoutExpired:
        raise ThrottleError(f"{what} did not finish within {timeout:g} s (killed)") from None
    return Captured(proc.returncode, proc.stdout, proc.stderr)


def call(argv: Sequence[str]) -> int:
    """Run a command in the foreground with this process's input and output; its exit status
    (negative: the signal that ended it). An OSError when it cannot be started."""
    return subprocess.call(list(argv))


class Background:
    # The start timeout guards against a child that hangs before its ready line (one that fails
    # exits, and is reported at once): generous, since in an emulated VM (no KVM) the censor's
    # start alone took over 30 s with the test suite beside it.
    def __init__(self, argv: Sequence[str], ready: str, what: str, fix: str = "", stop_timeout: float = 20,
                 start_timeout: float = 120) -> None:
        self.argv = list(argv)
        self.ready = ready  # text of the first stderr line when the process is ready ("" : at once)
        self.what = what
        self.fix = fix  # what to do when it cannot be started at all
        self.stop_timeout = stop_timeout
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.tail = ""  # what it printed on stderr after the ready line, read when it stopped
        self.killed = False  # it did not stop within stop_timeout of SIGINT, and was killed

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.what} was not started"
        return self.proc.pid

    def poll(self) -> int | None:
        """Its exit code once it has ended, else None."""
        return None if self.proc is None else self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None, f"{self.what} was not started"
        return self.proc.wait(timeout)

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
            try:  # it is failing: let it finish saying why (a traceback is many lines) before the kill
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
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
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, self.tail = self.proc.communicate(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.killed = True
            self.proc.kill()
            self.proc.wait()


# -- daemons ----------------------------------------------------------------------------------------

def start_daemon(argv: Sequence[str], what: str, log: Path, *, pid_file: Path | None = None, ready: str = "",
                 env: Mapping[str, str] | None = None, start_timeout: float = 15.0) -> int:
    """Start a service that outlives this process; its pid, once it is ready.

    It runs in a session of its own (a terminal's hangup or ^C does not reach it), in `/`, with no
    input and its output appended to `log`. Ready: once `pid_file` holds its pid (a server writes
    it when its sockets are bound), or once `ready` appears in what it writes to `log`; with
    neither, at once. If it exits first, or `start_timeout` passes, it is killed and the
    ThrottleError carries the last lines of its log.
    """
    start = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=None if env is None else dict(env), cwd="/", start_new_session=True)
        except OSError as exc:
            raise ThrottleError(f"{what} could not start: {exc}") from None
    deadline = time.monotonic() + start_timeout
    while not _is_ready(proc.pid, pid_file, ready, log, start):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise ThrottleError(f"{what} did not start: " + (" / ".join(tail) or f"see {log}"))
        time.sleep(POLL)
    threading.Thread(target=proc.wait, name=_REAPER.format(pid=proc.pid), daemon=True).start()
    return proc.pid


def _is_ready(pid: int, pid_file: Path | None, ready: str, log: Path, start: int) -> bool:
    if pid_file is not None and read_pid(pid_file) != pid:
        return False
    if ready:
        with open(log, "rb") as f:
            f.seek(start)
            return ready.encode() in f.read()
    return True


def stop(pids: Iterable[int], timeout: float = 3.0) -> None:
    """End processes by pid: SIGTERM, then SIGKILL for those still there after `timeout` seconds.
    Returns once every one is gone (and, for daemons this process started, reaped); a
    ThrottleError names those that outlive SIGKILL by `timeout` as well."""
    left = set(pids)
    stopped = set(left)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while (left := {p for p in left if alive(p)}) and time.monotonic() < deadline:
            time.sleep(POLL)
        if not left:
            break
    if left:
        raise ThrottleError(f"processes {sorted(left)} did not exit after SIGKILL")
    reapers = {_REAPER.format(pid=pid) for pid in stopped}
    for thread in threading.enumerate():
        if thread.name in reapers:
            thread.join(timeout)


def alive(pid: int) -> bool:
    """True for a process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def read_pid(path: Path) -> int | None:
    """The pid a pid file holds; None when it is missing or holds no number."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# -- clients and helpers ----------------------------------------------------------------------------

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


class Session:
    """A helper in a session of its own (a command probe's `wrap`), for a `with` block: started
    on entry, stopped on exit with its whole process group (`stop_signal`, then SIGKILL)."""

    def __init__(self, argv: Sequence[str], what: str, stop_signal: int = signal.SIGTERM) -> None:
        self.argv = list(argv)
        self.what = what
        self.stop_signal = stop_signal
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        try:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         start_new_session=True)
        except OSError as exc:
            raise ThrottleError(f"{self.what} could not start: {exc}") from None
        return self

    def exited(self) -> str | None:
        """None while it runs; once it has ended, how (its exit status and last words)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            return None
        said = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
        return f"exited with {self.proc.returncode}" + (f": {said}" if said else "")

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc is not None:
            kill_group(self.proc, self.stop_signal)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
