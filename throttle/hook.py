"""The live censor: the engine behind a netfilterqueue binding, in one asyncio event loop.

Packets of undecided and limited flows arrive on the queue; each gets the engine's verdict:
ACCEPT and DROP at once, HOLD as a timer in the loop that accepts the retained packet later, and
BYPASS as a mark plus REPEAT, so the firewall stores the mark on the conntrack entry and the kernel
forwards the rest of that flow without queueing it (see `throttle.firewall`). No thread, no sleep
per packet. The queue is bound fail-open (`--queue-bypass`): if this process dies, traffic flows
unlimited instead of stopping.

Where the kernel allows it, decided flows also go into the eBPF fast path (`throttle.fastpath`):
their later packets are redirected at tc ingress, before netfilter and conntrack, so a flow the
censor does not limit costs it nothing at all. The conntrack mark stays as the fallback.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from throttle.engine import TCP, UDP, Engine, FlowDecided, FlowEnded, State, Verdict
from throttle.errors import ThrottleError
from throttle.firewall import DECIDED_MARK, Firewall, installed
from throttle.scenario import Scenario

QUEUE_MAXLEN = 8192  # packets the kernel keeps for us, held ones included


def check_requirements() -> Any:
    """Everything the hook needs, each missing piece named with its fix. Returns the module."""
    if os.geteuid() != 0:
        raise ThrottleError("the censor needs root (netfilter queues and firewall rules): run it with sudo")
    for tool in ("iptables", "ip6tables"):
        if not (shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")):
            raise ThrottleError(f"{tool} is missing: apt-get install iptables (or run scripts/setup)")
    try:
        import netfilterqueue
    except ImportError as exc:
        raise ThrottleError(
            f"the netfilterqueue module cannot be loaded ({exc}): run scripts/setup, which installs "
            "libnetfilter-queue-dev and builds it"
        ) from None
    return netfilterqueue


@dataclass
class HookStats:
    started: float = field(default_factory=time.monotonic)
    queued: int = 0
    accepted: int = 0
    dropped: int = 0
    held: int = 0
    bypassed: int = 0
    errors: int = 0
    holding: int = 0
    fast_flows: int = 0  # flows handed to the eBPF fast path
    flows_limited: int = 0
    flows_passed: int = 0


class Hook:
    """Runs one engine against one queue until stopped. Construct inside the target namespace."""

    def __init__(self, scenario: Scenario, *, queue: int = 0, inside_ifindex: int | None = None,
                 on_event: Callable[[Any], None] | None = None, fw: Firewall | None = None,
                 bypass: bool = True, outside_if: str | None = None, inside_if: str | None = None,
                 metrics: Any = None) -> None:
        self.scenario = scenario
        self.engine = Engine(scenario.model, scenario.rules)
        self.queue = queue
        self.inside_ifindex = inside_ifindex
        self.on_event = on_event
        self.fw = fw or Firewall(queue=queue)
        self.stats = HookStats()
        self.bypass = bypass  # False keeps every packet in Python (a benchmark baseline)
        self.inside_if = inside_if
        self.outside_if = outside_if
        self.fastpath: Any = None  # a FastPath once run() has attached one
        self.fastpath_note: str | None = None  # why there is none
        self.metrics = metrics  # a throttle.metrics.Metrics, or None
        self._held: set[Any] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    # ---- the per-packet path -------------------------------------------------------------
    def _on_packet(self, pkt: Any) -> None:
        stats = self.stats
        stats.queued += 1
        try:
            now = self._loop.time()  # type: ignore[union-attr]
            inside = None if self.inside_ifindex is None else pkt.indev == self.inside_ifindex
            verdict, release = self.engine.process(pkt.get_payload(), now, inside)
        except Exception:  # noqa: BLE001 - a bug must cost a verdict, never a packet
            stats.errors += 1
            if self.metrics is not None:
                self.metrics.hook_error()
            pkt.accept()
            return
        if verdict == Verdict.ACCEPT or verdict == Verdict.BYPASS and not self.bypass:
            stats.accepted += 1
            pkt.accept()
        elif verdict == Verdict.BYPASS and self.bypass:
            stats.bypassed += 1
            pkt.set_mark(pkt.get_mark() | DECIDED_MARK)
            pkt.repeat()
        elif verdict == Verdict.DROP:
            stats.dropped += 1
            pkt.drop()
        else:
            stats.held += 1
            pkt.retain()
            self._held.add(pkt)
            stats.holding = len(self._held)
            self._loop.call_at(release, self._release, pkt)  # type: ignore[union-attr]

    def _release(self, pkt: Any) -> None:
        if pkt in self._held:
            self._held.discard(pkt)
            self.stats.holding = len(self._held)
            pkt.accept()

    def _after_batch(self) -> None:
        events = self.engine.drain_events()
        for ev in events:
            if isinstance(ev, FlowDecided):
                if ev.flow.rule is not None:
                    self.stats.flows_limited += 1
                else:
                    self.stats.flows_passed += 1
                    if self.fastpath is not None and self.bypass:
                        self._to_fastpath(ev.flow)
            elif isinstance(ev, FlowEnded) and self.fastpath is not None and ev.reason != "idle":
                # Idle flows are not ended here: their packets skip us, so the engine's idea of
                # idle is wrong for them. The fast path expires its own idle entries.
                self._fastpath_call(self.fastpath.remove_flow, ev.flow.proto, ev.flow.client,
                                    ev.flow.client_port, ev.flow.server, ev.flow.server_port)
            if self.on_event is not None:
                self.on_event(ev)
            if self.metrics is not None:
                self.metrics.on_event(ev)
        self._schedule_timer()

    def _to_fastpath(self, flow: Any) -> None:
        if flow.state != State.PASSED or flow.proto not in (TCP, UDP) or flow.server_port == 53:
            return
        # The client (opener) sits behind the inside interface, unless it opened from outside.
        client_if, server_if = self.inside_if, self.outside_if
        if not flow.eligible:
            client_if, server_if = server_if, client_if
        if self._fastpath_call(self.fastpath.add_flow, flow.proto, flow.client, flow.client_port,
                               flow.server, flow.server_port, client_if, server_if):
            self.stats.fast_flows += 1
            if self.metrics is not None:
                from throttle.fastpath import flow_key

                self.metrics.fast_flow_added(
                    flow_key(flow.proto, flow.client, flow.client_port, flow.server, flow.server_port), "upload")
                self.metrics.fast_flow_added(
                    flow_key(flow.proto, flow.server, flow.server_port, flow.client, flow.client_port), "download")

    def _fastpath_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except ThrottleError as exc:  # the mark path still bypasses the flow
            self.stats.errors += 1
            self.fastpath_note = str(exc)
            return None

    def _schedule_timer(self) -> None:
        at = self.engine.next_timer()
        if at is None or at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)  # type: ignore[union-attr]

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self.engine.handle_timer(self._loop.time())  # type: ignore[union-attr]
        self._after_batch()

    # ---- running -------------------------------------------------------------------------
    _last_expire = 0.0

    def _attach_fastpath(self) -> None:
        if not self.bypass or not (self.inside_if and self.outside_if):
            self.fastpath_note = "no fast path: it needs both --inside-if and --outside-if"
            return
        from throttle import fastpath

        reason = fastpath.available()
        if reason is not None:
            self.fastpath_note = f"no fast path ({reason}); decided flows bypass through conntrack marks"
            return
        try:
            self.fastpath = fastpath.FastPath([self.inside_if, self.outside_if])
        except ThrottleError as exc:
            self.fastpath_note = f"no fast path ({exc}); decided flows bypass through conntrack marks"

    async def run(self, ready: Callable[[], None] | None = None,
                  tick: Callable[[HookStats], None] | None = None, tick_every: float = 1.0) -> None:
        nfq_module = check_requirements()
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._loop.add_signal_handler(sig, self._stop.set)
        nfq = nfq_module.NetfilterQueue()
        try:
            nfq.bind(self.queue, self._on_packet, max_len=QUEUE_MAXLEN)
        except OSError as exc:
            raise ThrottleError(
                f"cannot bind netfilter queue {self.queue} ({exc}): is another censor running on it? "
                "(the kernel needs nfnetlink_queue: modprobe nfnetlink_queue)"
            ) from None
        sock = socket.fromfd(nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        except OSError:
            pass

        def readable() -> None:
            nfq.run(block=False)
            self._after_batch()

        self._attach_fastpath()
        try:
            with installed(self.fw):
                self._loop.add_reader(sock.fileno(), readable)
                if ready is not None:
                    ready()
                while not self._stop.is_set():
                    try:
                        await asyncio.wait_for(self._stop.wait(), timeout=tick_every)
                    except asyncio.TimeoutError:
                        pass
                    if tick is not None:
                        tick(self.stats)
                    if self.metrics is not None:
                        fast = self._fastpath_call(self.fastpath.flow_bytes) if self.fastpath is not None else None
                        self.metrics.tick(self.engine, len(self._held), fast)
                    if self.fastpath is not None and self._loop.time() - self._last_expire > 10:
                        self._last_expire = self._loop.time()
                        self._fastpath_call(self.fastpath.expire, self.scenario.model.idle_timeout)
                self._loop.remove_reader(sock.fileno())
        finally:
            for pkt in list(self._held):  # never lose a packet on the way out
                pkt.accept()
            self._held.clear()
            if self.fastpath is not None:
                self.fastpath.close()
                self.fastpath = None
            sock.close()
            nfq.unbind()
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.remove_signal_handler(sig)


def ifindex(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def describe(stats: HookStats) -> str:
    return (f"{stats.queued} pkts queued: {stats.accepted} passed, {stats.dropped} dropped, "
            f"{stats.held} delayed ({stats.holding} held now), {stats.bypassed} packets marked to hand their flow to the kernel, "
            f"{stats.fast_flows} flows on the fast path; "
            f"flows limited {stats.flows_limited}, passed {stats.flows_passed}"
            + (f"; {stats.errors} engine errors" if stats.errors else ""))


DEFAULT_METRICS = "127.0.0.1:9464"


def start_metrics(listen: str | None) -> tuple[Any, str | None]:
    """The exporter's HTTP server, bound now, in this (the host's) namespace: it stays reachable
    from the host after the process enters the lab's namespace. `listen` None means the default,
    where a busy port is only a warning; "off" means none."""
    from throttle.metrics import Metrics

    if listen == "off":
        return None, None
    explicit = listen is not None
    addr, _, port = (listen or DEFAULT_METRICS).rpartition(":")
    addr = addr.strip("[]") or "127.0.0.1"
    if not port.isdigit():
        raise ThrottleError(f"--metrics-listen {listen}: write ADDR:PORT, e.g. 127.0.0.1:9464, or off")
    metrics = Metrics()
    try:
        from prometheus_client import start_http_server

        start_http_server(int(port), addr=addr, registry=metrics.registry)
    except OSError as exc:
        message = f"cannot serve metrics on {addr}:{port} ({exc.strerror}); choose another with --metrics-listen ADDR:PORT"
        if explicit:
            raise ThrottleError(message) from None
        return None, message
    return metrics, f"metrics at http://{addr}:{port}/metrics" if ":" not in addr else f"metrics at http://[{addr}]:{port}/metrics"


def run_censor(scenario: Scenario, *, netns: str | None, queue: int, inside_if: str | None,
               outside_if: str | None = None, quiet: bool = False, bypass: bool = True,
               metrics_listen: str | None = None) -> int:
    """The `throttle censor` command: enter the namespace, hook, run until SIGINT/SIGTERM."""
    check_requirements()
    metrics, metrics_note = start_metrics(metrics_listen)
    if netns:
        from throttle import netns as ns

        ns.enter(netns)
    index = ifindex(inside_if) if inside_if else None
    if inside_if and index is None:
        raise ThrottleError(f"no interface {inside_if} in {'namespace ' + netns if netns else 'this namespace'}")
    if outside_if and ifindex(outside_if) is None:
        raise ThrottleError(f"no interface {outside_if} in {'namespace ' + netns if netns else 'this namespace'}")
    # With both interfaces known, rules see only what crosses between them (gateway mode).
    fw = Firewall.gateway(inside_if, outside_if, queue) if inside_if and outside_if else Firewall(queue=queue)
    hook = Hook(scenario, queue=queue, inside_ifindex=index, bypass=bypass, inside_if=inside_if, outside_if=outside_if,
                metrics=metrics, fw=fw)
    where = f"namespace {netns}" if netns else f"this namespace, between {inside_if} (inside) and {outside_if}"

    def ready() -> None:
        print(f"throttle censor: {scenario.name} active in {where} (queue {queue}, fail-open); Ctrl-C stops it",
              file=sys.stderr, flush=True)
        if not quiet:
            fast = "eBPF fast path on" if hook.fastpath is not None else hook.fastpath_note
            print(f"throttle censor: {fast}", file=sys.stderr, flush=True)
            if metrics_note:
                print(f"throttle censor: {metrics_note}", file=sys.stderr, flush=True)

    last = [0.0]

    def tick(stats: HookStats) -> None:
        now = time.monotonic()
        if not quiet and now - last[0] >= 5.0 and stats.queued:
            last[0] = now
            print(f"throttle censor: {describe(stats)}", file=sys.stderr, flush=True)

    asyncio.run(hook.run(ready=ready, tick=tick))
    print(f"throttle censor: stopped; rules removed. {describe(hook.stats)}", file=sys.stderr, flush=True)
    return 0
