"""Capture files -> `FlowTrace`s: one per flow direction that carried data, read as a stream.

`read_traces(paths)` reads each capture once, packet by packet (`wire.pcap.read_packets`, headers
through `wire.ip`), into connections (`_Conn`): TCP (`tcpside.TcpSide` per direction) and UDP/QUIC
(`udpside.UdpSide`). For each it learns
- who opened it (the SYN; for QUIC the first long-header Initial; else the higher port, and the
  trace says it started mid-flow), and the name a censor could act on: the TLS SNI of the client's
  first bytes (reassembled over segments), the HTTP Host, the SNI of the QUIC client Initials
  (decrypted), or else a name a DNS answer in the same capture gave the server's address;
- where the capture was taken, per direction (`_vantages`): the loss evidence itself (bytes sent
  again: the sender's side of the loss point; holes filled later: the receiver's), else the other
  direction's, else the handshake's timing (at the client SYN -> SYN/ACK is the round trip and
  SYN/ACK -> ACK nothing; at the server the reverse);
- the resets, each with the TTL and IP ID its endpoint's own packets carried before it.

Problems never raise: a packet that does not decode is skipped, and a capture that ends in an
error still gives the traces read before it, with the error's message in `Reading.problems`.
Two captures of one connection (one at each side) are joined by `match.join_pairs`.
Nothing is kept of packets' bytes but the first few KB of each stream until its name is read.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable
from typing import NamedTuple

from throttle.errors import CaptureError, ParseError
from throttle.infer.match import Keyed, join_pairs
from throttle.infer.tcpside import TcpSide
from throttle.infer.udpside import UdpSide, gap_acks, spin_rtts
from throttle.infer.trace import FlowTrace, Reset, Sent, Transport, Vantage
from throttle.wire import dns, http, ip, names, pcap, quic, tls

__all__ = ["Capture", "Reading", "read_capture", "read_traces"]

_HEAD_LIMIT = 16384  # bytes of a stream's start kept to read its name (a ClientHello fits)
_HEAD_PIECES = 32  # out-of-order segments held while the head waits for a hole to fill
_DECISIVE = 2.0  # one handshake gap must be this many times the other to place the capture


class Reading(NamedTuple):
    traces: list[FlowTrace]
    # One line per capture that could not be read to its end (the `CaptureError`'s message);
    # the traces read before the problem are in `traces` all the same.
    problems: list[str]


class _Conn:
    """One connection in one capture: both directions and what was learned about it."""

    __slots__ = (
        "proto", "ends", "tcp", "udp", "first", "last", "client", "quic", "t_open", "t_reply",
        "t_confirm", "heads", "pending", "names", "crypto", "reply_after", "resets", "ttls", "last_id",
    )

    def __init__(self, proto: int, ends: tuple[tuple[bytes, int], tuple[bytes, int]], t: float) -> None:
        self.proto = proto
        self.ends = ends  # (address, port) of side 0 and side 1
        self.tcp: tuple[TcpSide, TcpSide] | None = (TcpSide(), TcpSide()) if proto == ip.TCP else None
        self.udp: tuple[UdpSide, UdpSide] | None = None if proto == ip.TCP else (UdpSide(), UdpSide())
        self.first = t
        self.last = [t, t]  # each side's last packet
        self.client: int | None = None  # the side that opened the connection, once known
        self.quic = False
        # the opening exchange: SYN (Initial), SYN/ACK (the server's first reply), the client's next
        self.t_open: float | None = None
        self.t_reply: float | None = None
        self.t_confirm: float | None = None
        self.heads: list[bytearray | None] = [bytearray(), bytearray()]
        self.pending: list[dict[int, bytes]] = [{}, {}]
        self.names: list[tuple[str, str] | None] = [None, None]
        self.crypto: quic.CryptoStream | None = None
        self.reply_after: list[float | None] = [None, None]  # a side's first payload after the other's
        # (t, side, ttl, ip id, usual ttl, last ip id, bytes side 0 had sent, bytes side 1 had sent)
        self.resets: list[tuple[float, int, int, int | None, int | None, int | None, int, int]] = []
        self.ttls: tuple[dict[int, int], dict[int, int]] = ({}, {})
        self.last_id: list[int | None] = [None, None]

    def sent_bytes(self, side: int) -> int:
        if self.tcp is not None:
            return self.tcp[side].high
        assert self.udp is not None
        return self.udp[side].total

    def first_payload(self, side: int) -> float | None:
        if self.tcp is not None:
            return self.tcp[side].first_payload_at
        assert self.udp is not None
        return self.udp[side].first_payload_at

    def has_data(self) -> bool:
        return self.sent_bytes(0) > 0 or self.sent_bytes(1) > 0


class Capture:
    """The connections of one capture file, fed packet by packet; `settle` sees each closed
    connection's traces as they are made (`throttle.infer.stream` fits them there)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conns: dict[bytes, _Conn] = {}
        self.closed: set[bytes] = set()  # connections both ends closed, already made into traces
        self.keyed: list[Keyed] = []  # the traces of the connections done with
        self.dns: dict[bytes, str] = {}  # server address -> the name a DNS answer gave it
        self.malformed = 0

    def feed(self, t: float, packet: bytes) -> None:
        try:
            self._feed(t, packet)
        except (IndexError, ValueError, OverflowError):
            self.malformed += 1  # a packet cut short or nonsensical: skipped, as a censor would

    def _feed(self, t: float, packet: bytes) -> None:
        d = ip.decode(packet)
        if d is None:
            return
        version, proto, l4 = ip.locate(packet)
        key = ip.flow_key(packet, version, proto, l4)
        if len(key) < (13 if version == 4 else 37):
            return
        if proto == ip.UDP and (d.sport == 53 or d.dport == 53):
            if d.sport == 53:
                self._dns(packet[d.payload_offset : d.payload_end])
            return
        rkey = ip.reverse_key(key)
        canonical, side = (key, 0) if key <= rkey else (rkey, 1)
        conn = self.conns.get(canonical)
        opens = proto == ip.TCP and ip.opens_connection(packet, l4)
        if conn is None and canonical in self.closed:
            if not opens:
                return  # the last ACK of a connection already closed
            self.closed.discard(canonical)
        if opens and conn is not None:
            tcp = conn.tcp
            assert tcp is not None
            base = tcp[side].base
            if conn.has_data() and (base is None or base != (d.seq + 1) % (1 << 32)):
                self._close(canonical, conn, False)  # the same ports, a new connection
                conn = None
        if conn is None:
            me, peer = (d.src, d.sport), (d.dst, d.dport)
            conn = _Conn(proto, (me, peer) if side == 0 else (peer, me), t)
            self.conns[canonical] = conn
        conn.last[side] = t
        if proto == ip.TCP:
            self._tcp(conn, side, t, packet, l4, d)
            tcp = conn.tcp
            assert tcp is not None
            if tcp[0].fin and tcp[1].fin:
                self._close(canonical, conn, True)  # its state is freed now, not at the end
        else:
            self._udp(conn, side, t, packet, d)

    def _dns(self, payload: bytes) -> None:
        try:
            answer = dns.parse_dns_response(payload)
        except ParseError:
            return
        for record in answer.records:
            name = answer.qname or record.names[0]
            if name:
                self.dns.setdefault(record.address, names.normalise(name))

    def _endpoint(self, conn: _Conn, side: int, packet: bytes, reset: bool) -> tuple[int, int | None]:
        """The packet's TTL and IP ID; remembered as its endpoint's usual unless it is a reset."""
        ttl, ip_id = ip.hop_limit(packet), ip.ipv4_id(packet)
        if not reset:
            counts = conn.ttls[side]
            counts[ttl] = counts.get(ttl, 0) + 1
            conn.last_id[side] = ip_id
        return ttl, ip_id

    def _tcp(self, conn: _Conn, side: int, t: float, packet: bytes, l4: int, d: ip.Decoded) -> None:
        tcp = conn.tcp
        assert tcp is not None
        me, peer = tcp[side], tcp[1 - side]
        flags = d.flags
        options = ip.tcp_options(packet, l4)
        ttl, ip_id = self._endpoint(conn, side, packet, bool(flags & ip.RST))
        if flags & ip.RST:
            counts = conn.ttls[side]
            usual = max(counts, key=counts.__getitem__) if counts else None
            conn.resets.append((t, side, ttl, ip_id, usual, conn.last_id[side], conn.sent_bytes(0), conn.sent_bytes(1)))
        if not flags & ip.RST:
            me.ident(t, ip_id, d.payload_length, peer.syn_mss)
        seq = d.seq
        if flags & ip.SYN:
            seq = (seq + 1) % (1 << 32)
            if me.base is None or not me.sent:
                me.base = seq
            me.syn_mss = options.mss
            if not flags & ip.ACK:
                if conn.client is None:
                    conn.client = side
                if conn.t_open is None:
                    conn.t_open = t
            else:
                if conn.client is None:
                    conn.client = 1 - side
                if conn.t_reply is None:
                    conn.t_reply = t
        elif flags & ip.ACK and side == conn.client and conn.t_reply is not None and conn.t_confirm is None:
            conn.t_confirm = t
        if d.payload_length:
            me.data(t, seq, d.payload_length, d.payload_offset + d.payload_length, ip_id)
            self._after(conn, side, t)
            if conn.heads[side] is not None and me.base is not None:
                self._head(conn, side, (seq - me.base) % (1 << 32), packet[d.payload_offset : d.payload_end],
                           d.payload_length)
        if flags & ip.ACK and not flags & ip.RST:
            peer.ack(t, ip.tcp_ack(packet, l4), options.sack)
        if options.tsval is not None:
            me.sent_ts(t, options.tsval)
        if d.payload_length and options.tsecr is not None:
            echoed = peer.ts_sent.pop(options.tsecr, None)
            if echoed is not None:
                me.echoed(t, echoed)
        if flags & ip.FIN:
            me.fin = True

    def _after(self, conn: _Conn, side: int, t: float) -> None:
        if conn.first_payload(1 - side) is not None and conn.reply_after[side] is None:
            conn.reply_after[side] = t

    def _head(self, conn: _Conn, side: int, start: int, data: bytes, length: int) -> None:
        """Add a segment to the side's stream head and try to read a name from it."""
        head = conn.heads[side]
        assert head is not None
        if len(data) < length:  # the capture cut the payload short: the name cannot be read
            conn.heads[side] = None
            return
        pending = conn.pending[side]
        if start > len(head):
            if start < _HEAD_LIMIT and len(pending) < _HEAD_PIECES:
                pending.setdefault(start, data)
            return
        grew = False
        while True:
            if start + len(data) > len(head):
                head += data[len(head) - start :]
                grew = True
            nxt = pending.pop(len(head), None) if len(head) in pending else None
            if nxt is None:
                break
            start, data = len(head), nxt
        if not grew:
            return
        found = _name(bytes(head[:_HEAD_LIMIT]))
        if found is not None or len(head) >= _HEAD_LIMIT:
            conn.heads[side] = None
            pending.clear()
            if found is not None and found[0]:
                conn.names[side] = found

    def _udp(self, conn: _Conn, side: int, t: float, packet: bytes, d: ip.Decoded) -> None:
        udp = conn.udp
        assert udp is not None
        self._endpoint(conn, side, packet, False)
        payload = packet[d.payload_offset : d.payload_end]
        if not d.payload_length:
            return
        udp[side].datagram(t, payload, d.payload_length, d.payload_offset + d.payload_length)
        self._after(conn, side, t)
        long_header = bool(payload) and payload[0] & 0x80
        if long_header and conn.client is None:
            try:
                header = quic.peek(payload)
            except ParseError:
                header = None
            if header is not None and header.kind == "initial":
                conn.client, conn.quic, conn.t_open = side, True, t
        if conn.client is None:
            return
        if side != conn.client and conn.t_reply is None and conn.t_open is not None:
            conn.t_reply = t
        elif side == conn.client and conn.t_reply is not None and conn.t_confirm is None:
            conn.t_confirm = t
        if side == conn.client and long_header and conn.names[side] is None and conn.heads[side] is not None:
            self._quic_hello(conn, side, payload)

    def _quic_hello(self, conn: _Conn, side: int, payload: bytes) -> None:
        try:
            if conn.crypto is None:
                conn.crypto = quic.CryptoStream()
            for initial in quic.parse_initials(payload):
                for offset, data in initial.crypto:
                    conn.crypto.add(offset, data)
            hello = quic.client_hello(conn.crypto.contiguous())
        except (ParseError, ImportError):
            return  # not an Initial this capture can read (another version, or its keys)
        if hello is not None:
            conn.heads[side] = None
            conn.crypto = None
            if hello.sni:
                conn.names[side] = (names.normalise(hello.sni), "quic")

    def _close(self, canonical: bytes, conn: _Conn, closed: bool) -> None:
        del self.conns[canonical]
        if closed:
            self.closed.add(canonical)
        if conn.has_data():
            self.keyed.extend(self.settle(_traces_of(conn, self.dns, self.path)))

    def settle(self, found: list[Keyed]) -> list[Keyed]:
        """What is kept of a connection's traces until `finish`: here all of them."""
        return found

    def finish(self) -> list[Keyed]:
        """Every trace, in the order the connections were closed or (the rest) began."""
        for canonical, conn in list(self.conns.items()):
            self._close(canonical, conn, False)
        self.closed.clear()
        for item in self.keyed:  # a name a DNS answer gave after the connection closed
            trace = item.trace
            if trace.server_name is None:
                name = self.dns.get(_address(trace.server))
                if name is not None:
                    trace.server_name, trace.name_source = name, "dns"
        self.keyed.sort(key=lambda item: item.trace.first)
        return self.keyed


