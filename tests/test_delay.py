"""The lab's link, its pure parts: the delay stage's schedule (release times, order kept, jitter's
spread), the link's values and their checks, the scenario keys, the `lab up` options, the tc
commands for netem and the bottleneck, and what `lab status` says of them."""

from __future__ import annotations

import random

import pytest

from throttle.cli.lab import _link, format_link
from throttle.errors import ScenarioError, ThrottleError
from throttle.lab import delay, network
from throttle.lab.layout import PATH_NETEM, PATH_STAGE, Link, link_problem
from throttle.lab.topology import LabStatus, LinkStatus
from throttle.scenario import parse_scenario

RULE = '[[rule]]\nmatch = ["a.example"]\nrate = "1mbit"\n'


# ---- the schedule ------------------------------------------------------------------------------

def test_each_packet_leaves_one_delay_after_it_came() -> None:
    s: delay.Schedule[str] = delay.Schedule(0.05, 0.0)
    assert s.add(1, 10.0, "a") == pytest.approx(10.05)
    assert s.add(2, 10.001, "b") == pytest.approx(10.051)
    assert s.next_release() == pytest.approx(10.05)
    assert s.due(10.0499) == []
    assert [p for _, p in s.due(10.05)] == ["a"]
    assert len(s) == 1
    assert [p for _, p in s.due(11.0)] == ["b"] and s.next_release() is None


def test_due_packets_of_both_lanes_come_out_in_release_order() -> None:
    s: delay.Schedule[str] = delay.Schedule(0.01, 0.0)
    for lane, t, p in ((1, 0.0, "a1"), (2, 0.001, "b1"), (1, 0.002, "a2"), (2, 0.003, "b2")):
        s.add(lane, t, p)
    assert [p for _, p in s.due(1.0)] == ["a1", "b1", "a2", "b2"]


def test_jitter_spreads_release_times_but_never_reorders_a_lane() -> None:
    rng = random.Random(7)
    s: delay.Schedule[int] = delay.Schedule(0.05, 0.02, rng.random)
    arrivals = [i * 0.0002 for i in range(50000)]  # 5,000 packets/s for 10 s
    releases = [s.add(1, t, i) for i, t in enumerate(arrivals)]
    assert all(b > a for a, b in zip(releases, releases[1:]))  # strictly: the clamp was never needed
    assert [p for _, p in s.due(20.0)] == list(range(50000))
    delays = [r - t for r, t in zip(releases, arrivals)]
    assert min(delays) >= 0.04 - 1e-9 and max(delays) <= 0.06 + 1e-9
    assert min(delays) < 0.042 and max(delays) > 0.058  # the whole spread is used
    assert abs(sum(delays) / len(delays) - 0.05) < 0.002  # and the mean stays the delay


def test_jitter_is_a_path_between_targets_drawn_per_period() -> None:
    draws = iter([0.0, 1.0, 0.5])  # start -10 ms, target +10 ms, then 0
    s: delay.Schedule[str] = delay.Schedule(0.05, 0.02, lambda: next(draws))
    assert s.period == pytest.approx(0.04)
    assert s.add(1, 0.0, "a") == pytest.approx(0.04)
    assert s.add(1, 0.02, "b") == pytest.approx(0.02 + 0.05)  # half way: no offset
    assert s.add(1, 0.04, "c") == pytest.approx(0.04 + 0.06)  # the target; then a new leg toward 0
    assert s.add(1, 0.06, "d") == pytest.approx(0.06 + 0.055)


def test_without_jitter_the_delay_is_exact() -> None:
    s: delay.Schedule[str] = delay.Schedule(0.05, 0.0, lambda: 1 / 0)  # never draws
    assert [s.add(1, t, "x") - t for t in (0.0, 0.3, 7.0)] == [pytest.approx(0.05)] * 3


def test_lanes_wander_on_their_own() -> None:
    draws = iter([0.0, 0.0, 1.0, 1.0])
    s: delay.Schedule[str] = delay.Schedule(0.05, 0.02, lambda: next(draws))
    assert s.add(1, 0.0, "low") == pytest.approx(0.04)
    assert s.add(2, 0.0, "high") == pytest.approx(0.06)


def test_drain_gives_back_everything_held() -> None:
    s: delay.Schedule[str] = delay.Schedule(1.0, 0.0)
    for i, p in enumerate("abc"):
        s.add(i % 2, float(i), p)
    assert sorted(s.drain()) == ["a", "b", "c"] and len(s) == 0 and s.next_release() is None


def test_a_schedule_that_would_send_before_arrival_is_refused() -> None:
    with pytest.raises(ValueError):
        delay.Schedule(0.01, 0.03)


def test_the_stage_queues_everything_forwarded_without_bypass() -> None:
    assert delay.rules(7) == [["-j", "NFQUEUE", "--queue-num", "7"]]  # no --queue-bypass: module docstring


# ---- the link's values -------------------------------------------------------------------------

def test_link_values_and_their_checks() -> None:
    link = Link(0.1, 0.002, 625000.0)
    assert link.one_way == 0.05 and link.delayed
    assert Link.from_json(link.to_json()) == link
    assert Link.from_json(None) == Link() and Link.from_json({"rtt": "x"}) == Link()
    assert link_problem(0.05, 0.0, 0.0) is None
    for values, words in (((0.01, 0.02, 0.0), "jitter"), ((-1.0, 0.0, 0.0), "RTT"), ((11.0, 0.0, 0.0), "RTT"),
                          ((0.0, 0.0, 10.0), "bottleneck")):
        problem = link_problem(*values)
        assert problem is not None and words in problem
        with pytest.raises(ValueError):
            Link(*values)


