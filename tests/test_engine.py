"""The censor engine with crafted conversations and a literal clock (docs/incidents.md §1-§20)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR, DNSRR  # type: ignore[import-untyped]

from tests.conftest import ROOT
from throttle.engine import Engine, FlowDecided, FlowEnded, Limited, State, Verdict
from throttle.scenario import load_scenario, parse_scenario

from .packets import Conversation, python_hello, udp

DAY_ONE = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
FIXED = load_scenario(ROOT / "scenarios/twitter-2021-04-02.toml")
MEDIA = load_scenario(ROOT / "scenarios/media-upload.toml")


def engine(scenario=DAY_ONE, **model_changes) -> Engine:
    model = dataclasses.replace(scenario.model, **model_changes)
    return Engine(model, scenario.rules)


def run(e: Engine, packets: list[bytes], now: float = 1.0) -> list[Verdict]:
    return [e.process(p, now)[0] for p in packets]


def open_tls(e: Engine, name: str | None, conv: Conversation | None = None, **kw) -> Conversation:
    conv = conv or Conversation(**kw)
    run(e, conv.handshake() + [conv.client(python_hello(name))])
    return conv


def only_flow(e: Engine):
    (flow,) = e.flows()
    return flow


@pytest.mark.parametrize(
    "scenario,name,limited",
    [
        (DAY_ONE, "pbs.twimg.com", True),
        (DAY_ONE, "www.microsoft.com", True),  # §2: the *t.co* substring bug
        (DAY_ONE, "reddit.com", True),
        (DAY_ONE, "example.org", False),
        (FIXED, "www.microsoft.com", False),  # §2: fixed on 2021-04-02
        (FIXED, "reddit.com", False),
        (FIXED, "garbage.twimg.com", True),
        (FIXED, "api.twitter.com", True),
        (FIXED, "nottwitter.com", False),
    ],
)
def test_sni_rules(scenario, name: str, limited: bool) -> None:
    e = engine(scenario)
    open_tls(e, name)
    flow = only_flow(e)
    assert flow.name == name
    assert flow.name_source == "sni"
    if limited:
        assert flow.state == State.LIMITED and flow.rule.name == "twitter"


def test_unmatched_flow_is_decided_after_the_window_and_bypassed() -> None:
    e = engine()
    conv = open_tls(e, "example.org")
    flow = only_flow(e)
    assert flow.state == State.INSPECTING  # §5/§7: it keeps looking for 16 more packets
    verdicts = run(e, [conv.server(b"\x16\x03\x03" + b"\x00" * 200)] + [conv.client(b"\x17\x03\x03\x00\x10" + bytes(16)) for _ in range(16)])
    assert flow.state == State.INSPECTING  # the server side's window is still open
    verdicts = run(e, [conv.server(b"\x17\x03\x03\x00\x10" + bytes(16)) for _ in range(17)])
    assert flow.state == State.PASSED
    assert verdicts[-1] == Verdict.BYPASS
    assert e.process(conv.client(b"x" * 100), 2.0) == (Verdict.BYPASS, 0.0)


def test_one_sided_flow_is_still_decided() -> None:
    e = engine()
    conv = open_tls(e, "example.org")
    run(e, [conv.client(b"\x17\x03\x03\x00\x10" + bytes(16)) for _ in range(20)])
    run(e, [conv.server(flags="A") for _ in range(80)])
    assert only_flow(e).state == State.PASSED


def test_two_segment_hello_needs_reassembly() -> None:
    hello = python_hello("pbs.twimg.com")
    for reassemble, expected in ((False, State.INSPECTING), (True, State.LIMITED)):
        e = engine(reassemble=reassemble)
        conv = Conversation()
        run(e, conv.handshake() + conv.segments(0, hello, 200))
        flow = only_flow(e)
        assert flow.state == expected, reassemble
        assert (flow.name == "pbs.twimg.com") == reassemble


def test_reassembly_puts_out_of_order_segments_back() -> None:
    hello = python_hello("pbs.twimg.com")
    e = engine(reassemble=True)
    conv = Conversation()
    run(e, conv.handshake())
    segs = conv.segments(0, hello, 200)
    run(e, [segs[1], segs[0], segs[0]] + segs[2:])
    assert only_flow(e).name == "pbs.twimg.com"


def test_hello_from_the_server_side_triggers() -> None:
    # §4: on a connection opened from inside, a ClientHello in either direction triggers.
    e = engine()
    conv = Conversation()
    run(e, conv.handshake() + [conv.server(python_hello("pbs.twimg.com"))])
    assert only_flow(e).state == State.LIMITED


def test_scrambled_first_packet_of_101_bytes_ends_inspection() -> None:
    e = engine()
    conv = Conversation()
    run(e, conv.handshake() + [conv.client(b"\xaa" * 101), conv.client(python_hello("pbs.twimg.com"))])
    assert only_flow(e).state == State.PASSED


def test_short_scrambled_first_packet_does_not_end_inspection() -> None:
    e = engine()
    conv = Conversation()
    run(e, conv.handshake() + [conv.client(b"\xaa" * 100), conv.client(python_hello("pbs.twimg.com"))])
    assert only_flow(e).state == State.LIMITED


def test_change_cipher_spec_first_evades_the_2021_parser() -> None:
    e = engine()
    conv = Conversation()
    run(e, conv.handshake() + [conv.client(b"\x14\x03\x03\x00\x01\x01" + python_hello("pbs.twimg.com"))])
    assert only_flow(e).state != State.LIMITED


def test_trailing_dot_evades_unless_normalised() -> None:
    for strip, expected in ((False, State.INSPECTING), (True, State.LIMITED)):
        e = engine(FIXED, strip_trailing_dot=strip)
        open_tls(e, "pbs.twimg.com.")
        assert only_flow(e).state == expected


def test_a_fake_hello_first_does_not_evade() -> None:
    e = engine()
    conv = Conversation()
    run(e, conv.handshake() + [conv.client(python_hello("example.org")), conv.client(python_hello("pbs.twimg.com"))])
    flow = only_flow(e)
    assert flow.state == State.LIMITED
    assert [n for n, _ in flow.names_seen] == ["example.org", "pbs.twimg.com"]


def test_hello_without_sni_is_not_limited() -> None:
    # §3: TLS without SNI to Twitter's addresses is fast.
    e = engine()
    open_tls(e, None)
    assert only_flow(e).state != State.LIMITED


def test_policing_both_directions_with_separate_buckets() -> None:
    e = engine()
    conv = open_tls(e, "pbs.twimg.com")
    now = 2.0
    up = [e.process(conv.client(b"u" * 1400), now + i * 1e-4)[0] for i in range(40)]
    down = [e.process(conv.server(b"d" * 1400), now + i * 1e-4)[0] for i in range(40)]
    # The hello used some of the upload bucket; each direction passes about 16 KB, then drops.
    assert up.count(Verdict.ACCEPT) in (10, 11) and Verdict.DROP in up
    assert down.count(Verdict.ACCEPT) == 11 and Verdict.DROP in down
    flow = only_flow(e)
    assert flow.sides[0].dropped_packets == up.count(Verdict.DROP)
    limited = [ev for ev in e.drain_events() if isinstance(ev, Limited)]
    assert {ev.direction for ev in limited} == {0, 1}


def test_policed_rate_over_a_simulated_minute() -> None:
    e = engine()
    conv = open_tls(e, "pbs.twimg.com")
    packet = conv.client(b"x" * 1400)  # the engine does not check sequence numbers of limited flows
    gap = len(packet) * 8 / 10e6  # an upload offered at 10 Mbit/s
    passed = 0
    n = int(60 / gap)
    for i in range(n):
        if e.process(packet, 1.0 + i * gap)[0] == Verdict.ACCEPT:
            passed += len(packet)
    assert abs(passed * 8 / 60 - 130_000) / 130_000 < 0.03


def test_media_upload_after_bytes_and_direction() -> None:
    e = Engine(MEDIA.model, MEDIA.rules)
    conv = open_tls(e, "pbs.twimg.com")
    flow = only_flow(e)
    assert flow.state == State.LIMITED and flow.rule.name == "photo-upload"
    small = run(e, [conv.client(b"t" * 1000) for _ in range(4)], now=2.0)  # a text post
    assert set(small) == {Verdict.ACCEPT}
    downloads = run(e, [conv.server(b"d" * 1400) for _ in range(200)], now=2.0)
    assert set(downloads) == {Verdict.ACCEPT}  # downloads are not limited
    big = run(e, [conv.client(b"p" * 1400) for _ in range(200)], now=2.0)
    assert Verdict.DROP in big
    assert big[:40].count(Verdict.DROP) == 0  # the first 64 KB (with the hello) pass


def test_shaper_holds_instead_of_dropping() -> None:
    text = """
