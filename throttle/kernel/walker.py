"""The periodic walk of the fast path's whole flows map, on a thread of its own, never on the
thread that reads packets: at 65,536 directions a walk takes longer than packets may wait.

Every `every` seconds it renews the map's lease (if it has one), reads every direction's counters
(`on_walk(counters)`, called on this thread) and every `expire_every` seconds removes the
directions idle for `idle` seconds (`on_expired(keys)`, also on this thread: hand them to the
packet loop with `loop.call_soon_threadsafe`). Errors go to `on_error(message)` and the walks go
on. Reading 65,536 directions costs tens of milliseconds of Python and a few syscalls; the thread
gives the interpreter back to the packet loop every switch interval (5 ms) meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from throttle.errors import ThrottleError
from throttle.kernel.maps import Snapshot

__all__ = ["Walker"]


class Walked(Protocol):
    """What the walker asks of the map's owner (`throttle.kernel.fastpath.FastPath`)."""

    def renew(self, seconds: float) -> None: ...
    def counters(self) -> Snapshot: ...
    def expire_stale(self, counters: Snapshot, idle: float) -> list[bytes]: ...


class Walker:
    """See the module docstring. Made (and started) by `FastPath.walker`; `stop()` (or the
    FastPath's `close()`) ends and joins the thread."""

    def __init__(self, walked: Walked, *, every: float, idle: float, expire_every: float,
                 on_walk: Callable[[Snapshot], None], on_expired: Callable[[list[bytes]], None],
                 on_error: Callable[[str], None], lease: float = 0.0) -> None:
        self._walked = walked
        self.lease = lease
        self.every, self.idle, self.expire_every = every, idle, expire_every
        self._on_walk, self._on_expired, self._on_error = on_walk, on_expired, on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastpath-walker", daemon=True)
        self.walks = 0
        self.last_walk_seconds = 0.0  # the last walk's duration (read, callbacks, expiry)
        self.longest_walk_seconds = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the thread and wait for it (a walk in progress finishes first). Idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        last_expire = time.monotonic()
        while not self._stop.wait(self.every):
            start = time.monotonic()
            try:
                if self.lease:
                    self._walked.renew(self.lease)
                counters = self._walked.counters()
                self._on_walk(counters)
                if start - last_expire >= self.expire_every:
                    last_expire = start
                    expired = self._walked.expire_stale(counters, self.idle)
                    if expired:
                        self._on_expired(expired)
            except ThrottleError as exc:
                if self._stop.is_set():
                    return  # closed under us: nothing more to read
                self._on_error(str(exc))
            except Exception as exc:  # noqa: BLE001 - a bug in a callback must not end the walks
                self._on_error(f"fast-path walk: {type(exc).__name__}: {exc}")
            took = time.monotonic() - start
            self.walks += 1
            self.last_walk_seconds = took
            self.longest_walk_seconds = max(self.longest_walk_seconds, took)
