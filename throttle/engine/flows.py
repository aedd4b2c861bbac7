"""Flows and the flow table: what the engine remembers about each connection.

A flow is keyed by its 5-tuple in both orientations (`throttle.wire.ip.flow_key`); it remembers
which side opened it (the client, whose traffic is "upload") and, per direction, its counters and
inspection state. The table is bounded: the least recently seen flow is evicted first, and the
same order gives idle expiry in O(1) per expired flow.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterator
from enum import IntEnum
from typing import TYPE_CHECKING, Final, Literal

from throttle.wire.ip import TCP, UDP

if TYPE_CHECKING:
    from throttle.engine.buckets import Bucket
    from throttle.engine.proxy import Kind as ProxyKind
    from throttle.scenario import Rule
    from throttle.wire.quic import CryptoStream

UPLOAD: Final = 0
DOWNLOAD: Final = 1
Direction = Literal[0, 1]
DIRECTION_NAMES = ("upload", "download")

NameSource = Literal["sni", "quic", "host", "dns", "address", "sticky", "version"]
EndReason = Literal["idle", "fin", "rst", "evicted", "reused"]


class State(IntEnum):
    INSPECTING = 0  # still under inspection: its packets reach the engine
    PASSED = 1  # decided, not limited
    LIMITED = 2  # decided, limited by a rule

    @property
    def label(self) -> str:
        """The state as reports and metrics name it: inspecting, passed or limited."""
        return self.name.lower()


class Side:
    """Per-direction state of a flow: counters, the inspection window, the reassembly buffer."""

    __slots__ = (
        "packets", "bytes", "payload", "dropped_packets", "dropped_bytes", "delayed_packets",
        "delayed_bytes", "delay_total", "budget", "extended", "inspected", "buffer", "next_seq",
        "pending", "closed", "fin", "tls_offset", "quic", "proxy", "tunnel",
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
        self.quic: CryptoStream | None = None  # reassembling model: a QUIC client's CRYPTO frames
        self.proxy: ProxyKind = ""  # the proxy handshake messages this direction sent (engine.proxy)
        self.tunnel = 0  # reassembling model: where the stream inside the proxy's tunnel starts


class Flow:
    """One connection as the censor sees it. Mutable; the engine owns it, reports may read it."""

    __slots__ = (
        "id", "proto", "client", "server", "client_port", "server_port", "first_seen", "last_seen",
        "state", "name", "name_source", "names_seen", "rule", "eligible", "sides", "buckets",
        "dns_names", "end_reason", "key", "rkey", "decided_counts", "closed",
    )

    def __init__(self, fid: int, proto: int, client: bytes, cport: int, server: bytes, sport: int, now: float,
                 budget: int) -> None:
        self.id = fid
        self.proto = proto
        self.client, self.client_port = client, cport
        self.server, self.server_port = server, sport
        self.first_seen = self.last_seen = now
        self.state = State.INSPECTING
        self.name: str | None = None  # the name that decided the flow (or the last one seen)
        self.name_source: NameSource | None = None
        self.names_seen: list[tuple[str, NameSource]] = []
        self.rule: Rule | None = None
        self.eligible = True
        self.sides = (Side(budget), Side(budget))
        self.buckets: list[Bucket | None] = [None, None]
        self.dns_names: tuple[str, ...] = ()
        self.end_reason: EndReason | None = None
        self.key: bytes = b""
        self.rkey: bytes = b""
        # What each side had carried (upload packets, bytes, download packets, bytes) before the
        # packet that decided the flow: what an exporter counts as judged under inspection.
        self.decided_counts: tuple[int, int, int, int] | None = None
        # The connection's end (FIN both ways, RST, ...) was counted: a model that keeps its state
        # past the end (fin_rst_ends_flow false) still says how the connection ended.
        self.closed = False

    @property
    def transport(self) -> str:
        return "tcp" if self.proto == TCP else "udp" if self.proto == UDP else str(self.proto)

    @property
    def client_endpoint(self) -> str:
        return endpoint(self.client, self.client_port)

    @property
    def server_endpoint(self) -> str:
        return endpoint(self.server, self.server_port)

    @property
    def verdict(self) -> str:
        """inspecting (the capture or run ended while it was inspected), passed or limited."""
        return self.state.label


def endpoint(addr: bytes, port: int) -> str:
    ip = ipaddress.ip_address(addr)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


class FlowTable:
    """Flows by key (both orientations) and by recency; bounded by the caller through `oldest`.

    `by_key` and `recency` are read directly on the engine's per-packet path."""

    __slots__ = ("by_key", "recency", "_next_id")

    def __init__(self) -> None:
        self.by_key: dict[bytes, tuple[Flow, Direction]] = {}
        self.recency: OrderedDict[int, Flow] = OrderedDict()  # least recently seen first
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.recency)

    def __iter__(self) -> Iterator[Flow]:
        return iter(self.recency.values())

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def add(self, flow: Flow, key: bytes, rkey: bytes, direction: Direction) -> None:
        flow.key, flow.rkey = key, rkey
        self.by_key[key] = (flow, direction)
        self.by_key[rkey] = (flow, DOWNLOAD if direction == UPLOAD else UPLOAD)
        self.recency[flow.id] = flow

    def remove(self, flow: Flow) -> None:
        self.by_key.pop(flow.key, None)
        self.by_key.pop(flow.rkey, None)
        self.recency.pop(flow.id, None)

    def oldest(self) -> Flow | None:
        for flow in self.recency.values():
            return flow
        return None
