"""How `throttle run` judges probes and builds its clients' commands (no lab needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from throttle.measure.runner import ProbeRun, Runner, default_timeout, judge, reference_rate
from throttle.scenario import Probe, load_scenario

ROOT = Path(__file__).resolve().parent.parent
RATE = 16250.0


def run_of(speed: float, *, completed: bool = True, control: bool = False, size: int = 262144) -> ProbeRun:
    r = ProbeRun(Probe(name="p", host="h", size=size, control=control))
    r.completed = completed
    r.bytes, r.seconds = size, size / speed
    return r


@pytest.mark.parametrize(
    "speed,control,expected",
    [
        (16400.0, 2e8, "throttled"),  # at the rate, control far faster
        (3 * RATE + 1, 2e8, "normal"),  # above 3 x the rate
        (40000.0, 3e5, "normal"),  # below 3 x the rate but not 10 x slower than the control
        (16400.0, None, "throttled"),  # no control measured: the rate alone decides
    ],
)
def test_judge(speed: float, control: float | None, expected: str) -> None:
    assert judge(run_of(speed), RATE, control) == expected


def test_incomplete_is_blocked_and_controls_judge_by_rate() -> None:
    assert judge(run_of(1e6, completed=False), RATE, 1e8) == "blocked"
    assert judge(run_of(1e6, control=True), RATE, 1e6) == "normal"


def test_reference_rate_and_timeouts() -> None:
    s = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
    assert reference_rate(s) == RATE
    probe = Probe(name="p", host="h", size=262144)
    assert default_timeout(probe, RATE) == pytest.approx(2.5 * 262144 / RATE + 15)
    assert default_timeout(Probe(name="p", host="h", timeout=7.0), RATE) == 7.0


class FakeLab:
    def exec_argv(self, role: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", f"t-{role}", *argv]


def test_commands(tmp_path: Path) -> None:
    s = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
    runner = Runner(s, FakeLab(), tmp_path)
    up = runner.command(Probe(name="a", host="pbs.twimg.com", size=1000), 10)
    assert up[:4] == ["ip", "netns", "exec", "t-client"] and "curl" in up
    assert up[-1] == "https://pbs.twimg.com/upload" and "--resolve" in up
    assert up[up.index("--resolve") + 1] == "pbs.twimg.com:443:198.18.1.2"
    assert (tmp_path / "upload-1000").stat().st_size == 1000
    other = runner.command(Probe(name="b", host="pbs.twimg.com", address="198.18.1.3", direction="download", size=5), 10)
    assert other[other.index("--resolve") + 1] == "pbs.twimg.com:443:198.18.1.3"
    assert other[-1] == "https://pbs.twimg.com/bytes/5"
    nosni = runner.command(Probe(name="c", host="pbs.twimg.com", sni=False), 10)
    assert nosni[-1] == "https://198.18.1.2/upload" and "--resolve" not in nosni
    raw = runner.command(Probe(name="d", host="pbs.twimg.com", protocol="tls", evasion="split", size=9), 10)
    assert raw[4:7] == [raw[4], "-m", "throttle.lab.evasion"]
    assert raw[raw.index("--evasion") + 1] == "split" and raw[raw.index("--sni") + 1] == "pbs.twimg.com"
    v6 = runner.command(Probe(name="e", host="x.example", address="2001:2:0:2::3"), 10)
    assert "-6" in v6 and v6[v6.index("--resolve") + 1] == "x.example:443:2001:2:0:2::3"


def test_rate_zero_scenarios_only_block() -> None:
    # §19's freeze has no rate to be slowed to: a completed transfer is normal, however small.
    assert judge(run_of(400_000.0, size=8192), 0.0, 5e6) == "normal"
    assert judge(run_of(400_000.0, completed=False), 0.0, 5e6) == "blocked"
