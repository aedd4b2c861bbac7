"""The censor process: the engine behind the NFQUEUE hook, with its firewall rules, the eBPF fast
path, the Prometheus exporter and signals, composed in one asyncio event loop.

    packets -> kernel.firewall rules -> kernel.nfqueue.Hook -> engine.Engine -> verdicts
                                               |  events
                                               v
             kernel.handover (decided flows -> kernel.fastpath)   kernel.inject (RSTs)   measure.exporter

The queue is bound fail-open (`--queue-bypass`): if this process dies, traffic flows unlimited
instead of stopping. Where the kernel allows it, decided flows also go into the eBPF fast path:
their later packets are redirected at tc ingress, before netfilter and conntrack, so a flow the
censor does not limit costs it nothing at all. The conntrack mark stays as the fallback.

`Censor` only composes: each part counts what it did (its errors included), and `describe` reads
them.
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from throttle.engine import Engine, Event, ResetRequested
from throttle.errors import ThrottleError
from throttle.kernel import netns
from throttle.kernel.fastpath import FastPath
from throttle.kernel.firewall import Firewall, connmark_counters, installed
from throttle.kernel.handover import Handover
from throttle.kernel.inject import Injector
from throttle.kernel.neighbours import bridge_port as is_bridge_port
from throttle.kernel.nfqueue import Hook, HookStats, check_requirements, queue_losses
from throttle.scenario import Scenario

if TYPE_CHECKING:
    from throttle.measure.exporter import Metrics

# 18130 lies outside 9100-9999, the range of the Prometheus exporters' port list (all taken; 9464
# is OpenTelemetry's exporter), and below Linux's ephemeral ports.
DEFAULT_METRICS = "127.0.0.1:18130"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
        # a live censor's random losses (action "loss") differ run to run, as the kernel's do
        self.engine = Engine(scenario.model, scenario.rules, rng=random.Random())
        # RSTs to inject (action "rst"): the injector learns from every packet where each end is.
        self.injector = Injector() if any(rule.action == "rst" for rule in scenario.rules) else None
        self.hook = Hook(self.engine, decided_mark=self.fw.mark, bypass=bypass, inside_ifindex=inside_ifindex,
                         on_events=self._on_events,
                         on_error=metrics.hook_error if metrics is not None else None,
                         learn=self.injector.learn if self.injector is not None else None)
        self.fastpath: FastPath | None = None
        self.handover: Handover | None = None  # decided flows to the fast path
        self.fastpath_note: str | None = None  # why there is no fast path (or no shaping in it)
        self._stop: asyncio.Event | None = None
        self._reading: asyncio.Future[dict[str, tuple[int, int]]] | None = None  # the firewall's counters

    @property
    def stats(self) -> HookStats:
        return self.hook.stats

    def _on_events(self, events: list[Event]) -> None:
        injector, handover, metrics = self.injector, self.handover, self.metrics
        for ev in events:
            if injector is not None and isinstance(ev, ResetRequested):
                injector.on_reset(ev)
            if handover is not None:
                handover.on_event(ev)
            if metrics is not None:
                metrics.on_event(ev)

    def _start_kernel(self, loop: asyncio.AbstractEventLoop) -> None:
        """The fast path and the hand-over to it, where the kernel allows. Making the fast path is
        the test: its error says why there is none."""
        if not self.bypass or not (self.inside_if and self.outside_if):
            self.fastpath_note = "no fast path: it needs both --inside-if and --outside-if"
            return
        interfaces = [self.inside_if, self.outside_if]
        try:
            fast = self.fastpath = FastPath(interfaces)
        except ThrottleError as exc:
            self.fastpath_note = f"no fast path ({exc}); decided flows bypass through conntrack marks"
            return
        shaping = False
        if any(rule.action == "shape" for rule in self.scenario.rules):
            try:
                fast.enable_shaping(interfaces)
                shaping = True
            except ThrottleError as exc:
                self.fastpath_note = f"no shaping in the kernel ({exc}); shaped flows stay in the engine"
        self.handover = Handover(fast, self.inside_if, self.outside_if, loop, shaping=shaping, observer=self.metrics)
        self.handover.start(idle=self.scenario.model.idle_timeout)

    # ---- running -------------------------------------------------------------------------
    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def run(self, ready: Callable[[], None] | None = None,
                  tick: Callable[[HookStats], None] | None = None, tick_every: float = 1.0) -> None:
        check_requirements()
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # The handlers stay until everything is undone: a second signal during the clean-up only
        # asks again for the stop under way, it does not interrupt the clean-up half-way.
        with stopped_by_signals(loop, self.stop):
            try:
                self._start_kernel(loop)
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
                if self.handover is not None:
                    self.handover.close()
                if self.fastpath is not None:
                    self.fastpath.close()  # stops and joins the walker first
                    self.fastpath = None
                if self.injector is not None:
                    self.injector.close()

    def _tick(self, now: float, tick: Callable[[HookStats], None] | None) -> None:
        """Once a second on the loop: cheap things only (the flow table's gauges and what the
        engine judged, the queue's drops); the firewall's counters are read on another thread."""
        lost = queue_losses(self.queue)
        if lost is not None:
            self.stats.lost = lost
            if self.metrics is not None:
                self.metrics.queue_dropped(lost)
        if tick is not None:
            tick(self.stats)
        metrics = self.metrics
        if metrics is None:
            return
        metrics.tick(self.engine, self.hook.holding, None, now)
        if self._reading is None or self._reading.done():  # iptables, off the packet loop
            loop = asyncio.get_running_loop()
            self._reading = loop.run_in_executor(None, connmark_counters, self.fw)
            self._reading.add_done_callback(self._read)

    def _read(self, reading: asyncio.Future[dict[str, tuple[int, int]]]) -> None:
        if self.metrics is not None and not reading.cancelled() and reading.exception() is None:
            self.metrics.connmark_tick(reading.result())

    def describe(self) -> str:
        s, handover, injector = self.stats, self.handover, self.injector
        errors = s.errors + (handover.errors if handover is not None else 0) + \
            (injector.errors if injector is not None else 0)
        forwarded, limited = (handover.forwarded, handover.limited) if handover is not None else (0, 0)
        return (f"{s.queued} pkts queued: {s.accepted} passed, {s.dropped} dropped, "
                f"{s.held} delayed ({s.holding} held now), {s.bypassed} packets marked to hand their flow to the "
                f"kernel, {forwarded} flows on the fast path, {limited} limited by the kernel; "
                f"flows limited {s.flows_limited}, passed {s.flows_passed}, closed while inspected "
                f"{sum(n for (state, _), n in self.engine.counters.ended.items() if state == 'inspecting')}; "
                f"{s.lost} packets dropped with the queue full"
                + (" (the censor fell behind: their senders send them again)" if s.lost else "")
                + (f"; {errors} engine errors" if errors else "")
                + (f"; {injector.sent} RSTs injected ({injector.failed} not sent)" if injector is not None else ""))


@contextmanager
def stopped_by_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> Iterator[None]:
    """SIGINT and SIGTERM call `stop` on `loop`, however busy the loop and the threads around it.

    Not `loop.add_signal_handler`: asyncio learns of a signal only from the byte the C-level
    handler writes into the loop's self-pipe, which every `call_soon_threadsafe` writes to as well.
    Under load the hand-over's netlink worker and the walker fill that socketpair (278 one-byte
    writes on Linux) while the loop is in a long callback; the signal's byte is then refused
    (EAGAIN, "Exception ignored when trying to write to the signal wakeup fd"), asyncio never
    hears of the signal and the loop sleeps in epoll_wait until a second one (python/cpython#74224).

    Here the signal is not carried by a byte. The Python-level handler runs in the main thread at
    the interpreter's next check, whatever the loop is doing, and queues `stop` with
    `call_soon_threadsafe`, which appends the callback before it writes its wake-up byte: a full
    pipe costs the wake-up, never the callback. The wakeup fd is a socketpair of our own, which
    nothing else writes to, so it wakes the loop from epoll_wait when the kernel delivers the
    signal to another thread (whose Python handler then runs in the main thread).
    """
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)

    def drain() -> None:
        try:
            while reader.recv(4096):
                pass
        except OSError:
            pass  # empty (EAGAIN): the handler itself does the work

    def handler(signum: int, frame: object) -> None:
        try:
            loop.call_soon_threadsafe(stop)
        except RuntimeError:
            pass  # the loop is closed: nothing left to stop

    loop.add_reader(reader.fileno(), drain)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)  # None: a handler not set from Python
        signal.set_wakeup_fd(previous_fd)
        loop.remove_reader(reader.fileno())
        reader.close()
        writer.close()


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
        return bool(found) and is_bridge_port(ipr, found[0])


def start_metrics(listen: str | None, scenario: Scenario | None = None) -> tuple[Metrics | None, str | None]:
    """The exporter's HTTP server (the metrics, and the live page of `scenario` at its root), bound
    now, in this (the host's) namespace: it stays reachable from the host after the process enters
    the lab's namespace. `listen` None means the default,
    where a busy port is only a warning; "off" means none. Returns (metrics, a line to print)."""
    if listen == "off":
        return None, None
    from throttle.measure.exporter import Metrics
    from throttle.measure.page import serve

    explicit = listen is not None
    addr, _, port = (listen or DEFAULT_METRICS).rpartition(":")
    addr = addr.strip("[]") or "127.0.0.1"
    if not port.isdigit():
        raise ThrottleError(f"--metrics-listen {listen}: write ADDR:PORT, e.g. {DEFAULT_METRICS}, or off")
    metrics = Metrics()
    if scenario is not None:
        metrics.board.describe(scenario)
    try:
        serve(metrics.board, metrics.registry, addr, int(port))
    except OSError as exc:
        message = f"cannot serve metrics on {addr}:{port} ({exc.strerror}); choose another with --metrics-listen ADDR:PORT"
        if explicit:
            raise ThrottleError(message) from None
        return None, message
    shown = f"[{addr}]" if ":" in addr else addr
    return metrics, f"metrics at http://{shown}:{port}/metrics, the live page at http://{shown}:{port}/"


def run_censor(scenario: Scenario, *, netns_name: str | None, queue: int, inside_if: str | None,
               say: Callable[[str], None], outside_if: str | None = None, quiet: bool = False, bypass: bool = True,
               metrics_listen: str | None = None) -> int:
    """The `throttle censor` command: enter the namespace, hook, run until SIGINT/SIGTERM. What it
    has to tell (its lines of progress and counters) goes to `say`."""
    check_requirements()
    metrics, metrics_note = start_metrics(metrics_listen, scenario)
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

    def ready() -> None:
        say(f"{scenario.name} active in {where} (queue {queue}, fail-open); Ctrl-C stops it")
        if not quiet:
            say("eBPF fast path on" if censor.fastpath is not None else censor.fastpath_note or "no fast path")
            if metrics_note:
                say(metrics_note)

    last = [0.0, 0.0]  # when the counters were printed, and how many queue drops they showed

    def tick(stats: HookStats) -> None:
        now = time.monotonic()
        behind = stats.lost > last[1]  # said even with --quiet: the censor cannot keep up
        if now - last[0] >= 5.0 and (behind or not quiet and stats.queued):
            last[0], last[1] = now, stats.lost
            say(censor.describe())

    asyncio.run(censor.run(ready=ready, tick=tick))
    say(f"stopped; rules removed. {censor.describe()}")
    return 0
