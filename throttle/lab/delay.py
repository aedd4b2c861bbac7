"""The lab's own delay stage, for kernels without netem: `python -m throttle.lab.delay`, a daemon in
the router namespace that holds every forwarded packet for the link's one-way delay.

iptables sends everything the router forwards (both families, every protocol: ICMP too, so ping
reads the RTT) to netfilter queue `DELAY_QUEUE` with only its metadata copied (COPY_META: no
payload crosses to us), and the daemon gives each packet its ACCEPT verdict once its time has
come. `Schedule` (pure, no clock of its own) says when: arrival + one-way delay + the direction's
jitter, an offset within +-jitter/2 that wanders too slowly for a packet to overtake the one ahead
of it, so jitter moves release times and never reorders a direction. The loop is one thread: `select` on the queue's
socket with a timeout until the next packet is due, netfilterqueue reading what arrived
(`run(block=False)`, which stops when the socket is empty), and the verdicts given after the
callback has returned (netfilterqueue >= 1.0 keeps a packet's verdict open until it is given).
It runs SCHED_FIFO when it can, so a busy machine does not make it late.

No packet is lost silently: the queue is bound without fail-open, so a packet the kernel cannot
queue (queue full) is dropped and counted in /proc, and the daemon reports that count, with how
many packets it held and how late the latest was, in its status file every second; `throttle lab
status` shows them. The rules are not `--queue-bypass` either: with the daemon gone the router
forwards nothing, rather than a link without its delay that measures as if it had one. The rules
are made inside a context manager that removes them on every way out (the lab's namespaces go with
`lab down` anyway); on SIGTERM or SIGINT the daemon removes them, then accepts what it holds.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import random
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Generic, TypeVar

from throttle.children import capture
from throttle.errors import ThrottleError
from throttle.files import atomic_write
from throttle.kernel.tools import require_tool
from throttle.lab.layout import DELAY_CHAIN, DELAY_QUEUE

log = logging.getLogger("throttle.lab.delay")

P = TypeVar("P")
QUEUE_MAXLEN = 1 << 20  # packets the kernel may hold for us: far beyond 20 Mbit/s x 300 ms (~500)
RCVBUF = 16 << 20  # the netlink socket's buffer (metadata only: ~200 bytes a packet)
SOL_NETLINK, NETLINK_NO_ENOBUFS, SO_RCVBUFFORCE = 270, 5, 33
LATE = 0.001  # a release this much after its time is counted late (the stage's accuracy target)
# Packets released between reads while a burst goes out: a packet is stamped when it is read, and
# one that waited for a burst of hundreds to be released (several ms) would be held that much longer.
READ_EVERY = 16
STATUS_EVERY = 1.0  # seconds between status files
JITTER_PERIOD = 0.01  # seconds: the shortest leg of a lane's jitter (Schedule)
# Seconds each packet spends in the stage beyond its hold, which the hold leaves out: the wake-up
# that reads it (its arrival is stamped then), the wake-up that releases it, the verdict. Measured
# with ping on a 2-core VM, SCHED_FIFO: 10, 50, 100 and 150 ms read 0.4-0.6 ms long without it
# (0.07 ms of it the lab's own round trip); a round trip has two ways.
OVERHEAD = 0.0002
FIFO_PRIORITY = 10  # low among real-time priorities: above every normal process, below the kernel's


class Schedule(Generic[P]):
    """When each packet leaves: per lane (the interface it came in on) a FIFO of (release time,
    packet). Each lane's jitter is an offset that wanders within +-jitter/2: it heads in a straight
    line for a target drawn anew every `period` (at least twice the jitter, so it changes by at most
    half a second per second, and a packet can never overtake the one ahead of it), rather than a
    draw per packet, which at a few packets per millisecond would have to be clamped to keep order
    and so would raise the mean delay. `draw()` returns a number in [0, 1) (injected for tests)."""

    def __init__(self, delay: float, jitter: float, draw: Callable[[], float] = random.random) -> None:
        if delay < 0 or jitter < 0 or jitter > 2 * delay:
            raise ValueError(f"delay {delay} s with jitter {jitter} s: a packet would leave before it came")
        self.delay = delay
        self.jitter = jitter
        self.draw = draw
        self.period = max(2 * jitter, JITTER_PERIOD)
        self._lanes: dict[int, collections.deque[tuple[float, P]]] = {}
        self._last: dict[int, float] = {}
        self._legs: dict[int, tuple[float, float, float]] = {}  # lane -> (leg start, offset then, target)

    def offset(self, lane: int, now: float) -> float:
        """The lane's jitter at `now`, in [-jitter/2, +jitter/2]."""
        if not self.jitter:
            return 0.0
        leg = self._legs.get(lane)
        if leg is None or now >= leg[0] + self.period:
            start = leg[2] if leg is not None else (self.draw() - 0.5) * self.jitter
            leg = (now, start, (self.draw() - 0.5) * self.jitter)
            self._legs[lane] = leg
        began, start, target = leg
        return start + (target - start) * (now - began) / self.period

    def add(self, lane: int, now: float, item: P) -> float:
        """Queue `item`, arrived at `now`; its release time."""
        at = now + self.delay + self.offset(lane, now)
        at = max(at, self._last.get(lane, at))  # never before the one ahead (the offset's slope sees to it)
        self._last[lane] = at
        self._lanes.setdefault(lane, collections.deque()).append((at, item))
        return at

    def next_release(self) -> float | None:
        heads = [q[0][0] for q in self._lanes.values() if q]
        return min(heads) if heads else None

    def due(self, now: float) -> list[tuple[float, P]]:
        """The packets whose time has come, each with its release time, in release order."""
        out: list[tuple[float, P]] = []
        for q in self._lanes.values():
            while q and q[0][0] <= now:
                out.append(q.popleft())
        if len(self._lanes) > 1:
            out.sort(key=lambda pair: pair[0])
        return out

    def drain(self) -> list[P]:
        """Everything still held, in each lane's order (on the way out: every packet is released)."""
        out = [item for q in self._lanes.values() for _, item in q]
        self._lanes.clear()
        return out

    def __len__(self) -> int:
        return sum(len(q) for q in self._lanes.values())


