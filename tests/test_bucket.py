"""Token buckets with literal times: no clock is read and nothing sleeps."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from throttle.engine.buckets import Policer, Shaper, WindowMeter
from throttle.units import parse_rate, parse_size

RATE = parse_rate("130kbit")  # 16,250 bytes/s
BURST = parse_size("16KB")


def test_policer_holds_130kbit_over_60s_of_back_to_back_packets() -> None:
    # 1500-byte packets back to back on a 100 Mbit/s link: 8,333 packets a second for 60 s.
    policer = Policer(RATE, BURST, now=0.0)
    gap = 1500 * 8 / 100e6
    passed = 0
    n = int(60 / gap)
    for i in range(n):
        if policer.allow(1500, i * gap):
            passed += 1500
    achieved_bits = passed * 8 / (n * gap)
    assert abs(achieved_bits - 130_000) / 130_000 <= 0.02, achieved_bits


def test_policer_burst_then_drops_like_the_2021_signature() -> None:
    # §11: about 16 KB passes at line rate, then everything is dropped until credit returns.
    policer = Policer(RATE, BURST, now=0.0)
    verdicts = [policer.allow(1500, i * 0.0001) for i in range(30)]
    assert verdicts[:10] == [True] * 10  # 10 x 1500 = 15,000 <= 16,384
    assert not any(verdicts[11:])
    assert policer.allow(1500, 1.0)  # a second later the rate has refilled the bucket


def test_policer_rate_zero_passes_only_the_burst() -> None:
    policer = Policer(0.0, 16000, now=0.0)
    passed = sum(policer.allow(1000, t / 10) for t in range(100))
    assert passed == 16


def test_policer_ignores_time_going_backwards() -> None:
    policer = Policer(RATE, 3000, now=10.0)
    assert policer.allow(3000, 10.0)
    assert not policer.allow(1500, 5.0)  # no credit minted by an earlier timestamp


def test_shaper_releases_at_the_rate() -> None:
    shaper = Shaper(1000.0, 0, now=0.0, max_delay=100.0)
    times = [shaper.release_time(500, 0.0) for _ in range(4)]
    assert times == [0.5, 1.0, 1.5, 2.0]


def test_shaper_drops_beyond_its_delay_bound() -> None:
    shaper = Shaper(1000.0, 0, now=0.0, max_delay=1.0)
    assert shaper.release_time(500, 0.0) == 0.5
    assert shaper.release_time(500, 0.0) == 1.0
    assert shaper.release_time(500, 0.0) is None  # would wait 1.5 s
    assert shaper.release_time(400, 0.5) == 1.4  # queue drained a little meanwhile


def test_shaper_bytes_bound() -> None:
    shaper = Shaper(1000.0, 0, now=0.0, max_bytes=1200)
    assert shaper.release_time(1000, 0.0) == 1.0
    assert shaper.release_time(300, 0.0) is None
    assert shaper.backlog(0.0) == 1000


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=100, max_value=1e7),
    burst=st.integers(min_value=0, max_value=65536),
    bound=st.floats(min_value=0.01, max_value=10),
    arrivals=st.lists(st.tuples(st.floats(min_value=0, max_value=0.5), st.integers(min_value=40, max_value=1500)), max_size=200),
)
def test_shaper_never_early_never_over_bound(rate, burst, bound, arrivals) -> None:
    """Over any arrival pattern: releases keep order, never beat the rate, never exceed the bound."""
    shaper = Shaper(rate, burst, now=0.0, max_delay=bound)
    now = 0.0
    released: list[tuple[float, int]] = []
    for gap, size in arrivals:
        now += gap
        t = shaper.release_time(size, now)
        if t is None:
            continue
        assert t >= now
        assert t - now <= bound + 1e-9
        if released:
            assert t >= released[-1][0] - 1e-9
        released.append((t, size))
    # Bytes released by any time t never exceed burst + rate * t (the rate allows no more).
    total = 0
    for t, size in released:
        total += size
        assert total <= burst + rate * t + 1e-6 * total + 1


def test_a_window_meter_made_before_its_first_packet_begins_there() -> None:
    """Made when the flow is decided (`now` not given): the first interval begins at the first
    packet, so it behaves exactly as one made at that packet (and as the kernel's, which is
    handed it unbegun)."""
    early, at_first = WindowMeter(RATE, BURST), WindowMeter(RATE, BURST, now=5.3)
    assert early.start is None
    times = [5.3 + 0.01 * i for i in range(400)]
    assert [early.allow(1500, t) for t in times] == [at_first.allow(1500, t) for t in times]
    assert early.start == at_first.start and early.start > 5.3 + early.interval  # on to later intervals
    # ... where one begun at its making (0 s) cuts its intervals elsewhere.
    begun, fresh = WindowMeter(RATE, BURST, now=0.0), WindowMeter(RATE, BURST)
    assert [begun.allow(1500, t) for t in times] != [fresh.allow(1500, t) for t in times]
