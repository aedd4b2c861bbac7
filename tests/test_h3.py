"""HTTP/3 without a lab: the QUIC probe's command and output in the runner, the loader's refusal of
evasions, the server's reading of the SNI from a client's Initial, and the server and client
talking over an in-memory wire (no root, no sockets)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.conftest import ROOT
from throttle.errors import ScenarioError
from throttle.lab.lines import parse_progress as quic_progress
from throttle.measure.clients import Exit
from throttle.measure.report import ProbeRun
from throttle.measure.runner import Runner
from throttle.scenario import Probe, load_scenario
from throttle.scenario.load import parse_scenario

SERVER = ("198.18.1.2", 443)
CLIENT = ("198.18.0.2", 40000)


class FakeLab:
    state_dir = Path("/run/throttle/t")

    def exec_argv(self, role: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", f"t-{role}", *argv]


def runner(tmp_path: Path) -> Runner:
    return Runner(load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml"), FakeLab(), tmp_path)  # type: ignore[arg-type]


def test_quic_commands(tmp_path: Path) -> None:
    r = runner(tmp_path)
    down = r.client(Probe(name="a", host="pbs.twimg.com", protocol="quic", direction="download", size=5000), 30).argv()
    assert down[:4] == ["ip", "netns", "exec", "t-client"]
    assert down[5:8] == ["-m", "throttle.lab.h3probe", "pbs.twimg.com"]
    assert down[down.index("--address") + 1] == "198.18.1.2"
    assert down[down.index("--download") + 1] == "5000" and down[down.index("--max-time") + 1] == "30"
    assert "--sni" not in down and "--no-sni" not in down  # the host is the SNI
    up = r.client(Probe(name="b", host="pbs.twimg.com", protocol="quic", size=7, address="2001:2:0:2::3"), 0.2).argv()
    assert up[up.index("--upload") + 1] == "7" and up[up.index("--address") + 1] == "2001:2:0:2::3"
    assert up[up.index("--max-time") + 1] == "1"
    assert not (tmp_path / "upload-7").exists()  # the client makes its own bytes
    nosni = r.client(Probe(name="c", host="pbs.twimg.com", protocol="quic", sni=False), 10).argv()
    assert "--no-sni" in nosni
    other = r.client(Probe(name="d", host="pbs.twimg.com", protocol="quic", sni="example.org"), 10).argv()
    assert other[other.index("--sni") + 1] == "example.org"


def test_quic_progress_lines() -> None:
    assert quic_progress(b"progress 12345") == 12345
    assert quic_progress(b"progress 0\n") == 0
    assert quic_progress(b"h3probe: progress 12") is None
    assert quic_progress(b"progress -1") is None
    assert quic_progress(b"") is None


def finished(r: Runner, run: ProbeRun, stderr: bytes, stdout: str, code: int) -> None:
    """The QUIC client's output through the runner: its stderr as it ran, then its exit."""
    client = r.client(run.probe)
    r.feed(run, client, stderr)
    r.finish(run, client.outcome(Exit(stdout, "", code, 1.0)))


@pytest.mark.parametrize("direction", ["download", "upload"])
def test_quic_output_is_read_and_judged_like_curls(tmp_path: Path, direction: str) -> None:
    r = runner(tmp_path)
    run = ProbeRun(Probe(name="a", host="h", protocol="quic", direction=direction, size=3000))  # type: ignore[arg-type]
    r.runs = [run]
    client = r.client(run.probe)
    r.feed(run, client, b"progress 1000\nprogress 2500\nprogress 3000\n")
    assert run.samples and run.samples[-1][1] == 3000  # uploads too: what the server counted
    r.finish(run, client.outcome(Exit("RESULT 200 %d %d 2.5 0.5\n" % ((3000, 80) if direction == "upload"
                                                                      else (0, 3000)), "", 0, 1.0)))
    assert run.completed and run.bytes == 3000 and run.seconds == pytest.approx(2.0)


def test_a_failed_quic_probe_carries_the_clients_message(tmp_path: Path) -> None:
    r = runner(tmp_path)
    run = ProbeRun(Probe(name="a", host="h", protocol="quic", direction="download", size=3000))
    r.runs = [run]
    finished(r, run, b"progress 1000\nh3probe: nothing answers on UDP 198.18.1.2 port 443\n", "", 7)
    assert not run.completed and run.error == "nothing answers on UDP 198.18.1.2 port 443"
    silent = ProbeRun(Probe(name="b", host="h", protocol="quic"))
    finished(r, silent, b"", "", 1)
    assert silent.error == "the QUIC client exited with 1"