@dataclass
class Stats:
    """What the status file says (`StageStatus` in lab.topology reads it)."""

    pid: int
    delayed: int = 0  # packets released
    late: int = 0  # released more than LATE after their time
    max_late_ms: float = 0.0
    holding: int = 0
    queue_dropped: int = 0  # packets the kernel dropped, our queue full: the link lost them
    fifo: bool = False  # runs SCHED_FIFO
    verdict_us: float = 0.0  # what one ACCEPT costs us, microseconds (a moving average): the kernel
    # forwards the packet, and the receiver's stack runs, within the verdict's system call


def rules(queue: int) -> list[list[str]]:
    """The chain's rules: everything forwarded, to our queue; never bypassed (module docstring)."""
    return [["-j", "NFQUEUE", "--queue-num", str(queue)]]


@contextmanager
def queue_rules(queue: int, tools: Sequence[str]) -> Iterator[None]:
    """Our chain in the mangle table of this namespace, for each of `tools` (iptables,
    ip6tables), jumped to from FORWARD; removed on the way out, and before (a killed stage's)."""
    for tool in tools:
        _remove(tool)
    try:
        for tool in tools:
            base = [tool, "-w", "-t", "mangle"]
            _must([*base, "-N", DELAY_CHAIN])
            for rule in rules(queue):
                _must([*base, "-A", DELAY_CHAIN, *rule])
            _must([*base, "-I", "FORWARD", "1", "-j", DELAY_CHAIN])
        yield
    finally:
        for tool in tools:
            _remove(tool)


def _must(argv: list[str]) -> None:
    done = capture(argv, argv[0])
    if done.code != 0:
        raise ThrottleError(f"{' '.join(argv)}: {done.err.strip() or f'exit {done.code}'}")


def _remove(tool: str) -> None:
    base = [tool, "-w", "-t", "mangle"]
    while capture([*base, "-D", "FORWARD", "-j", DELAY_CHAIN], tool).code == 0:
        pass  # every jump, however many a crash left
    capture([*base, "-F", DELAY_CHAIN], tool)
    capture([*base, "-X", DELAY_CHAIN], tool)


def _queue_dropped(queue: int) -> int:
    from throttle.kernel.nfqueue import queue_losses

    return queue_losses(queue) or 0


