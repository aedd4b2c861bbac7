"""From flow traces to what limited each flow: `infer(traces) -> [Inference]`, one per trace.

Pure: traces in, inferences out, no I/O. The order of the questions, each asked only when the
earlier ones found nothing:
1. the handshake: a hello that got no reply (timeout) or a reply that took seconds (crawl);
2. a RST the endpoint did not send (its TTL or IP ID unlike the endpoint's own): reset;
3. nothing passed once the limit began and the flow never closed: freeze after N bytes;
4. losses: a token bucket and a window meter are fitted to the passed/lost sequence
   (`fit_bucket`), each scored by how well its replay agrees with every packet, and against the
   same fit of losses scattered without regard to any bucket (random loss). Round trips inflated
   before the losses mean a queue dropped them (a shaper when this flow's packets alone replay
   its drops, else congestion);
5. no losses: a queue that grew while the rate held (shape), a delivered rate that holds after an
   initial burst or arrives in periodic bursts (a QUIC trace, whose losses are encrypted), or none.
Flows that may share one bucket (same direction, same client address or same name, overlapping in
time) are also fitted together; the joint fit replaces the single ones when it explains them better.

Rates are IP-layer bits per second; each estimate carries one standard uncertainty.
"""

from __future__ import annotations

import math
from collections import defaultdict

from throttle.infer.fit_bucket import (BucketFit, PacketSeq, WindowFit, agreement, balanced, fit_police,
                                       fit_window)
from throttle.infer.fit_flow import (Queueing, burst_starts, packets, peak_rate, plateau, queueing, stalled,
                                     steady_rate, swing, unqueued_through_losses, vantage)
from throttle.infer.trace import Estimate, FlowTrace, Inference, Reset

MIN_PACKETS = 8
POLICE_SCORE = 0.9  # balanced agreement a bucket must reach to explain the losses
NULL_MARGIN = 0.15  # ... and by how much it must beat the same fit of scattered losses
OWN_QUEUE_SCORE = 0.98  # a queue whose drops this flow's packets alone replay: a shaper
QUEUE_SEEN = 0.02  # seconds of round-trip growth that is a queue, not the path's noise
QUIC_ACKS = 20  # acknowledgement-only packets a QUIC trace needs before their sizes say anything
QUIC_LOSSY = 0.05  # ... and the share of them that skip packets below which the receiver lost none
CEILING_SWING = 1.25  # a policed rate's 90th percentile over its median, at most (`fit_flow.swing`)
# ... unless the receiver missed packets this often: two full-grid samples' QUIC transfers under
# random loss of 1-2% skipped packets in 14-24% of their ACKs, and swung 1.35-1.57; policers swung
# as much (1.26-1.72), most of them (small buckets) with 35-63% of ACKs skipping
HEAVY_LOSS = 0.3


def _clamp(x: float) -> float:
    return max(0.0, min(1.0, x))


def _injected(reset: Reset, tr: FlowTrace) -> list[str]:
    """Why a RST looks injected: its TTL or IP ID unlike what that endpoint sent before (an
    endpoint's TCP packets keep one TTL, so a hop more or less is another sender), or an answer
    sooner than a round trip allows."""
    why = []
    if reset.usual_ttl is not None and reset.ttl != reset.usual_ttl:
        why.append(f"TTL {reset.ttl} where the endpoint's packets had {reset.usual_ttl}")
    early = _too_soon(reset, tr)
    if early:
        why.append(early)
    if reset.ip_id is not None and reset.usual_ip_id is not None and reset.ip_id != 0:
        step = (reset.ip_id - reset.usual_ip_id) % 65536
        if step == 0 or step > 1000:
            why.append(f"IP ID {reset.ip_id} after the endpoint's {reset.usual_ip_id}")
    return why


def _too_soon(reset: Reset, tr: FlowTrace) -> str:
    """A RST from the far end (from where the capture was taken) that came less than half a round
    trip after the near end's last packet: the far end cannot have seen that packet yet, so
    something between them answered it (a censor near the capture point)."""
    side = tr.vantage  # as read, not guessed: which end is near decides the whole argument
    if side == "unknown" or not tr.base_rtt or tr.base_rtt < 0.004:
        return ""  # without a round trip of some milliseconds timing tells nothing
    near_is_client = (tr.direction == "upload") == (side == "sender")
    if reset.from_client == near_is_client:
        return ""
    near = [s.t for s in tr.sent] if side == "sender" else [a.t for a in tr.acks]
    before = [t for t in near if t <= reset.t]
    if not before:
        return ""
    gap = reset.t - max(before)
    if gap >= tr.base_rtt / 2:
        return ""
    far = "client" if reset.from_client else "server"
    return (f"the {far}'s RST came {gap * 1000:.1f} ms after the packet it followed, inside the "
            f"{tr.base_rtt * 1000:.0f} ms round trip")


