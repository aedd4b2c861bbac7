"""What runs in the lab's namespaces, read from /proc: a namespace's identity, the processes in
each, a process's command line, and whether a pid from a pid file is a live process of a given
namespace. Read only: stopping processes is `throttle.children.stop`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from throttle.children import alive
from throttle.kernel.netns import NETNS_DIR


def ns_id(path: Path | str) -> Optional[tuple[int, int]]:
    """A network namespace's identity (device, inode) from a bind mount or /proc/PID/ns/net."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def cmdline(pid: int) -> list[str]:
    """A process's arguments; [] when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def pids_in(namespaces: Mapping[str, str]) -> dict[str, list[int]]:
    """Every process in each named namespace: {key: pids} for `namespaces` {key: namespace name};
    a namespace that does not exist has none."""
    ids = {}
    for key, name in namespaces.items():
        ns = ns_id(NETNS_DIR / name)
        if ns is not None:
            ids[ns] = key
    found: dict[str, list[int]] = {key: [] for key in namespaces}
    if not ids:
        return found
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            pid_ns = ns_id(f"/proc/{entry}/ns/net")
            owner = ids.get(pid_ns) if pid_ns is not None else None
            if owner is not None:
                found[owner].append(int(entry))
    return found


def running_in(pid: Optional[int], namespace: str) -> Optional[int]:
    """`pid` if it is a live process inside `namespace` (a pid file may name a process that died,
    or a pid since reused elsewhere), else None."""
    if pid is None or not alive(pid):
        return None
    ns = ns_id(NETNS_DIR / namespace)
    if ns is None or ns_id(f"/proc/{pid}/ns/net") != ns:
        return None
    return pid
