"""Inspection: reading names out of a flow's first packets, as the scenario's model says to.

The 2021 TSPU (docs/incidents.md §1.5-6) looked at the first data packet per direction, kept looking
for 15-20 more once it saw a TLS record (or HTTP, or an HTTP-proxy or SOCKS handshake: `engine.proxy`,
§1.5, §1.7), gave up for good on an unparseable first packet
of 101 bytes or more, read one TLS record per segment and never reassembled TCP. The reassembling
model joins a direction's segments in order up to a bound and reads every ClientHello in the
stream. Names come from the TLS SNI, the HTTP Host header, the SNI of a QUIC Initial's ClientHello,
and addresses learned from DNS answers (the CDN-hostname path).

This module reads bytes and keeps per-direction windows; it decides nothing. The engine
(`throttle.engine.core`) takes the names it finds to the rules.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from throttle.engine import proxy
from throttle.engine.events import EngineError, Event, NameLearned
from throttle.engine.flows import NameSource, Side
from throttle.errors import ParseError
from throttle.scenario import Model
from throttle.wire import dns, http, quic, tls
from throttle.wire.names import normalise

# A name as sent ("" for a complete hello without SNI), its source, and whether the hello that
# carried it had an encrypted_client_hello extension (docs/incidents.md §4.29).
Found = tuple[str, NameSource, bool]


class Inspector:
    """The model's inspection of TCP payloads, and the addresses learned from DNS answers."""

    def __init__(self, model: Model, emit: Callable[[Event], None]) -> None:
        self.model = model
        self.holes = 0  # data segments that arrived before the direction's first one (see `tcp`)
        self._emit = emit
        self.sources = frozenset(model.name_sources)
        self.max_inspected = model.window_packets + model.window_extension
        self._dns: OrderedDict[bytes, tuple[tuple[str, ...], float]] = OrderedDict()

    # ---- TCP -------------------------------------------------------------------------------
    def tcp(self, side: Side, payload: bytes, seq: int, peer: Side | None = None) -> tuple[list[Found], bool]:
        """Inspect one data segment of a direction: (names found, in order; whether inspection of
        the whole flow gives up for good, §5). `peer` is the other direction (for proxy replies)."""
        if side.closed:
            return [], False
        model = self.model
        if not model.reassemble and side.inspected == 0 and side.next_seq >= 0 and seq != side.next_seq:
            # The SYN was seen, and this segment starts after a hole: the direction's first data
            # segment (at ISN+1) has not arrived, lost on the way or overtaken. It is not "the first
            # packet" of §5; the device waits for that one (the window bounds how long, see
            # Engine._window_over). Without this, one lost ClientHello lets the flow go free.
            self.holes += 1
            return [], False
        if model.reassemble:
            data = self._reassemble(side, payload, seq)
            if data is None:
                return [], False
        else:
            data = payload
        side.inspected += 1
        side.budget -= 1
        first = side.inspected == 1
        found: list[Found] = []
        # §1.5, §1.7: an HTTP CONNECT or SOCKS handshake is recognised and stepped over; the
        # ClientHello inside the tunnel that follows is read as if it opened the connection.
        pos = side.tunnel if model.reassemble else 0
        proxied = False
        in_proxy: list[Found] = []
        while peer is not None:
            kind, length = proxy.message(data[pos:], side.proxy, peer.proxy)
            if not kind:
                break
            if kind == "http" and side.proxy == "" and "http" in self.sources:
                name, source, _, _ = self._find_name(data[pos : pos + length])  # the CONNECT's Host
                if name and source:
                    in_proxy.append((name, source, False))
            side.proxy, pos, proxied = kind, pos + length, True
        if model.reassemble:
            side.tunnel = pos
            side.tls_offset = max(side.tls_offset, pos)
        stream = data[pos:] if pos else data
        if model.reassemble and "tls" in self.sources and tls.is_tls_record(data[side.tunnel:]):
            found = [(name, "sni", ech) for name, ech in self._stream_names(side, data)]
            recognised = True
        elif stream:
            name, source, recognised, ech = self._find_name(stream)
            if name is not None and source:
                found = [(name, source, ech)]
        else:
            recognised = False
        recognised = recognised or proxied
        if in_proxy:
            found = in_proxy + found
        if recognised and not side.extended:
            side.extended = True
            side.budget += model.window_extension
        elif not recognised and first and len(payload) >= model.give_up_bytes and not model.reassemble:
            # §5: an unparseable first packet of 101 bytes or more ends inspection for good.
            return [], True
        elif not recognised and first:
            side.budget += 1  # a short unknown first packet does not use up the window
        if side.budget <= 0 or side.inspected >= self.max_inspected:
            side.closed = True
        return found, False

    def _stream_names(self, side: Side, data: bytes) -> list[tuple[str, bool]]:
        """Reassembling model: the SNI of every ClientHello completed in the stream since last time.

        Records before a hello (a ChangeCipherSpec, a decoy hello) are stepped over, so neither
        the `ccs` nor the `fake` trick of §7 hides the real hello from a censor that reads the
        stream ("" stands for a hello without SNI)."""
        names = []
        pos = side.tls_offset
        while len(data) - pos >= 5 and tls.is_tls_record(data[pos : pos + 3]):
            if data[pos] != tls.CONTENT_HANDSHAKE:
                end = pos + 5 + (data[pos + 3] << 8 | data[pos + 4])
                if end > len(data):
                    break
                pos = end
                continue
            try:
                hello = tls.parse_client_hello(data[pos:])
            except tls.TLSParseError:
                pos = len(data)  # not a hello: nothing further in this stream is read
                break
            if hello is None:
                break
            names.append((hello.sni or "", hello.has_ech))
            pos += hello.length
        side.tls_offset = pos
        return names

    def _find_name(self, data: bytes) -> tuple[str | None, NameSource | None, bool, bool]:
        """(name or None, its source, whether the bytes were recognised as TLS or HTTP, whether
        the hello had ECH)."""
        if tls.is_tls_record(data):
            if "tls" not in self.sources:
                return None, "sni", True, False
            try:
                hello = tls.parse_client_hello(data, first_record_only=not self.model.reassemble)
            except tls.TLSParseError:
                return None, "sni", True, False
            if hello is None:
                return None, "sni", True, False
            # A complete hello without SNI gives "": the DNS name may apply.
            return hello.sni or "", "sni", True, hello.has_ech
        if http.looks_like_http_request(data):
            if "http" not in self.sources:
                return None, "host", True, False
            try:
                head = http.parse_http_host(data)
            except ParseError:
                return None, "host", True, False
            if head is None or head.host is None:
                return None, "host", True, False
            return head.host, "host", True, False
        return None, None, False, False

    def _reassemble(self, side: Side, payload: bytes, seq: int) -> bytes | None:
        """Append in-order bytes to the direction's stream; None when nothing new is in order."""
        if side.next_seq < 0:
            side.next_seq = seq
        limit = self.model.reassembly_limit
        offset = (seq - side.next_seq) & 0xFFFFFFFF
        if offset >= 0x80000000:  # starts before next_seq: a retransmission, maybe with new bytes
            overlap = (side.next_seq - seq) & 0xFFFFFFFF
            if overlap >= len(payload):
                return None
            payload, seq, offset = payload[overlap:], side.next_seq, 0
        if offset > 0:
            if len(side.buffer) + offset + len(payload) <= limit and len(side.pending) < 64:
                side.pending[seq] = payload
            return None
        grown = side.buffer + payload
        side.next_seq = (seq + len(payload)) & 0xFFFFFFFF
        while side.next_seq in side.pending:
            more = side.pending.pop(side.next_seq)
            grown += more
            side.next_seq = (side.next_seq + len(more)) & 0xFFFFFFFF
        side.buffer = grown[:limit]
        return side.buffer

    # ---- QUIC ------------------------------------------------------------------------------
    def quic(self, side: Side, payload: bytes, now: float, version: int | None) -> tuple[list[Found], bool]:
        """Inspect one client-to-server datagram of a UDP flow for a QUIC Initial's ClientHello:
        (names found; whether the flow is not QUIC and inspection gives up).

        The reassembling model collects the CRYPTO frames of every Initial the client sends in its
        window, at whatever offsets they come (Chromium shuffles them across two datagrams,
        docs/incidents.md §4.28), up to `reassembly_limit` bytes. The other model reads the first
        datagram alone, as a device that parses one packet does: the hello must be whole, in order,
        in it. `version`: the datagram's QUIC Initial version (`initial_version`), None if it is none."""
        if side.closed:
            return [], False
        first = side.inspected == 0
        side.inspected += 1
        side.budget -= 1
        found: list[Found] = []
        if version is None:
            if first:
                return [], True  # not QUIC (or not its start): nothing here for the censor to read
            return self._quic_window(side, found)
        if not side.extended:
            side.extended = True
            side.budget += self.model.window_extension
        if "quic" not in self.sources:
            side.closed = True
            return [], False
        try:
            if not self.model.reassemble:
                side.closed = True  # one datagram is all this model reads
                hello = quic.first_datagram_hello(payload)
            else:
                stream = side.quic
                if stream is None:
                    stream = side.quic = quic.CryptoStream(self.model.reassembly_limit)
                for packet in quic.parse_initials(payload):
                    for offset, data in packet.crypto:
                        stream.add(offset, data)
                hello = quic.client_hello(stream.contiguous())
        except ParseError as exc:
            # Not decryptable with the client's Initial keys (a later Initial after the server
            # chose its connection ID, or garbage), or not a hello: nothing read from this one.
            self._emit(EngineError("quic", str(exc), now))
            if first:
                return [], True
            return self._quic_window(side, found)
        if hello is not None:
            found.append((hello.sni or "", "quic", hello.has_ech))
            side.closed = True  # a connection sends one ClientHello
            side.quic = None
        return self._quic_window(side, found)

    def _quic_window(self, side: Side, found: list[Found]) -> tuple[list[Found], bool]:
        if side.budget <= 0 or side.inspected >= self.max_inspected:
            side.closed = True
            side.quic = None
        return found, False

    @staticmethod
    def initial_version(payload: bytes) -> int | None:
        """The version of a QUIC Initial (a cheap look at the long header), else None."""
        try:
            header = quic.peek(payload)
        except quic.QuicParseError:
            return None
        return header.version if header is not None and header.kind == "initial" else None

    # ---- DNS -------------------------------------------------------------------------------
    def udp_inspectable(self, server_port: int, client_port: int) -> bool:
        return "dns" in self.sources and (server_port == 53 or client_port == 53)

    def dns_answer(self, payload: bytes, now: float) -> None:
        """Learn address -> names from a DNS response, each until its TTL runs out."""
        try:
            response = dns.parse_dns_response(payload)
        except ParseError as exc:
            self._emit(EngineError("dns", str(exc), now))
            return
        for record in response.records:
            names = tuple(normalise(n, strip_trailing_dot=True) for n in record.names)
            self._dns[record.address] = (names, now + record.ttl)
            self._dns.move_to_end(record.address)
            self._emit(NameLearned(record.address, names, record.ttl, now))
        while len(self._dns) > self.model.dns_max_entries:
            self._dns.popitem(last=False)

    @property
    def learned(self) -> int:
        """Addresses with names learned from DNS, remembered now."""
        return len(self._dns)

    def learned_names(self, address: bytes, now: float) -> tuple[str, ...]:
        """The names a DNS answer gave for `address`, while its TTL lasts."""
        if "dns" not in self.sources:
            return ()
        learned = self._dns.get(address)
        if learned is not None and learned[1] > now:
            return learned[0]
        return ()
