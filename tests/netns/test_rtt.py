"""The lab's link, live: `Lab.up(link=...)` adds the RTT asked for (ping, and a TCP handshake seen
by tcpdump at the client), jitter spreads round trips without reordering a transfer, the
bottleneck holds a transfer near its rate and two competing flows overflow its queue, and the link
is set again (or taken off) by the next `up`. A lab of its own: it changes the router's link."""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests import pace
from tests.conftest import lab_name
from tests.netns.conftest import lab_session
from throttle.children import Background, capture
from throttle.kernel.tools import require_tool
from throttle.lab.layout import ROUTER_PORTS
from throttle.lab.topology import CLIENT_IF, PATH_NETEM, PATH_STAGE, SERVER_IF, SERVER_V4, Lab, Link
from throttle.measure.bench import Capture, parse_segment
from throttle.wire.pcap import read_packets

SYN, ACK = 0x02, 0x10
TRIES = 3  # a busy machine may disturb one round of pings; the link is judged by its best round


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from lab_session(lab_name("rtt"), ["pbs.twimg.com"])


def pings(lab: Lab, count: int = 10, interval: float = 0.2) -> list[float]:
    """Round-trip times in ms from the client to the server."""
    out = capture(lab.exec_argv("client", [require_tool("ping", "iputils-ping"), "-n", "-c", str(count), "-i",
                                           str(interval), SERVER_V4]), "ping", timeout=count * interval + 10).out
    return [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]


def median_near(lab: Lab, target_ms: float, within_ms: float) -> list[float]:
    """A round of pings whose median is within `within_ms` of the target (up to TRIES rounds)."""
    rounds = []
    for _ in range(TRIES):
        times = pings(lab)
        assert len(times) >= 8, f"pings lost: {times}"
        rounds.append(times)
        if abs(statistics.median(times) - target_ms) <= within_ms:
            return times
    pytest.fail(f"ping medians {[round(statistics.median(t), 2) for t in rounds]} ms, not {target_ms} +- {within_ms}")


def upload(lab: Lab, tmp: Path, size: int) -> Background:
    """An upload running beside the test (curl, in the client namespace)."""
    argv = [require_tool("curl", "curl"), "-sS", "-o", "/dev/null", "-T", str(_file(tmp, size)),
            f"http://{SERVER_V4}/upload"]
    return Background(lab.exec_argv("client", argv), ready="", what="curl")


def run_upload(lab: Lab, tmp: Path, size: int) -> float:
    """One upload's speed as curl measured it, bytes/s."""
    done = capture(lab.exec_argv("client", [require_tool("curl", "curl"), "-sS", "-o", "/dev/null", "-w",
                                            "%{speed_upload}", "-T", str(_file(tmp, size)),
                                            f"http://{SERVER_V4}/upload"]), "curl", timeout=pace.seconds(60))
    assert done.code == 0, done.err
    return float(done.out)


def unlimited_speed(lab: Lab, tmp: Path) -> float:
    """bit/s of the bottleneck test's upload on the same link without the bottleneck."""
    lab.up(["pbs.twimg.com"], Link(0.02))
    return max(run_upload(lab, tmp, 2 << 20) for _ in range(2)) * 8


def _file(tmp: Path, size: int) -> Path:
    path = tmp / f"up-{size}.bin"
    if not path.exists():
        path.write_bytes(bytes(size))
    return path


def test_rtt_100ms_reads_100ms_in_ping_and_in_a_tcp_handshake(lab: Lab, tmp_path: Path) -> None:
    # The link adds 100 ms to what the lab's own hops take: 0.1 ms here, 2 ms in an emulated VM
    # (pings there read 102-103.5 ms), so the lab without a link is measured first.
    lab.up(["pbs.twimg.com"], Link())
    own = statistics.median(pings(lab, 10, 0.05))
    st = lab.up(["pbs.twimg.com"], Link(0.1))
    assert st.up and st.link.link == Link(0.1) and st.link.path in (PATH_NETEM, PATH_STAGE)
    if st.link.path == PATH_STAGE:
        assert st.link.stage is not None
    median_near(lab, 100.0 + own, 1.0)
    cap = tmp_path / "client.pcap"
    with Capture(lab, "client", CLIENT_IF, cap):
        time.sleep(0.2)
        run_upload(lab, tmp_path, 256 * 1024)
        for _ in range(TRIES - 1):
            run_upload(lab, tmp_path, 16 * 1024)
        time.sleep(0.3)
    segments = [s for s in (parse_segment(ts, ip) for ts, ip in read_packets(str(cap))) if s is not None]
    # A busy machine only ever adds to a handshake (in an emulated VM one read 102.5 ms): the best of
    # the connections' handshakes is judged. Each connection's first packet is its SYN.
    handshakes = []
    for port in sorted({s.sport for s in segments if s.dport == 80}):
        syn = next(s for s in segments if s.dport == 80 and s.sport == port)
        answer = next(s for s in segments if s.sport == 80 and s.dport == port)
        handshakes.append((answer.time - syn.time) * 1e3)
    assert len(handshakes) == TRIES and min(handshakes) == pytest.approx(100.0 + own, abs=2.0), (handshakes, own)