def test_scenario_keys_set_the_link() -> None:
    scen = parse_scenario('rtt = "100ms"\njitter = "2ms"\nbottleneck = "5mbit"\n' + RULE, "x.toml")
    assert (scen.rtt, scen.jitter, scen.bottleneck) == (pytest.approx(0.1), pytest.approx(0.002), 625000.0)
    assert Link.of(scen) == Link(scen.rtt, scen.jitter, scen.bottleneck)
    plain = parse_scenario(RULE, "x.toml")
    assert (plain.rtt, plain.jitter, plain.bottleneck) == (0.0, 0.0, 0.0) and not Link.of(plain).delayed


@pytest.mark.parametrize("text,key,words", [
    ('rtt = "50"\n', "rtt", "more than 10s"),
    ('rtt = "fast"\n', "rtt", "not a duration"),
    ('rtt = "10ms"\njitter = "20ms"\n', "jitter", "more than the rtt"),
    ('jitter = "2ms"\n', "jitter", "more than the rtt"),
    ('bottleneck = "5MB"\n', "bottleneck", "not a tc(8) rate"),
    ('bottleneck = "1kbit"\n', "bottleneck", "below 8kbit"),
    ('latency = "50ms"\n', "latency", "not a known key"),
])
def test_scenario_link_errors_name_file_key_and_fix(text: str, key: str, words: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text + RULE, "x.toml")
    assert info.value.key == key and words in info.value.reason
    assert str(info.value).startswith(f"x.toml: {key}: ")


def test_lab_up_options_override_the_scenarios_values() -> None:
    scen = parse_scenario('rtt = "100ms"\njitter = "2ms"\n' + RULE, "x.toml")
    assert _link(None, None, None, None) == Link()
    assert _link(None, None, None, scen) == Link(0.1, 0.002, 0.0)
    assert _link("50ms", None, "5mbit", scen) == Link(0.05, 0.002, 625000.0)
    with pytest.raises(ThrottleError, match="--rtt"):
        _link("soon", None, None, None)
    with pytest.raises(ThrottleError, match="jitter"):
        _link("1ms", "5ms", None, None)


# ---- tc ----------------------------------------------------------------------------------------

def test_netem_delays_half_the_rtt_each_way_with_the_bottleneck_as_its_child() -> None:
    cmds = network.link_qdiscs(Link(0.1, 0.004, 625000.0), netem=True)
    assert cmds[0][:7] == ["add", "dev", "{dev}", "root", "handle", "1:", "netem"]
    assert cmds[0][7:10] == ["delay", "50000us", "2000us"]
    assert cmds[1][:6] == ["add", "dev", "{dev}", "parent", "1:1", "handle"] and "tbf" in cmds[1]
    assert network.link_qdiscs(Link(0.1), netem=True) == [cmds[0][:9] + ["limit", "1000000"]]


def test_without_netem_only_the_bottleneck_is_a_qdisc() -> None:
    assert network.link_qdiscs(Link(0.1), netem=False) == []
    assert network.link_qdiscs(Link(), netem=True) == []
    (cmd,) = network.link_qdiscs(Link(0.1, 0.0, 625000.0), netem=False)
    assert cmd[:6] == ["add", "dev", "{dev}", "root", "handle", "1:"] and cmd[6] == "tbf"


def test_the_bottleneck_queues_fifty_milliseconds_at_its_rate() -> None:
    args = network.tbf(625000.0)  # 5 Mbit/s
    assert args[:3] == ["tbf", "rate", "5000000bit"]
    burst, limit = int(args[args.index("burst") + 1]), int(args[args.index("limit") + 1])
    assert burst == 2 * 1514
    assert limit - burst == 31250  # 50 ms at 625,000 bytes/s
    assert int(network.tbf(2.5e6)[4]) == 5000  # 2 ms at 20 Mbit/s, above two frames


# ---- lab status --------------------------------------------------------------------------------

def _status(link: LinkStatus) -> LabStatus:
    return LabStatus(name="t", up=True, roles={}, dns="", dns6="", ca=None, state_dir="", etc="", hostnames=(),
                     labserver=None, dnsmasq=None, in_namespaces={}, link=link)


def test_status_names_the_path_that_delays_and_the_stages_counts() -> None:
    assert "no delay" in format_link(_status(LinkStatus()))[0]
    netem = format_link(_status(LinkStatus(Link(0.1, 0.002), PATH_NETEM)))
    assert netem == ["  link        rtt 100 ms +- 2 ms (50 ms each way, by netem)"]
    counts = {"delayed": 12, "late": 1, "max_late_ms": 1.5, "queue_dropped": 3, "holding": 2, "fifo": True}
    stage = format_link(_status(LinkStatus(Link(0.05, 0.0, 625000.0), PATH_STAGE, (), 42, counts)))
    assert "by throttle delay stage" in stage[0] and "bottleneck 5.0 Mbit/s" in stage[0]
    assert "pid 42:" in stage[1] and "3 dropped with its queue full" in stage[1] and "1 released over 1 ms late" in stage[1]
    gone = format_link(_status(LinkStatus(Link(0.05), PATH_STAGE)))
    assert "not running" in gone[1]
    assert _status(LinkStatus(Link(0.05), PATH_STAGE, (), 42, counts)).to_json()["link"]["path"] == PATH_STAGE
