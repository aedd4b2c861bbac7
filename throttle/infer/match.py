"""Two captures of one connection, one at each side of the loss point, matched packet by packet.

The sender's capture has every transmission; the receiver's has those that arrived. A sender's
packet is found among the receiver's by its bytes: TCP by (first byte, length) and, among copies of
the same bytes, by the IPv4 ID when the copies' IDs differ; QUIC and UDP by a hash of the datagram
(1-RTT packets are encrypted, but the ciphertext is the same at both ends). When copies cannot be
told apart, each arrival goes to the latest copy sent at least the smallest one-way delay before it
(the captures' clocks need not agree: that delay absorbs their offset). Sender packets that were
never found are the exact losses; each one found gives a one-way delay. A TCP packet whose exact
bytes the receiver never saw as one packet (a sending host's offload cuts its "packets" up on the
wire) is delivered when the receiver saw all its bytes and the sender never sent them again.
"""

from __future__ import annotations

import dataclasses
from array import array
from bisect import bisect_right
from collections.abc import Hashable
from typing import NamedTuple

from throttle.infer.trace import FlowTrace, Loss, Sent

_TOLERANCE = 1e-4  # seconds: float and timestamp rounding between two captures


class Keyed(NamedTuple):
    trace: FlowTrace
    keys: array[int]  # per entry of trace.sent: TCP its IPv4 ID (-1 for IPv6), UDP its payload hash


def join_pairs(keyed: list[Keyed]) -> list[FlowTrace]:
    """The traces, with each direction that two captures (two files) both saw joined into one."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(keyed):
        groups.setdefault(item.trace.key, []).append(i)
    out: list[FlowTrace] = []
    for i, item in enumerate(keyed):
        members = groups[item.trace.key]
        if len(members) == 2 and keyed[members[0]].trace.files != keyed[members[1]].trace.files:
            if i == members[0]:
                out.append(join(keyed[members[0]], keyed[members[1]]))
            continue
        out.append(item.trace)
    return out


def _sender_first(a: Keyed, b: Keyed) -> tuple[Keyed, Keyed]:
    if (a.trace.vantage == "sender") != (b.trace.vantage == "sender"):
        return (a, b) if a.trace.vantage == "sender" else (b, a)
    # the sender's capture carries every transmission, the receiver's only what arrived
    return (a, b) if sum(s.length for s in a.trace.sent) >= sum(s.length for s in b.trace.sent) else (b, a)


def join(a: Keyed, b: Keyed) -> FlowTrace:
    """One trace from a direction's two captures (see the module docstring)."""
    sender, receiver = _sender_first(a, b)
    tcp = sender.trace.transport == "tcp"
    s_sent, r_sent = sender.trace.sent, receiver.trace.sent

    def key(sent: list[Sent], keys: array[int], i: int) -> Hashable:
        return (sent[i].start, sent[i].length) if tcp else keys[i]

    arrivals: dict[Hashable, list[int]] = {}
    for j in range(len(r_sent)):
        arrivals.setdefault(key(r_sent, receiver.keys, j), []).append(j)
    copies: dict[Hashable, list[int]] = {}
    for i in range(len(s_sent)):
        copies.setdefault(key(s_sent, sender.keys, i), []).append(i)
    offsets = [r_sent[js[0]].t - s_sent[copies[k][0]].t
               for k, js in arrivals.items() if len(js) == 1 and len(copies.get(k, ())) == 1]
    least = min(offsets, default=0.0)

    found: dict[int, int] = {}  # sender index -> receiver index
    for k, js in arrivals.items():
        cs = copies.get(k)
        if cs:
            found.update(_pair(cs, js, s_sent, r_sent, sender.keys, receiver.keys, least, tcp))
    covered = _Coverage(r_sent) if tcp else None
    resent = _Resent(s_sent) if tcp else None
    losses: list[Loss] = []
    one_way: list[tuple[float, float]] = []
    for i, s in enumerate(s_sent):
        arrived = found.get(i)
        if arrived is not None:
            one_way.append((s.t, r_sent[arrived].t - s.t))
            continue
        if covered is not None and resent is not None and key(s_sent, sender.keys, i) not in arrivals \
                and covered.has(s.start, s.start + s.length) and not resent.after(s.t, s.start, s.start + s.length):
            continue  # offloaded: its bytes arrived in other packets
        losses.append(Loss(s.t, s.start, s.length, s.wire))
    trace = dataclasses.replace(
        sender.trace,
        vantage="sender",
        matched=True,
        losses_known=True,
        losses=losses,
        one_way=one_way,
        files=sender.trace.files + receiver.trace.files,
        delivered=max(sender.trace.delivered, receiver.trace.delivered),
    )
    if trace.server_name is None and receiver.trace.server_name is not None:
        trace.server_name, trace.name_source = receiver.trace.server_name, receiver.trace.name_source
    return trace


def _pair(cs: list[int], js: list[int], s_sent: list[Sent], r_sent: list[Sent], s_keys: array[int],
          r_keys: array[int], least: float, tcp: bool) -> dict[int, int]:
    """Sender copies `cs` of one packet to the receiver's arrivals `js` of it."""
    if tcp:
        ids = [s_keys[i] for i in cs]
        if len(set(ids)) == len(ids) and min(ids) >= 0:
            by_id = {s_keys[i]: i for i in cs}
            return {by_id[r_keys[j]]: j for j in js if r_keys[j] in by_id}
    out: dict[int, int] = {}
    free = list(cs)
    for j in js:
        latest = r_sent[j].t - least + _TOLERANCE
        if not free:
            break
        candidates = [i for i in free if s_sent[i].t <= latest]
        choice = candidates[-1] if candidates else free[0]
        free.remove(choice)
        out[choice] = j
    return out


class _Coverage:
    """The union of the byte ranges a capture saw."""

    def __init__(self, sent: list[Sent]) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        for s in sorted(sent, key=lambda s: s.start):
            if self.ends and s.start <= self.ends[-1]:
                self.ends[-1] = max(self.ends[-1], s.start + s.length)
            else:
                self.starts.append(s.start)
                self.ends.append(s.start + s.length)

    def has(self, start: int, end: int) -> bool:
        i = bisect_right(self.starts, start) - 1
        return i >= 0 and self.ends[i] >= end


class _Resent:
    """The retransmissions a sender's capture saw, to ask whether some bytes were sent again later."""

    def __init__(self, sent: list[Sent]) -> None:
        self.items = sorted((s.start, s.start + s.length, s.t) for s in sent if s.retransmission)
        self.starts = [item[0] for item in self.items]

    def after(self, t: float, start: int, end: int) -> bool:
        for a, b, when in self.items[: bisect_right(self.starts, end - 1)]:
            if b > start and when > t:
                return True
        return False