def test_the_path_that_delays_is_in_force_and_the_stage_loses_nothing(lab: Lab, tmp_path: Path) -> None:
    st = lab.up(["pbs.twimg.com"], Link(0.05))
    tc = require_tool("tc", "iproute2")
    qdiscs = capture(lab.exec_argv("router", [tc, "qdisc", "show"]), "tc").out
    if st.link.path == PATH_NETEM:  # a stock kernel: netem on both ports, no stage
        assert qdiscs.count("netem") == 2 and st.link.stage is None
        return
    assert st.link.path == PATH_STAGE and "netem" not in qdiscs
    run_upload(lab, tmp_path, 1 << 20)
    time.sleep(1.2)  # the stage writes its counts once a second
    counts = lab.status().link.counts or {}
    assert counts.get("delayed", 0) > 700 and counts.get("queue_dropped") == 0 and counts.get("holding") == 0


def test_jitter_spreads_round_trips_and_keeps_order(lab: Lab, tmp_path: Path) -> None:
    lab.up(["pbs.twimg.com"], Link(0.1))
    # A round's first ping may wait for the neighbour to be resolved after the link changed (a CI
    # run: 147 ms, then 100.0 ms nineteen times): it is left out, and spreads are the middle 80%.
    steady = sorted(pings(lab, 21, 0.05)[1:])
    st = lab.up(["pbs.twimg.com"], Link(0.1, 0.02))
    jittery = sorted(pings(lab, 21, 0.05)[1:])

    def spread(times: list[float]) -> float:
        return times[-3] - times[2]

    assert spread(jittery) > 3 * spread(steady) and spread(jittery) > 5
    assert 80 < min(jittery) and max(jittery) < 121  # each way 50 +- 10 ms: 100 +- 20 ms, +1 for the lab
    # Order is judged against the client's own capture, not by sequence numbers: on a busy machine
    # a retransmission (a CI run) or a sequence number that wraps would look like reordering.
    caps = {role: tmp_path / f"{role}.pcap" for role in ("client", "server")}
    with Capture(lab, "client", CLIENT_IF, caps["client"]) as sent, Capture(lab, "server", SERVER_IF, caps["server"]):
        time.sleep(0.2)
        run_upload(lab, tmp_path, 2 << 20)
        time.sleep(0.3)
    order = {role: data_keys(path) for role, path in caps.items()}
    assert len(order["server"]) > 1000
    if st.link.path == PATH_NETEM:
        return  # netem draws each packet's jitter on its own and reorders them (the README says so)
    place = {key: i for i, key in enumerate(order["client"])}
    seen = [place[key] for key in order["server"] if key in place]
    assert len(seen) > 0.95 * len(order["server"]) or sent.kernel_drops > 0
    assert all(b > a for a, b in zip(seen, seen[1:]))  # in order: no packet overtook another


def data_keys(path: Path) -> list[tuple[int, int, int]]:
    """The upload's data packets in the order captured, each as (sequence number, length, how many
    times that segment was seen before): a retransmission is a packet of its own."""
    times: dict[tuple[int, int], int] = {}
    keys = []
    for ts, ip in read_packets(str(path)):
        s = parse_segment(ts, ip)
        if s is None or s.dport != 80 or s.length == 0:
            continue
        n = times.get((s.seq, s.length), 0)
        times[(s.seq, s.length)] = n + 1
        keys.append((s.seq, s.length, n))
    return keys


def test_bottleneck_holds_a_transfer_near_its_rate_and_congests(lab: Lab, tmp_path: Path) -> None:
    st = lab.up(["pbs.twimg.com"], Link(0.02, 0.0, 5e6 / 8))
    assert st.link.link.bottleneck == 5e6 / 8
    speed = run_upload(lab, tmp_path, 2 << 20) * 8
    # Near its rate, unless this machine cannot carry the rate at all (an emulated VM's lab ran the
    # same upload at 3.7 Mbit/s): then near what the lab carries without the bottleneck.
    capacity = 5e6 if speed > 0.75 * 5e6 else unlimited_speed(lab, tmp_path)
    assert 0.75 * min(5e6, capacity) < speed < 1.02 * 5e6, (speed, capacity)
    lab.up(["pbs.twimg.com"], Link(0.02, 0.0, 5e6 / 8))
    with upload(lab, tmp_path, 2 << 20) as first, upload(lab, tmp_path, 2 << 20) as second:
        assert first.wait(pace.seconds(60)) == 0 and second.wait(pace.seconds(60)) == 0
    tc = require_tool("tc", "iproute2")
    shown = capture(lab.exec_argv("router", [tc, "-s", "qdisc", "show", "dev", ROUTER_PORTS[0]]), "tc").out
    dropped = int(re.search(r"dropped (\d+)", shown).group(1))  # type: ignore[union-attr]
    assert dropped > 0, shown  # congestion loss no censor caused


def test_up_without_a_link_takes_it_off(lab: Lab) -> None:
    st = lab.up(["pbs.twimg.com"], Link())
    assert st.link.link == Link() and st.link.path == "" and st.link.stage is None
    assert statistics.median(pings(lab, 5, 0.05)) < 5
    kept = lab.up(["pbs.twimg.com"], Link(0.03))
    assert lab.up().link.link == kept.link.link == Link(0.03)  # up() keeps the link it has