SCENARIO = """
[[rule]]
name = "r"
match = ["*.twimg.com"]
rate = "130kbit"
[[probe]]
host = "pbs.twimg.com"
protocol = "quic"
{extra}
"""


def test_quic_probes_load_and_refuse_evasions() -> None:
    ok = parse_scenario(SCENARIO.format(extra='evasion = "none"'))
    assert ok.probes[0].protocol == "quic" and ok.probes[0].evasion == "none"
    with pytest.raises(ScenarioError) as err:
        parse_scenario(SCENARIO.format(extra='evasion = "split"'))
    assert "probe[1].evasion" in str(err.value) and 'protocol = "quic"' in str(err.value)
    assert "ordinary Initial" in str(err.value)


# -- the server's view of a new connection ---------------------------------------------------------

def client_initials(server_name: str, alpn: list[str] | None = None) -> list[bytes]:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    quic = QuicConnection(configuration=QuicConfiguration(
        is_client=True, server_name=server_name, alpn_protocols=alpn or ["h3"]))
    quic.connect(SERVER, now=0.0)
    return [data for data, _ in quic.datagrams_to_send(now=0.0)]


def peek(datagrams: list[bytes]) -> Any:
    from aioquic.buffer import Buffer  # type: ignore[attr-defined]
    from aioquic.quic.packet import pull_quic_header

    from throttle.lab.h3 import HelloPeek

    header = pull_quic_header(Buffer(data=datagrams[0]), host_cid_length=8)
    hello = HelloPeek(header.destination_cid, header.version or 1)
    return hello, [hello.feed(d) for d in datagrams]


def test_the_sni_is_read_from_the_initial() -> None:
    hello, done = peek(client_initials("pbs.twimg.com"))
    assert done == [True] and hello.sni == "pbs.twimg.com"
    bare, _ = peek(client_initials("198.18.1.2"))  # an address: aioquic sends no SNI
    assert bare.done and bare.sni is None


def test_a_hello_over_two_datagrams_is_read_whole() -> None:
    datagrams = client_initials("video.twimg.com", alpn=["h3"] + [f"x-{i:04d}-" + "p" * 40 for i in range(40)])
    assert len(datagrams) >= 2
    hello, done = peek(datagrams)
    assert done[0] is False and done[-1] is True and hello.sni == "video.twimg.com"


def test_garbage_is_no_name_not_an_error() -> None:
    from throttle.lab.h3 import HelloPeek

    dcid = b"12345678"
    hello = HelloPeek(dcid, 1)
    # A long header Initial for this connection ID whose payload does not decrypt.
    packet = b"\xc0\x00\x00\x00\x01" + bytes([len(dcid)]) + dcid + b"\x00\x00" + b"\x44\xb0" + bytes(1200)
    assert hello.feed(packet) is True and hello.sni is None


# -- server and client over an in-memory wire -----------------------------------------------------

class Wire(asyncio.DatagramTransport):
    """A transport that hands each datagram to `deliver` on the next loop turn."""

    def __init__(self, deliver: Callable[[bytes], None], peer: tuple[str, int]) -> None:
        super().__init__()
        self.deliver = deliver
        self.peer = peer

    def sendto(self, data: Any, addr: Any = None) -> None:
        asyncio.get_running_loop().call_soon(self.deliver, bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default


async def exchange(tmp_path: Path, *, sni: str | None, no_sni: bool = False, direction: str = "download",
                   size: int = 300_000, host: str = "pbs.twimg.com") -> Any:
    from aioquic.h3.connection import H3_ALPN
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from throttle.lab.ca import ensure_ca
    from throttle.lab.h3 import Certificates, H3Server
    from throttle.lab.h3probe import Probe as ProbeClient

    ca = ensure_ca(tmp_path / "ca")
    server = H3Server(Certificates(tmp_path / "ca", ["server.lab", SERVER[0]]), SERVER, [0])
    holder: dict[str, ProbeClient] = {}
    server.connection_made(Wire(lambda d: holder["client"].receive(d, SERVER), CLIENT))
    args = argparse.Namespace(size=size, direction=direction)
    name = SERVER[0] if no_sni else (sni or host)
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=name, cadata=ca.cert.read_bytes())
    client = ProbeClient(QuicConnection(configuration=config), Wire(lambda d: server.datagram_received(d, CLIENT), SERVER),
                         args, name)
    holder["client"] = client
    client.start()
    await asyncio.wait_for(client.result, 60)
    return client, server


