"""The bundled scenario library, offline: every probe's expectation against the engine's decision.

For each scenario file: it loads, cites docs/incidents.md, has a control probe that expects
`normal`, and every probe, fed through the engine as crafted packets (a handshake, a real
ClientHello or HTTP request, the server's first flight, then `size` bytes in the probe's
direction), is limited exactly when its `expect` says so. All probes of a scenario go through ONE
engine in the order the live runner uses (controls first, then file order), as the live censor
sees them; that is what makes the Turkey stickiness visible. Evasion probes (`evasion` other than
none) are only loaded here: their disguised hellos are tested with the evasion client itself.
No root, no network, a literal clock.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import pytest

from tests.conftest import ROOT, VECTORS
from throttle.engine import Engine, Flow, State, Verdict
from throttle.lab.evasion.plans import add_ech
from throttle.scenario import Probe, Scenario, load_scenario
from throttle.scenario.model import probe_rule

from .packets import Conversation, python_hello, quic_initials, udp

BUNDLED = sorted((ROOT / "scenarios").glob("*.toml"))
SCENARIOS = {p.stem: load_scenario(p) for p in BUNDLED}

# The lab's addresses (throttle/lab.py); every name resolves to SERVER_V4.
CLIENT_V4, CLIENT_V6 = "198.18.0.2", "2001:2:0:1::2"
SERVER_V4 = "198.18.1.2"
PORTS = {"https": 443, "http": 80, "tls": 8443, "quic": 443}  # the raw TLS client talks to the sink on 8443
MSS = 1448
STEP = 0.001  # seconds between data segments: about 11.6 Mbit/s, far above every scenario rate
SERVER_FLIGHT = 3000  # bytes of the server's handshake records (ServerHello, certificate ...)
LIMITING = (Verdict.DROP, Verdict.HOLD)

EXPECTED_FILES = {
    "media-upload", "tcp-16-20-2025", "tele2-3g-shaper", "turkey-2022", "twitter-2021-03-10",
    "twitter-2021-04-02", "twitter-2021-evasions", "twitter-2022-03", "twitter-2022-03-04", "youtube-2024",
    "russia-2022-quic", "russia-2023-quic-sni", "ech-2024", "browser-chromium", "kazakhstan-2023",
    "browser-chromium-quic",
}


@dataclass
class ProbeResult:
    """What one probe's connection met in the engine."""

    probe: Probe
    flow: Flow
    verdicts: list[Verdict] = field(default_factory=list)  # the data segments in the probe's direction
    passed_payload: int = 0  # payload bytes in the probe's direction passed before the first drop
    passed_packets: int = 0  # data packets in the probe's direction passed before the first drop
    other_side: list[Verdict] = field(default_factory=list)  # the packets going the other way

    @property
    def limited(self) -> bool:
        return any(v in LIMITING for v in self.verdicts)

    @property
    def first_limit(self) -> Verdict | None:
        return next((v for v in self.verdicts if v in LIMITING), None)


def runner_order(scenario: Scenario) -> list[Probe]:
    """Controls first, then the others in file order (throttle/runner.py)."""
    probes = list(scenario.probes)
    return [p for p in probes if p.control] + [p for p in probes if not p.control]


def sni_of(probe: Probe) -> str | None:
    if probe.sni is False:
        return None
    return probe.sni if isinstance(probe.sni, str) else probe.host


def first_payload(probe: Probe) -> bytes:
    """What the client sends first: a real ClientHello, or an HTTP request head."""
    if probe.protocol == "http":
        method = "PUT /upload" if probe.direction == "upload" else f"GET /bytes/{probe.size}"
        length = f"Content-Length: {probe.size}\r\n" if probe.direction == "upload" else ""
        return f"{method} HTTP/1.1\r\nHost: {probe.host}\r\nUser-Agent: curl/8\r\n{length}\r\n".encode()
    hello = python_hello(sni_of(probe))
    return add_ech(hello) if probe.ech else hello


def tls_record(kind: int, size: int) -> bytes:
    body = bytes(size - 5)
    return bytes((kind, 3, 3)) + len(body).to_bytes(2, "big") + body


