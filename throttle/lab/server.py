"""The lab's web server, run by `throttle.lab` inside the NAME-server namespace.

HTTPS on 443 answers any SNI with a certificate for that name signed by the lab CA (issued on
demand in the SNI callback and cached), plain HTTP on 80; both on the lab's own IPv4 and IPv6
addresses (never on every interface of the machine).
Routes, the same on both web ports:

    POST/PUT any path     read and discard the body as it streams (Content-Length, chunked,
                          Expect: 100-continue); reply {"received": N, "seconds": T}
    GET /bytes/N          N bytes, streamed (also GET /download?size=N; N may be e.g. 8MB)
    GET /info             JSON: the SNI, Host, client and server addresses of this request
    GET /upload-page/N    a page whose script POSTs N random bytes to /upload while it loads (a
                          synchronous request, so a headless browser's --dump-dom waits for it) and
                          writes the server's reply into the page: a browser's upload
    GET /download-page/N  a page whose script GETs /bytes/N the same way and writes into the page
                          {"received": N, "seconds": T}: the bytes the page received, and the time
                          from the request to its last byte: a browser's download
    GET /photo            a page for people: choose a photo's size (or a file), Upload, and watch its
                          progress bar and speed (throttle/data/page/photo.html)
    GET /                 a small page

A raw sink on TCP 8443, for the evasion client (`throttle.lab.evasion`): it counts every byte until
the client shuts down its write side, then replies `received N\n` and closes. It never parses
TLS: as in the record-and-replay measurements (docs/incidents.md §16), everything after the
ClientHello may be junk and the flow is still judged by the hello alone (§3).

One thread per connection (ThreadingHTTPServer): TLS reads and writes release the GIL, so a single
upload runs at hundreds of Mbit/s; bodies go through one 64 KiB buffer and are never held whole.
The pid file is written only once every socket is bound, so its presence means "ready".

    python -m throttle.lab.server --ca-dir DIR --state-dir DIR [--pid-file FILE] [--sink-port N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

from throttle.files import atomic_write
from throttle.lab.ca import CAFiles, Issuer
from throttle.units import parse_size
from throttle.wire.names import normalise

CHUNK = 65536
MAX_SIZE = 1 << 40  # GET /bytes/N refuses more than 1 TiB
MAX_PAGE_SIZE = 1 << 30  # GET /upload-page/N, /download-page/N: the browser holds the N bytes in memory
MAX_CACHED_NAMES = 4096
MAX_CONNECTIONS = 4096  # per listening socket; each has a thread
DEFAULT_NAME = "server.lab"
_PAYLOAD = bytes(range(256)) * (CHUNK // 256)  # not all zeros, so nothing can compress it away
_SAFE_FILE = re.compile(r"[a-z0-9][a-z0-9._-]{0,199}")


class Certificates:
    """SSL contexts per SNI name, issued on first use; the CA is loaded once."""

    def __init__(self, ca: CAFiles, cert_dir: Path, default_names: list[str]) -> None:
        self._issuer = Issuer(ca)
        self._dir = cert_dir
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._key_file = ca.leaf_key
        self._lock = threading.Lock()
        # Contexts by name, least recently used first; at most MAX_CACHED_NAMES (each holds its
        # certificate in memory: no file stays behind per name).
        self._cache: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self.default = self._context(default_names)
        self.default.sni_callback = self._sni_callback

    def _context(self, names: list[str]) -> ssl.SSLContext:
        chain = self._issuer.issue(names)
        first = normalise(names[0])
        stem = first if _SAFE_FILE.fullmatch(first) else hashlib.sha256(first.encode()).hexdigest()
        path = self._dir / f"{stem}.{threading.get_ident()}.pem"
        atomic_write(path, chain, 0o600)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(path, self._key_file)  # ssl reads chains from files only
        finally:
            path.unlink(missing_ok=True)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def context_for(self, name: str) -> ssl.SSLContext:
        key = normalise(name)
        with self._lock:
            ctx = self._cache.get(key)
            if ctx is None:
                ctx = self._cache[key] = self._context([key])
                while len(self._cache) > MAX_CACHED_NAMES:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            return ctx

    def __len__(self) -> int:
        return len(self._cache)

    def _sni_callback(self, sock: Any, server_name: Optional[str], _ctx: ssl.SSLContext) -> None:
        sock.throttle_sni = server_name
        if not server_name:
            return  # no SNI: the default certificate (server.lab and the server's addresses)
        try:
            sock.context = self.context_for(server_name)
        except (ValueError, ssl.SSLError, OSError) as exc:
            sys.stderr.write(f"labserver: no certificate for {server_name!r}: {exc}\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` is answered
    server_version = "throttle-lab/0.1"
    rbufsize = CHUNK
    timeout = 300  # a policed flow can stall for a long time, but not forever

    def version_string(self) -> str:
        return self.server_version

    # -- routes ---------------------------------------------------------------------------------

    def do_POST(self) -> None:
        start = time.monotonic()
        try:
            received = self._discard_body()
        except ValueError as exc:
            self.close_connection = True
            self._send(400, "application/json", json.dumps({"error": str(exc)}).encode() + b"\n")
            return
        seconds = round(time.monotonic() - start, 6)
        body = json.dumps({"received": received, "seconds": seconds}).encode() + b"\n"
        self._send(200, "application/json", body)

    do_PUT = do_POST

    def do_GET(self) -> None:
        self._get(head=False)

    def do_HEAD(self) -> None:
        self._get(head=True)

    def _get(self, head: bool) -> None:
        path = urlsplit(self.path).path
        wanted = requested_size(self.path)
        if isinstance(wanted, str):
            self._send(400, "text/plain", wanted.encode())
        elif wanted is not None:
            self._stream(wanted, head)
        elif (shown := browser_page(path)) is not None:
            status, body = shown
            self._send(status, "text/html; charset=utf-8" if status == 200 else "text/plain", body, head)
        elif path == "/info":
            self._send(200, "application/json", json.dumps(self._info()).encode() + b"\n", head)
        elif path in ("/photo", "/photo.html"):
            self._send(200, "text/html; charset=utf-8", photo_page(), head)
        elif path in ("/", "/index.html"):
            info = self._info()
            page = (
                "<!doctype html><title>throttle lab</title>\n"
                f"<p>throttle lab server. Host: {_html(info['host'])}; SNI: {_html(info['sni'])}; "
                f"you are {_html(info['client'])}.</p>\n"
                "<p>POST a body to any path; GET /bytes/N for N bytes; GET /info for JSON; "
                "<a href=/photo>upload a photo</a>.</p>\n"
            ).encode()
            self._send(200, "text/html; charset=utf-8", page, head)
        else:
            self._send(404, "text/plain", b"not found\n", head)

    # -- helpers --------------------------------------------------------------------------------

    def _info(self) -> dict[str, Any]:
        conn = self.connection
        tls = isinstance(conn, ssl.SSLSocket)
        server = conn.getsockname()
        return {
            "sni": getattr(conn, "throttle_sni", None) if tls else None,
            "host": self.headers.get("Host"),
            "client": self.client_address[0],
            "server": server[0],
            "port": server[1],
            "tls": conn.version() if tls else None,
        }

    def _send(self, code: int, ctype: str, body: bytes, head: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _stream(self, size: int, head: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if head:
            return
        view = memoryview(_PAYLOAD)
        left = size
        while left:
            n = min(left, CHUNK)
            self.wfile.write(view[:n])
            left -= n

    def _discard_body(self) -> int:
        """Read and drop the request body; the byte count. ValueError for a malformed body."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._discard_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return 0
        try:
            n = int(length)
        except ValueError:
            raise ValueError(f"Content-Length {length!r} is not a number") from None
        if n < 0:
            raise ValueError(f"Content-Length {n} is negative")
        self._discard(n)
        return n

    def _discard_chunked(self) -> int:
        total = 0
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise ValueError("chunk size line too long or connection closed")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ValueError(f"bad chunk size line {line[:40]!r}") from None
            if size == 0:
                while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return total
            self._discard(size)
            total += size
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise ValueError("chunk not followed by CRLF")

    def _discard(self, n: int) -> None:
        buf = memoryview(bytearray(CHUNK))
        while n:
            got = self.rfile.readinto(buf[: min(n, CHUNK)])
            if not got:
                raise ConnectionError("the client closed the connection mid-body")
            n -= got

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"{self.client_address[0]} {getattr(self.server, 'scheme', '-')} {format % args}\n")


