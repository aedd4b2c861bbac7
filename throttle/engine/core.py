"""The censor engine: packet bytes and `now` in, verdicts out. No I/O, no clock, no threads.

`Engine.process(packet, now)` takes one IPv4 or IPv6 packet (no link layer) and returns a
`(verdict, release_at)` pair (see `Verdict`): ACCEPT, BYPASS (pass it and hand the flow back to
the kernel), DROP, or HOLD until `release_at` (the shaper). `next_timer()` is when
`handle_timer(now)` wants to run next (idle flows to forget). `drain_events()` returns what
happened since the last call, for metrics and reports.

The engine is a small facade over its parts, one per stage a packet meets:

    throttle.wire.ip      where the transport header is; the flow key
    engine.flows          the flow table (both orientations, recency, bounded)
    engine.inspect        the model's inspection window: names from SNI, Host, DNS answers
    engine.rules          which rule a name, an address or a sticky server selects
    engine.enforce        the limited flow's token buckets (or random loss): pass, drop, or hold

Nothing here draws on the machine's entropy: loss rules draw from the `random.Random` the engine
is given, seeded, so the same packets at the same times get the same verdicts.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from throttle.engine.buckets import Bucket
from throttle.engine.enforce import ACCEPT, BYPASS, Decision, Enforcer
from throttle.engine.events import EngineError, Event, FlowDecided, FlowEnded, FlowStarted, ResetRequested, Verdict
from throttle.engine.flows import DOWNLOAD, UPLOAD, Direction, EndReason, Flow, FlowTable, NameSource, Side, State
from throttle.engine.inspect import Found, Inspector
from throttle.engine.rules import RuleSet, in_networks
from throttle.scenario import Model, Rule
from throttle.wire.ip import (ACK, FIN, NO_PORTS, RST, SYN, TCP, TCP_HEADER, UDP, UDP_HEADER, addresses, flow_key,
                              ip_end, ipv4_header_length, locate, opens_connection, ports, reverse_key, tcp_ack,
                              tcp_flags, tcp_header_length, tcp_seq)
from throttle.wire.names import normalise

_KEY_LENGTH = {4: 13, 6: 37}
_PASSED = State.PASSED  # read on every packet of a decided flow: one global, not an attribute too
MAX_NAME = 253  # bytes in the longest DNS name


class Counters:
    """Packets and bytes by verdict (indexed by `Verdict`), and malformed packets."""

    __slots__ = ("packets", "bytes", "malformed", "internal", "long_names", "ended")

    def __init__(self) -> None:
        self.packets = [0, 0, 0, 0]
        self.bytes = [0, 0, 0, 0]
        self.malformed = 0
        self.internal = 0  # bugs caught on the per-packet path (packet passed); must stay 0
        self.long_names = 0  # names over MAX_NAME bytes, not matched
        # Connections that ended, by the flow's state then (inspecting: before any verdict) and
        # how (fin, rst, idle, evicted, reused), each once; also under models that keep a flow's
        # state past its end (then the flow stays in the table, and a new connection on its
        # 5-tuple, "reused", joins it).
        self.ended: dict[tuple[str, EndReason], int] = {}


class Engine:
    """The censor. One instance per censor process; not thread-safe (one event loop drives it)."""

    def __init__(self, model: Model, rules: tuple[Rule, ...] | list[Rule], rng: random.Random | None = None) -> None:
        """`rng` gives loss rules their draws (default: seeded with 0, so runs repeat exactly)."""
        self.model = model
        self.rules = tuple(rules)
        self.counters = Counters()
        self._events: list[Event] = []
        emit = self._events.append
        self._flows = FlowTable()
        self._table = self._flows.by_key  # read on the per-packet path
        self._lru = self._flows.recency
        self._inspector = Inspector(model, emit)
        self._rules = RuleSet(self.rules, model.max_flows)
        self._enforcer = Enforcer(emit, model.max_flows, rng)
        self._inside = tuple(model.inside)
        self._budget = model.window_packets
        self._max_inspected = self._inspector.max_inspected
        # UDP flows other than DNS are inspected for QUIC Initials when names come from them or a
        # rule matches QUIC versions; otherwise they pass at once.
        self._quic = "quic" in model.name_sources or bool(self._rules.version_rules)
        self._judging: tuple[Flow, Direction, int] | None = None  # the packet being judged, counted in its side

    # ---- the per-packet path -------------------------------------------------------------
    def process(self, packet: bytes, now: float, from_inside: bool | None = None) -> Decision:
        """Decide one packet. Never raises for any input; malformed packets are passed."""
        try:
            version, proto, l4 = locate(packet)
        except IndexError:
            return self._malformed("truncated IP header", now, len(packet))
        if version == 0:
            return self._malformed("not an IP packet", now, len(packet))
        # The flow key would be read from inside the header. (`l4` is the IPv4 header's length,
        # except for a non-first fragment, whose is 0: only then is the header read again.)
        if version == 4 and l4 < 20 and ipv4_header_length(packet) < 20:
            return self._malformed("IPv4 header length below 20 bytes", now, len(packet))
        if proto != TCP and proto != UDP:
            return self._count(BYPASS if proto != NO_PORTS else ACCEPT, len(packet))
        key = flow_key(packet, version, proto, l4)
        if len(key) != _KEY_LENGTH[version]:
            return self._malformed("truncated transport header", now, len(packet))

        entry = self._table.get(key)
        if entry is not None:
            flow, d = entry
            if proto == TCP and opens_connection(packet, l4):
                if (flow.sides[0].payload or flow.state) and self.model.syn_restarts_flow:
                    # A new connection on the 5-tuple of an old one (its end unseen): start afresh.
                    self._end(flow, now, "reused")
                    entry = None
                elif flow.sides[0].payload or flow.closed:
                    self._rejoined(flow)
            if entry is not None and flow.state == _PASSED:
                # The fast path: a decided flow. Counters, recency, and back to the kernel.
                flow.last_seen = now
                self._lru.move_to_end(flow.id)
                size = len(packet)
                side = flow.sides[d]
                side.packets += 1
                side.bytes += size
                c = self.counters
                c.packets[1] += 1
                c.bytes[1] += size
                return BYPASS
        try:
            return self._slow_path(packet, now, from_inside, version, proto, l4, key, entry)
        except (IndexError, ValueError, ArithmeticError, KeyError, TypeError, AttributeError) as exc:
            # A bug, not the peer's mistake: the packet passes (fail-open), and the error is counted
            # apart from malformed input, so that tests and the exporter see it.
            self.counters.internal += 1
            self._judging = None
            self._events.append(EngineError("internal", f"{type(exc).__name__}: {exc}", now))
            return self._count(ACCEPT, len(packet))

    def _slow_path(self, packet: bytes, now: float, from_inside: bool | None, version: int, proto: int,
                   l4: int, key: bytes, entry: tuple[Flow, Direction] | None) -> Decision:
        size = len(packet)
        # Where the IP packet really ends: a link layer may have padded a short frame.
        end = ip_end(packet, version)
        if proto == TCP:
            if end < l4 + TCP_HEADER:
                return self._malformed("truncated TCP header", now, size)
            seq = tcp_seq(packet, l4)
            flags = tcp_flags(packet, l4)
            data_off = tcp_header_length(packet, l4)
            payload = packet[l4 + data_off : end] if data_off >= TCP_HEADER else b""
        else:
            if end < l4 + UDP_HEADER:
                return self._malformed("truncated UDP header", now, size)
            seq = flags = 0
            payload = packet[l4 + UDP_HEADER : end]
        if entry is None:
            flow, d = self._new_flow(packet, now, from_inside, version, proto, l4, key, flags)
        else:
            flow, d = entry
        flow.last_seen = now
        self._lru.move_to_end(flow.id)
        side = flow.sides[d]
        side.packets += 1
        side.bytes += size
        self._judging = (flow, d, size)
        carried = side.payload
        side.payload += len(payload)

        inspecting = flow.state == State.INSPECTING
        if inspecting:
            if proto == UDP:
                if flow.server_port == 53 or flow.client_port == 53:
                    if d == DOWNLOAD:
                        self._inspector.dns_answer(payload, now)
                        self._close_inspection(flow, now)
                elif d == UPLOAD and payload:
                    self._quic_datagram(flow, side, payload, now)
                if flow.state == State.INSPECTING and self._window_over(flow):
                    self._close_inspection(flow, now)
            else:
                if flags & SYN:
                    seq = side.next_seq = (seq + 1) & 0xFFFFFFFF  # data in a SYN (TCP Fast Open) is at ISN+1
                if payload:
                    self._take(flow, *self._inspector.tcp(side, payload, seq, flow.sides[1 - d]), now)
                if flow.state == State.INSPECTING and self._window_over(flow):
                    self._close_inspection(flow, now)
        rule = flow.rule
        if inspecting and flow.state == State.LIMITED and rule is not None and rule.action in ("drop", "rst"):
            result = ACCEPT  # the packet that completes the match passes; the drops start after it (§4.29)
            if rule.action == "rst" and proto == TCP:
                self._reset(flow, d, packet, l4, seq, len(payload), now)
        else:
            result = self._enforcer.enforce(flow, d, side, size, carried, now)
        self._judging = None
        if proto == TCP and flags & (FIN | RST):
            if flags & RST:
                reason: EndReason | None = "rst"
            else:
                side.fin = True
                reason = "fin" if flow.sides[1 - d].fin else None
            if reason is not None:
                if self.model.fin_rst_ends_flow:
                    self._end(flow, now, reason)
                elif not flow.closed:
                    self._ended(flow, reason)  # the model keeps the flow; its connection is over
        return self._count(result, size)

    def _reset(self, flow: Flow, d: Direction, packet: bytes, l4: int, seq: int, length: int, now: float) -> None:
        """Ask the adapter for a RST each way after this packet (a rule with action "rst", §2.17):
        its sender's next sequence number is seq + length; the other end's is the packet's ack."""
        sent = (seq + length) & 0xFFFFFFFF
        acked = tcp_ack(packet, l4)
        from_sender, from_receiver = (sent, acked), (acked, sent)
        if d == UPLOAD:
            event = ResetRequested(flow, d, from_sender, from_receiver, now)
        else:
            event = ResetRequested(flow, d, from_receiver, from_sender, now)
        self._events.append(event)

    def _quic_datagram(self, flow: Flow, side: Side, payload: bytes, now: float) -> None:
        """A client datagram of a UDP flow under inspection: its QUIC version (for version rules,
        §4.25) when it is the first, then the ClientHello of its Initials (§4.26-29)."""
        version = self._inspector.initial_version(payload)  # the long header alone, read once
        if version is not None and side.inspected == 0 and self._rules.version_rules:
            rule = self._rules.by_quic_version(flow, version)
            if rule is not None:
                flow.name_source = "version"
                self._decide(flow, rule, now)
                return
        self._take(flow, *self._inspector.quic(side, payload, now, version), now)

    def _take(self, flow: Flow, found: list[Found], give_up: bool, now: float) -> None:
        """What inspecting one packet gave: the names found, in order, and whether to give up."""
        if give_up:
            self._close_inspection(flow, now, give_up=True)
        for name, source, ech in found:
            if flow.state != State.INSPECTING:
                break
            self._name_found(flow, name, source, now, ech)

    def _count(self, result: Decision, size: int) -> Decision:
        c = self.counters
        c.packets[result[0]] += 1
        c.bytes[result[0]] += size
        return result

    def _malformed(self, detail: str, now: float, size: int) -> Decision:
        self.counters.malformed += 1
        self._events.append(EngineError("malformed", detail, now))
        return self._count(ACCEPT, size)

    # ---- flows ---------------------------------------------------------------------------
    def _new_flow(self, packet: bytes, now: float, from_inside: bool | None, version: int, proto: int,
                  l4: int, key: bytes, flags: int) -> tuple[Flow, Direction]:
        src, dst = addresses(packet, version)
        sport, dport = ports(packet, l4)
        # The opener is the client. Mid-stream (no SYN seen) the side on the lower, well-known
        # port is taken to be the server; a SYN-ACK comes from the server.
        reverse = False
        if proto == TCP and flags & SYN:
            reverse = bool(flags & ACK)
        elif proto == TCP and sport < dport and sport < 1024:
            reverse = True
        elif proto == UDP and sport == 53 and dport != 53:
            reverse = True
        flows = self._flows
        if len(flows) >= self.model.max_flows:
            self.handle_timer(now)
            while len(flows) >= self.model.max_flows:
                oldest = flows.oldest()
                assert oldest is not None
                self._end(oldest, now, "evicted")
        if reverse:
            flow = Flow(flows.new_id(), proto, dst, dport, src, sport, now, self._budget)
        else:
            flow = Flow(flows.new_id(), proto, src, sport, dst, dport, now, self._budget)
        d: Direction = DOWNLOAD if reverse else UPLOAD
        flows.add(flow, key, reverse_key(key), d)
        if from_inside is not None:
            flow.eligible = from_inside != reverse
        elif self._inside:
            flow.eligible = in_networks(flow.client, self._inside)
        self._events.append(FlowStarted(flow, now))
        if not flow.eligible:
            self._decide(flow, None, now)
            return flow, d
        flow.dns_names = self._inspector.learned_names(flow.server, now)
        rule = self._rules.by_address(flow)
        if rule is not None:
            flow.name_source = "address"
            self._decide(flow, rule, now)
        if flow.state == State.INSPECTING:
            sticky = self._rules.sticky(flow, now)
            if sticky is not None:
                flow.name_source = "sticky"  # §20: an earlier flow to this address triggered
                self._decide(flow, sticky, now)
        if flow.state == State.INSPECTING and proto == UDP:
            if self._inspector.udp_inspectable(flow.server_port, flow.client_port):
                pass  # DNS: its answers are read
            elif self._quic and flow.server_port != 53 and flow.client_port != 53:
                flow.sides[DOWNLOAD].closed = True  # a server's datagrams carry no client hello
            else:
                self._close_inspection(flow, now)
        return flow, d

    def _end(self, flow: Flow, now: float, reason: EndReason) -> None:
        if flow.end_reason is not None:
            return
        flow.end_reason = reason
        if not flow.closed:
            self._ended(flow, reason)
        self._flows.remove(flow)
        self._events.append(FlowEnded(flow, now, reason))

    def _ended(self, flow: Flow, reason: EndReason) -> None:
        """Count the end of `flow`'s connection once, by the state it ended in."""
        flow.closed = True
        key = (flow.state.label, reason)
        ended = self.counters.ended
        ended[key] = ended.get(key, 0) + 1

    def _rejoined(self, flow: Flow) -> None:
        """A new connection on the 5-tuple of a flow the model keeps (syn_restarts_flow false):
        the old connection ended (counted as reused unless its end was seen); the new one goes on
        with the flow's state, and its own end is counted again."""
        if not flow.closed:
            self._ended(flow, "reused")
        flow.closed = False
        for side in flow.sides:
            side.fin = False

    def next_timer(self) -> float | None:
        """The time `handle_timer` should next be called at, or None when nothing is pending."""
        oldest = self._flows.oldest()
        return None if oldest is None else oldest.last_seen + self.model.idle_timeout

    def handle_timer(self, now: float) -> None:
        """Forget flows idle for the model's idle timeout (the least recent come first)."""
        timeout = self.model.idle_timeout
        while (oldest := self._flows.oldest()) is not None and oldest.last_seen + timeout <= now:
            self._end(oldest, now, "idle")

    @property
    def holes(self) -> int:
        """Data segments that came before their direction's first one (its bytes unseen so far)."""
        return self._inspector.holes

    def bucket(self, flow: Flow, d: Direction, now: float) -> Bucket | None:
        """The bucket limiting direction `d` of a limited flow, shared ones included (see
        `Enforcer.bucket`); None when that direction is not limited. (An adapter has it already:
        the decision's event carries it, `FlowDecided.limits`.)"""
        return self._enforcer.bucket(flow, d, now)

    def table_sizes(self) -> dict[str, int]:
        """Entries in each of the engine's bounded tables (each has its bound in the model)."""
        return {"flows": len(self._flows), "shared_buckets": len(self._enforcer), "sticky": len(self._rules),
                "dns": self._inspector.learned}

    def flows(self) -> list[Flow]:
        return list(self._flows)

    def recent_flows(self, since: float) -> Iterator[Flow]:
        """The flows that had a packet at or after `since`, most recent first (the flow table's
        recency order: an exporter visits only what changed since its last look)."""
        for flow in reversed(self._lru.values()):
            if flow.last_seen < since:
                return
            yield flow

    def drain_events(self) -> list[Event]:
        events = self._events.copy()
        self._events.clear()
        return events

    # ---- classification ------------------------------------------------------------------
    def _name_found(self, flow: Flow, raw: str, source: NameSource, now: float, ech: bool = False) -> None:
        if raw == "":
            if flow.dns_names:  # no SNI: the name its address was resolved from, if any
                self._classify_by_dns(flow, now)
            return
        name = self._normalise(raw)
        if len(name) > MAX_NAME:
            # No DNS name is longer (RFC 1035): not a name to match, and kept out of the report.
            self.counters.long_names += 1
            return
        flow.names_seen.append((name, source))
        flow.name, flow.name_source = name, source
        rule = self._rules.by_name(flow, name, ech)
        if rule is not None:
            self._decide(flow, rule, now)
        elif not self.model.inspect_after_name:
            self._decide(flow, None, now)

    def _normalise(self, raw: str) -> str:
        return normalise(raw, strip_trailing_dot=self.model.strip_trailing_dot)

    def _classify_by_dns(self, flow: Flow, now: float) -> bool:
        for name in flow.dns_names:
            rule = self._rules.by_name(flow, name)
            if rule is not None:
                flow.name, flow.name_source = name, "dns"
                self._decide(flow, rule, now)
                return True
        if flow.name is None:
            flow.name, flow.name_source = flow.dns_names[0], "dns"
        return False

    def _window_over(self, flow: Flow) -> bool:
        up, down = flow.sides
        if up.closed and down.closed:
            return True
        # One side may never send data (or only ACKs): bound the packets a flow stays undecided.
        return up.packets + down.packets > 4 * self._max_inspected + 8

    def _close_inspection(self, flow: Flow, now: float, give_up: bool = False) -> None:
        if flow.state != State.INSPECTING:
            return
        if not give_up and flow.dns_names and flow.name_source not in ("sni", "quic", "host"):
            if self._classify_by_dns(flow, now):
                return
        self._decide(flow, None, now)

    def _decide(self, flow: Flow, rule: Rule | None, now: float) -> None:
        up, down = flow.sides
        counts = [up.packets, up.bytes, down.packets, down.bytes]
        judging = self._judging
        if judging is not None and judging[0] is flow:  # the deciding packet is judged after the decision
            counts[2 * judging[1]] -= 1
            counts[2 * judging[1] + 1] -= judging[2]
        flow.decided_counts = (counts[0], counts[1], counts[2], counts[3])
        for side in flow.sides:
            side.buffer = b""
            side.pending.clear()
            side.closed = True
        if rule is None or not flow.eligible:
            flow.state = State.PASSED
        else:
            flow.state = State.LIMITED
            flow.rule = rule
            if rule.sticky > 0 and flow.name_source != "sticky":  # only a real trigger re-arms it
                self._rules.arm(flow, rule, now)
        self._events.append(FlowDecided(flow, now, self._enforcer.limits(flow, now)))


__all__ = ["Counters", "Engine", "Verdict"]
