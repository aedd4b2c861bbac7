"""`throttle classify` on real captures, through the command line as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from throttle.engine.offline import classify_file
from throttle.scenario import load_scenario

VECTORS = ROOT / "tests" / "vectors"
DEMO = ROOT / "throttle" / "data" / "demo.pcap"


def throttle(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "throttle", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def json_rows(*args: str) -> list[dict]:
    result = throttle("classify", "--json", *args)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout)["flows"])


def test_chromium_two_segment_hello_needs_the_reassembling_model() -> None:
    capture = str(VECTORS / "chromium-pbs.twimg.com.pcap")
    (old,) = json_rows(capture, "--scenario", "twitter-2021-03-10")
    (new,) = json_rows(capture, "--scenario", "twitter-2021-03-10", "--reassemble")
    assert old["name"] is None and old["verdict"] != "limited"
    assert (new["name"], new["name_source"], new["rule"], new["verdict"]) == ("pbs.twimg.com", "sni", "twitter", "limited")
    assert {"client", "server", "transport", "name", "name_source", "rule", "verdict"} <= set(new)
    assert new["server"] == "198.18.0.2:443" and new["transport"] == "tcp"


def test_chromium_quic_hello_over_two_datagrams_needs_the_reassembling_model() -> None:
    capture = str(VECTORS / "chromium-quic-rr1---sn-xxx.googlevideo.com.pcap")
    (new,) = json_rows(capture, "--scenario", "youtube-2024")
    assert (new["name"], new["name_source"], new["rule"], new["verdict"], new["transport"]) == (
        "rr1---sn-xxx.googlevideo.com", "quic", "googlevideo-quic", "limited", "udp")
    (old,) = json_rows(capture, "--scenario", "youtube-2024", "--no-reassemble")
    assert old["name"] is None and old["verdict"] == "passed" and old["transport"] == "udp"


@pytest.mark.parametrize("capture,name", [("aioquic-quic-video.twimg.com.pcap", "video.twimg.com"),
                                          ("aioquic-quicv2-pbs.twimg.com.pcap", "pbs.twimg.com")])
def test_aioquic_initials_v1_and_v2_are_named_under_both_models(capture: str, name: str) -> None:
    for model in ("--reassemble", "--no-reassemble"):
        rows = json_rows(str(VECTORS / capture), "--scenario", "russia-2023-quic-sni", model)
        assert [(r["name"], r["name_source"], r["transport"]) for r in rows] == [(name, "quic", "udp")]


@pytest.mark.parametrize("scenario,limited", [("twitter-2021-03-10", True), ("twitter-2021-04-02", False)])
def test_microsoft_and_the_substring_rule(scenario: str, limited: bool) -> None:
    (row,) = json_rows(str(VECTORS / "curl-tls12-www.microsoft.com.pcap"), "--scenario", f"scenarios/{scenario}.toml")
    assert row["name"] == "www.microsoft.com"
    assert (row["verdict"] == "limited") is limited


def test_http_host_and_ipv6() -> None:
    media = ROOT / "scenarios" / "media-upload.toml"
    (http,) = json_rows(str(VECTORS / "curl-http-pbs.twimg.com.pcap"), "--scenario", str(media))
    assert (http["name"], http["name_source"], http["verdict"]) == ("pbs.twimg.com", "host", "limited")
    (v6,) = json_rows(str(VECTORS / "curl-tls13-ipv6-pbs.twimg.com.pcap"))
    assert v6["client"].startswith("[2001:2:0:1::1]:") and v6["verdict"] == "limited"


def test_demo_capture_table() -> None:
    result = throttle("classify", str(DEMO))
    assert result.returncode == 0
    assert "9 flows, 6 limited under twitter-2021-03-10" in result.stdout


def test_policer_effect_is_reported() -> None:
    # A policer with no burst and almost no rate would drop most of these captured flows' packets.
    reports = classify_file(VECTORS / "curl-tls13-pbs.twimg.com.pcap", _strict_scenario())
    (r,) = reports
    assert r.verdict == "limited" and r.dropped_packets > 0 and r.dropped_bytes > 0


def _strict_scenario():
    import dataclasses

    s = load_scenario(ROOT / "scenarios" / "twitter-2021-03-10.toml")
    rule = dataclasses.replace(s.rules[0], rate=100.0, burst=1500)
    return dataclasses.replace(s, rules=(rule,))


@pytest.mark.parametrize(
    "content,words",
    [
        (b"hello, I am not a capture\n", "not a pcap or pcapng capture"),
        (b"", "not a pcap or pcapng capture"),
        (None, "truncated"),
    ],
)
def test_bad_captures_get_one_line_and_exit_2(tmp_path: Path, content: bytes | None, words: str) -> None:
    path = tmp_path / "bad.pcap"
    if content is None:  # a real capture cut short in the middle of a packet
        data = (VECTORS / "curl-tls13-pbs.twimg.com.pcap").read_bytes()
        content = data[: len(data) // 2 + 7]
    path.write_bytes(content)
    result = throttle("classify", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and str(path) in lines[0]


def test_missing_capture_and_bad_scenario(tmp_path: Path) -> None:
    result = throttle("classify", str(tmp_path / "nope.pcap"))
    assert result.returncode == 2 and "nope.pcap" in result.stderr and "Traceback" not in result.stderr
    broken = tmp_path / "x.toml"
    broken.write_text('[[rule]]\nmatch = ["*.twimg.com"]\nrate = "13O kbit"\n')
    result = throttle("classify", str(DEMO), "--scenario", str(broken))
    assert result.returncode == 2
    assert result.stderr.strip() == f'throttle: {broken}: rule[1].rate: "13O kbit" is not a rate; write e.g. 130kbit'


def test_offline_demo_runs() -> None:
    result = throttle("demo", "--offline")
    assert result.returncode == 0, result.stderr
    assert "Chromium" in result.stdout and result.stdout.count("THROTTLED") == 17