def requested_size(target: str) -> int | str | None:
    """The size a download route asks for (`/bytes/N`, `/download?size=N`): bytes, an error
    message for a bad size, or None when the target is another route. Both web servers use it."""
    url = urlsplit(target)
    if url.path.startswith("/bytes/"):
        text = url.path[len("/bytes/"):]
    elif url.path == "/download":
        text = parse_qs(url.query).get("size", ["0"])[0]
    else:
        return None
    try:
        size = parse_size(text)
        if not 0 <= size <= MAX_SIZE:
            raise ValueError(f"{size} is out of range")
    except (ValueError, TypeError) as exc:
        return f"bad size {text!r}: {exc}\n"
    return size


# The pages of a browser probe (`throttle.measure.commands.BrowserClient`), served by both web
# servers. Their requests are synchronous, so a headless browser's --dump-dom (which prints the page
# once it has loaded) waits for the transfer; each writes the reply line into #result.
_UPLOAD_SCRIPT = """const body = new Uint8Array(size);
for (let i = 0; i < size; i += 65536) crypto.getRandomValues(body.subarray(i, Math.min(size, i + 65536)));
try {
  const xhr = new XMLHttpRequest();
  xhr.open('POST', '/upload', false);
  xhr.send(body);
  out.textContent = xhr.status === 200 ? xhr.responseText : 'upload failed: HTTP ' + xhr.status;
} catch (e) {
  out.textContent = 'upload failed: ' + e;
}
"""
# x-user-defined maps each byte to one character, so the text's length is the bytes received.
_DOWNLOAD_SCRIPT = """try {
  const xhr = new XMLHttpRequest();
  xhr.open('GET', '/bytes/' + size, false);
  xhr.overrideMimeType('text/plain; charset=x-user-defined');
  const start = performance.now();
  xhr.send();
  const seconds = (performance.now() - start) / 1000;
  out.textContent = xhr.status === 200 ? JSON.stringify({received: xhr.responseText.length, seconds: seconds})
                                       : 'download failed: HTTP ' + xhr.status;
} catch (e) {
  out.textContent = 'download failed: ' + e;
}
"""
_PAGE_SCRIPTS = {"/upload-page/": _UPLOAD_SCRIPT, "/download-page/": _DOWNLOAD_SCRIPT}


