"""Fitting a token bucket (police) and a window meter (window) to a passed/lost packet sequence.

The sequence (`Packets`) is what reached the limiter, in its order: each packet's time, its IP
bytes (`wire`, headers included: the rate is the IP layer's) and whether it passed. A capture at the
sender sees every packet and a loss as a copy sent again later; one at the receiver sees the passes
exactly and a loss as a hole, placed just before the packet that revealed it. Either way the times
are the limiter's shifted by a constant one-way delay, which neither model minds.

Police: for a candidate rate r, the bucket's deficit D (bytes below full) follows from the passes
alone — D = max(0, D - r dt), then D += wire for a pass — so a packet passes iff D + wire <= burst.
The burst is therefore the threshold that best separates the passes' D + wire from the losses'; the
rate is the candidate where that separation is best (balanced accuracy over passes and losses). The
same replay of the same threshold over a window meter's per-interval count fits a window.

Nothing here does I/O; `PacketSeq` is built by `throttle.infer.fit` from one trace or several
(flows that share one bucket are fitted together, their packets merged in time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class PacketSeq:
    t: list[float]
    wire: list[int]
    passed: list[bool]

    @property
    def losses(self) -> int:
        return len(self.passed) - sum(self.passed)


@dataclass(frozen=True, slots=True)
class Split:
    """The best threshold between passes (at or below) and losses (above)."""

    score: float  # balanced accuracy: mean of the pass and loss agreement fractions
    threshold: float  # bytes
    gap: float  # bytes between the highest agreeing pass and the lowest agreeing loss


@dataclass(frozen=True, slots=True)
class BucketFit:
    rate: float  # bytes per second (IP layer)
    rate_error: float
    burst: float  # bytes
    burst_error: float
    score: float  # balanced accuracy of the passes/losses the fitted bucket replays
    null: float  # the same fit on losses scattered at random over the same packets
    # the rates that replay as well (bytes/s): wide when the sender only ever met a full bucket
    # (it idled longer than a refill between bursts), so the trace bounds the rate from below only
    low: float = 0.0
    high: float = 0.0


@dataclass(frozen=True, slots=True)
class WindowFit:
    period: float  # seconds
    period_error: float
    burst: float  # bytes per period
    burst_error: float
    duty: float  # fraction of a period in which packets passed
    score: float
    null: float

    @property
    def rate(self) -> float:
        return self.burst / self.period


def split(levels: list[float], passed: list[bool]) -> Split:
    """The threshold on `levels` that best predicts `passed` (pass iff level <= threshold)."""
    n_pass = sum(passed)
    n_loss = len(passed) - n_pass
    if n_pass == 0 or n_loss == 0:
        return Split(0.5, max(levels, default=0.0), 0.0)
    order = sorted(range(len(levels)), key=levels.__getitem__)
    best = Split(0.5, levels[order[-1]], 0.0)
    below_pass = below_loss = 0
    for n, i in enumerate(order):
        if passed[i]:
            below_pass += 1
        else:
            below_loss += 1
        nxt = levels[order[n + 1]] if n + 1 < len(order) else math.inf
        if nxt == levels[i]:
            continue  # a threshold cannot fall between equal levels
        score = (below_pass / n_pass + (n_loss - below_loss) / n_loss) / 2
        if score > best.score:
            gap = (nxt - levels[i]) if nxt < math.inf else 0.0
            best = Split(score, levels[i], gap)
    return best


def deficits(seq: PacketSeq, rate: float) -> list[float]:
    """Each packet's D + wire under a bucket refilled at `rate` bytes/s (the burst it would need)."""
    out: list[float] = []
    deficit = 0.0
    last = seq.t[0] if seq.t else 0.0
    for t, wire, ok in zip(seq.t, seq.wire, seq.passed):
        deficit = max(0.0, deficit - rate * (t - last))
        last = t
        out.append(deficit + wire)
        if ok:
            deficit += wire
    return out


def window_levels(seq: PacketSeq, period: float, start: float) -> list[float]:
    """Each packet's bytes-used-in-its-interval + wire under a window meter."""
    out: list[float] = []
    used = 0.0
    current = -1
    for t, wire, ok in zip(seq.t, seq.wire, seq.passed):
        k = math.floor((t - start) / period)
        if k != current:
            current, used = k, 0.0
        out.append(used + wire)
        if ok:
            used += wire
    return out


def scrambled(passed: list[bool]) -> list[bool]:
    """The same number of losses spread evenly over the packets: a loss pattern owing nothing to
    any bucket's state (deterministic, so fits are reproducible)."""
    n = len(passed)
    n_loss = n - sum(passed)
    out = [True] * n
    if n_loss:
        step = n / n_loss
        for k in range(n_loss):
            # a golden-ratio offset keeps the pattern from lining up with any period
            out[min(n - 1, int((k + (k * 0.618034) % 1) * step))] = False
    return out


