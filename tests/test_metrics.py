"""The exporter's bookkeeping with engine events and literal times (no server, no kernel)."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from tests.conftest import ROOT
from throttle.engine import Engine
from throttle.kernel.maps import Counters
from throttle.measure.exporter import MAX_NAMES, Metrics
from throttle.scenario import load_scenario

from .packets import Conversation, python_hello, udp


def sample(m: Metrics, metric: str, **labels: str) -> float:
    value = m.registry.get_sample_value(metric, labels)
    return 0.0 if value is None else value


def test_limited_flow_counts_and_speed_window() -> None:
    s = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
    e, m = Engine(s.model, s.rules), Metrics()
    conv = Conversation()
    for p in conv.handshake() + [conv.client(python_hello("pbs.twimg.com"))]:
        e.process(p, 0.0)
    for ev in e.drain_events():
        m.on_event(ev)
    m.tick(e, held=0, fast=None, now=0.0)
    packet = conv.client(b"x" * 1400)
    for i in range(1000):  # 10 s of uploads offered at 100 packets a second, 145 kB/s
        e.process(packet, 0.01 * i)
        for ev in e.drain_events():
            m.on_event(ev)
        if i % 100 == 99:
            m.tick(e, held=0, fast=None, now=0.01 * i)
    labels = {"rule": "twitter", "server_name": "pbs.twimg.com", "direction": "upload"}
    assert sample(m, "throttle_packets_total", stage="enforcement", verdict="dropped", **labels) > 0
    assert sample(m, "throttle_packets_total", stage="inspection", verdict="passed", **labels) >= 2
    speed = sample(m, "throttle_achieved_bytes_per_second", **labels)
    assert 12000 < speed < 22000  # the policer's 16,250 B/s, measured over a 5 s window
    assert sample(m, "throttle_flows_classified_total", name_source="sni", verdict="limited") == 1
    assert sample(m, "throttle_flows_active", state="limited") == 1


def test_fast_path_bytes_become_bypassed_and_unlimited_speed() -> None:
    s = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
    e, m = Engine(s.model, s.rules), Metrics()
    m.fast_flow_added(b"k-up", "upload")
    m.tick(e, held=2, fast={b"k-up": Counters(0, 0, 0, 0, 0)}, now=0.0)
    m.tick(e, held=0, fast={b"k-up": Counters(50_000_000, 34_000, 0, 0, 0)}, now=1.0)
    assert sample(m, "throttle_bytes_total", rule="none", server_name="other", direction="upload", stage="kernel",
                  verdict="passed") == 5e7
    assert sample(m, "throttle_achieved_bytes_per_second", rule="none", server_name="other", direction="upload") == 5e7
    assert sample(m, "throttle_queue_held_packets") == 0


def test_kernel_limited_flows_count_passed_and_dropped_under_their_rule() -> None:
    """A flow the kernel polices: its counters arrive as passed and dropped under its rule and name."""
    s = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
    e, m = Engine(s.model, s.rules), Metrics()
    m.fast_flow_added(b"k-up", "upload", "twitter", "pbs.twimg.com")
    m.tick(e, held=0, fast={b"k-up": Counters(0, 0, 0, 0, 0)}, now=0.0)
    m.tick(e, held=0, fast={b"k-up": Counters(16_250, 11, 30_000, 20, 0)}, now=1.0)
    labels = {"rule": "twitter", "server_name": "pbs.twimg.com", "direction": "upload", "stage": "kernel"}
    assert sample(m, "throttle_bytes_total", verdict="passed", **labels) == 16_250
    assert sample(m, "throttle_packets_total", verdict="dropped", **labels) == 20
    del labels["stage"]
    assert sample(m, "throttle_achieved_bytes_per_second", **labels) == 16_250


def test_name_labels_are_bounded() -> None:
    m = Metrics()
    names = {m._name("twitter", f"n{i}.twimg.com") for i in range(MAX_NAMES + 30)}
    assert len(names) == MAX_NAMES + 1 and "other" in names
    assert m._name("none", "anything") == "other"


def test_page_is_valid_exposition_text() -> None:
    text = generate_latest(Metrics().registry).decode()
    assert "# TYPE throttle_packets_total counter" in text
    assert "# TYPE throttle_queue_delay_seconds histogram" in text


def test_unlimited_flows_are_counted_on_the_connmark_path() -> None:
    """Where the firewall's conntrack-mark rule forwards decided flows, its own counters complete
    the packets and bytes (stage connmark); a counter that went back counts from there."""
    s = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
    e, m = Engine(s.model, s.rules), Metrics()
    m.tick(e, held=0, fast=None, now=0.0, connmark={"upload": (1, 1000), "download": (0, 0)})
    m.tick(e, held=0, fast=None, now=1.0, connmark={"upload": (2001, 3_001_000), "download": (1, 500)})
    m.tick(e, held=0, fast=None, now=2.0, connmark={"upload": (3, 2000), "download": (1, 500)})
    up = {"rule": "none", "server_name": "other", "direction": "upload", "stage": "connmark", "verdict": "passed"}
    assert sample(m, "throttle_bytes_total", **up) == 3_003_000
    assert sample(m, "throttle_packets_total", **up) == 2004
    assert sample(m, "throttle_packets_total", **{**up, "direction": "download"}) == 1


def stage_totals(m: Metrics, metric: str = "throttle_packets_total", **labels: str) -> dict[tuple[str, str], float]:
    """Every sample of `metric` with `labels`, by (stage, verdict)."""
    out: dict[tuple[str, str], float] = {}
    for family in m.registry.collect():
        for smp in family.samples:
            if smp.name == metric and all(smp.labels.get(k) == v for k, v in labels.items()):
                key = (smp.labels["stage"], smp.labels["verdict"])
                out[key] = out.get(key, 0.0) + smp.value
    return out


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_every_packet_the_engine_judged_is_counted_once(batch: int) -> None:
    """A limited TCP flow policed in the engine (drops included) and a passed UDP flow: however the
    events are drained (the hook drains every BATCH packets), each packet is counted once, the
    deciding packet under enforcement, the packets before it under inspection, the passed flow's
    later packets under handover."""
    s = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
    e, m = Engine(s.model, s.rules), Metrics()
    conv = Conversation()
    tcp = conv.handshake() + [conv.client(python_hello("pbs.twimg.com"))] + [conv.client(b"x" * 1400)] * 60 + \
        [conv.server(b"y" * 1000)] * 5
    datagrams = [udp("198.18.0.2", "198.18.2.2", 5000, 9999, b"z" * 1000)] * 100
    packets = [p for pair in zip(tcp, datagrams) for p in pair] + datagrams[len(tcp):]
    for i, p in enumerate(packets):
        e.process(p, 0.001 * i)
        if i % batch == batch - 1:
            for ev in e.drain_events():
                m.on_event(ev)
    for ev in e.drain_events():
        m.on_event(ev)
    m.tick(e, held=0, fast=None, now=1.0)
    twitter = stage_totals(m, rule="twitter")
    assert sum(twitter.values()) == len(tcp)
    assert twitter[("inspection", "passed")] == 3  # SYN, SYN-ACK, ACK; the hello decided it
    assert twitter[("enforcement", "dropped")] > 0
    # Decided at its first datagram (a UDP flow that is not DNS, under a model without QUIC).
    assert stage_totals(m, rule="none", direction="upload") == {("handover", "passed"): 100}
    size = sum(len(p) for p in tcp)
    assert sum(stage_totals(m, "throttle_bytes_total", rule="twitter").values()) == size


def test_a_flow_that_closes_under_inspection_is_counted_by_how_it_ended() -> None:
    """twitter-2021-03-10 reads on after a name that matches nothing and keeps a flow past FIN
    (§7, §14): a short connection to example.org closes while inspected. It is counted as ended
    in state inspecting (reason fin), and its packets under inspection, without waiting for the
    flow's idle timeout."""
    s = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
    e, m = Engine(s.model, s.rules), Metrics()
    conv = Conversation()
    packets = conv.handshake() + [conv.client(python_hello("example.org")), conv.client(b"x" * 2048),
                                  conv.client(flags="FA"), conv.server(flags="FA"), conv.client(flags="A")]
    for i, p in enumerate(packets):
        e.process(p, 0.01 * i)
    for ev in e.drain_events():
        m.on_event(ev)
    m.tick(e, held=0, fast=None, now=1.0)
    assert sample(m, "throttle_flows_ended_total", state="inspecting", reason="fin") == 1
    assert sample(m, "throttle_flows_active", state="inspecting") == 1  # the model keeps it
    assert sum(stage_totals(m, rule="none").values()) == len(packets)
    assert stage_totals(m, rule="none") == {("inspection", "passed"): len(packets)}


