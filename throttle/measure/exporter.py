"""The Prometheus exporter: what the censor did with every byte, and what it was told to do.

Names follow prometheus.io's practices: one `throttle_` prefix, base units (bytes, seconds) or the
counted thing (`_packets`) in the name, counters ending in `_total`, and bounded labels — rule (a
rule's name or `none`), server_name (the matched server name, at most `MAX_NAMES` per rule, else
`other`), direction (upload, download), stage and verdict. Never one label value per connection.

Counters are the primary data, as in node_exporter: speeds are `rate(throttle_bytes_total[...])` in
PromQL. Every byte of every flow the censor saw or handed to the kernel is counted once in
`throttle_bytes_total`, by the stage that decided its fate:

- `stage="inspection"`: carried while the censor read the flow, before it decided (verdict passed);
- `stage="enforcement"`: a rule's bucket decided (verdict passed, dropped or delayed);
- `stage="kernel"`: handled by the kernel for a decided flow without the censor seeing it: an
  unlimited flow forwarded (rule none, verdict passed), or a limited flow policed by the kernel's
  copy of its bucket (its rule, verdict passed or dropped); counted by the eBPF program's per-flow
  counters or, where the firewall skips decided flows instead, by the kernel counters handed to
  `tick(kernel_bytes=...)`.

`throttle_packets_lost_before_inspection_total` counts packets the kernel could not queue to the
censor (queue or socket full): a flow whose first packets are lost may escape inspection.

`throttle_achieved_bytes_per_second` stays as a convenience gauge (the speed over the last
`SPEED_WINDOW` seconds) for a quick `curl | grep`. `throttle_rule_rate_bytes_per_second` is the
configured limit of each rule and direction, so that a dashboard draws the limit beside the
speeds; `throttle_build_info` and the process collector's `process_*` describe the censor itself.
"""

from __future__ import annotations

import platform
import struct
import threading
from collections import deque
from collections.abc import Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector

from throttle import __version__
from throttle.engine import DIRECTION_NAMES, Engine, EngineError, Event, FlowDecided, Limited, State, Verdict

class KernelCounters(Protocol):
    """What the kernel counted for one direction of a flow it handles (`kernel.maps.Counters`)."""

    @property
    def bytes(self) -> int: ...
    @property
    def packets(self) -> int: ...
    @property
    def dropped_bytes(self) -> int: ...
    @property
    def dropped_packets(self) -> int: ...


