"""The raw TLS client: a plan's segments, then junk, over a plain TCP socket to the lab's sink.

It connects, sends the disguised ClientHello (`plans.plan`), streams `size` bytes of junk in large
writes, shuts down its write side and reads the sink's `received N`. Past the hello nothing needs
to be TLS: the 2021 device judges a flow by its hello alone (docs/incidents.md §3, §16).

The time is measured from connect to the reply, so `bytes / seconds` is the goodput the censor
allowed. A timeout, a refusal or a reset is an outcome (`Result.ok` False), not an exception.
Given `local_ports`, it takes its port from that range, as curl's --local-port does, so that
captures (`throttle bench`) can tell its connection from the others.
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from throttle.lab.evasion.plans import Segment, segment_count
from throttle.lab.lines import DONE_EVENT

__all__ = ["Result", "run"]

CHUNK = 65536  # bytes per write of junk
DEFAULT_MSS = 1460
_JUNK = os.urandom(CHUNK)  # random once, then repeated: nothing on the path can compress it
_REPLY = re.compile(rb"received (\d+)\n")
_TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in Linux's struct tcp_info

Progress = Callable[[int, float], None]  # (bytes acknowledged, seconds since connect)


@dataclass(frozen=True, slots=True)
class Result:
    ok: bool
    bytes: int  # sent and acknowledged (all of them when ok): hello_bytes + size
    received: Optional[int]  # what the sink counted; None without a reply
    seconds: float  # from connect to the reply (or to the failure)
    hello_bytes: int  # what the trick sent before the junk
    segments_planned: int  # TCP segments the trick takes on the wire, at the connection's MSS
    error: Optional[str] = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": DONE_EVENT, "ok": self.ok, "bytes": self.bytes, "received": self.received,
                               "seconds": round(self.seconds, 6), "hello_bytes": self.hello_bytes,
                               "segments_planned": self.segments_planned}
        if self.error is not None:
            out["error"] = self.error
        return out


class _Clock:
    """The deadline, and a progress report every `interval` seconds while waiting on the socket."""

    def __init__(self, start: float, timeout: float, total: int, progress: Optional[Progress], interval: float) -> None:
        self.start = start
        self.deadline = start + timeout
        self.total = total
        self.progress = progress
        self.interval = interval
        self.next_report = start + interval if progress else float("inf")
        self.sock: Optional[socket.socket] = None
        self.written = 0

    def acked(self) -> int:
        """Bytes the server has acknowledged (TCP_INFO; the SYN counts one); else those written."""
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)  # type: ignore[union-attr]
        except (OSError, AttributeError):
            return self.written
        if len(info) < _TCPI_BYTES_ACKED + 8:
            return self.written
        acked: int = struct.unpack_from("=Q", info, _TCPI_BYTES_ACKED)[0]
        return max(0, min(self.total, acked - 1))

    def wait(self, write: bool) -> None:
        """Block until the socket is ready; report progress on time; TimeoutError at the deadline."""
        while True:
            now = time.monotonic()
            if now >= self.next_report:
                self.progress(self.acked(), now - self.start)  # type: ignore[misc]
                while self.next_report <= now:
                    self.next_report += self.interval
            if now >= self.deadline:
                raise TimeoutError
            assert self.sock is not None
            fds = [self.sock]
            r, w, _ = select.select([] if write else fds, fds if write else [], [], min(self.deadline, self.next_report) - now)
            if r or w:
                return

    def pause(self, seconds: float) -> None:
        time.sleep(max(0.0, min(seconds, self.deadline - time.monotonic())))


def _send(clock: _Clock, data: memoryview) -> None:
    sock = clock.sock
    assert sock is not None
    while data:
        clock.wait(write=True)
        try:
            n = sock.send(data)
        except BlockingIOError:
            continue
        data = data[n:]
        clock.written += n


def _transfer(clock: _Clock, sock: socket.socket, segments: tuple[Segment, ...], size: int) -> bytes:
    """The plan, the junk, the shutdown; the sink's reply."""
    for segment in segments:
        _send(clock, memoryview(segment.data))
        clock.pause(segment.pause)
    junk = memoryview(_JUNK)
    left = size
    while left:
        offset = (size - left) % CHUNK
        n = min(CHUNK - offset, left)
        _send(clock, junk[offset : offset + n])
        left -= n
    sock.shutdown(socket.SHUT_WR)
    reply = b""
    while len(reply) < 256:
        clock.wait(write=False)
        try:
            chunk = sock.recv(256)
        except BlockingIOError:
            continue
        if not chunk:
            break
        reply += chunk
    return reply


def _connect(address: str, port: int, timeout: float, local_ports: Optional[tuple[int, int]]) -> socket.socket:
    """A connected socket; from the first port of `local_ports` that is free for this peer."""
    if local_ports is None:
        return socket.create_connection((address, port), timeout=timeout)
    lo, hi = local_ports
    for local in range(lo, hi):
        try:
            return socket.create_connection((address, port), timeout=timeout, source_address=("", local))
        except OSError as exc:
            # in use, or its last connection to this peer still in TIME_WAIT: the next port
            if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                raise
    return socket.create_connection((address, port), timeout=timeout, source_address=("", hi))


def run(address: str, port: int, segments: tuple[Segment, ...], size: int, *, timeout: float = 60.0,
        progress: Optional[Progress] = None, interval: float = 0.5,
        local_ports: Optional[tuple[int, int]] = None) -> Result:
    """Send `segments`, then `size` bytes of junk, to the sink at address:port; see the module doc."""
    hello_bytes = sum(len(s.data) for s in segments)
    total = hello_bytes + size
    start = time.monotonic()
    clock = _Clock(start, timeout, total, progress, interval)
    mss = DEFAULT_MSS
    reply, error = b"", None
    sock: Optional[socket.socket] = None
    try:
        sock = clock.sock = _connect(address, port, timeout, local_ports)
        # No Nagle: each write of the plan leaves at once, as its own segment.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mss = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) or DEFAULT_MSS
        sock.setblocking(False)
        reply = _transfer(clock, sock, segments, size)
    except TimeoutError:
        error = f"timed out after {timeout:g} s with {clock.acked()} of {total} bytes acknowledged"
    except OSError as exc:
        error = exc.strerror or str(exc)
    seconds = time.monotonic() - start
    acked = clock.acked()
    if sock is not None:
        sock.close()
    planned = segment_count(segments, mss)
    if error is not None:
        return Result(False, acked, None, seconds, hello_bytes, planned, error)
    match = _REPLY.fullmatch(reply)
    if match is None:
        return Result(False, acked, None, seconds, hello_bytes, planned, f"unexpected reply {reply[:60]!r}")
    received = int(match.group(1))
    if received != total:
        return Result(False, acked, received, seconds, hello_bytes, planned,
                      f"the server received {received} of {total} bytes")
    return Result(True, total, received, seconds, hello_bytes, planned)
