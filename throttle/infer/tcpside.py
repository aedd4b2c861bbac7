"""One direction of a TCP connection as one capture saw it: its data, the holes in it, the
retransmissions and what they say was lost, and the acknowledgements its receiver sent back.

`TcpSide` is fed packet by packet (`data` for this direction's segments, `ack` for the peer's
acknowledgements of them) in capture order and keeps both readings of loss at once, because which
one is true depends on where the capture was taken, which is decided only at the end:

- sender side: a transmission whose bytes are sent again later was lost, unless the receiver's
  cumulative ACK or SACK had covered them by then (a spurious retransmission). Which transmission
  last carried each byte is kept as a partition of the bytes in flight (`_owner_*`), pruned as the
  cumulative ACK advances, so a retransmission finds what it repeats by bisection.
- receiver side: a segment that starts beyond the highest byte seen opens a hole at that moment; a
  hole the receiver's ACK covers without the capture seeing its bytes is the capture's own drop,
  not a loss.

Round trips: data -> the ACK that first covers it, for segments never retransmitted, and none
across a retransmission below them (Karn's rule); and, for the receiver's side, the TCP timestamp
an ACK sends -> the first data segment that echoes it. Nothing here holds packet bytes.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Sequence

from throttle.infer.trace import Ack, Loss, Sent

_MOD = 1 << 32
_HALF = 1 << 31
_ID_JUMP = 1024  # a larger jump of the IP ID is not packets lost (another counter, a wrap)
_MISSING_KEPT = 4096  # missing IDs remembered, for one that arrives late (reordered)
_DSACK_LOOKBACK = 1024  # losses searched back for the one a D-SACK undoes
_TS_KEPT = 4096  # timestamps an endpoint sent, remembered for the echo that makes an RTT sample


_SIZES: dict[int, int] = {}


def shared(size: int) -> int:
    """The one int object for a packet size: a trace holds a million packets of a few sizes, and an
    int outside CPython's small-int cache costs 28 bytes per copy."""
    return _SIZES.setdefault(size, size) if size < 1 << 17 else size


def unwrap(value: int, base: int, ref: int) -> int:
    """The 32-bit sequence number `value` as a position relative to `base`, the one nearest `ref`."""
    delta = (value - base - ref) % _MOD
    if delta >= _HALF:
        delta -= _MOD
    return ref + delta


