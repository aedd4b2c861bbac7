"""Proxy handshakes the 2021 device looked through: HTTP CONNECT and SOCKS (docs/incidents.md §1.5, §1.7).

"When that packet is ... HTTP-proxy or SOCKS traffic, it keeps looking" (§1.5), and plain HTTP or
SOCKS proxies did not evade (§1.7): the ClientHello that follows the proxy's handshake, inside the
tunnel, was read. `message` recognises one proxy handshake message at the start of a direction's
data: the client's request (an HTTP CONNECT request; a SOCKS5 greeting, its username/password
sub-negotiation or its request; a SOCKS4/4a request) and, once the other direction sent a request,
the proxy's reply (an HTTP status line; the SOCKS5 method choice, authentication status or reply; a
SOCKS4 reply). The inspector counts a recognised message as it counts a TLS record: the window is
extended, and the 101-byte give-up rule does not apply to it. Sans-I/O; reads bytes only.
"""

from __future__ import annotations

from typing import Literal

# What a direction's proxy handshake messages were: the client's requests (http, socks5, socks4) or
# the proxy's replies (http-reply, socks5-reply, socks4-reply); "" before any.
Kind = Literal["", "http", "socks5", "socks4", "http-reply", "socks5-reply", "socks4-reply"]

_CONNECT = b"CONNECT "
_STATUS = (b"HTTP/1.0 ", b"HTTP/1.1 ")


def _socks5_address_end(data: bytes, at: int) -> int:
    """Where a SOCKS5 address (ATYP, address, port) starting at `at` ends, or -1."""
    if len(data) <= at:
        return -1
    atyp = data[at]
    if atyp == 1:
        return at + 1 + 4 + 2
    if atyp == 4:
        return at + 1 + 16 + 2
    if atyp == 3 and len(data) > at + 1 and data[at + 1] > 0:
        return at + 2 + data[at + 1] + 2
    return -1


def _head_end(data: bytes) -> int:
    end = data.find(b"\r\n\r\n")
    return end + 4 if end >= 0 else len(data)


def message(data: bytes, own: Kind, peer: Kind) -> tuple[Kind, int]:
    """(what the proxy handshake message at the start of `data` is, its length in bytes), or
    ("", 0) when it is none. `own`: what this direction's earlier messages were; `peer`: the other
    direction's (a reply is recognised only after a request)."""
    n = len(data)
    if n < 2:
        return "", 0
    first = data[0]
    if own == "" and peer == "":  # a client's first message
        if data.startswith(_CONNECT):
            line_end = data.find(b"\r\n")
            if b" HTTP/1." in (data[:line_end] if line_end >= 0 else data):
                return "http", _head_end(data)
            return "", 0
        if first == 5 and 1 <= data[1] and n == 2 + data[1]:
            return "socks5", n  # greeting: version, number of methods, the methods
        if first == 4 and data[1] in (1, 2) and n >= 9:  # SOCKS4: version, command, port, IPv4, user id, NUL
            user_end = data.find(b"\x00", 8)
            if user_end < 0:
                return "", 0
            if data[4:7] == b"\x00\x00\x00" and data[7] != 0:  # SOCKS4a: a host name follows
                host_end = data.find(b"\x00", user_end + 1)
                return ("socks4", host_end + 1) if host_end > user_end + 1 else ("", 0)
            return "socks4", user_end + 1
        return "", 0
    if own == "socks5":  # the client after its greeting: username/password (RFC 1929), then the request
        if first == 1 and n >= 3:
            ulen = data[1]
            if ulen >= 1 and n > 2 + ulen and n == 3 + ulen + data[2 + ulen]:
                return "socks5", n
        if first == 5 and n >= 7 and data[1] in (1, 2, 3) and data[2] == 0:  # CONNECT, BIND, UDP ASSOCIATE
            end = _socks5_address_end(data, 3)
            if end == n:
                return "socks5", n
        return "", 0
    if own not in ("", "http-reply", "socks5-reply", "socks4-reply"):
        return "", 0
    if peer == "http" and own == "" and data.startswith(_STATUS) and data[9:12].isdigit():
        return "http-reply", _head_end(data)
    if peer == "socks5":  # the proxy: method choice or authentication status (2 bytes), then the reply
        if n == 2 and first in (1, 5):
            return "socks5-reply", 2
        if first == 5 and n >= 7 and data[1] <= 8 and data[2] == 0:
            end = _socks5_address_end(data, 3)
            if 0 < end <= n:
                return "socks5-reply", end
        return "", 0
    if peer == "socks4" and own == "" and n >= 8 and first == 0 and 90 <= data[1] <= 93:
        return "socks4-reply", 8
    return "", 0
