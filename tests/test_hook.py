"""The NFQUEUE adapter with fake packets: verdict plumbing, holds as loop timers, no kernel."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import ROOT
from throttle.engine import Engine
from throttle.errors import ThrottleError
from throttle.kernel.firewall import MARK_MASK, Firewall, fresh_mark
from throttle.kernel.nfqueue import Hook, check_requirements
from throttle.scenario import Scenario, load_scenario, parse_scenario

from .packets import Conversation, python_hello


class FakePacket:
    """What netfilterqueue hands the callback, reduced to what the hook uses."""

    def __init__(self, payload: bytes, indev: int = 1) -> None:
        self.payload = payload
        self.indev = indev
        self.physindev = 0
        self.mark = 0
        self.verdict: str | None = None
        self.verdict_at: float | None = None
        self.retained = False

    def get_payload(self) -> bytes:
        return self.payload

    def get_mark(self) -> int:
        return self.mark

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def retain(self) -> None:
        self.retained = True

    def _set(self, verdict: str) -> None:
        assert self.verdict is None, "a packet got two verdicts"
        self.verdict = verdict
        self.verdict_at = asyncio.get_running_loop().time()

    def accept(self) -> None:
        self._set("accept")

    def drop(self) -> None:
        self._set("drop")

    def repeat(self) -> None:
        self._set("repeat")


MARK = 0x40000000  # a censor's decided mark (fresh_mark gives one in MARK_MASK)


def make_hook(scenario: Scenario, **kwargs: Any) -> Hook:
    """The adapter around a fresh engine for `scenario`, as the censor composes it."""
    kwargs.setdefault("decided_mark", MARK)
    return Hook(Engine(scenario.model, scenario.rules), **kwargs)


def feed(hook: Hook, payloads: list[bytes], indev: int = 1) -> list[FakePacket]:
    packets = [FakePacket(p, indev) for p in payloads]
    for p in packets:
        hook.on_packet(p)
    hook.after_batch()
    return packets


async def _with_loop(hook: Hook) -> None:
    hook._loop = asyncio.get_running_loop()


def test_verdicts_reach_the_packets() -> None:
    async def main() -> None:
        hook = make_hook(load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml"), inside_ifindex=1)
        await _with_loop(hook)
        conv = Conversation()
        feed(hook, conv.handshake() + [conv.client(python_hello("pbs.twimg.com"))])
        packets = feed(hook, [conv.client(b"x" * 1400) for _ in range(30)])
        assert {p.verdict for p in packets} == {"accept", "drop"}
        assert hook.stats.dropped == sum(p.verdict == "drop" for p in packets)
        assert hook.stats.flows_limited == 1
        # An unmatched flow is decided after its window and handed to the kernel: mark + repeat.
        other = Conversation(client_port=41000)
        feed(hook, other.handshake() + [other.client(b"\xaa" * 200)])
        (p,) = feed(hook, [other.client(b"y" * 100)])
        assert p.verdict == "repeat" and p.mark & MARK_MASK == MARK

    asyncio.run(main())


def test_no_bypass_keeps_flows_in_python() -> None:
    async def main() -> None:
        hook = make_hook(load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml"), bypass=False)
        await _with_loop(hook)
        conv = Conversation()
        packets = feed(hook, conv.handshake() + [conv.client(b"\xaa" * 200), conv.client(b"z")])
        assert {p.verdict for p in packets} == {"accept"} and not any(p.mark for p in packets)

    asyncio.run(main())


def test_holds_are_loop_timers_released_in_order() -> None:
    text = '[[rule]]\nname = "s"\nmatch = ["*"]\naction = "shape"\nrate = "80kbit"\nburst = "600"\nqueue_delay = "5s"\n'

    async def main() -> None:
        hook = make_hook(parse_scenario(text))
        await _with_loop(hook)
        conv = Conversation()
        feed(hook, conv.handshake() + [conv.client(python_hello("a.example"))])  # within the 600 B burst
        start = asyncio.get_running_loop().time()
        packets = feed(hook, [conv.client(b"x" * 960) for _ in range(3)])  # 1,000 B at 10 kB/s: 0.1 s each
        assert all(p.verdict is None and p.retained for p in packets)
        assert hook.stats.holding == 3
        await asyncio.sleep(0.45)
        assert [p.verdict for p in packets] == ["accept"] * 3
        waits = [p.verdict_at - start for p in packets]
        assert waits == sorted(waits) and waits[0] >= 0.09
        assert hook.stats.holding == 0

    asyncio.run(main())


def test_an_engine_bug_costs_a_verdict_not_a_packet(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        hook = make_hook(load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml"))
        await _with_loop(hook)
        monkeypatch.setattr(hook.engine, "process", lambda *a: 1 / 0)
        (p,) = feed(hook, [b"\x45" + bytes(39)])
        assert p.verdict == "accept" and hook.stats.errors == 1

    asyncio.run(main())


def test_requirements_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(ThrottleError, match="needs root"):
        check_requirements()


def test_firewall_rules_are_fail_open_and_skip_decided_flows() -> None:
    rules = [" ".join(r) for r in Firewall(queue=3, mark=MARK).rules()]
    assert rules[0] == "-p tcp --syn -j CONNMARK --set-xmark 0x0/0x7f800000"  # new connections: undecided
    # Packets the engine passed and handed over (REPEAT with the mark) come back first: they are
    # counted by the engine, never by the conntrack-mark rules' counters.
    assert rules[1].startswith("-m mark --mark 0x40000000/0x7f800000 -j CONNMARK --save-mark")
    assert rules[2] == "-m mark --mark 0x40000000/0x7f800000 -j RETURN"
    # Decided flows: one rule per conntrack direction, so that their counters count each (stage connmark).
    assert rules[3] == "-m connmark --mark 0x40000000/0x7f800000 -m conntrack --ctdir ORIGINAL -j RETURN"
    assert rules[4] == "-m connmark --mark 0x40000000/0x7f800000 -j RETURN"
    assert all("--queue-bypass" in r and "--queue-num 3" in r for r in rules if "NFQUEUE" in r)
    assert Firewall(queue=3).chain == "THROTTLE_Q3"


def test_each_censor_has_its_own_mark_so_an_earlier_ones_decisions_do_not_hold() -> None:
    """Conntrack entries outlive a censor: a UDP flow an earlier censor passed keeps its mark for
    minutes. Censors started one after the other have different marks, all inside the mask."""
    marks = [fresh_mark(1_000_000.0 + s) for s in range(255)]
    assert len(set(marks)) == 255 and all(m and m & MARK_MASK == m for m in marks)
    assert fresh_mark(1_000_000.0) == fresh_mark(1_000_255.0)  # the cycle: 255 s
    assert Firewall(queue=3).mark & MARK_MASK == Firewall(queue=3).mark != 0


def test_connmark_counters_are_read_per_direction_from_both_families(monkeypatch: pytest.MonkeyPatch) -> None:
    """`iptables -S CHAIN -v` lists each rule with `-c PACKETS BYTES`: the two conntrack-mark
    rules' counters, IPv4 and IPv6 added, by direction; other rules and chains are not counted."""
    from throttle.children import Captured
    from throttle.kernel import firewall

    fw = Firewall(queue=3, mark=MARK)
    up, down = (" ".join(r) for r in fw.connmark_rules())

    def listing(counts: tuple[int, int, int, int]) -> str:
        return "\n".join([
            "-N THROTTLE_Q3",
            "-A THROTTLE_Q3 -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -c 9 540 -j CONNMARK --set-xmark 0x0/0x7f800000",
            "-A THROTTLE_Q3 " + up.replace(" -j RETURN", f" -c {counts[0]} {counts[1]} -j RETURN"),
            "-A THROTTLE_Q3 " + down.replace(" -j RETURN", f" -c {counts[2]} {counts[3]} -j RETURN"),
            "-A THROTTLE_Q3 -p udp -c 77 7700 -j NFQUEUE --queue-num 3 --queue-bypass",
        ])

    outputs = {"iptables": listing((10, 15000, 4, 240)), "ip6tables": listing((1, 1500, 2, 160))}
    monkeypatch.setattr(firewall, "find_tool", lambda name: name)
    monkeypatch.setattr(firewall, "capture", lambda argv, what: Captured(0, outputs[argv[0]], ""))
    assert firewall.connmark_counters(fw) == {"upload": (11, 16500), "download": (6, 400)}


def test_packets_handed_over_during_bind_get_verdicts_and_do_not_stop_the_censor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rules go in before the queue is bound, so on a busy link bind() itself may deliver
    queued packets; a CI run's censor died of the per-wakeup budget's exception raised out of it."""
    import socket

    import throttle.kernel.nfqueue as nfqueue

    conv = Conversation()
    early = [FakePacket(p) for p in conv.handshake()]
    spare = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    class FakeQueue:
        def bind(self, queue: int, callback: Any, **options: Any) -> None:
            for p in early:
                callback(p)

        def get_fd(self) -> int:
            return spare.fileno()

        def unbind(self) -> None:
            pass

    monkeypatch.setattr(nfqueue, "check_requirements", lambda: type("M", (), {"NetfilterQueue": FakeQueue}))

    async def main() -> None:
        hook = make_hook(load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml"))
        await _with_loop(hook)
        with hook.bound(7):
            pass

    try:
        asyncio.run(main())
    finally:
        spare.close()
    assert all(p.verdict == "accept" for p in early)