[[rule]]
name = "tele2"
match = ["*"]
action = "shape"
rate = "128kbit"
burst = "1500"
direction = "upload"
queue_delay = "2s"
"""
    s = parse_scenario(text)
    e = Engine(s.model, s.rules)
    conv = open_tls(e, "anything.example")
    results = [e.process(conv.client(b"x" * 1400), 5.0) for _ in range(30)]
    holds = [t for v, t in results if v == Verdict.HOLD]
    assert holds and holds == sorted(holds)
    assert all(5.0 < t <= 7.0 + 1e-9 for t in holds)
    assert Verdict.DROP in [v for v, _ in results]  # beyond 2 s of queue


def test_scope_client_shares_one_bucket_between_flows() -> None:
    s = dataclasses.replace(DAY_ONE, rules=(dataclasses.replace(DAY_ONE.rules[0], scope="client"),))
    e = Engine(s.model, s.rules)
    a = open_tls(e, "pbs.twimg.com", client_port=40001)
    b = open_tls(e, "video.twimg.com", client_port=40002)
    fa, fb = e.flows()
    assert fa.buckets[0] is None or fa.buckets[0] is fb.buckets[0]
    run(e, [a.client(b"x" * 1400) for _ in range(20)], now=2.0)
    assert e.process(b.client(b"x" * 1400), 2.0)[0] == Verdict.DROP


def test_idle_timeout_and_next_timer() -> None:
    e = engine()
    open_tls(e, "pbs.twimg.com")
    assert e.next_timer() == pytest.approx(601.0)
    e.handle_timer(600.0)
    assert len(e.flows()) == 1
    e.handle_timer(601.0)
    assert e.flows() == []
    assert e.next_timer() is None
    assert any(isinstance(ev, FlowEnded) and ev.reason == "idle" for ev in e.drain_events())


@pytest.mark.parametrize("ends", [False, True])
def test_fin_and_rst(ends: bool) -> None:
    e = engine(fin_rst_ends_flow=ends)
    conv = open_tls(e, "pbs.twimg.com")
    run(e, [conv.client(flags="R")])
    assert (e.flows() == []) is ends  # §14: the 2021 devices kept the state


def test_flow_table_is_bounded() -> None:
    e = engine(max_flows=10)
    for i in range(25):
        run(e, Conversation(client_port=41000 + i).handshake(), now=float(i))
    assert len(e.flows()) == 10
    assert min(f.client_port for f in e.flows()) == 41015


def test_connections_opened_from_outside_are_not_eligible() -> None:
    e = engine(inside=(__import__("ipaddress").ip_network("198.18.0.0/24"),))
    open_tls(e, "pbs.twimg.com")  # client 198.18.0.2 is inside
    open_tls(e, "pbs.twimg.com", client_ip="198.18.2.9", server_ip="198.18.0.7", client_port=5555)
    inside, outside = e.flows()
    assert inside.state == State.LIMITED
    assert outside.state == State.PASSED
    # The adapter may also say where a packet came from.
    e2 = engine()
    conv = Conversation()
    for p in conv.handshake():
        e2.process(p, 1.0, from_inside=False)
    assert only_flow(e2).state == State.PASSED


def test_ipv6_with_extension_header() -> None:
    e = engine()
    open_tls(e, "pbs.twimg.com", v6=True, hop_by_hop=True, client_ip="2001:2::2", server_ip="2001:2:0:2::2")
    flow = only_flow(e)
    assert flow.state == State.LIMITED
    assert flow.client_endpoint == "[2001:2::2]:40000"


def dns_answer(qname: str, chain: list[str], address: str, ttl: int = 300) -> bytes:
    answers = []
    owner = qname
    for cname in chain:
        answers.append(DNSRR(rrname=owner, type="CNAME", rdata=cname, ttl=ttl))
        owner = cname
    answers.append(DNSRR(rrname=owner, type="AAAA" if ":" in address else "A", rdata=address, ttl=ttl))
    return bytes(DNS(id=7, qr=1, qd=[DNSQR(qname=qname)], an=answers))


def test_names_learned_from_dns_classify_flows_without_sni() -> None:
    e = Engine(MEDIA.model, MEDIA.rules)
    server = "198.18.2.77"
    query = udp("198.18.0.2", "198.18.1.1", 33333, 53, b"\x00" * 12)
    answer = udp("198.18.1.1", "198.18.0.2", 53, 33333, dns_answer("pbs.twimg.com", ["cs196.wac.edgecastcdn.net"], server))
    run(e, [query, answer])
    open_tls(e, None, server_ip=server)
    flow = e.flows()[-1]
    assert flow.state == State.LIMITED
    assert (flow.name, flow.name_source) == ("pbs.twimg.com", "dns")
    # Expired answers are not used.
    open_tls(e, None, server_ip=server, client_port=40009, conv=None)
    late = Engine(MEDIA.model, MEDIA.rules)
    run(late, [query, answer], now=1.0)
    conv = Conversation(server_ip=server)
    run(late, conv.handshake() + [conv.client(python_hello(None))], now=400.0)
    assert late.flows()[-1].state != State.LIMITED


def test_an_sni_wins_over_the_dns_name() -> None:
    e = Engine(MEDIA.model, MEDIA.rules)
    server = "198.18.2.77"
    run(e, [udp("198.18.1.1", "198.18.0.2", 53, 33333, dns_answer("pbs.twimg.com", [], server))])
    open_tls(e, "example.org", server_ip=server)
    flow = e.flows()[-1]
    assert flow.state != State.LIMITED and flow.name == "example.org"


def test_http_host_header() -> None:
    e = Engine(MEDIA.model, MEDIA.rules)
    conv = Conversation(server_port=80)
    run(e, conv.handshake() + [conv.client(b"POST /upload HTTP/1.1\r\nHost: pbs.twimg.com\r\nContent-Length: 9\r\n\r\n")])
    flow = only_flow(e)
    assert (flow.state, flow.name, flow.name_source) == (State.LIMITED, "pbs.twimg.com", "host")


def test_address_rules_need_no_name() -> None:
    text = """