def _handshake(tr: FlowTrace) -> Inference | None:
    if tr.hello_at is None:
        return None
    if tr.handshake is None and tr.delivered == 0 and not tr.resets:
        tries = sum(1 for s in tr.sent if s.t >= tr.hello_at)
        waited = tr.last - tr.hello_at
        sure = tries >= 2 and waited >= 1.0
        return Inference(tr, "timeout", 0.85 if sure else 0.4,
                         f"no reply to the hello in {waited:.1f} s ({tries} transmissions)")
    rtt = tr.base_rtt or 0.0
    if tr.handshake is not None and tr.handshake > max(1.0, 10 * rtt):
        conf = _clamp(0.5 + (tr.handshake - 1.0) / 4)
        return Inference(tr, "crawl", min(conf, 0.95),
                         f"the handshake took {tr.handshake:.2f} s against a {rtt * 1000:.0f} ms round trip",
                         queue_delay=Estimate(tr.handshake - rtt, rtt + 0.01))
    return None


def _reset(tr: FlowTrace) -> Inference | None:
    for r in tr.resets:
        why = _injected(r, tr)
        if why:
            return Inference(tr, "reset", 0.9 if len(why) >= 2 else 0.75,
                             f"RST after {r.after_bytes} bytes: " + "; ".join(why),
                             after_bytes=r.after_bytes)
    return None


def _bucket_confidence(fit: BucketFit | WindowFit, n_loss: int, n_pass: int) -> float:
    """Agreement, its margin over scattered losses, and enough of both kinds of packet: a
    two-parameter fit agrees easily with a dozen packets."""
    return min(0.97, _clamp(2 * (fit.score - 0.5)) * _clamp((fit.score - fit.null) / 0.3)
               * (1 - math.exp(-n_loss / 4)) * min(1.0, n_pass / 40))


FLOOR_RANGE = 1.5  # a police fit whose equally good rates span more than this ratio gives a floor only


def _police(tr: FlowTrace, fit: BucketFit, seq: PacketSeq, extra: str = "") -> Inference:
    rate = fit.rate * 8
    floor = fit.high > FLOOR_RANGE * fit.low
    packet = tr.mss + tr.header_bytes
    # A bucket of a packet or two, refilled by as much each round trip: the sender's packets came
    # one or two to a round trip (its window collapsed under the losses), each into a bucket that
    # had refilled, and any faster refill replays them alike (a 5 Mbit/s policer with a 2 KB bucket
    # read at a 50 ms receiver as 197 kbit/s, "from 177 to 210").
    clocked = tr.base_rtt is not None and fit.burst <= 2 * packet and fit.rate * tr.base_rtt <= 2 * packet
    if floor:
        rate = fit.low * 8
        extra += (f"; any rate from {rate / 1000:.0f} kbit/s up (to {fit.high * 8 / 1000:.0f} at least) fits as well: "
                  "the sender only met a full bucket, so the rate is at least that, and the capture cannot say how much more")
    elif clocked:
        floor = True
        rate = fit.low * 8
        extra += (f"; the sender's packets came a packet or two to a round trip, each into a refilled bucket: any rate "
                  f"from {rate / 1000:.0f} kbit/s up fits as well")
    elif fit.high > 1.1 * fit.low:
        extra += f"; rates from {fit.low * 8 / 1000:.0f} to {fit.high * 8 / 1000:.0f} kbit/s fit as well"
    return Inference(tr, "police", _bucket_confidence(fit, seq.losses, len(seq.t) - seq.losses),
                     f"a {rate / 1000:.0f} kbit/s bucket of {fit.burst / 1000:.1f} KB replays "
                     f"{fit.score:.0%} of passes and losses (scattered losses: {fit.null:.0%}){extra}",
                     rate_bps=Estimate(rate, fit.rate_error * 8), rate_floor=floor,
                     burst_bytes=Estimate(fit.burst, fit.burst_error))