def browser_page(path: str) -> tuple[int, bytes] | None:
    """A browser probe's page (`/upload-page/N`, `/download-page/N`): (200, the HTML), or (400, why
    the size is wrong); None for any other path."""
    prefix = next((p for p in _PAGE_SCRIPTS if path.startswith(p)), None)
    if prefix is None:
        return None
    text = path[len(prefix):]
    try:
        size = parse_size(text)
    except ValueError as exc:
        return 400, f"{exc}\n".encode()
    if not 0 <= size <= MAX_PAGE_SIZE:
        return 400, f"a browser page moves at most {MAX_PAGE_SIZE} bytes\n".encode()
    return 200, ("<!doctype html><title>throttle lab</title>\n<pre id=result>running</pre>\n<script>\n"
                 f"const size = {size};\nconst out = document.getElementById('result');\n"
                 f"{_PAGE_SCRIPTS[prefix]}</script>\n").encode()


def photo_page() -> bytes:
    """The upload page for people (`GET /photo`), shipped with the package."""
    from importlib import resources

    return (resources.files("throttle") / "data" / "page" / "photo.html").read_bytes()


def _html(value: Any) -> str:
    import html

    return html.escape(str(value))


class _Listener(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """What both web servers and the sink share: one thread per connection, IPv4 or IPv6 by the
    host given (IPv6 sockets take IPv6 only), and a connection's expected failures logged in one
    line instead of a traceback."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256
    scheme = "-"
    expected_errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)

    def __init__(self, host: str, port: int, handler: type[socketserver.BaseRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__((host, port), handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread for the connection, while fewer than MAX_CONNECTIONS are open; past that the
        connection is closed at once (and said so), never queued without bound."""
        if not self._slots.acquire(blocking=False):
            sys.stderr.write(f"{client_address[0]} {self.scheme}: refused, {MAX_CONNECTIONS} connections open\n")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, self.expected_errors):
            sys.stderr.write(f"{client_address[0]} {self.scheme}: {type(exc).__name__}: {exc}\n")
        else:
            super().handle_error(request, client_address)