_NO_NAME = ("", "")


def _name(head: bytes) -> tuple[str, str] | None:
    """(name, source) from a stream's first bytes; None: need more; `_NO_NAME`: none to be read."""
    if not head:
        return None
    try:
        if head[0] == tls.CONTENT_HANDSHAKE:
            hello = tls.parse_client_hello(head)
            if hello is None:
                return None
            return (names.normalise(hello.sni), "tls") if hello.sni else _NO_NAME
        if http.looks_like_http_request(head):
            request = http.parse_http_host(head)
            if request is None:
                return None
            return (names.normalise(request.host), "http") if request.host else _NO_NAME
    except ParseError:
        pass
    return _NO_NAME


def _address(endpoint: str) -> bytes:
    """The packed address of an "ip:port" or "[v6]:port" endpoint."""
    return ipaddress.ip_address(endpoint.rsplit(":", 1)[0].strip("[]")).packed


def _endpoint_text(address: bytes, port: int) -> str:
    if len(address) == 4:
        return f"{ipaddress.IPv4Address(address)}:{port}"
    return f"[{ipaddress.IPv6Address(address)}]:{port}"


def _near(conn: _Conn) -> int | None:
    """The side whose end of the path the capture was taken at, from the opening exchange's timing."""
    if conn.t_open is None or conn.t_reply is None or conn.t_confirm is None or conn.client is None:
        return None
    out, back = conn.t_reply - conn.t_open, conn.t_confirm - conn.t_reply
    if out < 0 or back < 0:
        return None
    if out > _DECISIVE * back:
        return conn.client
    if back > _DECISIVE * out:
        return 1 - conn.client
    return None