def _window(tr: FlowTrace, fit: WindowFit, seq: PacketSeq) -> Inference:
    rate = fit.rate * 8
    return Inference(tr, "window", _bucket_confidence(fit, seq.losses, len(seq.t) - seq.losses),
                     f"{fit.burst / 1000:.1f} KB per {fit.period:.3f} s window replays {fit.score:.0%} "
                     f"of passes and losses (scattered losses: {fit.null:.0%})",
                     rate_bps=Estimate(rate, rate * math.hypot(fit.period_error / fit.period,
                                                              fit.burst_error / fit.burst)),
                     burst_bytes=Estimate(fit.burst, fit.burst_error),
                     period=Estimate(fit.period, fit.period_error),
                     duty=Estimate(fit.duty, 0.1))


def _lossy(tr: FlowTrace, seq: PacketSeq) -> Inference:
    n_loss = seq.losses
    pf = fit_police(seq)
    wf = fit_window(seq)
    q = queueing(tr, seq)
    scores = {"police": pf.score if pf else 0.0, "window": wf.score if wf else 0.0,
              "random": max(pf.null if pf else 0.5, wf.null if wf else 0.5)}
    if q is not None and q.inflated_before_losses >= 0.3:
        scores["queue"] = q.inflated_before_losses
        delay = Estimate(q.delay, q.delay_error)
        if pf is not None and pf.score >= OWN_QUEUE_SCORE:
            # A drop-tail queue drops like a bucket of its size; one that this flow's packets
            # alone explain, nearly packet for packet, is this flow's own: a shaper. A queue
            # shared with other traffic drops at moments this flow's packets cannot account for.
            return Inference(tr, "shape", _clamp(0.3 + q.inflated_before_losses / 2),
                             f"round trips {q.delay * 1000:.0f} ms over the base before "
                             f"{q.inflated_before_losses:.0%} of losses, and a queue draining at "
                             f"{pf.rate * 8 / 1000:.0f} kbit/s replays {pf.score:.0%} of this flow's "
                             "passes and losses (its own queue)",
                             rate_bps=Estimate(pf.rate * 8, pf.rate_error * 8), queue_delay=delay, scores=scores)
        return Inference(tr, "none", _clamp(0.4 + q.inflated_before_losses / 2),
                         f"congestion: round trips inflated by {q.delay * 1000:.0f} ms before "
                         f"{q.inflated_before_losses:.0%} of losses ({n_loss} of {len(seq.t)} packets lost)",
                         queue_delay=delay, scores=scores)
    if pf is not None and q is None and vantage(tr) == "receiver" and pf.rate >= 0.7 * peak_rate(tr) \
            and not unqueued_through_losses(tr, seq):
        # The "bucket" drains no faster than packets ever arrived back to back: a queue at the
        # path's narrowest point, not a policer (which passes line-rate bursts).
        held = steady_rate(seq, max(0.5, 4 * (tr.base_rtt or 0.0)))
        scores["queue"] = pf.score
        if held is not None and held[1] < 0.15:
            return Inference(tr, "shape", 0.5,
                             f"losses at a queue's end: packets never arrived faster than "
                             f"{pf.rate * 8 / 1000:.0f} kbit/s and the rate held (no round trips here "
                             "to measure the queue's delay)",
                             rate_bps=Estimate(held[0] * 8, held[0] * 0.8), scores=scores)
        return Inference(tr, "none", 0.5,
                         f"congestion: losses at a queue's end (packets never arrived faster than "
                         f"{pf.rate * 8 / 1000:.0f} kbit/s) while this flow's rate varied", scores=scores)
    window_better = wf is not None and (pf is None or wf.score > pf.score + 0.02)
    if wf is not None and pf is not None and not window_better and wf.score >= pf.score - 0.02:
        # Both replay the losses (a few losses fit either): the arrivals decide, a window's
        # bursts falling one to an interval of its period.
        passes = PacketSeq([t for t, ok in zip(seq.t, seq.passed) if ok],
                           [w for w, ok in zip(seq.wire, seq.passed) if ok], [True] * (len(seq.t) - n_loss))
        bursts = burst_starts(passes, 3 * (tr.base_rtt or 0.0))
        window_better = bursts is not None and abs(bursts[0] / wf.period - 1) < 0.1
    if window_better and wf is not None and wf.score >= POLICE_SCORE and wf.score - wf.null >= NULL_MARGIN:
        inf = _window(tr, wf, seq)
        inf.scores = scores
        return inf
    # A bucket that refills faster than packets ever arrived never emptied: no policer (a CI
    # run's unlimited 4 MB download, a few holes at the client, fitted "from 1.7 Tbit/s up")
    possible = pf is not None and pf.low <= 1.5 * peak_rate(tr)
    if pf is not None and possible and pf.score >= POLICE_SCORE and pf.score - pf.null >= NULL_MARGIN:
        if vantage(tr) == "receiver" and not tr.matched and pf.high > FLOOR_RANGE * pf.low:
            # A bucket of a packet or two at any rate from a floor up, while whole budgets arrive
            # one to each interval of a period: a window meter whose losses the holes placed too
            # roughly for its fit (a CI capture of the 2021 meter: 16 KB a second, read as a
            # 3 KB bucket from 481 kbit/s up)
            guess = _arrivals_only(tr, seq, f"{n_loss} losses at holes", plateaus=False)
            if guess is not None and guess.burst_bytes is not None and guess.burst_bytes.value >= 3 * pf.burst:
                guess.scores = scores
                return guess
        inf = _police(tr, pf, seq)
        inf.scores = scores
        return inf
    if n_loss < 3 or len(seq.t) < MIN_PACKETS:
        return Inference(tr, "none", 0.3, f"only {n_loss} loss(es) in {len(seq.t)} packets: too few to "
                         "fit a bucket", scores=scores)
    best = max(scores["police"], scores["window"])
    if vantage(tr) == "receiver":
        # holes place losses only roughly (a hole's packets may have been dropped flights earlier)
        # (only a window's bursts: a plateau is what random loss gives too, and the losses here
        # are visible and follow no bucket)
        guess = _arrivals_only(tr, seq, f"{n_loss} losses no bucket explains", plateaus=False)
        if guess is not None:
            guess.scores = scores
            return guess
    return Inference(tr, "none", _clamp(0.5 + (scores["random"] + 0.1 - best)),
                     f"{n_loss} losses no bucket explains (best fit {best:.0%}, scattered losses "
                     f"{scores['random']:.0%}): random loss or congestion", scores=scores)


