"""throttle.infer.fit against ground truth: packet sequences from the engine's own buckets, and
TCP-like transfers simulated through a policer, a window meter, random loss, a shared bucket, a
congested queue, a freeze and an injected reset (tests/infer_sim.py), seen from either end.

Every case is seeded and simulated, never timed: the assertions are about what was inferred."""

from __future__ import annotations

import random

import pytest

from tests import infer_sim as sim
from tests.conftest import VECTORS
from throttle.engine.buckets import Policer, WindowMeter
from throttle.infer.fit import infer
from throttle.infer.fit_bucket import PacketSeq, deficits, fit_police, fit_window, split
from throttle.infer.trace import FlowTrace, Inference, Sent


def one(case: sim.Case) -> Inference:
    return infer(case.traces())[0]


def off(estimate: float, truth: float) -> float:
    return abs(estimate / truth - 1)


# --- the fits on packet sequences a bucket decided (no TCP)


def arrivals(seed: int, count: int, mean_gap: float) -> list[tuple[float, int]]:
    """Bursty arrivals: runs of back-to-back packets with idle gaps, sizes 60-1500 bytes."""
    rng = random.Random(seed)
    t, out = 0.0, []
    while len(out) < count:
        for _ in range(rng.randint(1, 30)):
            out.append((t, rng.choice((1500, 1500, 1500, 600, 60))))
            t += 0.00012
        t += rng.expovariate(1 / mean_gap)
    return out


@pytest.mark.parametrize("rate,burst", [(8_000, 2_000), (62_500, 16_000), (187_500, 100_000)])
def test_a_policers_decisions_give_back_its_rate_and_burst(rate: float, burst: int) -> None:
    bucket = Policer(rate, burst, 0.0)
    seq = PacketSeq([], [], [])
    for t, size in arrivals(7, 1500, 1500 / rate * 8):
        seq.t.append(t)
        seq.wire.append(size)
        seq.passed.append(bucket.allow(size, t))
    fit = fit_police(seq)
    assert fit is not None
    assert fit.score > 0.99 and fit.null < 0.7
    assert off(fit.rate, rate) < 0.01
    assert off(fit.burst, burst) < 0.05


def test_a_window_meters_decisions_give_back_its_period() -> None:
    meter = WindowMeter(16_250, 16_000)  # 130 kbit/s, 16 KB: a period of 0.985 s
    seq = PacketSeq([], [], [])
    for t, size in arrivals(3, 2000, 0.05):
        seq.t.append(t)
        seq.wire.append(size)
        seq.passed.append(meter.allow(size, t))
    fit = fit_window(seq)
    assert fit is not None and fit.score > 0.99
    assert off(fit.period, 16_000 / 16_250) < 0.01
    assert off(fit.rate, 16_250) < 0.08


def test_losses_that_owe_nothing_to_a_bucket_fit_none() -> None:
    rng = random.Random(5)
    seq = PacketSeq([], [], [])
    for t, size in arrivals(5, 3000, 0.01):
        seq.t.append(t)
        seq.wire.append(size)
        seq.passed.append(rng.random() > 0.02)
    fit = fit_police(seq)
    assert fit is None or fit.score < 0.8


def test_the_threshold_separates_passes_from_losses() -> None:
    assert split([1.0, 2.0, 3.0, 4.0], [True, True, False, False]).threshold == 2.0
    assert split([1.0, 2.0, 3.0, 4.0], [True, True, False, False]).score == 1.0
    assert split([1.0, 2.0, 3.0], [True, False, True]).score < 1.0
    # a bucket refilled at 1000 B/s: the second packet finds 1000 bytes short, minus the refill
    seq = PacketSeq([0.0, 0.5, 0.5], [1000, 1000, 1000], [True, True, False])
    assert deficits(seq, 1000.0) == [1000.0, 1500.0, 2500.0]


# --- whole transfers: police from either end, at 10, 50 and 150 ms