class TcpSide:
    """What one endpoint sent on one connection (see the module docstring)."""

    __slots__ = (
        "base", "syn_mss", "high", "sent", "ip_ids", "fin", "max_payload", "header_bytes",
        "first_payload_at", "_holes_s", "_holes_e", "_holes_log", "hole_log", "open_hole_bytes",
        "rexmit_seen", "holes_made", "sender_losses", "_owner_s", "_owner_e", "_owner_i",
        "_owner_head", "acked", "acks_seen", "acks", "_sack_s", "_sack_e", "_last_sack",
        "_pend_end", "_pend_t", "_pend_head", "rtt_sender", "rtt_receiver", "ts_sent", "dsacked",
        "cancelled", "last_ip_id", "_id_step", "ids_counted", "ids_in_order", "id_gaps", "_missing_ids",
        "_fresh_gap",
    )

    def __init__(self) -> None:
        self.base: int | None = None  # absolute sequence number of relative byte 0
        self.syn_mss: int | None = None  # the MSS option of this endpoint's SYN
        self.high = 0  # one past the highest byte seen
        self.sent: list[Sent] = []
        self.ip_ids = array("l")  # per entry of `sent`: its IPv4 ID, -1 for IPv6
        self.fin = False
        self.max_payload = 0
        self.header_bytes = 0
        self.first_payload_at: float | None = None
        # Unseen ranges below `high`, sorted, disjoint; each with the index of its hole_log entry.
        self._holes_s: list[int] = []
        self._holes_e: list[int] = []
        self._holes_log: list[int] = []
        # [time opened, start, end, state]: state 0 open, 1 (partly) filled, 2 the capture's drop
        self.hole_log: list[list[float]] = []
        self.open_hole_bytes = 0
        self.rexmit_seen = 0  # transmissions carrying bytes seen before
        self.holes_made = 0
        self.sender_losses: list[Loss] = []
        self.cancelled: set[int] = set()  # indexes of sender_losses a D-SACK showed were not lost
        self.dsacked: list[tuple[int, int]] = []  # ranges the receiver reported getting twice
        # The endpoint's IPv4 IDs: Linux numbers a connection's packets 1, 2, 3 ..., so a jump is
        # packets that did not arrive (`ident`).
        self.last_ip_id: int | None = None
        self._id_step = 1  # how far the next ID should be: the last packet's wire segments
        self.ids_counted = 0
        self.ids_in_order = 0
        self.id_gaps: list[list[float]] = []  # [time, bytes from, packets missing, 1 if a hole shows them]
        self._missing_ids: dict[int, int] = {}  # a missing ID -> its entry in id_gaps
        self._fresh_gap = -1
        # The latest transmission of each byte not yet cumulatively acked: [start, end) -> index.
        self._owner_s: list[int] = []
        self._owner_e: list[int] = []
        self._owner_i: list[int] = []
        self._owner_head = 0
        self.acked = 0
        self.acks_seen = False
        self.acks: list[Ack] = []
        self._sack_s: list[int] = []  # the SACK scoreboard above `acked`
        self._sack_e: list[int] = []
        self._last_sack: tuple[tuple[int, int], ...] = ()
        # Segments sent once and not yet acked, for RTT samples: end and send time (-1: ambiguous).
        self._pend_end: list[int] = []
        self._pend_t: list[float] = []
        self._pend_head = 0
        self.rtt_sender: list[tuple[float, float]] = []
        self.rtt_receiver: list[tuple[float, float]] = []
        self.ts_sent: dict[int, float] = {}  # TSval this endpoint sent -> when first

    # ------------------------------------------------------------------------------------------
    # this direction's data

    def ident(self, t: float, ip_id: int | None, length: int, mss: int | None) -> None:
        """Any packet this endpoint sent but a reset (call before `data`): its IPv4 ID."""
        self._fresh_gap = -1
        if ip_id is None:
            return
        prev = self.last_ip_id
        step = self._id_step
        self._id_step = -(-length // mss) if mss and length > mss else 1  # offload: one ID per wire packet
        if prev is None:
            self.last_ip_id = ip_id
            return
        gap = (ip_id - prev) & 0xFFFF
        self.ids_counted += 1
        if gap == step:
            self.ids_in_order += 1
        elif step < gap < _ID_JUMP:
            index = len(self.id_gaps)
            self.id_gaps.append([t, self.high, gap - step, 0])
            missing = self._missing_ids
            for k in range(step, gap):
                missing[(prev + k) & 0xFFFF] = index
            while len(missing) > _MISSING_KEPT:
                del missing[next(iter(missing))]
            self._fresh_gap = index
        elif gap > 0x10000 - _ID_JUMP:
            index = self._missing_ids.pop(ip_id, -1)
            if index >= 0:
                self.id_gaps[index][2] -= 1  # it came after all, late
            return  # the highest ID seen stays the reference
        self.last_ip_id = ip_id

    def data(self, t: float, seq: int, length: int, wire: int, ip_id: int | None) -> None:
        """A segment carrying `length` payload bytes from absolute sequence number `seq`."""
        if self.base is None:
            self.base = seq  # mid-flow: the first byte seen is byte 0
        start = unwrap(seq, self.base, self.high)
        end = start + length
        if end <= 0:
            return  # entirely before the first byte this capture knows of
        if start < 0:
            start, length = 0, end
        if self.first_payload_at is None:
            self.first_payload_at = t
        if length > self.max_payload:
            self.max_payload = length
            self.header_bytes = wire - length
        high = self.high
        seen_before = False
        newest = end > high
        if start < high:
            below = min(end, high)
            filled = self._fill(start, below)
            seen_before = below - start > filled
        if self._fresh_gap >= 0:
            gap = self.id_gaps[self._fresh_gap]
            gap[1] = start
            if start > high:
                gap[3] = 1  # the hole below this packet counts these losses
        if end > high:
            if start > high:
                self._open_hole(t, high, start)
            self.high = end
        index = len(self.sent)
        self.sent.append(Sent(t, start, shared(length), shared(wire), seen_before))
        self.ip_ids.append(-1 if ip_id is None else ip_id)
        if seen_before:
            self.rexmit_seen += 1
            self._retransmitted(t, start, end)
        elif newest:
            self._pend_end.append(end)
            self._pend_t.append(t)
        self._own(start, end, index)

    def _open_hole(self, t: float, start: int, end: int) -> None:
        self.holes_made += 1
        self._holes_s.append(start)
        self._holes_e.append(end)
        self._holes_log.append(len(self.hole_log))
        self.hole_log.append([t, start, end, 0])
        self.open_hole_bytes += end - start

    def _fill(self, start: int, end: int) -> int:
        """Take [start, end) out of the holes; return how many of its bytes were holes."""
        hs, he, hl = self._holes_s, self._holes_e, self._holes_log
        lo = bisect_right(he, start)
        hi = bisect_left(hs, end)
        if lo >= hi:
            return 0
        filled = 0
        keep: list[tuple[int, int, int]] = []
        for i in range(lo, hi):
            a, b = hs[i], he[i]
            x, y = max(a, start), min(b, end)
            filled += y - x
            self.hole_log[hl[i]][3] = 1
            if a < x:
                keep.append((a, x, hl[i]))
            if y < b:
                keep.append((y, b, hl[i]))
        hs[lo:hi] = [k[0] for k in keep]
        he[lo:hi] = [k[1] for k in keep]
        hl[lo:hi] = [k[2] for k in keep]
        self.open_hole_bytes -= filled
        return filled

    def _own(self, start: int, end: int, index: int) -> None:
        os_, oe, oi = self._owner_s, self._owner_e, self._owner_i
        if not oe or start >= oe[-1]:
            os_.append(start)
            oe.append(end)
            oi.append(index)
            return
        lo = bisect_right(oe, start, self._owner_head)
        hi = bisect_left(os_, end, lo)
        pieces = [(start, end, index)]
        if lo < hi and os_[lo] < start:
            pieces.insert(0, (os_[lo], start, oi[lo]))
        if lo < hi and oe[hi - 1] > end:
            pieces.append((end, oe[hi - 1], oi[hi - 1]))
        os_[lo:hi] = [p[0] for p in pieces]
        oe[lo:hi] = [p[1] for p in pieces]
        oi[lo:hi] = [p[2] for p in pieces]

    def _retransmitted(self, t: float, start: int, end: int) -> None:
        """Bytes [start, end) sent again: their previous transmissions were lost unless acked."""
        os_, oe, oi = self._owner_s, self._owner_e, self._owner_i
        lo = bisect_right(oe, start, self._owner_head)
        hi = bisect_left(os_, end, lo)
        for i in range(lo, hi):
            x, y = max(os_[i], start, self.acked), min(oe[i], end)
            if x >= y or self._sacked(x, y):
                continue
            first = self.sent[oi[i]]
            if y - x == first.length:
                self.sender_losses.append(Loss(first.t, x, y - x, first.wire))
            else:
                self.sender_losses.append(Loss(first.t, x, y - x, y - x + first.wire - first.length))
        # Karn: no sample from a segment above the retransmitted bytes, whose ACK waits for them.
        pe, pt = self._pend_end, self._pend_t
        for i in range(len(pe) - 1, max(bisect_right(pe, start, self._pend_head), self._pend_head) - 1, -1):
            pt[i] = -1.0

    def _sacked(self, start: int, end: int) -> bool:
        i = bisect_right(self._sack_s, start) - 1
        return i >= 0 and self._sack_e[i] >= end

    # ------------------------------------------------------------------------------------------
    # the receiver's acknowledgements of it

    def ack(self, t: float, ack: int, sack: tuple[tuple[int, int], ...]) -> None:
        """An ACK for this direction's data: absolute `ack` and SACK blocks (absolute)."""
        if self.base is None:
            return
        acked = unwrap(ack, self.base, self.acked)
        pairs = []
        for a, b in sack:
            left = unwrap(a, self.base, acked)
            pairs.append((left, unwrap(b, self.base, left)))
        blocks = tuple(pairs)
        self.acks_seen = True
        if blocks:
            left, right = blocks[0]
            if left < right and (right <= acked or (len(blocks) > 1 and blocks[1][0] <= left and right <= blocks[1][1])):
                self._duplicate(left, right)
        advanced = acked > self.acked
        if advanced:
            self.acked = acked
            self._on_cumulative(t, acked)
        for left, right in blocks:
            if right > left and right > self.acked:
                self._add_sack(max(left, self.acked), right)
        if advanced or blocks != self._last_sack or not self.acks:
            self.acks.append(Ack(t, acked, blocks))
            self._last_sack = blocks

    def _duplicate(self, left: int, right: int) -> None:
        """A D-SACK (RFC 2883): the receiver got [left, right) twice, so the copy sent before the
        retransmission arrived after all (reordered or delayed, not lost)."""
        self.dsacked.append((left, right))
        losses = self.sender_losses
        undone: set[int] = set()  # one block may report several packets: undo the latest loss of each
        for i in range(len(losses) - 1, max(-1, len(losses) - 1 - _DSACK_LOOKBACK), -1):
            loss = losses[i]
            if left <= loss.start and loss.start + loss.length <= right and i not in self.cancelled \
                    and loss.start not in undone:
                self.cancelled.add(i)
                undone.add(loss.start)

    def _on_cumulative(self, t: float, acked: int) -> None:
        head = self._owner_head
        oe = self._owner_e
        while head < len(oe) and oe[head] <= acked:
            head += 1
        if head > 4096 and head * 2 > len(oe):
            del self._owner_s[:head], self._owner_e[:head], self._owner_i[:head]
            head = 0
        self._owner_head = head
        # the newest segment this ACK covers for the first time gives the sample
        pe, pt = self._pend_end, self._pend_t
        ph = self._pend_head
        newest = -1
        while ph < len(pe) and pe[ph] <= acked:
            newest = ph
            ph += 1
        # An ACK that fills a hole jumps over data the receiver had SACKed a while ago: its newest
        # segment waited for the retransmission, not for a round trip (a policer's losses then read
        # as a growing queue), so it gives no sample.
        fills_hole = bool(self._sack_s) and self._sack_s[0] < acked
        # An ACK of one segment alone may have waited for the receiver's delayed-ACK timer (40 ms
        # and more on Linux), which a slow policed flow meets at every lone segment and which would
        # read as a queue; an ACK covering two or more was sent at once.
        lone = newest == self._pend_head
        if newest >= 0 and pt[newest] >= 0 and t >= pt[newest] and not fills_hole and not lone:
            self.rtt_sender.append((t, t - pt[newest]))
        if ph > 4096 and ph * 2 > len(pe):
            del pe[:ph], pt[:ph]
            ph = 0
        self._pend_head = ph
        # the SACK scoreboard and the holes below the ACK
        while self._sack_s and self._sack_e[0] <= acked:
            del self._sack_s[0], self._sack_e[0]
        hs, he, hl = self._holes_s, self._holes_e, self._holes_log
        while hs and hs[0] < acked:
            # The receiver had these bytes, yet the capture never saw them: its own drop.
            end = min(he[0], acked)
            entry = self.hole_log[hl[0]]
            if entry[3] == 0:
                entry[3] = 2
            self.open_hole_bytes -= end - hs[0]
            if end < he[0]:
                hs[0] = end
            else:
                del hs[0], he[0], hl[0]

    def _add_sack(self, left: int, right: int) -> None:
        ss, se = self._sack_s, self._sack_e
        lo = bisect_left(se, left)
        hi = bisect_right(ss, right)
        if lo < hi:
            left, right = min(left, ss[lo]), max(right, se[hi - 1])
        ss[lo:hi], se[lo:hi] = [left], [right]

    # ------------------------------------------------------------------------------------------
    # timestamps

    def sent_ts(self, t: float, tsval: int) -> None:
        """This endpoint sent TSval `tsval` (an ACK of the peer's data, or data)."""
        if tsval not in self.ts_sent:
            if len(self.ts_sent) >= _TS_KEPT:
                del self.ts_sent[next(iter(self.ts_sent))]
            self.ts_sent[tsval] = t

    def echoed(self, t: float, sent_at: float) -> None:
        """A data segment of this direction echoed a timestamp its receiver sent at `sent_at`."""
        self.rtt_receiver.append((t, t - sent_at))

    # ------------------------------------------------------------------------------------------
    # the two readings of loss

    def losses_at_sender(self) -> list[Loss]:
        """The transmissions sent again later, less those a D-SACK showed arrived, in send order."""
        return sorted(loss for i, loss in enumerate(self.sender_losses) if i not in self.cancelled)

    def receiver_losses(self, mss: int, header_bytes: int) -> list[Loss]:
        """Each hole the capture saw filled later (or never), as whole MSS-sized packets, less the
        bytes the receiver D-SACKed (the late original filled the hole, then a copy came too);
        and, when the sender's IPv4 IDs count its packets, the packets missing from that count
        where no hole shows them (a flight's tail): taken to be the flight from the first byte
        that came next, so a later hole in those bytes is the same loss, not another."""
        out: list[Loss] = []
        tails: list[tuple[int, int, float]] = []
        if self.ids_counted and self.ids_in_order * 2 >= self.ids_counted:
            for t, start, missing, hole in self.id_gaps:
                if hole or missing <= 0:
                    continue
                first = int(start)
                tails.append((first, first + int(missing) * mss, t))
                for k in range(int(missing)):
                    out.append(Loss(t, first + k * mss, mss, mss + header_bytes))
        tails.sort()
        tail_starts = [a for a, _, _ in tails]
        twice = sorted(self.dsacked)
        starts = [a for a, _ in twice]
        for t, start, end, state in self.hole_log:
            if state == 2:
                continue
            pos, stop = int(start), int(end)
            while pos < stop:
                length = min(mss, stop - pos)
                if not (_within(twice, starts, pos, pos + length)
                        or _within(tails, tail_starts, pos, pos + length, before=t)):
                    out.append(Loss(t, pos, length, length + header_bytes))
                pos += length
        out.sort()
        return out

    def contiguous(self) -> int:
        """Bytes from 0 seen without a hole."""
        return self._holes_s[0] if self._holes_s else self.high


def _within(ranges: Sequence[tuple[int, int] | tuple[int, int, float]], starts: list[int], start: int, end: int,
            before: float | None = None) -> bool:
    """Whether [start, end) lies in one of the sorted `ranges` (among the few that start just
    before it), one dated no later than `before` when that is given."""
    i = bisect_right(starts, start)
    for item in ranges[max(0, i - 8) : i]:
        if item[0] <= start and end <= item[1] and (before is None or len(item) < 3 or item[2] <= before):
            return True
    return False
