"""Token buckets driven by an injected clock: a policer (pass or drop) and a shaper (release time).

Both hold at most `burst` bytes of credit, refilled at `rate` bytes per second. Time is always a
parameter (`now`, seconds); nothing here reads a clock or sleeps, so tests feed literal times.

Policer (what the TSPU did, docs/incidents.md §1.9-11): a packet passes if the credit covers it,
otherwise it is dropped and costs nothing. A full bucket lets `burst` bytes through at line rate,
then the flow gets `rate` on average.

Window meter (the loss pattern of §11): time is cut into fixed intervals of `burst / rate` seconds,
the first starting at the meter's first packet (the direction's first limited packet; a meter
made earlier, when the flow was decided, waits for it), or at `now` when one is given. In each interval
the packets that fit in `burst` bytes pass, in arrival order; every later packet of that interval
is dropped and costs nothing. Unused bytes are not carried over. At line rate, a 16 KB budget over
1.008 s (130 kbit/s) passes 16 KB in the first few milliseconds, then drops for the rest of the
interval, as the captures showed (~16 KB within 100 ms, then ~900 ms of drops); a token bucket at
the same rate and burst instead drops a packet every ~90 ms once its burst is spent. The long-run
rate is `rate` for both.

Shaper (the Tele2 3G confounder, §12): every packet is released, but not before the credit covers
it. Credit may go negative; the deficit is the queue, and `-credit / rate` is how long the newest
packet waits. A packet that would wait longer than the bound (in seconds or bytes) is dropped
instead, so the queue never holds more than the bound.

Random loss (action "loss": loss no censor caused, which `throttle infer` must not call policing):
each packet is dropped with a fixed probability, on its own draw, whatever its size and time; the
rest pass at once. The draws come from a `random.Random` the engine is given, so a seeded engine
drops the same packets every run.
"""

from __future__ import annotations

import random


class Policer:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate < 0 or burst < 0:
            raise ValueError("rate and burst must not be negative")
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def allow(self, size: int, now: float) -> bool:
        """Whether a packet of `size` bytes arriving at `now` passes; takes its tokens if so."""
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= size:
            self.tokens -= size
            return True
        return False


class WindowMeter:
    __slots__ = ("rate", "burst", "interval", "start", "used")

    def __init__(self, rate: float, burst: int, now: float | None = None) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("a window meter needs a positive rate and burst")
        self.rate = rate
        self.burst = burst
        self.interval = burst / rate  # seconds; `burst` bytes per interval is `rate` on average
        self.start = now  # when the current interval began; None: at the next packet
        self.used = 0  # bytes passed in the current interval

    def allow(self, size: int, now: float) -> bool:
        """Whether a packet of `size` bytes arriving at `now` passes; counts it if so."""
        start = self.start
        if start is None:
            self.start = now
        elif now >= start + self.interval:
            self.start = start + self.interval * ((now - start) // self.interval)
            self.used = 0
        if self.used + size <= self.burst:
            self.used += size
            return True
        return False


class Shaper:
    __slots__ = ("rate", "burst", "tokens", "stamp", "max_delay", "max_backlog")

    def __init__(self, rate: float, burst: int, now: float, *, max_delay: float = 1.0, max_bytes: int = 0) -> None:
        if rate <= 0:
            raise ValueError("a shaper needs a positive rate")
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now
        # One bound, in bytes of deficit: a delay bound is the bytes the rate drains in that time.
        self.max_backlog = float(max_bytes) if max_bytes > 0 else max_delay * rate
        self.max_delay = self.max_backlog / rate

    def release_time(self, size: int, now: float) -> float | None:
        """When a packet of `size` bytes arriving at `now` may leave, or None to drop it."""
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        after = self.tokens - size
        if after >= 0:
            self.tokens = after
            return now
        if -after > self.max_backlog:
            return None
        self.tokens = after
        return now + (-after) / self.rate

    def backlog(self, now: float) -> float:
        """Bytes queued (not yet covered by credit) at `now`."""
        tokens = self.tokens + max(0.0, now - self.stamp) * self.rate
        return max(0.0, -tokens)


class RandomLoss:
    __slots__ = ("probability", "_draw")

    def __init__(self, probability: float, rng: random.Random) -> None:
        if not 0 < probability <= 1:
            raise ValueError("a loss probability is above 0 and at most 1")
        self.probability = probability
        self._draw = rng.random  # in [0, 1): a probability of 1 drops every packet

    def allow(self, size: int, now: float) -> bool:
        """Whether a packet passes: it is dropped with `probability`, independently of the others."""
        return self._draw() >= self.probability


Bucket = Policer | WindowMeter | Shaper | RandomLoss  # what a limited flow direction holds (`Flow.buckets`)
