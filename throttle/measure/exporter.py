"""The Prometheus exporter: what the censor did with every byte, and what it was told to do.

Names follow prometheus.io's practices: one `throttle_` prefix, base units (bytes, seconds) or the
counted thing (`_packets`) in the name, counters ending in `_total`, and bounded labels — rule (a
rule's name or `none`), server_name (the matched server name, at most `MAX_NAMES` per rule, else
`other`), direction (upload, download), stage and verdict. Never one label value per connection.

Counters are the primary data, as in node_exporter: speeds are `rate(throttle_bytes_total[...])` in
PromQL. Every packet (and byte) of every flow that crosses the censor is counted once in
`throttle_packets_total` (`throttle_bytes_total`), by the path it took, the `stage`:

- `stage="inspection"`: queued and judged by the engine while it read the flow, before the packet
  that decided it (verdict passed), under the rule the decision named;
- `stage="enforcement"`: queued, and judged by a rule's bucket in the engine (passed, dropped or
  delayed), the deciding packet included;
- `stage="handover"`: queued, a packet of a flow the engine had decided to pass, on its way to
  the kernel (queued before the conntrack mark or the eBPF entry took the flow over; passed);
- `stage="connmark"`: forwarded by the firewall's conntrack-mark rule without being queued (a
  passed flow the eBPF program does not carry, or not yet); counted by that rule's own counters,
  one rule per conntrack direction, handed to `tick(connmark=...)`;
- `stage="kernel"`: forwarded or policed by the eBPF program (rule none, or the limited flow's
  rule; passed or dropped), counted by its per-flow counters;
- `stage="queue"`: dropped by the kernel because the censor's queue (or its socket) was full:
  the censor fell behind, and the sender has to send it again; counted by the kernel
  (`queue_dropped`, packets only, direction unknown), also in
  `throttle_packets_lost_before_inspection_total`.

Packets judged by the engine are counted from the flow's own counters (`Flow.sides`, and
`Flow.decided_counts` as of its decision), by difference, at each `tick` and when the flow ends:
exact, and no work per packet. A flow still under inspection is counted when it is decided, ends,
or its connection closes.

`throttle_flows_ended_total{state,reason}` counts connections by how they ended (fin, rst, idle,
evicted, reused) and the state their flow was in then: `inspecting` is a flow that ended before
any verdict (a short connection under a model that reads past a name that matched nothing).

`throttle_achieved_bytes_per_second` stays as a convenience gauge (the speed over the last
`SPEED_WINDOW` seconds) for a quick `curl | grep`. `throttle_rule_rate_bytes_per_second` is the
configured limit of each rule and direction, so that a dashboard draws the limit beside the
speeds (`throttle_rule_loss_probability` a loss rule's chance of dropping a packet, which has no
rate); `throttle_build_info` and the process collector's `process_*` describe the censor itself.
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
from throttle.engine import Engine, EngineError, Event, Flow, FlowDecided, FlowEnded, Limited, State, Verdict

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
        self.loss = Gauge("throttle_rule_loss_probability", "The chance each packet is dropped, of each rule of action "
                          "loss (random drops at no rate; its drops are counted with verdict dropped), as configured.",
                          ["rule", "direction"], registry=r)
        self.delay = Histogram("throttle_queue_delay_seconds", "How long the shaper held delayed packets.",
                               buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=r)
        self.tables = Gauge("throttle_table_entries", "Entries in each of the censor's bounded tables (flows, "
                            "shared_buckets, sticky, dns; kernel_flows: flow directions the kernel handles).",
                            ["table"], registry=r)
        self.queue = Gauge("throttle_queue_held_packets", "Packets held by the censor now (shaped, waiting for release).",
                           registry=r)
        self.errors = Counter("throttle_engine_errors", "Packets the engine could not parse, or errors in the hook.",
                              ["kind"], registry=r)
        self.lost = Counter("throttle_packets_lost_before_inspection", "Packets the kernel dropped because the "
                            "censor's queue or socket was full (the censor fell behind; senders send them again).",
                            registry=r)
        self.ended = Counter("throttle_flows_ended", "Connections that ended, by the state of their flow then "
                             "(inspecting: before any verdict) and how (fin, rst, idle, evicted, reused).",
                             ["state", "reason"], registry=r)
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
        self._rules_shown: tuple[object, ...] | None = None
        # Flows whose engine-judged packets are counted by difference (see the module docstring),
        # by flow id; and when the table was last looked at (the engine's clock).
        self._tracked: dict[int, _Tracked] = {}
        self._looked = float("-inf")
        self._connmark: dict[str, tuple[int, int]] = {}  # direction -> the rule's (packets, bytes) seen so far
        self._ended_seen: dict[tuple[str, str], int] = {}
        self._queue_dropped_seen = 0
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
            if ev.verdict == Verdict.HOLD:  # (its packets are counted from the flow's counters)
                self.delay.observe(ev.delay)
        elif isinstance(ev, FlowDecided):
            self._decided(ev.flow)
        elif isinstance(ev, FlowEnded):
            self._flow_ended(ev.flow)
        elif isinstance(ev, EngineError):
            self.errors.labels(ev.kind).inc()
        # FlowStarted, NameLearned: nothing to count (the flow table gives the gauges)

    def _decided(self, flow: Flow) -> None:
        """What the engine judged of `flow` before deciding it, counted under inspection with the
        decision's labels; what it judges from then on is tracked (`_catch_up`)."""
        limited = flow.state == State.LIMITED and flow.rule is not None
        self.flows.labels(flow.name_source or "none", "limited" if limited else "passed").inc()
        if limited:
            assert flow.rule is not None
            rule = flow.rule.name
            name = self._name(rule, flow.name)
            labels = ((rule, name, "upload"), (rule, name, "download"))
        else:  # an unlimited flow's speed is the "none" rule's, whichever name it carried
            labels = _NONE
        before = self._tracked.get(flow.id)
        counted = before.counted if before is not None else [0] * 12
        snap = flow.decided_counts or (flow.sides[0].packets, flow.sides[0].bytes, flow.sides[1].packets,
                                       flow.sides[1].bytes)
        for d in (0, 1):
            packets, size = snap[2 * d] - counted[6 * d], snap[2 * d + 1] - counted[6 * d + 1]
            if packets > 0:
                self._count(labels[d], "inspection", "passed", packets, size)
        tracked = _Tracked(flow, "enforcement" if limited else "handover", labels)
        tracked.counted = [snap[0], snap[1], 0, 0, 0, 0, snap[2], snap[3], 0, 0, 0, 0]
        self._tracked[flow.id] = tracked
        self._catch_up(tracked)

    def _flow_ended(self, flow: Flow) -> None:
        tracked = self._tracked.pop(flow.id, None)
        if tracked is None and flow.state == State.INSPECTING:
            tracked = _Tracked(flow, "inspection", _NONE)  # never decided: all of it under inspection
        if tracked is not None:
            self._catch_up(tracked)

    def _catch_up(self, tracked: _Tracked) -> None:
        """Count what the engine judged of a tracked flow since it was last counted: by its
        direction's counters, split by verdict (its drops and delays are counted apart)."""
        counted = tracked.counted
        for d, side in enumerate(tracked.flow.sides):
            i = 6 * d
            packets, size = side.packets - counted[i], side.bytes - counted[i + 1]
            if packets <= 0:
                continue
            dropped, dropped_bytes = side.dropped_packets - counted[i + 2], side.dropped_bytes - counted[i + 3]
            delayed, delayed_bytes = side.delayed_packets - counted[i + 4], side.delayed_bytes - counted[i + 5]
            labels, stage = tracked.labels[d], tracked.stage
            if dropped > 0:
                self._count(labels, stage, "dropped", dropped, dropped_bytes)
            if delayed > 0:
                self._count(labels, stage, "delayed", delayed, delayed_bytes)
            if packets - dropped - delayed > 0:
                self._count(labels, stage, "passed", packets - dropped - delayed, size - dropped_bytes - delayed_bytes)
            counted[i:i + 6] = (side.packets, side.bytes, side.dropped_packets, side.dropped_bytes,
                                side.delayed_packets, side.delayed_bytes)

    def _look(self, engine: Engine, now: float) -> None:
        """The flows that had packets since the last look: tracked ones caught up; one whose
        connection closed while still under inspection is counted (and tracked) from now."""
        tracked_of = self._tracked
        for flow in engine.recent_flows(self._looked):
            tracked = tracked_of.get(flow.id)
            if tracked is None:
                if flow.state != State.INSPECTING or not flow.closed:
                    continue
                tracked = tracked_of[flow.id] = _Tracked(flow, "inspection", _NONE)
            self._catch_up(tracked)
        self._looked = now
        ended, seen = engine.counters.ended, self._ended_seen
        for key, total in ended.items():
            if total > seen.get(key, 0):
                self.ended.labels(*key).inc(total - seen.get(key, 0))
                seen[key] = total

    def hook_error(self) -> None:
        self.errors.labels("hook").inc()

    def fast_flow_added(self, key: bytes, direction: str, rule: str = "none", name: str | None = None) -> None:
        """A direction of a flow the kernel now forwards (rule none) or polices (that rule): its
        bytes and packets come from the kernel's counters from now on (see `tick`)."""
        labels = (rule, self._name(rule, name), direction)
        self._fast_labels[key] = self._label_sets.setdefault(labels, labels)
        self._fast_seen[key] = _NOTHING_SEEN
        self._fast_walk[key] = self._walk

    def queue_dropped(self, total: int) -> None:
        """The kernel's running count of packets it dropped because the censor's queue or socket
        was full (`nfqueue.queue_losses`)."""
        if total > self._queue_dropped_seen:
            new = total - self._queue_dropped_seen
            self.lost.inc(new)
            self.packets.labels("none", "other", "unknown", "queue", "dropped").inc(new)
            self._queue_dropped_seen = total

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
                if rule.action == "loss":  # no rate or burst: a limit of 0 would read as a freeze
                    self.loss.labels(rule.name, direction).set(rule.probability)
                    continue
                self.limit.labels(rule.name, direction, rule.action).set(rule.rate)
                self.burst.labels(rule.name, direction, rule.action).set(rule.burst)

    # ---- once a second ----------------------------------------------------------------------
    def tick(self, engine: Engine, held: int, fast: Mapping[bytes, KernelCounters] | None, now: float,
             connmark: Mapping[str, tuple[int, int]] | None = None) -> None:
        """Once a second: gauges from the flow table, what the engine judged since the last tick,
        the kernel's counters, speeds.

        `fast`: the eBPF program's cumulative counters per flow key; `connmark`: the cumulative
        (packets, bytes) per direction ("upload", "download") the firewall's conntrack-mark rule
        forwarded (`firewall.connmark_counters`). `now` is the censor's clock (its event loop's),
        the one its events are stamped with."""
        self._show_rules(engine)
        self._look(engine, now)
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
        if connmark is not None:
            self.connmark_tick(connmark)
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

    def connmark_tick(self, totals: Mapping[str, tuple[int, int]]) -> None:
        """The firewall's conntrack-mark rule counters, cumulative (packets, bytes) per direction:
        what is new since the last read is counted at stage connmark. A counter that went back (the
        rules made again) counts from there."""
        for direction, (packets, size) in totals.items():
            seen_packets, seen_bytes = self._connmark.get(direction, (0, 0))
            if packets < seen_packets:
                seen_packets = seen_bytes = 0
            if packets > seen_packets:
                self._count(("none", "other", direction), "connmark", "passed", packets - seen_packets,
                            size - seen_bytes)
            self._connmark[direction] = (packets, size)

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


class _Tracked:
    """A flow whose engine-judged packets are counted by difference: at which stage, under which
    labels per direction, and what of its counters is counted already (per direction: packets,
    bytes, dropped packets and bytes, delayed packets and bytes)."""

    __slots__ = ("flow", "stage", "labels", "counted")

    def __init__(self, flow: Flow, stage: str, labels: tuple[tuple[str, str, str], tuple[str, str, str]]) -> None:
        self.flow = flow
        self.stage = stage
        self.labels = labels
        self.counted = [0] * 12


_NONE = (("none", "other", "upload"), ("none", "other", "download"))
_SEEN = struct.Struct("=QQQQ")
_NOTHING_SEEN = _SEEN.pack(0, 0, 0, 0)
