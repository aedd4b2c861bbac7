"""The engine's buckets conform to their contract for every packet sequence, not just the examples.

Policer: in any interval of length t, at most rate*t + burst bytes pass, and a sequence that never
asks for more than that (a conforming sequence) passes whole. Shaper: whatever it releases in any
interval is at most rate*t + burst bytes, no packet leaves before it arrived or waits longer than
the queue bound, and a conforming sequence leaves at once, none dropped.

A token bucket that starts full passes a sequence whole exactly when the sequence conforms, so the
two halves pin the bucket down from both sides: a bucket that forgot its cap (credit beyond burst
after a pause), refilled too fast, or charged too little fails the first; one that charged too
much or refilled too slowly fails the second.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from throttle.engine.buckets import Policer, Shaper

EPS = 1e-6  # bytes of float slack: the bucket computes in floats

rates = st.one_of(st.floats(min_value=1_000.0, max_value=100_000.0), st.floats(min_value=1_000.0, max_value=10_000_000.0))
bursts = st.one_of(st.integers(min_value=3_000, max_value=20_000),  # at least two full-sized packets
                   st.integers(min_value=3_000, max_value=1_000_000))
# (size, gap before it in seconds): back-to-back runs, pauses, and everything between
gaps = st.one_of(st.sampled_from([0.0, 0.0, 0.0, 0.001, 0.01, 0.1, 1.0, 5.0]), st.floats(min_value=0.0, max_value=5.0))
arrivals = st.lists(st.tuples(st.integers(min_value=40, max_value=1_500), gaps), min_size=1, max_size=120)
# A pause, then a run: what a bucket that forgot its cap lets through too much of.
PAUSE_THEN_RUN = [(1500, 0.0), (1500, 5.0)] + [(1500, 0.0)] * 30
# Back-to-back full-sized packets, then one every millisecond: refill and charge both count.
RUN_THEN_STREAM = [(1500, 0.0)] * 20 + [(1500, 0.001)] * 100
# Exactly at the rate (1,500 bytes a millisecond at 1.5 MB/s) after a run that leaves 100 bytes of
# burst: a bucket that charges a byte too much, or refills a little slow, drops from it.
AT_THE_RATE = [(1500, 0.0)] * 10 + [(1500, 0.001)] * 200


def _times(seq: list[tuple[int, float]], start: float = 100.0) -> list[tuple[int, float]]:
    out, t = [], start
    for size, gap in seq:
        t += gap
        out.append((size, t))
    return out


def _exceeds(events: list[tuple[int, float]], rate: float, burst: float) -> tuple[int, int, float] | None:
    """The first interval [i, j] (events sorted by time) carrying more than rate*t + burst bytes."""
    for i in range(len(events)):
        total = 0.0
        for j in range(i, len(events)):
            total += events[j][0]
            allowed = rate * (events[j][1] - events[i][1]) + burst
            if total > allowed + EPS:
                return i, j, total - allowed
    return None


def _conforms(events: list[tuple[int, float]], rate: float, burst: float) -> bool:
    """Whether no interval asks for more than rate*t + burst (with a margin for float rounding)."""
    for i in range(len(events)):
        total = 0.0
        for j in range(i, len(events)):
            total += events[j][0]
            if total > rate * (events[j][1] - events[i][1]) + burst - 1e-3:
                return False
    return True


def _slow_enough(seq: list[tuple[int, float]], rate: float, burst: int) -> list[tuple[int, float]]:
    """The same sizes spaced so that the sequence conforms: each gap at least size/rate, plus
    back-to-back runs that fit in the burst."""
    out: list[tuple[int, float]] = []
    run = 0
    for size, gap in seq:
        if gap == 0.0 and run + size < burst:
            run += size
            out.append((size, 0.0))
        else:
            run = size
            out.append((size, max(gap, (burst + size) / rate)))  # a refill of the whole burst first
    return out


@settings(max_examples=400, deadline=None)
@given(rates, bursts, arrivals)
@example(1000.0, 3000, PAUSE_THEN_RUN)
@example(16250.0, 16384, RUN_THEN_STREAM)
def test_the_policer_never_passes_more_than_rate_times_t_plus_burst(rate: float, burst: int,
                                                                   seq: list[tuple[int, float]]) -> None:
    events = _times(seq)
    policer = Policer(rate, burst, events[0][1])
    passed = [(size, t) for size, t in events if policer.allow(size, t)]
    assert _exceeds(passed, rate, burst) is None


@settings(max_examples=400, deadline=None)
@given(rates, bursts, arrivals)
@example(1_500_000.0, 15_100, AT_THE_RATE)
def test_the_policer_passes_every_conforming_sequence_whole(rate: float, burst: int,
                                                            seq: list[tuple[int, float]]) -> None:
    for events in (_times(seq), _times(_slow_enough(seq, rate, burst))):
        policer = Policer(rate, burst, events[0][1])
        verdicts = [policer.allow(size, t) for size, t in events]
        if _conforms(events, rate, burst):
            assert all(verdicts), f"dropped packet {verdicts.index(False)} of a conforming sequence"


def test_the_policer_passes_a_slow_sequence_whole_and_polices_a_fast_one() -> None:
    """The generated sequences include both kinds: check the helpers themselves once."""
    slow = _times(_slow_enough([(1500, 0.0)] * 50, 16250.0, 16384))
    assert _conforms(slow, 16250.0, 16384)
    fast = _times([(1500, 0.001)] * 50)
    assert not _conforms(fast, 16250.0, 16384)
    policer = Policer(16250.0, 16384, fast[0][1])
    assert sum(policer.allow(s, t) for s, t in fast) < 50


delays = st.floats(min_value=0.01, max_value=5.0)


@settings(max_examples=400, deadline=None)
@given(rates, bursts, delays, arrivals)
@example(1000.0, 3000, 1.0, PAUSE_THEN_RUN)
@example(16250.0, 16384, 5.0, RUN_THEN_STREAM)
def test_the_shaper_releases_at_most_rate_times_t_plus_burst_and_never_late(rate: float, burst: int, delay: float,
                                                                           seq: list[tuple[int, float]]) -> None:
    events = _times(seq)
    shaper = Shaper(rate, burst, events[0][1], max_delay=delay)
    released = []
    for size, t in events:
        at = shaper.release_time(size, t)
        if at is None:
            continue  # dropped by policy: the queue bound
        assert at >= t, "released before it arrived"
        assert at - t <= shaper.max_delay + 1e-9, f"held {at - t:.6f} s, the bound is {shaper.max_delay:.6f} s"
        released.append((size, at))
    assert released == sorted(released, key=lambda e: e[1]), "released out of order"
    assert _exceeds(released, rate, burst) is None


@settings(max_examples=400, deadline=None)
@given(rates, bursts, delays, arrivals)
@example(1_500_000.0, 15_100, 1.0, AT_THE_RATE)
def test_the_shaper_lets_a_conforming_sequence_through_at_once(rate: float, burst: int, delay: float,
                                                               seq: list[tuple[int, float]]) -> None:
    events = _times(seq if seq is AT_THE_RATE else _slow_enough(seq, rate, burst))
    assert _conforms(events, rate, burst)
    shaper = Shaper(rate, burst, events[0][1], max_delay=delay)
    for i, (size, t) in enumerate(events):
        assert shaper.release_time(size, t) == t, f"packet {i} of a conforming sequence was delayed or dropped"


@settings(max_examples=200, deadline=None)
@given(rates, bursts, delays, arrivals)
def test_the_shaper_drops_only_what_would_wait_past_its_bound(rate: float, burst: int, delay: float,
                                                              seq: list[tuple[int, float]]) -> None:
    """A dropped packet is one that would have waited longer than the bound: with the bound
    lifted (a shaper that never drops), the same packet at that moment would leave too late."""
    events = _times(seq)
    shaper = Shaper(rate, burst, events[0][1], max_delay=delay)
    for size, t in events:
        tokens_before = shaper.tokens + max(0.0, t - shaper.stamp) * rate
        at = shaper.release_time(size, t)
        if at is None:
            wait = (size - min(burst, tokens_before)) / rate
            assert wait > shaper.max_delay - 1e-9
