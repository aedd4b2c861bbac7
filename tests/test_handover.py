"""The hand-over of decided flows to the kernel, without root: the censor's composition (hook,
engine, hand-over) over a fake fast path whose netlink worker is a real thread, held until the test
releases it: what must not wait for netlink is checked while netlink cannot have answered, and
nothing depends on how fast a busy machine runs."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from throttle.censor import Censor
from throttle.engine import UPLOAD, WindowMeter
from throttle.errors import ThrottleError
from throttle.kernel.handover import Handover
from throttle.kernel.neighbours import Hops
from throttle.scenario import parse_scenario

from .packets import Conversation, python_hello
from .test_hook import feed

INSIDE, OUTSIDE = 1, 2
MAC = "02:00:00:00:00:0{}"


class FakeIPRoute:
    """What the neighbour lookups ask of pyroute2's IPRoute: every address on-link and resolved."""

    def __init__(self, asked: list[str]) -> None:
        self.asked = asked

    def route(self, *args: Any, **kw: Any) -> list[Any]:
        return []

    def neigh(self, _: str, ifindex: int, dst: str) -> list[dict[str, Any]]:
        self.asked.append(dst)
        return [{"state": 0x02, "lladdr": MAC.format(ifindex + 4), "dst": dst}]

    def get_links(self, index: int) -> list[dict[str, Any]]:
        return [{"address": MAC.format(index)}]


class FakeQdiscs:
    def __init__(self) -> None:
        self.made: list[int] = []
        self.removed: list[int] = []

    def ensure(self, ipr: Any, index: int, minor: int, rate: float, burst: int, limit: int) -> int:
        if minor not in self.made:
            self.made.append(minor)
        return minor

    def remove(self, ipr: Any, index: int, minor: int) -> None:
        self.removed.append(minor)
        self.made.remove(minor)


class FakeFastPath:
    """The parts of FastPath the hand-over uses. With `held`, netlink requests wait until the test
    calls `settle()`."""

    def __init__(self, held: bool = False, bridged: bool = False) -> None:
        self.released = threading.Event()
        if not held:
            self.released.set()
        self.futures: list[Future[Any]] = []
        self.hops = Hops()
        if bridged:
            self.hops.bridged |= {INSIDE, OUTSIDE}
        self.qdiscs = FakeQdiscs()
        self.map: dict[bytes, tuple[Any, Any]] = {}
        self.buckets: dict[int, tuple[float, int, float, float]] = {}
        self.windows: dict[int, tuple[float, int, float | None, int]] = {}
        self.requests = 0
        self.neighbours_asked: list[str] = []
        self._pool = ThreadPoolExecutor(max_workers=1)

    def ifindex(self, name: str) -> int:
        return {"inside": INSIDE, "outside": OUTSIDE}[name]

    def submit(self, fn: Callable[[Any], Any]) -> Future[Any]:
        self.requests += 1

        def held() -> Any:
            if not self.released.wait(60):
                raise RuntimeError("the test never released the netlink worker")
            return fn(FakeIPRoute(self.neighbours_asked))

        future = self._pool.submit(held)
        self.futures.append(future)
        return future

    async def settle(self) -> None:
        """Release the worker; return once every request (those its answers led to included) is
        answered and the answers handled by the event loop."""
        self.released.set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            seen = len(self.futures)
            if all(f.done() for f in self.futures):
                for _ in range(3):  # the answers reach the loop through call_soon_threadsafe
                    await asyncio.sleep(0.01)
                if len(self.futures) == seen and all(f.done() for f in self.futures):
                    return
            await asyncio.sleep(0.01)
        raise AssertionError("the fake netlink worker did not finish within 60 s")

    def put_flow(self, up: bytes, down: bytes, hops: Any, upload: Any = None, download: Any = None) -> bool:
        self.map[up], self.map[down] = (hops[0], upload), (hops[1], download)
        return True

    def delete(self, key: bytes) -> None:
        self.map.pop(key, None)

    def set_bucket(self, index: int, rate: float, burst: int, tokens: float, stamp: float) -> bool:
        self.buckets[index] = (rate, burst, tokens, stamp)
        return True

    def set_window(self, index: int, rate: float, burst: int, start: float | None = None, used: int = 0) -> bool:
        self.windows[index] = (rate, burst, start, used)
        return True

    def close(self) -> None:
        self._pool.shutdown()


