"""What a trace says before any bucket is fitted: its packets as the limiter saw them (passed or
lost, at either vantage), whether round trips grew before the losses (a queue), whether the flow
stopped for good (a freeze), and, where losses cannot be seen, the delivered rate's shape.

Pure helpers of `throttle.infer.fit`; no I/O.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from throttle.infer.fit_bucket import PacketSeq, deficits
from throttle.infer.trace import FlowTrace, Loss, Sent, Vantage


MAX_HOLE = 1024  # packets one hole may stand for
UNQUEUED_SAMPLES = 20  # round trips after the first loss that can show no queue stood
MAX_PACKETS = 60_000  # packets fitted per flow: the first ones (a limiter's pattern repeats; the
# fits replay the sequence a few hundred times, so this bounds a long capture's time)


def vantage(tr: FlowTrace) -> Vantage:
    """The trace's vantage, or the one its losses imply: a sender-side loss is a copy it also sent."""
    if tr.vantage != "unknown":
        return tr.vantage
    sent = {(s.start, round(s.t, 6)) for s in tr.sent}
    if tr.losses and all((lo.start, round(lo.t, 6)) in sent for lo in tr.losses):
        return "sender"
    return "receiver"


def _really_lost(tr: FlowTrace) -> list[Loss]:
    """The sender side's losses without the spurious ones. A copy was not lost when the receiver
    reported the bytes twice (a D-SACK block, RFC 2883: below the cumulative ACK or inside another
    block), or when an ACK covering it came back sooner after its resending than a round trip
    allows (so the first copy arrived). Two matched captures' losses are exact already."""
    if not tr.acks or tr.matched:
        return list(tr.losses)
    # Each D-SACK clears one loss: of the copies of those bytes sent before it, the last one
    # read as lost arrived (the copy after it was the duplicate).
    by_start: dict[int, list[int]] = {}
    for n, lo in enumerate(tr.losses):
        by_start.setdefault(lo.start, []).append(n)
    starts = sorted(by_start)
    cleared: set[int] = set()
    for a in tr.acks:
        if not a.sack:
            continue
        low, high = a.sack[0]
        if high <= a.acked or any(s <= low and high <= e for s, e in a.sack[1:]):
            for start in starts[bisect.bisect_left(starts, low):bisect.bisect_left(starts, high)]:
                before = [n for n in by_start[start] if tr.losses[n].t < a.t and n not in cleared]
                if before:
                    cleared.add(max(before, key=lambda n: tr.losses[n].t))
    ack_t = [a.t for a in tr.acks]
    resent: dict[int, list[float]] = {}
    for s in tr.sent:
        if s.retransmission:
            resent.setdefault(s.start, []).append(s.t)
    out = []
    for n, lo in enumerate(tr.losses):
        end = lo.start + lo.length
        if n in cleared:
            continue
        again = next((t for t in resent.get(lo.start, []) if t > lo.t), None)
        if again is not None and tr.base_rtt:
            first = bisect.bisect_left(ack_t, lo.t)
            last = bisect.bisect_left(ack_t, again + 0.8 * tr.base_rtt)
            if any(a.acked >= end or any(s <= lo.start and end <= e for s, e in a.sack)
                   for a in tr.acks[first:last]):
                continue
        out.append(lo)
    return out


