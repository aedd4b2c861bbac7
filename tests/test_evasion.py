"""The evasion client's byte plans (docs/incidents.md §7), judged offline by the 2021 engine, and the
client itself against the lab server's sink on loopback. No root needed."""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import threading
import time

import pytest

from tests.conftest import ROOT
from throttle.engine import Engine, State, Verdict
from throttle.errors import ThrottleError
from throttle.lab.evasion import EVASIONS, FAKE_SNI, client_hello, plan, replace_sni, run, segment_count, sni_span
from throttle.lab.evasion.__main__ import main
from throttle.lab.evasion.plans import CCS_RECORD, PAD_MIN
from throttle.lab.server import SinkServer
from throttle.scenario import load_scenario
from throttle.wire.tls import TLSParseError, is_tls_record, parse_client_hello

from .packets import Conversation

DAY_ONE = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
SNI = "pbs.twimg.com"
MSS = 1460  # a 1,500-byte IPv4 link without TCP options
JUNK = random.Random(7).randbytes(160 * 1024)


def hello_of(data: bytes):
    hello = parse_client_hello(data)
    assert hello is not None and hello.length == len(data), "not one complete ClientHello"
    return hello


# -- the plans -------------------------------------------------------------------------------------


def test_none_is_one_complete_hello() -> None:
    (seg,) = plan("none", SNI)
    assert hello_of(seg.data).sni == SNI
    assert seg.pause > 0  # so the junk that follows is a segment of its own


def test_none_without_sni() -> None:
    (seg,) = plan("none", None)
    assert hello_of(seg.data).sni is None


def test_split_cuts_inside_the_server_name() -> None:
    first, second = plan("split", SNI)
    assert is_tls_record(first.data)
    assert parse_client_hello(first.data) is None  # a valid beginning, incomplete on its own
    assert parse_client_hello(first.data, first_record_only=True) is None
    assert not is_tls_record(second.data)
    whole = first.data + second.data
    start, end = sni_span(whole)
    assert start < len(first.data) < end  # the cut falls inside the name
    assert whole[start:end] == SNI.encode()
    assert hello_of(whole).sni == SNI
    assert first.pause >= 0.02


def test_pad_is_longer_than_a_packet() -> None:
    (seg,) = plan("pad", SNI)
    assert len(seg.data) >= PAD_MIN
    assert hello_of(seg.data).sni == SNI
    # What the kernel sends first, cut at the MSS, is an incomplete record.
    assert parse_client_hello(seg.data[:MSS]) is None
    assert segment_count((seg,), MSS) == 2


@pytest.mark.parametrize("first_byte", [0, 22, 0x41, 0x7F, 0xFF])
@pytest.mark.parametrize("draw", [0, 99, 255])
def test_scramble_sends_101_to_200_bytes_of_non_tls_first(first_byte: int, draw: int) -> None:
    def noise(n: int) -> bytes:
        return bytes([draw]) if n == 1 else bytes([first_byte]) + bytes(range(1, n))

    junk, hello = plan("scramble", SNI, noise=noise)
    assert 101 <= len(junk.data) <= 200
    assert not is_tls_record(junk.data) and not 20 <= junk.data[0] <= 23
    with pytest.raises(TLSParseError):
        parse_client_hello(junk.data)
    assert hello_of(hello.data).sni == SNI


def test_scramble_with_real_randomness() -> None:
    for _ in range(20):
        junk, _hello = plan("scramble", SNI)
        assert 101 <= len(junk.data) <= 200 and junk.data[0] >= 0x80


def test_ccs_record_then_hello_in_one_segment() -> None:
    (seg,) = plan("ccs", SNI)
    assert seg.data.startswith(CCS_RECORD)
    assert is_tls_record(seg.data)
    with pytest.raises(TLSParseError):
        parse_client_hello(seg.data)  # a record, but not a handshake: the parser stops there
    assert hello_of(seg.data[len(CCS_RECORD):]).sni == SNI


def test_dot_sends_the_trailing_dot() -> None:
    (seg,) = plan("dot", SNI)
    assert hello_of(seg.data).sni == SNI + "."
    (seg,) = plan("dot", SNI + ".")
    assert hello_of(seg.data).sni == SNI + "."


def test_replace_sni_fixes_every_length() -> None:
    # The fallback for an ssl module that drops the dot: rewriting the name by hand.
    original = client_hello(SNI, ("h2",))
    for name in (b"pbs.twimg.com.", b"x.io", b"a-much-longer-name.example.org"):
        hello = replace_sni(original, name)
        parsed = hello_of(hello)
        assert parsed.sni == name.decode() and parsed.alpn == ("h2",)
        assert len(hello) == len(original) + len(name) - len(SNI)


def test_fake_sends_a_complete_innocent_hello_first() -> None:
    fake, real = plan("fake", SNI)
    assert hello_of(fake.data).sni == FAKE_SNI
    assert hello_of(real.data).sni == SNI


@pytest.mark.parametrize("evasion", ["split", "dot"])
def test_tricks_on_the_name_need_one(evasion: str) -> None:
    with pytest.raises(ThrottleError, match="SNI"):
        plan(evasion, None)


def test_unknown_trick() -> None:
    with pytest.raises(ThrottleError, match="one of"):
        plan("teleport", SNI)


# -- what the 2021 device makes of each plan ----------------------------------------------------------

EXPECTED = {"none": True, "split": False, "pad": False, "scramble": False, "ccs": False, "dot": False, "fake": True}


def test_every_trick_has_an_expectation() -> None:
    assert set(EXPECTED) == set(EVASIONS)