SCENARIO = ('[model]\nfin_rst_ends_flow = true\ninspect_after_name = false\n'
            '[[rule]]\nname = "police"\nmatch = ["*.twimg.com"]\nrate = "130kbit"\nscope = "client"\n'
            '[[rule]]\nname = "shape"\nmatch = ["*.shaped.example"]\naction = "shape"\nrate = "1mbit"\n'
            'burst = "16KiB"\ndirection = "upload"\n')


def censor_over(fast: FakeFastPath, shaping: bool = True) -> Censor:
    """The censor's composition, its hand-over over `fast` (made in the running loop)."""
    censor = Censor(parse_scenario(SCENARIO), inside_if="inside", outside_if="outside", inside_ifindex=INSIDE)
    censor.hook._loop = loop = asyncio.get_running_loop()
    censor.handover = Handover(fast, "inside", "outside", loop, shaping=shaping)  # type: ignore[arg-type]
    return censor


def open_flow(censor: Censor, name: str, **kw: Any) -> Conversation:
    conv = Conversation(**kw)
    feed(censor.hook, conv.handshake() + [conv.client(python_hello(name))])
    return conv


def test_a_slow_netlink_worker_does_not_delay_the_verdicts() -> None:
    """Routed: the next hops' MACs come from netlink, on a worker that is held. The hook's
    verdicts come meanwhile (the flow stays on the slow path; a hook that waited for the worker
    would hang here), and the hand-over completes through the event loop once the worker answers."""
    fast = FakeFastPath(held=True)

    async def main() -> None:
        censor = censor_over(fast)
        conv = open_flow(censor, "pbs.twimg.com")  # decided: limited by "police"
        packets = feed(censor.hook, [conv.client(b"x" * 1400) for _ in range(50)])
        assert all(p.verdict is not None for p in packets) and not fast.released.is_set()
        assert fast.requests == 1 and fast.map == {}  # asked, not yet answered: still the engine's
        open_flow(censor, "example.org", client_port=41000)  # the same next hops: waits, not asked again
        (flow,) = [f for f in censor.engine.flows() if f.name == "pbs.twimg.com"]
        bucket = flow.buckets[UPLOAD]
        assert bucket is not None and bucket.tokens < bucket.burst  # the engine spent credit meanwhile
        await fast.settle()
        assert len(fast.map) == 4 and censor.handover is not None and censor.handover.limited == 1
        assert fast.requests == 2 and sorted(fast.neighbours_asked) == ["198.18.0.2", "198.18.2.2"]
        up_hop, up_limit = fast.map[next(iter(fast.map))]
        assert up_hop == (OUTSIDE, bytes.fromhex("020000000006"), bytes.fromhex("020000000002"))
        # The upload's bucket went in with its credit as it was when the kernel took it over.
        assert fast.buckets[up_limit.bucket][2] == bucket.tokens and len(fast.buckets) == 2
        # Later flows to known next hops need no netlink: handed over at once.
        open_flow(censor, "example.org", client_port=41001)
        assert len(fast.map) == 6 and fast.requests == 2 and censor.handover.forwarded == 2

    asyncio.run(main())
    fast.close()


def test_a_flow_that_ends_or_is_decided_again_before_the_worker_answers_stays_out() -> None:
    fast = FakeFastPath(held=True)

    async def main() -> None:
        censor = censor_over(fast)
        handover = censor.handover
        assert handover is not None
        conv = open_flow(censor, "pbs.twimg.com")
        feed(censor.hook, [conv.client(b"", flags="R")])  # ended (RST) while the worker looks
        open_flow(censor, "example.org", client_port=41001)  # decided (passed) while the worker looks,
        open_flow(censor, "other.example", client_port=41001, seq=[9000, 7000])  # and its 5-tuple opened again
        await fast.settle()
        assert handover.limited == 0 and handover.forwarded == 1 and len(fast.map) == 2
        assert len(handover._slots) == 0  # the ended flow's bucket slot is free again
        flows = [f for f in censor.engine.flows() if f.client_port == 41001]
        assert [f.name for f in flows] == ["other.example"]

    asyncio.run(main())
    fast.close()


