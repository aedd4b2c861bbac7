"""The rule action "loss": each packet of a matched flow's limited directions dropped at random with
the rule's probability, the rest passed at once. The engine's draws come from a seeded
`random.Random`, so these counts are exact for a seed; the bounds are those any seed must meet."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

from throttle.engine import UPLOAD, Engine, Event, FlowDecided, RandomLoss, State, Verdict
from throttle.errors import ScenarioError
from throttle.scenario import Probe, parse_scenario

from .packets import Conversation, python_hello

PACKETS = 10_000


def lossy(probability: float = 0.02, extra: str = "") -> str:
    return f'[[rule]]\nname = "lossy"\nmatch = ["*.twimg.com"]\naction = "loss"\nprobability = {probability}\n{extra}'


def matched(text: str, seed: int = 1, name: str = "pbs.twimg.com",
            observer: Callable[[Event], None] | None = None) -> tuple[Engine, Conversation, list[FlowDecided]]:
    """An engine with the scenario `text`, a flow to `name` decided by its hello (its events also
    given to `observer`)."""
    s = parse_scenario(text)
    e = Engine(s.model, s.rules, random.Random(seed))
    conv = Conversation()
    for p in conv.handshake() + [conv.client(python_hello(name))]:
        e.process(p, 1.0)
    events = e.drain_events()
    for ev in events if observer is not None else ():
        observer(ev)
    return e, conv, [ev for ev in events if isinstance(ev, FlowDecided)]


def drops(e: Engine, packet: bytes, n: int = PACKETS) -> int:
    """How many of `n` copies of `packet` the engine drops; any other verdict is a pass."""
    verdicts = [e.process(packet, 2.0 + i * 1e-4)[0] for i in range(n)]
    assert Verdict.HOLD not in verdicts  # never held: loss has no queue
    return verdicts.count(Verdict.DROP)


def within_binomial(k: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_drop_fraction_over_10000_packets_is_within_binomial_bounds(seed: int) -> None:
    e, conv, (decided,) = matched(lossy(0.02), seed)
    flow = decided.flow
    assert flow.state == State.LIMITED and flow.rule is not None and flow.rule.action == "loss"
    before = flow.sides[UPLOAD].dropped_packets
    dropped = drops(e, conv.client(b"x" * 1400))
    assert within_binomial(dropped, PACKETS, 0.02), dropped
    assert flow.sides[UPLOAD].dropped_packets - before == dropped  # counted where a policer's drops are
    assert flow.sides[UPLOAD].dropped_bytes >= dropped * 1400


def test_a_seed_repeats_its_drops_and_another_seed_does_not() -> None:
    def pattern(seed: int) -> list[Verdict]:
        e, conv, _ = matched(lossy(0.1), seed)
        packet = conv.client(b"x" * 100)
        return [e.process(packet, 2.0)[0] for _ in range(500)]

    assert pattern(7) == pattern(7)
    assert pattern(7) != pattern(8)


def test_probability_one_drops_every_packet_of_the_matched_flow() -> None:
    e, conv, _ = matched(lossy(1))
    assert drops(e, conv.client(b"x" * 1400), 1000) == 1000
    assert drops(e, conv.server(b"y" * 1400), 1000) == 1000  # direction "both" by default


def test_only_the_rules_directions_and_only_after_after_bytes_lose_packets() -> None:
    e, conv, (decided,) = matched(lossy(1, 'direction = "download"\nafter_bytes = "10KB"\n'))
    assert drops(e, conv.client(b"x" * 1400), 200) == 0  # uploads pass
    # The first 10 KB of download payload pass free, then every packet is dropped.
    verdicts = [e.process(conv.server(b"y" * 1024), 2.0)[0] for _ in range(20)]
    assert verdicts == [Verdict.ACCEPT] * 10 + [Verdict.DROP] * 10
    up, down = decided.limits
    assert up is None and down is not None and down.after_bytes == 10240


def test_an_unmatched_flow_loses_nothing() -> None:
    e, conv, (decided,) = matched("[model]\ninspect_after_name = false\n" + lossy(1), name="example.org")
    assert decided.flow.state == State.PASSED
    assert drops(e, conv.client(b"x" * 1400), 100) == 0


def test_a_loss_rule_matches_by_address_as_any_rule_does() -> None:
    text = '[[rule]]\nname = "lossy"\naddresses = ["198.18.2.0/24"]\naction = "loss"\nprobability = 1.0\n'
    e, conv, (decided,) = matched(text, name="anything.example")
    assert decided.flow.name_source == "address"
    assert drops(e, conv.client(b"x" * 100), 50) == 50


def test_the_decision_hands_the_kernel_the_probability_and_no_rate() -> None:
    _, _, (decided,) = matched(lossy(0.02, 'direction = "upload"\n'))
    up, down = decided.limits
    assert down is None and up is not None
    assert (up.meter, up.probability, up.rate, up.burst) == ("loss", 0.02, 0.0, 0.0)
    assert isinstance(up.bucket, RandomLoss)


def test_the_rule_loads_with_its_probability_and_no_rate() -> None:
    (rule,) = parse_scenario(lossy(0.015)).rules
    assert (rule.action, rule.probability, rule.rate, rule.burst) == ("loss", 0.015, 0.0, 0)
    assert parse_scenario(lossy(1)).rules[0].probability == 1.0
    assert parse_scenario('[[rule]]\nmatch = ["x"]\nrate = "1mbit"\n').rules[0].probability == 0.0


@pytest.mark.parametrize("text,message", [
    ('[[rule]]\nmatch = ["x"]\naction = "loss"\n',
     'x.toml: rule[1].probability: is missing; action = "loss" drops each packet with this chance: write e.g. '
     'probability = 0.02 (2%)'),
    (lossy(0), "rule[1].probability: 0 is not a fraction above 0 and at most 1; write e.g. probability = 0.02"),
    (lossy(1.5), "rule[1].probability: 1.5 is not a fraction above 0 and at most 1"),
    (lossy(-0.1), "rule[1].probability: -0.1 is not a fraction"),
    (lossy('"2%"'), "rule[1].probability: '2%' is not a fraction above 0 and at most 1"),
    (lossy("true"), "rule[1].probability: True is not a fraction"),
    (lossy("nan"), "rule[1].probability: nan is not a fraction"),
    ('[[rule]]\nmatch = ["x"]\nrate = "1mbit"\nprobability = 0.02\n',
     'rule[1].probability: is the chance action = "loss" drops each packet; with action = "police" remove it'),
    (lossy(0.02, 'rate = "1mbit"\n'),
     'rule[1].rate: has no meaning for action = "loss" (each packet is dropped at random, at no rate); remove it'),
    (lossy(0.02, 'burst = "16KB"\n'), 'rule[1].burst: has no meaning for action = "loss"'),
    (lossy(0.02, 'queue_delay = "1s"\n'), 'rule[1].queue_delay: has no meaning for action = "loss"'),
    (lossy(0.02, 'scope = "client"\n'), 'rule[1].scope: has no meaning for action = "loss"'),
    (lossy(0.02, 'meter = "window"\n'), "rule[1].meter: \"window\" is a policer's meter"),
])
def test_a_bad_loss_rule_names_the_file_the_key_and_the_fix(text: str, message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "x.toml")
    assert message in str(info.value)


def test_engine_draws_are_its_own() -> None:
    """The engine's default source is seeded: two engines without one drop alike."""
    s = parse_scenario(lossy(0.3))
    runs = []
    for _ in range(2):
        e = Engine(s.model, s.rules)
        conv = Conversation()
        for p in conv.handshake() + [conv.client(python_hello("pbs.twimg.com"))]:
            e.process(p, 1.0)
        packet = conv.server(b"y" * 500)
        runs.append([e.process(packet, 2.0)[0] for _ in range(200)])
    assert runs[0] == runs[1] and Verdict.DROP in runs[0] and Verdict.ACCEPT in runs[0]


