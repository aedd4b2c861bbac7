"""What the engine reports: events drained by adapters (metrics, the hook) and by `classify`.

`Event` is the union of them all; `Engine.drain_events()` returns a list of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

from throttle.engine.flows import Direction, EndReason, Flow


class Verdict(IntEnum):
    ACCEPT = 0  # pass this packet; the flow is still inspected, or limited
    BYPASS = 1  # pass it, and hand the flow back to the kernel: decided, not limited
    DROP = 2  # the policer (or a full shaper queue) drops it
    HOLD = 3  # keep it and release it at the time given with the verdict (the shaper)


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
