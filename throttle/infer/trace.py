"""What a capture says about one direction of one flow: the data it carried, what was lost on the
way, the acknowledgements, round-trip samples and any reset; and what an inference concludes.

The reader (`throttle.infer.reader`) fills a `FlowTrace` per flow direction that carried data; the
fitter (`throttle.infer.fit`, pure) turns it into an `Inference`. Nothing here does I/O.

Byte positions are relative: 0 is the first payload byte of the direction (TCP: ISN + 1; QUIC:
the running sum of the UDP payloads the sender sent). Times are the capture's, in seconds.

Vantage: a capture taken before the point where packets are lost (the sender's side of a
censor) sees every transmission, and a loss as a retransmission of bytes seen before; one taken
after it (the receiver's side) sees only what passed, and a loss as a hole in the sequence that a
later packet fills.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

Vantage = Literal["sender", "receiver", "unknown"]
Direction = Literal["upload", "download"]  # upload: client (who opened the connection) to server
Transport = Literal["tcp", "quic", "udp"]
Mechanism = Literal["police", "window", "shape", "freeze", "reset", "timeout", "crawl", "none"]
MECHANISMS: tuple[Mechanism, ...] = ("police", "window", "shape", "freeze", "reset", "timeout", "crawl", "none")


class Sent(NamedTuple):
    """A data packet of this direction as the capture saw it."""

    t: float
    start: int  # first payload byte (relative)
    length: int  # payload bytes
    wire: int  # IP bytes, headers included
    retransmission: bool  # it carries bytes this capture saw before


class Loss(NamedTuple):
    """Payload the network lost: sender side, the copy that was later retransmitted (at the time it
    was sent); receiver side, a hole (at the time the first packet beyond it arrived)."""

    t: float
    start: int
    length: int
    wire: int  # IP bytes of the lost packets (receiver side: estimated at the flow's MSS)


class Ack(NamedTuple):
    """An acknowledgement from this direction's receiver (TCP only)."""

    t: float
    acked: int  # cumulative: every byte before this one has arrived
    sack: tuple[tuple[int, int], ...]  # SACK blocks, relative, [start, end)


class Reset(NamedTuple):
    t: float
    from_client: bool
    ttl: int  # IPv4 TTL or IPv6 hop limit
    ip_id: int | None  # IPv4 identification; None for IPv6
    # what that endpoint's own earlier packets carried, for comparison (an injected RST differs)
    usual_ttl: int | None
    usual_ip_id: int | None  # the endpoint's last IP ID before the RST
    after_bytes: int  # payload bytes this direction had carried when it came