[[rule]]
name = "tcp-16-20"
addresses = ["198.18.2.0/24"]
action = "police"
rate = "0"
burst = "0"
direction = "download"
after_bytes = "16KB"
"""
    s = parse_scenario(text)
    e = Engine(s.model, s.rules)
    conv = Conversation()
    run(e, conv.handshake())
    flow = only_flow(e)
    assert flow.state == State.LIMITED and flow.name_source == "address"
    verdicts = run(e, [conv.server(b"d" * 1000) for _ in range(30)])
    assert verdicts[:17] == [Verdict.ACCEPT] * 17 and set(verdicts[17:]) == {Verdict.DROP}


def test_events_report_decisions() -> None:
    e = engine()
    open_tls(e, "pbs.twimg.com")
    decided = [ev for ev in e.drain_events() if isinstance(ev, FlowDecided)]
    assert len(decided) == 1 and decided[0].flow.rule.name == "twitter"
    assert e.drain_events() == []


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_any_bytes_get_a_verdict_and_never_raise(data: bytes) -> None:
    e = engine()
    verdict, _ = e.process(data, 1.0)
    assert verdict in (Verdict.ACCEPT, Verdict.BYPASS)
    assert e.counters.internal == 0  # malformed input is the peer's mistake, never a bug of ours


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mangled_real_packets_never_raise(data) -> None:
    conv = Conversation()
    packets = conv.handshake() + [conv.client(python_hello("pbs.twimg.com"))]
    e = engine(reassemble=data.draw(st.booleans()))
    for p in packets:
        p = bytearray(p)
        for _ in range(data.draw(st.integers(0, 3))):
            i = data.draw(st.integers(0, len(p) - 1))
            p[i] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(p)))
        verdict, _ = e.process(bytes(p[:cut]) if data.draw(st.booleans()) else bytes(p), 1.0)
        assert isinstance(verdict, Verdict)
    assert e.counters.internal == 0, [ev for ev in e.drain_events() if getattr(ev, "kind", "") == "internal"]


def test_sticky_rule_limits_later_flows_to_the_address_without_sni() -> None:
    # §20, Turkey 2022: after one triggering connection, later ones to that address are slowed too.
    text = '[[rule]]\nname = "tr"\nmatch = ["*.twimg.com"]\nrate = "130kbit"\nsticky = "60s"\n'
    s = parse_scenario(text)
    e = Engine(s.model, s.rules)
    open_tls(e, None, client_port=40001)  # before any trigger: not limited
    open_tls(e, "pbs.twimg.com", client_port=40002)
    later = Conversation(client_port=40003)
    run(e, later.handshake(), now=30.0)
    other = Conversation(client_port=40004, server_ip="198.18.2.3")
    run(e, other.handshake(), now=30.0)
    expired = Conversation(client_port=40005)
    run(e, expired.handshake(), now=62.0)
    first, trigger, sticky, elsewhere, late = e.flows()
    assert first.state != State.LIMITED and trigger.state == State.LIMITED
    assert (sticky.state, sticky.name_source) == (State.LIMITED, "sticky")
    assert elsewhere.state != State.LIMITED and late.state != State.LIMITED


@pytest.mark.parametrize("prefix", ["ccs", "fake"])
def test_reassembling_model_reads_past_a_ccs_record_or_a_decoy_hello(prefix: str) -> None:
    """§7's ccs and fake tricks: a censor that reads the stream still finds the real hello."""
    lead = b"\x14\x03\x03\x00\x01\x01" if prefix == "ccs" else python_hello("example.org")
    # In one segment, the 2021 device reads only the first record: both hide the real hello there.
    for reassemble, expected in ((False, False), (True, True)):
        e = engine(reassemble=reassemble)
        conv = Conversation()
        run(e, conv.handshake() + [conv.client(lead + python_hello("pbs.twimg.com"))])
        assert (only_flow(e).state == State.LIMITED) is expected, (prefix, reassemble)