class LabServer(_Listener):
    expected_errors = (ConnectionError, TimeoutError, ssl.SSLError)

    def __init__(self, host: str, port: int, certs: Optional[Certificates]) -> None:
        self.certs = certs
        self.scheme = "https" if certs else "http"
        super().__init__(host, port, Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Runs in the connection's own thread, so a slow or throttled handshake blocks nobody.
        if self.certs is None:
            super().finish_request(request, client_address)
            return
        try:
            request.settimeout(30)
            tls = self.certs.default.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            sys.stderr.write(f"{client_address[0]} https handshake failed: {exc}\n")
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


class SinkHandler(socketserver.BaseRequestHandler):
    """Count bytes to EOF, answer `received N`; what the bytes are does not matter (module doc)."""

    timeout = 300  # as Handler: a policed flow can stall for a long time, but not forever

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(self.timeout)
        buf = memoryview(bytearray(CHUNK))
        total = 0
        while True:
            n = sock.recv_into(buf)
            if not n:
                break
            total += n
        sock.sendall(f"received {total}\n".encode())


class SinkServer(_Listener):
    scheme = "sink"

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port, SinkHandler)


def serve(args: argparse.Namespace) -> None:
    ca_dir = Path(args.ca_dir)
    state = Path(args.state_dir)
    ca = CAFiles.in_dir(ca_dir)
    certs = Certificates(ca, state / "certs", [DEFAULT_NAME, *args.address])
    for name in args.name:
        try:
            certs.context_for(name)  # issue the scenario's names ahead of the first handshake
        except (ValueError, ssl.SSLError) as exc:
            sys.stderr.write(f"labserver: no certificate for {name!r}: {exc}\n")
    servers: list[socketserver.BaseServer] = []
    for host in args.listen:
        servers.append(LabServer(host, args.https_port, certs))
        servers.append(LabServer(host, args.http_port, None))
        if args.sink_port:
            servers.append(SinkServer(host, args.sink_port))
    for srv in servers:
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True).start()
    pid_file = Path(args.pid_file) if args.pid_file else state / "labserver.pid"
    atomic_write(pid_file, f"{os.getpid()}\n".encode())
    sys.stderr.write(
        f"labserver: pid {os.getpid()} serving https:{args.https_port} http:{args.http_port} "
        f"sink:{args.sink_port or 'off'} "
        f"on {', '.join(args.listen)}\n"
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while not stop.wait(3600):
            pass
    finally:
        release_pid_file(pid_file)


def release_pid_file(pid_file: Path) -> None:
    """Remove the pid file if it is still this process's (a newer server may have replaced it)."""
    try:
        if pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()
    except OSError:
        pass


def server_arguments(prog: str, pid_file: str) -> argparse.ArgumentParser:
    """The options every lab server takes: its CA, state directory, pid file, addresses, names."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--ca-dir", required=True, help="directory holding ca.pem, ca-key.pem, leaf-key.pem")
    p.add_argument("--state-dir", required=True, help="where the pid file goes")
    p.add_argument("--pid-file", default=None, help=f"default: STATE_DIR/{pid_file}")
    p.add_argument("--listen", action="append", default=None, help="address to bind (repeatable); default: the --address ones")
    p.add_argument("--address", action="append", default=[], help="an address for the no-SNI certificate (repeatable)")
    p.add_argument("--name", action="append", default=[], help="a name to issue a certificate for at start (repeatable)")
    return p


def main(argv: Optional[list[str]] = None) -> None:
    p = server_arguments("python -m throttle.lab.server", "labserver.pid")
    p.add_argument("--https-port", type=int, default=443)
    p.add_argument("--http-port", type=int, default=80)
    p.add_argument("--sink-port", type=int, default=8443, help="the raw byte-counting sink; 0: none")
    args = p.parse_args(argv)
    if args.listen is None:
        # The lab's own addresses only, never every interface of the machine it runs on.
        args.listen = list(args.address)
    if not args.listen:
        p.error("name the addresses to serve on with --address (or --listen)")
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    try:
        serve(args)
    except OSError as exc:
        sys.stderr.write(f"labserver: {exc}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