class Simulation:
    """One engine for a whole scenario, fed probe after probe on one advancing clock."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.engine = Engine(scenario.model, scenario.rules)
        self.now = 1.0
        self.ports = itertools.count(40001)

    def feed(self, packet: bytes) -> Verdict:
        self.now += STEP
        return self.engine.process(packet, self.now)[0]

    def run(self, probe: Probe) -> ProbeResult:
        if probe.protocol == "quic":
            return self.run_quic(probe)
        address = probe.address or SERVER_V4
        v6 = ":" in address
        conv = Conversation(client_ip=CLIENT_V6 if v6 else CLIENT_V4, server_ip=address,
                            server_port=PORTS[probe.protocol], client_port=next(self.ports), v6=v6)
        for packet in conv.handshake():
            self.feed(packet)
        # The client speaks first; for TLS the server answers with its handshake flight.
        self.feed(conv.client(first_payload(probe)))
        if probe.protocol != "http":
            for segment in conv.segments(1, tls_record(0x16, SERVER_FLIGHT), MSS):
                self.feed(segment)
            self.feed(conv.client(tls_record(0x14, 6) + tls_record(0x17, 80)))  # CCS, Finished
        flow = next(f for f in self.engine.flows() if f.client_port == conv.client_port)
        result = ProbeResult(probe, flow)
        upload = probe.direction == "upload"
        if not upload:
            request = tls_record(0x17, 120) if probe.protocol != "http" else b""
            if request:
                result.other_side.append(self.feed(conv.client(request)))
        sent = 0
        dropped = False
        while sent < probe.size:
            chunk = min(MSS, probe.size - sent)
            data = conv.client(b"\xab" * chunk) if upload else conv.server(b"\xab" * chunk)
            verdict = self.feed(data)
            result.verdicts.append(verdict)
            if verdict == Verdict.DROP:
                dropped = True
            elif not dropped:
                result.passed_payload += chunk
                result.passed_packets += 1
            sent += chunk
            if len(result.verdicts) % 2 == 0:  # the receiver's ACK for every second segment
                ack = conv.server(flags="A") if upload else conv.client(flags="A")
                result.other_side.append(self.feed(ack))
        self.now += 10.0  # a pause between probes: shared buckets drain, sticky marks stay
        return result

    def run_quic(self, probe: Probe) -> ProbeResult:
        """A QUIC probe: a real client's Initial datagrams, the server's handshake flight, then
        1,200-byte short-header datagrams in the probe's direction (an ACK for every second)."""
        address = probe.address or SERVER_V4
        client = CLIENT_V6 if ":" in address else CLIENT_V4
        cport = next(self.ports)

        def up(payload: bytes) -> Verdict:
            return self.feed(udp(client, address, cport, 443, payload))

        def down(payload: bytes) -> Verdict:
            return self.feed(udp(address, client, 443, cport, payload))

        for datagram in quic_initials(sni_of(probe), ech=probe.ech):
            up(datagram)
        flow = next(f for f in self.engine.flows() if f.client_port == cport)
        result = ProbeResult(probe, flow)
        short = bytes((0x40,)) + bytes(1199)  # a short-header packet: no long-header bit
        flight = [down(bytes((0xE0,)) + bytes(1199)) for _ in range(3)]  # Initial + Handshake
        result.other_side.extend(flight)
        upload = probe.direction == "upload"
        sent = 0
        dropped = False
        while sent < probe.size:
            verdict = up(short) if upload else down(short)
            result.verdicts.append(verdict)
            if verdict == Verdict.DROP:
                dropped = True
            elif not dropped:
                result.passed_payload += len(short)
                result.passed_packets += 1
            sent += len(short)
            if len(result.verdicts) % 2 == 0:
                result.other_side.append(down(short[:40]) if upload else up(short[:40]))
        self.now += 10.0
        return result

    def run_all(self) -> dict[str, ProbeResult]:
        # A command probe's client or a browser sends what it sends: their scenarios have their own
        # tests on captures of that client (the Chromium ones below).
        return {p.name: self.run(p) for p in runner_order(self.scenario)
                if p.evasion == "none" and p.protocol not in ("command", "browser")}