@dataclass(slots=True)
class FlowTrace:
    client: str  # "ip:port" of the side that opened the connection ("[v6]:port" for IPv6)
    server: str
    transport: Transport
    direction: Direction
    server_name: str | None = None  # the name a censor could act on
    name_source: str | None = None  # "tls" (SNI), "quic" (Initial SNI), "http" (Host), "dns" (answer)
    vantage: Vantage = "unknown"
    started_mid_flow: bool = False  # the capture has no SYN (TCP) / no client Initial (QUIC)
    first: float = 0.0  # the connection's first packet in the capture
    last: float = 0.0  # this direction's last packet
    # the client's first application byte (TLS ClientHello, QUIC Initial) to the server's first
    # reply to it (ServerHello, server Initial): seconds, or None when there was no reply
    hello_at: float | None = None
    handshake: float | None = None
    base_rtt: float | None = None  # the smallest round trip seen (handshake or data/ack)
    # (time, seconds) samples: the handshake's; at the sender's side data -> the ACK that first
    # covers it (Karn: none for data sent again or above data sent again); at the receiver's side
    # an ACK's TCP timestamp -> the first data that echoes it
    rtt: list[tuple[float, float]] = field(default_factory=list)
    mss: int = 1448  # largest payload seen in this direction
    header_bytes: int = 52  # IP + transport header bytes per data packet
    sent: list[Sent] = field(default_factory=list)
    losses: list[Loss] = field(default_factory=list)
    acks: list[Ack] = field(default_factory=list)  # those that moved the cumulative ACK or changed the SACK
    resets: list[Reset] = field(default_factory=list)  # every RST of the connection, either way
    fin: bool = False  # the sender closed this direction normally
    delivered: int = 0  # payload bytes known delivered (highest cumulative ack, or bytes received)
    payload: int = 0  # distinct payload bytes seen in this direction
    # Added by the reader (all with defaults):
    # False when this trace cannot show losses: QUIC from one capture (its packet numbers and ACKs
    # are encrypted), so `losses` is empty for want of evidence, not for want of loss.
    losses_known: bool = True
    # Two captures of this connection, one on each side of the loss point, were matched packet by
    # packet: `losses` are exactly the sender's packets that never arrived, `vantage` is the
    # sender's, and `one_way` holds the delays.
    matched: bool = False
    one_way: list[tuple[float, float]] = field(default_factory=list)  # (send time, seconds) per packet matched
    # QUIC from one capture: the receiver's acknowledgement-only packets (`acks_seen`) and the times
    # of those whose size says their ACK frame skipped packets (`udpside.gap_acks`): losses happened
    # around then, though not which packets
    gap_acks: list[float] = field(default_factory=list)
    acks_seen: int = 0
    files: tuple[str, ...] = ()  # the capture file(s) this trace was read from
    # (packets, losses) once `release` gave the per-packet lists back; None while they are held
    released: tuple[int, int] | None = None

    @property
    def key(self) -> str:
        return f"{self.client} {self.server} {self.transport} {self.direction}"

    @property
    def packets(self) -> int:
        """Data packets seen in this direction, also after `release`."""
        return len(self.sent) if self.released is None else self.released[0]

    @property
    def lost(self) -> int:
        """Losses found in this direction, also after `release`."""
        return len(self.losses) if self.released is None else self.released[1]

    def release(self) -> None:
        """Give back the per-packet lists once the trace is fitted (`throttle.infer.stream`): a
        report needs only their counts, and a long capture holds millions of packets."""
        if self.released is None:
            self.released = (len(self.sent), len(self.losses))
        self.sent, self.losses, self.acks, self.rtt, self.one_way, self.gap_acks = [], [], [], [], [], []


@dataclass(frozen=True, slots=True)
class Estimate:
    value: float
    error: float  # one standard uncertainty, same unit


@dataclass(slots=True)
class Inference:
    """What limited a flow direction, as far as its trace can tell (`throttle.infer.fit`).

    Which fields each mechanism sets: police: rate_bps, burst_bytes; window: rate_bps (burst per
    period), burst_bytes, period, duty; shape: rate_bps, and queue_delay where round trips were
    measured; freeze and reset: after_bytes; crawl: queue_delay (the handshake's excess over a
    round trip); timeout and none: nothing. A confidence under 0.5 means the trace could not tell
    (no losses visible, too few packets, a capture started mid-flow): read it as a hint.
    `scores` holds each model's agreement with the trace ("police", "window", "random": the same
    fit of losses scattered at random; "queue", "shared" where they were tried).
    """

    trace: FlowTrace
    mechanism: Mechanism
    confidence: float  # 0..1
    reason: str  # one line: the evidence that decided
    rate_bps: Estimate | None = None  # IP-layer bits per second
    # police: rate_bps is only the lowest rate that fits. A sender that met nothing but a full
    # bucket (it idled longer than a refill between its bursts) shows where the rate starts, not
    # where it ends: every faster bucket replays its packets as well.
    rate_floor: bool = False
    burst_bytes: Estimate | None = None
    after_bytes: int | None = None  # payload bytes carried before the limit began
    period: Estimate | None = None  # window: seconds from one budget to the next
    duty: Estimate | None = None  # window: fraction of each period that passes traffic
    queue_delay: Estimate | None = None  # shape: seconds of queueing at the end
    scores: dict[str, float] = field(default_factory=dict)  # each mechanism's goodness of fit
