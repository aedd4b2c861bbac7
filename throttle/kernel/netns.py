"""Network namespaces by name (`ip netns` style, under /run/netns): the one place that calls setns.

`enter(name)` moves the whole process (its later sockets and child processes) into a namespace,
for the censor. `run_in(name, fn)` runs `fn` on a short-lived thread that alone enters the
namespace (setns changes only the calling thread), for the lab's sysctls: files under
/proc/sys/net belong to the namespace of the thread that opens them.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from throttle.errors import ThrottleError

T = TypeVar("T")
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

_LIBC: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    if _LIBC.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _open(name: str) -> int:
    path = NETNS_DIR / name
    if not path.exists():
        raise ThrottleError(f"network namespace {name} does not exist: run `throttle lab up` first, or name one with --netns")
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ThrottleError(f"cannot open network namespace {name}: {exc.strerror}") from None


def enter(name: str) -> None:
    """Move this process into namespace `name`. Never creates one: a missing namespace is an
    error naming the fix."""
    fd = _open(name)
    try:
        _setns(fd)
    except OSError as exc:
        raise ThrottleError(f"cannot enter network namespace {name}: {exc.strerror} (are you root?)") from None
    finally:
        os.close(fd)


def run_in(name: str, fn: Callable[[], T]) -> T:
    """`fn()` on a thread inside namespace `name`; the rest of this process stays where it is.
    What it raises (or setns: an OSError) is raised here."""
    fd = _open(name)
    results: list[T] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            _setns(fd)
            results.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            errors.append(exc)

    try:
        worker = threading.Thread(target=work, name=f"netns-{name}")
        worker.start()
        worker.join()
    finally:
        os.close(fd)
    if errors:
        raise errors[0]
    return results[0]