def _lossless(tr: FlowTrace, seq: PacketSeq) -> Inference:
    q = queueing(tr, seq)
    # Without losses only a long queue says shaper (a lab control download showed 89 ms of
    # round-trip growth with nothing limiting it), and only as a hint.
    # A shaper's queue also stands: TCP keeps it full, so even the shortest round trips after the
    # handshake carry it (a shaper at 1 Mbit/s, 10 ms path: 70.3 ms at the 10th percentile).
    base = tr.base_rtt or 0.0
    standing = q is not None and q.standing >= max(QUEUE_SEEN, 0.3 * base) and q.standing >= 0.5 * q.delay
    if q is not None and (q.delay >= max(0.2, 2 * base) or standing) and q.steady:
        return Inference(tr, "shape", 0.5,
                         f"no loss; round trips grew by {q.delay * 1000:.0f} ms while the rate held at "
                         f"{q.rate * 8 / 1000:.0f} kbit/s", rate_bps=Estimate(q.rate * 8, q.rate * 0.8),
                         queue_delay=Estimate(q.delay, q.delay_error))
    # losses this trace may not show: QUIC's are encrypted, and at the receiver a drop at the end of
    # a flight leaves no hole (its retransmission arrives in order)
    blind = not tr.losses_known or tr.transport != "tcp" or not tr.acks or vantage(tr) == "receiver"
    if blind:
        guess = _arrivals_only(tr, seq, "no losses visible", queue=q)
        if guess is not None:
            return guess
        if tr.transport == "tcp":
            return Inference(tr, "none", 0.6, "no hole in the sequence, no periodic gaps and no rate plateau")
        return Inference(tr, "none", 0.3, "no losses visible and no rate plateau: cannot decide")
    return Inference(tr, "none", 0.8, "no loss")


