"""`throttle infer` as a user meets it: the JSON schema, the table, bad input as one line and exit 2,
a truncated capture's warning, `--write` scenarios that load for every mechanism, `--plot`, and
`--check`'s comparison (pure).

The reader and the fitter are replaced here by a stand-in (`fake_parts`) that returns chosen traces
and inferences, so these tests pin the command's behaviour whatever the two find in a capture;
tests/test_infer_reader.py and tests/test_infer_fit.py test those.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from throttle.cli.app import main
from throttle.cli.infer import flow_json, table_rows
from throttle.infer.check import Row, capture_side, compare
from throttle.infer.scenario_out import scenario_text, write_scenario
from throttle.infer.trace import MECHANISMS, Estimate, FlowTrace, Inference, Loss, Mechanism, Sent
from throttle.scenario.load import parse_scenario
from throttle.units import parse_rate

DEMO = ROOT / "throttle" / "data" / "demo.pcap"
REQUIRED = ("client", "server", "server_name", "transport", "direction", "mechanism", "rate_bps", "burst_bytes",
            "after_bytes", "confidence", "rate_is_floor")


def trace(name: str | None = "pbs.twimg.com", direction: str = "upload", transport: str = "tcp",
          port: int = 40000, vantage: str = "sender", rate_bps: float = 130_000.0) -> FlowTrace:
    """A flow that sends at `rate_bps` for 10 s, one full segment at a time, every 10th lost."""
    t = FlowTrace(client=f"198.18.0.2:{port}", server="198.18.1.2:443", transport=transport,  # type: ignore[arg-type]
                  direction=direction, server_name=name, name_source="tls" if name else None,  # type: ignore[arg-type]
                  vantage=vantage, first=0.0, last=10.0, base_rtt=0.05)  # type: ignore[arg-type]
    gap = 1500 * 8 / rate_bps
    for k in range(int(10 / gap)):
        t.sent.append(Sent(k * gap, k * 1448, 1448, 1500, False))
        if k % 10 == 9:
            t.losses.append(Loss(k * gap, k * 1448, 1448, 1500))
    t.payload = t.delivered = len(t.sent) * 1448
    t.fin = True
    return t


def inference(t: FlowTrace, mechanism: Mechanism, rate_bps: float | None = 130_000.0, burst: float | None = 16384.0,
              after: int | None = None, confidence: float = 0.9) -> Inference:
    inf = Inference(trace=t, mechanism=mechanism, confidence=confidence, reason=f"{mechanism} because")
    if mechanism in ("police", "window", "shape", "crawl") and rate_bps is not None:
        inf.rate_bps = Estimate(rate_bps, rate_bps * 0.02)
        inf.burst_bytes = Estimate(burst, burst * 0.1) if burst is not None else None
    if mechanism == "window":
        inf.period = Estimate((burst or 16384) * 8 / (rate_bps or 130_000), 0.01)
        inf.duty = Estimate(0.1, 0.02)
    if mechanism == "shape":
        inf.queue_delay = Estimate(0.4, 0.05)
    if mechanism in ("freeze", "reset", "timeout"):
        inf.after_bytes = after if after is not None else 16384
    return inf


@pytest.fixture
def fake_parts(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    """A stand-in reader and fitter (throttle.infer.reader/.fit/.stream): what they return is set per test
    in the dict this yields ("traces", "problems", "inferences")."""
    state: dict[str, object] = {"traces": [], "problems": [], "inferences": []}
    reader = types.ModuleType("throttle.infer.reader")
    fit = types.ModuleType("throttle.infer.fit")
    stream = types.ModuleType("throttle.infer.stream")  # one capture: read and fitted together

    def read_traces(paths: list[str]) -> tuple[list[FlowTrace], list[str]]:
        state["paths"] = paths
        return state["traces"], state["problems"]  # type: ignore[return-value]

    def infer(traces: list[FlowTrace]) -> list[Inference]:
        return state["inferences"]  # type: ignore[return-value]

    def infer_capture(path: str) -> tuple[list[Inference], str | None]:
        traces, problems = read_traces([path])
        return infer(traces), (problems[0] if problems else None)

    reader.read_traces = read_traces  # type: ignore[attr-defined]
    fit.infer = infer  # type: ignore[attr-defined]
    stream.infer_capture = infer_capture  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "throttle.infer.reader", reader)
    monkeypatch.setitem(sys.modules, "throttle.infer.fit", fit)
    monkeypatch.setitem(sys.modules, "throttle.infer.stream", stream)
    yield state


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(["infer", *args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_every_field_for_every_flow(fake_parts: dict[str, object],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    named, unnamed = trace(), trace(name=None, port=40001, direction="download")
    fake_parts["traces"] = [named, unnamed]
    fake_parts["inferences"] = [inference(named, "police"), inference(unnamed, "none")]
    code, out, err = run([str(DEMO), "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert list(doc) == ["flows"]
    police, none = doc["flows"]
    assert set(police) == set(none) and set(REQUIRED) <= set(police)
    assert police["client"] == "198.18.0.2:40000" and police["server"] == "198.18.1.2:443"
    assert police["server_name"] == "pbs.twimg.com" and police["mechanism"] == "police"
    assert police["rate_bps"] == 130_000.0 and police["burst_bytes"] == 16384.0 and police["after_bytes"] is None
    assert none["server_name"] is None and none["rate_bps"] is None and none["burst_bytes"] is None
    assert none["direction"] == "download" and none["transport"] == "tcp" and 0 <= none["confidence"] <= 1


def test_table_shows_rate_with_its_error(fake_parts: dict[str, object], capsys: pytest.CaptureFixture[str]) -> None:
    t = trace()
    fake_parts["traces"], fake_parts["inferences"] = [t], [inference(t, "police")]
    code, out, err = run([str(DEMO)], capsys)
    assert code == 0, err
    assert "pbs.twimg.com" in out and "police" in out and "130.0 ± 2.6" in out and "16,384" in out


@pytest.mark.parametrize("content", [None, b"", b"this is not a capture, it is a note\n" * 4, "folder"])
def test_bad_input_is_one_line_naming_the_file(tmp_path: Path, content: bytes | str | None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "capture.pcap"
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    code, out, err = run([str(path)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"throttle: {path}") and "pcap" in lines[0], err
    assert "Traceback" not in err and out == ""


def test_truncated_capture_reports_the_flows_before_the_cut(tmp_path: Path, fake_parts: dict[str, object],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "cut.pcap"
    data = DEMO.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    t = trace()
    fake_parts["traces"], fake_parts["inferences"] = [t], [inference(t, "police")]
    fake_parts["problems"] = [f"{cut}: truncated at packet 7"]
    code, out, err = run([str(cut), "--json"], capsys)
    assert code == 0
    assert json.loads(out)["flows"][0]["mechanism"] == "police"
    assert "warning" in err and "truncated" in err and str(cut) in err


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_written_scenario_loads_for_every_mechanism(mechanism: Mechanism) -> None:
    up, control = trace(), trace(name="example.org", port=40001)
    infs = [inference(up, mechanism), inference(control, "none")]
    scen = parse_scenario(scenario_text(infs, ["capture.pcap"]), "inferred.toml")
    assert any("capture.pcap" in s for s in scen.sources)
    by_host = {p.host: p for p in scen.probes}
    assert by_host["example.org"].control and by_host["example.org"].expect == "normal"
    twimg = by_host["pbs.twimg.com"]
    assert twimg.direction == "upload" and twimg.size == up.payload
    if mechanism == "none":
        assert twimg.expect == "normal" and not any(r.matches_name("pbs.twimg.com") for r in scen.rules)
        return
    rule = next(r for r in scen.rules if r.matches_name("pbs.twimg.com"))
    assert rule.direction == "upload" and rule.transport == "tcp"
    action, meter = {"police": ("police", "bucket"), "window": ("police", "window"), "shape": ("shape", "bucket"),
                     "crawl": ("shape", "bucket"), "freeze": ("drop", "bucket"), "reset": ("rst", "bucket"),
                     "timeout": ("drop", "bucket")}[mechanism]
    assert (rule.action, rule.meter) == (action, meter)
    if mechanism in ("police", "window", "shape"):
        assert rule.rate == pytest.approx(130_000 / 8)  # the loader's bytes/s of the IP-layer rate
        assert twimg.expect == "throttled" and twimg.expect_rate is not None
        assert twimg.expect_rate == pytest.approx(up.payload / 10, rel=0.01)
    if mechanism == "police":
        assert rule.burst == 16384
    if mechanism == "freeze":
        assert rule.after_bytes == 16384 and twimg.expect == "blocked" and twimg.freeze_bytes is not None
        assert twimg.freeze_bytes[0] <= 16384 <= twimg.freeze_bytes[1]
    if mechanism in ("reset", "timeout"):
        assert twimg.expect == "blocked" and twimg.blocked_by == mechanism


def test_written_scenario_groups_names_and_directions(tmp_path: Path) -> None:
    a_up, a_down = trace(), trace(direction="download", port=40002)
    b_up = trace(name="video.twimg.com", port=40003, rate_bps=135_000)
    c_up = trace(name="www.youtube.com", port=40004, rate_bps=1_000_000)
    quic = trace(name="rr1.googlevideo.com", transport="quic", port=40005, direction="download")
    infs = [inference(a_up, "police"), inference(a_down, "police", rate_bps=128_000),
            inference(b_up, "police", rate_bps=135_000), inference(c_up, "police", rate_bps=1_000_000),
            inference(quic, "police", rate_bps=512_000)]
    path = tmp_path / "inferred.toml"
    scen = write_scenario(path, infs, [tmp_path / "a.pcap"])
    assert path.is_file() and scen.rtt == pytest.approx(0.05)  # the capture's smallest round trip
    rules = {r.name: r for r in scen.rules}
    twimg = next(r for r in rules.values() if r.matches_name("pbs.twimg.com"))
    assert twimg.direction == "both"  # upload and download limited alike: one rule, separate buckets
    video = next(r for r in rules.values() if r.matches_name("video.twimg.com"))
    assert video.direction == "upload" and video.rate == pytest.approx(135_000 / 8)
    youtube = next(r for r in rules.values() if r.matches_name("www.youtube.com"))
    assert youtube.rate == pytest.approx(1_000_000 / 8) and youtube is not twimg
    gv = next(r for r in rules.values() if r.matches_name("rr1.googlevideo.com"))
    assert gv.transport == "udp" and "quic" in scen.model.name_sources
    assert {p.protocol for p in scen.probes if p.host == "rr1.googlevideo.com"} == {"quic"}
    assert any(p.control for p in scen.probes)  # none in the capture: one is added for the runner's baseline


def test_one_probe_per_connection_in_the_direction_that_carried_most() -> None:
    up = trace()
    reply = trace(direction="download")  # the same connection: its handshake and the server's reply
    reply.payload = 3000
    scen = parse_scenario(scenario_text([inference(up, "police"), inference(reply, "none"),
                                         inference(trace("example.org", port=9), "none")], ["x.pcap"]), "x.toml")
    twimg = [p for p in scen.probes if p.host == "pbs.twimg.com"]
    assert [(p.direction, p.size, p.expect) for p in twimg] == [("upload", up.payload, "throttled")]


def test_unnamed_flows_are_left_out_with_a_comment() -> None:
    anon = trace(name=None)
    text = scenario_text([inference(anon, "police"), inference(trace(name="example.org", port=4), "none")],
                         ["x.pcap"])
    scen = parse_scenario(text, "inferred.toml")
    assert "not reproduced: 198.18.0.2:40000" in text
    assert [p.host for p in scen.probes] == ["example.org"] and scen.rules[0].name == "nothing-limited"


def test_rates_are_written_in_the_loaders_units() -> None:
    t = trace()
    text = scenario_text([inference(t, "police", rate_bps=64_123.0), inference(trace("a.org", port=5), "none")],
                         ["x.pcap"])
    rate_line = next(line for line in text.splitlines() if line.startswith("rate = "))
    assert parse_rate(rate_line.split('"')[1]) * 8 == pytest.approx(64_123.0)


def test_a_floor_rate_is_written_with_a_note_and_shown_as_one(capsys: pytest.CaptureFixture[str]) -> None:
    floor = inference(trace(), "police", rate_bps=150_000.0)
    floor.rate_floor = True
    text = scenario_text([floor], ["x.pcap"])
    rate_line = next(line for line in text.splitlines() if line.startswith("rate = "))
    assert "a floor" in rate_line and parse_rate(rate_line.split('"')[1]) * 8 == pytest.approx(150_000.0)
    plain = scenario_text([inference(trace(), "police", rate_bps=150_000.0)], ["x.pcap"])
    assert "floor" not in plain
    assert table_rows([floor])[0][7].startswith(">= ") and flow_json(floor)["rate_is_floor"] is True


def test_plot_draws_the_limited_flows(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from throttle.infer.plot import envelope, plot_inferences

    t = trace()
    police = inference(t, "police")
    out = tmp_path / "flows.png"
    assert plot_inferences([police, inference(trace(port=2), "none")], out) == 1
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = envelope(police, 0.0, 10.0)
    share = 1448 / (1448 + t.header_bytes)
    assert line[0] == (0.0, 16384.0) and line[-1][1] == pytest.approx(16384 + 130_000 / 8 * share * 10)
    assert plot_inferences([], tmp_path / "empty.png") == 0


def test_check_compares_mechanisms_and_rates() -> None:
    a, b = trace(), trace(name="example.org", port=2)
    original = [inference(a, "police"), inference(b, "none")]

    def by_name(rows: tuple[Row, ...]) -> dict[str, Row]:
        return {r.name: r for r in rows}

    assert all(r.same for r in compare(original, [inference(a, "police", rate_bps=138_000), inference(b, "none")]))
    off = by_name(compare(original, [inference(a, "police", rate_bps=150_000), inference(b, "none")]))
    assert not off["pbs.twimg.com"].same and off["example.org"].same
    assert off["pbs.twimg.com"].difference == "rate +15.4%"
    other = by_name(compare(original, [inference(a, "window"), inference(b, "none")]))
    assert other["pbs.twimg.com"].difference == "mechanism police -> window"
    missing = by_name(compare(original, [inference(b, "none")]))
    assert not missing["pbs.twimg.com"].same and missing["example.org"].same


def test_check_pairs_transfers_whatever_their_order() -> None:
    """The lab runs the probes in its own order; each connection's other half (a handshake, a
    reply) is no transfer and is not compared."""
    def connection(port: int, direction: str) -> list[Inference]:
        main = trace(port=port, direction=direction)
        half = trace(port=port, direction="download" if direction == "upload" else "upload")
        half.payload = 2000
        return [inference(main, "window"), inference(half, "police" if port > 50000 else "none")]

    original = connection(31000, "upload") + connection(31010, "download")
    again = connection(60010, "download") + connection(60000, "upload")  # reversed; halves called police
    rows = compare(original, again)
    assert [(r.direction, r.same) for r in rows] == [("download", True), ("upload", True)]


def test_capture_side_from_vantage() -> None:
    up_sender, down_receiver = trace(vantage="sender"), trace(direction="download", vantage="receiver")
    assert capture_side([inference(up_sender, "police"), inference(down_receiver, "police")]) == "client"
    up_receiver = trace(vantage="receiver")
    down_sender = trace(direction="download", vantage="sender")
    assert capture_side([inference(up_receiver, "police"), inference(down_sender, "none")]) == "server"


def test_check_needs_root(fake_parts: dict[str, object], capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("throttle.kernel.tools.is_root", lambda: False)
    code, _, err = run([str(DEMO), "--check"], capsys)
    assert code == 2 and "root" in err and "Traceback" not in err


def test_bench_scores_against_the_targets() -> None:
    """scripts/bench_infer.py's scoring: the matrix, precision and recall, errors, PASS/FAIL."""
    scripts = str(ROOT / "scripts")
    sys.path.insert(0, scripts)
    try:
        import bench_infer as b
    finally:
        sys.path.remove(scripts)
    police = b.Case("police", rate_bps=1e6, burst=16384)
    summary = b.Summary(samples=[
        b.Sample(police, "client", "police", 0.9, 1.02e6, 15000),
        b.Sample(police, "server", "police", 0.9, 0.99e6, 20000),
        b.Sample(police, "client", "none"),
        b.Sample(b.Case("loss", probability=0.02), "client", "police", 0.5, 3e5, 4000),
        b.Sample(b.Case("none"), "client", "none"),
        b.Sample(b.Case("police", rate_bps=1e6, burst=16384, shared=True), "client", "police", 0.6, 5e5, 9000),
        b.Sample(police, "client", "police", 0.9, 2e5, 3000, floor=True),  # a floor: not a rate error
        b.Sample(police, "server", "police", 0.9, 1.5e6, 3000, floor=True),  # a floor above the truth
    ])
    result = b.score(summary)
    assert result["confusion"]["police"]["police"] == 4 and result["confusion"]["police"]["none"] == 1
    assert result["confusion"]["none"]["police"] == 1  # the loss case: its truth is none
    assert result["police_precision"] == pytest.approx(4 / 5) and result["police_recall"] == pytest.approx(4 / 5)
    assert result["rate_error_median"] == pytest.approx(0.015) and result["not_censor_called_police"] == 1.0
    assert result["rate_floors"] == 2 and result["rate_floors_held"] == 1 and "floor" in b.report(result)
    assert result["shared_police_found"] == 1.0
    met = b.verdicts(result)
    assert met["police_precision"] is False and met["shared_police_found"] is True and met["rate_error_p90"] is True
    assert "FAIL" in b.report(result) and "PASS" in b.report(result)
    assert all(b.Case.truth.fget(c) in b.TRUTHS for c in b.full_grid())  # type: ignore[attr-defined]
