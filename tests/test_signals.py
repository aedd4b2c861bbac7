"""The censor's signal handling (`throttle.censor.stopped_by_signals`) in two states: the loop's
self-pipe filled by other threads while the loop is in a long callback (where asyncio's own
`add_signal_handler` loses the signal: this case hangs with it), and the loop asleep with no timer
while the signal goes to another thread (where a Python-level handler alone never runs: this case
hangs without the wakeup fd of our own).

Each case runs in a child process (signals and wakeup fds are the process's), which prints
"stopped" once one signal stopped its loop; a hang is killed after HANG seconds and fails the test.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

HANG = 20.0  # seconds: only a lost signal takes this long

CHILD = """
import asyncio, os, signal, sys, threading, time
from throttle.censor import stopped_by_signals

state, sig = sys.argv[1], getattr(signal, sys.argv[2])

async def main():
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    with stopped_by_signals(loop, stop.set):
        if state == "pipe-full":
            def wake_often_then_signal():
                for _ in range(2000):  # far more than the socketpair holds (278 one-byte writes)
                    loop.call_soon_threadsafe(lambda: None)
                os.kill(os.getpid(), sig)

            def long_callback():  # the loop drains nothing meanwhile
                other = threading.Thread(target=wake_often_then_signal)
                other.start()
                other.join()

            loop.call_soon(long_callback)
        else:  # "asleep": no timer at all; the signal is delivered to another thread
            def signal_this_thread():
                time.sleep(0.5)  # the loop is asleep in epoll_wait by then
                signal.pthread_kill(threading.get_ident(), sig)

            threading.Thread(target=signal_this_thread).start()
        await stop.wait()
    print("stopped", flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("state", ["pipe-full", "asleep"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_one_signal_stops_the_loop(state: str, sig: signal.Signals) -> None:
    try:
        result = subprocess.run([sys.executable, "-c", CHILD, state, sig.name], capture_output=True, text=True,
                                timeout=HANG)
    except subprocess.TimeoutExpired:
        pytest.fail(f"one {sig.name} did not stop the loop ({state}) within {HANG:.0f} s")
    assert result.returncode == 0 and result.stdout.strip() == "stopped", result.stderr[-2000:]
    assert "wakeup fd" not in result.stderr, result.stderr[-2000:]