def check_expectation(result: ProbeResult, rules_by_name: dict) -> None:
    probe, flow = result.probe, result.flow
    label = f"probe {probe.name} ({probe.host}, {probe.direction}, expect {probe.expect})"
    if probe.expect in ("throttled", "blocked"):
        assert flow.state == State.LIMITED, f"{label}: the engine did not limit it ({flow.verdict})"
        assert result.limited, f"{label}: limited, but no packet of the transfer was dropped or held"
        rule = rules_by_name[flow.rule.name]
        wanted = Verdict.HOLD if rule.action == "shape" else Verdict.DROP
        if probe.expect == "blocked" and rule.action == "shape":
            wanted = result.first_limit  # the handshake filled the shaper's queue: held or dropped
        assert result.first_limit == wanted, f"{label}: the first limit was {result.first_limit!r}"
    else:
        assert not result.limited, f"{label}: packets were dropped or held (rule {flow.rule and flow.rule.name})"
        if flow.state == State.LIMITED:
            # Limited, yet harmless to this probe: its direction is not limited, or it stays
            # under after_bytes (media-upload's text post and downloads, tele2's downloads).
            rule = flow.rule
            assert rule is not None
            assert rule.direction not in ("both", probe.direction) or probe.size < rule.after_bytes, label


# ---- every file ----------------------------------------------------------------------------
def test_the_library_holds_the_expected_scenarios() -> None:
    assert EXPECTED_FILES <= set(SCENARIOS), sorted(EXPECTED_FILES - set(SCENARIOS))


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_loads_cites_sources_and_has_a_control(name: str) -> None:
    scenario = SCENARIOS[name]
    assert scenario.name == name
    assert scenario.sources and all(s.startswith("docs/incidents.md §") for s in scenario.sources)
    text = (ROOT / "scenarios" / f"{name}.toml").read_text()
    assert text.startswith("#"), "a header comment says what the scenario models"
    controls = [p for p in scenario.probes if p.control]
    assert controls, "the runner needs a control probe"
    assert all(p.expect == "normal" for p in controls)
    assert len({p.name for p in scenario.probes}) == len(scenario.probes), "probe names are unique"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_probes_fit_a_short_live_run(name: str) -> None:
    scenario = SCENARIOS[name]
    rates = [r.rate for r in scenario.rules if r.rate > 0]
    slowest = min(rates) if rates else 0.0
    slow = [p for p in scenario.probes if p.expect != "normal"]
    for probe in slow:
        rule = probe_rule(scenario, probe)
        rate = rule.rate if rule is not None and rule.rate > 0 else slowest
        if probe.expect == "blocked" or rate == 0:
            assert 0 < probe.timeout <= 15, f"{probe.name}: a blocked probe needs a short timeout"
        else:
            assert probe.size / rate <= 20, f"{probe.name}: more than 20 s at {rate * 8 / 1000} kbit/s"
    for probe in scenario.probes:
        if probe.protocol == "tls":
            assert probe.direction == "upload", "the raw TLS client only uploads"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_probe_is_limited_exactly_when_expected(name: str) -> None:
    scenario = SCENARIOS[name]
    results = Simulation(scenario).run_all()
    rules = {r.name: r for r in scenario.rules}
    assert results
    for result in results.values():
        check_expectation(result, rules)


# ---- the 2021 Twitter scenarios ------------------------------------------------------------
def test_day_one_only_the_sni_counts() -> None:
    # §3: a Twitter SNI to another server is slowed; no SNI to Twitter's address is not.
    results = Simulation(SCENARIOS["twitter-2021-03-10"]).run_all()
    elsewhere = results["twitter-name-other-server"]
    assert elsewhere.probe.address == "198.18.1.3" and elsewhere.flow.name == "pbs.twimg.com"
    assert elsewhere.flow.state == State.LIMITED
    nosni = results["no-sni-twitter-address"]
    assert nosni.probe.sni is False and nosni.flow.name is None
    assert nosni.flow.state == State.PASSED
    for collateral in ("reddit-upload", "microsoft-upload"):  # §2: *t.co*
        assert results[collateral].flow.rule.name == "twitter"


def test_the_fix_keeps_garbage_twimg_and_frees_the_collateral() -> None:
    results = Simulation(SCENARIOS["twitter-2021-04-02"]).run_all()
    assert results["garbage-twimg-upload"].flow.state == State.LIMITED
    assert results["reddit-upload"].flow.state == State.PASSED
    assert results["microsoft-upload"].flow.state == State.PASSED


