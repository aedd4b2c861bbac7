"""What the engine reports: events drained by adapters (metrics, the hook) and by `classify`.

`Event` is the union of them all; `Engine.drain_events()` returns a list of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

from throttle.engine.buckets import Bucket
from throttle.engine.flows import Direction, EndReason, Flow, Side


class Verdict(IntEnum):
    ACCEPT = 0  # pass this packet; the flow is still inspected, or limited
    BYPASS = 1  # pass it, and hand the flow back to the kernel: decided, not limited
    DROP = 2  # the policer (or a full shaper queue) drops it
    HOLD = 3  # keep it and release it at the time given with the verdict (the shaper)


@dataclass(frozen=True, slots=True)
class FlowStarted:
    flow: Flow
    at: float


Meter = Literal["police", "shape", "window", "loss"]


@dataclass(frozen=True, slots=True)
class DirectionLimit:
    """How a rule limits one direction of a decided flow: all an adapter needs to carry the limit
    out elsewhere (the kernel) without asking the engine again.

    `bucket` is the engine's own, live: shared by every flow of a client or rule scope (so its
    identity says which flows share a limit), and its state is what the other enforcer starts from
    when it takes the direction over: a policer's or shaper's credit (`tokens` as of `stamp`), a
    window meter's interval (`start`, None until its first packet, where its first interval
    starts, and the bytes `used` in it). `queue_bytes` bounds a shaper's backlog. `carried` is the payload
    the direction has carried so far (live: the engine counts on while it still sees the flow), for
    `after_bytes`. A "loss" direction (random drops) has no rate or burst, only its `probability`."""

    meter: Meter
    rate: float  # bytes per second
    burst: float  # bytes
    bucket: Bucket
    queue_bytes: float
    after_bytes: int
    counters: Side  # the direction's own, live
    probability: float = 0.0  # "loss": the chance each packet is dropped

    @property
    def carried(self) -> int:
        return self.counters.payload


Limits = tuple[DirectionLimit | None, DirectionLimit | None]  # (upload, download); None: not limited


@dataclass(frozen=True, slots=True)
class FlowDecided:
    """The engine decided `flow` (passed, or limited by `flow.rule`); `limits` says how each
    direction is limited, (None, None) for a passed flow."""

    flow: Flow
    at: float
    limits: Limits = (None, None)


@dataclass(frozen=True, slots=True)
class FlowEnded:
    flow: Flow
    at: float
    reason: EndReason


@dataclass(frozen=True, slots=True)
class Limited:
    """One packet of a limited flow met its bucket: passed, dropped, or held for `delay` seconds."""

    rule: str
    name: str
    direction: Direction
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
class ResetRequested:
    """A rule with action "rst" matched on a TCP packet (docs/incidents.md §2.17 from 2022-03-04,
    §4.30): the adapter should inject a RST each way. `to_server` is (seq, ack) for a RST from the
    client's address and port to the server's, `to_client` for one from the server to the client:
    the next sequence numbers each end expects, read from the packet that completed the match
    (which passes; the flow's later packets are dropped). `direction` is that packet's."""

    flow: Flow
    direction: Direction
    to_server: tuple[int, int]
    to_client: tuple[int, int]
    at: float


ErrorKind = Literal["malformed", "dns", "quic", "internal"]


@dataclass(frozen=True, slots=True)
class EngineError:
    kind: ErrorKind
    detail: str
    at: float


Event = FlowStarted | FlowDecided | FlowEnded | Limited | NameLearned | ResetRequested | EngineError