MAX_NAMES = 20  # distinct server_name label values per rule before "other"
SPEED_WINDOW = 5.0  # seconds the convenience speed gauge averages over
_VERDICT = {Verdict.ACCEPT: "passed", Verdict.DROP: "dropped", Verdict.HOLD: "delayed"}
DIRECTIONS = ("upload", "download")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        labels = ["rule", "server_name", "direction", "stage", "verdict"]
        self.packets = Counter("throttle_packets", "Packets by the stage that decided their fate (inspection, "
                               "enforcement by a rule's bucket, kernel) and the verdict (passed, dropped, delayed).",
                               labels, registry=r)
        self.bytes = Counter("throttle_bytes", "Bytes (IP packet lengths) by stage and verdict; every byte of every "
                             "flow once. rate() of it is the speed.", labels, registry=r)
        self.flows = Counter("throttle_flows_classified", "Flows decided, by where their name came from and the outcome "
                             "(limited or passed).", ["name_source", "verdict"], registry=r)
        self.active = Gauge("throttle_flows_active", "Flows in the censor's table, by state.", ["state"], registry=r)
        self.speed = Gauge("throttle_achieved_bytes_per_second", f"Bytes per second that got through over the last "
                           f"{SPEED_WINDOW:.0f} s, by rule, server name and direction (rule none: unlimited flows); a "
                           f"convenience: rate(throttle_bytes_total) is the same from the counters.",
                           ["rule", "server_name", "direction"], registry=r)
        self.limit = Gauge("throttle_rule_rate_bytes_per_second", "The rate each rule limits a direction to, as "
                           "configured in the scenario.", ["rule", "direction", "action"], registry=r)
        self.burst = Gauge("throttle_rule_burst_bytes", "The burst (bucket size) of each rule, as configured.",
                           ["rule", "direction", "action"], registry=r)
        self.delay = Histogram("throttle_queue_delay_seconds", "How long the shaper held delayed packets.",
                               buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=r)
        self.tables = Gauge("throttle_table_entries", "Entries in each of the censor's bounded tables (flows, "
                            "shared_buckets, sticky, dns; kernel_flows: flow directions the kernel handles).",
                            ["table"], registry=r)
        self.queue = Gauge("throttle_queue_held_packets", "Packets held by the censor now (shaped, waiting for release).",
                           registry=r)
        self.errors = Counter("throttle_engine_errors", "Packets the engine could not parse, or errors in the hook.",
                              ["kind"], registry=r)
        self.lost = Counter("throttle_packets_lost_before_inspection", "Packets the kernel could not queue to the "
                            "censor (queue or socket full): flows whose first packets are lost may escape.", registry=r)
        self._lost_seen = 0
        self.fallbacks = Counter("throttle_fastpath_fallbacks", "Packets the eBPF fast path handed to the normal "
                                 "path (netfilter, the censor's queue), by reason: no_flow is a flow not (yet) "
                                 "decided; the others are packets the program does not carry (a SYN, a fragment, "
                                 "IPv6 extension headers, an expiring TTL, the censor's lease run out ...).",
                                 ["reason"], registry=r)
        self._fallbacks_seen: dict[str, int] = {}  # the program's running counts, read by the walker
        build = Gauge("throttle_build_info", "Always 1: the version of throttle and of Python the censor runs.",
                      ["version", "python_version"], registry=r)
        build.labels(__version__, platform.python_version()).set(1)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        # The kernel's counters may be read on another thread than the packet loop (`kernel_tick`,
        # from the fast path's walker): what both touch is changed under this lock, briefly.
        self._lock = threading.Lock()
        self._names: dict[str, set[str]] = {}
        self._passed: dict[tuple[str, str, str], int] = {}  # cumulative passed bytes by speed labels
        self._history: deque[tuple[float, dict[tuple[str, str, str], int]]] = deque()
        # Per kernel map key: its labels (rule, server_name, direction; one shared tuple per label
        # set), its counters as last seen (packed: bytes are no work for the garbage collector, and
        # 65,536 of them are replaced every second), and the walk during which it was added (a
        # key added after a walk's snapshot was read is not that walk's to drop).
        self._fast_labels: dict[bytes, tuple[str, str, str]] = {}
        self._fast_seen: dict[bytes, bytes] = {}
        self._fast_walk: dict[bytes, int] = {}
        self._label_sets: dict[tuple[str, str, str], tuple[str, str, str]] = {}
        self._walk = 0
        self._kernel: dict[str, int] = {}  # direction -> kernel bytes seen so far
        self._rules_shown: tuple[object, ...] | None = None
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

    def _count(self, labels: tuple[str, str, str], stage: str, verdict: str, packets: int, size: int) -> None:
        if packets:
            self.packets.labels(*labels, stage, verdict).inc(packets)
        self.bytes.labels(*labels, stage, verdict).inc(size)
        if verdict != "dropped":
            with self._lock:
                self._passed[labels] = self._passed.get(labels, 0) + size

    # ---- events ---------------------------------------------------------------------------
    def on_event(self, ev: Event) -> None:
        if isinstance(ev, Limited):
            labels = (ev.rule, self._name(ev.rule, ev.name), DIRECTION_NAMES[ev.direction])
            self._count(labels, "enforcement", _VERDICT.get(ev.verdict, "passed"), 1, ev.size)
            if ev.verdict == Verdict.HOLD:
                self.delay.observe(ev.delay)
        elif isinstance(ev, FlowDecided):
            flow = ev.flow
            rule = flow.rule.name if flow.rule is not None else "none"
            name = self._name(rule, flow.name)
            self.flows.labels(flow.name_source or "none", "limited" if flow.state == State.LIMITED else "passed").inc()
            for d, side in enumerate(flow.sides):
                if side.packets:
                    # An unlimited flow's speed is the "none" rule's, whichever name it carried.
                    labels = (rule, name, DIRECTION_NAMES[d]) if flow.state == State.LIMITED else \
                        ("none", "other", DIRECTION_NAMES[d])
                    self._count(labels, "inspection", "passed", side.packets, side.bytes)
        elif isinstance(ev, EngineError):
            self.errors.labels(ev.kind).inc()
        # FlowStarted, FlowEnded, NameLearned: nothing to count (the flow table gives the gauges)

    def hook_error(self) -> None:
        self.errors.labels("hook").inc()

    def fast_flow_added(self, key: bytes, direction: str, rule: str = "none", name: str | None = None) -> None:
        """A direction of a flow the kernel now forwards (rule none) or polices (that rule): its
        bytes and packets come from the kernel's counters from now on (see `tick`)."""
        labels = (rule, self._name(rule, name), direction)
        self._fast_labels[key] = self._label_sets.setdefault(labels, labels)
        self._fast_seen[key] = _NOTHING_SEEN
        self._fast_walk[key] = self._walk

    def lost_before_inspection(self, total: int) -> None:
        """The kernel's running count of packets it could not queue (`nfqueue.queue_losses`)."""
        if total > self._lost_seen:
            self.lost.inc(total - self._lost_seen)
            self._lost_seen = total

    def kernel_fallbacks(self, totals: Mapping[str, int]) -> None:
        """The eBPF program's running counts of packets it handed to the normal path, by reason
        (`FastPath.fallbacks`); on the walker's thread, like `kernel_tick`."""
        seen = self._fallbacks_seen
        for reason, total in totals.items():
            before = seen.get(reason)
            if before is None:
                self.fallbacks.labels(reason)  # every reason shows, at 0 until it happens
                before = 0
            if total > before:
                self.fallbacks.labels(reason).inc(total - before)
            seen[reason] = max(total, before)

    def _show_rules(self, engine: Engine) -> None:
        """The configured limit of each rule, per direction it limits (set once per rule set)."""
        if self._rules_shown == engine.rules:
            return
        self._rules_shown = engine.rules
        for rule in engine.rules:
            for direction in DIRECTIONS if rule.direction == "both" else (rule.direction,):
                self.limit.labels(rule.name, direction, rule.action).set(rule.rate)
                self.burst.labels(rule.name, direction, rule.action).set(rule.burst)

    # ---- once a second ----------------------------------------------------------------------
    def tick(self, engine: Engine, held: int, fast: Mapping[bytes, KernelCounters] | None, now: float,
             kernel_bytes: dict[str, int] | None = None) -> None:
        """Once a second: gauges from the flow table, the kernel's byte counters, speeds.

        `fast`: the eBPF program's cumulative counters per flow key; `kernel_bytes`: cumulative
        bytes per direction ("upload", "download") the kernel forwarded for decided flows by another
        way (the firewall's skip rule counters). `now` is the censor's clock (its event loop's), the
        one its events are stamped with."""
        self._show_rules(engine)
        counts = {"inspecting": 0, "limited": 0, "passed": 0}
        for flow in engine.flows():
            counts[flow.state.label] += 1
        for state, n in counts.items():
            self.active.labels(state).set(n)
        for table, n in engine.table_sizes().items():
            self.tables.labels(table).set(n)
        self.queue.set(held)
        if fast is not None:
            self.kernel_tick(fast)
        for direction, total in (kernel_bytes or {}).items():
            seen_before = self._kernel.get(direction, 0)
            if total > seen_before:  # (a counter that went back, a reset rule, starts again from there)
                self._count(("none", "other", direction), "kernel", "passed", 0, total - seen_before)
            self._kernel[direction] = total
        with self._lock:
            passed = dict(self._passed)
        self._history.append((now, passed))
        while len(self._history) > 1 and now - self._history[1][0] >= SPEED_WINDOW:
            self._history.popleft()
        t0, old = self._history[0]
        span = now - t0
        for key, total in passed.items():
            rate = (total - old.get(key, 0)) / span if span > 0 else 0.0
            self.speed.labels(*key).set(rate)

    def kernel_tick(self, fast: Mapping[bytes, KernelCounters]) -> None:
        """The eBPF program's cumulative counters per flow key (`kernel.maps.Counters`, or the
        fast path's `Snapshot`), read by a walk of its map: what each direction carried since the
        last walk is counted at stage kernel. Safe on another thread than the one handling events
        (the censor calls it on the fast path's walker, so the walk of a big map never holds up
        packets): the per-key work needs no lock, the sums are added at the end."""
        walk = self._walk
        self._walk = walk + 1
        self.tables.labels("kernel_flows").set(len(fast))
        sums: dict[tuple[tuple[str, str, str], str], list[int]] = {}
        labels_of, seen_of, walk_of = self._fast_labels, self._fast_seen, self._fast_walk
        unknown = ("none", "other", "upload")
        totals = fast.totals() if hasattr(fast, "totals") else \
            ((k, c.bytes, c.packets, c.dropped_bytes, c.dropped_packets) for k, c in fast.items())
        pack, unpack = _SEEN.pack, _SEEN.unpack
        for fast_key, nbytes, packets, dbytes, dpackets in totals:
            before = seen_of.get(fast_key, _NOTHING_SEEN)
            if before is _NOTHING_SEEN or before == _NOTHING_SEEN:
                b0 = b1 = b2 = b3 = 0
            else:
                b0, b1, b2, b3 = unpack(before)
            if nbytes == b0 and dbytes == b2:
                continue
            labels = labels_of.get(fast_key, unknown)
            if nbytes > b0:
                acc = sums.setdefault((labels, "passed"), [0, 0])
                acc[0] += packets - b1
                acc[1] += nbytes - b0
            if dbytes > b2:
                acc = sums.setdefault((labels, "dropped"), [0, 0])
                acc[0] += dpackets - b3
                acc[1] += dbytes - b2
            if seen_of.get(fast_key, _NOTHING_SEEN) is before:  # not re-added meanwhile
                seen_of[fast_key] = pack(nbytes, packets, dbytes, dpackets)
                if fast_key not in walk_of:
                    walk_of[fast_key] = walk
        for fast_key, added in list(walk_of.items()):
            if added < walk and fast_key not in fast:
                walk_of.pop(fast_key, None)
                seen_of.pop(fast_key, None)
                labels_of.pop(fast_key, None)
        for (labels, verdict), (packets, size) in sums.items():
            self._count(labels, "kernel", verdict, packets, size)


_SEEN = struct.Struct("=QQQQ")
_NOTHING_SEEN = _SEEN.pack(0, 0, 0, 0)
