"""The engine on QUIC flows: names from Initial packets under both models, version rules, ECH,
drops after the match (docs/incidents.md §4.25-29). Client Initials come from a real QUIC
client (aioquic); the clock is literal."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from throttle.engine import Engine, State, Verdict
from throttle.scenario import parse_scenario

from .packets import quic_initials, udp

CLIENT, SERVER, ALLOWED = "198.18.0.2", "198.18.1.2", "198.18.1.3"
SHORT = bytes((0x40,)) + bytes(1199)  # a 1-RTT (short header) packet


def scenario(rules: str, reassemble: bool = True, sources: str = '["tls", "quic"]'):
    return parse_scenario(f"""
[scenario]
name = "t"
[model]
reassemble = {str(reassemble).lower()}
name_sources = {sources}
{rules}
""", "t.toml")


VIDEO = """
[[rule]]
name = "video"
match = ["*.googlevideo.com"]
transport = "udp"
rate = "512kbit"
burst = "4KB"
"""


def engine(text: str = VIDEO, **kw) -> Engine:
    s = scenario(text, **kw)
    return Engine(s.model, s.rules)


def send(e: Engine, datagrams: list[bytes], port: int = 40000, server: str = SERVER, now: float = 1.0) -> list[Verdict]:
    return [e.process(udp(CLIENT, server, port, 443, d), now)[0] for d in datagrams]


def flow_of(e: Engine, port: int = 40000):
    return next(f for f in e.flows() if f.client_port == port)


def test_a_quic_initial_names_the_flow_and_the_udp_rule_limits_it() -> None:
    e = engine()
    send(e, quic_initials("rr1---sn-xxx.googlevideo.com"))
    flow = flow_of(e)
    assert flow.state == State.LIMITED and flow.name == "rr1---sn-xxx.googlevideo.com"
    assert flow.name_source == "quic" and flow.transport == "udp"
    # The policer: a burst of 4 KB, then drops for a flood at one instant.
    verdicts = [e.process(udp(SERVER, CLIENT, 443, 40000, SHORT), 1.0)[0] for _ in range(20)]
    assert Verdict.DROP in verdicts and verdicts[0] == Verdict.ACCEPT


def test_other_names_pass_and_are_handed_to_the_kernel() -> None:
    e = engine()
    send(e, quic_initials("example.org"))
    assert flow_of(e).state == State.PASSED  # one hello per connection: the decision is made
    assert send(e, [SHORT]) == [Verdict.BYPASS]


def test_tcp_rules_do_not_apply_to_quic_and_udp_rules_not_to_tls() -> None:
    e = engine(VIDEO.replace('"udp"', '"tcp"'))
    send(e, quic_initials("rr1.googlevideo.com"))
    assert flow_of(e).state == State.PASSED


def test_without_quic_in_the_name_sources_udp_passes_at_once() -> None:
    e = engine(sources='["tls"]')
    send(e, quic_initials("rr1.googlevideo.com"))
    assert flow_of(e).state == State.PASSED and flow_of(e).name is None


def test_not_quic_passes_at_once_without_an_error() -> None:
    e = engine()
    send(e, [b"\x17\x03\x03 hello, not quic" * 10])
    assert flow_of(e).state == State.PASSED
    assert e.counters.malformed == 0 and e.counters.internal == 0


def test_a_hello_over_two_datagrams_needs_the_reassembling_model() -> None:
    datagrams = quic_initials("rr1.googlevideo.com", padding_alpn=8)
    assert len(datagrams) == 2  # the hello is larger than one 1,200-byte datagram
    e = engine()
    send(e, datagrams)
    assert flow_of(e).state == State.LIMITED
    first_only = engine(reassemble=False)
    send(first_only, datagrams)
    assert flow_of(first_only).state == State.PASSED and flow_of(first_only).name is None


def test_the_first_datagram_model_reads_a_hello_that_fits() -> None:
    e = engine(reassemble=False)
    send(e, quic_initials("rr1.googlevideo.com"))
    assert flow_of(e).state == State.LIMITED


V1_DROP = """
[[rule]]
name = "quic-v1"
quic_versions = [1]
allow = ["198.18.1.3/32"]
action = "drop"

