"""throttle.children without root: short commands, and daemons that outlive their starter
(started in their own session, ready by pid file or ready line, stopped by pid and reaped)."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests import pace
from throttle import children
from throttle.errors import ThrottleError


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def gone(pid: int) -> bool:
    """Not even a zombie: reaped."""
    return not Path(f"/proc/{pid}").exists()


def test_run_returns_the_output_and_reports_a_failure_with_its_message() -> None:
    assert children.run(python("print('hello')"), "greeter") == "hello\n"
    with pytest.raises(ThrottleError, match=r"sulker failed \(exit 3\): no way"):
        children.run(python("import sys; sys.stderr.write('no way'); sys.exit(3)"), "sulker")
    with pytest.raises(ThrottleError, match="ghost could not start"):
        children.run(["/nonexistent/ghost"], "ghost")


def test_call_passes_the_exit_status_through() -> None:
    assert children.call(python("import sys; sys.exit(5)")) == 5


def test_a_daemon_is_ready_when_its_pid_file_names_it(tmp_path: Path) -> None:
    pid_file, log = tmp_path / "d.pid", tmp_path / "d.log"
    pid = children.start_daemon(python(f"""
        import os, time
        time.sleep(0.2)
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(60)
    """), "the daemon", log, pid_file=pid_file)
    try:
        assert children.read_pid(pid_file) == pid and children.alive(pid)
        assert os.getsid(pid) == pid  # a session of its own: a terminal's ^C does not reach it
    finally:
        children.stop([pid])
    assert gone(pid)


def test_a_daemon_is_ready_on_its_ready_line(tmp_path: Path) -> None:
    log = tmp_path / "d.log"
    log.write_text("ready, said an earlier run\n")  # only what this start writes counts
    pid = children.start_daemon(python("""
        import time
        time.sleep(0.3)
        print("serving", flush=True)
        time.sleep(60)
    """), "the daemon", log, ready="serving")
    try:
        assert "serving" in log.read_text()
    finally:
        children.stop([pid])
    assert gone(pid)


def test_a_daemon_that_dies_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    with pytest.raises(ThrottleError, match="the daemon did not start: .*port 443 is taken"):
        children.start_daemon(python("import sys; sys.exit('port 443 is taken')"), "the daemon",
                              tmp_path / "d.log", pid_file=tmp_path / "d.pid")


def test_a_daemon_that_never_gets_ready_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "d.pid"
    with pytest.raises(ThrottleError, match="the daemon did not start: waiting"):
        children.start_daemon(python(f"""
            import os, time
            print("waiting", os.getpid(), flush=True)
            time.sleep(60)
        """), "the daemon", tmp_path / "d.log", pid_file=pid_file, start_timeout=pace.seconds(0.5))
    pid = int((tmp_path / "d.log").read_text().split()[1])
    assert gone(pid)


def test_stop_escalates_to_sigkill_and_reaps(tmp_path: Path) -> None:
    log = tmp_path / "d.log"
    pid = children.start_daemon(python("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stubborn", flush=True)
        time.sleep(60)
    """), "the daemon", log, ready="stubborn")
    children.stop([pid], timeout=0.3)
    assert gone(pid)


def test_a_daemon_killed_by_someone_else_is_reaped_too(tmp_path: Path) -> None:
    pid = children.start_daemon(python("import time; print('up', flush=True); time.sleep(60)"), "the daemon",
                                tmp_path / "d.log", ready="up")
    os.kill(pid, signal.SIGKILL)
    children.stop([pid])  # already dead: waits for its reaping
    assert gone(pid)


def test_stop_of_nothing_and_of_the_gone_is_no_error() -> None:
    children.stop([])
    children.stop([2**22 + 12345])  # above the default pid_max: no such process


def test_read_pid_and_alive(tmp_path: Path) -> None:
    assert children.read_pid(tmp_path / "none.pid") is None
    (tmp_path / "bad.pid").write_text("not a pid\n")
    assert children.read_pid(tmp_path / "bad.pid") is None
    (tmp_path / "ok.pid").write_text(f"{os.getpid()}\n")
    assert children.read_pid(tmp_path / "ok.pid") == os.getpid()
    assert children.alive(os.getpid()) and not children.alive(2**22 + 12345)


def test_capture_leaves_the_exit_status_to_the_caller() -> None:
    got = children.capture([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                           "a script")
    assert (got.code, got.out.strip(), got.err.strip()) == (3, "out", "err")
    with pytest.raises(ThrottleError, match="no-such-tool could not start"):
        children.capture(["/nonexistent/no-such-tool"], "no-such-tool")
    with pytest.raises(ThrottleError, match="did not finish within 0.5 s"):
        children.capture([sys.executable, "-c", "import time; time.sleep(30)"], "a sleeper", timeout=0.5)


def gone(pid: int, within: float = 5.0) -> bool:
    """Whether `pid` ends within `within` seconds: a signalled grandchild needs a moment to die, and
    its new parent one to reap it."""
    deadline = time.monotonic() + within
    while children.alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_watch_kills_at_the_deadline_with_the_whole_group(tmp_path: Path) -> None:
    """A shell in its own session that started a grandchild: at the deadline both are gone, and
    what the shell printed before is kept."""
    pid_file = tmp_path / "grandchild"
    script = f"sleep 60 & echo $! > {pid_file}; echo started; wait"
    seen: list[bytes] = []
    watched = children.watch(["sh", "-c", script], deadline=time.monotonic() + 1.0, session=True,
                             progress="stderr", on_progress=seen.append)
    assert watched.killed and watched.out.strip() == b"started"
    assert gone(int(pid_file.read_text()))


def test_a_session_helper_is_stopped_with_its_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild"
    with children.Session(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], "a helper") as helper:
        for _ in range(200):
            if pid_file.exists() and pid_file.read_text().strip():
                break
            time.sleep(0.01)
        assert helper.exited() is None
        grandchild = int(pid_file.read_text())
    assert gone(grandchild)
    with children.Session(["sh", "-c", "echo gone >&2; exit 4"], "a helper") as helper:
        assert helper.proc is not None and helper.proc.wait(timeout=10) == 4
        assert helper.exited() == "exited with 4: gone"
