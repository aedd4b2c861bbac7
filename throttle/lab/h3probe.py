"""The QUIC probe's client: one HTTP/3 download or upload, run by `throttle run` in the client namespace.

    python -m throttle.lab.h3probe HOST --address ADDR (--download SIZE | --upload SIZE)
        [--sni NAME | --no-sni] [--port 443] [--max-time S] [--cafile FILE] [--interval S]

It connects to ADDR (no DNS lookup, as curl's --resolve), sends HOST as the SNI (or NAME, or none:
then the certificate must name ADDR, as for `curl https://ADDR/`) and as :authority, and verifies
the server's certificate against the system bundle, which inside the lab's client namespace holds
the lab CA (or --cafile). A download is `GET /bytes/SIZE`; an upload is `POST /upload` of SIZE
incompressible bytes, asking the lab server (`throttle.lab.h3`) to report what it has received.

Output, for the runner (`throttle.measure`; the lines are defined in `throttle.lab.lines`), as curl's:

    stderr  `progress N` whenever N changes, at most every --interval seconds: bytes received
            (download) or bytes the server says it has received (upload); `h3probe: MESSAGE` on failure
    stdout  `RESULT STATUS UPLOADED DOWNLOADED TOTAL PRETRANSFER` at the end: the HTTP status, body
            bytes the server received and this client received, seconds from start to the end and
            to the completed handshake (curl's %{time_total}, %{time_pretransfer})

Exit status: 0 done; 7 refused (ICMP port unreachable: nothing listens, e.g. the server died);
22 HTTP status 400 or more; 28 the transfer did not finish within --max-time; 35 the handshake
failed (certificate, ALPN, ...); 56 the connection or stream ended before the transfer did.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Optional

from throttle.lab.lines import (
    EXIT_HANDSHAKE,
    EXIT_HTTP,
    EXIT_LOST,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    emit,
    error_line,
    port_range_argument,
    progress_line,
    result_line,
)
from throttle.lab.quic_io import PROGRESS_HEADER, SEND_AHEAD, Datagrams, Endpoint, Sender, configuration, socket_for
from throttle.units import parse_size

if TYPE_CHECKING:
    from aioquic.h3.events import H3Event
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.events import QuicEvent

SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
SILENCE = 1.0  # seconds without a datagram from the server before a PING asks whether it is there
CHUNK = 65536


class Failure(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Probe(Endpoint):
    """The probe's one connection and one request; `result` resolves when it is over."""

    def __init__(self, quic: QuicConnection, transport: Sender, args: argparse.Namespace,
                 authority: str) -> None:
        super().__init__(quic, transport)
        self.args = args
        self.authority = authority
        self.size: int = args.size
        self.upload = args.direction == "upload"
        self.result: asyncio.Future[None] = self.loop.create_future()
        self.started = time.monotonic()
        self.handshake_at: Optional[float] = None
        self.stream_id = -1
        self.status = 0
        self.downloaded = 0  # response body bytes
        self.server_received = 0  # upload: what the server reports
        self.reported = -1
        self.left = 0  # upload bytes still to write
        self.written = 0
        self._lines = b""
        self._body = os.urandom(CHUNK)  # incompressible, like a photo
        self.heard = self.loop.time()  # when the server last sent a datagram
        self._pinged = 0.0

    def take(self, data: bytes, addr: Any) -> None:
        self.heard = self.loop.time()
        super().take(data, addr)

    def check_silence(self) -> None:
        """A PING after SILENCE seconds without a datagram. A download's client only acknowledges
        what arrives, so if its server dies it sends nothing and learns nothing; the PING makes the
        server's host answer "port unreachable" (see `_Socket.error`), or a living server answer
        it. A policed flow's server is slow, not silent for long, and costs one tiny packet a second."""
        now = self.loop.time()
        if self.handshake_at is not None and now - self.heard > SILENCE and now - self._pinged > SILENCE:
            self._pinged = now
            self.quic.send_ping(int(now))
            self.pump()

    def start(self) -> None:
        from aioquic.h3.connection import H3Connection

        self.quic.connect(self.transport.get_extra_info("peername"), now=self.loop.time())
        self.h3 = H3Connection(self.quic)
        self.stream_id = self.quic.get_next_available_stream_id()
        headers = [(b":method", b"POST" if self.upload else b"GET"), (b":scheme", b"https"),
                   (b":authority", self.authority.encode()),
                   (b":path", b"/upload" if self.upload else f"/bytes/{self.size}".encode()),
                   (b"user-agent", b"throttle-h3probe/0.1")]
        if self.upload:
            headers += [(b"content-type", b"application/octet-stream"),
                        (b"content-length", str(self.size).encode()), (PROGRESS_HEADER, b"1")]
            self.left = self.size
        self.h3.send_headers(self.stream_id, headers, end_stream=not self.upload or self.size == 0)
        self.pump()

    # -- events ---------------------------------------------------------------------------------

    def quic_event(self, event: QuicEvent) -> None:
        from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, StreamReset

        if isinstance(event, HandshakeCompleted):
            self.handshake_at = time.monotonic()
        elif isinstance(event, StreamReset) and event.stream_id == self.stream_id:
            self.fail(EXIT_LOST, f"the server reset the request stream (error 0x{event.error_code:x})")
        elif isinstance(event, ConnectionTerminated):
            reason = event.reason_phrase or "no reason given"
            if self.handshake_at is None:
                self.fail(EXIT_HANDSHAKE, f"the QUIC handshake failed: {reason} (error 0x{event.error_code:x})")
            else:
                self.fail(EXIT_LOST, f"the connection closed before the transfer ended: {reason} "
                                     f"(error 0x{event.error_code:x})")

    def h3_event(self, event: H3Event) -> None:
        from aioquic.h3.events import DataReceived, HeadersReceived

        if isinstance(event, HeadersReceived) and event.stream_id == self.stream_id:
            status = dict(event.headers).get(b":status", b"0")
            self.status = int(status) if status.isdigit() else 0
            if event.stream_ended:
                self._ended()
        elif isinstance(event, DataReceived) and event.stream_id == self.stream_id:
            self.downloaded += len(event.data)
            if self.upload:
                self._read_lines(event.data)
            if event.stream_ended:
                self._ended()

    def _read_lines(self, data: bytes) -> None:
        self._lines += data
        *lines, self._lines = self._lines.split(b"\n")
        if len(self._lines) > 4096:
            self.fail(EXIT_LOST, "the server's reply is not the lab server's progress lines")
            return
        for line in lines:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if isinstance(report, dict):
                value = report.get("received", report.get("progress"))
                if isinstance(value, int):
                    self.server_received = value

    def _ended(self) -> None:
        if self.status >= 400 or self.status < 100:
            self.fail(EXIT_HTTP, f"HTTP status {self.status}")
        elif self.upload and self.server_received != self.size:
            self.fail(EXIT_LOST, f"the server received {self.server_received} of {self.size} bytes")
        elif not self.upload and self.downloaded != self.size:
            self.fail(EXIT_LOST, f"the body ended after {self.downloaded} of {self.size} bytes")
        elif not self.result.done():
            self.result.set_result(None)

    def before_send(self) -> None:
        """Write upload bytes while less than SEND_AHEAD of them wait unsent."""
        if not self.left or self.h3 is None:
            return
        ahead = self.unsent(self.stream_id, self.written)
        while self.left and ahead < SEND_AHEAD:
            n = min(self.left, CHUNK)
            self.left -= n
            self.written += n
            ahead += n
            self.h3.send_data(self.stream_id, self._body[:n], end_stream=self.left == 0)

    def fail(self, code: int, message: str) -> None:
        if not self.result.done():
            self.result.set_exception(Failure(code, message))

    @property
    def progress(self) -> int:
        return self.server_received if self.upload else self.downloaded


