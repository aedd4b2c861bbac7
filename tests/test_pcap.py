"""pcap/pcapng reading: formats, byte orders, timestamps, link layers, truncation and garbage."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether, Loopback
from scapy.packet import Raw
from scapy.utils import PcapWriter, wrpcap, wrpcapng

from throttle.errors import CaptureError
from throttle.wire.pcap import read_packets

VECTORS = Path(__file__).parent / "vectors"

T0 = 1_700_000_000


def ip4(payload: bytes = b"hello", sport: int = 40000) -> bytes:
    return bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=sport, dport=443) / Raw(payload))


def ip6(payload: bytes = b"world") -> bytes:
    return bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=5353, dport=53) / Raw(payload))


def eth(ip: bytes, ethertype: int | None = None) -> bytes:
    if ethertype is None:
        ethertype = 0x0800 if ip[0] >> 4 == 4 else 0x86DD
    return b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + struct.pack(">H", ethertype) + ip


# --- hand-built pcap -------------------------------------------------------------------------


def pcap_header(linktype: int, order: str = "<", nano: bool = False) -> bytes:
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    return struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)


def pcap_record(
    ts_sec: int, ts_frac: int, data: bytes, order: str = "<", origlen: int | None = None
) -> bytes:
    orig = len(data) if origlen is None else origlen
    return struct.pack(order + "IIII", ts_sec, ts_frac, len(data), orig) + data


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- hand-built pcapng -----------------------------------------------------------------------


def block(block_type: int, body: bytes, order: str = "<") -> bytes:
    body += b"\0" * (-len(body) % 4)
    length = len(body) + 12
    return struct.pack(order + "II", block_type, length) + body + struct.pack(order + "I", length)


def option(code: int, value: bytes, order: str = "<") -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def shb(order: str = "<", options: bytes = b"") -> bytes:
    body = struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1) + options
    return block(0x0A0D0D0A, body, order)


def idb(linktype: int, order: str = "<", tsresol: int | None = None, tsoffset: int | None = None) -> bytes:
    opts = b""
    if tsresol is not None:
        opts += option(9, bytes([tsresol]), order)
    if tsoffset is not None:
        opts += option(14, struct.pack(order + "q", tsoffset), order)
    if opts:
        opts += option(2, b"eth0", order) + struct.pack(order + "HH", 0, 0)
    return block(1, struct.pack(order + "HHI", linktype, 0, 0) + opts, order)


def epb(iface: int, ts: int, data: bytes, order: str = "<", origlen: int | None = None) -> bytes:
    orig = len(data) if origlen is None else origlen
    body = struct.pack(order + "IIIII", iface, ts >> 32, ts & 0xFFFFFFFF, len(data), orig) + data
    return block(6, body, order)


def spb(data: bytes, order: str = "<") -> bytes:
    return block(3, struct.pack(order + "I", len(data)) + data, order)


def pb(iface: int, ts: int, data: bytes, order: str = "<") -> bytes:
    body = struct.pack(order + "HHIIII", iface, 0, ts >> 32, ts & 0xFFFFFFFF, len(data), len(data))
    return block(2, body + data, order)


def assert_packets(got: list[tuple[float, bytes]], want: list[tuple[float, bytes]]) -> None:
    assert [p for _, p in got] == [p for _, p in want]
    for (ts_got, _), (ts_want, _) in zip(got, want):
        assert ts_got == pytest.approx(ts_want, abs=1e-6)


def read_until_error(path: Path) -> tuple[list[tuple[float, bytes]], CaptureError]:
    got: list[tuple[float, bytes]] = []
    with pytest.raises(CaptureError) as info:
        for item in read_packets(path):
            got.append(item)
    return got, info.value


# --- scapy-written captures ------------------------------------------------------------------


def test_scapy_pcap_ethernet(tmp_path: Path) -> None:
    a = Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(dport=443) / Raw(b"x" * 100)
    a.time = T0 + 0.123456
    b = Ether() / IPv6(src="fd00::1", dst="fd00::2") / UDP(dport=53) / Raw(b"q")
    b.time = T0 + 1.5
    c = Ether() / ARP()
    c.time = T0 + 2
    d = Ether() / Dot1Q(vlan=7) / IP(dst="192.0.2.1") / UDP()
    d.time = T0 + 3.000001
    path = tmp_path / "s.pcap"
    wrpcap(str(path), [a, b, c, d])
    got = list(read_packets(path))
    assert_packets(
        got,
        [
            (T0 + 0.123456, bytes(a[IP])),
            (T0 + 1.5, bytes(b[IPv6])),
            (T0 + 3.000001, bytes(d[IP])),
        ],
    )


def test_scapy_pcapng(tmp_path: Path) -> None:
    pkts = []
    for i in range(5):
        p = Ether() / IP(dst=f"192.0.2.{i + 1}") / TCP(sport=1000 + i) / Raw(b"data")
        p.time = T0 + i * 0.25 + 0.000007
        pkts.append(p)
    path = tmp_path / "s.pcapng"
    wrpcapng(str(path), pkts)
    got = list(read_packets(str(path)))
    assert_packets(got, [(float(p.time), bytes(p[IP])) for p in pkts])


@pytest.mark.parametrize(
    ("layer", "linktype"),
    [(CookedLinux, 113), (CookedLinuxV2, 276), (Loopback, 0)],
)
def test_scapy_pcap_other_link_layers(tmp_path: Path, layer: type, linktype: int) -> None:
    if layer is Loopback:
        frames = [Loopback(type=2) / IP(dst="127.0.0.1") / UDP(), Loopback(type=30) / IPv6() / UDP()]
    else:
        frames = [layer(proto=0x0800) / IP(dst="127.0.0.1") / UDP(), layer(proto=0x86DD) / IPv6() / UDP()]
    for i, f in enumerate(frames):
        f.time = T0 + i
    path = tmp_path / "l.pcap"
    wrpcap(str(path), frames, linktype=linktype)
    assert path.read_bytes()[20] == linktype or linktype > 255
    got = list(read_packets(path))
    assert_packets(got, [(T0, bytes(frames[0][IP])), (T0 + 1, bytes(frames[1][IPv6]))])


def test_scapy_raw_ip_pcap(tmp_path: Path) -> None:
    pkts = [IP(dst="192.0.2.9") / TCP(), IPv6(dst="2001:db8::1") / TCP()]
    for i, p in enumerate(pkts):
        p.time = T0 + i / 10
    path = tmp_path / "raw.pcap"
    wrpcap(str(path), pkts)  # scapy picks LINKTYPE_IPV4 (228) for the lot
    got = list(read_packets(path))
    assert_packets(got, [(T0, bytes(pkts[0])), (T0 + 0.1, bytes(pkts[1]))])


def test_scapy_nanosecond_big_endian(tmp_path: Path) -> None:
    p = Ether() / IP() / UDP()
    p.time = T0 + 0.987654321
    path = tmp_path / "n.pcap"
    with PcapWriter(str(path), nano=True, endianness=">") as writer:
        writer.write(p)
    assert path.read_bytes()[:4] == b"\xa1\xb2\x3c\x4d"
    (ts, data), = read_packets(path)
    assert data == bytes(p[IP])
    assert ts == pytest.approx(T0 + 0.987654321, abs=1e-7)


# --- hand-built pcap variants ----------------------------------------------------------------


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_pcap_byte_orders_and_resolutions(tmp_path: Path, order: str, nano: bool) -> None:
    frac = 123_456_789 if nano else 123_456
    a, b = ip4(), ip6()
    data = (
        pcap_header(1, order, nano)
        + pcap_record(T0, frac, eth(a), order)
        + pcap_record(T0 + 5, 0, eth(b), order)
    )
    got = list(read_packets(write(tmp_path, "x.pcap", data)))
    want_frac = 0.123456789 if nano else 0.123456
    assert_packets(got, [(T0 + want_frac, a), (T0 + 5, b)])


@pytest.mark.parametrize("linktype", [101, 12, 14])
def test_pcap_raw_linktypes_decide_by_nibble(tmp_path: Path, linktype: int) -> None:
    a, b = ip4(), ip6()
    data = (
        pcap_header(linktype)
        + pcap_record(T0, 1, a)
        + pcap_record(T0, 2, b"\x00\x01garbage")  # not IP: skipped
        + pcap_record(T0, 3, b"")  # empty: skipped
        + pcap_record(T0, 4, b)
    )
    got = list(read_packets(write(tmp_path, "r.pcap", data)))
    assert_packets(got, [(T0 + 1e-6, a), (T0 + 4e-6, b)])


@pytest.mark.parametrize("linktype", [228, 229])
def test_pcap_ipv4_and_ipv6_linktypes_go_by_the_nibble(tmp_path: Path, linktype: int) -> None:
    # scapy writes IPv6 packets under LINKTYPE_IPV4 in a mixed capture, so trust the header.
    a, b = ip4(), ip6()
    data = pcap_header(linktype) + pcap_record(T0, 0, a) + pcap_record(T0, 0, b"\x11junk") + pcap_record(T0, 0, b)
    assert [p for _, p in read_packets(write(tmp_path, "x.pcap", data))] == [a, b]


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("family", [2, 24, 28, 30, 99])
def test_pcap_dlt_null(tmp_path: Path, order: str, family: int) -> None:
    pkt = ip4() if family == 2 else ip6()
    data = pcap_header(0, order) + pcap_record(T0, 0, struct.pack(order + "I", family) + pkt, order)
    got = list(read_packets(write(tmp_path, "null.pcap", data)))
    assert [p for _, p in got] == ([] if family == 99 else [pkt])


def test_pcap_loop_linktype_is_network_order(tmp_path: Path) -> None:
    pkt = ip6()
    data = pcap_header(108) + pcap_record(T0, 0, struct.pack(">I", 24) + pkt)
    assert [p for _, p in read_packets(write(tmp_path, "loop.pcap", data))] == [pkt]


def test_pcap_linux_sll_and_sll2(tmp_path: Path) -> None:
    a, b = ip4(), ip6()

    def sll(proto: int, ip: bytes) -> bytes:
        return struct.pack(">HHH8sH", 0, 1, 6, b"\x02" * 6 + b"\0\0", proto) + ip

    def sll2(proto: int, ip: bytes) -> bytes:
        return struct.pack(">HHIHBB8s", proto, 0, 3, 1, 4, 6, b"\x02" * 6 + b"\0\0") + ip

    for linktype, wrap in ((113, sll), (276, sll2)):
        data = (
            pcap_header(linktype)
            + pcap_record(T0, 10, wrap(0x0800, a))
            + pcap_record(T0, 20, wrap(0x0806, b"\0" * 28))  # ARP: skipped
            + pcap_record(T0, 30, wrap(0x86DD, b))
        )
        got = list(read_packets(write(tmp_path, f"{linktype}.pcap", data)))
        assert_packets(got, [(T0 + 10e-6, a), (T0 + 30e-6, b)])


def test_ethernet_vlan_tags(tmp_path: Path) -> None:
    a, b = ip4(), ip6()
    one_tag = eth(struct.pack(">HH", 0x0064, 0x0800) + a, ethertype=0x8100)
    qinq = eth(struct.pack(">HHHH", 0x0001, 0x8100, 0x0002, 0x86DD) + b, ethertype=0x88A8)
    tagged_arp = eth(struct.pack(">HH", 0x0064, 0x0806) + b"\0" * 28, ethertype=0x8100)
    cut_tag = eth(b"\x00", ethertype=0x8100)
    scapy_qinq = bytes(Ether() / Dot1AD(vlan=3) / Dot1Q(vlan=4) / IP() / UDP())
    data = pcap_header(1) + b"".join(
        pcap_record(T0, i, f) for i, f in enumerate([one_tag, qinq, tagged_arp, cut_tag, scapy_qinq])
    )
    got = list(read_packets(write(tmp_path, "vlan.pcap", data)))
    assert [p for _, p in got] == [a, b, bytes(IP() / UDP())]


def test_ethernet_padding_and_fcs_are_cut_off(tmp_path: Path) -> None:
    small = bytes(IP(dst="192.0.2.1") / TCP(flags="A"))  # 40 bytes: Ethernet pads it to 46
    v6 = ip6(b"")
    data = (
        pcap_header(1)
        + pcap_record(T0, 0, eth(small) + b"\0" * 6 + b"FCS!")
        + pcap_record(T0, 0, eth(v6) + b"\xde\xad\xbe\xef")
    )
    got = list(read_packets(write(tmp_path, "pad.pcap", data)))
    assert [p for _, p in got] == [small, v6]


def test_snaplen_truncated_packet_is_yielded(tmp_path: Path) -> None:
    full = ip4(b"y" * 1000)
    data = pcap_header(1) + pcap_record(T0, 0, eth(full)[:96], origlen=len(full) + 14)
    got = list(read_packets(write(tmp_path, "snap.pcap", data)))
    assert [p for _, p in got] == [full[:82]]


def test_empty_pcap_yields_nothing(tmp_path: Path) -> None:
    assert list(read_packets(write(tmp_path, "e.pcap", pcap_header(1)))) == []
    assert list(read_packets(write(tmp_path, "e.pcapng", shb()))) == []


# --- hand-built pcapng variants --------------------------------------------------------------


@pytest.mark.parametrize("order", ["<", ">"])
def test_pcapng_tsresol_tsoffset_and_block_kinds(tmp_path: Path, order: str) -> None:
    a, b, c, d, e = (ip4(bytes([i]) * 5, sport=1000 + i) for i in range(5))
    data = (
        shb(order, options=option(1, b"comment", order) + struct.pack(order + "HH", 0, 0))
        + idb(1, order)  # interface 0: Ethernet, default microseconds
        + idb(101, order, tsresol=9)  # interface 1: raw, nanoseconds
        + idb(1, order, tsresol=0x80 | 20, tsoffset=T0)  # interface 2: 2^-20 s, offset
        + block(5, b"\x01\x02\x03\x04", order)  # interface statistics: skipped
        + block(0x0BAD, b"whatever", order)  # unknown: skipped
        + epb(0, (T0 * 1_000_000) + 250_000, eth(a), order)
        + epb(1, (T0 + 1) * 1_000_000_000 + 123_456_789, b, order)
        + spb(eth(c), order)  # no timestamp: reuses the previous one
        + epb(2, 3 * 2**20 + 2**19, eth(d), order)  # 3.5 s after the offset
        + pb(1, (T0 + 9) * 1_000_000_000 + 1, e, order)
    )
    got = list(read_packets(write(tmp_path, "ng.pcapng", data)))
    assert_packets(
        got,
        [
            (T0 + 0.25, a),
            (T0 + 1.123456789, b),
            (T0 + 1.123456789, c),
            (T0 + 3.5, d),
            (T0 + 9.000000001, e),
        ],
    )


def test_pcapng_simple_packet_first_gets_zero(tmp_path: Path) -> None:
    a = ip6()
    data = shb() + idb(1) + spb(eth(a)) + spb(eth(a, ethertype=0x0806))
    assert list(read_packets(write(tmp_path, "spb.pcapng", data))) == [(0.0, a)]


def test_pcapng_two_sections_with_different_byte_orders(tmp_path: Path) -> None:
    a, b = ip4(), ip6()
    data = (
        shb("<")
        + idb(1, "<")
        + epb(0, T0 * 1_000_000, eth(a), "<")
        + shb(">")
        + idb(101, ">", tsresol=3)  # interfaces restart: interface 0 is now raw, milliseconds
        + epb(0, (T0 + 2) * 1000 + 5, b, ">")
    )
    got = list(read_packets(write(tmp_path, "two.pcapng", data)))
    assert_packets(got, [(T0, a), (T0 + 2.005, b)])


def test_pcapng_new_section_forgets_interfaces(tmp_path: Path) -> None:
    data = shb() + idb(1) + epb(0, 0, eth(ip4())) + shb() + epb(0, 0, eth(ip4()))
    got, err = read_until_error(write(tmp_path, "forget.pcapng", data))
    assert len(got) == 1
    assert "interface 0" in str(err)


def test_pcapng_snaplen_and_padding(tmp_path: Path) -> None:
    full = ip4(b"z" * 500)
    data = shb() + idb(1) + epb(0, 0, eth(full)[:67], origlen=len(full) + 14)
    assert list(read_packets(write(tmp_path, "snap.pcapng", data))) == [(0.0, full[:53])]


# --- streaming ------------------------------------------------------------------------------


def _mixed_capture(order: str, ng: bool, count: int) -> tuple[bytes, list[bytes]]:
    ips = [ip4(bytes([i % 251]) * (i * 37 % 1400), sport=1000 + i) if i % 3 else ip6(b"z" * (i % 90)) for i in range(count)]
    if ng:
        data = shb(order) + idb(1, order) + b"".join(epb(0, T0 * 10**6 + i, eth(p), order) for i, p in enumerate(ips))
    else:
        data = pcap_header(1, order) + b"".join(pcap_record(T0, i, eth(p), order) for i, p in enumerate(ips))
    return data, ips


@pytest.mark.parametrize("ng", [False, True])
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_records_that_straddle_chunks_read_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   ng: bool, chunk: int) -> None:
    from throttle.wire import pcap

    data, ips = _mixed_capture(">" if ng else "<", ng, 60)
    path = write(tmp_path, "s.pcapng" if ng else "s.pcap", data)
    monkeypatch.setattr(pcap, "_CHUNK", chunk)
    assert [p for _, p in read_packets(path)] == ips
    # ... and a cut mid-record still yields every whole packet before the error
    got, err = read_until_error(write(tmp_path, "cut", data[:-5]))
    assert [p for _, p in got] == ips[:-1] and "truncated" in str(err)


def test_a_capture_is_read_as_a_stream_not_at_once(tmp_path: Path) -> None:
    """Packets come out of a pipe while its writer has not finished (so nothing waits for the
    whole file), and a record that claims gigabytes is an error, not an allocation."""
    import os
    import threading

    data, ips = _mixed_capture("<", False, 3)
    fifo = tmp_path / "live.pcap"
    os.mkfifo(fifo)
    first_seen = threading.Event()
    waited: list[bool] = []

    def writer() -> None:
        with open(fifo, "wb", buffering=0) as out:
            out.write(data)
            waited.append(first_seen.wait(10))
            out.write(struct.pack("<IIII", T0, 0, 3_000_000_000, 10))

    thread = threading.Thread(target=writer)
    thread.start()
    got = []
    try:
        stream = read_packets(fifo)
        for _ in range(3):
            got.append(next(stream)[1])
        first_seen.set()
        with pytest.raises(CaptureError, match="claims 3000000000 bytes"):
            next(stream)
    finally:
        first_seen.set()
        thread.join()
    assert got == ips and waited == [True]


# --- errors ----------------------------------------------------------------------------------


def test_text_file_is_not_a_capture(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.txt", b"hello, this is not a capture\n")
    with pytest.raises(CaptureError) as info:
        list(read_packets(path))
    msg = str(info.value)
    assert str(path) in msg and "not a pcap or pcapng capture" in msg and "0x68656c6c" in msg
    assert "\n" not in msg


def test_gzip_file_gets_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "c.pcap.gz", b"\x1f\x8b\x08\x00" + b"\0" * 30)
    with pytest.raises(CaptureError, match="gunzip"):
        list(read_packets(path))


@pytest.mark.parametrize("content", [b"", b"\xd4\xc3"])
def test_empty_or_tiny_file(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path, "empty.pcap", content)
    with pytest.raises(CaptureError, match="not a pcap or pcapng capture"):
        list(read_packets(path))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pcap"
    with pytest.raises(CaptureError, match="No such file or directory") as info:
        list(read_packets(path))
    assert str(path) in str(info.value)
    with pytest.raises(CaptureError):
        list(read_packets(tmp_path))  # a directory


def test_truncated_global_header(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="truncated"):
        list(read_packets(write(tmp_path, "h.pcap", pcap_header(1)[:20])))


def _three_packets() -> tuple[bytes, list[bytes]]:
    ips = [ip4(bytes([i]) * 50) for i in range(3)]
    return pcap_header(1) + b"".join(pcap_record(T0, i, eth(p)) for i, p in enumerate(ips)), ips


def test_pcap_truncated_in_record_header(tmp_path: Path) -> None:
    data, ips = _three_packets()
    cut = data + pcap_record(T0, 9, eth(ips[0]))[:10]
    got, err = read_until_error(write(tmp_path, "cut.pcap", cut))
    assert [p for _, p in got] == ips
    msg = str(err)
    assert "truncated at packet 4" in msg and f"byte offset {len(data)}" in msg
    assert "cut.pcap" in msg and "editcap" in msg


def test_pcap_truncated_in_packet_data(tmp_path: Path) -> None:
    data, ips = _three_packets()
    second_end = 24 + 2 * (16 + 14 + len(ips[0]))
    got, err = read_until_error(write(tmp_path, "cut.pcap", data[:-7]))
    assert [p for _, p in got] == ips[:2]
    assert f"truncated at packet 3 (byte offset {second_end})" in str(err)


def test_pcapng_bad_block_lengths(tmp_path: Path) -> None:
    a = ip4()
    good = shb() + idb(1) + epb(0, 0, eth(a))
    bad_trailer = bytearray(epb(0, 0, eth(a)))
    bad_trailer[-4:] = struct.pack("<I", 999)
    odd = struct.pack("<II", 6, 30) + b"\0" * 22
    small = struct.pack("<II", 6, 8) + b"\0" * 8
    for name, tail, needle in [
        ("trailer", bytes(bad_trailer), "ends with 999"),
        ("odd", odd, "bad block length 30"),
        ("small", small, "bad block length 8"),
        ("huge", epb(0, 0, eth(a))[:-8], "truncated at block 4"),
        ("stub", b"\x06\0\0\0", "truncated at block 4"),
    ]:
        got, err = read_until_error(write(tmp_path, f"{name}.pcapng", good + tail))
        assert [p for _, p in got] == [a], name
        assert needle in str(err), (name, str(err))
        assert f"byte offset {len(good)}" in str(err), name


def test_pcapng_bad_byte_order_magic(tmp_path: Path) -> None:
    data = bytearray(shb())
    data[8:12] = b"\0\0\0\0"
    with pytest.raises(CaptureError, match="byte-order magic"):
        list(read_packets(write(tmp_path, "bom.pcapng", bytes(data))))


def test_pcapng_captured_length_exceeds_block(tmp_path: Path) -> None:
    bad = bytearray(epb(0, 0, eth(ip4())))
    struct.pack_into("<I", bad, 20, 5000)
    with pytest.raises(CaptureError, match="claims 5000 captured bytes"):
        list(read_packets(write(tmp_path, "cap.pcapng", shb() + idb(1) + bytes(bad))))


def test_unknown_link_type_pcap(tmp_path: Path) -> None:
    data = pcap_header(147) + pcap_record(T0, 0, ip4())
    with pytest.raises(CaptureError, match="link type 147") as info:
        list(read_packets(write(tmp_path, "usr.pcap", data)))
    assert "packet 1" in str(info.value)


def test_unknown_link_type_pcapng_after_good_packets(tmp_path: Path) -> None:
    a = ip4()
    data = (
        shb()
        + idb(1)
        + idb(127)  # radiotap: fine as long as no packet uses it
        + epb(0, T0 * 10**6, eth(a))
        + epb(1, T0 * 10**6, b"\0" * 40)
        + epb(0, T0 * 10**6, eth(a))
    )
    got, err = read_until_error(write(tmp_path, "wifi.pcapng", data))
    assert got == [(float(T0), a)]
    assert "link type 127" in str(err) and "block 5" in str(err)


PCAP_HEADERS = [pcap_header(1), pcap_header(101, ">", nano=True), pcap_header(0), pcap_header(113)]
NG_HEADS = [shb(), shb(">"), shb() + idb(1), shb(">") + idb(276, ">", tsresol=0xFF, tsoffset=-5)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=st.sampled_from(PCAP_HEADERS + NG_HEADS), tail=st.binary(max_size=400))
def test_garbage_after_a_valid_header_raises_only_capture_error(
    tmp_path: Path, head: bytes, tail: bytes
) -> None:
    path = write(tmp_path, "fuzz.cap", head + tail)
    try:
        for ts, pkt in read_packets(path):
            assert isinstance(ts, float) and isinstance(pkt, bytes)
    except CaptureError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    records=st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=80)), max_size=6
    ),
    linktype=st.sampled_from([0, 1, 12, 101, 113, 228, 229, 276]),
)
def test_structured_garbage_pcap_records(
    tmp_path: Path, records: list[tuple[int, bytes]], linktype: int
) -> None:
    data = pcap_header(linktype) + b"".join(pcap_record(s, 0, d) for s, d in records)
    got = list(read_packets(write(tmp_path, "rec.pcap", data)))
    assert len(got) <= len(records)
    for _, pkt in got:
        assert pkt[0] >> 4 in (4, 6) or linktype in (1, 113, 276, 0)


# --- real captures ---------------------------------------------------------------------------


def test_real_capture_vectors() -> None:
    paths = sorted(VECTORS.glob("*.pcap")) + sorted(VECTORS.glob("*.pcapng"))
    if not paths:
        pytest.skip(f"no pcap files in {VECTORS}")
    for path in paths:
        for ts, pkt in read_packets(path):
            assert ts > 0, path
            assert 0x45 <= pkt[0] <= 0x4F or pkt[0] >> 4 == 6, (path, pkt[:4].hex())
