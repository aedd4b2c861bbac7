"""Entering a named network namespace (`ip netns` style, under /run/netns) for this process."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from throttle.errors import ThrottleError

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000


def enter(name: str) -> None:
    """Move this process (all its later sockets and child processes) into namespace `name`.

    Never creates one: a missing namespace is an error naming the fix.
    """
    path = NETNS_DIR / name
    if not path.exists():
        raise ThrottleError(f"network namespace {name} does not exist: run `throttle lab up` first, or name one with --netns")
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise ThrottleError(f"cannot enter network namespace {name}: {os.strerror(err)} (are you root?)")
    finally:
        os.close(fd)
