"""The NFQUEUE adapter: packets in from a netfilter queue, the engine's verdicts out. Thin.

Packets of flows still under inspection, and of limited flows, arrive on the queue; each gets the
engine's verdict: ACCEPT and DROP at once, HOLD as a timer in the event loop that accepts the
retained packet later, and BYPASS as a mark plus REPEAT, so the firewall stores the mark on the
conntrack entry and the kernel forwards the rest of that flow without queueing it (see
`throttle.kernel.firewall`). No thread, no sleep per packet. A bug in the engine costs a verdict
(the packet is accepted), never a packet; held packets are accepted on the way out.

When the censor falls behind and the queue (QUEUE_MAXLEN packets) or its socket's buffer is full,
the kernel drops the packet and counts it (`queue_losses`): TCP and QUIC send it again, and the
copy is inspected then. The queue is not bound fail-open (NFQA_CFG_F_FAIL_OPEN), under which the
kernel would accept such a packet unseen and count it nowhere: a ClientHello let through that way
is a flow that escapes its rule, silently. The cost of dropping: a retransmission timeout for
each dropped packet's flow (TCP's 200 ms or more, 1 s for a SYN), and a datagram of a protocol
that does not retransmit is lost. With no censor bound to the queue at all (it died) the
firewall's --queue-bypass still lets everything through (fail-open).

What runs around it (signals, the fast path, metrics, printing) is composed in `throttle.censor`.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Protocol

from throttle.engine import Engine, Event, FlowDecided, Verdict
from throttle.errors import ThrottleError
from throttle.kernel.firewall import MARK_MASK
from throttle.kernel.tools import require_root, require_tool

QUEUE_MAXLEN = 65536  # packets the kernel keeps for us, held ones included
HOLD_LIMIT = QUEUE_MAXLEN // 2  # held (shaped) packets beyond this are dropped: the queue never fills
RCVBUF = 64 << 20  # the netlink socket's buffer (root may go past rmem_max): bursts of new flows fit
SOL_NETLINK, NETLINK_NO_ENOBUFS = 270, 5
PROC_QUEUES = "/proc/net/netfilter/nfnetlink_queue"
# Events are handled (decided flows handed to the kernel) at least every BATCH packets: under load
# the queue never runs dry, and a flow must not wait for a lull to leave Python.
BATCH = 32
# Packets read per wake-up of the loop. Under a flood the queue never runs dry, and reading until it
# does (netfilterqueue's `run`) kept the loop in one callback for as long as the flood lasted: no
# signal, timer, tick or hand-over completion ran meanwhile (one SIGINT waited 6 s for a flood's end).
PER_WAKEUP = 1024


class QueuedPacket(Protocol):
    """What netfilterqueue hands the callback, reduced to what the adapter uses."""

    indev: int
    physindev: int  # the bridge port it came in on (0 when routed, not bridged)

    def get_payload(self) -> bytes: ...
    def get_hw(self) -> bytes | None: ...
    def get_mark(self) -> int: ...
    def set_mark(self, mark: int) -> None: ...
    def retain(self) -> None: ...
    def accept(self) -> None: ...
    def drop(self) -> None: ...
    def repeat(self) -> None: ...


def queue_losses(queue: int, proc: str = PROC_QUEUES) -> int | None:
    """Packets the kernel dropped instead of queueing them to `queue` in this namespace (queue
    full, or our socket's buffer full), from /proc; None when the file or the queue is not there."""
    try:
        with open(proc) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 7 and fields[0] == str(queue):
            return int(fields[5]) + int(fields[6])  # queue_dropped, queue_user_dropped
    return None


def check_requirements() -> ModuleType:
    """Everything the hook needs, each missing piece named with its fix. Returns the module."""
    require_root("the censor needs root (netfilter queues and firewall rules)")
    for tool in ("iptables", "ip6tables"):
        require_tool(tool, "iptables", " (or run scripts/setup)")
    try:
        import netfilterqueue
    except ImportError as exc:
        raise ThrottleError(
            f"the netfilterqueue module cannot be loaded ({exc}): run scripts/setup, which installs "
            "libnetfilter-queue-dev and builds it"
        ) from None
    return netfilterqueue


class _Enough(Exception):
    """Raised by the queue's callback after PER_WAKEUP packets, each with its verdict given: it ends
    netfilterqueue's `run` (the callback's exception stops `nfq_handle_packet` and propagates), and
    the loop gets its turn. The kernel sends each queued packet in a netlink message of its own, so
    no packet is left in the buffer unjudged."""


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
    flows_limited: int = 0
    flows_passed: int = 0
    lost: int = 0  # packets the kernel dropped, our queue or socket full: the censor fell behind
    overflow: int = 0  # shaped packets dropped because HOLD_LIMIT were held already


class Hook:
    """One engine behind one queue. `on_packet` for every packet, `after_batch` after each read."""

    def __init__(self, engine: Engine, *, decided_mark: int, bypass: bool = True, inside_ifindex: int | None = None,
                 on_events: Callable[[list[Event]], None] | None = None,
                 on_error: Callable[[], None] | None = None,
                 learn: Callable[[QueuedPacket, bytes], None] | None = None) -> None:
        self.engine = engine
        self.learn = learn  # sees every packet read, before the engine (the RST injector's MAC table)
        self.bypass = bypass  # False keeps every packet in Python (a benchmark baseline)
        self.decided_mark = decided_mark  # the firewall's (Firewall.mark): its rules forward such flows
        self.inside_ifindex = inside_ifindex
        self.on_events = on_events
        self.on_error = on_error
        self.stats = HookStats()
        self._held: set[QueuedPacket] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._since_batch = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def holding(self) -> int:
        return len(self._held)

    # ---- the per-packet path -------------------------------------------------------------
    def on_packet(self, pkt: QueuedPacket) -> None:
        stats = self.stats
        stats.queued += 1
        loop = self.loop
        try:
            # A bridged packet's indev is the bridge; the interface it arrived on is its port.
            inside = None if self.inside_ifindex is None else (pkt.physindev or pkt.indev) == self.inside_ifindex
            data = pkt.get_payload()
            if self.learn is not None:
                self.learn(pkt, data)
            verdict, release = self.engine.process(data, loop.time(), inside)
        except Exception:  # noqa: BLE001 - a bug must cost a verdict, never a packet
            stats.errors += 1
            if self.on_error is not None:
                self.on_error()
            pkt.accept()
            return
        if verdict == Verdict.ACCEPT or verdict == Verdict.BYPASS and not self.bypass:
            stats.accepted += 1
            pkt.accept()
        elif verdict == Verdict.BYPASS:
            stats.bypassed += 1
            pkt.set_mark(pkt.get_mark() & ~MARK_MASK | self.decided_mark)
            pkt.repeat()
        elif verdict == Verdict.DROP:
            stats.dropped += 1
            pkt.drop()
        elif len(self._held) >= HOLD_LIMIT:
            stats.overflow += 1  # the queue must keep room for packets still to be inspected
            stats.dropped += 1
            pkt.drop()
        else:
            stats.held += 1
            pkt.retain()
            self._held.add(pkt)
            stats.holding = len(self._held)
            loop.call_at(release, self._release, pkt)
        self._since_batch += 1
        if self._since_batch >= BATCH:
            self.after_batch()

    def _release(self, pkt: QueuedPacket) -> None:
        if pkt in self._held:
            self._held.discard(pkt)
            self.stats.holding = len(self._held)
            pkt.accept()

    def after_batch(self) -> None:
        """Drain the engine's events (to `on_events`) and arm the engine's next timer."""
        self._since_batch = 0
        events = self.engine.drain_events()
        for ev in events:
            if isinstance(ev, FlowDecided):
                if ev.flow.rule is not None:
                    self.stats.flows_limited += 1
                else:
                    self.stats.flows_passed += 1
        if events and self.on_events is not None:
            self.on_events(events)
        self._schedule_timer()

    def _schedule_timer(self) -> None:
        at = self.engine.next_timer()
        if at is None or at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self.engine.handle_timer(self.loop.time())
        self.after_batch()

    def release_all(self) -> None:
        """Accept every held packet now (on the way out: never lose a packet)."""
        for pkt in list(self._held):
            pkt.accept()
        self._held.clear()
        self.stats.holding = 0

    # ---- the queue -------------------------------------------------------------------------
    @contextmanager
    def bound(self, queue: int) -> Iterator[None]:
        """Bind netfilter queue `queue` to this hook in the running event loop; always unbind,
        accepting whatever is still held."""
        nfq_module = check_requirements()
        loop = self.loop
        nfq = nfq_module.NetfilterQueue()
        budget = 0
        reading = False  # inside readable()'s nfq.run: the one place _Enough is caught

        def on_packet(pkt: QueuedPacket) -> None:
            nonlocal budget
            self.on_packet(pkt)
            budget -= 1
            # bind() itself may hand over packets already queued (the rules go in first, and a
            # busy link fills the queue): a CI run's censor died of an _Enough raised out of bind
            if reading and budget <= 0:
                raise _Enough

        def readable() -> None:
            nonlocal budget, reading
            budget = PER_WAKEUP
            reading = True
            try:
                nfq.run(block=False)  # recv in C: a Python-level socket read cost 15-25% of the packet rate
            except _Enough:
                pass
            finally:
                reading = False
            self.after_batch()

        try:
            nfq.bind(queue, on_packet, max_len=QUEUE_MAXLEN, sock_len=RCVBUF)
        except OSError as exc:
            raise ThrottleError(
                f"cannot bind netfilter queue {queue} ({exc}): is another censor running on it? "
                "(the kernel needs nfnetlink_queue: modprobe nfnetlink_queue)"
            ) from None
        sock = socket.fromfd(nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
        sock.setblocking(False)
        for level, option, value in ((socket.SOL_SOCKET, 33, RCVBUF),  # SO_RCVBUFFORCE: past rmem_max
                                     (SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)):  # an overrun is counted, not fatal
            try:
                sock.setsockopt(level, option, value)
            except OSError:
                pass

        loop.add_reader(sock.fileno(), readable)
        try:
            yield
        finally:
            loop.remove_reader(sock.fileno())
            self.release_all()
            if self._timer is not None:
                self._timer.cancel()
            sock.close()
            nfq.unbind()
