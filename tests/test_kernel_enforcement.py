"""What moves enforcement into the kernel, tested without root: a lost first segment does not
free a flow, the engine hands out the bucket a limited direction uses, bucket slots are shared and
freed, the queue's fail-open request and loss counters are what the kernel expects."""

from __future__ import annotations

import struct
from pathlib import Path

from tests.conftest import ROOT
from throttle.engine import DOWNLOAD, UPLOAD, Engine, FlowDecided, Policer, Shaper, State, WindowMeter
from throttle.kernel.handover import BucketSlots
from throttle.kernel.maps import BUCKET, VALUE
from throttle.kernel.nfqueue import queue_losses
from throttle.scenario import load_scenario, parse_scenario

from .packets import Conversation, python_hello

DAY_ONE = ROOT / "scenarios/twitter-2021-03-10.toml"


def day_one() -> Engine:
    s = load_scenario(DAY_ONE)
    return Engine(s.model, s.rules)


def test_a_lost_client_hello_does_not_let_the_flow_go_free() -> None:
    """The hello never reached the censor; the next data segment starts after a hole. The 2021
    model waits for the segment at ISN+1 (the retransmitted hello) instead of giving up."""
    e = day_one()
    conv = Conversation()
    for p in conv.handshake():
        e.process(p, 0.0)
    hello = python_hello("pbs.twimg.com")
    lost = conv.client(hello)  # sent, but lost before the censor
    after = conv.client(b"\xaa" * 1400)  # 1,400 unparseable bytes: §5 would give up on them
    e.process(after, 0.1)
    (flow,) = e.flows()
    assert flow.state == State.INSPECTING and e.holes == 1
    e.process(lost, 0.3)  # the retransmission, at ISN+1
    assert flow.state == State.LIMITED and flow.name == "pbs.twimg.com"


def test_without_the_syn_the_first_data_segment_is_still_the_first_packet() -> None:
    e = day_one()
    conv = Conversation()
    conv.handshake()  # not seen: a flow picked up mid-stream
    e.process(conv.client(b"\xaa" * 1400), 0.0)
    (flow,) = e.flows()
    assert flow.state == State.PASSED and e.holes == 0  # §5: unparseable, >= 101 bytes: given up


def test_data_in_a_syn_is_read_as_the_first_segment() -> None:
    """TCP Fast Open: the hello rides in the SYN, at ISN+1."""
    e = day_one()
    conv = Conversation()
    e.process(conv.client(python_hello("pbs.twimg.com"), flags="S"), 0.0)
    (flow,) = e.flows()
    assert flow.state == State.LIMITED


def test_the_engine_hands_out_the_bucket_of_each_limited_direction() -> None:
    text = ('[[rule]]\nname = "up"\nmatch = ["*.twimg.com"]\nrate = "130kbit"\ndirection = "upload"\n'
            'scope = "client"\n')
    s = parse_scenario(text)
    e = Engine(s.model, s.rules)
    flows = []
    for port in (40000, 40001):
        conv = Conversation(client_port=port)
        for p in conv.handshake() + [conv.client(python_hello("pbs.twimg.com"))]:
            e.process(p, 1.0)
        flows.append(next(f for f in e.flows() if f.client_port == port))
    a, b = (e.bucket(f, UPLOAD, 2.0) for f in flows)
    assert isinstance(a, Policer) and a is b  # scope client: one bucket for both flows
    assert e.bucket(flows[0], DOWNLOAD, 2.0) is None  # the rule limits uploads only
    assert a.rate == 16250.0 and a.burst == 16384


