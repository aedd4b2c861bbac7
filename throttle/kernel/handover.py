"""The hand-over of decided flows to the kernel's fast path, and everything kept about a flow while
the kernel carries it.

The engine reports a decision (`FlowDecided`, with how each direction is limited); `Handover`
decides whether the kernel can carry it out (TCP and UDP but DNS; not a shaper with less burst than
a packet; not a shaped flow without the shaper's qdiscs), and how: forwarded, policed by the
kernel's copy of the engine's token bucket or window meter (a slot of the `buckets` map), shaped
by an HTB class on the direction's egress interface, or losing packets at random (a loss rule: its
probability in the direction's entry, drawn by the kernel's own PRNG; no slot). Buckets shared between flows (scope client or rule)
share their slot or class (`BucketSlots`).

A flow's kernel side is one `KernelFlow` record: its two map keys (computed here, once), where
each direction leaves, the slots and classes it holds, and when it entered the map. Whatever needs
netlink (a next hop's MAC not yet known, an HTB class not yet made) runs on the fast path's netlink
worker; the hand-over completes when it is done, back on the event loop (`call_soon_threadsafe`),
and meanwhile the flow stays on the slow path, where the engine limits it. On completion the
record must still be the flow's (not ended, its 5-tuple not decided again), and the buckets'
credit is taken then. Map writes are bpf syscalls and happen on the loop.

The walker (`throttle.kernel.walker`) reads the map off the loop every `WALK_EVERY` seconds (the
counters, for an observer such as the exporter), renews the lease and expires idle directions
every `EXPIRE_EVERY`; an expired flow's slots and classes are free again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from functools import partial
from typing import Any, Optional, Protocol

from throttle.engine import (DOWNLOAD, UPLOAD, Direction, DirectionLimit, Event, Flow, FlowDecided, FlowEnded, Limits,
                             Policer, State, WindowMeter)
from throttle.errors import ThrottleError
from throttle.kernel.fastpath import FastPath
from throttle.kernel.htb import HTB_CLASSES, MIN_BURST, class_id
from throttle.kernel.maps import BUCKETS, Limit, Snapshot, map_key
from throttle.kernel.neighbours import Found, Hops, Wanted
from throttle.wire.ip import TCP, UDP

__all__ = ["EXPIRE_EVERY", "LEASE", "WALK_EVERY", "BucketSlots", "Handover", "KernelFlow"]

WALK_EVERY = 1.0  # seconds between reads of the fast path's counters (on its walker thread)
EXPIRE_EVERY = 10.0  # seconds between sweeps of the fast path's idle entries
# Seconds the kernel's decisions hold without the walker renewing them: after a SIGKILL the program
# and maps stay attached, and once the lease runs out every flow is back on the fail-open path.
LEASE = 10.0


class BucketSlots:
    """Which slot of a kernel table (the `buckets` map, or the shaper's class minors) holds which
    of the engine's buckets.

    A bucket shared by several flows (scope client or rule) gets one slot, counted once per flow
    direction that uses it; a slot is free again when the last of them leaves the kernel."""

    def __init__(self, size: int = BUCKETS) -> None:
        self._free = list(range(size - 1, 0, -1))  # slot 0 means "not limited"
        self._slot: dict[int, int] = {}  # id(engine bucket) -> slot
        self._users: dict[int, tuple[int, int, object]] = {}  # slot -> (id, users, the bucket itself)

    def acquire(self, bucket: object) -> tuple[int | None, bool]:
        """(slot, whether it is new and must be written), or (None, False) when all are taken."""
        slot = self._slot.get(id(bucket))
        if slot is not None:
            key, users, kept = self._users[slot]
            self._users[slot] = (key, users + 1, kept)
            return slot, False
        if not self._free:
            return None, False
        slot = self._free.pop()
        self._slot[id(bucket)] = slot
        self._users[slot] = (id(bucket), 1, bucket)  # kept alive, so its id stays unique
        return slot, True

    def release(self, slot: int) -> None:
        entry = self._users.get(slot)
        if entry is None:
            return
        key, users, kept = entry
        if users > 1:
            self._users[slot] = (key, users - 1, kept)
            return
        del self._users[slot], self._slot[key]
        self._free.append(slot)

    def __len__(self) -> int:
        """Slots in use."""
        return len(self._users)

    def __contains__(self, slot: object) -> bool:
        """Whether `slot` is in use."""
        return slot in self._users


class KernelObserver(Protocol):
    """Who is told what the kernel carries (`throttle.measure.exporter.Metrics` is one)."""

    def fast_flow_added(self, key: bytes, direction: str, rule: str = "none", name: str | None = None) -> None: ...
    def kernel_tick(self, fast: Snapshot) -> None: ...
    def kernel_fallbacks(self, totals: Mapping[str, int]) -> None: ...


class ShapingClass:
    """An HTB class the hand-over uses: the interface it is on, and whether it is known to be made
    (a hand-over that needs it waits for the netlink worker to make it, or to say it was)."""

    __slots__ = ("ifindex", "made")

    def __init__(self, ifindex: int) -> None:
        self.ifindex = ifindex
        self.made = False


class KernelFlow:
    """One decided flow's kernel side, from its decision until it leaves the kernel."""

    __slots__ = ("flow", "limits", "up", "down", "client_if", "server_if", "slots", "added", "replaces")

    def __init__(self, flow: Flow, limits: Limits, client_if: int, server_if: int) -> None:
        self.flow = flow
        self.limits = limits  # the engine's, per direction
        # The map keys of the upload (client -> server) and download directions: computed here only.
        self.up = map_key(flow.proto, flow.client, flow.client_port, flow.server, flow.server_port)
        self.down = map_key(flow.proto, flow.server, flow.server_port, flow.client, flow.client_port)
        self.client_if, self.server_if = client_if, server_if  # the ifindexes each end is behind
        self.slots: list[int | None] = [None, None]  # per direction: its bucket slot, or class minor if shaped
        self.added = 0.0  # time.monotonic() when it entered the map; 0 while the hand-over is pending
        self.replaces: KernelFlow | None = None  # an earlier flow of this 5-tuple, in the map until this one is

    @property
    def in_kernel(self) -> bool:
        return self.added > 0

    def egress(self, d: Direction) -> int:
        return self.server_if if d == UPLOAD else self.client_if


class Handover:
    """The kernel side of the censor's decided flows (see the module docstring). Used on the
    event loop `loop` only; `start` starts the walker, `close` before the fast path's."""

    def __init__(self, fast: FastPath, inside_if: str, outside_if: str, loop: asyncio.AbstractEventLoop, *,
                 shaping: bool = False, observer: KernelObserver | None = None) -> None:
        self.fast = fast
        self.shaping = shaping  # the interfaces have the shaper's qdiscs (`FastPath.enable_shaping`)
        self._inside, self._outside = fast.ifindex(inside_if), fast.ifindex(outside_if)  # attached: known
        self._loop = loop
        self._observer = observer
        self._slots = BucketSlots()  # policers: slots of the buckets map
        self._written: set[int] = set()  # slots whose bucket is in the map
        self._classes = BucketSlots(HTB_CLASSES)  # shapers: HTB class minors
        self._class: dict[int, ShapingClass] = {}  # by minor, while in use
        self._flows: dict[bytes, KernelFlow] = {}  # by the engine's keys of its 5-tuple, both orientations
        self._by_key: dict[bytes, KernelFlow] = {}  # in the map, by upload map key (what expiry names)
        self._asking: set[Wanted] = set()  # next hops the netlink worker is looking up
        self._walked = 0.0  # when the walker last read the counters (its expiry deletes after that)
        self._closed = False
        self.forwarded = 0  # passed flows handed to the kernel
        self.limited = 0  # limited flows whose limit the kernel enforces
        self.errors = 0  # fast-path calls that failed (the flow then stays on the slow path)
        self.note: str | None = None  # the last error's message

    # ---- events ----------------------------------------------------------------------------
    def on_event(self, ev: Event) -> None:
        if isinstance(ev, FlowDecided):
            self.decided(ev.flow, ev.limits)
        elif isinstance(ev, FlowEnded) and ev.reason != "idle":
            # Idle flows are not ended here: their packets skip us, so the engine's idea of idle
            # is wrong for them. The kernel expires its own idle entries.
            self.ended(ev.flow)

    def decided(self, flow: Flow, limits: Limits) -> None:
        """A decided flow's packets go to the kernel from now on (or once what the hand-over needs
        from netlink is there): forwarded (passed), through the kernel's copy of its buckets
        (policed), or into its HTB class (shaped)."""
        if self._closed or flow.proto not in (TCP, UDP) or flow.server_port == 53:
            return  # DNS answers teach the engine names: they keep coming to it
        rule = flow.rule if flow.state == State.LIMITED else None
        if flow.state == State.LIMITED and (rule is None or rule.action == "shape" and not self.shaping):
            return  # the engine keeps limiting it
        # The client (opener) sits behind the inside interface, unless it opened from outside.
        client_if, server_if = (self._inside, self._outside) if flow.eligible else (self._outside, self._inside)
        record = KernelFlow(flow, limits, client_if, server_if)
        if not (self._reserve(record, UPLOAD) and self._reserve(record, DOWNLOAD)):
            self._release(record)
            return  # no room in the kernel's tables, or a limit it lacks: the engine keeps limiting it
        old = self._flows.get(flow.key)
        if old is not None:  # its 5-tuple's earlier flow, ended unseen (its packets skipped us)
            if old.in_kernel:
                record.replaces = old
            else:
                record.replaces = old.replaces
                self._release(old)
        self._flows[flow.key] = self._flows[flow.rkey] = record
        self._prepare(record)

    def ended(self, flow: Flow) -> None:
        """Both directions of an ended flow's 5-tuple back to the normal path, its slots free."""
        record = self._flows.get(flow.key)
        if record is None:
            return
        self._unindex(record)
        if record.in_kernel or record.replaces is not None:
            try:
                self.fast.delete(record.up)
                self.fast.delete(record.down)
            except ThrottleError as exc:  # the mark path still bypasses the flow
                self._error(str(exc))
        self._release(record)

    # ---- the kernel's tables -----------------------------------------------------------------
    def _reserve(self, record: KernelFlow, d: Direction) -> bool:
        """Direction `d`'s slot (policed) or class (shaped); False when the kernel cannot limit it."""
        limit = record.limits[d]
        if limit is None or limit.meter == "loss":
            return True  # random loss needs no slot: its probability goes in the direction's own entry
        if limit.meter == "shape":
            if limit.burst < MIN_BURST:
                # HTB's classes are given at least a full packet of burst, so a smaller one (§2.17's
                # crawl: 450 bytes, the first kilobyte at 5.6 s) would let the first packet through
                # at once. The engine's shaper holds it as modelled; such flows are slow by definition.
                return False
            minor, new = self._classes.acquire(limit.bucket)
            if minor is not None and new:
                self._class[minor] = ShapingClass(record.egress(d))
        else:
            minor, new = self._slots.acquire(limit.bucket)
        record.slots[d] = minor
        return minor is not None

    def _release(self, record: KernelFlow) -> None:
        """The record's slots and classes back (a class whose last user leaves is deleted), and
        those of the earlier flow it replaced."""
        for d, slot in enumerate(record.slots):
            limit = record.limits[d]
            if slot is None or limit is None:
                continue
            record.slots[d] = None
            if limit.meter != "shape":
                self._slots.release(slot)
                if slot not in self._slots:
                    self._written.discard(slot)
                continue
            self._classes.release(slot)
            if slot not in self._classes:
                gone = self._class.pop(slot)
                self._submit(partial(self.fast.qdiscs.remove, index=gone.ifindex, minor=slot), None)
        if record.replaces is not None:
            old, record.replaces = record.replaces, None
            self._unindex(old)
            self._release(old)

    def _unindex(self, record: KernelFlow) -> None:
        flow = record.flow
        for table, key in ((self._flows, flow.key), (self._flows, flow.rkey), (self._by_key, record.up)):
            if table.get(key) is record:
                del table[key]

    # ---- completing a hand-over ----------------------------------------------------------------
    def _prepare(self, record: KernelFlow) -> None:
        """Complete the hand-over now, or once the netlink worker has what it needs."""
        flow = record.flow
        wanted = self.fast.hops.missing(record.client_if, flow.client, record.server_if, flow.server)
        # A next hop asked for already is not asked again: requests run in order, so this one's
        # answer comes back after that one's (a burst of new flows to one server: one lookup).
        ask = [w for w in wanted if w not in self._asking]
        self._asking.update(ask)
        classes = []  # (minor, class, limit) of the classes not known to be made
        for d in (UPLOAD, DOWNLOAD):
            limit, minor = record.limits[d], record.slots[d]
            if limit is not None and minor is not None and limit.meter == "shape" and not self._class[minor].made:
                classes.append((minor, self._class[minor], limit))
        if not wanted and not classes:
            self._complete(record)
            return
        qdiscs = self.fast.qdiscs

        def work(ipr: Any) -> Found:  # on the netlink worker, after the requests queued before it
            for minor, shaping, limit in classes:
                qdiscs.ensure(ipr, shaping.ifindex, minor, limit.rate, int(limit.burst), int(limit.queue_bytes))
            return Hops.lookup(ipr, ask)

        self._submit(work, lambda found: self._prepared(record, ask, classes, found))

    def _prepared(self, record: KernelFlow, asked: list[Wanted],
                  classes: list[tuple[int, ShapingClass, DirectionLimit]], found: Optional[Found]) -> None:
        """Back on the loop from the netlink worker (`found` None: it failed, and said why)."""
        self._asking.difference_update(asked)
        if found is not None:
            self.fast.hops.remember(found)
            for _, shaping, _ in classes:
                shaping.made = True  # (if its minor was released meanwhile, this one is nobody's)
        if self._flows.get(record.flow.key) is not record:
            return  # ended, or its 5-tuple decided again, meanwhile: released then
        if found is None or record.flow.end_reason is not None:
            self._abandon(record)
            return
        self._complete(record)

    def _complete(self, record: KernelFlow) -> None:
        flow = record.flow
        hops = self.fast.hops.flow(record.client_if, flow.client, record.server_if, flow.server)
        if hops is None:
            self._abandon(record)  # a next hop the kernel has not resolved: the engine keeps the flow
            return
        try:
            upload, download = self._kernel_limit(record, UPLOAD), self._kernel_limit(record, DOWNLOAD)
            ok = self.fast.put_flow(record.up, record.down, hops, upload, download)
        except ThrottleError as exc:  # the mark path still bypasses the flow
            self._error(str(exc))
            ok = False
        if not ok:
            self._abandon(record)
            return
        record.added = time.monotonic()
        old, record.replaces = record.replaces, None
        if old is not None:  # its map entries were this 5-tuple's: overwritten now
            self._unindex(old)
            self._release(old)
        self._by_key[record.up] = record
        rule = flow.rule if flow.state == State.LIMITED else None
        if rule is None:
            self.forwarded += 1
        else:
            self.limited += 1
        if self._observer is not None:
            rule_name = rule.name if rule is not None else "none"
            self._observer.fast_flow_added(record.up, "upload", rule_name, flow.name)
            self._observer.fast_flow_added(record.down, "download", rule_name, flow.name)

    def _kernel_limit(self, record: KernelFlow, d: Direction) -> Limit | None:
        """Direction `d`'s limit in the kernel. A policer's bucket is written with the engine's
        bucket's state as it is now (a token bucket's credit; a window meter's interval and the
        bytes used in it, or none yet: then the kernel begins it at the direction's first limited
        packet, as the engine would have), when the first flow that uses its slot enters the map."""
        limit, slot = record.limits[d], record.slots[d]
        if limit is not None and limit.meter == "loss":
            return Limit(0, limit.after_bytes, limit.carried, loss=limit.probability)
        if limit is None or slot is None:
            return None
        if limit.meter == "shape":
            return Limit(0, limit.after_bytes, limit.carried, class_id(slot))
        bucket = limit.bucket
        if slot not in self._written:
            if isinstance(bucket, WindowMeter):
                self.fast.set_window(slot, bucket.rate, bucket.burst, bucket.start, bucket.used)
            else:
                assert isinstance(bucket, Policer)  # "police": shaped and loss directions returned above
                self.fast.set_bucket(slot, bucket.rate, int(bucket.burst), bucket.tokens, bucket.stamp)
            self._written.add(slot)
        return Limit(slot, limit.after_bytes, limit.carried)

    def _abandon(self, record: KernelFlow) -> None:
        """The hand-over failed (the map full, a next hop unknown, an error): the flow stays on
        the slow path; an earlier flow of its 5-tuple still in the map stays tracked."""
        self._unindex(record)
        old, record.replaces = record.replaces, None
        self._release(record)
        if old is not None and self._by_key.get(old.up) is old:  # not expired meanwhile
            self._flows[old.flow.key] = self._flows[old.flow.rkey] = old

    # ---- the netlink worker and the walker ---------------------------------------------------
    def _submit(self, work: Callable[[Any], Any], done: Callable[[Any], None] | None) -> None:
        """`work` on the netlink worker; `done(result)` back on the loop (`done(None)` and an
        error counted if it failed)."""
        try:
            future = self.fast.submit(work)
        except ThrottleError as exc:
            self._error(str(exc))
            if done is not None:
                done(None)
            return

        def finished(f: Future[Any]) -> None:  # on the worker's thread
            self._soon(self._finished, f, done)

        future.add_done_callback(finished)

    def _finished(self, future: Future[Any], done: Callable[[Any], None] | None) -> None:
        if self._closed:
            return
        try:
            result = future.result()
        except ThrottleError as exc:
            self._error(str(exc))
            result = None
        if done is not None:
            done(result)

    def _soon(self, fn: Callable[..., None], *args: Any) -> None:
        """`fn(*args)` on the loop, from another thread."""
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: the censor, and its fast path, are gone

    def _error(self, message: str) -> None:
        self.errors += 1
        self.note = message

    def start(self, idle: float) -> None:
        """The walker: the map's counters to the observer (on the walker's thread: at 65,536
        directions a walk takes longer than packets may wait), the lease, idle expiry."""
        observer = self._observer

        def on_walk(counters: Snapshot) -> None:
            self._walked = time.monotonic()
            if observer is not None:
                observer.kernel_tick(counters)
                observer.kernel_fallbacks(self.fast.fallbacks())

        def on_expired(keys: list[bytes]) -> None:
            self._soon(self._expired, keys, self._walked)

        def on_error(message: str) -> None:
            self._soon(self._error, message)

        self.fast.walker(every=WALK_EVERY, idle=idle, expire_every=EXPIRE_EVERY, on_walk=on_walk,
                         on_expired=on_expired, on_error=on_error, lease=LEASE)

    def _expired(self, keys: list[bytes], since: float) -> None:
        """Directions the walker removed as idle (after `since`): their flows' slots and classes
        are free, unless the 5-tuple was handed to the kernel again since (a new flow's)."""
        for key in keys:
            record = self._by_key.get(key)
            if record is not None and record.added < since:
                self._unindex(record)
                self._release(record)

    def close(self) -> None:
        """No more hand-overs; what the worker completes later is dropped. (The fast path's
        `close()` stops the walker and removes everything from the kernel.)"""
        self._closed = True
