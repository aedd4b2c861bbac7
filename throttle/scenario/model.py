"""The scenario model: frozen dataclasses for what a scenario file says, validated by the loader.

A scenario holds the censor model (how it inspects), the rules (what it limits and how), and the
probes (traffic to try, with the outcome expected). Every choice is a `Literal`, and the tuples
the loader offers in its messages are derived from them, so the two cannot drift apart.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal, get_args

from throttle.scenario.patterns import Pattern

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
RuleDirection = Literal["upload", "download", "both"]
ProbeDirection = Literal["upload", "download"]
Scope = Literal["flow", "client", "rule"]
Action = Literal["police", "shape", "drop", "rst", "loss"]
Meter = Literal["bucket", "window"]  # a refilling token bucket, or a fixed-interval byte budget (§1.11)
StickyScope = Literal["client_server", "server"]  # who a sticky mark slows: that client, or every client (§2.20)
Transport = Literal["any", "tcp", "udp"]
NameSourceKind = Literal["tls", "http", "dns", "quic"]
Outcome = Literal["throttled", "normal", "blocked"]
# curl over TLS, curl over plain HTTP, the raw TLS client, HTTP/3, a command of the scenario's own,
# headless Chromium uploading or downloading through the lab server's pages
Protocol = Literal["https", "http", "tls", "quic", "command", "browser"]
HandshakeExpectation = Literal["", "slow", "normal"]
BlockCause = Literal["", "reset", "timeout"]  # how a blocked probe must have been stopped
Evasion = Literal["none", "split", "pad", "scramble", "ccs", "dot", "fake"]  # throttle.lab.evasion, §7

DIRECTIONS: tuple[RuleDirection, ...] = get_args(RuleDirection)
PROBE_DIRECTIONS: tuple[ProbeDirection, ...] = get_args(ProbeDirection)
SCOPES: tuple[Scope, ...] = get_args(Scope)
ACTIONS: tuple[Action, ...] = get_args(Action)
METERS: tuple[Meter, ...] = get_args(Meter)
STICKY_SCOPES: tuple[StickyScope, ...] = get_args(StickyScope)
TRANSPORTS: tuple[Transport, ...] = get_args(Transport)
NAME_SOURCES: tuple[NameSourceKind, ...] = get_args(NameSourceKind)
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
PROTOCOLS: tuple[Protocol, ...] = get_args(Protocol)
EVASIONS: tuple[Evasion, ...] = get_args(Evasion)
HANDSHAKE_EXPECTATIONS: tuple[HandshakeExpectation, ...] = get_args(HandshakeExpectation)
BLOCK_CAUSES: tuple[BlockCause, ...] = get_args(BlockCause)


@dataclass(frozen=True, slots=True)
class Model:
    """How the censor inspects: the knobs that distinguish the 2021 device from a modern one."""

    reassemble: bool = False  # in-order TCP reassembly of the hello (False: the 2021 device, §6)
    reassembly_limit: int = 16384  # bytes buffered per direction when reassembling
    window_packets: int = 1  # data packets per direction looked at first (§5)
    window_extension: int = 16  # more packets once a TLS record or HTTP is seen (§5: 15-20)
    give_up_bytes: int = 101  # an unparseable first packet this long ends inspection (§5)
    strip_trailing_dot: bool = False  # False: `pbs.twimg.com.` evades, as in 2021 (§7)
    inspect_after_name: bool = True  # keep looking after a non-matching name (fake hellos fail, §7)
    fin_rst_ends_flow: bool = False  # 2021 devices kept state through FIN and RST (§14)
    # A SYN on the 5-tuple of a flow that carried data (or was decided) starts a new flow. True
    # fixes port reuse when the old flow's end went unseen; the 2021 device kept its state by
    # 5-tuple for ~10 minutes (§1.14) and injected packets did not free a flow (§1.7): False.
    syn_restarts_flow: bool = True
    idle_timeout: float = 600.0  # seconds an idle flow is remembered (§14)
    max_flows: int = 200_000  # flow table bound; the least recently used flow is evicted
    name_sources: tuple[NameSourceKind, ...] = ("tls",)  # tls (SNI), http (Host), dns (learned addresses), quic (Initial SNI)
    dns_max_entries: int = 65536
    inside: tuple[Network, ...] = ()  # censored side (§4)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    patterns: tuple[Pattern, ...] = ()
    addresses: tuple[Network, ...] = ()
    ports: tuple[int, ...] = ()  # server ports; empty is any
    # police (drop above rate, §9), shape (delay, §12), or drop: every packet after the one that
    # completed the match (§4.29), in the rule's directions; or rst: as drop, and the engine asks
    # the adapter to inject a RST each way after the TCP packet that completed the match (§2.17 from
    # 2022-03-04, §4.30; flows decided before any payload, by address or sticky mark, only drop); or
    # loss: each packet dropped at random with `probability`, the rest passed at full speed (loss no
    # censor caused, for `throttle infer`'s benchmark; this kernel has no netem)
    action: Action = "police"
    rate: float = 16250.0  # bytes per second (130 kbit/s)
    burst: int = 16384  # bytes (§11: about 16 KB pass before the drops)
    direction: RuleDirection = "both"  # upload (client to server), download, both (separate buckets, §9)
    scope: Scope = "flow"  # one bucket per flow, per client address, or one shared by the rule
    after_bytes: int = 0  # payload bytes a flow carries in a direction before it is limited
    queue_delay: float = 1.0  # shaper: the longest a packet is held before it is dropped instead
    queue_bytes: int = 0  # shaper: a bound in bytes instead (0: use queue_delay)
    sticky: float = 0.0  # seconds a triggering flow's server address stays limited, SNI or not (§20)
    # whom the sticky mark slows: the triggering client's later flows to that server address
    # (client_server), or every client's (server)
    sticky_scope: StickyScope = "client_server"
    # police with a token bucket refilled continuously at `rate` (bucket), or in fixed intervals of
    # burst / rate seconds, each letting its first `burst` bytes through and dropping the rest
    # (window: §1.11's ~16 KB in 100 ms, then ~900 ms of drops); police only
    meter: Meter = "bucket"
    transport: Transport = "any"  # tcp (TLS, HTTP), udp (QUIC), or either
    ech: bool | None = None  # True: only hellos with an ECH extension; False: only without (§29)
    quic_versions: tuple[int, ...] = ()  # a flow whose first QUIC Initial has one of these versions (§25)
    allow: tuple[Network, ...] = ()  # server addresses the rule never applies to (§25's allowed servers)
    probability: float = 0.0  # loss only: the chance each packet of the rule's directions is dropped, independently

    def matches_name(self, name: str) -> bool:
        return any(p.test(name) for p in self.patterns)


@dataclass(frozen=True, slots=True)
class Probe:
    name: str
    host: str
    direction: ProbeDirection = "upload"
    size: int = 262144
    protocol: Protocol = "https"
    sni: bool | str = True  # True: the host; False: no SNI; a string: that name instead
    address: str | None = None  # connect here instead of resolving `host`
    expect: Outcome = "throttled"
    control: bool = False
    evasion: Evasion = "none"  # protocol "tls" only: how the raw client disguises its ClientHello (§7)
    timeout: float = 0.0  # seconds before the probe is judged blocked; 0: from size and rate
    ech: bool = False  # protocols tls and quic: the hello carries an encrypted_client_hello extension (§4.29)
    # (low, high) bytes: the transfer must stall having delivered this many (§2.19's 15-20 KB);
    # downloads count the TCP payload the client received, TLS handshake included
    freeze_bytes: tuple[int, int] | None = None
    # expect = "throttled" only: the goodput (bytes/s) a throttled probe must reach within
    # `tolerance` (a fraction: 0.25 is +-25%); None: what its rule predicts for the transfer
    # (throttle.measure.predict)
    expect_rate: float | None = None
    tolerance: float = 0.25
    # the TLS handshake's time against the controls' (§3.23, §2.17, §2.21): "slow" is at least
    # HANDSHAKE_FACTOR x theirs and HANDSHAKE_FLOOR seconds, or never completed; "" is not judged
    expect_handshake: HandshakeExpectation = ""
    # expect_handshake = "slow" only: seconds the handshake must have taken, and completed in (a
    # published figure: §2.17's 4-5.6 s); 0: the default bound above
    handshake_at_least: float = 0.0
    # expect = "blocked" only: by a reset (an injected RST, §2.17 from 03-04) or by a stall until the
    # timeout (drops); "" accepts either
    blocked_by: BlockCause = ""
    # protocol "command": a shell command run in the client namespace, with {url} {host} {address}
    # {file} {size} {port} filled in (measure/commands.py; load.py's COMMAND_PLACEHOLDERS)
    command: str = ""
    wrap: str = ""  # protocol "command": a helper (e.g. a proxy on {port}) running while the probe does
    http3: bool = False  # protocol "browser": over HTTP/3 (QUIC) to the lab's HTTP/3 server, not TCP

    @property
    def transport(self) -> Literal["tcp", "udp"]:
        """What the probe's flow runs over: udp for QUIC (the QUIC client, a browser over HTTP/3)."""
        return "udp" if self.protocol == "quic" or self.http3 else "tcp"


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    title: str
    description: str
    sources: tuple[str, ...]
    model: Model
    rules: tuple[Rule, ...]
    probes: tuple[Probe, ...]
    path: str = ""
    # The lab's link for this scenario (top-level keys): the RTT its sources measured (seconds,
    # added by the lab's router, half each way), how much it varied (+-), and a bottleneck (bytes/s
    # each way; 0: none). 0: the lab's own ~0.1 ms.
    rtt: float = 0.0
    jitter: float = 0.0
    bottleneck: float = 0.0


def probe_rule(scenario: Scenario, probe: Probe) -> Rule | None:
    """The rule a probe's flow should meet: the first whose names match the name the probe sends
    (its SNI or Host) over its transport, ECH condition included; None when no rule names it.
    What the runner measures a throttled probe against, when rules differ in rate (TCP and QUIC)."""
    name = probe.sni if isinstance(probe.sni, str) else probe.host if probe.sni else None
    for rule in scenario.rules:
        if rule.transport not in ("any", probe.transport) or not rule.patterns or name is None:
            continue
        if rule.ech is not None and rule.ech != probe.ech:
            continue
        if rule.matches_name(name.lower()):
            return rule
    return None