class _Socket:
    """What the probe's socket delivers: datagrams in batches, and ICMP errors."""

    def __init__(self, peer: Any) -> None:
        self.probe: Optional[Probe] = None
        self.peer = peer

    def datagrams(self, batch: list[tuple[bytes, Any]]) -> None:
        if self.probe is None:
            return
        for data, _ in batch:
            self.probe.take(data, self.peer)  # a connected socket: only the peer's datagrams arrive
        self.probe.pump()

    def error(self, exc: OSError) -> None:
        if self.probe is None:
            return
        if isinstance(exc, ConnectionRefusedError):
            host, port = self.peer[0], self.peer[1]
            self.probe.fail(EXIT_REFUSED, f"nothing answers on UDP {host} port {port} (ICMP port unreachable): "
                                          "the server is not running, or stopped")
        else:
            self.probe.fail(EXIT_LOST, f"network error: {exc}")


def connection_class(ech: bool) -> type[QuicConnection]:
    """aioquic's QuicConnection, or with `ech` one whose ClientHello carries an outer
    encrypted_client_hello extension (docs/incidents.md §4.29's signature needs it)."""
    from aioquic.quic.connection import QuicConnection

    if not ech:
        return QuicConnection
    from throttle.lab.evasion.plans import ech_outer

    class EchConnection(QuicConnection):
        """aioquic builds its TLS context when the connection starts and has no public way to add
        an extension, so this is the one place that leans on its internals (the private
        `_initialize`, as of aioquic 1.7.2); tests/test_h3.py checks that the extension is sent."""

        def _initialize(self, peer_cid: bytes) -> None:
            super()._initialize(peer_cid)
            self.tls.handshake_extensions.append((0xFE0D, ech_outer()))

    return EchConnection