def test_shaped_flows_share_one_class_made_once_and_removed_after_the_last() -> None:
    """Bridged (no MACs to look up): the first shaped flow waits for its HTB class; a second flow
    on the same bucket (scope rule here: one per rule) shares it; the class goes with the last."""
    fast = FakeFastPath(held=True, bridged=True)
    text = SCENARIO.replace('direction = "upload"\n', 'direction = "upload"\nscope = "rule"\n')

    async def main() -> None:
        censor = Censor(parse_scenario(text), inside_if="inside", outside_if="outside", inside_ifindex=INSIDE)
        censor.hook._loop = loop = asyncio.get_running_loop()
        handover = censor.handover = Handover(fast, "inside", "outside", loop, shaping=True)  # type: ignore[arg-type]
        a = open_flow(censor, "a.shaped.example", client_port=42000)
        b = open_flow(censor, "b.shaped.example", client_port=42001)
        assert fast.map == {} and fast.requests == 2  # the second waits behind the first's class
        await fast.settle()
        assert handover.limited == 2 and fast.qdiscs.made == [1] and len(fast.map) == 4
        assert {limit.priority for _, limit in fast.map.values() if limit is not None} == {0x7A57 << 16 | 1}
        c = open_flow(censor, "c.shaped.example", client_port=42002)  # the class is known: at once
        assert len(fast.map) == 6 and fast.requests == 2
        for conv in (a, b, c):
            feed(censor.hook, [conv.client(b"", flags="R")])
        assert fast.map == {}
        await fast.settle()
        assert fast.qdiscs.removed == [1] and fast.qdiscs.made == []

    asyncio.run(main())
    fast.close()


def test_without_the_shaper_shaped_flows_stay_in_the_engine_and_others_go() -> None:
    fast = FakeFastPath(bridged=True)

    async def main() -> None:
        censor = censor_over(fast, shaping=False)
        open_flow(censor, "a.shaped.example")
        open_flow(censor, "pbs.twimg.com", client_port=41000)
        assert censor.handover is not None and censor.handover.limited == 1 and len(fast.map) == 2
        assert fast.requests == 0  # bridged, policed: nothing to ask netlink

    asyncio.run(main())
    fast.close()


def test_expiry_frees_a_flow_unless_its_5_tuple_was_handed_over_again_since() -> None:
    fast = FakeFastPath(bridged=True)

    async def main() -> None:
        censor = censor_over(fast)
        handover = censor.handover
        assert handover is not None
        open_flow(censor, "pbs.twimg.com")
        (up,) = handover._by_key
        since = time.monotonic()
        handover._expired([up], since - 60)  # a walk from before it was added: not its to expire
        assert len(handover._slots) == 2  # both directions policed, a bucket each
        handover._expired([up], since)
        assert len(handover._slots) == 0 and handover._by_key == {}

    asyncio.run(main())
    fast.close()


