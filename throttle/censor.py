"""The censor process: the engine behind the NFQUEUE hook, with its firewall rules, the eBPF fast
path, the Prometheus exporter and signals, composed in one asyncio event loop.

    packets -> kernel.firewall rules -> kernel.nfqueue.Hook -> engine.Engine -> verdicts
                                               |  events
                                               v
                            kernel.fastpath (decided flows)   measure.exporter (metrics)

The queue is bound fail-open (`--queue-bypass`): if this process dies, traffic flows unlimited
instead of stopping. Where the kernel allows it, decided flows also go into the eBPF fast path:
their later packets are redirected at tc ingress, before netfilter and conntrack, so a flow the
censor does not limit costs it nothing at all. The conntrack mark stays as the fallback.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from throttle.engine import (DOWNLOAD, UPLOAD, Bucket, Engine, Event, Flow, FlowDecided, FlowEnded, ResetRequested,
                             Shaper, State, WindowMeter)
from throttle.errors import ThrottleError
from throttle.kernel import fastpath, netns
from throttle.kernel.firewall import Firewall, installed
from throttle.kernel.inject import Injector
from throttle.kernel.fastpath import HTB_CLASSES, BucketSlots
from throttle.kernel.nfqueue import Hook, HookStats, check_requirements, queue_losses
from throttle.scenario import Rule, Scenario
from throttle.wire.ip import TCP, UDP

if TYPE_CHECKING:
    from throttle.measure.exporter import Metrics

T = TypeVar("T")
# 18130 lies outside 9100-9999, the range of the Prometheus exporters' port list (all taken; 9464
# is OpenTelemetry's exporter), and below Linux's ephemeral ports.
DEFAULT_METRICS = "127.0.0.1:18130"
EXPIRE_EVERY = 10.0  # seconds between sweeps of the fast path's idle entries
WALK_EVERY = 1.0  # seconds between reads of the fast path's counters (on its walker thread)
# Seconds the kernel's decisions hold without the walker renewing them: after a SIGKILL the program
# and maps stay attached, and once the lease runs out every flow is back on the fail-open path.
LEASE = 10.0


class Censor:
    """One scenario's censor in the current namespace, until `stop()` or SIGINT/SIGTERM."""

    def __init__(self, scenario: Scenario, *, queue: int = 0, inside_if: str | None = None,
                 outside_if: str | None = None, inside_ifindex: int | None = None, bypass: bool = True,
                 metrics: Metrics | None = None, fw: Firewall | None = None) -> None:
        self.scenario = scenario
        self.queue = queue
        self.inside_if = inside_if
        self.outside_if = outside_if
        self.bypass = bypass
        self.metrics = metrics
        self.fw = fw or Firewall(queue=queue)
        self.engine = Engine(scenario.model, scenario.rules)
        # RSTs to inject (action "rst"): the injector learns from every packet where each end is.
        self.injector = Injector() if any(rule.action == "rst" for rule in scenario.rules) else None
        self.hook = Hook(self.engine, bypass=bypass, inside_ifindex=inside_ifindex, on_events=self._on_events,
                         on_error=metrics.hook_error if metrics is not None else None,
                         learn=self.injector.learn if self.injector is not None else None)
        self.fastpath: fastpath.FastPath | None = None
        self.fastpath_note: str | None = None  # why there is none
        self.fast_flows = 0  # passed flows handed to the kernel
        self.kernel_limited = 0  # limited flows whose limit the kernel enforces
        self._slots = BucketSlots()
        self._classes = BucketSlots(HTB_CLASSES)  # the shaper's HTB classes, per bucket
        self._class_if: dict[int, str] = {}  # class minor -> the interface it is on
        self._kernel: dict[bytes, list[tuple[BucketSlots, int]]] = {}  # upload map key -> slots it holds
        self._kernel_since: dict[bytes, float] = {}  # upload map key -> when it was (last) added
        self._stop: asyncio.Event | None = None
        self._shaping = False  # the interfaces have the shaper's HTB qdiscs
        self.walker: fastpath.Walker | None = None  # reads the kernel's map off the packet loop

    @property
    def stats(self) -> HookStats:
        return self.hook.stats

    # ---- events --------------------------------------------------------------------------
    def _on_events(self, events: list[Event]) -> None:
        fast = self.fastpath
        for ev in events:
            if isinstance(ev, ResetRequested) and self.injector is not None:
                f = ev.flow
                try:
                    self.injector.reset(f.client, f.client_port, f.server, f.server_port, ev.to_server, ev.to_client)
                except Exception:  # noqa: BLE001 - a bug here must not stop the packet loop
                    self.injector.failed += 2
                    self.hook.stats.errors += 1
            if fast is not None:
                if isinstance(ev, FlowDecided) and self.bypass:
                    self._to_kernel(fast, ev.flow)
                elif isinstance(ev, FlowEnded) and ev.reason != "idle":
                    # Idle flows are not ended here: their packets skip us, so the engine's idea
                    # of idle is wrong for them. The kernel expires its own idle entries.
                    f = ev.flow
                    self._fastpath_call(fast.remove_flow, f.proto, f.client, f.client_port, f.server, f.server_port)
                    self._release(fastpath.flow_key(f.proto, f.client, f.client_port, f.server, f.server_port))
            if self.metrics is not None:
                self.metrics.on_event(ev)

    def _to_kernel(self, fast: fastpath.FastPath, flow: Flow) -> None:
        """A decided flow's packets from now on go to the kernel: forwarded (passed), through the
        kernel's copy of its buckets (policed), or into its HTB class (shaped)."""
        if flow.proto not in (TCP, UDP) or flow.server_port == 53:
            return
        rule = flow.rule if flow.state == State.LIMITED else None
        if flow.state == State.LIMITED and (rule is None or rule.action == "shape" and not self._shaping):
            return  # the engine keeps limiting it
        # The client (opener) sits behind the inside interface, unless it opened from outside.
        client_if, server_if = self.inside_if, self.outside_if
        if not flow.eligible:
            client_if, server_if = server_if, client_if
        assert client_if is not None and server_if is not None
        limits: list[fastpath.Limit | None] = [None, None]
        slots: list[tuple[BucketSlots, int]] = []
        if rule is not None:
            now = self.hook.loop.time()
            for d in (UPLOAD, DOWNLOAD):
                bucket = self.engine.bucket(flow, d, now)
                if bucket is None:
                    continue
                egress = server_if if d == UPLOAD else client_if
                limit = self._kernel_limit(fast, rule, bucket, egress, flow.sides[d].payload, slots)
                if limit is None:
                    self._release_slots(slots)
                    return  # no room in the kernel's tables: the engine keeps limiting it
                limits[d] = limit
        if not self._fastpath_call(fast.add_flow, flow.proto, flow.client, flow.client_port, flow.server,
                                   flow.server_port, client_if, server_if, limits[0], limits[1]):
            self._release_slots(slots)
            return
        up = fastpath.flow_key(flow.proto, flow.client, flow.client_port, flow.server, flow.server_port)
        down = fastpath.flow_key(flow.proto, flow.server, flow.server_port, flow.client, flow.client_port)
        self._release(up)  # a reused 5-tuple: the old flow's slots
        self._kernel[up] = slots
        self._kernel_since[up] = time.monotonic()
        if rule is None:
            self.fast_flows += 1
        else:
            self.kernel_limited += 1
        if self.metrics is not None:
            rule_name = rule.name if rule is not None else "none"
            self.metrics.fast_flow_added(up, "upload", rule_name, flow.name)
            self.metrics.fast_flow_added(down, "download", rule_name, flow.name)

    def _kernel_limit(self, fast: fastpath.FastPath, rule: Rule, bucket: Bucket, egress: str, carried: int,
                      slots: list[tuple[BucketSlots, int]]) -> fastpath.Limit | None:
        """The kernel's limit for one direction: a bucket slot (policed) or an HTB class on the
        egress interface (shaped), made from the engine's bucket the first time it is used."""
        if isinstance(bucket, WindowMeter):
            return None  # the kernel has token buckets only: the engine keeps metering this flow (§1.11)
        if isinstance(bucket, Shaper) and bucket.burst < fastpath.MIN_BURST:
            # HTB's classes are given at least a full packet of burst, so a smaller one (§2.17's
            # crawl: 450 bytes, the first kilobyte at 5.6 s) would let the first packet through at
            # once. The engine's shaper holds it as modelled; such flows are slow by definition.
            return None
        table = self._classes if isinstance(bucket, Shaper) else self._slots
        slot, new = table.acquire(bucket)
        if slot is None:
            return None
        slots.append((table, slot))
        if isinstance(bucket, Shaper):
            if new:
                classid = self._fastpath_call(fast.add_class, egress, slot, bucket.rate, int(bucket.burst),
                                              int(bucket.max_backlog))
                if classid is None:
                    return None
                self._class_if[slot] = egress
            return fastpath.Limit(0, rule.after_bytes, carried, (fastpath.HTB_MAJOR << 16) | slot)
        if new and not self._fastpath_call(fast.set_bucket, slot, bucket.rate, int(bucket.burst), bucket.tokens,
                                           bucket.stamp):
            return None
        return fastpath.Limit(slot, rule.after_bytes, carried)

    def _release(self, up_key: bytes) -> None:
        self._kernel_since.pop(up_key, None)
        self._release_slots(self._kernel.pop(up_key, []))

    def _release_slots(self, slots: list[tuple[BucketSlots, int]]) -> None:
        for table, slot in slots:
            table.release(slot)
            if table is self._classes and slot not in table and slot in self._class_if and self.fastpath:
                self._fastpath_call(self.fastpath.remove_class, self._class_if.pop(slot), slot)

    def _fastpath_call(self, fn: Callable[..., T], *args: object) -> T | None:
        try:
            return fn(*args)
        except ThrottleError as exc:  # the mark path still bypasses the flow
            self.hook.stats.errors += 1
            self.fastpath_note = str(exc)
            return None

    def _attach_fastpath(self) -> None:
        if not self.bypass or not (self.inside_if and self.outside_if):
            self.fastpath_note = "no fast path: it needs both --inside-if and --outside-if"
            return
        reason = fastpath.available()
        if reason is not None:
            self.fastpath_note = f"no fast path ({reason}); decided flows bypass through conntrack marks"
            return
        try:
            self.fastpath = fastpath.FastPath([self.inside_if, self.outside_if])
        except ThrottleError as exc:
            self.fastpath_note = f"no fast path ({exc}); decided flows bypass through conntrack marks"
            return
        if any(rule.action == "shape" for rule in self.scenario.rules):
            try:
                self.fastpath.enable_shaping([self.inside_if, self.outside_if])
                self._shaping = True
            except ThrottleError as exc:
                self.fastpath_note = f"no shaping in the kernel ({exc}); shaped flows stay in the engine"

    # ---- running -------------------------------------------------------------------------
    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def run(self, ready: Callable[[], None] | None = None,
                  tick: Callable[[HookStats], None] | None = None, tick_every: float = 1.0) -> None:
        check_requirements()
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        self._attach_fastpath()
        try:
            if self.fastpath is not None:
                self.walker = self._start_walker(loop, self.fastpath)
            with installed(self.fw), self.hook.bound(self.queue):
                if ready is not None:
                    ready()
                while not self._stop.is_set():
                    try:
                        await asyncio.wait_for(self._stop.wait(), timeout=tick_every)
                    except asyncio.TimeoutError:
                        pass
                    self._tick(loop.time(), tick)
        finally:
            if self.fastpath is not None:
                self.fastpath.close()  # stops and joins the walker first
                self.fastpath = None
            if self.injector is not None:
                self.injector.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _start_walker(self, loop: asyncio.AbstractEventLoop, fast: fastpath.FastPath) -> fastpath.Walker:
        """The walks of the kernel's map (its counters for the exporter, idle expiry) on a thread
        of the fast path's, never on this loop: at 65,536 directions a walk takes longer than
        packets may wait. What the loop must do with the results comes back through the loop."""
        metrics = self.metrics
        walked = [0.0]  # when the last walk's counters were read: its expiry deletes after that

        def on_walk(counters: fastpath.Snapshot) -> None:
            walked[0] = time.monotonic()
            if metrics is not None:
                metrics.kernel_tick(counters)

        def on_expired(keys: list[bytes]) -> None:
            loop.call_soon_threadsafe(self._expired, keys, walked[0])

        def on_error(message: str) -> None:
            loop.call_soon_threadsafe(self._walk_error, message)

        return fast.walker(every=WALK_EVERY, idle=self.scenario.model.idle_timeout, expire_every=EXPIRE_EVERY,
                           on_walk=on_walk, on_expired=on_expired, on_error=on_error, lease=LEASE)

    def _expired(self, keys: list[bytes], since: float) -> None:
        """Directions the walker removed as idle (after `since`): their kernel slots and classes
        are free, unless the 5-tuple was handed to the kernel again since (a new flow's)."""
        for key in keys:
            if self._kernel_since.get(key, since) < since:
                self._release(key)

    def _walk_error(self, message: str) -> None:
        self.hook.stats.errors += 1
        self.fastpath_note = message

    def _tick(self, now: float, tick: Callable[[HookStats], None] | None) -> None:
        """Once a second on the loop: cheap things only (the flow table's gauges, queue losses)."""
        if tick is not None:
            tick(self.stats)
        lost = queue_losses(self.queue)
        if lost is not None:
            self.stats.lost = lost
            if self.metrics is not None:
                self.metrics.lost_before_inspection(lost)
        if self.metrics is not None:
            self.metrics.tick(self.engine, self.hook.holding, None, now)

    def describe(self) -> str:
        s = self.stats
        return (f"{s.queued} pkts queued: {s.accepted} passed, {s.dropped} dropped, "
                f"{s.held} delayed ({s.holding} held now), {s.bypassed} packets marked to hand their flow to the "
                f"kernel, {self.fast_flows} flows on the fast path, {self.kernel_limited} limited by the kernel; "
                f"flows limited {s.flows_limited}, passed {s.flows_passed}; "
                f"{s.lost} packets lost before inspection"
                + (f"; {s.errors} engine errors" if s.errors else "")
                + (f"; {self.injector.sent} RSTs injected ({self.injector.failed} not sent)"
                   if self.injector is not None else ""))


