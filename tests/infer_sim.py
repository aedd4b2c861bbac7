"""A small discrete-event simulator of TCP-like transfers through a limiter, producing the
`FlowTrace`s a capture at the sender or at the receiver would give, with known parameters: the
ground truth of tests/test_infer_fit.py.

The sender: segments of `mss` bytes, slow start, cwnd halved once per loss episode (a loss is a
segment with three SACKed segments above it), RTO with doubling back-off. The receiver ACKs every
packet with its cumulative ACK and up to three SACK blocks. The limiter sits on the path `toward`
of the one-way delay from the sender and is one of the engine's own buckets (throttle.engine.buckets)
or a stand-in with the same shape: `admit(size, now) -> release time or None (dropped)`. Several
flows may share one limiter (a shared policer, or a bottleneck with a competing flow).

Time is simulated; nothing sleeps. Every run is seeded.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass, field

from throttle.engine.buckets import Policer, Shaper, WindowMeter
from throttle.infer.trace import Ack, FlowTrace, Loss, Reset, Sent

HEADER = 52
Admit = Callable[[int, float, int], "float | None"]  # (wire bytes, now, flow) -> release time


def police(rate_bps: float, burst: int) -> Admit:
    bucket = Policer(rate_bps / 8, burst, 0.0)
    return lambda size, now, flow: now if bucket.allow(size, now) else None


def window(rate_bps: float, burst: int) -> Admit:
    meter = WindowMeter(rate_bps / 8, burst)
    return lambda size, now, flow: now if meter.allow(size, now) else None


def shape(rate_bps: float, max_delay: float = 1.0, burst: int = 3000) -> Admit:
    shaper = Shaper(rate_bps / 8, burst, 0.0, max_delay=max_delay)
    return lambda size, now, flow: shaper.release_time(size, now)


def random_loss(p: float, seed: int) -> Admit:
    rng = random.Random(seed)
    return lambda size, now, flow: None if rng.random() < p else now


def bottleneck(rate_bps: float, buffer_bytes: int) -> Admit:
    """A drop-tail FIFO queue draining at `rate_bps` (congestion when flows share it)."""
    shaper = Shaper(rate_bps / 8, 1600, 0.0, max_bytes=buffer_bytes)
    return lambda size, now, flow: shaper.release_time(size, now)


def freeze(after_bytes: int) -> Admit:
    passed: dict[int, int] = {}

    def admit(size: int, now: float, flow: int) -> float | None:
        if passed.get(flow, 0) >= after_bytes:
            return None
        passed[flow] = passed.get(flow, 0) + size - HEADER
        return now
    return admit


def unlimited(size: int, now: float, flow: int) -> float | None:
    return now


@dataclass
class Flow:
    size: int  # payload bytes
    start: float = 0.0
    rtt: float = 0.05
    mss: int = 1448
    line_bps: float = 100e6  # the sender's access link
    toward: float = 0.5  # where the limiter sits: fraction of the forward one-way delay before it
    rst_after: int | None = None  # a RST injected once this many payload bytes passed the limiter
    max_window: int = 1 << 30  # segments in flight at most (the receiver's window)
    # --- state
    nsegs: int = 0
    cwnd: float = 10.0
    ssthresh: float = 1e9
    una: int = 0
    nxt: int = 0
    sacked: set[int] = field(default_factory=set)
    outstanding: dict[int, float] = field(default_factory=dict)  # seg -> send time
    ever_sent: set[int] = field(default_factory=set)
    resent: set[int] = field(default_factory=set)
    queue: list[int] = field(default_factory=list)  # segments to retransmit
    recover: int = -1  # in recovery until una reaches this
    rack: float = -1.0  # send time of the latest-sent segment known delivered (RACK)
    srtt: float | None = None
    rttvar: float = 0.0
    backoff: int = 0
    timer: int = 0
    link_free: float = 0.0
    received: set[int] = field(default_factory=set)
    rcv_high: int = 0  # receiver: one past the highest segment seen
    done: bool = False
    reset_at: float | None = None
    passed_bytes: int = 0
    # --- what the two captures see
    snd_sent: list[Sent] = field(default_factory=list)
    dropped: list[Loss] = field(default_factory=list)  # ground truth: copies the limiter dropped
    snd_acks: list[Ack] = field(default_factory=list)
    rtts: list[tuple[float, float]] = field(default_factory=list)
    rcv_sent: list[Sent] = field(default_factory=list)
    rcv_holes: list[Loss] = field(default_factory=list)
    rcv_acks: list[Ack] = field(default_factory=list)

    def seg(self, k: int) -> tuple[int, int]:
        start = k * self.mss
        return start, min(self.mss, self.size - start)


class Sim:
    def __init__(self, flows: list[Flow], admit: Admit, *, until: float = 300.0) -> None:
        self.flows = flows
        self.admit = admit
        self.until = until
        self.events: list[tuple[float, int, str, int, Any]] = []
        self.counter = 0

    def at(self, t: float, kind: str, flow: int, arg: Any) -> None:
        self.counter += 1
        heapq.heappush(self.events, (t, self.counter, kind, flow, arg))

    def run(self) -> Sim:
        for i, f in enumerate(self.flows):
            f.nsegs = (f.size + f.mss - 1) // f.mss
            f.link_free = f.start
            self.at(f.start, "send", i, 0)
        while self.events:
            t, _, kind, i, arg = heapq.heappop(self.events)
            if t > self.until:
                break
            f = self.flows[i]
            if f.done:
                continue
            if kind == "send":
                self.pump(f, i, t)
            elif kind == "limiter":
                self.at_limiter(f, i, t, arg)
            elif kind == "arrive":
                self.arrive(f, i, t, arg)
            elif kind == "ack":
                self.on_ack(f, i, t, *arg)
            elif kind == "rto" and arg == f.timer:
                self.on_rto(f, i, t)
        return self

    def rto(self, f: Flow) -> float:
        base = 1.0 if f.srtt is None else f.srtt + max(4 * f.rttvar, 0.2)
        return min(60.0, base * 2 ** f.backoff)

    def arm(self, f: Flow, i: int, t: float) -> None:
        f.timer += 1
        if f.outstanding or f.queue:
            self.at(t + self.rto(f), "rto", i, f.timer)

    def pump(self, f: Flow, i: int, t: float) -> None:
        idle = not f.outstanding
        while len(f.outstanding) < min(int(f.cwnd), f.max_window):
            if f.queue:
                k = f.queue.pop(0)
                if k < f.una or k in f.sacked or k in f.outstanding:
                    continue
            elif f.nxt < f.nsegs:
                k = f.nxt
                f.nxt += 1
            else:
                break
            start, length = f.seg(k)
            wire = length + HEADER
            depart = max(t, f.link_free)
            f.link_free = depart + wire * 8 / f.line_bps
            seen = k in f.ever_sent
            f.ever_sent.add(k)
            if seen:
                f.resent.add(k)
            f.snd_sent.append(Sent(depart, start, length, wire, seen))
            f.outstanding[k] = depart
            self.at(depart + f.toward * f.rtt / 2, "limiter", i, (k, depart))
        if idle and f.outstanding:
            self.arm(f, i, t)

    def at_limiter(self, f: Flow, i: int, t: float, arg: tuple[int, float]) -> None:
        k, sent_at = arg
        start, length = f.seg(k)
        if f.rst_after is not None and f.passed_bytes >= f.rst_after:
            f.reset_at = t + (1 - f.toward) * f.rtt / 2
            f.done = True
            return
        release = self.admit(length + HEADER, t, i)
        if release is None:
            f.dropped.append(Loss(sent_at, start, length, length + HEADER))
            return
        f.passed_bytes += length
        self.at(release + (1 - f.toward) * f.rtt / 2, "arrive", i, k)

    def arrive(self, f: Flow, i: int, t: float, k: int) -> None:
        start, length = f.seg(k)
        dup = k in f.received
        if k > f.rcv_high:
            hole = k - f.rcv_high
            f.rcv_holes.append(Loss(t, f.rcv_high * f.mss, hole * f.mss, hole * (f.mss + HEADER)))
        f.rcv_high = max(f.rcv_high, k + 1)
        f.received.add(k)
        f.rcv_sent.append(Sent(t, start, length, length + HEADER, dup))
        cum = f.una if f.una in f.received else 0
        while cum in f.received:
            cum += 1
        # SACK blocks (RFC 2018): the run holding the segment just arrived first, then the others
        runs: list[tuple[int, int]] = []
        j = cum
        while j < f.rcv_high:
            while j < f.rcv_high and j not in f.received:
                j += 1
            s = j
            while j < f.rcv_high and j in f.received:
                j += 1
            if j > s:
                runs.append((s, j))
        blocks = sorted(runs, key=lambda r: (not r[0] <= k < r[1], -r[0]))[:3]
        ack = Ack(t, min(cum * f.mss, f.size), tuple((s * f.mss, min(e * f.mss, f.size)) for s, e in blocks))
        f.rcv_acks.append(ack)
        self.at(t + f.rtt / 2, "ack", i, (cum, blocks, ack))

    def on_ack(self, f: Flow, i: int, t: float, cum: int, blocks: list[tuple[int, int]], ack: Ack) -> None:
        newly = 0
        f.snd_acks.append(Ack(t, ack.acked, ack.sack))
        if cum > f.una:
            for k in range(f.una, cum):
                sent = f.outstanding.pop(k, None)
                if sent is not None:
                    newly += 1
                    f.rack = max(f.rack, sent)
                    if k not in f.resent:
                        self.sample(f, t - sent)
                        f.rtts.append((t, t - sent))
                f.sacked.discard(k)
            f.una = cum
            f.backoff = 0
            self.arm(f, i, t)
        for s, e in blocks:
            for k in range(s, e):
                if k not in f.sacked:
                    f.sacked.add(k)
                    sent = f.outstanding.pop(k, None)
                    if sent is not None:
                        newly += 1
                        f.rack = max(f.rack, sent)
        if f.una >= f.nsegs:
            f.done = True
            return
        # a loss (RACK, no reordering on this path): outstanding, and sent before a delivered segment
        lost = sorted(k for k, sent in f.outstanding.items() if sent < f.rack)
        for k in lost:
            del f.outstanding[k]
            f.queue.append(k)
        if lost and f.una >= f.recover:
            f.ssthresh = max(f.cwnd / 2, 2.0)
            f.cwnd = f.ssthresh
            f.recover = f.nxt
        elif not lost and newly and f.una >= f.recover:
            f.cwnd += newly if f.cwnd < f.ssthresh else newly / f.cwnd
        self.pump(f, i, t)

    def sample(self, f: Flow, r: float) -> None:
        if f.srtt is None:
            f.srtt, f.rttvar = r, r / 2
        else:
            f.rttvar = 0.75 * f.rttvar + 0.25 * abs(f.srtt - r)
            f.srtt = 0.875 * f.srtt + 0.125 * r

    def on_rto(self, f: Flow, i: int, t: float) -> None:
        f.ssthresh = max(f.cwnd / 2, 2.0)
        f.cwnd = 1.0
        f.queue = [k for k in range(f.una, f.nxt) if k not in f.sacked]
        f.outstanding.clear()
        f.backoff += 1
        f.recover = -1  # slow start again from one segment
        self.pump(f, i, t)


def trace(f: Flow, vantage: str, *, index: int = 0, direction: str = "download") -> FlowTrace:
    """What a capture at `vantage` ("sender" or "receiver") would say about flow `f`."""
    client = f"10.0.0.{index + 2}:{40000 + index}"
    tr = FlowTrace(client=client, server="10.0.1.2:443", transport="tcp",
                   direction=direction, vantage=vantage)  # type: ignore[arg-type]
    tr.first = f.start - f.rtt
    tr.hello_at = f.start - f.rtt
    tr.handshake = f.rtt
    tr.base_rtt = f.rtt
    tr.mss = f.mss
    tr.header_bytes = HEADER
    tr.fin = f.done and f.reset_at is None
    if vantage == "sender":
        tr.sent = list(f.snd_sent)
        # a loss as the reader sees it: a copy whose bytes are sent again later
        last_copy: dict[int, int] = {}
        for n, s in enumerate(tr.sent):
            last_copy[s.start] = n
        tr.losses = [Loss(s.t, s.start, s.length, s.wire) for n, s in enumerate(tr.sent) if last_copy[s.start] != n]
        tr.acks = list(f.snd_acks)
        tr.rtt = list(f.rtts)
        tr.base_rtt = min((r for _, r in f.rtts), default=f.rtt)
        tr.delivered = max((a.acked for a in f.snd_acks), default=0)
    else:
        tr.sent = list(f.rcv_sent)
        tr.losses = list(f.rcv_holes)
        tr.acks = list(f.rcv_acks)
        tr.delivered = f.rcv_high * f.mss if f.rcv_high < f.nsegs else f.size
    tr.payload = min(f.size, max((s.start + s.length for s in tr.sent), default=0))
    tr.last = max((s.t for s in tr.sent), default=tr.first)
    if f.reset_at is not None:
        tr.resets = [Reset(f.reset_at, False, ttl=61, ip_id=4242, usual_ttl=52, usual_ip_id=0,
                           after_bytes=tr.delivered)]
        tr.last = max(tr.last, f.reset_at)
    return tr


def run(admit: Admit, flows: list[Flow], vantage: str) -> list[FlowTrace]:
    """Run `flows` through one limiter; their traces as seen at `vantage`."""
    Sim(flows, admit).run()
    return [trace(f, vantage, index=n) for n, f in enumerate(flows)]


def handshake_trace(kind: str, *, rtt: float = 0.05, crawl: float = 5.6) -> FlowTrace:
    """A connection whose hello was blackholed ("timeout"), crawled ("crawl") or went fine ("ok")."""
    tr = FlowTrace(client="10.0.0.2:40000", server="10.0.1.2:443", transport="tcp",
                   direction="upload", vantage="sender")
    tr.hello_at, tr.base_rtt = rtt, rtt
    tr.mss = 517
    if kind == "timeout":
        t, rto = rtt, 1.0
        for n in range(5):
            tr.sent.append(Sent(t, 0, 517, 569, n > 0))
            if n < 4:
                tr.losses.append(Loss(t, 0, 517, 569))
            t += rto
            rto *= 2
        tr.handshake = None
    else:
        tr.sent.append(Sent(rtt, 0, 517, 569, False))
        tr.handshake = crawl if kind == "crawl" else rtt
        tr.delivered = 517
        tr.fin = True
    tr.payload = 517
    tr.last = tr.sent[-1].t
    return tr


@dataclass(frozen=True)
class Case:
    """One simulated capture with its ground truth."""

    truth: str  # the mechanism the limiter is (random loss and congestion: "none")
    kind: str  # police, window, shape, random, congestion, shared, freeze, reset, unlimited
    vantage: str
    rtt: float
    size: int
    rate_bps: float = 0.0
    burst: int = 0
    extra: float = 0.0  # random: the loss probability; freeze/reset: after bytes

    @property
    def name(self) -> str:
        return (f"{self.kind}-{self.vantage}-{self.rtt * 1000:.0f}ms-{self.size // 1000}KB"
                + (f"-{self.rate_bps / 1000:.0f}k-{self.burst // 1000}KB" if self.rate_bps else "")
                + (f"-{self.extra:g}" if self.extra else ""))

    def traces(self, seed: int = 1) -> list[FlowTrace]:
        """The traces the capture holds; the flow the case is about first."""
        one = [Flow(self.size, rtt=self.rtt)]
        if self.kind == "police":
            return run(police(self.rate_bps, self.burst), one, self.vantage)
        if self.kind == "window":
            return run(window(self.rate_bps, self.burst), one, self.vantage)
        if self.kind == "shape":
            return run(shape(self.rate_bps), one, self.vantage)
        if self.kind == "random":
            return run(random_loss(self.extra, seed), one, self.vantage)
        if self.kind == "freeze":
            return run(freeze(int(self.extra)), one, self.vantage)
        if self.kind == "reset":
            return run(unlimited, [Flow(self.size, rtt=self.rtt, rst_after=int(self.extra))], self.vantage)
        if self.kind == "unlimited":
            return run(unlimited, one, self.vantage)
        two = [Flow(self.size, rtt=self.rtt), Flow(self.size * 2, rtt=self.rtt, start=0.2)]
        if self.kind == "shared":  # a second flow of the same client through the same policer
            traces = run(police(self.rate_bps, self.burst), two, self.vantage)
            traces[1].client = "10.0.0.2:40001"
            return traces
        if self.kind == "congestion":  # a competing flow of another client through a drop-tail queue
            traces = run(bottleneck(self.rate_bps, self.burst), two, self.vantage)
            traces[1].client = "10.0.9.2:40009"
            return traces
        raise ValueError(self.kind)


def grid(full: bool = False) -> list[Case]:
    """The simulated grid: police over rates, bursts and RTTs, and every other mechanism; `full`
    adds the slow corners (8 MB transfers, 20 Mbit/s)."""
    cases: list[Case] = []
    vantages = ("sender", "receiver")
    rtts = (0.01, 0.05, 0.15)
    police_grid = [(64e3, 2_000, 256_000), (500e3, 8_000, 512_000), (1.5e6, 100_000, 2_000_000),
                   (5e6, 500_000, 4_000_000)]
    if full:
        police_grid += [(128e3, 16_000, 512_000), (10e6, 50_000, 4_000_000), (20e6, 2_000_000, 8_000_000)]
    for v in vantages:
        for rtt in rtts:
            for rate, burst, size in police_grid:
                cases.append(Case("police", "police", v, rtt, size, rate, burst))
            cases.append(Case("police", "shared", v, rtt, 1_000_000, 1.5e6, 100_000))
            cases.append(Case("window", "window", v, rtt, 400_000, 130e3, 16_000))
            cases.append(Case("shape", "shape", v, rtt, 1_000_000, 1e6))
            for p in (0.01, 0.02):
                cases.append(Case("none", "random", v, rtt, 2_000_000, extra=p))
            cases.append(Case("none", "congestion", v, rtt, 2_000_000, 10e6, 100_000))
            cases.append(Case("none", "unlimited", v, rtt, 1_000_000))
            cases.append(Case("freeze", "freeze", v, rtt, 400_000, extra=16_000))
            cases.append(Case("reset", "reset", v, rtt, 400_000, extra=30_000))
    return cases


def report(cases: list[Case]) -> str:
    """The confusion matrix of mechanisms and the rate and burst errors of police, over `cases`."""
    from throttle.infer.fit import infer
    from throttle.infer.trace import MECHANISMS

    matrix: dict[tuple[str, str], int] = {}
    rate_err: list[float] = []
    burst_err: list[float] = []
    lines = []
    for case in cases:
        inf = infer(case.traces())[0]
        matrix[case.truth, inf.mechanism] = matrix.get((case.truth, inf.mechanism), 0) + 1
        detail = ""
        if case.truth in ("police", "window") and inf.rate_bps is not None:
            rate_err.append(abs(inf.rate_bps.value / case.rate_bps - 1))
            detail = f" rate {inf.rate_bps.value / case.rate_bps - 1:+.1%}"
            if inf.burst_bytes is not None and case.truth == "police":
                burst_err.append(abs(inf.burst_bytes.value / case.burst - 1))
                detail += f" burst {inf.burst_bytes.value / case.burst - 1:+.1%}"
        lines.append(f"{case.name:45s} -> {inf.mechanism:7s} {inf.confidence:.2f}{detail}")
    seen = [m for m in MECHANISMS if any(k[0] == m or k[1] == m for k in matrix)]
    lines.append("")
    lines.append("truth \\ inferred " + " ".join(f"{m:>7s}" for m in seen))
    for truth in seen:
        lines.append(f"{truth:16s} " + " ".join(f"{matrix.get((truth, m), 0):7d}" for m in seen))
    tp = matrix.get(("police", "police"), 0)
    called = sum(v for (t, m), v in matrix.items() if m == "police")
    real = sum(v for (t, m), v in matrix.items() if t == "police")
    lines.append(f"police precision {tp / max(called, 1):.3f} recall {tp / max(real, 1):.3f}")
    for label, errs in (("rate", rate_err), ("burst", burst_err)):
        if errs:
            errs.sort()
            lines.append(f"{label} error (police/window found): median {errs[len(errs) // 2]:.1%} "
                         f"p90 {errs[int(0.9 * (len(errs) - 1))]:.1%} over {len(errs)}")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(report(grid(full="--full" in sys.argv)))