POLICE = [sim.Case("police", "police", v, rtt, 2_000_000, 1.5e6, 100_000)
          for v in ("sender", "receiver") for rtt in (0.01, 0.05, 0.15)]
POLICE += [sim.Case("police", "police", v, 0.05, 3_000_000, 5e6, 500_000) for v in ("sender", "receiver")]
POLICE += [sim.Case("police", "police", v, 0.05, 512_000, 500e3, 8_000) for v in ("sender", "receiver")]


@pytest.mark.parametrize("case", POLICE, ids=lambda c: c.name)
def test_police_is_found_with_its_ip_layer_rate_and_burst(case: sim.Case) -> None:
    inf = one(case)
    assert inf.mechanism == "police", inf.reason
    assert inf.confidence >= 0.8
    assert inf.rate_bps is not None and inf.burst_bytes is not None
    assert off(inf.rate_bps.value, case.rate_bps) < 0.03, inf.reason
    assert off(inf.burst_bytes.value, case.burst) < 0.25, inf.reason
    # the stated uncertainty covers the truth
    assert abs(inf.rate_bps.value - case.rate_bps) <= 3 * inf.rate_bps.error + 0.01 * case.rate_bps


@pytest.mark.parametrize("vantage", ["sender", "receiver"])
def test_a_rate_the_trace_cannot_pin_says_so(vantage: str) -> None:
    """An 8 KB bucket at 150 ms: the bucket refills before every retransmission, so any rate above
    a floor explains the trace; the estimate's uncertainty must be as wide as that."""
    case = sim.Case("police", "police", vantage, 0.15, 512_000, 500e3, 8_000)
    inf = one(case)
    assert inf.mechanism == "police"
    assert inf.rate_bps is not None
    if inf.rate_floor:  # then what it claims is a lower bound: at or under the rate (TCP runs a little under)
        assert inf.rate_bps.value <= 1.03 * case.rate_bps and "at least" in inf.reason
    else:
        assert abs(inf.rate_bps.value - case.rate_bps) <= 3 * inf.rate_bps.error


def test_a_two_kilobyte_bucket_gives_a_floor_and_says_so() -> None:
    """A 2 KB bucket at 5 Mbit/s holds one packet, refilled in 2.4 ms: a sender's bursts pass
    their first packet only, whatever the rate beyond that."""
    case = sim.Case("police", "police", "sender", 0.05, 512_000, 5e6, 2_048)
    inf = one(case)
    assert inf.mechanism == "police" and inf.rate_floor and inf.rate_bps is not None
    assert inf.rate_bps.value < case.rate_bps and "cannot say" in inf.reason


@pytest.mark.parametrize("vantage", ["sender", "receiver"])
def test_two_flows_sharing_one_bucket_are_fitted_together(vantage: str) -> None:
    case = sim.Case("police", "shared", vantage, 0.05, 600_000, 1.5e6, 100_000)
    for inf in infer(case.traces()):
        assert inf.mechanism == "police", inf.reason
        assert inf.rate_bps is not None and off(inf.rate_bps.value, case.rate_bps) < 0.03
        assert "shared" in inf.reason


# --- what is not a policer


@pytest.mark.parametrize("case", [sim.Case("none", "random", v, rtt, 2_000_000, extra=p)
                                  for v in ("sender", "receiver") for rtt in (0.01, 0.15) for p in (0.01, 0.02)],
                         ids=lambda c: c.name)
def test_random_loss_is_not_police(case: sim.Case) -> None:
    inf = one(case)
    assert inf.mechanism == "none", inf.reason


@pytest.mark.parametrize("case", [sim.Case("none", "congestion", v, rtt, 1_000_000, 10e6, 100_000)
                                  for v, rtt in (("sender", 0.01), ("sender", 0.05), ("sender", 0.15),
                                                 ("receiver", 0.01), ("receiver", 0.05))],
                         ids=lambda c: c.name)