def test_the_decision_carries_how_each_direction_is_limited() -> None:
    """FlowDecided says what the kernel needs, so nobody asks the engine again: the meter, rate,
    burst, the live bucket (shared by scope), the shaper's queue bound, after_bytes, and the
    payload carried so far (live: it counts on while the engine still sees the flow)."""
    text = ('[model]\ninspect_after_name = false\n'
            '[[rule]]\nname = "up"\nmatch = ["*.twimg.com"]\nrate = "130kbit"\ndirection = "upload"\n'
            'scope = "client"\nafter_bytes = "1KiB"\n'
            '[[rule]]\nname = "s"\nmatch = ["*.shaped.example"]\naction = "shape"\nrate = "80kbit"\nburst = "4KiB"\n'
            'queue_bytes = "20KiB"\n'
            '[[rule]]\nname = "w"\nmatch = ["*.window.example"]\nrate = "130kbit"\nburst = "16KB"\nmeter = "window"\n')
    s = parse_scenario(text)
    e = Engine(s.model, s.rules)
    decided = {}
    for port, name in ((40000, "pbs.twimg.com"), (40001, "video.twimg.com"), (40002, "a.shaped.example"),
                       (40003, "a.window.example"), (40004, "example.org")):
        conv = Conversation(client_port=port)
        for p in conv.handshake() + [conv.client(python_hello(name))]:
            e.process(p, 1.0)
        for ev in e.drain_events():
            if isinstance(ev, FlowDecided):
                decided[name] = ev
    up, down = decided["pbs.twimg.com"].limits
    assert down is None and up is not None and up.meter == "police" and up.after_bytes == 1024
    assert up.bucket is decided["video.twimg.com"].limits[UPLOAD].bucket is e.bucket(decided["pbs.twimg.com"].flow,
                                                                                      UPLOAD, 1.0)
    assert (up.rate, up.burst, up.queue_bytes) == (16250.0, 16384, 0.0)
    carried = up.carried
    assert carried == decided["pbs.twimg.com"].flow.sides[UPLOAD].payload > 0
    shaped = decided["a.shaped.example"].limits
    assert all(lim is not None and lim.meter == "shape" and isinstance(lim.bucket, Shaper) for lim in shaped)
    assert shaped[UPLOAD].queue_bytes == 20 * 1024 and shaped[UPLOAD].burst == 4096
    window = decided["a.window.example"].limits[UPLOAD]
    # The window meters are handed out too, each begun at its direction's first limited packet: the
    # upload's at the hello that decided the flow, the download's not yet (no download packet).
    assert window is not None and window.meter == "window" and isinstance(window.bucket, WindowMeter)
    assert window.bucket.start == 1.0 and (window.rate, window.burst) == (16250.0, 16384)
    down = decided["a.window.example"].limits[DOWNLOAD]
    assert down is not None and isinstance(down.bucket, WindowMeter) and down.bucket.start is None
    assert decided["example.org"].limits == (None, None)


def test_bucket_slots_are_shared_and_freed() -> None:
    slots = BucketSlots(size=3)  # slots 1 and 2
    shared, other, third = object(), object(), object()
    assert slots.acquire(shared) == (1, True)
    assert slots.acquire(shared) == (1, False)  # a second flow on the shared bucket
    assert slots.acquire(other) == (2, True)
    assert slots.acquire(third) == (None, False)  # full: the engine keeps limiting that one
    slots.release(1)
    assert len(slots) == 2
    slots.release(1)
    assert len(slots) == 1 and slots.acquire(third) == (1, True)


def test_map_values_match_the_c_structs() -> None:
    """Sizes and offsets of throttle.bpf.c's flow_value and bucket (its comments list them)."""
    bpf = ROOT / "throttle/kernel/bpf"
    source = (bpf / "throttle.bpf.c").read_text() + (bpf / "layout.h").read_text()  # the structs: in layout.h
    assert VALUE.size == 88 and BUCKET.size == 72
    for field in ("__u64 payload;", "__u64 after_bytes;", "__u32 bucket;", "__u32 priority;", "__u64 loss;",
                  "__u64 fill_ns;", "__u64 window_ns;"):
        assert field in source


def test_queue_losses_are_read_from_proc(tmp_path: Path) -> None:
    proc = tmp_path / "nfnetlink_queue"
    proc.write_text("    0   1234     5 2 65535    12    30   998877  1\n    3   5678     0 2 65535     0     0    12  1\n")
    assert queue_losses(0, str(proc)) == 42
    assert queue_losses(3, str(proc)) == 0
    assert queue_losses(9, str(proc)) is None
    assert queue_losses(0, str(tmp_path / "missing")) is None


def test_a_full_hold_drops_instead_of_filling_the_queue(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from throttle.kernel import nfqueue

    from .test_hook import feed, make_hook

    text = '[[rule]]\nname = "s"\nmatch = ["*"]\naction = "shape"\nrate = "8kbit"\nburst = "600"\nqueue_delay = "60s"\n'
    monkeypatch.setattr(nfqueue, "HOLD_LIMIT", 3)

    async def main() -> None:
        hook = make_hook(parse_scenario(text))
        hook._loop = asyncio.get_running_loop()
        conv = Conversation()
        feed(hook, conv.handshake() + [conv.client(python_hello("a.example"))])
        packets = feed(hook, [conv.client(b"x" * 960) for _ in range(5)])
        assert [p.verdict for p in packets][-2:] == ["drop", "drop"] and hook.holding == 3
        assert hook.stats.overflow == 2
        hook.release_all()

    asyncio.run(main())