# -- the kernel's part, without root: the hand-over and the map value ----------------------------------


def test_a_decided_loss_flow_goes_to_the_kernel_with_its_probability_and_no_bucket() -> None:
    import asyncio

    from throttle.censor import Censor
    from throttle.kernel.handover import Handover

    from .test_handover import INSIDE, FakeFastPath, open_flow

    fast = FakeFastPath(held=True)

    async def main() -> None:
        censor = Censor(parse_scenario(lossy(0.02, 'direction = "upload"\nafter_bytes = "1KB"\n')),
                        inside_if="inside", outside_if="outside", inside_ifindex=INSIDE)
        censor.hook._loop = loop = asyncio.get_running_loop()
        handover = censor.handover = Handover(fast, "inside", "outside", loop)  # type: ignore[arg-type]
        open_flow(censor, "pbs.twimg.com")
        await fast.settle()
        assert handover.limited == 1 and len(fast.map) == 2
        assert fast.buckets == {} and fast.windows == {}  # random loss holds no slot
        limits = sorted((limit for _, limit in fast.map.values()), key=lambda lim: lim is None)
        up, down = limits
        assert down is None  # the rule limits uploads only: the download is forwarded
        assert up is not None and (up.bucket, up.priority, up.loss, up.after_bytes) == (0, 0, 0.02, 1024)
        assert up.carried > 0  # the hello's payload, counted toward after_bytes

    asyncio.run(main())
    fast.close()