def test_a_new_connection_on_an_old_5_tuple_is_inspected_afresh() -> None:
    """The end of a bypassed flow is never seen; a SYN on its 5-tuple starts a new flow, in a model
    where a SYN restarts a flow (not the 2021 device's: tests/test_fidelity.py)."""
    e = engine(syn_restarts_flow=True)
    old = Conversation()
    run(e, old.handshake() + [old.client(b"\xaa" * 200)])  # decided: passed
    assert only_flow(e).state == State.PASSED
    new = Conversation()  # same ports and addresses
    run(e, new.handshake() + [new.client(python_hello("pbs.twimg.com"))], now=5.0)
    flow = only_flow(e)
    assert flow.state == State.LIMITED and flow.first_seen == 5.0
    assert any(isinstance(ev, FlowEnded) and ev.reason == "reused" for ev in e.drain_events())


@pytest.mark.parametrize("v6", [False, True])
def test_the_header_accessors_read_what_scapy_wrote(v6: bool) -> None:
    from throttle.wire.ip import (ACK, SYN, ipv4_header_length, locate, opens_connection, ports, source, tcp_ack,
                                  tcp_flags, tcp_header_length, tcp_seq)

    conv = Conversation(client_port=40123, v6=v6, hop_by_hop=v6, client_ip="2001:2::2" if v6 else "198.18.0.2",
                        server_ip="2001:2:2::2" if v6 else "198.18.2.2")
    syn, synack, _ = conv.handshake()
    data = conv.server(b"hello")
    _, _, l4 = locate(data)
    assert ports(data, l4) == (443, 40123)
    assert (tcp_seq(data, l4), tcp_ack(data, l4)) == (5001, 1001)
    assert tcp_flags(data, l4) & ACK and tcp_header_length(data, l4) == 20
    assert source(data) == (bytes.fromhex("20010002000200000000000000000002") if v6 else bytes([198, 18, 2, 2]))
    assert opens_connection(syn, locate(syn)[2]) and tcp_flags(syn, locate(syn)[2]) == SYN
    assert not opens_connection(synack, locate(synack)[2])
    assert not opens_connection(syn[: locate(syn)[2] + 13], locate(syn)[2])  # cut before the flags
    if not v6:
        assert ipv4_header_length(data) == 20