[[rule]]
name = "sni"
match = ["*.facebook.com"]
transport = "udp"
action = "drop"
"""


def test_version_rule_drops_quic_v1_after_its_first_initial_except_to_allowed_servers() -> None:
    e = engine(V1_DROP, reassemble=False)
    first, *_ = send(e, quic_initials("vk.com"))
    flow = flow_of(e)
    assert flow.state == State.LIMITED and flow.rule is not None and flow.rule.name == "quic-v1"
    assert flow.name_source == "version"
    assert first == Verdict.ACCEPT  # the packet that matched passes; the drops start after it
    assert send(e, [SHORT, SHORT]) == [Verdict.DROP, Verdict.DROP]
    assert e.process(udp(SERVER, CLIENT, 443, 40000, SHORT), 1.0)[0] == Verdict.DROP
    # The allowed server: QUIC v1 goes on, unless the name is on the list (§4.25's two layers).
    send(e, quic_initials("vk.com"), port=40001, server=ALLOWED)
    assert flow_of(e, 40001).state == State.PASSED
    send(e, quic_initials("www.facebook.com"), port=40002, server=ALLOWED)
    assert flow_of(e, 40002).state == State.LIMITED and flow_of(e, 40002).rule.name == "sni"


def test_version_rule_leaves_other_versions_alone() -> None:
    e = engine(V1_DROP.replace("quic_versions = [1]", "quic_versions = [0x6b3343cf]"), reassemble=False)
    send(e, quic_initials("vk.com"))  # version 1
    assert flow_of(e).state == State.PASSED


ECH = """
[[rule]]
name = "ech"
match = ["cloudflare-ech.com"]
ech = true
action = "drop"
"""


def test_ech_rule_needs_both_the_name_and_the_extension() -> None:
    e = engine(ECH)
    send(e, quic_initials("cloudflare-ech.com", ech=True), port=1)
    send(e, quic_initials("cloudflare-ech.com"), port=2)
    send(e, quic_initials("example.org", ech=True), port=3)
    assert [flow_of(e, p).state for p in (1, 2, 3)] == [State.LIMITED, State.PASSED, State.PASSED]


def test_dns_is_still_read_when_quic_is_inspected() -> None:
    from scapy.all import raw  # type: ignore[import-untyped]
    from scapy.layers.dns import DNS, DNSQR, DNSRR  # type: ignore[import-untyped]

    s = scenario(VIDEO, sources='["tls", "quic", "dns"]')
    e = Engine(s.model, s.rules)
    answer = raw(DNS(id=0x8123, qr=1, qd=DNSQR(qname="rr1.googlevideo.com"),
                     an=DNSRR(rrname="rr1.googlevideo.com", ttl=60, rdata=SERVER)))
    e.process(udp(CLIENT, "198.18.1.1", 5353, 53, b"\x81\x23" + bytes(20)), 1.0)
    e.process(udp("198.18.1.1", CLIENT, 53, 5353, answer), 1.0)
    assert e.table_sizes()["dns"] == 1


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_initials_never_cause_an_internal_error(data: st.DataObject) -> None:
    datagrams = quic_initials("rr1.googlevideo.com", padding_alpn=data.draw(st.integers(0, 8)))
    e = engine(reassemble=data.draw(st.booleans()))
    for d in datagrams:
        b = bytearray(d)
        for _ in range(data.draw(st.integers(0, 4))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(1, len(b)))
        e.process(udp(CLIENT, SERVER, 40000, 443, bytes(b[:cut])), 1.0)
    assert e.counters.internal == 0
    assert [ev for ev in e.drain_events() if getattr(ev, "kind", "") == "internal"] == []
