"""The exporter's bookkeeping with engine events and literal times (no server, no kernel)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest

from throttle.engine import Engine
from throttle.kernel.fastpath import Counters
from throttle.measure.exporter import MAX_NAMES, Metrics
from throttle.scenario import load_scenario

from .packets import Conversation, python_hello

ROOT = Path(__file__).resolve().parent.parent


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
    labels = {"rule": "twitter", "name": "pbs.twimg.com", "direction": "upload"}
    assert sample(m, "throttle_packets_total", verdict="dropped", **labels) > 0
    assert sample(m, "throttle_packets_total", verdict="inspected", **labels) >= 2
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
    assert sample(m, "throttle_bytes_total", rule="none", name="other", direction="upload", verdict="bypassed") == 5e7
    assert sample(m, "throttle_achieved_bytes_per_second", rule="none", name="other", direction="upload") == 5e7
    assert sample(m, "throttle_queue_length") == 0


def test_kernel_limited_flows_count_passed_and_dropped_under_their_rule() -> None:
    """A flow the kernel polices: its counters arrive as passed and dropped under its rule and name."""
    s = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
    e, m = Engine(s.model, s.rules), Metrics()
    m.fast_flow_added(b"k-up", "upload", "twitter", "pbs.twimg.com")
    m.tick(e, held=0, fast={b"k-up": Counters(0, 0, 0, 0, 0)}, now=0.0)
    m.tick(e, held=0, fast={b"k-up": Counters(16_250, 11, 30_000, 20, 0)}, now=1.0)
    labels = {"rule": "twitter", "name": "pbs.twimg.com", "direction": "upload"}
    assert sample(m, "throttle_bytes_total", verdict="passed", **labels) == 16_250
    assert sample(m, "throttle_packets_total", verdict="dropped", **labels) == 20
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