def _evidence(side: TcpSide) -> Vantage | None:
    holes = sum(1 for entry in side.hole_log if entry[3] != 2)
    if side.rexmit_seen > holes:
        return "sender"
    if holes > side.rexmit_seen:
        return "receiver"
    return None


def _vantages(conn: _Conn) -> tuple[Vantage, Vantage]:
    """Each side's vantage as the sender of its direction (see the module docstring)."""
    flip: dict[Vantage | None, Vantage] = {"sender": "receiver", "receiver": "sender", None: "unknown"}
    own: list[Vantage | None] = [None, None]
    if conn.tcp is not None:
        own = [_evidence(conn.tcp[0]), _evidence(conn.tcp[1])]
    near = None
    if conn.udp is not None:  # the spin bit's timing: a QUIC handshake's also holds its cryptography
        near = spin_rtts(conn.udp[0].edges, conn.udp[1].edges)[1]
    if near is None:
        near = _near(conn)
    out: list[Vantage] = []
    for side in (0, 1):
        mine, theirs = own[side], own[1 - side]
        if mine is not None:
            out.append(mine)
        elif theirs is not None:
            out.append(flip[theirs])
        elif near is not None:
            out.append("sender" if near == side else "receiver")
        else:
            out.append("unknown")
    return out[0], out[1]