def span_rate(seq: PacketSeq) -> float:
    """Passed IP bytes per second from the first loss to the last packet (the policed span)."""
    first = next((i for i, ok in enumerate(seq.passed) if not ok), 0)
    start, end = seq.t[first], seq.t[-1]
    if end - start < 1e-3:
        start = seq.t[0]
    passed = sum(w for w, ok, t in zip(seq.wire, seq.passed, seq.t) if ok and t >= start)
    return passed / max(end - start, 1e-3)


def _geometric(low: float, high: float, steps: int) -> list[float]:
    return [low * (high / low) ** (k / (steps - 1)) for k in range(steps)]


def agreement(seq: PacketSeq, rate: float, burst: float) -> list[bool]:
    """Whether a bucket (rate bytes/s, burst bytes) replayed over the packets predicts each one.
    The replay follows the evidence: a pass means the bucket held the packet's bytes, a loss that it
    did not, so one mislabelled packet (a spurious retransmission read as a loss) costs one miss
    instead of shifting the bucket for the rest of the flow."""
    deficit = 0.0
    last = seq.t[0] if seq.t else 0.0
    out: list[bool] = []
    for t, wire, ok in zip(seq.t, seq.wire, seq.passed):
        deficit = max(0.0, deficit - rate * (t - last))
        last = t
        fits = deficit + wire <= burst
        out.append(fits == ok)
        if ok:
            deficit = min(deficit, burst - wire) + wire
        else:
            deficit = max(deficit, burst - wire + 1)
    return out


def balanced(hits: list[bool], passed: list[bool]) -> float:
    """The mean of the agreement over passes and over losses."""
    n_pass = sum(passed)
    n_loss = len(passed) - n_pass
    hits_pass = sum(1 for h, ok in zip(hits, passed) if h and ok)
    hits_loss = sum(1 for h, ok in zip(hits, passed) if h and not ok)
    return (hits_pass / max(n_pass, 1) + hits_loss / max(n_loss, 1)) / 2


def replay(seq: PacketSeq, rate: float, burst: float) -> float:
    """Balanced agreement of the evidence-following replay (`agreement`)."""
    return balanced(agreement(seq, rate, burst), seq.passed)