def _line_spacing(tr: FlowTrace) -> float:
    """Seconds between back-to-back full packets at the receiver (the path's line rate): the
    5th percentile of the arrival gaps."""
    times = sorted(s.t for s in tr.sent)
    gaps = sorted(b - a for a, b in zip(times, times[1:]) if b > a)
    if not gaps:
        return 1e-4
    return gaps[len(gaps) // 20]


def peak_rate(tr: FlowTrace) -> float:
    """Bytes/s of back-to-back packets as this capture saw them: at the receiver, the rate of the
    slowest link or queue drain on the path."""
    return (tr.mss + tr.header_bytes) / max(_line_spacing(tr), 1e-9)


def _pieces(tr: FlowTrace, s: Sent) -> list[tuple[int, int]]:
    """(first byte, IP bytes) of the packets a captured segment was on the wire: one, unless the
    capture saw a segmentation-offload super-segment (GSO/TSO at the sender, GRO at the receiver),
    which the limiter saw as MSS-sized packets."""
    seg = tr.mss if 0 < tr.mss <= 9000 else 1448
    if s.length <= seg:
        return [(s.start, s.wire)]
    header = max(0, s.wire - s.length)
    return [(s.start + k, min(seg, s.length - k) + header) for k in range(0, s.length, seg)]


def packets(tr: FlowTrace) -> PacketSeq:
    """The packets that reached the limiter, in time order, with whether each passed."""
    rows: list[tuple[float, int, int, bool]] = []
    if vantage(tr) == "sender":
        lost: dict[float, list[tuple[int, int]]] = {}
        for lo in _really_lost(tr):
            lost.setdefault(round(lo.t, 6), []).append((lo.start, lo.start + max(lo.length, 1)))
        for s in tr.sent:
            ranges = lost.get(round(s.t, 6), [])
            for start, wire in _pieces(tr, s):
                gone = any(a <= start < b for a, b in ranges)
                rows.append((s.t, 1, wire, not gone))
    else:
        per_packet = tr.mss + tr.header_bytes
        arrivals = sorted(s.t for s in tr.sent)
        spacing = _line_spacing(tr)
        ends: dict[int, float] = {}  # the first arrival of the packet ending at each byte
        for s in tr.sent:
            for _, wire in _pieces(tr, s):
                rows.append((s.t, 1, wire, True))
            ends.setdefault(s.start + s.length, s.t)
        for lo in tr.losses:
            # A hole shows when the packet beyond it arrives. Its packets were sent right after the
            # packet just below it, and the bucket was short for the first of them, so it was short
            # just after that packet passed too: they go there, at the line's packet spacing.
            prev = ends.get(lo.start)
            if prev is None or prev > lo.t:
                before = bisect.bisect_left(arrivals, lo.t) - 1
                prev = arrivals[before] if before >= 0 else lo.t - 1e-3
            # (a hole bigger than a window's worth is the capture's gap, not the limiter's drops)
            count = min(MAX_HOLE, max(1, round(lo.wire / per_packet)))
            for k in range(count):
                rows.append((min(prev + (k + 1) * spacing, lo.t), 0, max(1, lo.wire // count), False))
    rows.sort(key=lambda r: (r[0], r[1]))
    del rows[MAX_PACKETS:]
    return PacketSeq([r[0] for r in rows], [r[2] for r in rows], [r[3] for r in rows])


@dataclass(frozen=True, slots=True)
class Queueing:
    inflated_before_losses: float  # fraction of loss episodes with an inflated round trip just before
    delay: float  # seconds: the 90th percentile round trip over the base
    delay_error: float
    steady: bool  # the delivered rate held while the queue was there
    rate: float  # bytes/s delivered over the flow's later part
    standing: float = 0.0  # seconds: the 10th percentile round trip over the base (a queue that never drained)


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _later_bins(seq: PacketSeq, window: float, least_packets: int, least_bins: int) -> list[float] | None:
    """The passed bytes in each window of `window` seconds over the later 60% of the flow (None
    with fewer passes or windows than asked)."""
    times = [t for t, ok in zip(seq.t, seq.passed) if ok]
    if len(times) < least_packets:
        return None
    start = times[0] + 0.4 * (times[-1] - times[0])
    count = int((times[-1] - start) / window)
    if count < least_bins:
        return None
    bins = [0.0] * count
    for t, w, ok in zip(seq.t, seq.wire, seq.passed):
        k = math.floor((t - start) / window)
        if ok and 0 <= k < count:
            bins[k] += w
    return bins


def steady_rate(seq: PacketSeq, window: float) -> tuple[float, float] | None:
    """Passed bytes/s over the later 60% of the flow, and its coefficient of variation across
    windows of `window` seconds (None when the span is too short for three windows)."""
    bins = _later_bins(seq, window, 10, 3)
    if bins is None:
        return None
    count = len(bins)
    mean = sum(bins) / count
    if mean <= 0:
        return None
    cv = math.sqrt(sum((b - mean) ** 2 for b in bins) / count) / mean
    return mean / window, cv


def delivery_rate(tr: FlowTrace, above: float) -> tuple[float, float] | None:
    """The bytes acknowledged over each round-trip sample longer than `above`, per second: the
    rate a queue drained this flow at. Returns its median and relative spread; a queue this flow
    has to itself (a shaper) drains it at one rate, a shared one at a varying share."""
    times = [a.t for a in tr.acks]
    acked: list[int] = []
    top = 0
    for a in tr.acks:
        top = max(top, a.acked)
        acked.append(top)

    def at(t: float) -> int:
        k = bisect.bisect_right(times, t) - 1
        return acked[k] if k >= 0 else 0

    rates = sorted((at(t) - at(t - rtt)) / rtt for t, rtt in tr.rtt if rtt > above)
    if len(rates) < 10 or rates[len(rates) // 2] <= 0:
        return None
    mid = rates[len(rates) // 2]
    spread = (rates[int(0.75 * len(rates))] - rates[int(0.25 * len(rates))]) / 1.35
    return mid, spread / mid


def queueing(tr: FlowTrace, seq: PacketSeq) -> Queueing | None:
    """Round-trip inflation (a queue) and whether the rate held; None without round-trip samples.
    A TCP receiver's samples (an ACK to the data that echoes its timestamp) also hold the sender's
    waits for its retransmission timer, which grow with every loss: no evidence of a queue where
    there were losses."""
    samples = sorted(tr.rtt)
    before: float | None = None  # judge only what came before this (the first loss)
    if vantage(tr) == "receiver" and not tr.matched and tr.transport == "tcp" and tr.losses:
        # (QUIC's samples are its spin bit's, taken alike at either end): a TCP receiver's
        # samples are clean until the first loss, and only the first episode is judged by them
        before = min(t for t, ok in zip(seq.t, seq.passed) if not ok)
        samples = [x for x in samples if x[0] <= before]
    if len(samples) < 5:
        return None
    values = [r for _, r in samples]
    base = min(_quantile(values, 0.1), tr.base_rtt or math.inf)
    # inflated: by 20 ms, or 4 times the path's own spread (its shortest round trips'), but by 30%
    # of the base at most and 5 ms at least (a queue of 45 ms at 150 ms is congestion, and the 30%
    # alone would hide it; a queue that stands makes the spread no measure of the path's)
    noise = _quantile(values, 0.1) - min(values)
    limit = base + max(0.005, min(0.3 * base, max(0.02, 4 * noise)))
    queued = base + max(0.3 * base, 0.005)  # a sample that waited in a queue, for the rate it drained at
    episodes: list[float] = []
    for t, ok in zip(seq.t, seq.passed):
        if not ok and (not episodes or t - episodes[-1] > max(base, 0.01)):
            episodes.append(t)
    if before is not None:
        episodes = episodes[:1]
    inflated = 0
    k = 0
    latest: float | None = None
    for t in episodes:
        while k < len(samples) and samples[k][0] <= t:
            latest = samples[k][1]
            k += 1
        if latest is not None and latest > limit:
            inflated += 1
    delay = max(0.0, _quantile(values, 0.9) - base)
    held = (delivery_rate(tr, queued) if vantage(tr) == "sender" and tr.acks
            else steady_rate(seq, max(0.5, 4 * base)))
    rate, cv = held if held is not None else (0.0, 1.0)
    return Queueing(inflated / len(episodes) if episodes else 0.0, delay,
                    max(0.001, _quantile(values, 0.97) - _quantile(values, 0.75)), cv < 0.15, rate,
                    max(0.0, _quantile(values, 0.1) - (tr.base_rtt or base)))


def unqueued_through_losses(tr: FlowTrace, seq: PacketSeq) -> bool:
    """Round trips measured after the first loss that stayed, for the most part, at the base: no
    queue stood while packets were lost, so no queue's end dropped them (a queue drops only when
    full, and a full queue delays every packet by its length). A TCP receiver's samples also hold
    the sender's waits for its retransmission timer (`queueing`), but those only ever lengthen
    them: a median at the base is evidence all the same."""
    lost = [t for t, ok in zip(seq.t, seq.passed) if not ok]
    if not lost or tr.base_rtt is None:
        return False
    after = [r for t, r in tr.rtt if t > lost[0]]
    if len(after) < UNQUEUED_SAMPLES:
        return False
    return _quantile(after, 0.5) <= tr.base_rtt + max(0.005, 0.1 * tr.base_rtt)


def stalled(tr: FlowTrace, seq: PacketSeq) -> tuple[int, float, str] | None:
    """A freeze: nothing passed once the first loss came, and the flow never closed. Returns the
    bytes carried before it, a confidence and the reason."""
    if tr.fin or tr.resets or not seq.t:
        return None
    if vantage(tr) == "sender":
        first = min(tr.losses, default=None)
        if first is None or tr.delivered > first.start + tr.mss:
            return None
        tries = [s for s in tr.sent if s.t >= first.t]
        waited = tr.last - first.t
        sure = 0.85 if len(tries) >= 3 and waited >= 1.0 else 0.5
        return (tr.delivered, sure, f"nothing delivered after {tr.delivered} bytes: {len(tries)} transmissions "
                f"over {waited:.1f} s went unacknowledged and the flow never closed")
    if tr.transport != "tcp" or not 0 < tr.delivered < 1_000_000:
        return None
    if seq.losses == 0:
        return (tr.delivered, 0.45, f"nothing arrived after {tr.delivered} bytes and the flow never closed "
                "(receiver side: the sender's retries are out of sight)")
    cut = seq.passed.index(False)
    if sum(seq.passed[cut:]) <= 1:  # losses at the end only: the sender went on, nothing came through
        return (tr.delivered, 0.7, f"nothing arrived after {tr.delivered} bytes though the sender went on "
                f"({seq.losses} packets missing at the end) and the flow never closed")
    return None


def plateau(seq: PacketSeq) -> tuple[float, float] | None:
    """(rate bytes/s, burst bytes) when the delivered rate holds after an initial burst."""
    duration = seq.t[-1] - seq.t[0]
    if len(seq.t) < 20 or duration < 1.0:
        return None
    held = steady_rate(seq, duration / 10)
    if held is None or held[1] > 0.2:
        return None
    rate = held[0]
    return rate, max(deficits(seq, rate))


def swing(seq: PacketSeq, window: float) -> float | None:
    """How far the passed rate rises above its median over the later 60% of the flow: the 90th
    percentile of the bytes in windows of `window` seconds over their median. A policer's ceiling
    keeps it near 1; a congestion controller's sawtooth after random losses does not (QUIC in the
    lab at 4 round trips: policers 1.07-1.21, random loss of 2% 1.35)."""
    bins = _later_bins(seq, window, 20, 5)
    if bins is None:
        return None
    median = _quantile(bins, 0.5)
    return _quantile(bins, 0.9) / median if median > 0 else None


def burst_starts(seq: PacketSeq, min_period: float = 0.0) -> tuple[float, float] | None:
    """(period, bytes per burst) when arrivals come in bursts of one size, each inside one interval
    of a fixed period counted from the first packet, with an interval boundary in every gap
    between them: a window meter seen where its losses are not (the sender's retries start each
    burst whenever its timer fires, so the bursts are not a whole number of periods apart)."""
    times = seq.t
    if len(times) < 20:
        return None
    gaps = [b - a for a, b in zip(times, times[1:])]
    limit = max(5 * _quantile(gaps, 0.5), 0.05, min_period)
    starts = [0] + [n + 1 for n, g in enumerate(gaps) if g > limit]
    if len(starts) < 5:
        return None
    sizes = [sum(seq.wire[a:b]) for a, b in zip(starts, starts[1:] + [len(times)])]
    budget = _quantile(sizes, 0.5)
    if sum(1 for x in sizes if abs(x - budget) <= 0.2 * budget) < 0.6 * len(sizes):
        return None  # flights that grow (slow start), not a fixed budget
    t0 = times[0]
    spans = [(times[a] - t0, times[b - 1] - t0) for a, b in zip(starts, starts[1:] + [len(times)])]
    between = [(spans[i][1], spans[i + 1][0]) for i in range(len(spans) - 1)]
    last_a, last_b = between[-1]
    for k in range(1, 5001):
        period = (last_a + last_b) / 2 / k
        if period <= max(min_period, 0.02):
            return None
        boundary = sum(1 for a, b in between if math.floor(b / period) > math.floor(a / period))
        inside = sum(1 for a, b in spans if math.floor(b / period) == math.floor(a / period))
        if boundary >= 0.9 * len(between) and inside >= 0.9 * len(spans):
            return period, budget
    return None