def ifindex(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def bridge_port(name: str) -> bool:
    """Whether interface `name` of this namespace is a port of a bridge."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        return bool(found) and fastpath.bridge_port(ipr, found[0])


def start_metrics(listen: str | None) -> tuple[Metrics | None, str | None]:
    """The exporter's HTTP server, bound now, in this (the host's) namespace: it stays reachable
    from the host after the process enters the lab's namespace. `listen` None means the default,
    where a busy port is only a warning; "off" means none. Returns (metrics, a line to print)."""
    if listen == "off":
        return None, None
    from prometheus_client import start_http_server

    from throttle.measure.exporter import Metrics

    explicit = listen is not None
    addr, _, port = (listen or DEFAULT_METRICS).rpartition(":")
    addr = addr.strip("[]") or "127.0.0.1"
    if not port.isdigit():
        raise ThrottleError(f"--metrics-listen {listen}: write ADDR:PORT, e.g. {DEFAULT_METRICS}, or off")
    metrics = Metrics()
    try:
        start_http_server(int(port), addr=addr, registry=metrics.registry)
    except OSError as exc:
        message = f"cannot serve metrics on {addr}:{port} ({exc.strerror}); choose another with --metrics-listen ADDR:PORT"
        if explicit:
            raise ThrottleError(message) from None
        return None, message
    shown = f"[{addr}]" if ":" in addr else addr
    return metrics, f"metrics at http://{shown}:{port}/metrics"


def run_censor(scenario: Scenario, *, netns_name: str | None, queue: int, inside_if: str | None,
               outside_if: str | None = None, quiet: bool = False, bypass: bool = True,
               metrics_listen: str | None = None) -> int:
    """The `throttle censor` command: enter the namespace, hook, run until SIGINT/SIGTERM."""
    check_requirements()
    metrics, metrics_note = start_metrics(metrics_listen)
    if netns_name:
        netns.enter(netns_name)
    where_ns = f"namespace {netns_name}" if netns_name else "this namespace"
    index = ifindex(inside_if) if inside_if else None
    if inside_if and index is None:
        raise ThrottleError(f"no interface {inside_if} in {where_ns}")
    if outside_if and ifindex(outside_if) is None:
        raise ThrottleError(f"no interface {outside_if} in {where_ns}")
    # With both interfaces known, rules see only what crosses between them (gateway mode); ports
    # of a bridge (the lab's in-path censor, or a bridging box) are matched as ports.
    if inside_if and outside_if:
        bridged = bridge_port(inside_if) and bridge_port(outside_if)
        fw = (Firewall.bridge if bridged else Firewall.gateway)(inside_if, outside_if, queue)
    else:
        fw = Firewall(queue=queue)
    censor = Censor(scenario, queue=queue, inside_if=inside_if, outside_if=outside_if, inside_ifindex=index,
                    bypass=bypass, metrics=metrics, fw=fw)
    where = where_ns if netns_name else f"this namespace, between {inside_if} (inside) and {outside_if}"

    def say(text: str) -> None:
        print(f"throttle censor: {text}", file=sys.stderr, flush=True)

    def ready() -> None:
        say(f"{scenario.name} active in {where} (queue {queue}, fail-open); Ctrl-C stops it")
        if not quiet:
            say("eBPF fast path on" if censor.fastpath is not None else censor.fastpath_note or "no fast path")
            if metrics_note:
                say(metrics_note)

    last = [0.0]

    def tick(stats: HookStats) -> None:
        now = time.monotonic()
        if not quiet and now - last[0] >= 5.0 and stats.queued:
            last[0] = now
            say(censor.describe())

    asyncio.run(censor.run(ready=ready, tick=tick))
    say(f"stopped; rules removed. {censor.describe()}")
    return 0
