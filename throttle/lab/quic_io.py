"""QUIC I/O shared by the lab's HTTP/3 server (`throttle.lab.h3`) and the QUIC probe's client
(`throttle.lab.h3probe`): UDP sockets, `Datagrams` (a socket on the event loop, read in batches),
`Endpoint` (one aioquic connection driven by datagrams and its timer), and `configuration` (the
settings both ends share, with what a writer needs to know about what was sent).

aioquic is sans-I/O: datagrams and the clock go in, datagrams, a timer and events come out. Only
its public API is used here. It has no public backpressure (`send_stream_data` buffers whatever it
is given), so the configuration of an end that writes bodies carries a `quic_logger` (the qlog
hook aioquic offers) that keeps, of all the events it is told, only the highest stream offset sent:
`Endpoint.unsent` is then the part of a stream's body not yet sent even once, and writers keep it
under SEND_AHEAD.

aioquic's asyncio layer reads one datagram per event-loop turn and answers each alone; `Datagrams`
reads all that wait and a connection answers the batch once, which doubles the throughput.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

if TYPE_CHECKING:
    from aioquic.h3.connection import H3Connection
    from aioquic.h3.events import H3Event
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.events import QuicEvent
    from aioquic.quic.logger import QuicLogger

DATAGRAM_SIZE = 1350  # QUIC payload per datagram, as common clients use (fits IPv4 and IPv6 at MTU 1500)
CONGESTION = "cubic"  # as the lab's TCP (throttle.lab.layout.CONGESTION_CONTROL)
SEND_AHEAD = 256 * 1024  # body bytes a stream may have been given but not yet sent once
PROGRESS_HEADER = b"x-throttle-progress"  # an upload asks the lab's HTTP/3 server to report progress
SOCKET_BUFFER = 4 << 20
READ_BATCH = 64  # datagrams read per wake-up, then answered together

Address = Any  # an asyncio datagram address: (host, port) or (host, port, flowinfo, scope_id)


def configuration(track_sent: bool = True, **settings: Any) -> QuicConfiguration:
    """A QuicConfiguration for one connection (`settings` as QuicConfiguration takes them), with
    the lab's datagram size and congestion control and, with `track_sent`, the log that
    `Endpoint.unsent` reads. The log costs some CPU on every packet (aioquic builds its entries),
    so an end that writes no bodies (a download's client) goes without."""
    from aioquic.quic.configuration import QuicConfiguration

    return QuicConfiguration(max_datagram_size=DATAGRAM_SIZE, congestion_control_algorithm=CONGESTION,
                             quic_logger=_sent_log_class()() if track_sent else None, **settings)


class SentOffsets:
    """Per stream, the end of the highest byte range sent so far (retransmissions lie below it)."""

    def __init__(self) -> None:
        self.highest: dict[int, int] = {}
        self.watched: set[int] = set()  # only the streams a writer asks about: nothing grows unasked

    def packet_sent(self, frames: list[dict[str, Any]]) -> None:
        for frame in frames:
            if frame.get("frame_type") == "stream" and frame["stream_id"] in self.watched:
                end = frame["offset"] + frame["length"]
                if end > self.highest.get(frame["stream_id"], 0):
                    self.highest[frame["stream_id"]] = end


@functools.cache
def _sent_log_class() -> type[QuicLogger]:
    """aioquic's logger classes, subclassed here (not at import: aioquic is imported only where
    it is used) to record sent stream frames and keep nothing else."""
    from aioquic.quic.logger import QuicLogger, QuicLoggerTrace
    from aioquic.quic.packet import QuicPacketType

    class SentTrace(QuicLoggerTrace):
        def __init__(self, offsets: SentOffsets, *, is_client: bool, odcid: bytes) -> None:
            super().__init__(is_client=is_client, odcid=odcid)
            self.offsets = offsets

        def log_event(self, *, category: str, event: str, data: dict[str, Any]) -> None:
            if event == "packet_sent":
                self.offsets.packet_sent(data["frames"])

        # What aioquic has encoded for the log on every packet, and this log never reads.
        def encode_ack_frame(self, ranges: Iterable[range], delay: float) -> dict[str, Any]:
            return {}

        def encode_padding_frame(self) -> dict[str, Any]:
            return {}

        def encode_ping_frame(self) -> dict[str, Any]:
            return {}

        def encode_max_stream_data_frame(self, maximum: int, stream_id: int) -> dict[str, Any]:
            return {}

        def encode_connection_limit_frame(self, frame_type: int, maximum: int) -> dict[str, Any]:
            return {}

        def encode_http3_data_frame(self, length: int, stream_id: int) -> dict[str, Any]:
            return {}

        def encode_time(self, seconds: float) -> float:
            return 0.0

        def packet_type(self, packet_type: QuicPacketType) -> str:
            return ""

    class SentLog(QuicLogger):
        """The log of one connection (a configuration serves one connection here)."""

        def __init__(self) -> None:
            super().__init__()
            self.offsets = SentOffsets()

        def start_trace(self, is_client: bool, odcid: bytes) -> QuicLoggerTrace:
            return SentTrace(self.offsets, is_client=is_client, odcid=odcid)

        def end_trace(self, trace: QuicLoggerTrace) -> None:
            pass  # nothing was kept

    return SentLog


def socket_for(host: str, port: int, connect: bool = False,
               local_ports: tuple[int, int] | None = None) -> socket.socket:
    """A UDP socket bound to (or, for a client, connected to) `host`; IPv6 sockets take IPv6 only.
    A client given `local_ports` (lo, hi) takes the first free port of that range, as curl's
    --local-port does, so that captures can tell its datagrams apart."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)  # root: past rmem_max
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if connect and local_ports is not None:
            for local in range(local_ports[0], local_ports[1] + 1):
                try:
                    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", local))
                    break
                except OSError:
                    if local == local_ports[1]:
                        raise
        if connect:
            sock.connect((host, port))
        else:
            sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Sender(Protocol):
    def sendto(self, data: bytes, addr: Address = None, /) -> None: ...

    def get_extra_info(self, name: str, default: Any = None, /) -> Any: ...


class Datagrams:
    """A non-blocking UDP socket on the event loop. Each wake-up reads every datagram waiting (up to
    READ_BATCH) and hands them over together, so a connection takes in a burst and answers it once:
    asyncio's datagram transport reads one datagram per loop turn, and each would be answered
    (acknowledged, packed, encrypted) alone, which costs a pure-Python QUIC stack most of its time."""

    def __init__(self, sock: socket.socket, on_batch: Callable[[list[tuple[bytes, Address]]], None],
                 on_error: Callable[[OSError], None]) -> None:
        self.sock = sock
        self._on_batch = on_batch
        self._on_error = on_error
        self._peer = sock.getpeername() if _connected(sock) else None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        batch: list[tuple[bytes, Address]] = []
        for _ in range(READ_BATCH):
            try:
                batch.append(self.sock.recvfrom(65535))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # a connected socket's ICMP errors (port unreachable) arrive here
                self._on_error(exc)
                break
        if batch:
            self._on_batch(batch)

    def sendto(self, data: bytes, addr: Address = None, /) -> None:
        try:
            if self._peer is not None:
                self.sock.send(data)
            else:
                self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            pass  # a full socket buffer drops the datagram, as a network may; QUIC sends it again
        except OSError as exc:
            self._on_error(exc)

    def get_extra_info(self, name: str, default: Any = None, /) -> Any:
        return self._peer if name == "peername" else default

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


class Endpoint:
    """One aioquic `QuicConnection` driven over a UDP socket (`Datagrams`, or any `Sender`).

    `take` and the timer feed it; `pump` hands its events to `quic_event`/`h3_event`, lets
    `before_send` write more body data, sends what it has and re-arms the timer."""

    def __init__(self, quic: QuicConnection, transport: Sender) -> None:
        self.quic = quic
        self.h3: Optional[H3Connection] = None
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timer_at: Optional[float] = None
        self.ended = False
        offsets = getattr(quic.configuration.quic_logger, "offsets", None)
        self._sent = offsets if isinstance(offsets, SentOffsets) else None

    def take(self, data: bytes, addr: Address) -> None:
        """One datagram in; `pump` once a batch is in."""
        self.quic.receive_datagram(data, addr, now=self.loop.time())

    def receive(self, data: bytes, addr: Address) -> None:
        self.take(data, addr)
        self.pump()

    def pump(self) -> None:
        from aioquic.quic.events import ConnectionTerminated

        while (event := self.quic.next_event()) is not None:
            self.quic_event(event)
            if isinstance(event, ConnectionTerminated):
                self.ended = True
            elif self.h3 is not None:
                for h3_event in self.h3.handle_event(event):
                    self.h3_event(h3_event)
        if not self.ended:
            self.before_send()
        for data, addr in self.quic.datagrams_to_send(now=self.loop.time()):
            self.transport.sendto(data, addr)
        at = None if self.ended else self.quic.get_timer()
        if at != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(at, self._on_timer) if at is not None else None
            self._timer_at = at
        if self.ended:
            self.finished()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.quic.handle_timer(now=self.loop.time())
        self.pump()

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    def unsent(self, stream_id: int, written: int) -> int:
        """Bytes of the `written` ones given to a stream that have not been sent even once.

        Writing only while this is small keeps a stream's buffer to SEND_AHEAD plus what is in
        flight (the congestion window, and lost data awaiting its retransmission). `written`
        counts body bytes, a few bytes short of the stream offset (frame headers): the estimate
        errs on the small side. 0 when the connection's configuration has no sent log (one not
        made by `configuration`): then nothing holds a writer back."""
        if self._sent is None:
            return 0
        self._sent.watched.add(stream_id)
        return max(0, written - self._sent.highest.get(stream_id, 0))

    def forget(self, stream_id: int) -> None:
        """A stream nobody will write on any more: its sent offset is no longer kept."""
        if self._sent is not None:
            self._sent.watched.discard(stream_id)
            self._sent.highest.pop(stream_id, None)

    # -- what subclasses add -------------------------------------------------------------------------

    def quic_event(self, event: QuicEvent) -> None:
        pass

    def h3_event(self, event: H3Event) -> None:
        pass

    def before_send(self) -> None:
        pass

    def finished(self) -> None:
        self.stop_timer()
