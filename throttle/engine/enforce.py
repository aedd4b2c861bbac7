"""Enforcement: a limited flow's packets against its token buckets (`throttle.engine.buckets`).

A rule's buckets are per flow, per client address or one for the whole rule (`scope`), always one
per direction (docs/incidents.md §1.9). A policer or a window meter (§1.11) passes or drops; a shaper
gives a release time, or drops when the packet would wait longer than the queue bound. A loss rule's
directions drop each packet at random (`RandomLoss`), with draws from the enforcer's seeded
`random.Random`.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable

from throttle.engine.buckets import Bucket, Policer, RandomLoss, Shaper, WindowMeter
from throttle.engine.events import DirectionLimit, Event, Limited, Limits, Meter, Verdict
from throttle.engine.flows import DIRECTION_NAMES, DOWNLOAD, UPLOAD, Direction, Flow, Side, State
from throttle.scenario import Rule

Decision = tuple[Verdict, float]  # a verdict, and for HOLD the time to release the packet at
ACCEPT: Decision = (Verdict.ACCEPT, 0.0)
BYPASS: Decision = (Verdict.BYPASS, 0.0)
DROP: Decision = (Verdict.DROP, 0.0)


def make_bucket(rule: Rule, now: float, rng: random.Random) -> Bucket:
    if rule.action == "loss":  # random drops at no rate; `rng` gives the draws
        return RandomLoss(rule.probability, rng)
    if rule.meter == "window":  # police only (the loader checks): fixed intervals of burst bytes (§11)
        return WindowMeter(rule.rate, rule.burst)  # its first interval starts at its first packet
    if rule.action != "shape":  # police, or drop and rst: a policer without rate or burst (the loader sets both 0)
        return Policer(rule.rate, rule.burst, now)
    return Shaper(rule.rate, rule.burst, now, max_delay=rule.queue_delay, max_bytes=rule.queue_bytes)


def _limits(rule: Rule, d: Direction) -> bool:
    """Whether `rule` limits direction `d` of its flows."""
    return rule.direction == "both" or rule.direction == DIRECTION_NAMES[d]


class Enforcer:
    """Buckets for limited flows; the buckets shared between flows (scope client or rule) live here."""

    def __init__(self, emit: Callable[[Event], None], max_shared: int = 200_000,
                 rng: random.Random | None = None) -> None:
        self._emit = emit
        self._rng = rng if rng is not None else random.Random(0)  # loss rules' draws: seeded, reproducible
        # Shared buckets, least recently used first, at most `max_shared` (a flow keeps its own
        # reference, so dropping one here only means the next flow of that client starts afresh).
        self._shared: OrderedDict[tuple[str, Direction, bytes], Bucket] = OrderedDict()
        self._max_shared = max_shared

    def __len__(self) -> int:
        """Shared buckets remembered now."""
        return len(self._shared)

    def enforce(self, flow: Flow, d: Direction, side: Side, size: int, carried: int, now: float) -> Decision:
        """The verdict for one packet of `flow` in direction `d`; `carried` is the payload the
        direction carried before this packet (for `after_bytes`)."""
        if flow.state != State.LIMITED:
            return BYPASS if flow.state == State.PASSED else ACCEPT
        rule = flow.rule
        assert rule is not None
        if not _limits(rule, d):
            return ACCEPT
        if carried < rule.after_bytes:
            return ACCEPT
        bucket = flow.buckets[d]
        if bucket is None:
            bucket = self._bucket(flow, rule, d, now)
        name = flow.name or ""
        if isinstance(bucket, (Policer, WindowMeter, RandomLoss)):
            if bucket.allow(size, now):
                self._emit(Limited(rule.name, name, d, size, Verdict.ACCEPT, 0.0, now))
                return ACCEPT
            return self._drop(rule, name, d, side, size, now)
        release = bucket.release_time(size, now)
        if release is None:
            return self._drop(rule, name, d, side, size, now)
        if release <= now:
            self._emit(Limited(rule.name, name, d, size, Verdict.ACCEPT, 0.0, now))
            return ACCEPT
        side.delayed_packets += 1
        side.delayed_bytes += size
        side.delay_total += release - now
        self._emit(Limited(rule.name, name, d, size, Verdict.HOLD, release - now, now))
        return (Verdict.HOLD, release)

    def bucket(self, flow: Flow, d: Direction, now: float) -> Bucket | None:
        """The bucket that limits direction `d` of a limited flow (made now if it has none yet),
        or None when the flow's rule does not limit that direction."""
        rule = flow.rule
        if flow.state != State.LIMITED or rule is None or not _limits(rule, d):
            return None
        return flow.buckets[d] or self._bucket(flow, rule, d, now)

    def limits(self, flow: Flow, now: float) -> Limits:
        """How each direction of a just decided flow is limited (see `DirectionLimit`). Its
        buckets are made now: a bucket starts full and its refill stops at full, so one made
        before the direction's first limited packet behaves as one made at it, and a window meter
        starts its first interval at its first packet, whenever it was made."""
        return self._limit(flow, UPLOAD, now), self._limit(flow, DOWNLOAD, now)

    def _limit(self, flow: Flow, d: Direction, now: float) -> DirectionLimit | None:
        rule = flow.rule
        if flow.state != State.LIMITED or rule is None or not _limits(rule, d):
            return None
        bucket = flow.buckets[d] or self._bucket(flow, rule, d, now)
        if isinstance(bucket, Shaper):
            return DirectionLimit("shape", bucket.rate, bucket.burst, bucket, bucket.max_backlog, rule.after_bytes,
                                  flow.sides[d])
        if isinstance(bucket, RandomLoss):
            return DirectionLimit("loss", 0.0, 0.0, bucket, 0.0, rule.after_bytes, flow.sides[d], bucket.probability)
        meter: Meter = "window" if isinstance(bucket, WindowMeter) else "police"
        return DirectionLimit(meter, bucket.rate, bucket.burst, bucket, 0.0, rule.after_bytes, flow.sides[d])

    def _drop(self, rule: Rule, name: str, d: Direction, side: Side, size: int, now: float) -> Decision:
        side.dropped_packets += 1
        side.dropped_bytes += size
        self._emit(Limited(rule.name, name, d, size, Verdict.DROP, 0.0, now))
        return DROP

    def _bucket(self, flow: Flow, rule: Rule, d: Direction, now: float) -> Bucket:
        if rule.scope == "flow":
            bucket = make_bucket(rule, now, self._rng)
        else:
            # Client and rule scopes share buckets across flows, one per direction (§9).
            key = (rule.name, d, flow.client if rule.scope == "client" else b"")
            shared = self._shared.get(key)
            if shared is None:
                shared = self._shared[key] = make_bucket(rule, now, self._rng)
                while len(self._shared) > self._max_shared:
                    self._shared.popitem(last=False)
            else:
                self._shared.move_to_end(key)
            bucket = shared
        flow.buckets[d] = bucket
        return bucket
