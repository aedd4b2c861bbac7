"""throttle.lab.quic_io without sockets: what a writer learns about what was sent (the log in the
configuration), checked against aioquic's own count, over the in-memory wire of tests/test_h3.py."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests import pace
from tests.test_h3 import CLIENT, SERVER, Wire

pytest.importorskip("aioquic")


async def transfer(tmp_path: Path, direction: str, size: int, checks: list[tuple[int, int]]) -> Any:
    """One probe transfer against the lab's HTTP/3 server, both ends' configurations made by
    `quic_io.configuration`; every `unsent` answer is put in `checks` beside aioquic's own."""
    from aioquic.h3.connection import H3_ALPN
    from aioquic.quic.connection import QuicConnection

    from throttle.lab import quic_io
    from throttle.lab.ca import ensure_ca
    from throttle.lab.h3 import Certificates, H3Server
    from throttle.lab.h3probe import Probe

    def unsent(self: quic_io.Endpoint, stream_id: int, written: int) -> int:
        got = original(self, stream_id, written)
        stream = self.quic._streams.get(stream_id)  # what the log stands in for, read here only
        checks.append((got, max(0, written - stream.sender.highest_offset) if stream is not None else 0))
        return got

    original = quic_io.Endpoint.unsent
    quic_io.Endpoint.unsent = unsent  # type: ignore[method-assign]
    try:
        ca = ensure_ca(tmp_path / "ca")
        server = H3Server(Certificates(tmp_path / "ca", ["server.lab"]), SERVER, [0])
        holder: dict[str, Probe] = {}
        server.connection_made(Wire(lambda d: holder["client"].receive(d, SERVER), CLIENT))
        config = quic_io.configuration(is_client=True, alpn_protocols=H3_ALPN, server_name="pbs.twimg.com",
                                       cadata=ca.cert.read_bytes())
        client = holder["client"] = Probe(QuicConnection(configuration=config),
                                          Wire(lambda d: server.datagram_received(d, CLIENT), SERVER),
                                          argparse.Namespace(size=size, direction=direction), "pbs.twimg.com")
        client.start()
        await asyncio.wait_for(client.result, pace.seconds(60))
        return client, server
    finally:
        quic_io.Endpoint.unsent = original  # type: ignore[method-assign]


@pytest.mark.parametrize("direction", ["download", "upload"])
def test_unsent_is_what_aioquic_has_not_sent_once(tmp_path: Path, direction: str) -> None:
    from throttle.lab.quic_io import SEND_AHEAD

    checks: list[tuple[int, int]] = []
    client, _ = asyncio.run(transfer(tmp_path, direction, 3_000_017, checks))
    assert client.status == 200
    assert len(checks) > 10 and any(got > 0 for got, _ in checks)  # the writer was held back, often
    assert all(got == theirs for got, theirs in checks), [c for c in checks if c[0] != c[1]][:5]
    assert max(got for got, _ in checks) < SEND_AHEAD + 65536


def test_a_finished_download_is_forgotten(tmp_path: Path) -> None:
    _, server = asyncio.run(transfer(tmp_path, "download", 500_000, []))
    (conn,) = set(server.connections.values())
    assert conn._sent is not None and not conn._sent.highest and not conn._sent.watched


def test_without_the_log_nothing_holds_a_writer_back() -> None:
    from throttle.lab.quic_io import configuration

    assert configuration(track_sent=False, is_client=True).quic_logger is None
    assert configuration(is_client=True).quic_logger is not None

    async def go() -> int:
        from aioquic.quic.connection import QuicConnection

        from throttle.lab.quic_io import Endpoint

        endpoint = Endpoint(QuicConnection(configuration=configuration(track_sent=False, is_client=True)),
                            Wire(lambda d: None, SERVER))
        return endpoint.unsent(0, 1_000_000)

    assert asyncio.run(go()) == 0
