"""One direction of a UDP (QUIC) conversation as the reader sees it, and what QUIC still shows in
the clear about round trips and losses.

A QUIC packet's number and its acknowledgements are encrypted, so a single capture cannot say
which packet was lost. Two things are not:
- the spin bit (RFC 9000 17.4), the one header bit neither encrypted nor protected, which changes
  value once per round trip in each direction (`spin_rtts`);
- the size of the receiver's acknowledgement-only packets: an ACK frame grows by a gap and a
  length for every range of packets it skips, so while the receiver is missing packets its small
  packets are a few bytes longer than when it has them all (`gap_acks`).
"""

from __future__ import annotations

from array import array

from throttle.infer.tcpside import shared
from throttle.infer.trace import Sent

SPIN_WAIT = 0.25  # an edge that came this fraction of a half round after its side's previous packet was held
SPIN_ALTERNATION = 0.9  # a real spin's edges alternate between the two directions
SMALL = 80  # payload bytes: a packet this small carries acknowledgements and little else
RECENT = 16  # small packets over which "the recent smallest" is taken


class UdpSide:
    __slots__ = ("sent", "total", "hashes", "first_payload_at", "max_payload", "header_bytes", "spin", "short_at",
                 "edges", "small")

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.total = 0
        self.hashes = array("q")  # per datagram, to find it in another capture
        self.first_payload_at: float | None = None
        self.max_payload = 0
        self.header_bytes = 0
        self.spin: bool | None = None
        self.short_at = 0.0  # the last short-header packet
        self.edges: list[tuple[float, float]] = []  # spin changes: (time, wait since this side's previous packet)
        self.small: list[tuple[float, int]] = []  # short-header packets of SMALL bytes or less: (time, length)

    def datagram(self, t: float, payload: bytes, length: int, wire: int) -> None:
        if payload and payload[0] & 0xC0 == 0x40:  # a short header (1-RTT), its fixed bit set
            spin = bool(payload[0] & 0x20)
            if self.spin is not None and spin != self.spin:
                self.edges.append((t, t - self.short_at))
            self.spin, self.short_at = spin, t
            if length <= SMALL:
                self.small.append((t, length))
        if self.first_payload_at is None:
            self.first_payload_at = t
        if length > self.max_payload:
            self.max_payload = length
            self.header_bytes = wire - length
        self.sent.append(Sent(t, self.total, shared(length), shared(wire), False))
        self.hashes.append(hash(payload))
        self.total += length


def gap_acks(small: list[tuple[float, int]]) -> tuple[list[float], int]:
    """The times of the receiver's small packets that are longer than its usual by an ACK range
    or more (it was missing packets then), and how many small packets there were.

    "Usual" is the lower quartile of the last RECENT: an ACK frame's numbers grow a byte as the
    connection goes on (varints), which that follows. A longer packet counts only beside another
    longer one: a missing range stays in the ACK frames until the sender has seen it reported,
    while a lone long packet is one that carried something else too (a flow-control update)."""
    out: list[float] = []
    recent: list[int] = []
    longer: list[bool] = []
    for _, length in small:
        if len(recent) >= 4:
            usual = sorted(recent)[len(recent) // 4]
            longer.append(length >= usual + 2)
        else:
            longer.append(False)
        recent.append(length)
        if len(recent) > RECENT:
            recent.pop(0)
    for n, (t, length) in enumerate(small):
        if longer[n] and ((n > 0 and longer[n - 1]) or (n + 1 < len(small) and longer[n + 1])):
            out.append(t)
    return out, len(small)


def spin_rtts(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> tuple[list[tuple[float, float]], int | None]:
    """Round trips from the spin bits' edges, (time, seconds), taken at the far side's edges, and
    the side (0 for `a`, 1 for `b`) whose end of the path the capture was taken at, if it shows.

    An endpoint flips (or reflects) its bit when the other's edge reaches it, so at any vantage
    the two directions' edges alternate, and each gap between them is half of a round trip seen
    from there: at an endpoint the near half is its own reaction (short) and the far half the
    whole path; on the path the two halves add up. A far edge that came long after its side's
    previous packet waited for that side to have something to send (RFC 9312 3.8.1): left out.
    Nothing at all when the edges do not alternate: an endpoint that opts out may set the bit at
    random for each packet (RFC 9000 17.4)."""
    events = sorted([(t, 0, wait) for t, wait in a] + [(t, 1, wait) for t, wait in b])
    if len(events) < 4:
        return [], None
    pairs = list(zip(events, events[1:]))
    if sum(1 for x, y in pairs if x[1] != y[1]) < SPIN_ALTERNATION * len(pairs):
        return [], None
    halves: tuple[list[float], list[float]] = ([], [])  # the half that ends at each side's edge
    for x, y in pairs:
        if x[1] != y[1]:
            halves[y[1]].append(y[0] - x[0])
    medians = [sorted(h)[len(h) // 2] if h else 0.0 for h in halves]
    near = 0 if medians[0] < 0.5 * medians[1] else 1 if medians[1] < 0.5 * medians[0] else None
    out: list[tuple[float, float]] = []
    for n, (x, y) in enumerate(pairs):
        if x[1] == y[1]:
            continue
        half = y[0] - x[0]
        if near is not None:  # at an endpoint: the far half is the round trip
            if y[1] != near and y[2] < SPIN_WAIT * half:
                out.append((y[0], half))
        elif n > 0 and pairs[n - 1][0][1] != x[1]:  # on the path: two halves, neither held back
            before = x[0] - pairs[n - 1][0][0]
            if x[2] < SPIN_WAIT * before and y[2] < SPIN_WAIT * half:
                out.append((y[0], before + half))
    return out, near
