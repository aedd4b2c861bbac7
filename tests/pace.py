"""How much slower this machine runs than the one the tests' time limits were chosen on.

A few tests bound how long something may take: a deadline a child must be killed at, a start
timeout, how long a load generator gets. Those bounds guard against hangs; they are not
measurements, and on a slow machine (an emulated VM without KVM runs Python 10-20 times slower;
a busy CI runner, 2 times) they must stretch, or the suite tests the machine instead of the code.

`SCALE` is measured once per run (by the controller, which hands it to its workers in the
environment): a fixed piece of Python and a bare interpreter start, each timed best of five,
against what they took on the project's machine; the larger ratio, never below 1.
`THROTTLE_TEST_TIME_SCALE` sets it by hand. `pytest`'s header prints it.

The soak tests' loads (flows at once, connections a second) are sized for the project's machine; a
machine under SLOW_MACHINE times slower (an emulated VM) cannot generate them, so `load` divides
them by the scale there, and only there: on the project's machine, busy or not, they stay whole.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

ENV = "THROTTLE_TEST_TIME_SCALE"
# What the pieces below took on the project's machine (2 cores, Debian 12, Python 3.11), best of five.
REFERENCE_LOOP = 0.024
REFERENCE_SPAWN = 0.009


def _loop() -> float:
    started = time.perf_counter()
    table: dict[int, int] = {}
    for i in range(200_000):
        table[i % 1000] = table.get(i % 1000, 0) + i
    sorted(str(i) for i in range(20_000))
    return time.perf_counter() - started


def _spawn() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-S", "-c", "pass"], check=False)
    return time.perf_counter() - started


def measure() -> float:
    loop = min(_loop() for _ in range(5))
    spawn = min(_spawn() for _ in range(5))
    return max(1.0, loop / REFERENCE_LOOP, spawn / REFERENCE_SPAWN)


def _scale() -> float:
    given = os.environ.get(ENV)
    if given:
        try:
            return max(1.0, float(given))
        except ValueError:
            raise SystemExit(f"{ENV}={given!r} is not a number (e.g. {ENV}=10 for an emulated VM)") from None
    value = measure()
    os.environ[ENV] = f"{value:.2f}"  # for the workers and any child that runs tests
    return value


SCALE = _scale()


SLOW_MACHINE = 4.0


def load(amount: float, least: float) -> float:
    """A soak test's load for this machine: whole unless it is SLOW_MACHINE times slower, then
    divided by the scale, never below `least`."""
    return amount if SCALE < SLOW_MACHINE else max(least, amount / SCALE)


def seconds(bound: float) -> float:
    """A time bound, stretched for this machine."""
    return bound * SCALE