@pytest.mark.parametrize("ends", [False, True])
def test_connections_are_counted_once_by_how_they_ended(ends: bool) -> None:
    """Each connection's end counts once, under the state its flow was in: a short example.org
    connection closes under inspection (the day-one model reads on past a name that matches
    nothing); a limited one is reset. Whether or not the model keeps the flows past their end."""
    e = engine(fin_rst_ends_flow=ends)
    short = open_tls(e, "example.org")
    run(e, [short.client(b"x" * 500), short.client(flags="FA"), short.server(flags="FA")])
    twitter = open_tls(e, "pbs.twimg.com", client_port=40001)
    run(e, [twitter.client(flags="R")])
    assert e.counters.ended == {("inspecting", "fin"): 1, ("limited", "rst"): 1}
    assert len(e.flows()) == (0 if ends else 2)
    e.handle_timer(10_000.0)  # the kept flows expire later: their connections are not counted again
    assert e.counters.ended == {("inspecting", "fin"): 1, ("limited", "rst"): 1}


def test_a_new_connection_joining_a_kept_flow_is_counted_as_the_old_ones_end() -> None:
    """The 2021 device kept a flow by its 5-tuple (syn_restarts_flow false): a new connection on
    it goes on as the old flow. The old connection's end, unseen (its packets bypassed the
    censor), is counted as reused; one whose end was seen is not counted twice."""
    e = engine()
    old = open_tls(e, "pbs.twimg.com")
    new = Conversation()
    run(e, new.handshake() + [new.client(python_hello("example.org"))], now=5.0)
    assert e.counters.ended == {("limited", "reused"): 1}
    run(e, [new.client(flags="FA"), new.server(flags="FA")], now=6.0)
    third = Conversation()
    run(e, third.handshake(), now=7.0)
    assert e.counters.ended == {("limited", "reused"): 1, ("limited", "fin"): 1}
    assert len(e.flows()) == 1 and old is not None
