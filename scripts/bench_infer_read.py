"""`scripts/bench-infer-read`: `throttle infer`'s reading and fitting of a capture, its time and peak
memory, for synthetic captures side by side in one run (each read in a fresh process, so each peak
RSS is its own), both ways: every trace read first and then fitted (`read_traces` + `fit.infer`,
what `--plot` and two captures together need) and fitted as each connection ends
(`stream.infer_capture`, what one capture gets).

The captures: "many", a ~100 MB and a ~1 GB one of short TLS connections (handshake, a ClientHello
with SNI, 40 KB down, FIN each way), the usual case; and "one", a ~100 MB single TCP download (every 200th
segment lost and sent again, ACKs every second segment), whose per-packet cost shows. Written with
struct to a temporary directory and deleted afterwards. A benchmark, not a test: it prints the
numbers and what they mean.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
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
    yield t + 0.051, _tcp(client, server, port, 443, c, s + 2 + 28 * MSS, 0x11, b"", 50)  # closed both ways
    yield t + 0.052, _tcp(server, client, 443, port, s + 2 + 28 * MSS, c + 1, 0x10, b"", 41)


def packets(size: int, long: bool) -> Iterator[tuple[float, bytes]]:
    """About `size` bytes of packets, in time order: one long download, or short connections."""
    client, server = b"\xc6\x12\x00\x02", b"\xc6\x12\x02\x02"
    written = 0
    t = 1_700_000_000.0
    c, s = 5000, 900_000
    if long:
        yield t, _tcp(client, server, 45000, 443, c, 0, 0x02, b"", 1)
        yield t + 0.05, _tcp(server, client, 443, 45000, s, c + 1, 0x12, b"", 1)
        yield t + 0.05, _tcp(client, server, 45000, 443, c + 1, s + 1, 0x10, b"", 2)
    segment = 0
    flows = 0
    lost: list[int] = []
    while written < size:
        t += 0.0001
        if not long:
            for when, packet in _short_flow(flows, t):
                yield when, packet
                written += len(packet) + 16
            flows += 1
            t += 0.003
            continue
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


def write_capture(path: Path, size: int, long: bool) -> int:
    count = 0
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
        batch = []
        for t, packet in packets(size, long):
            sec = int(t)
            batch.append(struct.pack("<IIII", sec, int((t - sec) * 1e6), len(packet), len(packet)))
            batch.append(packet)
            count += 1
            if len(batch) > 20000:
                out.write(b"".join(batch))
                batch = []
        out.write(b"".join(batch))
    return count


Result = tuple[float, int, int, int, int]  # seconds, KB resident at start, peak KB, flow directions, packets of the longest


def _kb(field: str) -> int:
    """This process's VmRSS or VmHWM (its peak), in KB: kept per address space, so unlike
    ru_maxrss not inherited from the parent that spawned it."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _measure(path: str, streamed: bool, queue: multiprocessing.Queue[Result]) -> None:
    from throttle.infer.fit import infer
    from throttle.infer.reader import read_traces
    from throttle.infer.stream import infer_capture

    before = _kb("VmRSS")
    start = time.perf_counter()
    if streamed:
        infs, problem = infer_capture(path)
        assert problem is None, problem
    else:
        traces, problems = read_traces([path])
        assert not problems, problems
        infs = infer(traces)
    seconds = time.perf_counter() - start
    peak = _kb("VmHWM")
    queue.put((seconds, before, peak, len(infs), max((inf.trace.packets for inf in infs), default=0)))


def measure(path: Path, streamed: bool) -> Result:
    """Reading and fitting the capture in a new process, one way or the other."""
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[Result] = context.Queue()
    child = context.Process(target=_measure, args=(str(path), streamed, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="sizes of the many-connection captures in MB, comma-separated")
    parser.add_argument("--long", type=int, default=100, help="size of the one-connection capture in MB (0: none)")
    args = parser.parse_args()
    cases = [("many", int(x)) for x in args.sizes.split(",")] + ([("one", args.long)] if args.long else [])
    rows: list[tuple[str, int, int, Result, Result]] = []
    with tempfile.TemporaryDirectory(prefix="bench-infer-read-") as tmp:
        for kind, mb in cases:
            path = Path(tmp) / f"{kind}-{mb}mb.pcap"
            count = write_capture(path, mb * 1_000_000, kind == "one")
            size = path.stat().st_size
            rows.append((kind, size, count, measure(path, False), measure(path, True)))
            path.unlink()
    print(f"{'capture':>14} {'packets':>9} {'flows':>6} {'longest':>8} | {'read, then fit':^28} | "
          f"{'fitted as read':^28} | {'time':>5} {'memory':>6}")
    print(f"{'':>14} {'':>9} {'':>6} {'':>8} | {'s':>6} {'MB/s':>6} {'start':>6} {'peak-start':>9} | "
          f"{'s':>6} {'MB/s':>6} {'start':>6} {'peak-start':>9} | {'new/old':>12}")
    for kind, size, count, old, new in rows:
        cells = []
        for seconds, base, peak, _, _ in (old, new):
            cells.append(f"{seconds:>6.1f} {size / 1e6 / seconds:>6.1f} {base / 1024:>4.0f}MB {(peak - base) / 1024:>7.0f}MB")
        print(f"{kind:>5} {size / 1e6:>6.0f} MB {count:>9} {new[3]:>6} {new[4]:>8} | {cells[0]} | {cells[1]} | "
              f"{new[0] / old[0]:>5.2f} {(new[2] - new[1]) / max(1, old[2] - old[1]):>6.2f}")
    many = [row for row in rows if row[0] == "many"]
    if len(many) >= 2:
        a, b = many[0], many[-1]
        for label, x, y in (("read, then fit", a[3], b[3]), ("fitted as read", a[4], b[4])):
            print(f"many x{b[1] / a[1]:.1f} ({label}): time x{y[0] / x[0]:.1f}, "
                  f"memory above start x{(y[2] - y[1]) / max(1, x[2] - x[1]):.1f}")
    for kind, size, count, old, new in rows:
        if kind == "one":
            print(f"one connection: {1024 * (new[2] - new[1]) / count:.0f} B per packet fitted as read, "
                  f"{1024 * (old[2] - old[1]) / count:.0f} B read then fitted (a lossy flow is held to the end: "
                  "it may share a bucket with any other)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent.parent))
    sys.exit(main())