def test_congestion_is_not_police(case: sim.Case) -> None:
    inf = infer(case.traces()[:1])[0]  # the competing flow is another client's, out of this capture
    assert inf.mechanism == "none", inf.reason
    assert "congestion" in inf.reason


def test_a_receivers_round_trips_before_its_first_loss_show_the_queue() -> None:
    """At the receiver, round trips after a loss hold the sender's retransmission waits; those
    before it are clean, and a queue that grew to the first loss is congestion's (the lab's
    congestion at 150 ms: 50 ms of queue, which a police fit also replays)."""
    case = sim.Case("none", "congestion", "receiver", 0.15, 1_000_000, 10e6, 100_000)
    tr = case.traces()[0]
    first = min(loss.t for loss in tr.losses)
    sender = sim.Case("none", "congestion", "sender", 0.15, 1_000_000, 10e6, 100_000).traces()[0]
    tr.rtt = [x for x in sender.rtt if x[0] < first]  # the same run's round trips, up to the first loss
    assert len(tr.rtt) >= 5 and max(r for _, r in tr.rtt) > 0.17
    inf = infer([tr])[0]
    assert inf.mechanism == "none" and "congestion" in inf.reason, inf.reason
    assert inf.scores.get("queue") == 1.0  # the first episode, judged by the clean samples


@pytest.mark.parametrize("rtt", [0.01, 0.05])
def test_a_shaper_is_a_queue_of_the_flows_own(rtt: float) -> None:
    inf = one(sim.Case("shape", "shape", "sender", rtt, 1_000_000, 1e6))
    assert inf.mechanism == "shape", inf.reason
    assert inf.rate_bps is not None and off(inf.rate_bps.value, 1e6) < 0.05
    assert inf.queue_delay is not None and 0.8 < inf.queue_delay.value < 1.1  # the shaper's 1 s bound


@pytest.mark.parametrize("vantage", ["sender"])  # (the simulator gives a receiver no round trips)
def test_a_shaper_whose_short_queue_stands_is_found_without_losses(vantage: str) -> None:
    """A receiver's window of 8 segments keeps a 1 Mbit/s shaper's queue at about 85 ms, full all
    along and never overflowing (the lab's shaper at 10 ms showed 60 ms so): shape, not none."""
    flows = [sim.Flow(1_000_000, rtt=0.01, max_window=8)]
    inf = infer(sim.run(sim.shape(1e6), flows, vantage)[:1])[0]
    assert not inf.trace.losses and inf.mechanism == "shape", inf.reason
    assert inf.queue_delay is not None and 0.05 < inf.queue_delay.value < 0.12
    unshaped = infer(sim.run(sim.unlimited, [sim.Flow(1_000_000, rtt=0.01, max_window=8)], vantage)[:1])[0]
    assert unshaped.mechanism == "none", unshaped.reason


@pytest.mark.parametrize("vantage", ["sender", "receiver"])
def test_an_unlimited_transfer_is_none(vantage: str) -> None:
    inf = one(sim.Case("none", "unlimited", vantage, 0.05, 1_000_000))
    assert inf.mechanism == "none"


# --- windows, freezes, resets, handshakes


@pytest.mark.parametrize("rtt", [0.01, 0.05])
def test_a_window_meter_is_told_from_a_policer(rtt: float) -> None:
    case = sim.Case("window", "window", "sender", rtt, 400_000, 130e3, 16_000)
    inf = one(case)
    assert inf.mechanism == "window", inf.reason
    assert inf.period is not None and off(inf.period.value, 16_000 / (130e3 / 8)) < 0.03
    assert inf.rate_bps is not None and off(inf.rate_bps.value, case.rate_bps) < 0.05
    assert inf.scores["window"] > inf.scores["police"]


