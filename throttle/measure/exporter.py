"""The Prometheus exporter: what the censor did and the speeds it let flows reach.

Names follow prometheus.io's practices: one `throttle_` prefix, base units (bytes, seconds),
counters ending in `_total`, and bounded labels — rule (a rule's name or `none`), name (the
matched name, at most `MAX_NAMES` per rule, else `other`), direction (upload, download) and
verdict. Never one label value per connection.

Sources: the engine's events (limited packets, decisions, errors), the engine's flow table (active
flows), the hook (held packets), and the eBPF fast path's per-flow byte counters (the speed of
flows the kernel forwards without the censor seeing them).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from throttle.engine import (DIRECTION_NAMES, Engine, EngineError, Event, FlowDecided, Limited, State, Verdict)

class KernelCounters(Protocol):
    """What the kernel counted for one direction of a flow it forwards (`kernel.fastpath.Counters`)."""

    @property
    def bytes(self) -> int: ...
    @property
    def packets(self) -> int: ...
    @property
    def dropped_bytes(self) -> int: ...
    @property
    def dropped_packets(self) -> int: ...


MAX_NAMES = 20  # distinct name label values per rule before "other"
SPEED_WINDOW = 5.0  # seconds the achieved-speed gauge averages over
_VERDICT = {Verdict.ACCEPT: "passed", Verdict.DROP: "dropped", Verdict.HOLD: "delayed"}


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        labels = ["rule", "name", "direction", "verdict"]
        self.packets = Counter("throttle_packets", "Packets by what the censor did with them: inspected (before the flow "
                               "was decided), passed, dropped or delayed by a rule's bucket.", labels, registry=r)
        self.bytes = Counter("throttle_bytes", "Bytes by what the censor did with them; verdict bypassed counts bytes the "
                             "kernel forwarded for decided flows on the eBPF fast path.", labels, registry=r)
        self.flows = Counter("throttle_flows_classified", "Flows decided, by where their name came from and the verdict.",
                             ["name_source", "verdict"], registry=r)
        self.active = Gauge("throttle_flows_active", "Flows in the censor's table, by state.", ["state"], registry=r)
        self.speed = Gauge("throttle_achieved_bytes_per_second", f"Bytes per second that got through, over the last "
                           f"{SPEED_WINDOW:.0f} s, by rule, name and direction (rule none: unlimited flows).",
                           ["rule", "name", "direction"], registry=r)
        self.delay = Histogram("throttle_queue_delay_seconds", "How long the shaper held delayed packets.",
                               buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=r)
        self.queue = Gauge("throttle_queue_length", "Packets held by the censor now (shaped, waiting for release).",
                           registry=r)
        self.errors = Counter("throttle_engine_errors", "Packets the engine could not parse, or errors in the hook.",
                              ["kind"], registry=r)
        self.lost = Counter("throttle_packets_lost_before_inspection", "Packets the kernel could not queue to the "
                            "censor (queue or socket full): flows whose first packets are lost may escape.", registry=r)
        self._lost_seen = 0
        self._names: dict[str, set[str]] = {}
        self._passed: dict[tuple[str, str, str], int] = {}  # cumulative passed bytes by speed labels
        self._history: deque[tuple[float, dict[tuple[str, str, str], int]]] = deque()
        # kernel map key -> (rule, name, direction labels; its counters as last seen)
        self._fast: dict[bytes, tuple[tuple[str, str, str], tuple[int, int, int, int]]] = {}
        for state in ("inspecting", "limited", "passed"):
            self.active.labels(state)
        self.queue.set(0)

    def _name(self, rule: str, name: str | None) -> str:
        if rule == "none" or not name:
            return "other"
        seen = self._names.setdefault(rule, set())
        if name in seen or len(seen) < MAX_NAMES:
            seen.add(name)
            return name
        return "other"

    def _add_passed(self, key: tuple[str, str, str], n: int) -> None:
        self._passed[key] = self._passed.get(key, 0) + n

    # ---- events ---------------------------------------------------------------------------
    def on_event(self, ev: Event) -> None:
        if isinstance(ev, Limited):
            rule = ev.rule
            name = self._name(rule, ev.name)
            direction = DIRECTION_NAMES[ev.direction]
            verdict = _VERDICT.get(ev.verdict, "passed")
            self.packets.labels(rule, name, direction, verdict).inc()
            self.bytes.labels(rule, name, direction, verdict).inc(ev.size)
            if ev.verdict != Verdict.DROP:
                self._add_passed((rule, name, direction), ev.size)
            if ev.verdict == Verdict.HOLD:
                self.delay.observe(ev.delay)
        elif isinstance(ev, FlowDecided):
            flow = ev.flow
            rule = flow.rule.name if flow.rule is not None else "none"
            name = self._name(rule, flow.name)
            self.flows.labels(flow.name_source or "none", "limited" if flow.state == State.LIMITED else "passed").inc()
            for d, side in enumerate(flow.sides):
                if side.packets:
                    self.packets.labels(rule, name, DIRECTION_NAMES[d], "inspected").inc(side.packets)
                    self.bytes.labels(rule, name, DIRECTION_NAMES[d], "inspected").inc(side.bytes)
                    if flow.state != State.LIMITED:
                        self._add_passed(("none", "other", DIRECTION_NAMES[d]), side.bytes)
        elif isinstance(ev, EngineError):
            self.errors.labels(ev.kind).inc()
        # FlowStarted, FlowEnded, NameLearned: nothing to count (the flow table gives the gauges)

    def lost_before_inspection(self, total: int) -> None:
        """The kernel's running count of packets it could not queue (`nfqueue.queue_losses`)."""
        if total > self._lost_seen:
            self.lost.inc(total - self._lost_seen)
            self._lost_seen = total

    def hook_error(self) -> None:
        self.errors.labels("hook").inc()

    def fast_flow_added(self, key: bytes, direction: str, rule: str = "none", name: str | None = None) -> None:
        """A direction of a flow the kernel now forwards (rule none) or limits (that rule): its
        bytes and packets come from the kernel's counters from now on (see `tick`)."""
        self._fast[key] = ((rule, self._name(rule, name), direction), (0, 0, 0, 0))

    # ---- once a second ----------------------------------------------------------------------
    def tick(self, engine: Engine, held: int, fast: Mapping[bytes, KernelCounters] | None, now: float) -> None:
        """Once a second: gauges from the flow table, the kernel's per-flow counters, speeds.
        `now` is the censor's clock (its event loop's), the one its events are stamped with."""
        counts = {"inspecting": 0, "limited": 0, "passed": 0}
        for flow in engine.flows():
            counts[flow.state.label] += 1
        for state, n in counts.items():
            self.active.labels(state).set(n)
        self.queue.set(held)
        if fast is not None:
            for fast_key, c in fast.items():
                labels, before = self._fast.get(fast_key, (("none", "other", "upload"), (0, 0, 0, 0)))
                now_seen = (c.bytes, c.packets, c.dropped_bytes, c.dropped_packets)
                forwarded = "bypassed" if labels[0] == "none" else "passed"
                for counter, verdict, delta in ((self.bytes, forwarded, now_seen[0] - before[0]),
                                                (self.packets, forwarded, now_seen[1] - before[1]),
                                                (self.bytes, "dropped", now_seen[2] - before[2]),
                                                (self.packets, "dropped", now_seen[3] - before[3])):
                    if delta > 0:
                        counter.labels(*labels, verdict).inc(delta)
                if now_seen[0] > before[0]:
                    self._add_passed(labels, now_seen[0] - before[0])
                self._fast[fast_key] = (labels, now_seen)
            for fast_key in list(self._fast):
                if fast_key not in fast:
                    del self._fast[fast_key]
        self._history.append((now, dict(self._passed)))
        while len(self._history) > 1 and now - self._history[1][0] >= SPEED_WINDOW:
            self._history.popleft()
        t0, old = self._history[0]
        span = now - t0
        for key, total in self._passed.items():
            rate = (total - old.get(key, 0)) / span if span > 0 else 0.0
            self.speed.labels(*key).set(rate)
