"""The rule action "loss" in the kernel: the eBPF program drops each packet of a loss direction when a
draw of bpf_get_prandom_u32() falls below the direction's threshold, counts it with the policer's
drops, and passes the rest.

First the program alone, on crafted frames with BPF_PROG_TEST_RUN (no interface, no lab), then live:
an 8 MB upload through a censor whose rule loses 2% of the upload's packets, in the shared lab. The
drop fraction is read from the censor's own counters (`throttle_packets_total` by stage and
verdict) and must lie within 4 binomial standard deviations of 2%, with the kernel carrying most of
the flow; the upload must complete. With a program that drops nothing, the fraction is ~0 and
the test fails (checked by hand when it was written).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.netns.test_bpf_program import TC_ACT_REDIRECT, TC_ACT_SHOT, TCP_KEY, add, flow, program, run, tcp
from throttle.kernel import libbpf
from throttle.kernel.maps import loss_threshold
from throttle.lab.topology import Lab

from .conftest import running_censor

pytestmark = pytest.mark.netns

__all__ = ["program"]  # the fixture, imported from test_bpf_program

P = 0.02
FRAMES = 10_000
METRICS_PORT = 19487
UPLOAD = 8 << 20
SCENARIO = f"""[scenario]
name = "loss-2pct"
sources = ["docs/incidents.md: none; random loss for the inference benchmark (issue 21)"]

[[rule]]
name = "lossy"
match = ["pbs.twimg.com"]
action = "loss"
probability = {P}
direction = "upload"
"""


def within_binomial(k: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_the_program_drops_a_loss_directions_packets_at_random(program: libbpf.BpfObject) -> None:
    add(program, TCP_KEY, loss=loss_threshold(P))
    frame = tcp()
    verdicts = [run(program, frame)[0] for _ in range(FRAMES)]
    dropped = verdicts.count(TC_ACT_SHOT)
    assert verdicts.count(TC_ACT_REDIRECT) == FRAMES - dropped  # the rest forwarded at once
    assert within_binomial(dropped, FRAMES, P), dropped
    counters = flow(program, TCP_KEY)
    assert (counters["dropped_packets"], counters["packets"]) == (dropped, FRAMES - dropped)
    assert counters["dropped_bytes"] == dropped * (len(frame) - 14)  # IP bytes, as the policer's
    # Probability 1 drops every packet, once after_bytes of payload passed free.
    add(program, TCP_KEY, loss=loss_threshold(1.0), after_bytes=500)
    assert [run(program, frame)[0] for _ in range(10)] == [TC_ACT_REDIRECT] * 5 + [TC_ACT_SHOT] * 5
    add(program, TCP_KEY)  # no loss, no bucket: forwarded
    assert {run(program, frame)[0] for _ in range(100)} == {TC_ACT_REDIRECT}


def rule_packets(rule: str, direction: str) -> dict[tuple[str, str], int]:
    """The censor's throttle_packets_total for one rule and direction, by (stage, verdict)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5) as response:
        page = response.read().decode()
    counts: dict[tuple[str, str], int] = {}
    for m in re.finditer(r'^throttle_packets_total\{([^}]*)\} (\S+)$', page, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels["rule"] == rule and labels["direction"] == direction:
            key = (labels["stage"], labels["verdict"])
            counts[key] = counts.get(key, 0) + int(float(m.group(2)))
    return counts


def settled(rule: str, direction: str) -> dict[tuple[str, str], int]:
    """The counts once two reads 1.5 s apart agree (the censor reads the kernel once a second)."""
    deadline = time.monotonic() + 30
    before = rule_packets(rule, direction)
    while time.monotonic() < deadline:
        time.sleep(1.5)
        now = rule_packets(rule, direction)
        if now == before:
            return now
        before = now
    raise AssertionError(f"the censor's counts did not settle within 30 s: {before}")


def test_an_upload_through_a_loss_rule_loses_two_percent_in_the_kernel_and_completes(shared_lab: Lab,
                                                                                      tmp_path: Path) -> None:
    lab = shared_lab
    scenario = tmp_path / "loss.toml"
    scenario.write_text(SCENARIO)
    data = tmp_path / "upload"
    data.write_bytes(os.urandom(UPLOAD))
    with running_censor(str(scenario), lab.name, "--metrics-listen", f"127.0.0.1:{METRICS_PORT}"):
        done = subprocess.run(lab.exec_argv("client", ["curl", "-4", "-sS", "-o", "/dev/null", "-w",
                                                       "%{size_upload} %{speed_upload}", "-T", str(data),
                                                       "https://pbs.twimg.com/upload"]),
                              capture_output=True, text=True, timeout=120)
        counts = settled("lossy", "upload")
    assert done.returncode == 0, done.stderr
    sent, speed = done.stdout.split()
    assert int(sent) == UPLOAD  # the transfer completed
    # Packets the rule judged: in the engine (before the kernel took the flow over) and in the kernel;
    # the packets before the decision (inspection) met no rule.
    judged = {k: v for k, v in counts.items() if k[0] in ("enforcement", "kernel")}
    total = sum(judged.values())
    dropped = sum(v for (stage, verdict), v in judged.items() if verdict == "dropped")
    kernel = sum(v for (stage, _), v in judged.items() if stage == "kernel")
    print(f"\n{UPLOAD >> 20} MB upload at {float(speed) * 8 / 1e6:.1f} Mbit/s through {P:.0%} loss: {dropped} of "
          f"{total} packets dropped ({dropped / max(total, 1):.2%}), {kernel} in the kernel; by stage and verdict: "
          f"{counts}")
    assert total > UPLOAD // 1500  # every data packet, retransmissions included, was judged
    assert kernel > 0.9 * total  # the kernel carried the flow
    assert within_binomial(dropped, total, P), (dropped, total)