@pytest.mark.parametrize("rtt", [0.01, 0.05])
def test_a_window_seen_only_in_arrivals_is_a_guess(rtt: float) -> None:
    inf = one(sim.Case("window", "window", "receiver", rtt, 400_000, 130e3, 16_000))
    assert inf.mechanism == "window"
    assert inf.confidence < 0.5
    assert inf.period is not None and off(inf.period.value, 16_000 / (130e3 / 8)) < 0.05


@pytest.mark.parametrize("vantage", ["sender", "receiver"])
def test_a_freeze_gives_the_bytes_before_it(vantage: str) -> None:
    inf = one(sim.Case("freeze", "freeze", vantage, 0.05, 400_000, extra=16_000))
    assert inf.mechanism == "freeze"
    assert inf.after_bytes is not None and 16_000 <= inf.after_bytes <= 16_000 + 2 * 1448
    assert inf.confidence >= (0.8 if vantage == "sender" else 0.4)


def test_an_injected_reset_and_an_endpoints_own() -> None:
    traces = sim.Case("reset", "reset", "receiver", 0.05, 400_000, extra=30_000).traces()
    inf = infer(traces)[0]
    assert inf.mechanism == "reset" and inf.after_bytes is not None and 10_000 <= inf.after_bytes <= 32_000
    own = traces[0].resets[0]._replace(ttl=52, ip_id=1)  # what the server's own stack sends
    traces[0].resets = [own]
    assert infer(traces)[0].mechanism != "reset"


@pytest.mark.parametrize("after, injected", [(0.002, True), (0.06, False)])
def test_a_reset_sooner_than_a_round_trip_is_injected(after: float, injected: bool) -> None:
    """A client-side capture: the server's RST looks like the server's own (its TTL, its IP ID
    counting on), but one that comes 2 ms after the hello, inside a 50 ms round trip, cannot be the
    server's answer; a round trip later it can."""
    from throttle.infer.trace import Reset

    tr = FlowTrace("198.18.0.2:40000", "198.18.1.2:443", "tcp", "upload", "pbs.twimg.com", "tls", "sender",
                   first=0.9, last=1.0, hello_at=1.0, handshake=None, base_rtt=0.05)
    tr.sent.append(Sent(1.0, 0, 517, 569, False))
    tr.resets = [Reset(1.0 + after, False, 63, 101, 63, 100, 517)]
    inf = one_trace(tr)
    assert (inf.mechanism == "reset") == injected, inf.reason
    if injected:
        assert "inside the 50 ms round trip" in inf.reason and inf.after_bytes == 517


def test_handshakes_that_time_out_or_crawl() -> None:
    assert one_trace(sim.handshake_trace("timeout")).mechanism == "timeout"
    crawl = one_trace(sim.handshake_trace("crawl", crawl=5.6))
    assert crawl.mechanism == "crawl" and crawl.confidence > 0.8
    assert one_trace(sim.handshake_trace("ok")).mechanism == "none"


def one_trace(tr: FlowTrace) -> Inference:
    return infer([tr])[0]


# --- where it cannot decide


def test_too_few_packets_is_said_with_low_confidence() -> None:
    tr = sim.Case("police", "police", "sender", 0.05, 6_000, 64e3, 2_000).traces()[0]
    inf = one_trace(tr)
    assert inf.confidence <= 0.3


def test_a_capture_started_mid_flow_lowers_the_confidence() -> None:
    tr = sim.Case("police", "police", "sender", 0.05, 1_000_000, 1.5e6, 100_000).traces()[0]
    whole = one_trace(tr)
    tr.started_mid_flow = True
    partial = one_trace(tr)
    assert partial.confidence < whole.confidence
    assert "mid-flow" in partial.reason