def test_download_over_the_wire_with_a_certificate_for_the_sni(tmp_path: Path) -> None:
    client, server = asyncio.run(exchange(tmp_path, sni="pbs.twimg.com", size=300_001))
    assert client.status == 200 and client.downloaded == 300_001
    (conn,) = set(server.connections.values())
    assert conn.sni == "pbs.twimg.com"
    assert client.quic.tls._peer_certificate.subject.rfc4514_string() == "CN=pbs.twimg.com"


def test_upload_is_counted_by_the_server_and_reported_as_it_goes(tmp_path: Path) -> None:
    client, server = asyncio.run(exchange(tmp_path, sni="upload.twitter.com", direction="upload", size=200_000))
    assert client.status == 200 and client.server_received == 200_000
    assert client.downloaded > 0  # the progress lines and the final {"received": N, "seconds": T}


def test_no_sni_gets_the_certificate_for_the_address(tmp_path: Path) -> None:
    client, server = asyncio.run(exchange(tmp_path, sni=None, no_sni=True, size=10))
    assert client.downloaded == 10
    (conn,) = set(server.connections.values())
    assert conn.sni is None


def test_info_route_reports_the_sni_and_authority(tmp_path: Path) -> None:
    async def go() -> dict[str, Any]:
        client, server = await exchange(tmp_path, sni="example.org", size=1)
        (conn,) = set(server.connections.values())
        from throttle.lab.h3 import Request

        got: list[bytes] = []
        conn._data = lambda req, data, end: got.append(data)  # capture the reply body
        conn._start = lambda *a, **k: None
        conn._get(Request(99, method="GET", path="/info", authority="example.org"))
        return json.loads(b"".join(got))  # type: ignore[no-any-return]

    info = asyncio.run(go())
    assert info["sni"] == "example.org" and info["host"] == "example.org" and info["client"] == CLIENT[0]
    assert info["server"] == SERVER[0] and info["protocol"] == "h3"


def test_connections_past_the_cap_get_no_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aioquic.h3.connection import H3_ALPN
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from throttle.lab import h3
    from throttle.lab.ca import ensure_ca

    monkeypatch.setattr(h3, "MAX_CONNECTIONS", 1)

    async def go() -> tuple[int, bool]:
        ensure_ca(tmp_path / "ca")
        server = h3.H3Server(h3.Certificates(tmp_path / "ca", ["server.lab"]), SERVER, [0])
        server.connection_made(Wire(lambda d: None, CLIENT))  # the answers go nowhere: only the count matters
        for _ in range(3):
            quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN,
                                                                  server_name="a.example"))
            quic.connect(SERVER, now=0.0)
            for data, _ in quic.datagrams_to_send(now=0.0):
                server.datagram_received(data, CLIENT)
        return len(set(server.connections.values())), not server.pending

    assert asyncio.run(go()) == (1, True)


def test_a_client_that_stops_a_download_does_not_upset_the_server(tmp_path: Path) -> None:
    async def go() -> Any:
        client, server = await exchange(tmp_path, sni="pbs.twimg.com", size=10)
        (conn,) = set(server.connections.values())
        stream = client.quic.get_next_available_stream_id()
        client.h3.send_headers(stream, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"x"),
                                        (b":path", b"/bytes/100MB")], end_stream=True)
        client.pump()
        for _ in range(50):
            await asyncio.sleep(0)
        assert stream in conn.requests
        client.quic.stop_stream(stream, 0x10C)  # H3_REQUEST_CANCELLED
        client.pump()
        for _ in range(200):
            await asyncio.sleep(0)
        return conn

    conn = asyncio.run(go())
    assert not conn.requests and not conn.ended


@pytest.mark.parametrize("ech", [False, True])
def test_the_probe_sends_an_ech_extension_when_asked(ech: bool) -> None:
    from aioquic.h3.connection import H3_ALPN
    from aioquic.quic.configuration import QuicConfiguration

    from throttle.lab.h3probe import connection_class
    from throttle.wire import quic as wire_quic

    quic = connection_class(ech)(configuration=QuicConfiguration(is_client=True, server_name="cloudflare-ech.com",
                                                                 alpn_protocols=H3_ALPN))
    quic.connect(SERVER, now=0.0)
    stream = wire_quic.CryptoStream(16384)
    for data, _ in quic.datagrams_to_send(now=0.0):
        for packet in wire_quic.parse_initials(data):
            for offset, chunk in packet.crypto:
                stream.add(offset, chunk)
    hello = wire_quic.client_hello(stream.contiguous())
    assert hello is not None and hello.sni == "cloudflare-ech.com" and hello.has_ech is ech