def _realtime() -> bool:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(FIFO_PRIORITY))
    except (OSError, AttributeError) as exc:
        log.warning("running without SCHED_FIFO (%s): a busy machine may make releases late", exc)
        return False
    return True


def serve(delay: float, jitter: float, queue: int, pid_file: Path, status_file: Path, fifo: bool = True) -> None:
    """Bind the queue, install the rules, write the pid file (the ready signal), then release
    every packet at its time until SIGTERM or SIGINT."""
    import netfilterqueue

    held = max(0.0, delay - OVERHEAD)
    schedule: Schedule[netfilterqueue.Packet] = Schedule(held, min(jitter, 2 * held))
    stats = Stats(os.getpid(), fifo=_realtime() if fifo else False)
    stopping = False
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    signal.set_wakeup_fd(wake_w)
    clock = time.monotonic

    def on_packet(pkt: netfilterqueue.Packet) -> None:
        schedule.add(pkt.indev, clock(), pkt)

    nfq = netfilterqueue.NetfilterQueue()
    try:
        nfq.bind(queue, on_packet, max_len=QUEUE_MAXLEN, mode=netfilterqueue.COPY_META, sock_len=RCVBUF)
    except OSError as exc:
        raise ThrottleError(f"cannot bind netfilter queue {queue} ({exc}): is another delay stage running here?") from None
    sock = socket.fromfd(nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
    sock.setblocking(False)
    fd = sock.fileno()
    for level, option in ((socket.SOL_SOCKET, SO_RCVBUFFORCE), (SOL_NETLINK, NETLINK_NO_ENOBUFS)):
        try:
            sock.setsockopt(level, option, RCVBUF if option == SO_RCVBUFFORCE else 1)
        except OSError:
            pass
    tools = [require_tool("iptables", "iptables"), require_tool("ip6tables", "iptables")]
    next_status = 0.0
    try:
        with queue_rules(queue, tools):
            atomic_write(pid_file, f"{os.getpid()}\n".encode())
            log.info("delaying every forwarded packet by %.3f ms +- %.3f ms (queue %d, SCHED_FIFO %s)",
                     delay * 1e3, jitter * 5e2, queue, stats.fifo)
            while not stopping:
                now = clock()
                for n, (at, pkt) in enumerate(schedule.due(now), 1):
                    if n % READ_EVERY == 0:
                        nfq.run(block=False)  # arrivals stamped now, not once the burst is out
                    t0 = clock()
                    pkt.accept()
                    t1 = clock()
                    stats.verdict_us = stats.verdict_us * 0.99 + (t1 - t0) * 1e4
                    late = t1 - at
                    stats.delayed += 1
                    if late > LATE:
                        stats.late += 1
                    stats.max_late_ms = max(stats.max_late_ms, late * 1e3)
                if now >= next_status:
                    stats.holding = len(schedule)
                    stats.queue_dropped = _queue_dropped(queue)
                    atomic_write(status_file, json.dumps(asdict(stats)).encode())
                    next_status = now + STATUS_EVERY
                release = schedule.next_release()
                until = next_status if release is None else min(release, next_status)
                readable, _, _ = select.select([fd, wake_r], [], [], max(0.0, until - clock()))
                if fd in readable:
                    nfq.run(block=False)
                if wake_r in readable:
                    while True:
                        try:
                            if not os.read(wake_r, 64):
                                break
                        except BlockingIOError:
                            break
    finally:
        for pkt in schedule.drain():  # the rules are gone: nothing new comes; what we hold goes on
            pkt.accept()
        sock.close()
        nfq.unbind()
        pid_file.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m throttle.lab.delay", description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, required=True, help="seconds each packet is held (one way)")
    parser.add_argument("--jitter", type=float, default=0.0, help="seconds: the delay varies by +- half of it")
    parser.add_argument("--queue", type=int, default=DELAY_QUEUE)
    parser.add_argument("--pid-file", type=Path, required=True)
    parser.add_argument("--status-file", type=Path, required=True)
    parser.add_argument("--no-fifo", action="store_true", help="do not ask for SCHED_FIFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s delay: %(message)s")
    try:
        serve(args.delay, args.jitter, args.queue, args.pid_file, args.status_file, fifo=not args.no_fifo)
    except ThrottleError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
