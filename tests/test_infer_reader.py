"""throttle.infer.reader: crafted captures of known losses, names, resets and vantage points."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from scapy.all import IP, TCP, UDP, Ether, IPv6, raw  # type: ignore[import-untyped]
from scapy.utils import wrpcapng  # type: ignore[import-untyped]

from tests.packets import python_hello, quic_initials
from throttle.infer.reader import read_traces
from throttle.infer.trace import FlowTrace, Inference

CLIENT, SERVER = "198.18.0.2", "198.18.2.2"
CLIENT6, SERVER6 = "fd00::2", "fd00:2::2"
ONE_WAY = 0.025
ACK_DELAY = 0.00005  # the client's ACK leaves this long after the data arrived
MSS = 1000


def write_pcap(path: Path, packets: list[tuple[float, bytes]]) -> Path:
    """A classic pcap of raw IP packets (LINKTYPE_RAW)."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)]
    for t, data in packets:
        sec = int(t)
        out.append(struct.pack("<IIII", sec, round((t - sec) * 1e6), len(data), len(data)) + data)
    path.write_bytes(b"".join(out))
    return path


def write_pcapng(path: Path, packets: list[tuple[float, bytes]]) -> Path:
    frames = []
    for t, data in packets:
        frame = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02",
                      type=0x0800 if data[0] >> 4 == 4 else 0x86DD) / data
        frame.time = t
        frames.append(frame)
    wrpcapng(str(path), frames)
    return path