def test_evasion_scenario_covers_every_trick() -> None:
    scenario = SCENARIOS["twitter-2021-evasions"]
    by_evasion = {p.evasion: p for p in scenario.probes if not p.control}
    assert set(by_evasion) == {"none", "split", "pad", "scramble", "ccs", "dot", "fake"}
    for evasion, probe in by_evasion.items():
        assert probe.protocol == "tls" and probe.host == "pbs.twimg.com"
        assert probe.expect == ("throttled" if evasion in ("none", "fake") else "normal"), evasion
    (control,) = [p for p in scenario.probes if p.control]
    assert (control.protocol, control.host, control.evasion) == ("tls", "example.org", "none")
    model = scenario.model
    assert not model.reassemble and not model.strip_trailing_dot and model.inspect_after_name


# ---- 2022: the handshake crawl -------------------------------------------------------------
def test_2022_handshake_crawls_past_a_ten_second_timeout() -> None:
    scenario = SCENARIOS["twitter-2022-03"]
    (rule,) = scenario.rules
    assert 1.4e3 <= rule.rate * 8 <= 1.8e3  # §17: 1,024 B in ~5.6 s, 848 B in ~4 s
    assert 4.0 <= 1024 / rule.rate <= 7.0
    assert rule.action == "shape"  # a crawl from the first byte: held, not passed at once (§17)
    # The server's handshake flight, 3,000 bytes in full-size segments, sent at 0 s; the client's
    # stack retransmits what has not arrived at 1, 3 and 7 s (RTO back-off). When does each
    # segment leave the censor?
    e = Engine(scenario.model, scenario.rules)
    conv = Conversation(client_ip=CLIENT_V4, server_ip=SERVER_V4, client_port=40001)
    for packet in conv.handshake():
        e.process(packet, 0.0)
    e.process(conv.client(python_hello("pbs.twimg.com")), 0.0)
    flight = conv.segments(1, tls_record(0x16, 3000), 1460)
    assert [len(p) for p in flight] == [1500, 1500, 120]
    released: dict[int, float] = {}
    for t in (0.0, 1.0, 3.0, 7.0):
        for i, packet in enumerate(flight):
            if i in released and released[i] <= t:
                continue
            verdict, at = e.process(packet, t)
            if verdict == Verdict.HOLD:
                released[i] = min(released.get(i, at), at)
            elif verdict != Verdict.DROP:
                released[i] = min(released.get(i, t), t)
    # §17: the first 1,024 bytes (in the first segment) arrive after about 5.6 s ...
    assert 5.0 <= released[0] <= 6.0, released
    # ... and the flight is not through by the 10 s timeout: the handshake never completes.
    assert max(released.get(i, float("inf")) for i in range(len(flight))) > 10.0, released


# ---- 2024: YouTube ---------------------------------------------------------------------------
def test_youtube_spoofed_sni_and_web_pages() -> None:
    scenario = SCENARIOS["youtube-2024"]
    tcp, quic = scenario.rules
    assert tcp.rate * 8 == 128_000 and tcp.burst <= 4096 and tcp.action == "police" and tcp.transport == "tcp"
    assert quic.rate * 8 == 512_000 and quic.burst <= 4096 and quic.action == "police" and quic.transport == "udp"
    results = Simulation(scenario).run_all()
    spoofed = results["video-spoofed-sni-other-server"]
    assert spoofed.flow.server_endpoint == "198.18.1.3:443" and spoofed.flow.state == State.LIMITED
    assert results["youtube-web"].flow.state == State.PASSED
    video = results["video-download-quic"]
    assert video.flow.transport == "udp" and video.flow.name_source == "quic"
    assert video.flow.rule is quic  # the QUIC rate, not the TCP one
    assert results["video-download"].flow.rule is tcp


