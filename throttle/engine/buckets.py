"""Token buckets driven by an injected clock: a policer (pass or drop) and a shaper (release time).

Both hold at most `burst` bytes of credit, refilled at `rate` bytes per second. Time is always a
parameter (`now`, seconds); nothing here reads a clock or sleeps, so tests feed literal times.

Policer (what the TSPU did, docs/incidents.md §1.9-11): a packet passes if the credit covers it,
otherwise it is dropped and costs nothing. A full bucket lets `burst` bytes through at line rate,
then the flow gets `rate` on average.

Shaper (the Tele2 3G confounder, §12): every packet is released, but not before the credit covers
it. Credit may go negative; the deficit is the queue, and `-credit / rate` is how long the newest
packet waits. A packet that would wait longer than the bound (in seconds or bytes) is dropped
instead, so the queue never holds more than the bound.
"""

from __future__ import annotations


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


Bucket = Policer | Shaper  # what a limited flow direction holds (`Flow.buckets`)