def _traces_of(conn: _Conn, dns_names: dict[bytes, str], path: str) -> list[Keyed]:
    """The FlowTraces of one connection's directions that carried data, each with its packets'
    keys for matching against another capture (TCP: IPv4 IDs; UDP: payload hashes)."""
    mid_flow = conn.client is None
    client = conn.client
    if client is None:
        client = 0 if conn.ends[0][1] > conn.ends[1][1] else 1
    server = 1 - client
    transport: Transport = "tcp" if conn.proto == ip.TCP else (
        "quic" if conn.quic or conn.ends[server][1] == 443 else "udp")
    name = conn.names[client]
    if name is None and conn.ends[server][0] in dns_names:
        name = (dns_names[conn.ends[server][0]], "dns")
    hello_at = conn.first_payload(client)
    reply = conn.reply_after[server]
    handshake = None if hello_at is None or reply is None else reply - hello_at
    vantages = _vantages(conn)
    opening: list[tuple[float, float]] = []
    if conn.t_open is not None and conn.t_confirm is not None and conn.t_confirm >= conn.t_open:
        opening.append((conn.t_confirm, conn.t_confirm - conn.t_open))
    out = []
    for side in (client, server):
        if not conn.sent_bytes(side):
            continue
        trace = FlowTrace(
            client=_endpoint_text(*conn.ends[client]),
            server=_endpoint_text(*conn.ends[server]),
            transport=transport,
            direction="upload" if side == client else "download",
            server_name=name[0] if name else None,
            name_source=name[1] if name else None,
            vantage=vantages[side],
            started_mid_flow=mid_flow,
            first=conn.first,
            last=conn.last[side],
            hello_at=hello_at,
            handshake=handshake,
            files=(path,),
        )
        trace.resets = [
            Reset(t, who == client, ttl, ip_id, usual, last_id, sent0 if side == 0 else sent1)
            for t, who, ttl, ip_id, usual, last_id, sent0, sent1 in conn.resets
        ]
        if conn.tcp is not None:
            _fill_tcp(trace, conn.tcp[side], conn.tcp[1 - side], opening)
            out.append(Keyed(trace, conn.tcp[side].ip_ids))
        else:
            assert conn.udp is not None
            _fill_udp(trace, conn.udp[side], conn.udp[1 - side], opening)
            out.append(Keyed(trace, conn.udp[side].hashes))
    return out