@pytest.mark.parametrize("evasion,limited", EXPECTED.items())
def test_the_2021_engine_verdict(evasion: str, limited: bool) -> None:
    """Each plan's writes cut at the MSS, then 160 KB of junk, as the censor would see them."""
    check_verdict(DAY_ONE.model, evasion, limited)


@pytest.mark.parametrize(
    "change,evasion",
    [
        ({"reassemble": True}, "split"),  # §8: a device that reassembles reads the whole hello
        ({"reassemble": True}, "pad"),
        ({"strip_trailing_dot": True}, "dot"),  # style.md habit 6: a normalising device
    ],
)
def test_each_trick_beats_one_knob_of_the_2021_model(change: dict, evasion: str) -> None:
    """The same plan is caught once the model lacks the weakness the trick relies on."""
    check_verdict(dataclasses.replace(DAY_ONE.model, **change), evasion, limited=True)


def test_fake_works_only_on_a_device_that_stops_at_the_first_name() -> None:
    check_verdict(dataclasses.replace(DAY_ONE.model, inspect_after_name=False), "fake", limited=False)


def check_verdict(model, evasion: str, limited: bool) -> None:
    e = Engine(model, DAY_ONE.rules)
    conv = Conversation(server_port=8443)
    packets = conv.handshake()
    for seg in plan(evasion, SNI):
        packets += conv.segments(0, seg.data, MSS)
    packets += conv.segments(0, JUNK, MSS)
    verdicts = [e.process(p, 1.0 + i * 1e-4)[0] for i, p in enumerate(packets)]
    (flow,) = e.flows()
    if limited:
        assert flow.state == State.LIMITED and flow.name == SNI
        assert Verdict.DROP in verdicts  # far past the 16 KB burst in 12 ms
    else:
        assert flow.state == State.PASSED, (flow.state, flow.names_seen)
        assert Verdict.DROP not in verdicts
        assert flow.name != SNI  # it never read the real name (or read it with the dot)


# -- the client against the sink, on loopback -------------------------------------------------------


@pytest.fixture(scope="module")
def sink() -> tuple[str, int]:
    server = SinkServer("127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    yield server.server_address
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("evasion", EVASIONS)
def test_run_counts_every_byte(sink, evasion: str) -> None:
    segments = plan(evasion, SNI)
    result = run(*sink, segments, 300_000, timeout=10)
    assert result.ok, result.error
    hello_bytes = sum(len(s.data) for s in segments)
    assert result.hello_bytes == hello_bytes
    assert result.bytes == result.received == hello_bytes + 300_000
    assert result.segments_planned >= len(segments)
    assert result.seconds >= sum(s.pause for s in segments)


def test_cli_json_when_refused(capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here
    assert main(["--address", "127.0.0.1", "--port", str(port), "--size", "1KB", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    done = json.loads(line)
    assert done["event"] == "done" and done["ok"] is False and done["error"]


def test_cli_json_progress_and_timeout(capsys) -> None:
    """A server that accepts but never reads: progress lines, then a timeout, and exit 0."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        started = time.monotonic()
        code = main(["--address", "127.0.0.1", "--port", str(port), "--size", "64MB", "--timeout", "1.3",
                     "--evasion", "split", "--json"])
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["event"] for x in lines] == ["progress", "progress", "done"]
    assert lines[0]["seconds"] == pytest.approx(0.5, abs=0.2) and lines[1]["seconds"] == pytest.approx(1.0, abs=0.2)
    assert all(isinstance(x["bytes"], int) and x["bytes"] > 0 for x in lines)
    done = lines[-1]
    assert done["ok"] is False and "timed out" in done["error"] and done["received"] is None
    assert 1.2 < done["seconds"] < 2 and time.monotonic() - started < 3


def test_cli_human_output(sink, capsys) -> None:
    assert main(["--address", sink[0], "--port", str(sink[1]), "--size", "10000", "--evasion", "ccs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ccs (pbs.twimg.com): 10523 bytes in ")


@pytest.mark.parametrize(
    "argv",
    [
        ["--address", "pbs.twimg.com", "--size", "1"],
        ["--address", "127.0.0.1", "--size", "lots"],
        ["--address", "127.0.0.1", "--size", "1", "--port", "0"],
        ["--address", "127.0.0.1", "--size", "1", "--evasion", "teleport"],
        ["--address", "127.0.0.1", "--size", "1", "--sni", "a.b", "--no-sni"],
        ["--address", "127.0.0.1", "--size", "1", "--no-sni", "--evasion", "dot"],
        ["--address", "127.0.0.1", "--size", "1", "--timeout", "0"],
        ["--size", "1"],
    ],
)
def test_cli_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_run_takes_the_first_free_port_of_its_range() -> None:
    """As curl's --local-port: a port in use is skipped, so captures can tell the probe's connection."""
    ports: list[int] = []
    with socket.socket() as listener, socket.socket() as busy:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy.bind(("127.0.0.1", 0))  # the range's first port, taken
        lo = busy.getsockname()[1]

        def serve() -> None:
            conn, peer = listener.accept()
            with conn:
                ports.append(peer[1])
                total = 0
                while chunk := conn.recv(65536):
                    total += len(chunk)
                conn.sendall(f"received {total}\n".encode())

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        result = run("127.0.0.1", listener.getsockname()[1], plan("none", SNI), 1000, timeout=10,
                     local_ports=(lo, lo + 9))
        server.join(timeout=10)
    assert result.ok, result.error
    assert ports and lo < ports[0] <= lo + 9


def test_cli_refuses_a_bad_port_range() -> None:
    for bad in ("x", "40010-40000", "0-9", "1-70000"):
        with pytest.raises(SystemExit) as exc:
            main(["--address", "127.0.0.1", "--size", "1", "--local-port", bad])
        assert exc.value.code == 2
