"""`scripts/bench-parse`: parse speed, printed as ratios measured side by side in one run.

Our ClientHello parser against scapy's TLS layer on the same captured hellos (tests/vectors), the
QUIC Initial parser on the captured QUIC first flights (per Initial, and per Chromium two-datagram
hello through CryptoStream and client_hello), and the engine's cost per packet of an already-decided
flow. A benchmark, not a timed test.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from throttle.engine import Engine, State
from throttle.scenario import load_scenario
from throttle.scenario.library import bundled_path
from throttle.wire.ip import SYN, TCP, UDP, decode
from throttle.wire.pcap import read_packets
from throttle.wire.tls import parse_client_hello

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors"


def _best_rate(fn: Callable[[], object], items: int, seconds: float = 1.0, repeats: int = 5) -> float:
    """Items per second of the best of `repeats` runs of about `seconds` each."""
    loops = 1
    while True:  # calibrate
        t = time.perf_counter()
        for _ in range(loops):
            fn()
        elapsed = time.perf_counter() - t
        if elapsed > seconds / 10:
            break
        loops *= 2
    loops = max(1, int(loops * seconds / 10 / elapsed * 10))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, time.perf_counter() - t)
    return loops * items / best


def _hellos() -> list[tuple[str, bytes]]:
    """The opener's byte stream of every captured TLS vector (the whole ClientHello)."""
    out = []
    for path in sorted(VECTORS.glob("*.pcap")):
        stream = b""
        opener = None
        for _, pkt in read_packets(path):
            d = decode(pkt)
            if d is None or d.proto != TCP:
                continue
            if opener is None and d.flags & SYN:
                opener = d.src
            if d.src == opener:
                stream += pkt[d.payload_offset : d.payload_end]
        if stream[:1] == b"\x16":
            # Both parsers get exactly the ClientHello's records, nothing after them.
            hello = parse_client_hello(stream)
            if hello is not None:
                out.append((path.name, stream[: hello.length]))
    return out


def _scapy_sni(data: bytes) -> str | None:
    from scapy.layers.tls.extensions import TLS_Ext_ServerName  # type: ignore[import-untyped]
    from scapy.layers.tls.record import TLS  # type: ignore[import-untyped]

    record = TLS(data)
    for msg in record.msg:
        for ext in getattr(msg, "ext", None) or []:
            if isinstance(ext, TLS_Ext_ServerName):
                return ext.servernames[0].servername.decode()
    return None


def bench_parse() -> int:
    hellos = _hellos()
    if not hellos:
        print(f"no captured hellos under {VECTORS}: run tests/vectors/capture-vectors", file=sys.stderr)
        return 2
    try:
        import scapy  # noqa: F401
    except ImportError:
        print("scapy is missing: run scripts/setup", file=sys.stderr)
        return 2
    print(f"ClientHello parsing, {len(hellos)} captured hellos ({', '.join(n for n, _ in hellos)})")
    for name, data in hellos:  # both must agree before either is timed
        ours = parse_client_hello(data)
        theirs = _scapy_sni(data)
        assert ours is not None and ours.sni == theirs, (name, ours, theirs)
    streams = [d for _, d in hellos]

    def run_ours() -> None:
        for d in streams:
            parse_client_hello(d)

    def run_scapy() -> None:
        for d in streams:
            _scapy_sni(d)

    ours_rate = _best_rate(run_ours, len(streams))
    scapy_rate = _best_rate(run_scapy, len(streams), seconds=2.0, repeats=3)
    print(f"  throttle.wire.tls   {ours_rate:12,.0f} parses/s  ({1e6 / ours_rate:8.2f} µs each)")
    print(f"  scapy TLS      {scapy_rate:12,.0f} parses/s  ({1e6 / scapy_rate:8.2f} µs each)")
    ratio = ours_rate / scapy_rate
    print(f"  ratio          {ratio:12.1f} x scapy   (target >= 100): {'ok' if ratio >= 100 else 'BELOW TARGET'}")

    _bench_quic(1e6 / ours_rate)

    per_packet = _decided_flow_cost()
    print("\nEngine, a packet of an already-decided flow (the bypass path)")
    print(f"  cost           {per_packet:12.2f} µs/packet   (target <= 5): {'ok' if per_packet <= 5 else 'ABOVE TARGET'}")
    return 0