async def run(args: argparse.Namespace) -> int:
    from aioquic.h3.connection import H3_ALPN

    quiet = logging.getLogger("quic")  # aioquic logs a failed handshake itself; the message below says it once
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    if args.no_sni:
        server_name, authority = args.address, (f"[{args.address}]" if ":" in args.address else args.address)
    else:
        server_name = authority = args.sni or args.host
    # aioquic sends no SNI when server_name is an IP address, and checks the certificate against it.
    config = configuration(track_sent=args.direction == "upload", is_client=True, alpn_protocols=H3_ALPN,
                           server_name=server_name, cafile=args.cafile, idle_timeout=args.max_time)
    loop = asyncio.get_running_loop()
    sock = socket_for(args.address, args.port, connect=True, local_ports=args.local_port)
    proto = _Socket(sock.getpeername())
    transport = Datagrams(sock, proto.datagrams, proto.error)
    probe = Probe(connection_class(args.ech)(configuration=config), transport, args, authority)
    proto.probe = probe
    shown = -1

    def show() -> None:
        nonlocal shown
        if probe.progress != shown:
            shown = probe.progress
            emit(progress_line(shown), sys.stderr)

    code = 0
    try:
        probe.start()
        deadline = loop.time() + args.max_time
        while not probe.result.done():
            left = deadline - loop.time()
            if left <= 0:
                what = "the QUIC handshake did not complete" if probe.handshake_at is None else "the transfer did not finish"
                probe.fail(EXIT_TIMEOUT, f"{what} within {args.max_time:g} s ({probe.progress} bytes)")
                break
            await asyncio.wait([probe.result], timeout=min(args.interval, left))
            show()
            if not probe.result.done() and not probe.ended:
                probe.check_silence()
        probe.result.result()
        show()
        end = time.monotonic()
        pretransfer = (probe.handshake_at or end) - probe.started
        uploaded = probe.server_received if probe.upload else 0
        emit(result_line(probe.status, uploaded, probe.downloaded, end - probe.started, pretransfer), sys.stdout)
    except Failure as exc:
        show()
        emit(error_line(str(exc)), sys.stderr)
        code = exc.code
    finally:
        if not probe.ended:
            probe.quic.close(reason_phrase="" if code == 0 else "probe failed")
            probe.pump()
        probe.stop_timer()
        transport.close()
    return code



def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m throttle.lab.h3probe", description=__doc__.split("\n")[0])
    p.add_argument("host", help="the name of the request (:authority) and, by default, the SNI")
    p.add_argument("--address", required=True, help="the server's IP address (no DNS lookup)")
    p.add_argument("--port", type=int, default=443)
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--download", metavar="SIZE", help="GET /bytes/SIZE")
    kind.add_argument("--upload", metavar="SIZE", help="POST SIZE bytes")
    sni = p.add_mutually_exclusive_group()
    sni.add_argument("--sni", default=None, help="send this SNI (and :authority) instead of HOST")
    sni.add_argument("--no-sni", action="store_true", help="send no SNI; the certificate must name the address")
    p.add_argument("--local-port", type=port_range_argument, default=None, metavar="LO-HI",
                   help="take the client's UDP port from this range (as curl's --local-port)")
    p.add_argument("--ech", action="store_true", help="add an encrypted_client_hello extension to the ClientHello")
    p.add_argument("--max-time", type=float, default=60.0, help="seconds for the whole transfer")
    # SSL_CERT_FILE, as OpenSSL and curl read it: `throttle run --external --ca` sets it for both clients
    cafile = os.environ.get("SSL_CERT_FILE") or SYSTEM_BUNDLE
    p.add_argument("--cafile", default=cafile, help=f"CA bundle to trust (default $SSL_CERT_FILE, else {SYSTEM_BUNDLE})")
    p.add_argument("--interval", type=float, default=0.25, help="seconds between progress lines")
    args = p.parse_args(argv)
    args.direction = "upload" if args.upload is not None else "download"
    try:
        args.size = parse_size(args.upload if args.upload is not None else args.download)
    except ValueError as exc:
        p.error(f"bad size: {exc}")
    if args.max_time <= 0 or args.interval <= 0:
        p.error("--max-time and --interval must be positive")
    if not os.path.isfile(args.cafile):
        p.error(f"no CA bundle at {args.cafile} (inside the lab's client namespace it holds the lab CA)")
    try:
        code = asyncio.run(run(args))
    except OSError as exc:
        emit(error_line(str(exc)), sys.stderr)
        code = EXIT_REFUSED
    sys.exit(code)


if __name__ == "__main__":
    main()
