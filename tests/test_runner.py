"""How `throttle run` judges probes and builds its clients' commands (no lab needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT
from throttle.errors import ScenarioError
from throttle.lab.lines import parse_result
from throttle.measure.clients import Exit, Setup, classify_curl, classify_quic, classify_raw, default_timeout
from throttle.measure.commands import CommandClient
from throttle.measure.judge import (Figures, check_expectations, handshake_verdict, rate_check, reference_rate,
                                    speed_verdict)
from throttle.measure.judge import judge as judge_run
from throttle.measure.predict import (Expected, expected, head_start, limiting_rule, payload_share, predict_goodput,
                                      window_bytes)
from throttle.measure.report import ProbeRun, RunReport
from throttle.measure.runner import Runner
from throttle.scenario import Probe, Rule, Scenario, load_scenario

RATE = 16250.0


@pytest.fixture(autouse=True)
def bare_tool_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """System tools by their bare names, as the argv assertions below write them (the runner finds
    them through throttle.kernel.tools, which gives full paths on a real machine)."""
    monkeypatch.setattr("throttle.kernel.tools.find_tool", lambda name: name)


def judge(run: ProbeRun, rate: float, control: float | None) -> str:
    """The speed verdict of a run against `rate` and the control's speed (and its own baseline)."""
    return speed_verdict(run, run.probe, Figures(rate, control, baseline=run.baseline))


def finish_command(run: ProbeRun, out: str, err: str, code: int | None, wall: float) -> None:
    """A command probe's exit (None: killed at its timeout) as the runner takes it."""
    client = CommandClient(run.probe, Setup(lambda argv: argv, Path("."), 10.0))
    run.finish(client.outcome(Exit(out, err, -9 if code is None else code, wall, killed=code is None)))


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


def test_controls_are_judged_against_their_no_censor_baseline() -> None:
    """twitter-2022-03's rate is 187.5 B/s: by the rate alone a control at 2 KB/s (4 x slower than
    a dial-up modem) would read as normal. Against its own speed with no censor it is throttled."""
    slow_rate = 187.5
    control = run_of(2000.0, control=True)
    assert judge(control, slow_rate, None) == "normal"  # no baseline: the rate alone
    control.baseline = 8e6
    assert judge(control, slow_rate, None) == "throttled"  # 4,000 x slower than with no censor
    control.baseline = 150000.0
    assert judge(control, slow_rate, None) == "normal"  # 75 x: inspection's cost on a busy machine
    assert judge(run_of(1000.0, control=True), 16250.0, None) == "throttled"  # below 3 x the rate
    assert judge(run_of(2000.0, control=True, completed=False), slow_rate, None) == "blocked"


def test_reference_rate_and_timeouts() -> None:
    s = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
    assert reference_rate(s) == RATE
    probe = Probe(name="p", host="h", size=262144)
    assert default_timeout(probe, RATE) == pytest.approx(2.5 * 262144 / RATE + 15)
    assert default_timeout(Probe(name="p", host="h", timeout=7.0), RATE) == 7.0


