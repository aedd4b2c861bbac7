"""Fidelity to the 2021 device and later incidents (issue 12), with crafted conversations and a
literal clock: proxies do not evade (§1.5, §1.7)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from throttle.engine import Engine, State, Verdict
from throttle.scenario import load_scenario

from .packets import Conversation, python_hello

ROOT = Path(__file__).resolve().parent.parent
DAY_ONE = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")

# A Squid reply to CONNECT: 112 bytes, over the 2021 device's 101-byte give-up size (§1.5).
SQUID_REPLY = (b"HTTP/1.1 200 Connection established\r\n"
               b"Via: 1.1 proxy.example.net (squid/5.7.1)\r\n"
               b"Proxy-Agent: squid/5.7 (labs)\r\n\r\n")


def engine(scenario=DAY_ONE, **model_changes) -> Engine:
    return Engine(dataclasses.replace(scenario.model, **model_changes), scenario.rules)


def feed(e: Engine, packets: list[bytes], now: float = 1.0) -> list[Verdict]:
    return [e.process(p, now)[0] for p in packets]


def socks5_request(host: str, port: int = 443) -> bytes:
    name = host.encode()
    return b"\x05\x01\x00\x03" + bytes((len(name),)) + name + port.to_bytes(2, "big")


def proxied(kind: str, name: str) -> list[tuple[int, bytes]]:
    """A proxy handshake then a ClientHello inside the tunnel: (direction, payload) in order."""
    hello = python_hello(name)
    if kind == "connect":
        request = f"CONNECT {name}:443 HTTP/1.1\r\nHost: {name}:443\r\nUser-Agent: curl/7.88.1\r\n\r\n".encode()
        return [(0, request), (1, SQUID_REPLY), (0, hello)]
    if kind == "socks5":
        return [(0, b"\x05\x01\x00"), (1, b"\x05\x00"), (0, socks5_request(name)),
                (1, b"\x05\x00\x00\x01\xc6\x12\x02\x02\x01\xbb"), (0, hello)]
    if kind == "socks5-auth":
        return [(0, b"\x05\x02\x00\x02"), (1, b"\x05\x02"), (0, b"\x01\x04user\x04pass"), (1, b"\x01\x00"),
                (0, socks5_request(name)), (1, b"\x05\x00\x00\x01\xc6\x12\x02\x02\x01\xbb"), (0, hello)]
    if kind == "socks4a":
        request = b"\x04\x01\x01\xbb\x00\x00\x00\x01" + b"lab\x00" + name.encode() + b"\x00"
        return [(0, request), (1, b"\x00\x5a\x00\x00\x00\x00\x00\x00"), (0, hello)]
    assert kind == "socks4"
    return [(0, b"\x04\x01\x01\xbb\xc6\x12\x02\x02lab\x00"), (1, b"\x00\x5a\x01\xbb\xc6\x12\x02\x02"), (0, hello)]


def through_proxy(e: Engine, kind: str, name: str) -> Conversation:
    conv = Conversation(server_port=1080 if kind.startswith("socks") else 3128)
    feed(e, conv.handshake())
    for d, payload in proxied(kind, name):
        feed(e, [conv.client(payload) if d == 0 else conv.server(payload)])
    return conv


# ---- 1. proxies did not evade (§1.5, §1.7) -------------------------------------------------
def test_the_squid_reply_is_past_the_give_up_size() -> None:
    assert len(SQUID_REPLY) == 112 >= DAY_ONE.model.give_up_bytes


@pytest.mark.parametrize("kind", ["connect", "socks5", "socks5-auth", "socks4", "socks4a"])
@pytest.mark.parametrize("reassemble", [False, True])
def test_a_hello_behind_a_proxy_handshake_is_limited(kind: str, reassemble: bool) -> None:
    e = engine(reassemble=reassemble)
    conv = through_proxy(e, kind, "pbs.twimg.com")
    (flow,) = e.flows()
    assert (flow.state, flow.name, flow.name_source) == (State.LIMITED, "pbs.twimg.com", "sni"), kind
    # ... and policed: past the 16 KB burst the server's data is dropped.
    verdicts = feed(e, [conv.server(b"\xab" * 1448) for _ in range(40)], now=1.5)
    assert Verdict.DROP in verdicts


@pytest.mark.parametrize("kind", ["connect", "socks5"])
def test_an_other_name_behind_a_proxy_is_read_and_not_limited(kind: str) -> None:
    e = engine()
    through_proxy(e, kind, "example.org")
    (flow,) = e.flows()
    assert flow.name == "example.org" and flow.state != State.LIMITED


def test_an_http_reply_without_a_connect_still_ends_inspection() -> None:
    """Only a proxy's reply is recognised: a 112-byte HTTP reply to anything but CONNECT (or SOCKS)
    is an unparseable first packet of the server's direction, as before (§1.5)."""
    e = engine()
    conv = Conversation(server_port=8080)
    feed(e, conv.handshake() + [conv.client(b"\x01\x02\x03"), conv.server(SQUID_REPLY)])
    (flow,) = e.flows()
    assert flow.state == State.PASSED