def test_configured_rates_build_info_and_process_metrics() -> None:
    s = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
    e, m = Engine(s.model, s.rules), Metrics()
    m.tick(e, held=0, fast=None, now=0.0)
    for direction in ("upload", "download"):  # direction = "both": one limit each way
        assert sample(m, "throttle_rule_rate_bytes_per_second", rule="twitter", direction=direction,
                      action="police") == 16250.0
        assert sample(m, "throttle_rule_burst_bytes", rule="twitter", direction=direction, action="police") == 16384
    text = generate_latest(m.registry).decode()
    assert 'throttle_build_info{python_version="' in text and "} 1.0" in text
    assert "process_cpu_seconds_total" in text and "process_resident_memory_bytes" in text


def test_no_metric_mixes_a_stage_into_its_verdicts() -> None:
    m = Metrics()
    m.hook_error()
    text = generate_latest(m.registry).decode()
    assert 'verdict="inspected"' not in text and 'verdict="bypassed"' not in text
    assert "throttle_queue_length" not in text and 'name="' not in text.replace("server_name", "")


def test_promtool_accepts_the_page() -> None:
    """`promtool check metrics` on a page with every kind of sample (skipped where promtool is not
    installed: scripts/test installs it, with Debian's prometheus package)."""
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; scripts/test does)")
    s = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
    e, m = Engine(s.model, s.rules), Metrics()
    conv = Conversation()
    for i, p in enumerate(conv.handshake() + [conv.client(python_hello("pbs.twimg.com"))] + [conv.client(b"x" * 1400)] * 50):
        e.process(p, 0.01 * i)
    for ev in e.drain_events():
        m.on_event(ev)
    m.tick(e, held=1, fast={b"k": Counters(10, 1, 0, 0, 0)}, now=1.0, connmark={"upload": (1, 5)})
    check = subprocess.run([promtool, "check", "metrics"], input=generate_latest(m.registry).decode(),
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_fast_paths_fallbacks_are_counted_by_reason_once() -> None:
    """The program's running counts become counters that rise by what is new, every reason shown
    from the first read; a count read again (or lower, after a reload) adds nothing."""
    m = Metrics()
    m.kernel_fallbacks({"no_flow": 5, "tcp_syn": 2, "ipv4_fragment": 0})
    m.kernel_fallbacks({"no_flow": 9, "tcp_syn": 2, "ipv4_fragment": 0})
    m.kernel_fallbacks({"no_flow": 9, "tcp_syn": 1, "ipv4_fragment": 0})
    page = generate_latest(m.registry).decode()
    assert 'throttle_fastpath_fallbacks_total{reason="no_flow"} 9.0' in page
    assert 'throttle_fastpath_fallbacks_total{reason="tcp_syn"} 2.0' in page
    assert 'throttle_fastpath_fallbacks_total{reason="ipv4_fragment"} 0.0' in page