def test_the_map_value_carries_the_probability_as_a_threshold_on_a_32_bit_draw() -> None:
    from throttle.errors import ThrottleError
    from throttle.kernel.maps import LOSS_SCALE, NO_MAC, VALUE, Limit, flow_value, loss_threshold

    assert loss_threshold(0.02) == round(0.02 * 2**32) and loss_threshold(1.0) == LOSS_SCALE == 2**32
    assert loss_threshold(0.0) == 0 and loss_threshold(1e-12) == 1  # a rule that loses never rounds to none
    with pytest.raises(ThrottleError):
        loss_threshold(1.5)
    value = VALUE.unpack(flow_value(3, NO_MAC, NO_MAC, 5, Limit(0, loss=0.25)))
    assert (value["loss"], value["bucket"], value["priority"]) == (2**30, 0, 0)
    assert VALUE.unpack(flow_value(3, NO_MAC, NO_MAC, 5, Limit(4)))["loss"] == 0


# -- what a probe under loss is held to, and what the exporter shows ----------------------------------

PROBES = '''
[[probe]]
name = "lossy-upload"
host = "pbs.twimg.com"
size = "1MB"
expect = "normal"

[[probe]]
name = "lossy-download"
host = "pbs.twimg.com"
direction = "download"
size = "1MB"

[[probe]]
name = "control"
host = "example.org"
expect = "normal"
control = true
'''


def test_a_probe_under_loss_has_no_predicted_speed_and_is_judged_normal_when_fast() -> None:
    from throttle.measure.judge import Figures, judge, reference_rate
    from throttle.measure.predict import expected, predict_goodput
    from throttle.measure.report import ProbeRun

    s = parse_scenario(lossy(0.02, 'direction = "upload"\n') + PROBES)
    (rule,) = s.rules
    upload, download, control = s.probes
    assert predict_goodput(rule, "upload", 1 << 20) is None and predict_goodput(rule, "upload") is None
    lost = expected(s, upload)
    assert (lost.kind, lost.rate, lost.rule) == ("loss", None, "lossy") and "at random" in lost.why
    assert expected(s, download).kind == "unslowed"  # the rule loses uploads only
    assert expected(s, control).kind == "unmatched"
    assert reference_rate(s) == 0.0  # no rule has a rate
    run = ProbeRun(upload)
    run.bytes, run.seconds, run.completed, run.cause = 1 << 20, 0.1, True, "completed"  # 84 Mbit/s
    judgement = judge(run, upload, Figures(reference_rate(s), 1e8, expected=lost))
    assert (judgement.verdict, judgement.failures) == ("normal", ())
    # Expected throttled and slowed under loss: nothing predicts the speed, so the probe must give one.
    slow = Probe(name="slow", host="pbs.twimg.com", size=1 << 20)
    run = ProbeRun(slow)
    run.bytes, run.seconds, run.completed, run.cause = 1 << 20, 100.0, True, "completed"
    judgement = judge(run, slow, Figures(16250.0, 1e8, expected=expected(s, slow)))
    assert judgement.verdict == "throttled" and len(judgement.failures) == 1
    assert "nothing predicts that" in judgement.failures[0]


def test_the_exporter_shows_a_loss_rules_probability_and_its_drops() -> None:
    from throttle.kernel.maps import Counters, map_key
    from throttle.measure.exporter import Metrics

    from .test_metrics import sample

    m = Metrics()
    e, _, (decided,) = matched(lossy(0.02) + '[[rule]]\nname = "police"\nmatch = ["*.example"]\nrate = "130kbit"\n',
                               observer=m.on_event)
    m.tick(e, held=0, fast=None, now=1.0)
    for direction in ("upload", "download"):
        assert sample(m, "throttle_rule_loss_probability", rule="lossy", direction=direction) == 0.02
        assert m.registry.get_sample_value("throttle_rule_rate_bytes_per_second",
                                           {"rule": "lossy", "direction": direction, "action": "loss"}) is None
    assert sample(m, "throttle_rule_rate_bytes_per_second", rule="police", direction="upload", action="police") \
        == 16250.0
    # Drops in the kernel are counted as a policer's: verdict dropped, stage kernel, under the rule.
    flow = decided.flow
    key = map_key(6, flow.client, flow.client_port, flow.server, flow.server_port)
    m.fast_flow_added(key, "upload", "lossy", flow.name)
    m.tick(e, held=0, fast={key: Counters(98 * 1500, 98, 2 * 1500, 2, 0)}, now=2.0)
    labels = {"rule": "lossy", "server_name": "pbs.twimg.com", "direction": "upload", "stage": "kernel"}
    assert sample(m, "throttle_packets_total", **labels, verdict="dropped") == 2
    assert sample(m, "throttle_packets_total", **labels, verdict="passed") == 98


def test_scenarios_show_describes_a_loss_rule(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from throttle.cli.app import app

    path = tmp_path / "lossy.toml"
    path.write_text(lossy(0.02, 'direction = "upload"\n'))
    result = CliRunner().invoke(app, ["scenarios", "show", str(path)])
    assert result.exit_code == 0, result.output
    assert "lossy: *.twimg.com -> lose 0.02 of packets at random, upload" in result.output