def _quic_flights() -> list[tuple[str, list[bytes]]]:
    """The client's UDP payloads to port 443 of every captured QUIC vector."""
    out = []
    for path in sorted(VECTORS.glob("*quic*.pcap")):
        datagrams = []
        for _, pkt in read_packets(path):
            d = decode(pkt)
            if d is not None and d.proto == UDP and d.dport == 443:
                datagrams.append(pkt[d.payload_offset : d.payload_offset + d.payload_length])
        if datagrams:
            out.append((path.name, datagrams))
    return out


def _bench_quic(tls_us: float) -> None:
    from throttle.wire import quic

    flights = _quic_flights()
    if not flights:
        print(f"\nno captured QUIC vectors under {VECTORS}: run tests/vectors/capture-vectors")
        return
    datagrams = [d for _, flight in flights for d in flight]
    initials = sum(len(quic.parse_initials(d)) for d in datagrams)
    print(f"\nQUIC Initial parsing, {len(datagrams)} captured datagrams, {initials} Initials "
          f"({', '.join(n for n, _ in flights)})")
    parse = quic.parse_initials
    clear = quic._keys.cache_clear

    def run_warm() -> None:
        for d in datagrams:
            parse(d)

    def run_cold() -> None:  # every datagram a new connection: key derivation and cipher setup included
        for d in datagrams:
            clear()
            parse(d)

    warm = 1e6 / _best_rate(run_warm, initials)
    cold = 1e6 / _best_rate(run_cold, initials)
    print(f"  parse_initials       {warm:8.2f} µs per Initial (keys cached: header protection, AEAD, frames)")
    print(f"  parse_initials       {cold:8.2f} µs per Initial (a new DCID: Initial keys derived first)")
    two = [flight for name, flight in flights if name.startswith("chromium") and len(flight) == 2]
    if two:
        flight = two[0]

        def run_hello() -> None:
            stream = quic.CryptoStream()
            for d in flight:
                for initial in parse(d):
                    for offset, data in initial.crypto:
                        stream.add(offset, data)
            quic.client_hello(stream.contiguous())

        hello = 1e6 / _best_rate(run_hello, 1)
        print(f"  two-datagram hello   {hello:8.2f} µs per Chromium hello (2 x parse_initials + CryptoStream + client_hello, keys cached)")
    print(f"  TLS ClientHello      {tls_us:8.2f} µs per hello (throttle.wire.tls, above), for comparison")


def _decided_flow_cost() -> float:
    from scapy.all import IP  # type: ignore[import-untyped]
    from scapy.all import TCP as ScapyTCP

    scenario = load_scenario(bundled_path("twitter-2021-03-10"))
    engine = Engine(scenario.model, scenario.rules)
    # 200 decided flows, so the lookup is not into a one-entry table; packets of 1500 bytes.
    packets = []
    for i in range(200):
        syn = bytes(IP(src="198.18.0.2", dst="198.18.1.2") / ScapyTCP(sport=20000 + i, dport=443, flags="S"))
        engine.process(syn, 0.0)
        data = bytes(IP(src="198.18.0.2", dst="198.18.1.2") / ScapyTCP(sport=20000 + i, dport=443, flags="A", seq=1) / (b"\xaa" * 1460))
        engine.process(data, 0.0)  # an unparseable first packet of >= 101 bytes: decided, passed
        packets.append(data)
    assert all(f.state == State.PASSED for f in engine.flows())
    process = engine.process

    def run() -> None:
        for p in packets:
            process(p, 1.0)

    return 1e6 / _best_rate(run, len(packets))


if __name__ == "__main__":
    sys.exit(bench_parse())
