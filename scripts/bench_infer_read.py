"""`scripts/bench-infer-read`: reading a capture into flow traces, its time and peak memory, for a
~100 MB and a ~1 GB synthetic capture side by side in one run (each read in a fresh process, so
each peak RSS is its own).

The capture: one long TCP download (half the bytes; every 200th segment lost and sent again, ACKs
every second segment) interleaved with many short TLS connections (handshake, a ClientHello with
SNI, 40 KB down, FIN). Written with struct to a temporary directory and deleted afterwards. A
benchmark, not a test: it prints the numbers and what they mean.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

MSS = 1448
_PAYLOAD = bytes(range(256)) * 6
_TLS_HELLO = (
    b"\x16\x03\x01\x00\x4b\x01\x00\x00\x47\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"
    + b"\x00\x1c\x00\x00\x00\x18\x00\x16\x00\x00\x13" + b"video.example-%04d.com"
)


def _hello(n: int) -> bytes:
    return _TLS_HELLO.replace(b"%04d", b"%04d" % (n % 10000))


def _tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
         payload: bytes, ident: int) -> bytes:
    total = 40 + len(payload)
    return (struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident & 0xFFFF, 0x4000, 64, 6, 0, src, dst)
            + struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 0x50, flags,
                          65535, 0, 0)
            + payload)


def _short_flow(n: int, t: float) -> Iterator[tuple[float, bytes]]:
    client = bytes((10, 1, (n >> 8) & 0xFF, n & 0xFF))
    server = bytes((10, 2, 0, 1 + n % 200))
    port = 20000 + n % 40000
    c, s = 1000, 7000
    hello = _hello(n)
    yield t, _tcp(client, server, port, 443, c, 0, 0x02, b"", 1)
    yield t + 0.01, _tcp(server, client, 443, port, s, c + 1, 0x12, b"", 1)
    yield t + 0.02, _tcp(client, server, port, 443, c + 1, s + 1, 0x10, b"", 2)
    yield t + 0.02, _tcp(client, server, port, 443, c + 1, s + 1, 0x18, hello, 3)
    c += 1 + len(hello)
    for i in range(28):
        yield t + 0.03 + i * 1e-4, _tcp(server, client, 443, port, s + 1 + i * MSS, c, 0x18, _PAYLOAD[:MSS], 2 + i)
        if i % 2:
            yield t + 0.04 + i * 1e-4, _tcp(client, server, port, 443, c, s + 1 + (i + 1) * MSS, 0x10, b"", 4 + i)
    yield t + 0.05, _tcp(server, client, 443, port, s + 1 + 28 * MSS, c, 0x11, b"", 40)


def packets(size: int) -> Iterator[tuple[float, bytes]]:
    """About `size` bytes of packets, in time order (see the module docstring)."""
    client, server = b"\xc6\x12\x00\x02", b"\xc6\x12\x02\x02"
    written = 0
    t = 1_700_000_000.0
    c, s = 5000, 900_000
    yield t, _tcp(client, server, 45000, 443, c, 0, 0x02, b"", 1)
    yield t + 0.05, _tcp(server, client, 443, 45000, s, c + 1, 0x12, b"", 1)
    yield t + 0.05, _tcp(client, server, 45000, 443, c + 1, s + 1, 0x10, b"", 2)
    segment = 0
    flows = 0
    lost: list[int] = []
    while written < size:
        t += 0.0001
        if segment % 200 == 100:
            lost.append(segment)
        if segment % 200 == 150 and lost:
            again = lost.pop(0)
            yield t, _tcp(server, client, 443, 45000, s + 1 + again * MSS, c + 1, 0x18, _PAYLOAD[:MSS], segment)
            written += 1500
        yield t, _tcp(server, client, 443, 45000, s + 1 + segment * MSS, c + 1, 0x18, _PAYLOAD[:MSS], segment)
        written += 1500
        if segment % 2 and not lost:
            yield t + 0.00005, _tcp(client, server, 45000, 443, c + 1, s + 1 + (segment + 1) * MSS, 0x10, b"", segment)
            written += 60
        segment += 1
        if segment % 30 == 0:  # the long flow is about half the bytes
            for when, packet in _short_flow(flows, t):
                yield when, packet
                written += len(packet) + 16
            flows += 1


def write_capture(path: Path, size: int) -> int:
    count = 0
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
        batch = []
        for t, packet in packets(size):
            sec = int(t)
            batch.append(struct.pack("<IIII", sec, int((t - sec) * 1e6), len(packet), len(packet)))
            batch.append(packet)
            count += 1
            if len(batch) > 20000:
                out.write(b"".join(batch))
                batch = []
        out.write(b"".join(batch))
    return count


def _measure(path: str, queue: multiprocessing.Queue[tuple[float, int, int, int, int]]) -> None:
    from throttle.infer.reader import read_traces

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    traces, problems = read_traces([path])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    longest = max((len(trace.sent) for trace in traces), default=0)
    assert not problems, problems
    queue.put((seconds, before, peak, len(traces), longest))


def measure(path: Path) -> tuple[float, int, int, int, int]:
    """(seconds, KB resident after importing, peak KB, traces, packets of the longest) in a new process."""
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[tuple[float, int, int, int, int]] = context.Queue()
    child = context.Process(target=_measure, args=(str(path), queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="capture sizes in MB, comma-separated")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-infer-read-") as tmp:
        for mb in sizes:
            path = Path(tmp) / f"{mb}mb.pcap"
            start = time.perf_counter()
            count = write_capture(path, mb * 1_000_000)
            written = time.perf_counter() - start
            size = path.stat().st_size
            seconds, base, peak, traces, longest = measure(path)
            rows.append((mb, size, count, written, seconds, base, peak, traces, longest))
            path.unlink()
    print(f"{'capture':>9} {'packets':>9} {'traces':>7} {'longest':>8} {'read s':>7} {'MB/s':>6} "
          f"{'RSS at start':>12} {'peak RSS':>9} {'peak - start':>12}")
    for mb, size, count, written, seconds, base, peak, traces, longest in rows:
        print(f"{size / 1e6:>7.0f}MB {count:>9} {traces:>7} {longest:>8} {seconds:>7.1f} {size / 1e6 / seconds:>6.1f} "
              f"{base / 1024:>10.0f}MB {peak / 1024:>7.0f}MB {(peak - base) / 1024:>10.0f}MB")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        print(f"capture x{b[1] / a[1]:.1f}: time x{b[4] / a[4]:.1f}, memory above start x{(b[6] - b[5]) / max(1, a[6] - a[5]):.1f} "
              f"(the traces themselves grow with the packets of each flow; the bytes of packets are never held)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent.parent))
    sys.exit(main())
