"""`throttle.infer.reader` on the lab's own captures of a policed upload (`bench`'s two captures on
the censor's two ports), checked against `measure.bench`'s independent count of the drops.

One repeat of twitter-2021-03-10 cut to two probes (the 160 KB policed upload to pbs.twimg.com and
the example.org control), as tests/netns/test_bench.py runs it (~40 s with the lab).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import lab_name

from .conftest import require_lab_prerequisites
from .test_bench import two_probe_scenario

if TYPE_CHECKING:
    from throttle.infer.trace import FlowTrace
    from throttle.scenario import Scenario

pytestmark = pytest.mark.netns

LAB = lab_name("infer5")


@pytest.fixture(scope="module")
def policed_upload(tmp_path_factory: pytest.TempPathFactory) -> tuple[Scenario, dict[str, int], Path, Path]:
    """One bench repeat: the scenario, bench's drop count per probe, and its captures on the
    censor's client-facing and server-facing ports."""
    require_lab_prerequisites()
    if not shutil.which("tcpdump"):
        pytest.fail("tcpdump is missing: apt-get install tcpdump")
    from throttle.lab.topology import CENSOR_CLIENT_IF, CENSOR_SERVER_IF, Lab
    from throttle.measure.bench import bench
    from throttle.scenario import load_scenario

    tmp = tmp_path_factory.mktemp("infer")
    Lab(LAB).down()  # the remains of an interrupted earlier run
    scenario = load_scenario(two_probe_scenario(tmp))
    flows = bench(scenario, repeat=1, out=tmp / "bench", lab_name=LAB, seed=1, metrics_listen="off").flows
    assert not Lab(LAB).status().up
    captures = tmp / "bench" / "captures"
    return (scenario, {flow.probe: flow.drops for flow in flows},
            captures / f"repeat-1-{CENSOR_CLIENT_IF}.pcap", captures / f"repeat-1-{CENSOR_SERVER_IF}.pcap")


def uploads(scenario: Scenario, paths: list[Path]) -> dict[str, FlowTrace]:
    """The probes' upload traces, by probe name (the client port says which probe)."""
    from throttle.infer.reader import read_traces
    from throttle.measure.ports import PORTS

    traces, problems = read_traces(paths)
    assert problems == []
    out = {}
    for trace in traces:
        port = int(trace.client.rsplit(":", 1)[1])
        for index, probe in enumerate(scenario.probes):
            lo, hi = PORTS.client(index)
            if lo <= port <= hi and trace.direction == "upload" and trace.payload >= 160 * 1024:
                out[probe.name] = trace
    assert set(out) == {p.name for p in scenario.probes}, [t.key for t in traces]
    return out


def test_the_reader_counts_the_policers_drops_from_one_capture_and_from_two(
    policed_upload: tuple[Scenario, dict[str, int], Path, Path],
) -> None:
    scenario, drops, before, after = policed_upload
    assert drops["twitter-photo-upload"] > 0 and drops["control-upload"] == 0, drops
    # The capture between the client and the censor sees every transmission of the upload.
    for name, trace in uploads(scenario, [before]).items():
        assert trace.vantage == "sender" or drops[name] == 0, (name, trace.vantage)
        assert trace.transport == "tcp" and not trace.started_mid_flow
        assert len(trace.losses) == drops[name], (name, len(trace.losses), drops[name])
    # The capture between the censor and the server sees what passed: holes, and jumps in the
    # client's IP IDs where a flight's tail was dropped (no hole shows those).
    for name, trace in uploads(scenario, [after]).items():
        assert trace.vantage == "receiver" or drops[name] == 0, (name, trace.vantage)
        assert abs(len(trace.losses) - drops[name]) <= 0.1 * drops[name] + 2, (name, len(trace.losses), drops[name])
    # Both sides of the censor, matched packet by packet: the same drops, exactly.
    for name, trace in uploads(scenario, [before, after]).items():
        assert trace.matched and trace.vantage == "sender"
        assert len(trace.losses) == drops[name], (name, len(trace.losses), drops[name])
        assert trace.one_way and all(0 <= d < 0.5 for _, d in trace.one_way)
