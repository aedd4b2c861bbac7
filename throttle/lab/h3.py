"""The lab's HTTP/3 server, run by `throttle.lab` inside the NAME-server namespace beside `lab.server`.

QUIC on UDP 443 of the lab's own IPv4 and IPv6 addresses (never every interface of the machine),
ALPN h3, the same routes as the HTTPS server (`throttle.lab.server`):

    POST/PUT any path     read and discard the body as it streams; reply {"received": N, "seconds": T}
                          With the request header `x-throttle-progress: 1` the reply starts at once
                          and carries a line {"progress": N} at most every PROGRESS_INTERVAL seconds
                          while the body arrives (N: body bytes this server has received), then the
                          final line. That is how the QUIC probe measures an upload "by what the
                          server received", as `ss`'s bytes_acked does for TCP.
    GET /bytes/N          N bytes, streamed (also GET /download?size=N)
    GET /info             JSON: the SNI, :authority, client and server addresses of this request
    GET /upload-page/N, /download-page/N
                          a browser probe's pages, as the HTTPS server's (`lab.server.browser_page`)
    GET /                 a small page

Any SNI gets a certificate for that name from the lab CA. aioquic (1.7.2) takes one certificate per
`QuicConfiguration` and reads it when the connection's TLS context is made, on its first datagram;
its TLS layer keeps no SNI and has no SNI callback (the ClientHello's server_name is parsed and
dropped before the certificate is chosen). So this server does not use `aioquic.asyncio.serve`: it
drives aioquic's sans-I/O `QuicConnection` itself and, before a connection exists, reads the SNI
from the client's Initial packets (`HelloPeek`: the Initial keys derive from the client's chosen
connection ID, so anyone on the path can read the ClientHello, as a censor does), then creates the
connection with a configuration whose certificate names that SNI (issued once per name, cached).
No SNI, or an unreadable hello: the default certificate (server.lab and the server's addresses).
Driving the connection ourselves also bounds it: at most MAX_CONNECTIONS connections, MAX_PENDING
half-seen hellos, MAX_REQUESTS open requests per connection (QUIC's own stream limit is 128), and
every body streams through: uploads are counted and dropped as they arrive in order, downloads are
written only while less than SEND_AHEAD bytes wait unsent (`quic_io.Endpoint.unsent`). What aioquic
itself holds is its business: data in flight, and data received after a gap until the gap is
filled (its flow-control windows start at 1 MiB and double as a transfer proceeds; it has no
setting to cap them). In the lab the process stays near 40 MiB through 64 MiB downloads and
parallel uploads.

The sockets, the loop that drives each connection and the way a writer learns what was sent are
`throttle.lab.quic_io`, shared with the QUIC probe's client (`throttle.lab.h3probe`).

The pid file is written only once every socket is bound, so its presence means "ready".

    python -m throttle.lab.h3 --ca-dir DIR --state-dir DIR [--pid-file FILE] --address A ... [--name N ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional
from urllib.parse import urlsplit

from throttle.errors import ParseError
from throttle.files import atomic_write
from throttle.lab.quic_io import (PROGRESS_HEADER, SEND_AHEAD, Address, Datagrams, Endpoint, Sender, configuration,
                                  socket_for)
from throttle.lab.server import browser_page, release_pid_file, requested_size, server_arguments
from throttle.wire import quic as wire_quic
from throttle.wire.names import normalise

if TYPE_CHECKING:
    from aioquic.h3.events import H3Event
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.events import QuicEvent

PORT = 443
CHUNK = 65536
MAX_CONNECTIONS = 256  # each holds SEND_AHEAD, its data in flight and out-of-order data received
MAX_PENDING = 256  # connections whose ClientHello is not yet whole
MAX_HELLO_DATAGRAMS = 8
MAX_HELLO_BYTES = 16384
PENDING_SECONDS = 10.0
MAX_REQUESTS = 32  # open requests per connection; more are refused (H3_REQUEST_REJECTED)
MAX_CACHED_NAMES = 4096
IDLE_TIMEOUT = 300.0  # as the TCP server: a policed flow can stall for a long time, but not forever
PROGRESS_INTERVAL = 0.25
DEFAULT_NAME = "server.lab"
H3_REQUEST_REJECTED = 0x10B
_PAYLOAD = bytes(range(256)) * (CHUNK // 256)  # as lab.server: nothing can compress it away


def log(text: str) -> None:
    sys.stderr.write(text + "\n")


# -- the SNI of a connection that does not exist yet ------------------------------------------------

class HelloPeek:
    """The ClientHello of one new connection, from the CRYPTO frames of its Initial packets.

    Initial packets are encrypted with keys derived from the destination connection ID the client
    chose (RFC 9001 §5.2), so they can be read before any handshake, by the same parser the censor
    uses (`throttle.wire.quic`). `feed` takes the client's datagrams until the hello is whole
    (`done`); `sni` is its server_name, None when it has none or the bytes could not be read
    (aioquic will judge those bytes itself)."""

    def __init__(self, dcid: bytes, version: int) -> None:
        self.dcid = dcid
        self.version = version
        self.datagrams: list[bytes] = []
        self.started = time.monotonic()
        self.done = False
        self.sni: Optional[str] = None
        self._stream = wire_quic.CryptoStream(MAX_HELLO_BYTES)

    def feed(self, datagram: bytes) -> bool:
        """Add a datagram; True once the hello is whole or cannot be read."""
        self.datagrams.append(datagram)
        if self.done:
            return True
        try:
            for packet in wire_quic.parse_initials(datagram):
                if packet.dcid == self.dcid:
                    for offset, data in packet.crypto:
                        self._stream.add(offset, data)
            hello = wire_quic.client_hello(self._stream.contiguous())
        except ParseError as exc:
            log(f"h3: unreadable Initial ({exc}); default certificate")
            self.done = True
            return True
        if hello is not None:
            self.sni = hello.sni
            self.done = True
        elif len(self.datagrams) >= MAX_HELLO_DATAGRAMS:
            self.done = True
        return self.done


# -- certificates ---------------------------------------------------------------------------------

class Certificates:
    """A leaf certificate per SNI name, issued by the lab CA on first use and cached (LRU)."""

    def __init__(self, ca_dir: Path, default_names: list[str]) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        from throttle.lab.ca import CAFiles, Issuer

        self._issuer = Issuer(CAFiles.in_dir(ca_dir))
        self.key = load_pem_private_key(self._issuer.leaf_key_pem, None)
        self.ca = x509.load_pem_x509_certificate(self._issuer.ca_pem)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self.default = self._issue(default_names)

    def _issue(self, names: list[str]) -> Any:
        from cryptography import x509

        return x509.load_pem_x509_certificates(self._issuer.issue(names))[0]

    def for_name(self, name: Optional[str]) -> Any:
        if not name:
            return self.default
        key = normalise(name)
        cert = self._cache.get(key)
        if cert is not None:
            self._cache.move_to_end(key)
            return cert
        try:
            cert = self._cache[key] = self._issue([key])
        except ValueError as exc:
            log(f"h3: no certificate for {name!r}: {exc}")
            return self.default
        while len(self._cache) > MAX_CACHED_NAMES:
            self._cache.popitem(last=False)
        return cert

    def configuration(self, sni: Optional[str]) -> QuicConfiguration:
        from aioquic.h3.connection import H3_ALPN

        return configuration(is_client=False, alpn_protocols=H3_ALPN, idle_timeout=IDLE_TIMEOUT,
                             certificate=self.for_name(sni), certificate_chain=[self.ca], private_key=self.key)


# -- requests -------------------------------------------------------------------------------------

@dataclass
class Request:
    stream_id: int
    method: str = ""
    path: str = ""
    authority: str = ""
    progress: bool = False
    started: float = field(default_factory=time.monotonic)
    received: int = 0  # upload body bytes
    reported: float = 0.0  # when the last progress line went out
    left: int = 0  # download bytes still to write
    written: int = 0  # download bytes written


class ServerConnection(Endpoint):
    """One client connection of the HTTP/3 server: the routes of the module docstring."""

    def __init__(self, server: H3Server, quic: QuicConnection, transport: Sender,
                 local: tuple[str, int], peer: Address, sni: Optional[str]) -> None:
        super().__init__(quic, transport)
        self.server = server
        self.local = local
        self.peer = peer
        self.sni = sni
        self.requests: dict[int, Request] = {}
        self.cids: set[bytes] = set()
        self.counted = True  # in the server's connection count until `forget`

    def quic_event(self, event: QuicEvent) -> None:
        from aioquic.h3.connection import H3Connection
        from aioquic.quic.events import (ConnectionIdIssued, ConnectionIdRetired, ProtocolNegotiated,
                                         StopSendingReceived, StreamReset)

        if isinstance(event, ProtocolNegotiated) and self.h3 is None:
            self.h3 = H3Connection(self.quic)
        elif isinstance(event, ConnectionIdIssued):
            self.server.route(event.connection_id, self)
        elif isinstance(event, ConnectionIdRetired):
            self.server.unroute(event.connection_id)
        elif isinstance(event, (StreamReset, StopSendingReceived)):
            self.requests.pop(event.stream_id, None)  # the client gave up: aioquic has reset our side
            self.forget(event.stream_id)

    def h3_event(self, event: H3Event) -> None:
        from aioquic.h3.events import DataReceived, HeadersReceived

        if isinstance(event, HeadersReceived):
            self._headers(event.stream_id, event.headers, event.stream_ended)
        elif isinstance(event, DataReceived):
            req = self.requests.get(event.stream_id)
            if req is None:
                return
            req.received += len(event.data)  # counted and dropped: a body is never held
            if event.stream_ended:
                self._end_upload(req)
            elif req.progress and time.monotonic() - req.reported >= PROGRESS_INTERVAL:
                req.reported = time.monotonic()
                self._data(req, json.dumps({"progress": req.received}).encode() + b"\n", False)

    def _headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        if stream_id in self.requests:
            return  # trailers
        if len(self.requests) >= MAX_REQUESTS:
            log(f"{self.peer[0]} h3: refused a request, {MAX_REQUESTS} open on this connection")
            self.quic.reset_stream(stream_id, H3_REQUEST_REJECTED)
            return
        fields = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in headers}
        req = Request(stream_id, method=fields.get(":method", ""), path=fields.get(":path", "/"),
                      authority=fields.get(":authority", ""), progress=fields.get(PROGRESS_HEADER.decode()) == "1")
        log(f"{self.peer[0]} h3 {req.method} {req.path} (sni {self.sni}, authority {req.authority})")
        self.requests[stream_id] = req
        if req.method in ("POST", "PUT"):
            if req.progress:
                self._start(req, 200, "application/x-ndjson")
            if ended:
                self._end_upload(req)
            return
        if req.method not in ("GET", "HEAD"):
            self._reply(req, 405, "text/plain", b"method not allowed\n")
        else:
            self._get(req)

    def _get(self, req: Request) -> None:
        url = urlsplit(req.path)
        size = requested_size(req.path)
        if isinstance(size, str):
            self._reply(req, 400, "text/plain", size.encode())
            return
        if size is not None:
            self._start(req, 200, "application/octet-stream", size)
            if req.method == "HEAD" or size == 0:
                self._data(req, b"", True)
            else:
                req.left = size  # written by before_send, as the connection drains
        elif (shown := browser_page(url.path)) is not None:
            status, body = shown
            self._reply(req, status, "text/html; charset=utf-8" if status == 200 else "text/plain", body)
        elif url.path == "/info":
            self._reply(req, 200, "application/json", json.dumps(self._info(req)).encode() + b"\n")
        elif url.path in ("/", "/index.html"):
            page = (f"<!doctype html><title>throttle lab</title>\n<p>throttle lab server over HTTP/3. "
                    f"Host: {_html(req.authority)}; SNI: {_html(self.sni)}; you are {_html(self.peer[0])}.</p>\n")
            self._reply(req, 200, "text/html; charset=utf-8", page.encode())
        else:
            self._reply(req, 404, "text/plain", b"not found\n")

    def _info(self, req: Request) -> dict[str, Any]:
        return {"sni": self.sni, "host": req.authority or None, "client": self.peer[0], "server": self.local[0],
                "port": self.local[1], "tls": "TLSv1.3", "protocol": "h3"}

    def _start(self, req: Request, status: int, ctype: str, length: Optional[int] = None) -> None:
        assert self.h3 is not None
        headers = [(b":status", str(status).encode()), (b"server", b"throttle-lab/0.1"), (b"content-type", ctype.encode())]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        self.h3.send_headers(req.stream_id, headers)

    def _data(self, req: Request, data: bytes, end: bool) -> None:
        assert self.h3 is not None
        self.h3.send_data(req.stream_id, data, end_stream=end)
        if end:
            self.requests.pop(req.stream_id, None)
            self.forget(req.stream_id)

    def _reply(self, req: Request, status: int, ctype: str, body: bytes) -> None:
        self._start(req, status, ctype, None if req.progress else len(body))
        self._data(req, b"" if req.method == "HEAD" else body, True)

    def _end_upload(self, req: Request) -> None:
        seconds = round(time.monotonic() - req.started, 6)
        body = json.dumps({"received": req.received, "seconds": seconds}).encode() + b"\n"
        if req.progress:
            self._data(req, body, True)  # the headers went out with the first byte
        else:
            self._reply(req, 200, "application/json", body)
        log(f"{self.peer[0]} h3 {req.method} {req.path}: received {req.received} in {seconds:.3f} s")

    def before_send(self) -> None:
        """Write download bytes while the connection has less than SEND_AHEAD of them unsent."""
        downloads = [r for r in self.requests.values() if r.left]
        if not downloads:
            return
        ahead = sum(self.unsent(r.stream_id, r.written) for r in downloads)
        view = memoryview(_PAYLOAD)
        for req in downloads:
            while req.left and ahead < SEND_AHEAD:
                n = min(req.left, CHUNK)
                req.left -= n
                req.written += n
                ahead += n
                self._data(req, bytes(view[:n]), req.left == 0)

    def finished(self) -> None:
        super().finished()
        self.server.forget(self)


class H3Server:
    """The UDP socket of one address: new connections (after `HelloPeek`), and datagrams routed
    to theirs by destination connection ID. The connection count is shared by every socket."""

    def __init__(self, certs: Certificates, local: tuple[str, int], counter: list[int]) -> None:
        self.certs = certs
        self.local = local
        self.transport: Optional[Sender] = None
        self.connections: dict[bytes, ServerConnection] = {}
        self.pending: OrderedDict[tuple[Any, bytes], HelloPeek] = OrderedDict()
        self._count = counter  # one-element list, shared: open connections of the process
        self._refused_at = 0.0

    def connection_made(self, transport: Sender) -> None:
        self.transport = transport

    def datagrams_received(self, batch: list[tuple[bytes, Address]]) -> None:
        """A burst of datagrams: each connection takes its own, then answers once."""
        touched: dict[int, ServerConnection] = {}
        for data, addr in batch:
            conn = self.datagram_received(data, addr, pump=False)
            if conn is not None:
                touched[id(conn)] = conn
        for conn in touched.values():
            if not conn.ended:
                conn.pump()

    def datagram_received(self, data: bytes, addr: Address, pump: bool = True) -> Optional[ServerConnection]:
        """One datagram; the existing connection that took it and still has to `pump`, if any."""
        from aioquic.buffer import Buffer  # type: ignore[attr-defined]  # re-exported from aioquic._buffer
        from aioquic.quic.packet import QuicPacketType, encode_quic_version_negotiation, pull_quic_header

        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        except ValueError:
            return None
        conn = self.connections.get(header.destination_cid)
        if conn is not None:
            conn.take(data, addr)
            if pump:
                conn.pump()
                return None
            return conn
        if header.packet_type != QuicPacketType.INITIAL or len(data) < 1200 or header.version is None:
            return None  # only a padded Initial may open a connection (RFC 9000 §14.1)
        assert self.transport is not None
        if header.version not in (0x00000001, 0x6B3343CF):  # QUIC v1, v2
            self.transport.sendto(encode_quic_version_negotiation(
                source_cid=header.destination_cid, destination_cid=header.source_cid,
                supported_versions=[0x00000001, 0x6B3343CF]), addr)
            return None
        self._expire_pending()
        key = (addr, header.destination_cid)
        peek = self.pending.get(key)
        if peek is None:
            peek = self.pending[key] = HelloPeek(header.destination_cid, header.version)
            while len(self.pending) > MAX_PENDING:
                self.pending.popitem(last=False)
        if not peek.feed(data):
            return None  # the rest of the hello is in the next Initial
        del self.pending[key]
        if self._count[0] >= MAX_CONNECTIONS:
            if time.monotonic() - self._refused_at > 1:
                log(f"{addr[0]} h3: refused, {MAX_CONNECTIONS} connections open")
                self._refused_at = time.monotonic()
            return None
        self._open(header.destination_cid, addr, peek)
        return None

    def _open(self, dcid: bytes, addr: Address, peek: HelloPeek) -> None:
        from aioquic.quic.connection import QuicConnection

        assert self.transport is not None
        quic = QuicConnection(configuration=self.certs.configuration(peek.sni),
                              original_destination_connection_id=dcid)
        conn = ServerConnection(self, quic, self.transport, self.local, addr, peek.sni)
        self._count[0] += 1
        self.route(dcid, conn)
        self.route(quic.host_cid, conn)
        for datagram in peek.datagrams:
            if conn.ended:
                break
            conn.receive(datagram, addr)

    def _expire_pending(self) -> None:
        now = time.monotonic()
        while self.pending:
            key, peek = next(iter(self.pending.items()))
            if now - peek.started < PENDING_SECONDS:
                break
            del self.pending[key]

    def route(self, cid: bytes, conn: ServerConnection) -> None:
        self.connections[cid] = conn
        conn.cids.add(cid)

    def unroute(self, cid: bytes) -> None:
        conn = self.connections.pop(cid, None)
        if conn is not None:
            conn.cids.discard(cid)

    def forget(self, conn: ServerConnection) -> None:
        if not conn.counted:
            return
        conn.counted = False
        for cid in list(conn.cids):
            if self.connections.get(cid) is conn:
                del self.connections[cid]
        conn.cids.clear()
        self._count[0] -= 1

    def close_all(self) -> None:
        for conn in set(self.connections.values()):
            conn.quic.close(reason_phrase="server shutting down")
            conn.pump()


def _html(value: Any) -> str:
    import html

    return html.escape(str(value))


def _socket_error(host: str) -> Callable[[OSError], None]:
    return lambda exc: log(f"h3: {host}: {exc}")


async def serve(args: argparse.Namespace) -> None:
    state = Path(args.state_dir)
    certs = Certificates(Path(args.ca_dir), [DEFAULT_NAME, *args.address])
    for name in args.name:
        certs.for_name(name)  # issue the scenario's names ahead of the first handshake
    loop = asyncio.get_running_loop()
    counter = [0]
    servers: list[H3Server] = []
    sockets: list[Datagrams] = []
    for host in args.listen:
        srv = H3Server(certs, (host, args.port), counter)
        sock = socket_for(host, args.port)
        sockets.append(Datagrams(sock, srv.datagrams_received, _socket_error(host)))
        srv.connection_made(sockets[-1])
        servers.append(srv)
    pid_file = Path(args.pid_file) if args.pid_file else state / "h3server.pid"
    atomic_write(pid_file, f"{os.getpid()}\n".encode())
    log(f"h3: pid {os.getpid()} serving h3 on udp:{args.port} on {', '.join(args.listen)}")
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await stop.wait()
        for srv in servers:
            srv.close_all()
        await asyncio.sleep(0.05)  # let the closes leave
    finally:
        for datagrams in sockets:
            datagrams.close()
        release_pid_file(pid_file)


def main(argv: Optional[list[str]] = None) -> None:
    p = server_arguments("python -m throttle.lab.h3", "h3server.pid")
    p.description = __doc__.split("\n")[0]
    p.add_argument("--port", type=int, default=PORT)
    args = p.parse_args(argv)
    if args.listen is None:
        args.listen = list(args.address)  # the lab's own addresses only
    if not args.listen:
        p.error("name the addresses to serve on with --address (or --listen)")
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    try:
        asyncio.run(serve(args))
    except OSError as exc:
        log(f"h3: {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