@dataclass
class Transfer:
    """A TLS download over one TCP connection, as packets seen at the client and at the server.

    The server sends `segments` segments of MSS bytes; those in `lost` vanish between the two
    captures and are sent again after the duplicate ACKs. The ClientHello goes in two segments."""

    segments: int = 20
    lost: tuple[int, ...] = (3, 7, 8)
    v6: bool = False
    name: str = "pbs.twimg.com"
    rst: tuple[int, int] | None = None  # an injected RST "from the server": (TTL, IP ID)
    timestamps: bool = False  # TCP timestamps (RFC 7323) on every packet, in milliseconds
    t0: float = 1_700_000_000.0
    at_client: list[tuple[float, bytes]] = field(default_factory=list)
    at_server: list[tuple[float, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ip_id = [100, 5000]
        self.now = 0.0
        self.heard: tuple[list[tuple[float, int]], list[tuple[float, int]]] = ([], [])  # (when, TSval) each side got
        self._build()

    def _packet(self, from_client: bool, seq: int, ack: int, flags: str, payload: bytes = b"",
                options: list[tuple[str, object]] | None = None, ttl: int | None = None,
                ip_id: int | None = None) -> bytes:
        side = 0 if from_client else 1
        addrs = (CLIENT6, SERVER6) if self.v6 else (CLIENT, SERVER)
        src, dst = addrs if from_client else addrs[::-1]
        sport, dport = (40000, 443) if from_client else (443, 40000)
        hops = ttl if ttl is not None else (64 if from_client else 52)
        if self.v6:
            net = IPv6(src=src, dst=dst, hlim=hops)
        else:
            if ip_id is None:
                ip_id = self.ip_id[side]
                self.ip_id[side] += 1
            net = IP(src=src, dst=dst, ttl=hops, id=ip_id)
        options = list(options or [])
        if self.timestamps:
            echo = max((ts for when, ts in self.heard[side] if when <= self.now), default=0)
            options.append(("Timestamp", (int(self.now * 1000), echo)))
        segment = TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, options=options)
        return raw(net / segment / payload) if payload else raw(net / segment)

    def _send(self, t: float, from_client: bool, *fields: object, lost: bool = False, **options: object) -> None:
        """A packet (the fields of `_packet`) sent at `t`, the sender's time; the other side sees it
        ONE_WAY later, unless lost."""
        self.now = t
        packet = self._packet(from_client, *fields, **options)  # type: ignore[arg-type]
        if not lost:
            self.heard[1 if from_client else 0].append((t + ONE_WAY, int(t * 1000)))
        here, there = (self.at_client, self.at_server) if from_client else (self.at_server, self.at_client)
        here.append((self.t0 + t, packet))
        if not lost:
            there.append((self.t0 + t + ONE_WAY, packet))

    def _build(self) -> None:
        c_isn, s_isn = 1000, 900_000
        self._send(0.0, True, c_isn, 0, "S", options=[("MSS", 1460)])
        self._send(0.025, False, s_isn, c_isn + 1, "SA", options=[("MSS", MSS)])
        self._send(0.0501, True, c_isn + 1, s_isn + 1, "A")
        hello = python_hello(self.name)
        half = len(hello) // 2
        self._send(0.0502, True, c_isn + 1, s_isn + 1, "PA", hello[:half])
        self._send(0.0512, True, c_isn + 1 + half, s_isn + 1, "PA", hello[half:])
        c_next = c_isn + 1 + len(hello)
        base = s_isn + 1
        received: set[int] = set()
        for i in range(self.segments):
            t = 0.1 + i * 0.001
            lost = i in self.lost
            self._send(t, False, base + i * MSS, c_next, "PA", bytes([i]) * MSS, lost=lost)
            if not lost:
                received.add(i)
                self._ack(t + ONE_WAY + ACK_DELAY, received, base, c_next)
        t = 0.1 + self.segments * 0.001 + 0.05
        for n, i in enumerate(self.lost):
            self._send(t + n * 0.001, False, base + i * MSS, c_next, "PA", bytes([i]) * MSS)
            received.add(i)
            self._ack(t + n * 0.001 + ONE_WAY + ACK_DELAY, received, base, c_next)
        end = t + 0.01
        if self.rst is not None:
            ttl, ip_id = self.rst
            packet = self._packet(False, base + self.segments * MSS, c_next, "R", ttl=ttl, ip_id=ip_id)
            self.at_client.append((self.t0 + end + ONE_WAY, packet))  # injected on the path: the server never sent it
        else:
            self._send(end, False, base + self.segments * MSS, c_next, "FA")
        self.at_client.sort(key=lambda item: item[0])
        self.at_server.sort(key=lambda item: item[0])

    def _ack(self, t: float, received: set[int], base: int, c_next: int) -> None:
        """The client's ACK (with SACK blocks) of what it holds, sent at client time `t`."""
        cumulative = 0
        while cumulative in received:
            cumulative += 1
        blocks: list[int] = []
        i = cumulative
        while i < self.segments:
            if i in received:
                j = i
                while j in received:
                    j += 1
                blocks += [base + i * MSS, base + j * MSS]
                i = j
            else:
                i += 1
        options: list[tuple[str, object]] = [("SAck", tuple(blocks[:6]))] if blocks else []
        self._send(t, True, c_next, base + cumulative * MSS, "A", options=options)


def only(traces: list[FlowTrace], direction: str) -> FlowTrace:
    found = [t for t in traces if t.direction == direction]
    assert len(found) == 1, [t.key for t in traces]
    return found[0]


def read(*paths: Path) -> list[FlowTrace]:
    traces, problems = read_traces(paths)
    assert problems == []
    return traces


# --- one capture ---------------------------------------------------------------------------


def test_at_the_server_a_download_loses_what_it_sends_again(tmp_path: Path) -> None:
    x = Transfer()
    down = only(read(write_pcap(tmp_path / "s.pcap", x.at_server)), "download")
    assert down.vantage == "sender" and not down.started_mid_flow and not down.matched
    assert (down.client, down.server, down.transport) == (f"{CLIENT}:40000", f"{SERVER}:443", "tcp")
    assert (down.server_name, down.name_source) == ("pbs.twimg.com", "tls")
    assert [(loss.start, loss.length) for loss in down.losses] == [(i * MSS, MSS) for i in x.lost]
    assert [round(loss.t - x.t0, 6) for loss in down.losses] == [round(0.1 + i * 0.001, 6) for i in x.lost]
    assert all(loss.wire == MSS + 40 for loss in down.losses)
    assert down.payload == down.delivered == x.segments * MSS and down.fin
    assert len(down.sent) == x.segments + len(x.lost)
    assert sum(s.retransmission for s in down.sent) == len(x.lost)
    assert (down.mss, down.header_bytes) == (MSS, 40)
    # at the server the handshake's round trip is SYN/ACK -> ACK; this receiver acks every segment
    # alone, and an ACK of one segment may have waited for the delayed-ACK timer, so data -> ACK
    # gives no sample (an ACK covering two segments or more does)
    assert down.base_rtt == pytest.approx(2 * ONE_WAY, abs=2e-4)
    assert len(down.rtt) == 1 and all(s == pytest.approx(2 * ONE_WAY, abs=1e-4) for _, s in down.rtt)
    assert down.hello_at == pytest.approx(x.t0 + 0.0752) and down.handshake == pytest.approx(0.0248, abs=1e-5)
    up = only(read(write_pcap(tmp_path / "s.pcap", x.at_server)), "upload")
    assert up.vantage == "receiver" and up.losses == [] and up.payload == len(python_hello("pbs.twimg.com"))


def test_at_the_client_the_same_download_shows_the_same_losses_as_holes(tmp_path: Path) -> None:
    x = Transfer()
    down = only(read(write_pcap(tmp_path / "c.pcap", x.at_client)), "download")
    assert down.vantage == "receiver"
    assert [(loss.start, loss.length) for loss in down.losses] == [(i * MSS, MSS) for i in x.lost]
    # each hole at the arrival of the first packet beyond it
    assert [round(loss.t - x.t0, 6) for loss in down.losses] == [0.129, 0.134, 0.134]
    assert all(loss.wire == MSS + 40 for loss in down.losses)
    assert sum(s.retransmission for s in down.sent) == 0  # the retransmissions filled holes
    assert down.base_rtt == pytest.approx(2 * ONE_WAY, abs=2e-4)
    assert down.hello_at == pytest.approx(x.t0 + 0.0502) and down.handshake == pytest.approx(0.0748, abs=1e-5)
    assert only(read(write_pcap(tmp_path / "c.pcap", x.at_client)), "upload").vantage == "sender"
    # the ACKs are recorded where they change something: cumulative or SACK
    assert down.acks[-1].acked == x.segments * MSS and any(a.sack for a in down.acks)


def test_at_the_receiver_timestamps_echoed_by_the_data_give_round_trips(tmp_path: Path) -> None:
    """The client's ACK sends TSval X; the first data segment echoing X arrives a round trip later
    (or more: this server sends on a timer, not on the ACKs)."""
    x = Transfer(lost=(), timestamps=True, segments=120)
    down = only(read(write_pcap(tmp_path / "c.pcap", x.at_client)), "download")
    assert down.vantage == "receiver"
    data_samples = [s for t, s in down.rtt if t > x.t0 + 0.1]
    assert len(data_samples) > 20 and min(data_samples) >= 2 * ONE_WAY - 1e-4
    assert sorted(data_samples)[len(data_samples) // 2] < 2 * ONE_WAY + 0.002


def test_at_the_receiver_a_lost_tail_shows_in_the_senders_ip_ids(tmp_path: Path) -> None:
    """The last two segments are lost: no later packet opens a hole, but the server numbers its
    packets, and the retransmissions come with IDs two past the last one seen."""
    x = Transfer(lost=(18, 19))
    down = only(read(write_pcap(tmp_path / "c.pcap", x.at_client)), "download")
    assert down.vantage == "receiver"  # no hole, nothing sent twice: the handshake places the capture
    assert [(loss.start, loss.length) for loss in down.losses] == [(18 * MSS, MSS), (19 * MSS, MSS)]
    at_server = only(read(write_pcap(tmp_path / "s.pcap", x.at_server)), "download")
    assert [(loss.start, loss.length) for loss in at_server.losses] == [(18 * MSS, MSS), (19 * MSS, MSS)]
    # IPv6 has no IDs: the tail cannot be seen from the receiver's side
    assert only(read(write_pcap(tmp_path / "c6.pcap", Transfer(v6=True, lost=(18, 19)).at_client)), "download").losses == []


def test_without_loss_the_handshake_places_the_capture(tmp_path: Path) -> None:
    x = Transfer(lost=())
    assert only(read(write_pcap(tmp_path / "c.pcap", x.at_client)), "download").vantage == "receiver"
    assert only(read(write_pcap(tmp_path / "s.pcap", x.at_server)), "download").vantage == "sender"


def test_a_spurious_retransmission_of_acked_bytes_is_no_loss(tmp_path: Path) -> None:
    x = Transfer(lost=())
    last = max(t for t, _ in x.at_server)
    again = x._packet(False, 900_001 + 2 * MSS, 1000 + 1 + len(python_hello(x.name)), "PA", bytes([2]) * MSS)
    down = only(read(write_pcap(tmp_path / "s.pcap", x.at_server + [(last + 0.01, again)])), "download")
    assert down.losses == [] and down.sent[-1].retransmission


def test_a_d_sack_undoes_the_losses_of_the_copies_it_reports_twice(tmp_path: Path) -> None:
    """Segments 5 and 6 were only late (reordered), not lost: once the retransmissions arrive
    too, the client reports both in one D-SACK block (RFC 2883), below its cumulative ACK."""
    x = Transfer(lost=(2, 5, 6))
    c_next = 1000 + 1 + len(python_hello(x.name))
    base = 900_001
    dsack = x._packet(True, c_next, base + x.segments * MSS, "A", options=[("SAck", (base + 5 * MSS, base + 7 * MSS))])
    last = max(t for t, _ in x.at_server)
    down = only(read(write_pcap(tmp_path / "s.pcap", x.at_server + [(last + 0.001, dsack)])), "download")
    assert [loss.start for loss in down.losses] == [2 * MSS]


def test_a_capture_that_drops_packets_itself_does_not_invent_losses(tmp_path: Path) -> None:
    x = Transfer(lost=())
    # the client-side capture misses segment 5, yet the client's ACKs cover it: tcpdump's drop
    missing = next(p for t, p in x.at_client if len(p) > 1000 and p[-1] == 5)
    down = only(read(write_pcap(tmp_path / "c.pcap", [(t, p) for t, p in x.at_client if p is not missing])), "download")
    assert down.losses == []


def test_two_captures_match_losses_exactly_and_give_one_way_delays(tmp_path: Path) -> None:
    x = Transfer()
    traces = read(write_pcap(tmp_path / "c.pcap", x.at_client), write_pcap(tmp_path / "s.pcap", x.at_server))
    assert len(traces) == 2
    down = only(traces, "download")
    assert down.matched and down.vantage == "sender"
    assert down.files == (str(tmp_path / "s.pcap"), str(tmp_path / "c.pcap"))
    assert [(loss.start, loss.length) for loss in down.losses] == [(i * MSS, MSS) for i in x.lost]
    assert len(down.one_way) == x.segments and all(d == pytest.approx(ONE_WAY, abs=1e-5) for _, d in down.one_way)
    up = only(traces, "upload")
    assert up.matched and up.losses == [] and up.files[0] == str(tmp_path / "c.pcap")


def test_an_injected_reset_differs_from_the_servers_own_packets(tmp_path: Path) -> None:
    x = Transfer(lost=(), rst=(61, 0))
    down = only(read(write_pcap(tmp_path / "c.pcap", x.at_client)), "download")
    (reset,) = down.resets
    assert not reset.from_client and (reset.ttl, reset.ip_id) == (61, 0)
    assert reset.usual_ttl == 52 and reset.usual_ip_id == 5000 + x.segments
    assert reset.after_bytes == x.segments * MSS and not down.fin
    assert only(read(write_pcap(tmp_path / "c.pcap", x.at_client)), "upload").resets == [reset._replace(
        after_bytes=len(python_hello(x.name)))]


def test_ipv6_in_pcapng(tmp_path: Path) -> None:
    x = Transfer(v6=True)
    down = only(read(write_pcapng(tmp_path / "c.pcapng", x.at_client)), "download")
    assert (down.client, down.server) == (f"[{CLIENT6}]:40000", f"[{SERVER6}]:443")
    assert down.vantage == "receiver" and down.header_bytes == 60 and down.server_name == "pbs.twimg.com"
    assert [(loss.start, loss.wire) for loss in down.losses] == [(i * MSS, MSS + 60) for i in x.lost]
    x = Transfer(v6=True, rst=(50, 0))
    (reset,) = only(read(write_pcapng(tmp_path / "r.pcapng", x.at_client)), "download").resets
    assert reset.ip_id is None and reset.usual_ip_id is None and (reset.ttl, reset.usual_ttl) == (50, 52)


def test_mid_flow_capture_takes_the_higher_port_as_the_client(tmp_path: Path) -> None:
    x = Transfer(lost=())
    late = [(t, p) for t, p in x.at_client if t > x.t0 + 0.11]
    traces = read(write_pcap(tmp_path / "m.pcap", late))
    down = only(traces, "download")
    assert down.started_mid_flow and down.client == f"{CLIENT}:40000" and down.server_name is None
    assert down.sent[0].start == 0 and down.losses == []


def _conversation(payload: bytes, server_port: int, tmp_path: Path, extra: list[tuple[float, bytes]] = []) -> list[FlowTrace]:
    c, s = 1, 1_000_000
    mk = lambda src, dst, sp, dp, seq, ack, fl, pl=b"": raw(IP(src=src, dst=dst) / TCP(sport=sp, dport=dp, seq=seq, ack=ack, flags=fl) / pl)  # noqa: E731
    packets = [
        (1.0, mk(CLIENT, SERVER, 50000, server_port, c, 0, "S")),
        (1.1, mk(SERVER, CLIENT, server_port, 50000, s, c + 1, "SA")),
        (1.1, mk(CLIENT, SERVER, 50000, server_port, c + 1, s + 1, "A")),
        (1.1, mk(CLIENT, SERVER, 50000, server_port, c + 1, s + 1, "PA", payload)),
        (1.2, mk(SERVER, CLIENT, server_port, 50000, s + 1, c + 1 + len(payload), "PA", b"x" * 500)),
    ]
    return read(write_pcap(tmp_path / "h.pcap", sorted(extra + packets, key=lambda p: p[0])))


def test_http_host_and_a_name_from_dns(tmp_path: Path) -> None:
    up = only(_conversation(b"GET / HTTP/1.1\r\nHost: Example.ORG:8080\r\n\r\n", 80, tmp_path), "upload")
    assert (up.server_name, up.name_source) == ("example.org", "http")
    from scapy.all import DNS, DNSQR, DNSRR

    answer = raw(IP(src="198.18.1.1", dst=CLIENT) / UDP(sport=53, dport=33333) / DNS(
        id=1, qr=1, qd=DNSQR(qname="cdn.example.net"), an=DNSRR(rrname="cdn.example.net", rdata=SERVER)))
    traces = _conversation(b"\x00\x01binary", 9000, tmp_path, [(0.5, answer)])
    assert [(t.server_name, t.name_source) for t in traces] == [("cdn.example.net", "dns")] * 2


def test_a_timeout_after_the_hello_has_no_handshake(tmp_path: Path) -> None:
    x = Transfer(lost=())
    cut = [(t, p) for t, p in x.at_client if t < x.t0 + 0.06]  # nothing after the hello
    (up,) = read(write_pcap(tmp_path / "t.pcap", cut))
    assert up.direction == "upload" and up.hello_at is not None and up.handshake is None
    assert up.server_name == "pbs.twimg.com"


# --- QUIC ------------------------------------------------------------------------------------


def _quic(tmp_path: Path, lose: int | None = None) -> tuple[Path, Path]:
    initials = quic_initials("video.example.com")
    c, s = ("198.18.0.2", 51000), ("198.18.2.2", 443)
    dgram = lambda a, b, data: raw(IP(src=a[0], dst=b[0]) / UDP(sport=a[1], dport=b[1]) / data)  # noqa: E731
    at_client, at_server = [], []
    t = 10.0
    for data in initials:
        at_client.append((t, dgram(c, s, data)))
        at_server.append((t + ONE_WAY, dgram(c, s, data)))
    server_initial = bytes([0xC0]) + b"\x00\x00\x00\x01" + b"\x00\x00" + bytes(1100)
    at_server.append((t + ONE_WAY, dgram(s, c, server_initial)))
    at_client.append((t + 2 * ONE_WAY, dgram(s, c, server_initial)))
    handshake = bytes([0xE0]) + b"\x00\x00\x00\x01" + b"\x00\x00" + bytes(60)  # the client's Handshake packet
    at_client.append((t + 2 * ONE_WAY + 0.0001, dgram(c, s, handshake)))
    at_server.append((t + 3 * ONE_WAY + 0.0001, dgram(c, s, handshake)))
    for i in range(30):
        data = bytes([0x40]) + bytes([i]) * 1199  # short header: 1-RTT, encrypted
        ts = t + 0.1 + i * 0.001
        at_server.append((ts, dgram(s, c, data)))
        if i != lose:
            at_client.append((ts + ONE_WAY, dgram(s, c, data)))
    return (write_pcap(tmp_path / "qc.pcap", sorted(at_client, key=lambda p: p[0])),
            write_pcap(tmp_path / "qs.pcap", sorted(at_server, key=lambda p: p[0])))


def test_quic_from_one_capture_gives_sizes_and_times_and_says_losses_are_unknown(tmp_path: Path) -> None:
    client_side, _ = _quic(tmp_path, lose=4)
    traces = read(client_side)
    down = only(traces, "download")
    assert (down.transport, down.server_name, down.name_source) == ("quic", "video.example.com", "quic")
    assert down.client == "198.18.0.2:51000" and not down.losses_known and down.losses == []
    assert [s.start for s in down.sent[:3]] == [0, 1107, 2307] and down.payload == 1107 + 29 * 1200
    assert down.vantage == "receiver" and down.base_rtt == pytest.approx(2 * ONE_WAY, abs=2e-4)


def test_quic_from_both_captures_matches_datagrams_for_exact_losses(tmp_path: Path) -> None:
    traces = read(*_quic(tmp_path, lose=4))
    down = only(traces, "download")
    assert down.matched and down.losses_known and down.vantage == "sender"
    assert [(loss.start, loss.length) for loss in down.losses] == [(1107 + 4 * 1200, 1200)]
    assert len(down.one_way) == 30


def _quic_spinning(tmp_path: Path, rtts: list[float], spin: str = "wave", gaps: float = 0.0,
                   sawtooth: bool = False) -> Path:
    """A QUIC download seen at the client: after the handshake, the server's 1-RTT packets every
    ms and the client's ACKs every 5 ms. The spin bits: the client's value changes at its first
    packet after the server's did, the server's one round trip (rtts[k]: the path and the
    server's reaction) after the client's change. `spin="random"`: a bit drawn for each packet, as
    an endpoint that opts out may. `gaps`: the share of the client's ACKs 4 bytes longer (two
    ranges more: it was missing packets). `sawtooth`: the server's rate climbs from half to one and
    a half times its mean over each 1.6 s, as a congestion controller's after random losses."""
    import random as _random

    initials = quic_initials("video.example.com")
    c, s = ("198.18.0.2", 51000), ("198.18.2.2", 443)
    dgram = lambda a, b, data: raw(IP(src=a[0], dst=b[0]) / UDP(sport=a[1], dport=b[1]) / data)  # noqa: E731
    t = 10.0
    out = [(t, dgram(c, s, data)) for data in initials]
    out.append((t + 2 * ONE_WAY, dgram(s, c, bytes([0xC0]) + b"\x00\x00\x00\x01\x00\x00" + bytes(1100))))
    out.append((t + 2 * ONE_WAY + 0.0001, dgram(c, s, bytes([0xE0]) + b"\x00\x00\x00\x01\x00\x00" + bytes(60))))
    draw = _random.Random(7)
    server_bit = client_bit = False
    server_flip_at = t + 0.1 + rtts[0]  # when the server's next change is due
    waves = iter(rtts[1:])
    server_t, client_t, n = t + 0.1, t + 0.1 + 0.0002, 0
    while True:
        if server_t <= client_t:
            if server_t >= server_flip_at:
                server_bit, server_flip_at = not server_bit, math.inf
            bit = draw.random() < 0.5 if spin == "random" else server_bit
            out.append((server_t, dgram(s, c, bytes([0x40 | (0x20 if bit else 0)]) + bytes([n % 256]) * 1199)))
            phase = ((server_t - t) % 1.6) / 1.6
            server_t, n = server_t + (0.001 / (0.5 + phase) if sawtooth else 0.001), n + 1
        else:
            if client_bit == server_bit:  # the client inverts what it last saw from the server
                client_bit = not server_bit
                nxt = next(waves, None)
                if nxt is None:
                    break
                server_flip_at = client_t + nxt
            bit = draw.random() < 0.5 if spin == "random" else client_bit
            longer = 4 if draw.random() < gaps else 0
            out.append((client_t, dgram(c, s, bytes([0x40 | (0x20 if bit else 0)]) + bytes(40 + longer))))
            client_t += 0.005
    return write_pcap(tmp_path / "spin.pcap", sorted(out, key=lambda p: p[0]))


def test_quic_round_trips_come_from_the_spin_bit(tmp_path: Path) -> None:
    rtts = [0.05 + 0.01 * k for k in range(20)]  # a queue building: 50 ms to 240 ms
    down = only(read(_quic_spinning(tmp_path, rtts)), "download")
    spins = [r for _, r in down.rtt]  # the handshake's is left out (it holds both ends' cryptography)
    assert len(spins) >= 15 and down.vantage == "receiver"  # the client's reactions are the quick half
    assert all(any(abs(r - x) < 0.0011 for x in rtts) for r in spins)  # each a round trip, to a packet's spacing
    assert max(spins) > 0.2 and down.base_rtt == min(spins) < 0.075


def test_a_spin_bit_drawn_at_random_gives_no_round_trips(tmp_path: Path) -> None:
    down = only(read(_quic_spinning(tmp_path, [0.05] * 20, spin="random")), "download")
    assert len(down.rtt) == 1  # the handshake's alone


def test_a_quic_rate_that_holds_while_a_queue_grows_is_no_policer(tmp_path: Path) -> None:
    from throttle.infer.fit import infer

    def download(rtts: list[float], spin: str = "wave", gaps: float = 0.5) -> Inference:
        capture = _quic_spinning(tmp_path, rtts, spin, gaps)
        return [i for i in infer(read(capture)) if i.trace.direction == "download"][0]

    long_queue = download([0.05 + 0.01 * k for k in range(40)], gaps=0.0)  # to 440 ms: a shaper's queue
    assert long_queue.mechanism == "shape" and long_queue.queue_delay is not None
    short_queue = download([0.05 + 0.002 * k for k in range(40)] + [0.13] * 20)  # 80 ms more: congestion's
    assert short_queue.mechanism == "none" and "queue" in short_queue.reason
    assert short_queue.queue_delay is not None and 0.05 < short_queue.queue_delay.value < 0.1
    no_queue, unmeasured = download([0.05] * 60), download([0.05] * 60, "random")
    assert no_queue.mechanism == unmeasured.mechanism == "police"
    assert no_queue.confidence > unmeasured.confidence  # round trips that did not grow rule a queue out


def test_quic_acknowledgements_that_skip_packets_tell_a_policer_from_a_lossless_plateau(tmp_path: Path) -> None:
    from throttle.infer.fit import infer

    def download(gaps: float, sawtooth: bool = False) -> Inference:
        capture = _quic_spinning(tmp_path, [0.05] * 60, "random", gaps, sawtooth)
        return [i for i in infer(read(capture)) if i.trace.direction == "download"][0]

    lossless, lossy, swinging = download(0.0), download(0.4), download(0.3, sawtooth=True)
    # 40% longer, drawn one by one: those beside another longer one count (0.4 x (1 - 0.6^2) = 26%)
    assert lossy.trace.acks_seen > 100 and 0.2 < len(lossy.trace.gap_acks) / lossy.trace.acks_seen < 0.35
    assert lossless.trace.gap_acks == []
    assert lossless.mechanism == "none" and "skipped" in lossless.reason
    assert lossy.mechanism == "police" and "skip packets" in lossy.reason
    # fewer losses (15% of ACKs) under a rate that swings: random loss and a congestion
    # controller's answer; as many losses as a small bucket's (over 30%) stay a policer's
    assert 0.05 < len(swinging.trace.gap_acks) / swinging.trace.acks_seen < 0.3
    assert swinging.mechanism == "none" and "swings" in swinging.reason
    heavy = download(0.6, sawtooth=True)
    assert heavy.mechanism == "police" and heavy.rate_floor  # a policer passes no more than its rate


# --- robustness -------------------------------------------------------------------------------


def test_a_capture_cut_short_keeps_the_traces_read_before_it(tmp_path: Path) -> None:
    x = Transfer()
    path = write_pcap(tmp_path / "c.pcap", x.at_client)
    path.write_bytes(path.read_bytes()[:-30])
    traces, problems = read_traces([path, tmp_path / "missing.pcap"])
    assert len(traces) == 2 and only(traces, "download").payload == x.segments * MSS
    assert len(problems) == 2 and "truncated" in problems[0] and "missing.pcap" in problems[1]


def test_flows_without_data_are_not_returned(tmp_path: Path) -> None:
    x = Transfer()
    bare = [(t, p) for t, p in x.at_client if len(IP(p)[TCP].payload) == 0 and t < x.t0 + 0.06]
    assert len(bare) == 3 and read(write_pcap(tmp_path / "h.pcap", bare)) == []


VECTORS = Path(__file__).parent / "vectors"


@pytest.mark.parametrize("path", sorted(VECTORS.glob("*.pcap")), ids=lambda p: p.stem)
def test_real_captures_give_the_name_in_their_file_name(path: Path) -> None:
    traces = read(path)
    assert traces and traces[0].direction == "upload" and not traces[0].started_mid_flow
    name = traces[0].server_name
    if "nosni" in path.stem:
        assert name is None
    else:
        assert name is not None and path.stem.endswith(name)
        assert traces[0].name_source == ("quic" if "quic" in path.stem else "http" if "http" in path.stem else "tls")