def _arrivals_only(tr: FlowTrace, seq: PacketSeq, why: str, plateaus: bool = True,
                   queue: Queueing | None = None) -> Inference | None:
    """What the passes alone suggest (a window's bursts, a policer's plateau), at low confidence.
    Round trips measured along the flow (`queue`: QUIC's spin bit) say which plateau a queue held."""
    passes = PacketSeq([t for t, ok in zip(seq.t, seq.passed) if ok],
                       [w for w, ok in zip(seq.wire, seq.passed) if ok], [True] * (len(seq.t) - seq.losses))
    starts = burst_starts(passes, 3 * (tr.base_rtt or 0.0))
    if starts is not None:
        period, passed = starts
        budget = passed + (tr.mss + tr.header_bytes) / 2  # the budget held these, not one more packet
        return Inference(tr, "window", 0.45,
                         f"{why}; {passed / 1000:.1f} KB arrives in each {period:.3f} s interval, then nothing",
                         rate_bps=Estimate(budget / period * 8, budget / period * 0.8),
                         burst_bytes=Estimate(budget, budget * 0.2), period=Estimate(period, period * 0.05))
    flat = plateau(passes) if plateaus else None
    base = tr.base_rtt or 0.0
    lossy = _quic_gaps(tr)  # None: this trace cannot say; else the share of ACKs that skipped packets
    if flat is not None and queue is not None and queue.delay >= max(0.2, 2 * base) and lossy is not None \
            and lossy < QUIC_LOSSY:
        return Inference(tr, "shape", 0.45,
                         f"{why}, none in the receiver's acknowledgements either, and round trips grew by "
                         f"{queue.delay * 1000:.0f} ms while the rate held at {flat[0] * 8 / 1000:.0f} kbit/s",
                         rate_bps=Estimate(flat[0] * 8, flat[0] * 0.8), queue_delay=Estimate(queue.delay, queue.delay_error))
    if flat is not None and lossy is not None and lossy < QUIC_LOSSY:
        # a policer that holds a rate drops what exceeds it; the receiver missed nothing
        return Inference(tr, "none", 0.5,
                         f"{why} in the packets, and none in the receiver's acknowledgements (their sizes show "
                         f"no skipped ranges); the rate holds at {flat[0] * 8 / 1000:.0f} kbit/s: the sender's "
                         "own limit or a queue's, not a policer's")
    if flat is not None and queue is not None and queue.delay >= max(0.5 * base, QUEUE_SEEN):
        # a policer holds no queue: a rate that held while round trips grew is a queue's drain rate
        return Inference(tr, "none", 0.45,
                         f"{why}; the rate holds at {flat[0] * 8 / 1000:.0f} kbit/s while round trips grew by "
                         f"{queue.delay * 1000:.0f} ms: a queue (congestion, or a shaper) held it, not a policer",
                         queue_delay=Estimate(queue.delay, queue.delay_error))
    # windows of 4 round trips, and of 20 packets at the least (fewer swing by their count alone)
    window = max(4 * base, 0.1, 20 * (tr.mss + tr.header_bytes) / flat[0]) if flat is not None else 0.0
    swings = swing(passes, window) if flat is not None and lossy is not None else None
    if flat is not None and swings is not None and swings > CEILING_SWING and lossy is not None \
            and lossy < HEAVY_LOSS:
        return Inference(tr, "none", 0.45,
                         f"{why} in the packets, but {lossy:.0%} of the receiver's acknowledgements skip packets, and "
                         f"the rate swings ({swings:.2f} times its median over {window * 1000:.0f} ms): "
                         "a congestion controller's answer to losses at random, not a policer's ceiling")
    unqueued = queue is not None  # round trips measured, and they did not grow
    sure = 0.15 if lossy is not None else 0.0  # the acknowledgements show the losses a policer makes
    if lossy is not None:
        why = f"{why} in the packets, but {lossy:.0%} of the receiver's acknowledgements skip packets"
    if flat is not None and not tr.losses_known and vantage(tr) == "sender":
        # what a sender sends includes what the policer then drops, which this trace cannot see
        # (QUIC's acknowledgements are encrypted): the plateau bounds the rate, it does not give it
        rate, burst = flat
        return Inference(tr, "police", (0.4 if unqueued else 0.3) + sure,
                         f"{why}; the sender holds at {rate * 8 / 1000:.0f} kbit/s after a {burst / 1000:.1f} KB "
                         "burst: a limit at or below that rate (its losses are out of sight here: a capture at "
                         "the receiver gives the rate)")
    if flat is not None:
        rate, burst = flat
        return Inference(tr, "police", (0.45 if burst >= 4 * tr.mss else 0.3) + (0.1 if unqueued else 0.0) + sure,
                         f"{why}; the rate holds at {rate * 8 / 1000:.0f} kbit/s after a "
                         f"{burst / 1000:.1f} KB burst " + (
                             "(a policer passes no more than its rate: it is at least that, and close to it where "
                             "the sender kept the bucket empty)" if lossy is not None else
                             "(a policer or a shaper: losses would tell)"),
                         rate_bps=Estimate(rate * 8, rate * 0.4), rate_floor=lossy is not None,
                         burst_bytes=Estimate(burst, burst * 0.5))
    return None


def _quic_gaps(tr: FlowTrace) -> float | None:
    """The share of the receiver's acknowledgement-only packets whose size says they skipped
    packets; None where the trace has too few of them to say."""
    if tr.losses_known or tr.acks_seen < QUIC_ACKS:
        return None
    return len(tr.gap_acks) / tr.acks_seen