def fit_police(seq: PacketSeq) -> BucketFit | None:
    """The (rate, burst) whose replayed bucket best agrees with the passes and losses."""
    n_loss = seq.losses
    if n_loss < 2 or len(seq.t) - n_loss < 4:
        return None
    if seq.t[-1] - seq.t[0] < 1e-3 or max(seq.wire) <= 0:
        return None  # no time or no bytes to fit a rate to
    base = span_rate(seq)  # a lower bound, loose when the sender idled (RTO) while tokens overflowed
    if base <= 0:
        base = sum(w for w, ok in zip(seq.wire, seq.passed) if ok) / (seq.t[-1] - seq.t[0])
    if base <= 0:
        return None
    wire = max(seq.wire)
    splits: dict[float, Split] = {}
    replays: dict[float, tuple[float, float]] = {}

    def threshold(rate: float) -> Split:
        if rate not in splits:
            splits[rate] = split(deficits(seq, rate), seq.passed)
        return splits[rate]

    def at(rate: float) -> float:
        """The evidence-following replay's agreement at `rate`, its burst from the threshold."""
        if rate not in replays:
            sp = threshold(rate)
            burst = sp.threshold + min(sp.gap / 2, wire / 2)
            replays[rate] = (replay(seq, rate, burst), burst)
        return replays[rate][0]

    # The replay's agreement varies smoothly with the rate (it resynchronises at every packet), so a
    # 3% grid finds the neighbourhood; the pure threshold's agreement peaks only within a fraction
    # of a percent of the rate (a bucket a little too slow or fast drifts over a long busy span),
    # so it then pins the rate inside that neighbourhood.
    coarse = _geometric(base * 0.6, base * 12.0, 102)
    scored = [at(r) for r in coarse]
    peaks = sorted((k for k in range(len(coarse))
                    if scored[k] >= max(scored[max(k - 1, 0)], scored[min(k + 1, len(coarse) - 1)])),
                   key=lambda k: -scored[k])[:5]
    for k in peaks:
        for r in _geometric(coarse[k] / 1.025, coarse[k] * 1.025, 21):
            at(r)
    top = max(replays.values())[0]
    plateau = sorted(r for r, (score, _) in replays.items() if score >= top - 1e-9)
    if plateau[-1] / plateau[0] > 1.1:
        # The data allow a range of rates (a sender that idled between single-packet passes);
        # the long-run rate of the policed span is its floor and TCP runs a little under the rate.
        starts = [min(max(base * 1.1, plateau[0]), plateau[-1])]
        at(starts[0])
    else:
        ranked = sorted(replays, key=lambda r: -replays[r][0])
        starts = [plateau[len(plateau) // 2]] + [r for r in ranked if abs(r / plateau[0] - 1) > 0.02][:1]
    score, burst = replays[starts[0]]
    rate = starts[0]
    # a sender that kept the bucket drained passed exactly the rate over the policed span
    for start in starts + [base * 1.01]:
        for r in _geometric(start / 1.015, start * 1.015, 61):
            sp = threshold(r)
            if sp.score > score + 1e-9:
                score, rate, burst = sp.score, r, sp.threshold + min(sp.gap / 2, wire / 2)
    for r in _geometric(rate / 1.01, rate * 1.01, 7):
        for b in _geometric(max(burst / 1.1, wire), burst * 1.1, 9):
            agreement = replay(seq, r, b)
            if agreement > score + 1e-9:
                score, rate, burst = agreement, r, b
    slack = 0.5 / n_loss + 1e-9
    good = sorted(r for r, (s, _) in replays.items() if s >= top - slack)
    rate_error = max((good[-1] - good[0]) / 4, rate * 0.005)
    chosen = threshold(rate)
    first_loss = next(t for t, ok in zip(seq.t, seq.passed) if not ok)
    burst_error = math.hypot(chosen.gap / 2 + wire / 2, rate_error * (first_loss - seq.t[0]))
    null = split(deficits(seq, rate), scrambled(seq.passed)).score
    return BucketFit(rate, rate_error, burst, burst_error, score, null, min(plateau[0], rate), max(plateau[-1], rate))


MIN_PERIOD = 0.02  # seconds: a shorter window is a policer for any trace's resolution


def _loss_to_pass(seq: PacketSeq) -> list[tuple[float, float]]:
    """(last loss, next pass) times after the first packet, for every loss followed by the pass
    of a packet at least as large (a smaller one may still fit the interval's remaining budget)."""
    start = seq.t[0]
    out: list[tuple[float, float]] = []
    lost_at: float | None = None
    lost_size = 0
    for t, wire, ok in zip(seq.t, seq.wire, seq.passed):
        if not ok:
            lost_at, lost_size = t, wire
        elif lost_at is not None and wire >= lost_size:
            out.append((lost_at - start, t - start))
            lost_at = None
    return out


def fit_window(seq: PacketSeq) -> WindowFit | None:
    """The window meter (period, budget) that best agrees with the passes and losses; its
    intervals start at the first packet, as the engine's meter does."""
    n_loss = seq.losses
    if n_loss < 2 or len(seq.t) - n_loss < 4:
        return None
    if not _loss_to_pass(seq) or seq.t[-1] - seq.t[0] < 1e-3:
        return None
    start = seq.t[0]
    scores: dict[float, Split] = {}

    def at(period: float) -> Split:
        if period not in scores:
            scores[period] = split(window_levels(seq, period, start), seq.passed)
        return scores[period]

    # Under a window meter a pass never follows a loss within one interval, so an interval starts
    # between every loss and the pass after it: the period is one that puts a boundary inside
    # each such gap. The last gap, divided by each whole number of periods, lists the candidates.
    gaps_after = _loss_to_pass(seq)
    last_a, last_b = gaps_after[-1]
    if len(gaps_after) > 200:  # bounded work on long traces: an even sample of the gaps
        gaps_after = [gaps_after[k * len(gaps_after) // 200] for k in range(199)] + [gaps_after[-1]]
    # Every divisor of a period also puts a boundary in each gap, so the longest periods come
    # first; each k's range is sampled at ten points, as the gaps allow only parts of it.
    candidates: list[float] = []
    k = 1
    while last_a / k >= MIN_PERIOD and k <= 2000 and len(candidates) < 60:
        low, high = last_a / k, last_b / k
        k += 1
        for f in (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95):
            period = low + (high - low) * f
            inside = sum(1 for a, b in gaps_after if math.floor(b / period) > math.floor(a / period))
            if inside >= 0.75 * len(gaps_after):
                candidates.append(period)
    if not candidates:
        return None
    ranked = sorted(candidates, key=lambda p: -at(p).score)[:3]
    for best in ranked:
        for p in _geometric(best / 1.004, best * 1.004, 17):
            at(p)
    top = max(s.score for s in scores.values())
    best_periods = sorted(p for p, s in scores.items() if s.score >= top - 1e-9)
    period = best_periods[len(best_periods) // 2]
    slack = 0.5 / n_loss + 1e-9
    good = sorted(p for p, s in scores.items() if s.score >= top - slack)
    chosen = scores[period]
    wire = max(seq.wire)
    # duty: from each interval's start to its last pass, as a fraction of the period
    last_pass: dict[int, float] = {}
    for t, ok in zip(seq.t, seq.passed):
        if ok:
            last_pass[math.floor((t - start) / period)] = t
    fractions = sorted(((t - start) / period) % 1 for t in last_pass.values())
    duty = fractions[len(fractions) // 2] if fractions else 1.0
    null = split(window_levels(seq, period, start), scrambled(seq.passed)).score
    return WindowFit(period, max((good[-1] - good[0]) / 4, period * 0.003),
                     chosen.threshold + min(chosen.gap / 2, wire / 2), chosen.gap / 2 + wire / 2,
                     duty, chosen.score, null)
