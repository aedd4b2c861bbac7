"""The evasion tricks of docs/incidents.md §1.7 through the live 2021 censor, in the `evtest` lab.

The raw client sends a disguised ClientHello for pbs.twimg.com and 160 KB of junk to the lab
server's sink (TCP 8443); each test prints the goodput it measured. Needs root; fails (never
skips) when it cannot run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests import pace
from tests.conftest import ROOT, lab_name
from throttle.measure.judge import SPEED_FACTOR

from .conftest import require_lab_prerequisites, running_censor

pytestmark = pytest.mark.netns

LAB = lab_name("evtest")  # only this lab: others on this machine belong to other people
RATE = 16250.0  # bytes/s: the 130 kbit/s of twitter-2021-03-10
SIZE = 160 * 1024
SERVER = "198.18.1.2"
SLOW = ("none", "fake")  # the device sees the real hello (fake: it keeps inspecting, §7)
FAST = ("split", "pad", "scramble", "ccs", "dot")


def require_censor_prerequisites() -> None:
    require_lab_prerequisites()
    try:
        import netfilterqueue  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"netfilterqueue cannot be imported ({exc}): run scripts/setup")


@pytest.fixture(scope="module")
def lab() -> Iterator[object]:
    require_censor_prerequisites()
    from throttle.lab.topology import Lab

    lab = Lab(LAB)
    lab.down()  # also stops a lab server started before the sink existed
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def censor(scenario: str):  # type: ignore[no-untyped-def]
    return running_censor(str(ROOT / "scenarios" / f"{scenario}.toml"), LAB)


def client(lab, evasion: str, sni: str = "pbs.twimg.com", address: str = SERVER, timeout: float = 40) -> subprocess.Popen[str]:
    """The evasion client in the client namespace, started; `result()` collects it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    argv = [sys.executable, "-m", "throttle.lab.evasion", "--address", address, "--port", "8443", "--size", str(SIZE),
            "--sni", sni, "--evasion", evasion, "--timeout", str(timeout), "--json"]
    return subprocess.Popen(lab.exec_argv("client", argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env)


def result(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate(timeout=pace.seconds(60))
    assert proc.returncode == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines and all(x["event"] == "progress" for x in lines[:-1]), out
    done = lines[-1]
    assert done["event"] == "done" and done["ok"], done
    assert done["bytes"] == done["received"] == done["hello_bytes"] + SIZE
    done["goodput"] = done["bytes"] / done["seconds"]
    done["progress"] = len(lines) - 1
    return done


def test_sink_answers_on_every_server_address(lab) -> None:
    for address in ("198.18.1.2", "198.18.1.4", "2001:2:0:2::2", "2001:2:0:2::3"):
        result(client(lab, "none", sni="example.org", address=address))


def test_evasions_through_the_2021_censor(lab) -> None:
    with censor("twitter-2021-03-10") as proc:
        # The slow ones together: each connection is its own flow with its own bucket (§13).
        slow = {evasion: client(lab, evasion) for evasion in SLOW}
        fast = {evasion: result(client(lab, evasion)) for evasion in FAST}
        control = result(client(lab, "none", sni="example.org"))
        slow_results = {evasion: result(p) for evasion, p in slow.items()}
        assert proc.poll() is None, "the censor died"
    print(f"\ncontrol (example.org, none): {control['goodput'] * 8e-6:.1f} Mbit/s")
    for evasion, done in {**slow_results, **fast}.items():
        print(f"{evasion:>8} (pbs.twimg.com): {done['goodput'] * 8e-3:9.1f} kbit/s = {done['goodput'] / RATE:6.1f} x the "
              f"scenario rate; hello {done['hello_bytes']} bytes in {done['segments_planned']} segments; "
              f"{done['seconds']:.2f} s; {done['progress']} progress lines")
    assert control["goodput"] > SPEED_FACTOR * RATE  # the judge's bound, not this machine's speed
    for evasion, done in slow_results.items():
        assert done["goodput"] < 2 * RATE, f"{evasion} was not slowed: {done['goodput'] * 8e-3:.0f} kbit/s"
        assert done["progress"] >= 4  # a slow transfer reports as it goes
    for evasion, done in fast.items():
        assert done["goodput"] > SPEED_FACTOR * RATE, f"{evasion} was slowed: {done['goodput'] * 8e-3:.0f} kbit/s"
    assert fast["pad"]["segments_planned"] == 2  # the kernel really cut the padded hello at the MSS