def _fill_tcp(trace: FlowTrace, me: TcpSide, peer: TcpSide, opening: list[tuple[float, float]]) -> None:
    mss = me.max_payload
    if peer.syn_mss and mss > peer.syn_mss:
        mss = peer.syn_mss  # larger "packets" are the sending host's offload, not the wire's
    trace.mss = mss
    trace.header_bytes = me.header_bytes
    trace.sent = me.sent
    trace.acks = me.acks
    trace.fin = me.fin
    trace.payload = me.high - me.open_hole_bytes
    if trace.vantage == "sender":
        trace.losses = me.losses_at_sender()
        samples = me.rtt_sender
    elif trace.vantage == "receiver":
        trace.losses = me.receiver_losses(mss, me.header_bytes)
        samples = me.rtt_receiver
    else:
        samples = []
    trace.rtt = sorted(opening + samples)
    trace.base_rtt = min((s for _, s in trace.rtt), default=None)
    if me.acks_seen:
        trace.delivered = min(me.acked, me.high)  # an ACK of the FIN counts one more
    elif trace.vantage == "receiver":
        trace.delivered = me.contiguous()


def _fill_udp(trace: FlowTrace, me: UdpSide, peer: UdpSide, opening: list[tuple[float, float]]) -> None:
    trace.mss = me.max_payload
    trace.header_bytes = me.header_bytes
    trace.sent = me.sent
    trace.payload = me.total
    trace.delivered = me.total if trace.vantage == "receiver" else 0
    trace.losses_known = False
    trace.gap_acks, trace.acks_seen = gap_acks(peer.small)
    spins, _ = spin_rtts(me.edges, peer.edges)
    # a QUIC handshake's time holds both ends' cryptography (tens of ms in a Python stack): a round
    # trip only when the spin bit gives none
    trace.rtt = spins or list(opening)
    trace.base_rtt = min((s for _, s in trace.rtt), default=None)


def read_capture(path: str | os.PathLike[str], make: Callable[[str], Capture] = Capture) -> tuple[list[Keyed], str | None]:
    """One capture's traces (`Capture.finish`) and the problem that stopped it early, if any."""
    name = os.fsdecode(path)
    capture = make(name)
    problem: str | None = None
    try:
        for t, packet in pcap.read_packets(name):
            capture.feed(t, packet)
    except CaptureError as exc:
        problem = str(exc)
    return capture.finish(), problem


def read_traces(paths: Iterable[str | os.PathLike[str]]) -> Reading:
    """Every flow direction that carried data in the captures, each capture's in the order its
    connections began (client direction first); two captures of one connection (given together, one at each side) become
    one matched trace per direction (`FlowTrace.matched`). Never raises for a capture's content."""
    keyed: list[Keyed] = []
    problems: list[str] = []
    for path in paths:
        found, problem = read_capture(path)
        keyed.extend(found)
        if problem is not None:
            problems.append(problem)
    return Reading(join_pairs(keyed), problems)
