"""`throttle.infer.reader` on the lab's own captures of a policed upload (`bench`'s two captures on
the censor's two ports), checked against `measure.bench`'s independent count of the drops.

One repeat of twitter-2021-03-10 cut to two probes (the 160 KB policed upload to pbs.twimg.com and
the example.org control), as tests/netns/test_bench.py runs it (~40 s with the lab).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import lab_name

from .conftest import require_lab_prerequisites
from .test_bench import two_probe_scenario

pytestmark = pytest.mark.netns

LAB = lab_name("infer5")


def test_the_reader_counts_the_policers_drops_from_one_capture_and_from_two(tmp_path: Path) -> None:
    require_lab_prerequisites()
    if not shutil.which("tcpdump"):
        pytest.fail("tcpdump is missing: apt-get install tcpdump")
    from throttle.infer.reader import read_traces
    from throttle.lab.topology import CENSOR_CLIENT_IF, CENSOR_SERVER_IF, Lab
    from throttle.measure.bench import bench
    from throttle.measure.ports import PORTS
    from throttle.scenario import load_scenario

    Lab(LAB).down()  # the remains of an interrupted earlier run
    scenario = load_scenario(two_probe_scenario(tmp_path))
    result = bench(scenario, repeat=1, out=tmp_path / "bench", lab_name=LAB, seed=1, metrics_listen="off")
    assert not Lab(LAB).status().up
    drops = {flow.probe: flow.drops for flow in result.flows}
    assert drops["twitter-photo-upload"] > 0 and drops["control-upload"] == 0, drops
    captures = tmp_path / "bench" / "captures"
    before, after = captures / f"repeat-1-{CENSOR_CLIENT_IF}.pcap", captures / f"repeat-1-{CENSOR_SERVER_IF}.pcap"

    def uploads(paths: list[Path]) -> dict[str, object]:
        traces, problems = read_traces(paths)
        assert problems == []
        out = {}
        for trace in traces:
            port = int(trace.client.rsplit(":", 1)[1])
            for index, probe in enumerate(scenario.probes):
                lo, hi = PORTS.client(index)
                if lo <= port <= hi and trace.direction == "upload" and trace.payload >= 160 * 1024:
                    out[probe.name] = trace
        assert set(out) == set(drops), [t.key for t in traces]
        return out

    # The capture between the client and the censor sees every transmission of the upload.
    one = uploads([before])
    for name, trace in one.items():
        assert trace.vantage == "sender" or drops[name] == 0, (name, trace.vantage)  # type: ignore[attr-defined]
        assert trace.transport == "tcp" and not trace.started_mid_flow  # type: ignore[attr-defined]
        assert len(trace.losses) == drops[name], (name, len(trace.losses), drops[name])  # type: ignore[attr-defined]
    # The capture between the censor and the server sees what passed: holes, and jumps in the
    # client's IP IDs where a flight's tail was dropped (no hole shows those).
    far = uploads([after])
    for name, trace in far.items():
        assert trace.vantage == "receiver" or drops[name] == 0, (name, trace.vantage)  # type: ignore[attr-defined]
        assert abs(len(trace.losses) - drops[name]) <= 0.1 * drops[name] + 2, (name, len(trace.losses), drops[name])  # type: ignore[attr-defined]
    # Both sides of the censor, matched packet by packet: the same drops, exactly.
    two = uploads([before, after])
    for name, trace in two.items():
        assert trace.matched and trace.vantage == "sender"  # type: ignore[attr-defined]
        assert len(trace.losses) == drops[name], (name, len(trace.losses), drops[name])  # type: ignore[attr-defined]
        assert trace.one_way and all(0 <= d < 0.5 for _, d in trace.one_way)  # type: ignore[attr-defined]
    assert one["twitter-photo-upload"].server_name in ("pbs.twimg.com", None)  # type: ignore[attr-defined]