class FakeLab:
    state_dir = Path("/run/throttle/t")

    def exec_argv(self, role: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", f"t-{role}", *argv]


def test_commands(tmp_path: Path) -> None:
    s = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
    runner = Runner(s, FakeLab(), tmp_path)
    up = runner.client(Probe(name="a", host="pbs.twimg.com", size=1000), 10).argv()
    assert up[:4] == ["ip", "netns", "exec", "t-client"] and "curl" in up
    assert up[-1] == "https://pbs.twimg.com/upload" and "--resolve" in up
    assert up[up.index("--resolve") + 1] == "pbs.twimg.com:443:198.18.1.2"
    assert (tmp_path / "upload-1000").stat().st_size == 1000
    other = runner.client(Probe(name="b", host="pbs.twimg.com", address="198.18.1.3", direction="download", size=5),
                          10).argv()
    assert other[other.index("--resolve") + 1] == "pbs.twimg.com:443:198.18.1.3"
    assert other[-1] == "https://pbs.twimg.com/bytes/5"
    nosni = runner.client(Probe(name="c", host="pbs.twimg.com", sni=False), 10).argv()
    assert nosni[-1] == "https://198.18.1.2/upload" and "--resolve" not in nosni
    raw = runner.client(Probe(name="d", host="pbs.twimg.com", protocol="tls", evasion="split", size=9), 10).argv()
    assert raw[4:7] == [raw[4], "-m", "throttle.lab.evasion"]
    assert raw[raw.index("--evasion") + 1] == "split" and raw[raw.index("--sni") + 1] == "pbs.twimg.com"
    v6 = runner.client(Probe(name="e", host="x.example", address="2001:2:0:2::3"), 10).argv()
    assert "-6" in v6 and v6[v6.index("--resolve") + 1] == "x.example:443:2001:2:0:2::3"


def test_rate_zero_scenarios_only_block() -> None:
    # §19's freeze has no rate to be slowed to: a completed transfer is normal, however small.
    assert judge(run_of(400_000.0, size=8192), 0.0, 5e6) == "normal"
    assert judge(run_of(400_000.0, completed=False), 0.0, 5e6) == "blocked"


# ---- causes: blocked by the network, or the lab's own failure (never read as blocked) -----------

@pytest.mark.parametrize(
    "code,status,message,cause",
    [
        (0, "200", "", "completed"),
        (0, "404", "", "lab"),  # the lab server answered, but not with the transfer
        (0, "502", "", "lab"),
        (28, "000", "curl: (28) Operation timed out after 10001 milliseconds", "timeout"),
        (-9, None, "", "timeout"),  # the runner's watchdog
        (56, "000", "curl: (56) Recv failure: Connection reset by peer", "reset"),
        (35, "000", "curl: (35) OpenSSL SSL_connect: Connection reset by peer in connection to x:443", "reset"),
        (55, "000", "curl: (55) Send failure: Broken pipe", "reset"),
        (7, "000", "curl: (7) Failed to connect to example.org port 443 after 1 ms: Couldn't connect to server",
         "lab"),
        (35, "000", "curl: (35) error:0A000410:SSL routines::sslv3 alert handshake failure", "lab"),
        (60, "000", "curl: (60) SSL certificate problem: unable to get local issuer certificate", "lab"),
        (6, "000", "curl: (6) Could not resolve host: x.example", "lab"),
        (22, "404", "", "lab"),
        (3, "000", "", "lab"),  # anything else curl says is not the network's doing
    ],
)
def test_curl_causes(code: int, status: str | None, message: str, cause: str) -> None:
    got, detail = classify_curl(code, status, message)
    assert got == cause
    if cause == "lab":
        assert detail and (str(code) in detail or (status or "") in detail)


@pytest.mark.parametrize(
    "code,cause",
    [(0, "completed"), (7, "lab"), (22, "lab"), (28, "timeout"), (35, "lab"), (56, "reset"), (1, "lab"),
     (-9, "timeout")],
)
def test_quic_causes(code: int, cause: str) -> None:
    assert classify_quic(code)[0] == cause
    assert classify_quic(code, "the own message")[1] == ("" if code == 0 else "the own message")


def test_a_quic_handshake_dropped_until_the_idle_timeout_is_a_timeout() -> None:
    # The censor drops the Initials: aioquic's idle timeout ends the handshake before --max-time.
    assert classify_quic(35, "the QUIC handshake failed: Idle timeout (error 0x1)")[0] == "timeout"
    assert classify_quic(56, "the connection closed before the transfer ended: Idle timeout")[0] == "timeout"
    assert classify_quic(35, "the QUIC handshake failed: certificate verify failed (error 0x12a)")[0] == "lab"


@pytest.mark.parametrize(
    "final,code,cause",
    [
        ({"ok": True, "bytes": 10}, 0, "completed"),
        ({"ok": False, "error": "timed out after 10 s with 16384 of 262144 bytes acknowledged"}, 1, "timeout"),
        ({"ok": False, "error": "Connection reset by peer"}, 1, "reset"),
        ({"ok": False, "error": "Broken pipe"}, 1, "reset"),
        ({"ok": False, "error": "Connection refused"}, 1, "lab"),
        ({"ok": False, "error": "unexpected reply b'HTTP/1.1 400'"}, 1, "lab"),
        ({"ok": False, "error": "the server received 10 of 20 bytes"}, 1, "lab"),
        (None, 1, "lab"),  # the client died without its report
        (None, -9, "timeout"),
    ],
)
def test_raw_client_causes(final: dict[str, object] | None, code: int, cause: str) -> None:
    assert classify_raw(final, code)[0] == cause


def finished(tmp_path: Path, probe: Probe, out: str, code: int, stderr: bytes = b"") -> ProbeRun:
    s = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
    runner = Runner(s, FakeLab(), tmp_path)
    run = ProbeRun(probe)
    runner.runs = [run]
    run.started = 1.0
    client = runner.client(probe)
    runner.feed(run, client, stderr)  # curl's progress stream
    runner.finish(run, client.outcome(Exit(out, "", code, 1.0)))
    return run


def test_a_refused_connection_is_a_lab_failure_not_blocked(tmp_path: Path) -> None:
    run = finished(tmp_path, Probe(name="p", host="h", expect="blocked"), "\nRESULT 000 0 0 0.001 0 0 0\n", 7,
                   b"curl: (7) Failed to connect to h port 443 after 1 ms: Couldn't connect to server\n")
    assert run.cause == "lab" and "Couldn't connect" in run.error and "refused" in run.error
    assert judge(run, RATE, 1e8) == "error" and not run.passed
    report = RunReport("s", "p", [run], RATE, None, 0.0, 1.0)
    assert report.lab_failures == [f"p: {run.error}"] and not report.passed
    assert report.to_json()["probes"][0]["cause"] == "lab"


def test_an_http_error_is_a_lab_failure(tmp_path: Path) -> None:
    run = finished(tmp_path, Probe(name="p", host="h", direction="download"),
                   "\nRESULT 404 0 10 0.01 0.005 0.001 0.004\n", 0)
    assert run.cause == "lab" and "HTTP status 404" in run.error and not run.completed


def test_a_stall_is_blocked_by_timeout_with_its_handshake(tmp_path: Path) -> None:
    run = finished(tmp_path, Probe(name="p", host="h", direction="download", expect="blocked"),
                   "\nRESULT 000 0 14000 10.0 0.020 0.001 0.019\n", 28,
                   b"curl: (28) Operation timed out after 10000 milliseconds with 14000 bytes received\n")
    assert run.cause == "timeout" and judge(run, RATE, 1e8) == "blocked"
    assert run.handshake == pytest.approx(0.018)
    run.tcp_received = 17000
    assert run.stalled_bytes == 17000  # downloads: the TCP payload, the TLS flight included


def test_a_reset_is_blocked_by_the_network(tmp_path: Path) -> None:
    run = finished(tmp_path, Probe(name="p", host="h", expect="blocked"), "\nRESULT 000 0 0 0.1 0 0.001 0\n", 35,
                   b"curl: (35) OpenSSL SSL_connect: Connection reset by peer in connection to h:443\n")
    assert run.cause == "reset" and judge(run, RATE, 1e8) == "blocked" and run.handshake is None


def test_handshake_times_from_each_client() -> None:
    curl = parse_result("RESULT 200 0 5 0.5 0.30 0.10 0.30")
    assert curl is not None and curl.handshake(quic=False) == pytest.approx(0.2)
    assert curl.handshake(quic=False, tls=False) is None  # plain HTTP
    quic = parse_result("RESULT 200 0 5 0.5 0.25")  # h3probe: no connect time, the handshake is its set-up
    assert quic is not None and quic.handshake(quic=True) == pytest.approx(0.25)
    never = parse_result("RESULT 000 0 0 10.0 0 0.001 0")
    assert never is not None and never.handshake(quic=False) is None


def test_freeze_bytes_are_checked() -> None:
    probe = Probe(name="f", host="h", direction="download", expect="blocked", freeze_bytes=(15000, 20000))
    run = ProbeRun(probe)
    run.cause, run.tcp_received = "timeout", 17500
    assert check_expectations(run, run.probe, None) == []
    run.tcp_received = 40000
    assert check_expectations(run, run.probe, None) == ["freeze_bytes: stalled after 40000 bytes, expected 15000-20000"]
    done = ProbeRun(probe)
    done.cause, done.completed = "completed", True
    assert "completed" in check_expectations(done, done.probe, None)[0]
    reset = ProbeRun(probe)
    reset.cause = "reset"
    assert "reset" in check_expectations(reset, reset.probe, None)[0]
    raw = ProbeRun(Probe(name="u", host="h", protocol="tls", expect="blocked", freeze_bytes=(1, 2)))
    raw.cause, raw.bytes = "timeout", 2
    assert raw.stalled_bytes == 2 and check_expectations(raw, raw.probe, None) == []


def test_handshake_expectations() -> None:
    slow = ProbeRun(Probe(name="s", host="h", expect_handshake="slow"))
    slow.handshake = 4.0
    assert handshake_verdict(slow, 0.01) == "slow" and check_expectations(slow, slow.probe, 0.01) == []
    slow.handshake = 0.08  # 8 x the control: not slow
    assert handshake_verdict(slow, 0.01) == "normal" and "observed normal" in check_expectations(slow, slow.probe, 0.01)[0]
    slow.handshake = 0.3  # 30 x the control but under the floor: a loaded machine, not a censor
    assert handshake_verdict(slow, 0.01) == "normal"
    slow.handshake = 0.6
    assert handshake_verdict(slow, None) == "slow"  # no control: the floor alone
    crawl = ProbeRun(Probe(name="c", host="h", expect_handshake="slow", expect="blocked"))
    crawl.cause = "timeout"  # never completed its handshake before the timeout (§2.17)
    assert handshake_verdict(crawl, 0.01) == "slow"
    fine = ProbeRun(Probe(name="n", host="h", expect_handshake="normal"))
    fine.handshake = 0.01
    assert check_expectations(fine, fine.probe, 0.01) == []
    assert fine.passed is False  # observed is unset: the outcome is judged separately


def one_probe_scenario(tmp_path: Path, probe: str) -> Path:
    """A scenario file with one rule for a.example and one probe of a.example with these keys."""
    path = tmp_path / "s.toml"
    path.write_text(f'[scenario]\nname = "s"\n[[rule]]\nname = "r"\nmatch = ["a.example"]\nrate = "130kbit"\n'
                    f'[[probe]]\nhost = "a.example"\n{probe}\n')
    return path


def test_probe_keys_load(tmp_path: Path) -> None:
    s = load_scenario(one_probe_scenario(tmp_path, 'expect = "blocked"\nfreeze_bytes = ["15KB", "20KB"]'))
    assert s.probes[0].freeze_bytes == (15 * 1024, 20 * 1024)
    s = load_scenario(one_probe_scenario(tmp_path, 'expect_handshake = "slow"'))
    assert s.probes[0].expect_handshake == "slow"
    s = load_scenario(one_probe_scenario(tmp_path, 'expect = "blocked"\nblocked_by = "reset"'))
    assert s.probes[0].blocked_by == "reset"
    for bad, says in [
        ('freeze_bytes = ["20KB", "15KB"]\nexpect = "blocked"', "smaller first"),
        ('freeze_bytes = ["15KB"]\nexpect = "blocked"', "range of two"),
        ('freeze_bytes = ["15KB", "20KB"]', 'expect = "blocked"'),
        ('expect_handshake = "quick"', "slow"),
        ('expect_handshake = "slow"\nprotocol = "tls"', "https"),
        ('expect_handshake = "slow"\ncontrol = true', "control"),
        ('blocked_by = "reset"', 'expect = "blocked"'),
        ('expect = "blocked"\nblocked_by = "rst"', "reset"),
    ]:
        with pytest.raises(ScenarioError, match=says):
            load_scenario(one_probe_scenario(tmp_path, bad))


def test_blocked_by_checks_how_a_probe_was_stopped() -> None:
    probe = Probe(name="b", host="h", expect="blocked", blocked_by="reset")
    reset = ProbeRun(probe)
    reset.cause = "reset"
    assert check_expectations(reset, reset.probe, None) == []
    stalled = ProbeRun(probe)
    stalled.cause = "timeout"
    assert check_expectations(stalled, stalled.probe, None) == ["blocked_by: expected a reset, but the probe ended by timeout"]


# ---- command probes --------------------------------------------------------------------------

def command_probe(**kw: object) -> Probe:
    base: dict[str, object] = {"name": "c", "host": "pbs.twimg.com", "protocol": "command", "size": 1000,
                               "command": "curl -sS -T {file} {url}"}
    base.update(kw)
    return Probe(**base)  # type: ignore[arg-type]


def test_command_placeholders_are_filled_and_quoted(tmp_path: Path) -> None:
    s = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
    runner = Runner(s, FakeLab(), tmp_path)
    up = command_probe(command="curl -T {file} {url} # {host} {address} {size} {port}")
    argv = runner.client(up).shell(up.command)
    assert argv[:6] == ["ip", "netns", "exec", "t-client", "sh", "-c"]
    assert argv[6] == (f"curl -T {tmp_path / 'upload-1000'} https://pbs.twimg.com/upload # pbs.twimg.com "
                       f"198.18.1.2 1000 {41000 + len(runner.runs)}")
    assert (tmp_path / "upload-1000").stat().st_size == 1000
    down = command_probe(direction="download", command="wget -O- {url}", host="a b")
    assert runner.client(down).shell(down.command)[6] == "wget -O- 'https://a b/bytes/1000'"


@pytest.mark.parametrize(
    "out,err,code,cause,got,seconds",
    [
        ('{"received": 1000, "seconds": 0.25}\n', "", 0, "completed", 1000, 0.25),  # the server's count and time
        ("", "", 0, "lab", 0, 2.0),  # no reply shown: what the server received is unknown
        ('{"received": 400, "seconds": 0.25}\n', "", 0, "lab", 400, 2.0),
        ("", "curl: (28) Operation timed out after 5000 ms", 28, "timeout", 0, 2.0),
        ("", "curl: (56) Recv failure: Connection reset by peer", 56, "reset", 0, 2.0),
        ("", "curl: (7) Failed to connect", 7, "lab", 0, 2.0),
        ("", "", None, "timeout", 0, 2.0),  # killed by the runner at the timeout
    ],
)
def test_command_uploads_are_judged_by_the_servers_count(out: str, err: str, code: int | None, cause: str,
                                                          got: int, seconds: float) -> None:
    run = ProbeRun(command_probe())
    finish_command(run, out, err, code, 2.0)
    assert (run.cause, run.bytes, run.seconds, run.completed) == (cause, got, seconds, cause == "completed")
    if cause == "lab":
        assert judge(run, RATE, None) == "error" and run.error


def test_other_commands_failing_are_lab_failures() -> None:
    run = ProbeRun(command_probe(command="chromium --headless=new {url}", direction="download"))
    finish_command(run, "", "some warning\nERROR: net::ERR_CERT_AUTHORITY_INVALID\n", 1, 3.0)
    assert run.cause == "lab" and run.error == "the command exited with 1: ERROR: net::ERR_CERT_AUTHORITY_INVALID"
    ok = ProbeRun(command_probe(command="wget -q -O /dev/null {url}", direction="download"))
    finish_command(ok, "", "", 0, 3.0)
    assert ok.completed and ok.bytes == 1000 and ok.seconds == 3.0
    said = ProbeRun(command_probe(command="curl -o /dev/null -w '%{{size_download}}' {url}", direction="download"))
    finish_command(said, "1000", "", 0, 3.0)  # the count it printed
    assert said.completed and said.bytes == 1000
    short = ProbeRun(command_probe(command="curl -o /dev/null -w '%{{size_download}}' {url}", direction="download"))
    finish_command(short, "512\n", "", 0, 3.0)
    assert short.cause == "lab" and short.error == "the command received 512 of 1000 bytes"


def test_command_keys_load(tmp_path: Path) -> None:
    def scenario(probe: str) -> Path:
        return one_probe_scenario(tmp_path, probe)

    s = load_scenario(scenario('protocol = "command"\ncommand = "curl -T {file} {url}"\nwrap = "proxy {port}"'))
    assert s.probes[0].command == "curl -T {file} {url}" and s.probes[0].wrap == "proxy {port}"
    for bad, says in [
        ('protocol = "command"', "is missing"),
        ('command = "curl {url}"', 'needs protocol = "command"'),
        ('protocol = "command"\ncommand = "curl {uri}"', r"\{uri\} is not a placeholder"),
        ('protocol = "command"\ncommand = "curl {url"', "braces"),
        ('protocol = "command"\ncommand = "x"\nwrap = "proxy"', r"needs \{port\}"),
    ]:
        with pytest.raises(ScenarioError, match=says):
            load_scenario(scenario(bad))


# ---- the expected speed: what a rule predicts, and the band a throttled probe must be in ----------

def test_the_payload_share_of_a_full_size_packet() -> None:
    assert payload_share() == pytest.approx(1448 / 1500)  # TCP over IPv4, timestamps on
    assert payload_share(ipv6=True) == pytest.approx(1428 / 1500)
    assert payload_share(udp=True) == pytest.approx(1315 / 1378)  # the lab's 1,350-byte QUIC datagrams


def test_a_token_bucket_gives_its_burst_then_its_rate() -> None:
    rule = Rule(name="r", rate=RATE, burst=16384)
    # 160 KiB of payload is 169,724 IP bytes; 16 KiB pass at once, the rest at 16,250 B/s: 9.436 s
    assert predict_goodput(rule, "upload", 163840) == pytest.approx(17362.75)
    assert predict_goodput(rule, "download", 102400) == pytest.approx(18552.10)
    assert predict_goodput(rule, "upload") == pytest.approx(15686.67)  # the long run: rate x share
    assert predict_goodput(Rule(name="s", action="shape", rate=RATE, burst=16384), "upload", 163840) == \
        pytest.approx(17362.75)  # a shaper's queue keeps its rate busy: as the bucket
    assert predict_goodput(rule, "upload", 15000) is None  # inside the burst: not slowed
    assert predict_goodput(Rule(name="u", rate=RATE, direction="upload"), "download", 163840) is None
    assert predict_goodput(Rule(name="z", rate=0.0, burst=0), "upload", 163840) is None  # a freeze
    # IPv6 and QUIC carry less payload per IP byte: youtube-2024's 512 KB over QUIC at 512 kbit/s
    assert predict_goodput(rule, "upload", 163840, ipv6=True) == pytest.approx(163840 / ((163840 / 0.952 - 16384) / RATE))
    quic = Rule(name="q", rate=64000.0, burst=4096, transport="udp")
    assert predict_goodput(quic, "download", 524288, udp=True) == pytest.approx(61532.77)


def test_a_window_meter_gives_whole_intervals_of_whole_packets() -> None:
    """Each interval of burst / rate = 1.008 s passes ten 1,500-byte packets (15,000 of its 16,384
    B; the eleventh does not fit) at its start: 169,724 IP bytes need 12 intervals and end early in
    the 12th, 11 intervals (11.09 s) after the first began."""
    rule = Rule(name="w", rate=RATE, burst=16384, meter="window")
    assert window_bytes(rule, 1500) == 15000 and window_bytes(rule, 1378) == 15158
    assert window_bytes(Rule(name="t", rate=RATE, burst=1000, meter="window"), 1500) == 1000
    assert predict_goodput(rule, "upload", 163840) == pytest.approx(14772.73)
    assert predict_goodput(rule, "upload", 102400) == pytest.approx(14508.93)  # 8 intervals: 7.06 s
    assert predict_goodput(rule, "upload", 16384) == pytest.approx(16250.0)  # 16,972 IP bytes: one more interval
    assert predict_goodput(rule, "upload", 15000) == pytest.approx(14877.32)  # 15,539 IP bytes: just over one
    assert predict_goodput(rule, "upload", 14000) is None  # one interval's packets: not slowed
    assert predict_goodput(rule, "upload") == pytest.approx(14361.57)  # the long run: 91.6% of the bucket's
    # QUIC's 1,378-byte datagrams fill 15,158 B of each window: 512 KB takes 36 intervals after the first
    quic = Rule(name="q", rate=RATE, burst=16384, meter="window", transport="udp")
    assert predict_goodput(quic, "download", 524288, udp=True) == pytest.approx(524288 / (36 * 16384 / RATE))


def test_a_shared_bucket_leaves_no_burst_to_count_on() -> None:
    """tele2-3g-shaper's one bucket per client: the earlier flows took its burst, so 160 KiB
    (169,724 IP bytes) goes at the rate from its start: 10.44 s, 125.5 kbit/s (measured live
    123.6-131.5 kbit/s), not the 138.9 kbit/s of a flow's own bucket."""
    shared = Rule(name="c", action="shape", rate=RATE, burst=16384, scope="client")
    assert head_start(shared) == 0 and head_start(Rule(name="f", rate=RATE, burst=16384)) == 16384
    assert predict_goodput(shared, "upload", 163840) == pytest.approx(15686.67)
    assert predict_goodput(shared, "upload", 15000) == pytest.approx(15686.67)  # no burst to fit in
    assert head_start(Rule(name="w", rate=RATE, burst=16384, meter="window", scope="client")) == 16384
    tele2 = scenario_of("tele2-3g-shaper")
    upload = expected(tele2, probe_named(tele2, "example-upload"))
    assert upload.rate == pytest.approx(15686.67) and "shared by each client" in upload.why


def test_after_bytes_pass_unlimited() -> None:
    rule = Rule(name="a", rate=RATE, burst=16384, direction="upload", after_bytes=65536)
    # media-upload's photo: 256 KiB, the first 64 KiB free, then 192 KiB (203,669 IP bytes) through the bucket
    assert predict_goodput(rule, "upload", 262144) == pytest.approx(22745.29)
    assert predict_goodput(rule, "upload", 65536 + 15000) is None  # past after_bytes, inside the burst
    assert predict_goodput(rule, "upload", 32768) is None


def scenario_of(name: str) -> Scenario:
    return load_scenario(ROOT / f"scenarios/{name}.toml")


def probe_named(s: Scenario, name: str) -> Probe:
    return next(p for p in s.probes if p.name == name)


def test_the_rule_of_a_probe_is_the_engines() -> None:
    tele2 = scenario_of("tele2-3g-shaper")
    rule = limiting_rule(tele2, probe_named(tele2, "example-upload"))  # by address: every upload
    assert rule is not None and rule.name == "tele2-3g-uplink"
    turkey = scenario_of("turkey-2022")
    assert limiting_rule(turkey, probe_named(turkey, "no-sni-before-trigger")) is None
    after = limiting_rule(turkey, probe_named(turkey, "no-sni-after-trigger"))  # the trigger's sticky mark
    assert after is not None and after.name == "social-media"
    youtube = scenario_of("youtube-2024")
    quic = limiting_rule(youtube, probe_named(youtube, "video-download-quic"))
    assert quic is not None and quic.name == "googlevideo-quic"
    russia = scenario_of("russia-2022-quic")
    v1 = limiting_rule(russia, probe_named(russia, "foreign-server-vk-sni"))  # by QUIC version, not name
    assert v1 is not None and v1.name == "quic-v1"
    assert limiting_rule(russia, probe_named(russia, "vk-server-vk-sni")) is None  # the allowed server
    media = scenario_of("media-upload")
    down = limiting_rule(media, probe_named(media, "photo-download"))  # its rule, though upload only
    assert down is not None and down.name == "photo-upload"
    assert expected(media, probe_named(media, "photo-download")).kind == "unslowed"


def test_every_bundled_throttled_probe_has_a_speed_to_meet() -> None:
    """Each throttled probe of the library is held to its rule's prediction, except kazakhstan-2023's
    100-byte download, which is judged by its handshake (too short to have a rate)."""
    kinds = {}
    for path in sorted((ROOT / "scenarios").glob("*.toml")):
        s = load_scenario(path)
        for probe in s.probes:
            if probe.expect == "throttled":
                kinds[f"{s.name}/{probe.name}"] = expected(s, probe).kind
    assert kinds.pop("kazakhstan-2023/chosen-name") == "short"
    assert len(kinds) >= 20 and set(kinds.values()) == {"predicted"}, kinds
    media = scenario_of("media-upload")
    photo = expected(media, probe_named(media, "photo-upload"))
    assert photo.rate == pytest.approx(22745.29) and "after 65536 B" in photo.why


def band(speed: float, expected_rate: float | None = 17362.75, kind: str = "predicted", tolerance: float = 0.25,
         verdict: str = "throttled", expect: str = "throttled") -> str | None:
    probe = Probe(name="photo", host="h", size=163840, expect=expect, tolerance=tolerance)  # type: ignore[arg-type]
    run = ProbeRun(probe)
    run.bytes, run.seconds, run.completed = 163840, 163840 / speed, True
    return rate_check(run, probe, Expected(kind, expected_rate, "twitter", "rule twitter"), verdict)  # type: ignore[arg-type]


def test_a_throttled_probe_must_meet_its_expected_speed() -> None:
    assert band(17362.75) is None
    assert band(1.24 * 17362.75) is None and band(0.76 * 17362.75) is None  # inside +-25%
    assert band(2 * 17362.75) == "throttled at 277.8 kbit/s, expected 138.9 kbit/s ±25% (rule twitter)"
    assert band(0.5 * 17362.75) == "throttled at 69.5 kbit/s, expected 138.9 kbit/s ±25% (rule twitter)"
    assert band(2.5 * RATE) is not None and band(0.25 * RATE) is not None  # the 2.5 x and 0.25 x
    assert band(1.2 * 17362.75, tolerance=0.1) is not None  # a probe's own tolerance
    assert band(1e6, verdict="normal") is None  # not throttled: the verdict itself fails it
    assert band(1e6, expect="normal", verdict="throttled") is None
    assert band(100.0, None, "short") is None  # too short to have a rate: judged by the rest
    nothing = band(17362.75, None, "unmatched")
    assert nothing is not None and "nothing predicts that" in nothing and "expect_rate" in nothing


def test_a_band_failure_is_a_failed_check_of_the_judgement() -> None:
    probe = Probe(name="photo", host="h", size=163840)
    run = ProbeRun(probe)
    run.bytes, run.seconds, run.completed, run.cause = 163840, 163840 / (2 * 17362.75), True, "completed"
    expect = Expected("predicted", 17362.75, "twitter", "rule twitter")
    judgement = judge_run(run, probe, Figures(RATE, 3e6, expected=expect))
    assert judgement.verdict == "throttled" and judgement.failures == (
        "throttled at 277.8 kbit/s, expected 138.9 kbit/s ±25% (rule twitter)",)
    run.judged(RATE, judgement, expect)
    assert not run.passed
    assert RunReport("s", "p", [run], RATE, 3e6, 0.0, 1.0).to_json()["probes"][0]["expected_rate_bytes_per_second"] \
        == 17362.8


def test_a_runner_holds_each_throttled_probe_to_its_rules_prediction(tmp_path: Path) -> None:
    s = scenario_of("twitter-2021-03-10")
    runner = Runner(s, FakeLab(), tmp_path)
    for run in runner.runs:
        speed = 3e6 if run.probe.expect == "normal" else 17000.0
        if run.probe.name == "reddit-upload":
            speed = 2 * 17000.0  # a censor policing this one at twice the rate
        run.bytes, run.seconds, run.completed, run.cause = run.probe.size, run.probe.size / speed, True, "completed"
    runner._judge([r for r in runner.runs if r.probe.control])
    failed = {r.probe.name: r.check_failures for r in runner.runs if not r.passed}
    assert failed == {"reddit-upload": ["throttled at 272.0 kbit/s, expected 118.2 kbit/s ±25% "
                                        "(rule twitter: window at 130 kbit/s, burst 16384 B)"]}
    assert all(r.expected is None for r in runner.runs if r.probe.expect != "throttled")


def test_a_control_is_held_to_its_baseline_in_every_scenario() -> None:
    """The issue's case: in a rate-0 scenario a control at 17 kbit/s against its 40 Mbit/s baseline."""
    control = run_of(17e3 / 8, control=True)
    control.baseline = 40e6 / 8
    assert judge(control, 0.0, None) == "throttled"
    control.baseline = 200e3 / 8  # 94 x: inspection's cost on a busy machine, not a censor
    assert judge(control, 0.0, None) == "normal"
    assert judge(run_of(17e3 / 8, control=True), 0.0, None) == "normal"  # no baseline measured, no rate


def test_a_slow_handshake_with_a_floor() -> None:
    probe = Probe(name="s", host="h", expect="blocked", expect_handshake="slow", handshake_at_least=4.0)
    run = ProbeRun(probe)
    run.cause, run.handshake = "timeout", 5.9  # twitter-2022-03 in the lab
    assert handshake_verdict(run, 0.03, 4.0) == "slow" and check_expectations(run, probe, 0.03) == []
    run.handshake = 2.9  # a censor at twice §2.17's rate: 10 x the controls' and more, but under the floor
    assert handshake_verdict(run, 0.03, 4.0) == "normal" and handshake_verdict(run, 0.03) == "slow"
    assert check_expectations(run, probe, 0.03) == [
        "handshake: expected slow (at least 4 s), observed normal (2.900 s; controls 0.030 s)"]
    run.handshake = None  # half the rate: the handshake never completes before the 10 s timeout
    assert handshake_verdict(run, 0.03) == "slow"  # without a floor, a crawl past the timeout is slow
    assert handshake_verdict(run, 0.03, 4.0) == "incomplete"  # §2.17's handshakes completed
    assert check_expectations(run, probe, 0.03) == [
        "handshake: expected slow (at least 4 s), observed incomplete (none; controls 0.030 s)"]


def test_a_floor_is_judged_against_the_controls_time_not_a_multiple_of_it() -> None:
    """Under emulation (scripts/vm without KVM) every handshake takes 0.5-0.8 s: kazakhstan-2023's
    policed one took 4.6 s, only 6 x the controls', yet the 4 s its rule adds were all there."""
    probe = Probe(name="s", host="h", expect_handshake="slow", handshake_at_least=4.0)
    run = ProbeRun(probe)
    run.handshake = 4.6
    assert handshake_verdict(run, 0.8, 4.0) == "slow" and check_expectations(run, probe, 0.8) == []
    run.handshake = 4.2  # everything crawls: the controls took 3.9 s, so this one was not slowed
    assert handshake_verdict(run, 3.9, 4.0) == "normal"


def test_expected_speed_and_floor_keys_load(tmp_path: Path) -> None:
    s = load_scenario(one_probe_scenario(tmp_path, 'expect_rate = "130kbit"\ntolerance = "10%"'))
    assert s.probes[0].expect_rate == 16250.0 and s.probes[0].tolerance == pytest.approx(0.1)
    s = load_scenario(one_probe_scenario(tmp_path, 'expect_handshake = "slow"\nhandshake_at_least = "4s"'))
    assert s.probes[0].handshake_at_least == 4.0 and s.probes[0].tolerance == 0.25
    assert load_scenario(one_probe_scenario(tmp_path, "")).probes[0].expect_rate is None
    for bad, says in [
        ('expect_rate = "13O kbit"', "not a rate"),
        ('expect_rate = "0"', "above 0"),
        ('expect_rate = "130kbit"\nexpect = "normal"', 'needs expect = "throttled"'),
        ('tolerance = "25"', 'write e.g. tolerance = "25%"'),
        ("tolerance = 25", 'write e.g. tolerance = "25%"'),
        ('tolerance = "150%"', "between 0 and 100"),
        ('tolerance = "x%"', "percentage"),
        ('tolerance = "25%"\nexpect = "blocked"', 'needs expect = "throttled"'),
        ('handshake_at_least = "4s"', 'needs expect_handshake = "slow"'),
        ('expect_handshake = "normal"\nhandshake_at_least = "4s"', 'needs expect_handshake = "slow"'),
        ('expect_handshake = "slow"\nhandshake_at_least = "0s"', "above 0"),
        ('expect_handshake = "slow"\nhandshake_at_least = "2h"', "more than 1h"),
    ]:
        with pytest.raises(ScenarioError, match=says):
            load_scenario(one_probe_scenario(tmp_path, bad))