def test_quic_without_visible_losses_is_a_low_confidence_plateau() -> None:
    """A QUIC receiver sees a 100 KB burst, then a steady 1.5 Mbit/s (its losses are encrypted)."""
    tr = FlowTrace(client="10.0.0.2:50000", server="10.0.1.2:443", transport="quic",
                   direction="download", vantage="receiver")
    t = 0.0
    for n in range(70):  # the burst, at line rate
        tr.sent.append(Sent(t, n * 1400, 1400, 1450, False))
        t += 0.0001
    while len(tr.sent) < 1500:
        t += 1450 / (1.5e6 / 8)
        n = len(tr.sent)
        tr.sent.append(Sent(t, n * 1400, 1400, 1450, False))
    tr.last, tr.mss, tr.header_bytes = t, 1400, 50
    inf = one_trace(tr)
    assert inf.mechanism == "police"
    assert inf.confidence < 0.5
    assert inf.rate_bps is not None and off(inf.rate_bps.value, 1.5e6) < 0.05


# --- any trace: an inference, never an exception


def random_trace(rng: random.Random) -> FlowTrace:
    tr = FlowTrace(client="10.0.0.2:1", server="10.0.1.2:2", transport=rng.choice(["tcp", "quic", "udp"]),
                   direction="upload", vantage=rng.choice(["sender", "receiver", "unknown"]))
    t = rng.choice([0.0, -5.0, 1e9])
    for _ in range(rng.choice([0, 1, 2, 5, 50, 200])):
        t += rng.choice([0.0, 0.0, 1e-6, 0.001, 0.3, 5.0])
        start = rng.randrange(0, 200_000, 1448)
        length = rng.choice([0, 1, 1448, 65_000])
        tr.sent.append(Sent(t, start, length, length + 52, rng.random() < 0.2))
        if rng.random() < 0.15:
            tr.losses.append(sim.Loss(t if rng.random() < 0.5 else t + 0.01, start, length, rng.choice([0, 1500, 9000])))
        if rng.random() < 0.5:
            tr.acks.append(sim.Ack(t + 0.05, rng.randrange(0, 200_000), ((start, start + length),)))
        if rng.random() < 0.3:
            tr.rtt.append((t + 0.05, rng.choice([0.0, 0.001, 0.05, 2.0])))
    tr.base_rtt = rng.choice([None, 0.0, 0.05])
    tr.hello_at = rng.choice([None, 0.0])
    tr.handshake = rng.choice([None, 0.0, 0.05, 3.0])
    tr.delivered = rng.choice([0, 1000, 10**7])
    tr.fin = rng.random() < 0.5
    tr.started_mid_flow = rng.random() < 0.2
    tr.last = t
    if rng.random() < 0.1:
        tr.resets.append(sim.Reset(t, True, 64, rng.choice([None, 7]), rng.choice([None, 64, 50]),
                                   rng.choice([None, 6]), 0))
    return tr


def test_any_trace_gets_an_inference_and_no_exception() -> None:
    rng = random.Random(21)
    for _ in range(60):
        traces = [random_trace(rng) for _ in range(rng.choice([1, 1, 3]))]
        for inf in infer(traces):
            assert 0.0 <= inf.confidence <= 1.0
            assert inf.reason
            for est in (inf.rate_bps, inf.burst_bytes, inf.period, inf.duty, inf.queue_delay):
                assert est is None or (est.value == est.value and est.error >= 0)  # no NaN


def test_offload_super_segments_are_fitted_as_the_packets_the_limiter_saw() -> None:
    """A sender capture with TSO on shows back-to-back packets as one segment of several MSS, and
    a loss as the part of it sent again: the fit splits it into the packets the policer saw."""
    case = sim.Case("police", "police", "sender", 0.05, 2_000_000, 1.5e6, 100_000)
    tr = case.traces()[0]
    merged: list[Sent] = []
    home: dict[tuple[int, float], float] = {}  # each packet's (start, time) -> its segment's time
    for s in tr.sent:
        last = merged[-1] if merged else None
        if (last is not None and s.retransmission == last.retransmission and s.t - last.t < 0.0005
                and last.start + last.length == s.start and last.length < 8 * 1448):
            merged[-1] = Sent(last.t, last.start, last.length + s.length, last.wire + s.length, s.retransmission)
        else:
            merged.append(s)
        home[s.start, s.t] = merged[-1].t
    assert len(merged) < 0.5 * len(tr.sent)
    tr.sent = merged
    tr.losses = [lo._replace(t=home[lo.start, lo.t]) for lo in tr.losses]
    inf = one_trace(tr)
    assert inf.mechanism == "police", inf.reason
    assert inf.rate_bps is not None and off(inf.rate_bps.value, case.rate_bps) < 0.03
    assert inf.burst_bytes is not None and off(inf.burst_bytes.value, case.burst) < 0.1