def test_a_failed_netlink_request_is_counted_and_the_flow_stays_in_the_engine() -> None:
    fast = FakeFastPath()

    def broken(fn: Callable[[Any], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_exception(ThrottleError("netlink says no"))
        return future

    async def main() -> None:
        censor = censor_over(fast)
        fast.submit = broken  # type: ignore[method-assign]
        conv = open_flow(censor, "pbs.twimg.com")
        packets = feed(censor.hook, [conv.client(b"x" * 1400) for _ in range(5)])
        await asyncio.sleep(0.1)
        assert all(p.verdict is not None for p in packets)
        assert censor.handover is not None and censor.handover.errors == 1 and fast.map == {}
        assert "1 engine errors" in censor.describe()
        assert len(censor.handover._slots) == 0

    asyncio.run(main())
    fast.close()


def test_a_5_tuple_reused_unseen_replaces_the_earlier_flow_once_the_new_one_is_in() -> None:
    """An earlier flow the engine forgot as idle (its packets skipped it) is still in the map when
    its 5-tuple opens again: the new flow's entries overwrite its own, and only then are the
    earlier flow's slots free. If the new one cannot go in, the earlier one stays tracked."""
    fast = FakeFastPath(bridged=True)

    async def main() -> None:
        censor = Censor(parse_scenario(SCENARIO.replace('scope = "client"', 'scope = "flow"')), inside_if="inside",
                        outside_if="outside", inside_ifindex=INSIDE)
        censor.hook._loop = loop = asyncio.get_running_loop()
        handover = censor.handover = Handover(fast, "inside", "outside", loop)  # type: ignore[arg-type]
        open_flow(censor, "pbs.twimg.com")
        (first,) = handover._by_key.values()
        censor.engine.handle_timer(loop.time() + 3600)  # forgotten as idle: the kernel keeps it
        censor.hook.after_batch()
        assert len(handover._slots) == 2 and handover._by_key
        open_flow(censor, "video.twimg.com", seq=[3000, 8000])
        (second,) = handover._by_key.values()
        assert second is not first and second.flow.name == "video.twimg.com"
        assert len(handover._slots) == 2 and len(fast.map) == 2  # the first's slots are free
        censor.engine.handle_timer(loop.time() + 7200)
        censor.hook.after_batch()
        fast.put_flow = lambda *args: False  # type: ignore[method-assign]  # the map is full
        open_flow(censor, "api.twimg.com", seq=[6000, 9000])
        assert handover._by_key == {second.up: second} and handover._flows[second.flow.key] is second
        assert len(handover._slots) == 2

    asyncio.run(main())
    fast.close()


WINDOW = ('[model]\nfin_rst_ends_flow = true\ninspect_after_name = false\n'
          '[[rule]]\nname = "window"\nmatch = ["*.twimg.com"]\nrate = "130kbit"\nburst = "16KB"\nmeter = "window"\n'
          'scope = "client"\n')


def test_windowed_flows_go_to_the_kernel_with_the_meters_state() -> None:
    """A window meter (§1.11) is carried out in the kernel like a token bucket: a slot per engine
    meter, shared by scope, written with the meter's state when the kernel takes it over. The
    upload's interval began at the hello that decided the flow, so the kernel gets its start and
    the bytes used; the download's has not begun, so the kernel begins it at the first download
    packet, where the engine would have."""
    fast = FakeFastPath(held=True)

    async def main() -> None:
        censor = Censor(parse_scenario(WINDOW), inside_if="inside", outside_if="outside", inside_ifindex=INSIDE)
        censor.hook._loop = loop = asyncio.get_running_loop()
        handover = censor.handover = Handover(fast, "inside", "outside", loop)  # type: ignore[arg-type]
        conv = open_flow(censor, "pbs.twimg.com")
        feed(censor.hook, [conv.client(b"x" * 1400) for _ in range(3)])  # the engine's, while netlink looks
        (flow,) = [f for f in censor.engine.flows() if f.name == "pbs.twimg.com"]
        up, down = flow.buckets
        assert isinstance(up, WindowMeter) and isinstance(down, WindowMeter)
        assert up.start is not None and up.used > 3 * 1400 and down.start is None
        await fast.settle()
        assert handover.limited == 1 and len(fast.map) == 2 and fast.buckets == {}
        slots = {limit.bucket for _, limit in fast.map.values()}
        assert len(slots) == 2 and 0 not in slots
        assert sorted(fast.windows.values(), key=str) == sorted(
            [(16250.0, 16384, up.start, up.used), (16250.0, 16384, None, 0)], key=str)
        # A second flow of the same client shares both meters, and so their slots: nothing rewritten.
        open_flow(censor, "video.twimg.com", client_port=41000)
        await fast.settle()
        assert handover.limited == 2 and len(fast.map) == 4 and len(fast.windows) == 2
        assert {limit.bucket for _, limit in fast.map.values()} == slots

    asyncio.run(main())
    fast.close()
