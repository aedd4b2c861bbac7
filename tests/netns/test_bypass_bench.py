"""The bypass benchmark live (`throttle.measure.bypass`, `scripts/bench-bypass`): its reference step
really takes netfilter off the censor's bridge and gives the lab its switches back; the four steps
run and report. Throughputs are printed, never asserted (they depend on the machine's load)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests import pace
from tests.conftest import lab_name
from tests.netns.conftest import require_lab_prerequisites
from throttle.kernel import netns
from throttle.kernel.tools import require_tool
from throttle.lab.topology import SERVER_V4, Lab
from throttle.measure import bypass

pytestmark = pytest.mark.netns

COMMENT = "bypass-bench-test"


def iptables() -> str:
    return require_tool("iptables", "iptables")


def switches(lab: Lab) -> dict[str, str]:
    """The censor namespace's bridge-nf-call-* values, by key."""
    def read() -> dict[str, str]:
        return {key: Path("/proc/sys/" + key.replace(".", "/")).read_text().strip()
                for key in bypass.NETFILTER_SWITCHES}

    return netns.run_in(lab.ns("censor"), read)


def forward_count(lab: Lab) -> int:
    """Packets the test's counting rule in the censor's FORWARD chain has seen."""
    out = subprocess.run(lab.exec_argv("censor", [iptables(), "-w", "-L", "FORWARD", "-v", "-n", "-x"]),
                         capture_output=True, text=True, check=True).stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if f"/* {COMMENT} */" in line)


def ping(lab: Lab) -> None:
    argv = [require_tool("ping", "iputils-ping"), "-c", "3", "-i", "0.2", "-W", "2", SERVER_V4]
    subprocess.run(lab.exec_argv("client", argv), capture_output=True, check=True, timeout=pace.seconds(30))


def test_the_reference_bridge_skips_netfilter_and_gets_it_back(shared_lab: Lab) -> None:
    lab = shared_lab
    rule = ["FORWARD", "-m", "comment", "--comment", COMMENT]
    subprocess.run(lab.exec_argv("censor", [iptables(), "-w", "-A", *rule]), check=True)
    try:
        assert set(switches(lab).values()) == {"1"}
        with bypass.bridge_without_netfilter(lab):
            assert set(switches(lab).values()) == {"0"}
            ping(lab)
            assert forward_count(lab) == 0, "netfilter saw the bridge's packets with bridge-nf-call-* off"
        assert set(switches(lab).values()) == {"1"}
        ping(lab)
        assert forward_count(lab) >= 6, "the bridge's packets no longer reach netfilter after the reference step"
        with pytest.raises(RuntimeError), bypass.bridge_without_netfilter(lab):
            raise RuntimeError("a failed measurement")
        assert set(switches(lab).values()) == {"1"}, "a failed reference step left netfilter off"
    finally:
        subprocess.run(lab.exec_argv("censor", [iptables(), "-w", "-D", *rule]), check=True)


def test_the_benchmark_runs_its_four_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """One second per step; the reference step alone runs with netfilter off, and the lab goes."""
    require_lab_prerequisites()
    real_iperf = bypass._iperf
    seen: list[set[str]] = []

    def iperf(lab: Lab, server: str, seconds: float) -> float:
        seen.append(set(switches(lab).values()))
        return real_iperf(lab, server, seconds)

    monkeypatch.setattr(bypass, "_iperf", iperf)
    name = lab_name("bypass")
    steps = bypass.measure(1.0, lab_name=name)
    print("\n".join(bypass.report_lines(steps)))
    assert [s.label for s in steps] == list(bypass.STEPS)
    assert seen == [{"0"}, {"1"}, {"1"}, {"1"}]
    assert all(s.bits_per_second > 0 for s in steps)
    assert (steps[bypass.PYTHON].packets_per_second or 0) > 0, "the censor's queued count was not read"
    assert not Lab(name).status().up, "the benchmark left its lab up"