def _single(tr: FlowTrace) -> tuple[Inference, PacketSeq | None]:
    early = _handshake(tr) or _reset(tr)
    if early is not None:
        return early, None
    if not tr.sent:
        return Inference(tr, "none", 0.1, "no data in this direction"), None
    seq = packets(tr)
    stall = stalled(tr, seq)
    if stall is not None:
        after, sure, why = stall
        return Inference(tr, "freeze", sure, why, after_bytes=after), seq
    if len(seq.t) < MIN_PACKETS:
        return Inference(tr, "none", 0.2, f"only {len(seq.t)} packets"), seq
    inf = _lossless(tr, seq) if seq.losses == 0 else _lossy(tr, seq)
    if tr.started_mid_flow:
        inf.confidence *= 0.6
        inf.reason += " (the capture started mid-flow)"
    return inf, seq


def _groups(traces: list[FlowTrace]) -> list[list[int]]:
    """Sets of flows that may share one bucket: same direction and vantage, and the same client
    address (scope client) or the same name (scope rule), overlapping in time."""
    by_key: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for n, tr in enumerate(traces):
        if not tr.lost:
            continue
        host = tr.client.rsplit(":", 1)[0]
        by_key[("client", host, tr.direction, tr.vantage, tr.transport)].append(n)
        if tr.server_name:
            by_key[("name", tr.server_name, tr.direction, tr.vantage, tr.transport)].append(n)
    groups: list[list[int]] = []
    for members in by_key.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda n: traces[n].first)
        overlapping = [m for m in members
                       if any(o != m and traces[o].first < traces[m].last and traces[m].first < traces[o].last
                              for o in members)]
        if len(overlapping) >= 2 and overlapping not in groups:
            groups.append(overlapping)
    return groups


def infer(traces: list[FlowTrace]) -> list[Inference]:
    """What limited each trace's flow direction; flows sharing one bucket are found together."""
    return join_shared(traces, [single(tr) for tr in traces])


def single(tr: FlowTrace) -> tuple[Inference, PacketSeq | None]:
    """One trace fitted alone, and the packets (passed or lost) a joint fit with others would
    use; None where no joint fit can change the answer (`join_shared` skips such a flow's group)."""
    inf, seq = _single(tr)
    if inf.mechanism not in ("police", "none") or inf.scores.get("queue", 0.0) >= 0.3:
        return inf, None
    return inf, seq


def join_shared(traces: list[FlowTrace], singles: list[tuple[Inference, PacketSeq | None]]) -> list[Inference]:
    """The single fits, each replaced by a joint fit with the flows that may share its bucket
    (`_groups`, traces with losses only) where that explains it better. Only counts and times
    are read of the traces, so released ones (`FlowTrace.release`) do."""
    out = [inf for inf, _ in singles]
    for members in _groups(traces):
        seqs = [singles[m][1] for m in members]
        if any(s is None for s in seqs) or any(out[m].mechanism not in ("police", "none") for m in members):
            continue
        if any(out[m].scores.get("queue", 0.0) >= 0.3 for m in members):
            continue  # round trips grew before the losses: a queue dropped them, and a policer queues nothing
        merged = PacketSeq([], [], [])
        owner: list[int] = []
        for t, w, ok, m in sorted(x for m, s in zip(members, seqs) if s is not None
                                  for x in zip(s.t, s.wire, s.passed, [m] * len(s.t))):
            merged.t.append(t)
            merged.wire.append(w)
            merged.passed.append(ok)
            owner.append(m)
        joint = fit_police(merged)
        if joint is None or joint.score < POLICE_SCORE or joint.score - joint.null < NULL_MARGIN:
            continue
        hits = agreement(merged, joint.rate, joint.burst)
        for m in members:
            own = out[m].scores.get("police", 0.0)
            # the shared bucket must explain this flow's own packets, not only the others'
            mine = balanced([h for h, o in zip(hits, owner) if o == m],
                            [ok for ok, o in zip(merged.passed, owner) if o == m])
            if mine >= POLICE_SCORE and (out[m].mechanism != "police" or mine > own + 0.02):
                inf = _police(traces[m], joint, merged,
                              f"; one bucket shared with {len(members) - 1} other flow(s)")
                inf.scores = dict(out[m].scores, shared=mine)
                out[m] = inf
    return out


__all__ = ["infer", "join_shared", "single"]
