"""The fast path's netlink worker: one pyroute2 IPRoute, used only from one thread of its own.

pyroute2's synchronous API cannot run inside a running asyncio loop (the censor's hook is one),
and a netlink request (a neighbour dump, an HTB class) takes milliseconds the packet loop cannot
wait. So every request is a function of the IPRoute run on this worker: `submit` queues it and
returns a future at once (the censor's hand-over completes later, through its event loop); `call`
waits for it, for start-up, shutdown and tools, never for the packet loop. Requests run one at a
time, in the order they were submitted: a request may rely on what an earlier one did.

The thread is started by the constructor, so it is in the constructing thread's network namespace.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from throttle.errors import ThrottleError

__all__ = ["Netlink"]

T = TypeVar("T")


class Netlink:
    """The worker; `close()` ends it after the requests already queued."""

    def __init__(self) -> None:
        try:
            import pyroute2  # noqa: F401
        except ImportError:
            raise ThrottleError("the Python package pyroute2 is missing: .venv/bin/pip install pyroute2") from None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastpath-rtnl")
        self._ipr: Any = None
        try:
            self._ipr = self._pool.submit(self._open).result()
        except Exception as exc:
            self._pool.shutdown()
            raise ThrottleError(f"cannot open a netlink socket for the fast path: {exc}") from None

    @staticmethod
    def _open() -> Any:
        from pyroute2 import IPRoute

        return IPRoute()

    @staticmethod
    def _run(fn: Callable[[Any], T], ipr: Any) -> T:
        try:
            return fn(ipr)
        except ThrottleError:
            raise
        except Exception as exc:
            raise ThrottleError(f"netlink request for the fast path failed: {exc}") from None

    def submit(self, fn: Callable[[Any], T]) -> Future[T]:
        """Queue fn(ipr) on the worker; its result or its error (always a ThrottleError) arrives
        in the future. Callbacks added to the future run on the worker's thread."""
        if self._ipr is None:
            raise ThrottleError("the fast path's netlink worker is closed")
        return self._pool.submit(self._run, fn, self._ipr)

    def call(self, fn: Callable[[Any], T]) -> T:
        """Run fn(ipr) on the worker and wait for it (not on the packet loop: see the docstring)."""
        return self.submit(fn).result()

    def close(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            try:
                self._pool.submit(ipr.close).result()  # after the requests queued before it
            except Exception:
                pass  # closing a socket: nothing left to undo
        self._pool.shutdown()