def test_a_flow_beside_a_policed_one_is_not_pulled_into_its_bucket() -> None:
    """One client: a policed transfer and, at the same time, one through 2% random loss only."""
    policed = sim.police(1.5e6, 100_000)
    lossy = sim.random_loss(0.02, 3)

    def admit(size: int, now: float, flow: int) -> float | None:
        return (policed if flow == 0 else lossy)(size, now, flow)

    traces = sim.run(admit, [sim.Flow(2_000_000, rtt=0.05), sim.Flow(500_000, rtt=0.05, start=0.5)], "sender")
    traces[1].client = "10.0.0.2:40001"
    first, second = infer(traces)
    assert first.mechanism == "police" and second.mechanism == "none", (first.reason, second.reason)


def test_a_retransmission_the_receiver_reports_twice_was_no_loss() -> None:
    """A D-SACK block (RFC 2883) says the first copy arrived: that copy is not a loss."""
    tr = sim.Case("police", "police", "sender", 0.05, 2_000_000, 1.5e6, 100_000).traces()[0]
    clean = one_trace(tr)
    # forty copies that passed, read as losses (as a retransmission after a delayed ACK is),
    # each reported twice by the receiver a round trip later
    resent = {lo.start for lo in tr.losses}
    passed = [s for s in tr.sent if s.start not in resent][200:1400:30]
    tr.losses = sorted(tr.losses + [sim.Loss(s.t, s.start, s.length, s.wire) for s in passed])
    # (the D-SACK block inside a second block, RFC 2883's other form; the cumulative ACK left out)
    tr.acks = sorted(tr.acks + [sim.Ack(s.t + 0.05, 0, ((s.start, s.start + s.length),
                                                      (s.start - 1448, s.start + 2896)))
                                for s in passed])
    inf = one_trace(tr)
    assert inf.mechanism == "police"
    assert inf.scores["police"] >= clean.scores["police"] - 0.002
    assert inf.rate_bps is not None and off(inf.rate_bps.value, 1.5e6) < 0.03


def test_a_receiver_whose_round_trips_stayed_at_the_base_through_its_losses_saw_no_queue() -> None:
    """A lab capture (tests/vectors/infer/README.md): a 2 KB bucket at 256 kbit/s, 50 ms, seen at
    the receiver. Packets arrive evenly spaced, a packet or two a round trip, as from a queue's
    drain, but the round trips stay at the base through the losses: no queue's end dropped them.
    A policer, whose rate the capture bounds only from below (and the bound holds)."""
    from throttle.infer.reader import read_traces

    traces, problems = read_traces([str(VECTORS / "infer" / "infer-police-2kb-256kbit-50ms-client.pcap")])
    assert not problems
    (tr,) = [t for t in traces if t.server_name == "pbs.twimg.com" and t.direction == "download"]
    assert tr.vantage == "receiver" and len(tr.losses) > 50
    inf = infer([tr])[0]
    assert inf.mechanism == "police" and inf.rate_floor and inf.rate_bps is not None, inf.reason
    assert inf.rate_bps.value <= 256e3 and "a packet or two to a round trip" in inf.reason
    # the same arrivals with round trips a full queue would have made: still a queue's
    tr.rtt = [(t, r + 0.2) for t, r in tr.rtt]
    assert infer([tr])[0].mechanism != "police"
