"""The censor engine: packet bytes and `now` in, verdicts out. No I/O, no clock, no threads.

`Engine.process(packet, now)` takes one IPv4 or IPv6 packet (no link layer) and returns a
`(verdict, release_at)` pair:
- ACCEPT  pass this packet; the flow is still being inspected or is limited;
- BYPASS  pass it, and hand the flow back to the kernel: it is decided and not limited, so an
          adapter can mark its conntrack entry and stop queueing it;
- DROP    the policer (or a full shaper queue) drops it;
- HOLD    keep it and release it at `release_at` (the shaper).
`next_timer()` is when `handle_timer(now)` wants to run next (idle flows to forget).
`drain_events()` returns what happened since the last call, for metrics and reports.

A flow is keyed by its 5-tuple in both orientations; it remembers which side opened it (the
client, whose traffic is "upload"). Inspection follows the scenario's `Model`: the 2021 TSPU looked
at the first data packet per direction, kept looking for 15-20 more once it saw a TLS record, gave
up for good on an unparseable first packet of 101 bytes or more, and never reassembled TCP
(censor-behaviors §5-6); the reassembling model joins segments in order up to a bound.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import IntEnum
from struct import unpack_from
from typing import Any

from throttle import dns as dnsparse
from throttle import http as httpparse
from throttle import tls
from throttle.bucket import Policer, Shaper
from throttle.errors import ParseError
from throttle.names import normalise
from throttle.scenario import Model, Rule

UPLOAD, DOWNLOAD = 0, 1
DIRECTION_NAMES = ("upload", "download")
TCP, UDP = 6, 17
_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10
# IPv6 extension headers that may sit between the fixed header and TCP/UDP.
_IPV6_EXT = frozenset((0, 43, 60, 135, 139, 140, 253, 254))
_IPV6_FRAGMENT, _IPV6_AH = 44, 51


class Verdict(IntEnum):
    ACCEPT = 0
    BYPASS = 1
    DROP = 2
    HOLD = 3


class State(IntEnum):
    INSPECTING = 0
    PASSED = 1  # decided, not limited
    LIMITED = 2


_R_ACCEPT = (Verdict.ACCEPT, 0.0)
_R_BYPASS = (Verdict.BYPASS, 0.0)
_R_DROP = (Verdict.DROP, 0.0)


class _Side:
    """Per-direction state of a flow: counters, the inspection window, the reassembly buffer."""

    __slots__ = (
        "packets", "bytes", "payload", "dropped_packets", "dropped_bytes", "delayed_packets",
        "delayed_bytes", "delay_total", "budget", "extended", "inspected", "buffer", "next_seq",
        "pending", "closed", "fin", "tls_offset",
    )

    def __init__(self, budget: int) -> None:
        self.packets = self.bytes = self.payload = 0
        self.dropped_packets = self.dropped_bytes = 0
        self.delayed_packets = self.delayed_bytes = 0
        self.delay_total = 0.0
        self.budget = budget  # data packets this direction may still be inspected
        self.extended = False
        self.inspected = 0
        self.buffer = b""  # reassembled stream from the first data byte (reassembling model)
        self.next_seq = -1
        self.pending: dict[int, bytes] = {}  # out-of-order segments by sequence number
        self.closed = False  # inspection of this direction is over
        self.fin = False
        self.tls_offset = 0  # reassembling model: where the next unread TLS record starts


class Flow:
    """One connection as the censor sees it. Mutable; the engine owns it, reports may read it."""

    __slots__ = (
        "id", "proto", "client", "server", "client_port", "server_port", "first_seen", "last_seen",
        "state", "name", "name_source", "names_seen", "rule", "eligible", "sides", "buckets",
        "dns_names", "end_reason", "key", "rkey",
    )

    def __init__(self, fid: int, proto: int, client: bytes, cport: int, server: bytes, sport: int, now: float, budget: int) -> None:
        self.id = fid
        self.proto = proto
        self.client, self.client_port = client, cport
        self.server, self.server_port = server, sport
        self.first_seen = self.last_seen = now
        self.state = State.INSPECTING
        self.name: str | None = None  # the name that decided the flow (or the last one seen)
        self.name_source: str | None = None  # sni | host | dns
        self.names_seen: list[tuple[str, str]] = []
        self.rule: Rule | None = None
        self.eligible = True
        self.sides = (_Side(budget), _Side(budget))
        self.buckets: list[Any] = [None, None]
        self.dns_names: tuple[str, ...] = ()
        self.end_reason: str | None = None
        self.key: bytes = b""
        self.rkey: bytes = b""

    @property
    def transport(self) -> str:
        return "tcp" if self.proto == TCP else "udp" if self.proto == UDP else str(self.proto)

    @property
    def client_endpoint(self) -> str:
        return _endpoint(self.client, self.client_port)

    @property
    def server_endpoint(self) -> str:
        return _endpoint(self.server, self.server_port)

    @property
    def verdict(self) -> str:
        return ("undecided", "passed", "limited")[self.state]


def _endpoint(addr: bytes, port: int) -> str:
    ip = ipaddress.ip_address(addr)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


# Events (drained by adapters for metrics, and by `classify` for its report).
@dataclass(frozen=True, slots=True)
class FlowStarted:
    flow: Flow
    at: float


@dataclass(frozen=True, slots=True)
class FlowDecided:
    flow: Flow
    at: float


@dataclass(frozen=True, slots=True)
class FlowEnded:
    flow: Flow
    at: float
    reason: str  # idle | fin | rst | evicted


@dataclass(frozen=True, slots=True)
class Limited:
    """One packet of a limited flow met its bucket: passed, dropped, or held for `delay` seconds."""

    rule: str
    name: str
    direction: int
    size: int
    verdict: Verdict
    delay: float
    at: float


@dataclass(frozen=True, slots=True)
class NameLearned:
    address: bytes
    names: tuple[str, ...]
    ttl: int
    at: float


@dataclass(frozen=True, slots=True)
class EngineError:
    kind: str
    detail: str
    at: float


@dataclass
class Counters:
    packets: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # by Verdict
    bytes: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    malformed: int = 0


class Engine:
    """The censor. One instance per censor process; not thread-safe (one event loop drives it)."""

    def __init__(self, model: Model, rules: tuple[Rule, ...] | list[Rule]) -> None:
        self.model = model
        self.rules = tuple(rules)
        self._table: dict[bytes, tuple[Flow, int]] = {}
        self._lru: OrderedDict[int, Flow] = OrderedDict()
        self._next_id = 0
        self._events: list[Any] = []
        self._shared_buckets: dict[tuple[Any, ...], Any] = {}
        self._dns: OrderedDict[bytes, tuple[tuple[str, ...], float]] = OrderedDict()
        self.counters = Counters()
        self._inside = tuple(model.inside)
        self._sources = frozenset(model.name_sources)
        self._address_rules = tuple(r for r in self.rules if r.addresses and not r.patterns)
        self._sticky: dict[bytes, tuple[Rule, float]] = {}  # server address -> (rule, until)
        self._budget = model.window_packets
        self._max_inspected = model.window_packets + model.window_extension

    # ---- the per-packet path -------------------------------------------------------------
    def process(self, packet: bytes, now: float, from_inside: bool | None = None) -> tuple[Verdict, float]:
        """Decide one packet. Never raises for any input; malformed packets are passed."""
        try:
            head = packet[0] >> 4
            if head == 4:
                ihl = (packet[0] & 0x0F) << 2
                proto = packet[9]
                if proto != TCP and proto != UDP:
                    return self._count(_R_BYPASS, len(packet))
                if packet[6] & 0x1F or packet[7]:  # a non-first fragment: no ports to key by
                    return self._count(_R_ACCEPT, len(packet))
                key = packet[9:10] + packet[12:20] + packet[ihl : ihl + 4]
                l4 = ihl
            elif head == 6:
                proto, l4 = _ipv6_transport(packet)
                if proto != TCP and proto != UDP:
                    return self._count(_R_BYPASS if proto >= 0 else _R_ACCEPT, len(packet))
                key = bytes((proto,)) + packet[8:40] + packet[l4 : l4 + 4]
            else:
                return self._malformed("not an IP packet", now, len(packet))
            if len(key) != (13 if head == 4 else 37):
                return self._malformed("truncated transport header", now, len(packet))
        except IndexError:
            return self._malformed("truncated IP header", now, len(packet))

        entry = self._table.get(key)
        if entry is not None:
            flow, d = entry
            if proto == TCP and len(packet) > l4 + 13 and packet[l4 + 13] & 0x12 == 0x02 and (
                    flow.sides[0].payload or flow.state):
                # A new connection on the 5-tuple of an old one (its end unseen): start afresh.
                self._end(flow, now, "reused")
                entry = None
            elif flow.state == State.PASSED:
                # The fast path: a decided flow. Counters, recency, and back to the kernel.
                flow.last_seen = now
                self._lru.move_to_end(flow.id)
                side = flow.sides[d]
                side.packets += 1
                side.bytes += len(packet)
                c = self.counters
                c.packets[1] += 1
                c.bytes[1] += len(packet)
                return _R_BYPASS
        try:
            return self._slow_path(packet, now, from_inside, head, proto, l4, key, entry)
        except (IndexError, ValueError) as exc:  # defensive: a bug here must not lose a packet
            return self._malformed(f"{type(exc).__name__}: {exc}", now, len(packet))

    def _slow_path(self, packet: bytes, now: float, from_inside: bool | None, head: int, proto: int,
                   l4: int, key: bytes, entry: tuple[Flow, int] | None) -> tuple[Verdict, float]:
        size = len(packet)
        # Where the IP packet really ends: a link layer may have padded a short frame.
        end = min(size, unpack_from("!H", packet, 2)[0] if head == 4 else 40 + unpack_from("!H", packet, 4)[0])
        if proto == TCP:
            if end < l4 + 20:
                return self._malformed("truncated TCP header", now, size)
            seq = unpack_from("!I", packet, l4 + 4)[0]
            flags = packet[l4 + 13]
            data_off = (packet[l4 + 12] >> 4) << 2
            payload = packet[l4 + data_off : end] if data_off >= 20 else b""
        else:
            if end < l4 + 8:
                return self._malformed("truncated UDP header", now, size)
            seq = flags = 0
            payload = packet[l4 + 8 : end]
        if entry is None:
            flow, d = self._new_flow(packet, now, from_inside, head, proto, l4, key, flags)
        else:
            flow, d = entry
        flow.last_seen = now
        self._lru.move_to_end(flow.id)
        side = flow.sides[d]
        side.packets += 1
        side.bytes += size
        carried = side.payload
        side.payload += len(payload)

        if flow.state == State.INSPECTING:
            if proto == UDP:
                self._inspect_udp(flow, d, payload, now)
            else:
                if flags & _SYN:
                    side.next_seq = (seq + 1) & 0xFFFFFFFF
                if payload:
                    self._inspect_tcp(flow, d, side, payload, seq, now)
                if flow.state == State.INSPECTING and self._window_over(flow):
                    self._close_inspection(flow, now)
        result = self._enforce(flow, d, side, size, carried, now)
        if proto == TCP and flags & (_FIN | _RST) and self.model.fin_rst_ends_flow:
            if flags & _RST:
                self._end(flow, now, "rst")
            else:
                side.fin = True
                if flow.sides[1 - d].fin:
                    self._end(flow, now, "fin")
        return self._count(result, size)

    def _count(self, result: tuple[Verdict, float], size: int) -> tuple[Verdict, float]:
        c = self.counters
        c.packets[result[0]] += 1
        c.bytes[result[0]] += size
        return result

    def _malformed(self, detail: str, now: float, size: int) -> tuple[Verdict, float]:
        self.counters.malformed += 1
        self._events.append(EngineError("malformed", detail, now))
        return self._count(_R_ACCEPT, size)

    # ---- flows ---------------------------------------------------------------------------
    def _new_flow(self, packet: bytes, now: float, from_inside: bool | None, head: int, proto: int,
                  l4: int, key: bytes, flags: int) -> tuple[Flow, int]:
        if head == 4:
            src, dst = packet[12:16], packet[16:20]
        else:
            src, dst = packet[8:24], packet[24:40]
        sport, dport = unpack_from("!HH", packet, l4)
        # The opener is the client. Mid-stream (no SYN seen) the side on the lower, well-known
        # port is taken to be the server; a SYN-ACK comes from the server.
        reverse = False
        if proto == TCP and flags & _SYN:
            reverse = bool(flags & _ACK)
        elif proto == TCP and sport < dport and sport < 1024:
            reverse = True
        elif proto == UDP and sport == 53 and dport != 53:
            reverse = True
        if len(self._lru) >= self.model.max_flows:
            self.handle_timer(now)
            while len(self._lru) >= self.model.max_flows:
                self._end(next(iter(self._lru.values())), now, "evicted")
        self._next_id += 1
        if reverse:
            flow = Flow(self._next_id, proto, dst, dport, src, sport, now, self._budget)
        else:
            flow = Flow(self._next_id, proto, src, sport, dst, dport, now, self._budget)
        rkey = bytes((proto,)) + dst + src + packet[l4 + 2 : l4 + 4] + packet[l4 : l4 + 2]
        flow.key, flow.rkey = key, rkey
        d = DOWNLOAD if reverse else UPLOAD
        self._table[key] = (flow, d)
        self._table[rkey] = (flow, 1 - d)
        self._lru[flow.id] = flow
        if from_inside is not None:
            flow.eligible = from_inside != reverse
        elif self._inside:
            ip = ipaddress.ip_address(flow.client)
            flow.eligible = any(ip in net for net in self._inside)
        self._events.append(FlowStarted(flow, now))
        if not flow.eligible:
            self._decide(flow, None, now)
            return flow, d
        if "dns" in self._sources:
            learned = self._dns.get(flow.server)
            if learned is not None and learned[1] > now:
                flow.dns_names = learned[0]
        for rule in self._address_rules:
            if self._rule_applies_to_address(rule, flow):
                flow.name_source = "address"
                self._decide(flow, rule, now)
                break
        if flow.state == State.INSPECTING and self._sticky:
            sticky = self._sticky.get(flow.server)
            if sticky is not None and sticky[1] > now:
                flow.name_source = "sticky"  # §20: an earlier flow to this address triggered
                self._decide(flow, sticky[0], now)
        if flow.state == State.INSPECTING and proto == UDP and not self._udp_inspectable(flow):
            self._close_inspection(flow, now)
        return flow, d

    def _end(self, flow: Flow, now: float, reason: str) -> None:
        if flow.end_reason is not None:
            return
        flow.end_reason = reason
        self._table.pop(flow.key, None)
        self._table.pop(flow.rkey, None)
        self._lru.pop(flow.id, None)
        self._events.append(FlowEnded(flow, now, reason))

    def next_timer(self) -> float | None:
        """The time `handle_timer` should next be called at, or None when nothing is pending."""
        for flow in self._lru.values():
            return flow.last_seen + self.model.idle_timeout
        return None

    def handle_timer(self, now: float) -> None:
        """Forget flows idle for the model's idle timeout (the least recent come first)."""
        timeout = self.model.idle_timeout
        lru = self._lru
        while lru:
            flow = next(iter(lru.values()))
            if flow.last_seen + timeout > now:
                break
            self._end(flow, now, "idle")

    def flows(self) -> list[Flow]:
        return list(self._lru.values())

    def drain_events(self) -> list[Any]:
        events, self._events = self._events, []
        return events

    # ---- inspection ----------------------------------------------------------------------
    def _udp_inspectable(self, flow: Flow) -> bool:
        return "dns" in self._sources and (flow.server_port == 53 or flow.client_port == 53)

    def _inspect_udp(self, flow: Flow, d: int, payload: bytes, now: float) -> None:
        if d == DOWNLOAD and flow.server_port == 53:
            try:
                response = dnsparse.parse_dns_response(payload)
            except ParseError as exc:
                self._events.append(EngineError("dns", str(exc), now))
            else:
                self._learn(response, now)
            self._close_inspection(flow, now)

    def _learn(self, response: Any, now: float) -> None:
        for record in response.records:
            names = tuple(normalise(n, strip_trailing_dot=True) for n in record.names)
            self._dns[record.address] = (names, now + record.ttl)
            self._dns.move_to_end(record.address)
            self._events.append(NameLearned(record.address, names, record.ttl, now))
        while len(self._dns) > self.model.dns_max_entries:
            self._dns.popitem(last=False)

    def _inspect_tcp(self, flow: Flow, d: int, side: _Side, payload: bytes, seq: int, now: float) -> None:
        if side.closed:
            return
        if self.model.reassemble:
            data = self._reassemble(side, payload, seq)
            if data is None:
                return
        else:
            data = payload
        side.inspected += 1
        side.budget -= 1
        first = side.inspected == 1
        if self.model.reassemble and "tls" in self._sources and tls.is_tls_record(data):
            for name in self._stream_names(side, data):
                if flow.state != State.INSPECTING:
                    return
                self._name_found(flow, name, "sni", now)
            name, source, recognised = None, "sni", True
        else:
            name, source, recognised = self._find_name(data)
        if recognised and not side.extended:
            side.extended = True
            side.budget += self.model.window_extension
        elif not recognised and first and len(payload) >= self.model.give_up_bytes and not self.model.reassemble:
            # §5: an unparseable first packet of 101 bytes or more ends inspection for good.
            self._close_inspection(flow, now, give_up=True)
            return
        elif not recognised and first:
            side.budget += 1  # a short unknown first packet does not use up the window
        if name is not None:
            self._name_found(flow, name, source, now)
        if side.budget <= 0 or side.inspected >= self._max_inspected:
            side.closed = True

    def _stream_names(self, side: _Side, data: bytes) -> list[str]:
        """Reassembling model: the SNI of every ClientHello completed in the stream since last time.

        Records before a hello (a ChangeCipherSpec, a decoy hello) are stepped over, so neither
        the `ccs` nor the `fake` trick of §7 hides the real hello from a censor that reads the
        stream ("" stands for a hello without SNI)."""
        names = []
        pos = side.tls_offset
        while len(data) - pos >= 5 and tls.is_tls_record(data[pos : pos + 3]):
            if data[pos] != tls.CONTENT_HANDSHAKE:
                end = pos + 5 + (data[pos + 3] << 8 | data[pos + 4])
                if end > len(data):
                    break
                pos = end
                continue
            try:
                hello = tls.parse_client_hello(data[pos:])
            except tls.TLSParseError:
                pos = len(data)  # not a hello: nothing further in this stream is read
                break
            if hello is None:
                break
            names.append(hello.sni or "")
            pos += hello.length
        side.tls_offset = pos
        return names

    def _find_name(self, data: bytes) -> tuple[str | None, str, bool]:
        """(name or None, its source, whether the bytes were recognised as TLS or HTTP)."""
        if tls.is_tls_record(data):
            if "tls" not in self._sources:
                return None, "sni", True
            try:
                hello = tls.parse_client_hello(data, first_record_only=not self.model.reassemble)
            except tls.TLSParseError:
                return None, "sni", True
            if hello is None:
                return None, "sni", True
            if hello.sni is None:
                return "", "sni", True  # a complete hello without SNI: the DNS name may apply
            return hello.sni, "sni", True
        if httpparse.looks_like_http_request(data):
            if "http" not in self._sources:
                return None, "host", True
            try:
                head = httpparse.parse_http_host(data)
            except ParseError:
                return None, "host", True
            if head is None or head.host is None:
                return None, "host", True
            return head.host, "host", True
        return None, "", False

    def _reassemble(self, side: _Side, payload: bytes, seq: int) -> bytes | None:
        """Append in-order bytes to the direction's stream; None when nothing new is in order."""
        if side.next_seq < 0:
            side.next_seq = seq
        limit = self.model.reassembly_limit
        offset = (seq - side.next_seq) & 0xFFFFFFFF
        if offset >= 0x80000000:  # starts before next_seq: a retransmission, maybe with new bytes
            overlap = (side.next_seq - seq) & 0xFFFFFFFF
            if overlap >= len(payload):
                return None
            payload, seq, offset = payload[overlap:], side.next_seq, 0
        if offset > 0:
            if len(side.buffer) + offset + len(payload) <= limit and len(side.pending) < 64:
                side.pending[seq] = payload
            return None
        grown = side.buffer + payload
        side.next_seq = (seq + len(payload)) & 0xFFFFFFFF
        while side.next_seq in side.pending:
            more = side.pending.pop(side.next_seq)
            grown += more
            side.next_seq = (side.next_seq + len(more)) & 0xFFFFFFFF
        side.buffer = grown[:limit]
        return side.buffer

    def _name_found(self, flow: Flow, raw: str, source: str, now: float) -> None:
        if raw == "":
            if flow.dns_names:  # no SNI: the name its address was resolved from, if any
                self._classify_by_dns(flow, now)
            return
        name = normalise(raw, strip_trailing_dot=self.model.strip_trailing_dot)
        flow.names_seen.append((name, source))
        flow.name, flow.name_source = name, source
        rule = self._match(flow, name)
        if rule is not None:
            self._decide(flow, rule, now)
        elif not self.model.inspect_after_name:
            self._decide(flow, None, now)

    def _classify_by_dns(self, flow: Flow, now: float) -> bool:
        for name in flow.dns_names:
            rule = self._match(flow, name)
            if rule is not None:
                flow.name, flow.name_source = name, "dns"
                self._decide(flow, rule, now)
                return True
        if flow.name is None:
            flow.name, flow.name_source = flow.dns_names[0], "dns"
        return False

    def _match(self, flow: Flow, name: str) -> Rule | None:
        for rule in self.rules:
            if rule.patterns and rule.matches_name(name):
                if rule.addresses and not self._in_networks(flow.server, rule.addresses):
                    continue
                if rule.ports and flow.server_port not in rule.ports:
                    continue
                return rule
        return None

    def _rule_applies_to_address(self, rule: Rule, flow: Flow) -> bool:
        if rule.ports and flow.server_port not in rule.ports:
            return False
        return self._in_networks(flow.server, rule.addresses)

    @staticmethod
    def _in_networks(addr: bytes, nets: tuple[Any, ...]) -> bool:
        ip = ipaddress.ip_address(addr)
        return any(ip.version == n.version and ip in n for n in nets)

    def _window_over(self, flow: Flow) -> bool:
        up, down = flow.sides
        if up.closed and down.closed:
            return True
        # One side may never send data (or only ACKs): bound the packets a flow stays undecided.
        return up.packets + down.packets > 4 * self._max_inspected + 8

    def _close_inspection(self, flow: Flow, now: float, give_up: bool = False) -> None:
        if flow.state != State.INSPECTING:
            return
        if not give_up and flow.dns_names and flow.name_source != "sni" and flow.name_source != "host":
            if self._classify_by_dns(flow, now):
                return
        self._decide(flow, None, now)

    def _decide(self, flow: Flow, rule: Rule | None, now: float) -> None:
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
                self._sticky[flow.server] = (rule, now + rule.sticky)
                if len(self._sticky) > self.model.max_flows:
                    self._sticky = {a: v for a, v in self._sticky.items() if v[1] > now}
        self._events.append(FlowDecided(flow, now))

    # ---- enforcement ---------------------------------------------------------------------
    def _enforce(self, flow: Flow, d: int, side: _Side, size: int, carried: int, now: float) -> tuple[Verdict, float]:
        if flow.state != State.LIMITED:
            return _R_BYPASS if flow.state == State.PASSED else _R_ACCEPT
        rule = flow.rule
        assert rule is not None
        if rule.direction != "both" and rule.direction != DIRECTION_NAMES[d]:
            return _R_ACCEPT
        if carried < rule.after_bytes:
            return _R_ACCEPT
        bucket = flow.buckets[d]
        if bucket is None:
            bucket = self._bucket(flow, rule, d, now)
        name = flow.name or ""
        if rule.action == "police":
            if bucket.allow(size, now):
                self._events.append(Limited(rule.name, name, d, size, Verdict.ACCEPT, 0.0, now))
                return _R_ACCEPT
            side.dropped_packets += 1
            side.dropped_bytes += size
            self._events.append(Limited(rule.name, name, d, size, Verdict.DROP, 0.0, now))
            return _R_DROP
        release = bucket.release_time(size, now)
        if release is None:
            side.dropped_packets += 1
            side.dropped_bytes += size
            self._events.append(Limited(rule.name, name, d, size, Verdict.DROP, 0.0, now))
            return _R_DROP
        if release <= now:
            self._events.append(Limited(rule.name, name, d, size, Verdict.ACCEPT, 0.0, now))
            return _R_ACCEPT
        side.delayed_packets += 1
        side.delayed_bytes += size
        side.delay_total += release - now
        self._events.append(Limited(rule.name, name, d, size, Verdict.HOLD, release - now, now))
        return (Verdict.HOLD, release)

    def _bucket(self, flow: Flow, rule: Rule, d: int, now: float) -> Any:
        if rule.scope == "flow":
            bucket = self._make_bucket(rule, now)
            flow.buckets[d] = bucket
            return bucket
        # Client and rule scopes share buckets across flows, one per direction (§9).
        key = (rule.name, d, flow.client if rule.scope == "client" else b"")
        bucket = self._shared_buckets.get(key)
        if bucket is None:
            bucket = self._shared_buckets[key] = self._make_bucket(rule, now)
        flow.buckets[d] = bucket
        return bucket

    @staticmethod
    def _make_bucket(rule: Rule, now: float) -> Any:
        if rule.action == "police":
            return Policer(rule.rate, rule.burst, now)
        return Shaper(rule.rate, rule.burst, now, max_delay=rule.queue_delay, max_bytes=rule.queue_bytes)


def _ipv6_transport(packet: bytes) -> tuple[int, int]:
    """(transport protocol, its header offset) of an IPv6 packet, walking extension headers.

    Returns protocol -1 for a non-first fragment or a packet cut short inside its headers (no
    ports to key by: pass it), and the real protocol otherwise (ICMPv6, ESP ... are bypassed).
    """
    nxt = packet[6]
    off = 40
    for _ in range(8):
        if nxt in _IPV6_EXT:
            nxt, off = packet[off], off + ((packet[off + 1] + 1) << 3)
        elif nxt == _IPV6_FRAGMENT:
            if (packet[off + 2] << 8 | packet[off + 3]) & 0xFFF8:
                return -1, off
            nxt, off = packet[off], off + 8
        elif nxt == _IPV6_AH:
            nxt, off = packet[off], off + ((packet[off + 1] + 2) << 2)
        else:
            return nxt, off
    return -1, off