# ---- 2025: TCP 16-20 -------------------------------------------------------------------------
def test_tcp_16_20_freezes_downloads_from_the_range_after_about_16_kb() -> None:
    scenario = SCENARIOS["tcp-16-20-2025"]
    results = Simulation(scenario).run_all()
    frozen = results["foreign-1mb"]
    assert frozen.flow.name_source == "address"  # keyed by address, not by name (§19)
    # §19: about 15-20 KB, the first 10-14 packets, pass (the server's handshake flight included).
    passed = SERVER_FLIGHT + frozen.passed_payload
    flight_packets = -(-SERVER_FLIGHT // MSS)
    assert 15 * 1024 <= passed <= 20 * 1024, passed
    assert 10 <= flight_packets + frozen.passed_packets <= 14
    first = frozen.verdicts.index(Verdict.DROP)
    assert all(v == Verdict.DROP for v in frozen.verdicts[first:]), "a freeze, not a slowdown"
    assert Verdict.DROP not in frozen.other_side, "the client's packets are not touched"
    small = results["foreign-8kb"]
    assert small.flow.state == State.LIMITED and not small.limited  # §24: under the freeze point
    assert results["domestic-1mb"].flow.state == State.PASSED


def test_tcp_16_20_covers_ipv6_too() -> None:
    scenario = SCENARIOS["tcp-16-20-2025"]
    sim = Simulation(scenario)
    probe = next(p for p in scenario.probes if p.name == "foreign-1mb")
    result = sim.run(dataclasses.replace(probe, address="2001:2:0:2::3"))
    assert result.flow.state == State.LIMITED and result.first_limit == Verdict.DROP


# ---- Turkey 2022: sticky -----------------------------------------------------------------------
def test_turkey_stickiness_in_probe_order() -> None:
    scenario = SCENARIOS["turkey-2022"]
    order = [p.name for p in scenario.probes if not p.control]
    assert order.index("no-sni-before-trigger") < order.index("trigger") < order.index("no-sni-after-trigger")
    results = Simulation(scenario).run_all()
    before, trigger, after = (results[n] for n in ("no-sni-before-trigger", "trigger", "no-sni-after-trigger"))
    assert before.flow.state == State.PASSED and not before.limited
    assert (trigger.flow.state, trigger.flow.name_source) == (State.LIMITED, "sni")
    assert (after.flow.state, after.flow.name_source) == (State.LIMITED, "sticky")
    assert after.flow.name is None  # no SNI: only the address mark limits it
    http = results["http-host-trigger"]
    assert (http.flow.state, http.flow.name_source) == (State.LIMITED, "host")
    # The same SNI-less probe in a fresh engine (no trigger before it) is not limited.
    fresh = Simulation(scenario).run(after.probe)
    assert fresh.flow.state == State.PASSED


# ---- Tele2 3G: the shaper confounder -----------------------------------------------------------
def test_tele2_shapes_every_upload_by_delay() -> None:
    scenario = SCENARIOS["tele2-3g-shaper"]
    (rule,) = scenario.rules
    assert rule.action == "shape" and rule.direction == "upload" and not rule.patterns
    results = Simulation(scenario).run_all()
    for name in ("twitter-upload", "example-upload"):
        up = results[name]
        assert up.first_limit == Verdict.HOLD, name  # held (shaped), not dropped
        held = up.verdicts.index(Verdict.HOLD)
        within_queue = int(rule.queue_delay * rule.rate // MSS) - 2
        assert Verdict.DROP not in up.verdicts[held : held + within_queue], name
    for name in ("twitter-download", "control-download"):
        assert all(v in (Verdict.ACCEPT, Verdict.BYPASS) for v in results[name].verdicts)
    # Whatever the destination, SNI or not, IPv4 or IPv6: every upload is shaped.
    sim = Simulation(scenario)
    base = next(p for p in scenario.probes if p.name == "example-upload")
    for change in ({"sni": False}, {"address": "198.18.1.4"}, {"address": "2001:2:0:2::3"},
                   {"protocol": "http"}):
        result = sim.run(dataclasses.replace(base, **change))
        assert result.flow.state == State.LIMITED and result.first_limit == Verdict.HOLD, change
        sim.now += 60.0  # let the subscriber's shared bucket refill


# ---- media upload ------------------------------------------------------------------------------
def test_media_upload_limits_only_past_after_bytes() -> None:
    scenario = SCENARIOS["media-upload"]
    results = Simulation(scenario).run_all()
    photo = results["photo-upload"]
    rule = photo.flow.rule
    assert rule is not None and rule.after_bytes == 64 * 1024
    assert photo.passed_payload >= rule.after_bytes  # full speed first
    assert results["text-post"].flow.state == State.LIMITED and not results["text-post"].limited


def test_every_citation_points_at_a_section_and_points_of_the_incidents_document() -> None:
    """`docs/incidents.md §S.A-B, C` names section S and its points A to B and C; they all exist there."""
    import re

    doc = (ROOT / "docs" / "incidents.md").read_text()
    sections = {int(n): set() for n in re.findall(r"^## (\d+)\.", doc, re.M)}
    current = 0
    for line in doc.splitlines():
        if m := re.match(r"^## (\d+)\.", line):
            current = int(m.group(1))
        elif m := re.match(r"^(\d+)\. ", line):
            sections[current].add(int(m.group(1)))
    for name, scenario in SCENARIOS.items():
        for source in scenario.sources:
            m = re.match(r"docs/incidents\.md §([\d., -]+):", source)
            assert m, (name, source)
            section = None
            for part in m.group(1).replace(" ", "").split(","):
                if section is None or "." in part:
                    head, _, part = part.partition(".")
                    section = int(head)
                    assert section in sections, (name, source)
                if part:
                    lo, _, hi = part.partition("-")
                    for point in range(int(lo), int(hi or lo) + 1):
                        assert point in sections[section], (name, source, point)


# ---- command probes ------------------------------------------------------------------------
def test_browser_chromium_two_segment_hello_passes_only_the_first_packet_model() -> None:
    # §1.8: Chromium's post-quantum ClientHello (captured from the same Chromium, two segments)
    # under the scenario's 2021 model passes unnamed; under a reassembling model it is throttled.
    from throttle.engine.offline import classify_file

    scenario = SCENARIOS["browser-chromium"]
    capture = ROOT / "tests" / "vectors" / "chromium-pbs.twimg.com.pcap"
    (old,) = classify_file(capture, scenario)
    assert old.name is None and old.verdict != "limited"
    reassembling = dataclasses.replace(scenario, model=dataclasses.replace(scenario.model, reassemble=True))
    (new,) = classify_file(capture, reassembling)
    assert (new.name, new.rule, new.verdict) == ("pbs.twimg.com", "twitter", "limited")
    browser = next(p for p in scenario.probes if p.protocol == "command")
    assert browser.expect == "normal" and "chromium" in browser.command and "apt-get install chromium" in browser.command
    assert any(p.protocol == "https" and p.host == browser.host and p.expect == "throttled" for p in scenario.probes)


def test_chromium_over_http3_walks_past_the_first_datagram_device_only() -> None:
    # §4.28: Chromium's QUIC hello (captured from the same Chromium: two Initial datagrams) is not
    # read by browser-chromium-quic's first-datagram device, and is by youtube-2024's reassembling
    # one, whose QUIC rule it meets: what their HTTP/3 browser probes expect, normal and throttled.
    from throttle.engine.offline import classify_file

    capture = VECTORS / "chromium-quic-rr1---sn-xxx.googlevideo.com.pcap"
    expected = {"browser-chromium-quic": "normal", "youtube-2024": "throttled"}
    for name, expect in expected.items():
        scenario = SCENARIOS[name]
        (flow,) = classify_file(capture, scenario)
        (probe,) = [p for p in scenario.probes if p.protocol == "browser" and p.http3 and not p.control]
        assert probe.expect == expect and probe.transport == "udp"
        assert probe_rule(scenario, probe) is scenario.rules[-1]  # its QUIC rule, googlevideo-quic
        if expect == "throttled":
            assert (flow.name, flow.rule, flow.verdict) == (probe.host, "googlevideo-quic", "limited")
        else:
            assert flow.name is None and flow.verdict != "limited", flow
    quic = {p.expect for p in SCENARIOS["browser-chromium-quic"].probes if p.protocol == "quic" and not p.control}
    assert quic == {"throttled"}  # the lab's QUIC client, one datagram, is read by the same device


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_command_probes_name_their_package_when_missing(name: str) -> None:
    # CI runs every bundled scenario: a missing client must fail naming what to install.
    for probe in SCENARIOS[name].probes:
        if probe.protocol == "command":
            tool = probe.command.split("command -v ", 1)[-1].split()[0] if "command -v " in probe.command else ""
            assert tool and f"apt-get install {tool}" in probe.command, f"{probe.name}: say what to install"
