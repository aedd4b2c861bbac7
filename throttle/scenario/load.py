"""Scenario files: TOML in, frozen and validated dataclasses (`throttle.scenario.model`) out.

Every error names the file, the key and the
fix, e.g. `scenarios/x.toml: rule[2].rate: "13O kbit" is not a rate; write e.g. 130kbit`.
Rules and probes are counted from 1 in those keys, as a person counts the `[[rule]]` tables.
"""

from __future__ import annotations

import ipaddress
import string
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from throttle.errors import ScenarioError
from throttle.scenario.model import (ACTIONS, DIRECTIONS, EVASIONS, METERS, NAME_SOURCES, OUTCOMES, PROBE_DIRECTIONS,
                                     PROTOCOLS, SCOPES, STICKY_SCOPES, TRANSPORTS, Evasion, Model, NameSourceKind, Network, Probe,
                                     Rule, Scenario, Transport)
from throttle.scenario.model import BLOCK_CAUSES, HANDSHAKE_EXPECTATIONS, BlockCause, HandshakeExpectation  # probe keys
from throttle.scenario.patterns import compile_pattern
from throttle.units import parse_duration, parse_rate, parse_size


def load_scenario(path: str | Path) -> Scenario:
    """Load and validate a scenario file; raises ScenarioError naming file, key and fix."""
    p = Path(path)
    label = str(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(label, "", "no such file; `throttle scenarios list` shows the bundled ones") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(label, "", f"cannot be read ({exc})") from None
    return parse_scenario(text, label)


def parse_scenario(text: str, label: str = "<scenario>") -> Scenario:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(label, "", f"is not valid TOML ({exc})") from None
    except RecursionError:
        raise ScenarioError(label, "", "is nested too deeply to be a scenario (arrays or tables inside each other "
                            "hundreds of levels down); a scenario is [scenario], [model], [[rule]] and [[probe]] tables") from None
    r = _Reader(label)
    r.known(doc, "", {"scenario", "model", "rule", "probe", *LINK_KEYS})
    meta = r.table(doc, "scenario")
    r.known(meta, "scenario", {"name", "title", "description", "sources"})
    name = r.get(meta, "scenario.name", str, default=Path(label).stem)
    model = _model(r, r.table(doc, "model"))
    rule_tables = r.array(doc, "rule")
    if not rule_tables:
        raise ScenarioError(label, "rule", "no [[rule]] tables; a scenario needs at least one rule")
    rules = tuple(_rule(r, t, i) for i, t in enumerate(rule_tables, 1))
    seen: set[str] = set()
    for i, rule in enumerate(rules, 1):
        if rule.name in seen:
            raise ScenarioError(label, f"rule[{i}].name", f'"{rule.name}" is used by an earlier rule; names must be unique')
        seen.add(rule.name)
    probes = tuple(_probe(r, t, i) for i, t in enumerate(r.array(doc, "probe"), 1))
    rtt, jitter, bottleneck = _link(r, doc)
    return Scenario(
        name=name,
        title=r.get(meta, "scenario.title", str, default=name),
        description=r.get(meta, "scenario.description", str, default=""),
        sources=tuple(r.get(meta, "scenario.sources", list, default=[])),
        model=model,
        rules=rules,
        probes=probes,
        path=label,
        rtt=rtt,
        jitter=jitter,
        bottleneck=bottleneck,
    )


LINK_KEYS = ("rtt", "jitter", "bottleneck")  # top-level: the lab's link (Scenario)


def _link(r: _Reader, doc: dict[str, Any]) -> tuple[float, float, float]:
    """rtt, jitter and bottleneck, at the top of the file (before the first [table])."""
    rtt = r.conv(doc, "rtt", parse_duration, 0.0)
    jitter = r.conv(doc, "jitter", parse_duration, 0.0)
    bottleneck = r.conv(doc, "bottleneck", parse_rate, 0.0)
    if jitter > rtt:
        r.fail("jitter", f"{doc['jitter']!r} is more than the rtt ({doc.get('rtt', '0ms')!r}): each packet's delay "
                         "varies by half the jitter around half the rtt; write e.g. rtt = \"50ms\" and jitter = \"2ms\"")
    if "bottleneck" in doc and bottleneck < 1000:
        r.fail("bottleneck", f"{doc['bottleneck']!r} is below 8kbit, the slowest link the lab shapes; write e.g. "
                             "bottleneck = \"5mbit\" (or remove it: no bottleneck)")
    return rtt, jitter, bottleneck


def _model(r: _Reader, t: dict[str, Any]) -> Model:
    keys = {f.name for f in fields(Model)}
    r.known(t, "model", keys)
    d = Model()
    sources: list[NameSourceKind] = []
    for name in r.get(t, "model.name_sources", list, default=list(d.name_sources)):
        kind = next((k for k in NAME_SOURCES if k == name), None)
        if kind is None:
            r.fail("model.name_sources", f'"{name}" is not a name source; use some of {", ".join(NAME_SOURCES)}')
        sources.append(kind)
    return Model(
        reassemble=r.get(t, "model.reassemble", bool, default=d.reassemble),
        reassembly_limit=r.conv(t, "model.reassembly_limit", parse_size, d.reassembly_limit),
        window_packets=r.count(t, "model.window_packets", d.window_packets, minimum=1),
        window_extension=r.count(t, "model.window_extension", d.window_extension),
        give_up_bytes=r.conv(t, "model.give_up_bytes", parse_size, d.give_up_bytes),
        strip_trailing_dot=r.get(t, "model.strip_trailing_dot", bool, default=d.strip_trailing_dot),
        inspect_after_name=r.get(t, "model.inspect_after_name", bool, default=d.inspect_after_name),
        fin_rst_ends_flow=r.get(t, "model.fin_rst_ends_flow", bool, default=d.fin_rst_ends_flow),
        syn_restarts_flow=r.get(t, "model.syn_restarts_flow", bool, default=d.syn_restarts_flow),
        idle_timeout=r.conv(t, "model.idle_timeout", parse_duration, d.idle_timeout),
        max_flows=r.count(t, "model.max_flows", d.max_flows, minimum=1),
        name_sources=tuple(sources),
        dns_max_entries=r.count(t, "model.dns_max_entries", d.dns_max_entries, minimum=1),
        inside=r.networks(t, "model.inside"),
    )


def _rule(r: _Reader, t: Any, i: int) -> Rule:
    k = f"rule[{i}]"
    if not isinstance(t, dict):
        r.fail(k, "is not a table; write [[rule]] followed by its keys")
    r.known(t, k, {f.name for f in fields(Rule)} - {"patterns"} | {"match"})
    d = Rule(name="")
    patterns = []
    for j, text in enumerate(r.get(t, f"{k}.match", list, default=[]), 1):
        try:
            patterns.append(compile_pattern(text))
        except ValueError as exc:
            r.fail(f"{k}.match[{j}]", str(exc))
    addresses = r.networks(t, f"{k}.addresses")
    quic_versions = tuple(r.get(t, f"{k}.quic_versions", list, default=[]))
    for j, version in enumerate(quic_versions, 1):
        if not isinstance(version, int) or isinstance(version, bool) or not 0 < version < 1 << 32:
            r.fail(f"{k}.quic_versions[{j}]", f"{version!r} is not a QUIC version number; write e.g. 1 (RFC 9000) or "
                                              "0x6b3343cf (QUIC version 2, RFC 9369)")
    if not patterns and not addresses and not quic_versions:
        r.fail(k, 'matches nothing; give match = ["*.twimg.com"], addresses = ["198.18.2.0/24"] and/or '
                  'quic_versions = [1]')
    if quic_versions and (patterns or addresses):
        r.fail(f"{k}.quic_versions", "matches flows by their QUIC version alone; put match and addresses in a "
                                     "rule of their own")
    default_transport: Transport = "udp" if quic_versions else "any"
    transport = r.choice(t, f"{k}.transport", TRANSPORTS, default_transport)
    if quic_versions and transport != "udp":
        r.fail(f"{k}.transport", 'must be "udp" in a rule with quic_versions (QUIC runs over UDP)')
    ech = t.get("ech")
    if ech is not None and not isinstance(ech, bool):
        r.fail(f"{k}.ech", f"{ech!r} is neither true (only hellos with ECH) nor false (only hellos without)")
    ports = tuple(r.get(t, f"{k}.ports", list, default=[]))
    for j, port in enumerate(ports, 1):
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            r.fail(f"{k}.ports[{j}]", f"{port!r} is not a port number (1-65535)")
    action = r.choice(t, f"{k}.action", ACTIONS, d.action)
    probability = _probability(r, t, k, action)
    if action in ("drop", "rst", "loss"):
        how = "each packet is dropped at random, at no rate" if action == "loss" else "every packet is dropped"
        for key in ("rate", "burst", "queue_delay", "queue_bytes") + (("scope",) if action == "loss" else ()):
            if key in t:
                r.fail(f"{k}.{key}", f'has no meaning for action = "{action}" ({how}); remove it')
        if action == "rst" and (transport == "udp" or quic_versions):
            r.fail(f"{k}.action", '"rst" resets TCP connections; for QUIC (udp) write action = "drop"')
        t = {**t, "rate": "0", "burst": "0"}
    rate = r.conv(t, f"{k}.rate", parse_rate, None)
    if rate is None:
        r.fail(f"{k}.rate", "is missing; write e.g. rate = \"130kbit\"")
    if action == "shape" and rate <= 0:
        r.fail(f"{k}.rate", 'a shaper needs a rate above 0 (a rate of 0 that freezes flows is a policer\'s: '
                            'action = "police")')
    meter = r.choice(t, f"{k}.meter", METERS, d.meter)
    if meter == "window" and action != "police":
        r.fail(f"{k}.meter", f'"window" is a policer\'s meter (it drops); with action = "{action}" remove meter '
                             'or write meter = "bucket"')
    burst = r.conv(t, f"{k}.burst", parse_size, d.burst)
    if meter == "window" and (rate <= 0 or burst <= 0):
        r.fail(f"{k}.meter", '"window" needs a rate and a burst above 0: each interval of burst / rate seconds '
                             'passes burst bytes; write e.g. rate = "130kbit" and burst = "16KB"')
    sticky = r.conv(t, f"{k}.sticky", parse_duration, d.sticky)
    sticky_scope = r.choice(t, f"{k}.sticky_scope", STICKY_SCOPES, d.sticky_scope)
    if "sticky_scope" in t and not sticky:
        r.fail(f"{k}.sticky_scope", 'has no meaning without sticky; add e.g. sticky = "600s" or remove it')
    return Rule(
        name=r.get(t, f"{k}.name", str, default=f"rule{i}"),
        patterns=tuple(patterns),
        addresses=addresses,
        ports=ports,
        action=action,
        rate=rate,
        burst=burst,
        direction=r.choice(t, f"{k}.direction", DIRECTIONS, d.direction),
        scope=r.choice(t, f"{k}.scope", SCOPES, d.scope),
        after_bytes=r.conv(t, f"{k}.after_bytes", parse_size, d.after_bytes),
        queue_delay=r.conv(t, f"{k}.queue_delay", parse_duration, d.queue_delay),
        queue_bytes=r.conv(t, f"{k}.queue_bytes", parse_size, d.queue_bytes),
        sticky=sticky,
        sticky_scope=sticky_scope,
        meter=meter,
        transport=transport,
        ech=ech,
        quic_versions=quic_versions,
        allow=r.networks(t, f"{k}.allow"),
        probability=probability,
    )


def _probability(r: _Reader, t: dict[str, Any], k: str, action: str) -> float:
    """A loss rule's chance of dropping each packet: a fraction above 0 and at most 1."""
    if "probability" not in t:
        if action == "loss":
            r.fail(f"{k}.probability", 'is missing; action = "loss" drops each packet with this chance: write e.g. '
                                       'probability = 0.02 (2%)')
        return 0.0
    if action != "loss":
        r.fail(f"{k}.probability", f'is the chance action = "loss" drops each packet; with action = "{action}" '
                                   'remove it')
    value = t["probability"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        r.fail(f"{k}.probability", f"{value!r} is not a fraction above 0 and at most 1; write e.g. probability = "
                                   "0.02 (2% of packets dropped)")
    return float(value)


def _probe(r: _Reader, t: Any, i: int) -> Probe:
    k = f"probe[{i}]"
    if not isinstance(t, dict):
        r.fail(k, "is not a table; write [[probe]] followed by its keys")
    r.known(t, k, {f.name for f in fields(Probe)})
    host = r.get(t, f"{k}.host", str, default=None)
    if not host:
        r.fail(f"{k}.host", 'is missing; write e.g. host = "pbs.twimg.com"')
    d = Probe(name="", host="")
    sni = t.get("sni", True)
    if not isinstance(sni, (bool, str)):
        r.fail(f"{k}.sni", f"{sni!r} is neither true, false nor a name")
    address = r.get(t, f"{k}.address", str, default=None)
    if address is not None:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            r.fail(f"{k}.address", f'"{address}" is not an IP address')
    _browser(r, t, k)
    return Probe(
        name=r.get(t, f"{k}.name", str, default=f"probe{i}"),
        host=host,
        direction=r.choice(t, f"{k}.direction", PROBE_DIRECTIONS, d.direction),
        size=r.conv(t, f"{k}.size", parse_size, d.size),
        protocol=r.choice(t, f"{k}.protocol", PROTOCOLS, d.protocol),
        sni=sni,
        address=address,
        expect=r.choice(t, f"{k}.expect", OUTCOMES, d.expect),
        control=r.get(t, f"{k}.control", bool, default=d.control),
        evasion=_evasion(r, t, k),
        timeout=r.conv(t, f"{k}.timeout", parse_duration, d.timeout),
        ech=_ech(r, t, k),
        freeze_bytes=_freeze_bytes(r, t, k),
        expect_rate=_expect_rate(r, t, k),
        tolerance=_tolerance(r, t, k),
        expect_handshake=_expect_handshake(r, t, k),
        handshake_at_least=_handshake_at_least(r, t, k),
        blocked_by=_blocked_by(r, t, k),
        command=_command(r, t, k, "command"),
        wrap=_command(r, t, k, "wrap"),
        http3=r.get(t, f"{k}.http3", bool, default=False),
    )


COMMAND_PLACEHOLDERS = ("url", "host", "address", "file", "size", "port")


def _browser(r: _Reader, t: dict[str, Any], k: str) -> None:
    """A browser probe goes to its host by name (over HTTP/3 with `http3`, a browser's key only)."""
    if t.get("protocol") != "browser":
        if t.get("http3"):
            r.fail(f"{k}.http3", 'needs protocol = "browser" (protocol = "quic" is HTTP/3 already)')
        return
    if t.get("sni", True) is not True:
        r.fail(f"{k}.sni", 'protocol = "browser" sends its host as the SNI; remove sni')


def _command(r: _Reader, t: dict[str, Any], k: str, key: str) -> str:
    """A probe's command or wrap: only with protocol = "command"; known {placeholders} only."""
    text = r.get(t, f"{k}.{key}", str, default="")
    is_command = t.get("protocol") == "command"
    if key == "command" and is_command and not text.strip():
        r.fail(f"{k}.command", 'is missing; protocol = "command" runs it, e.g. command = "curl -sS -T {file} {url}"')
    if text and not is_command:
        r.fail(f"{k}.{key}", 'needs protocol = "command"')
    try:
        names = [name for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        r.fail(f"{k}.{key}", f"{exc} (write {{{{ and }}}} for literal braces)")
    for name in names:
        if name not in COMMAND_PLACEHOLDERS:
            r.fail(f"{k}.{key}", f"{{{name}}} is not a placeholder; known: "
                                 + ", ".join("{" + p + "}" for p in COMMAND_PLACEHOLDERS))
    if key == "wrap" and text and "port" not in names:
        r.fail(f"{k}.wrap", "needs {port}: the port the helper listens on, which the runner waits for")
    return text


def _freeze_bytes(r: _Reader, t: dict[str, Any], k: str) -> tuple[int, int] | None:
    value = r.get(t, f"{k}.freeze_bytes", list, default=None)
    if value is None:
        return None
    if len(value) != 2:
        r.fail(f"{k}.freeze_bytes", 'is a range of two sizes; write e.g. freeze_bytes = ["15KB", "20KB"]')
    try:
        low, high = parse_size(value[0]), parse_size(value[1])
    except (ValueError, TypeError) as exc:
        r.fail(f"{k}.freeze_bytes", str(exc))
    if low > high:
        r.fail(f"{k}.freeze_bytes", f"{value[0]!r} is more than {value[1]!r}; write the smaller first")
    if t.get("expect", "throttled") != "blocked":
        r.fail(f"{k}.freeze_bytes", 'needs expect = "blocked": only a transfer that stalls has bytes before a freeze')
    return low, high


def _expect_handshake(r: _Reader, t: dict[str, Any], k: str) -> HandshakeExpectation:
    value = r.choice(t, f"{k}.expect_handshake", HANDSHAKE_EXPECTATIONS, "")
    if value and t.get("protocol", "https") not in ("https", "quic"):
        r.fail(f"{k}.expect_handshake", 'needs protocol = "https" or "quic": the other clients do no TLS handshake '
                                        'they can time')
    if value and t.get("control", False):
        r.fail(f"{k}.expect_handshake", "a control is what handshakes are judged against; remove the key here")
    return value


def _expect_rate(r: _Reader, t: dict[str, Any], k: str) -> float | None:
    rate = r.conv(t, f"{k}.expect_rate", parse_rate, None)
    if rate is None:
        return None
    if rate <= 0:
        r.fail(f"{k}.expect_rate", 'must be above 0 (a probe that gets nothing through is expect = "blocked")')
    _needs_throttled(r, t, k, "expect_rate", "the speed a throttled probe must reach")
    return rate


def _tolerance(r: _Reader, t: dict[str, Any], k: str) -> float:
    if "tolerance" not in t:
        return Probe(name="", host="").tolerance
    value, fraction = t["tolerance"], -1.0
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            fraction = float(value.strip()[:-1]) / 100
        except ValueError:
            pass
    if not 0 < fraction < 1:
        r.fail(f"{k}.tolerance", f'{value!r} is not a percentage between 0 and 100; write e.g. tolerance = "25%"')
    _needs_throttled(r, t, k, "tolerance", "the band around a throttled probe's expected speed")
    return fraction


def _needs_throttled(r: _Reader, t: dict[str, Any], k: str, key: str, what: str) -> None:
    if t.get("expect", "throttled") != "throttled" or t.get("control", False):
        r.fail(f"{k}.{key}", f'is {what}; it needs expect = "throttled" (and no control = true)')


def _handshake_at_least(r: _Reader, t: dict[str, Any], k: str) -> float:
    floor = r.conv(t, f"{k}.handshake_at_least", parse_duration, 0.0)
    if "handshake_at_least" not in t:
        return floor
    if t.get("expect_handshake") != "slow":
        r.fail(f"{k}.handshake_at_least", 'is the floor of a slow handshake; it needs expect_handshake = "slow"')
    if floor <= 0:
        r.fail(f"{k}.handshake_at_least", 'must be above 0; write e.g. handshake_at_least = "4s"')
    return floor


def _blocked_by(r: _Reader, t: dict[str, Any], k: str) -> BlockCause:
    value = r.choice(t, f"{k}.blocked_by", BLOCK_CAUSES, "")
    if value and t.get("expect", "throttled") != "blocked":
        r.fail(f"{k}.blocked_by", 'needs expect = "blocked": it says how the probe must be stopped')
    return value


def _ech(r: _Reader, t: dict[str, Any], k: str) -> bool:
    ech = r.get(t, f"{k}.ech", bool, default=False)
    if ech and t.get("protocol") not in ("tls", "quic"):
        r.fail(f"{k}.ech", 'needs protocol = "tls" (the raw client) or "quic"; curl here cannot send ECH')
    return ech


def _evasion(r: _Reader, t: dict[str, Any], k: str) -> Evasion:
    evasion = r.choice(t, f"{k}.evasion", EVASIONS, "none")
    if evasion != "none" and t.get("protocol") == "quic":
        r.fail(f"{k}.evasion", f'"{evasion}" cannot apply to protocol = "quic": the QUIC client sends an ordinary '
                               'Initial; evasions disguise the raw TLS client\'s ClientHello (protocol = "tls"). '
                               'Remove evasion or write evasion = "none"')
    if evasion != "none" and t.get("protocol") != "tls":
        r.fail(f"{k}.evasion", 'needs protocol = "tls" (the raw client); curl cannot disguise its hello')
    return evasion


_TYPE_WORDS: dict[type, str] = {str: "a string", bool: "true or false", list: "a list", int: "a whole number",
                               dict: "a table"}
# Upper bounds of the keys read with units: beyond them a value is a typo or switches the censor
# off in effect (a queue that never drops, a timeout that never comes).
_LIMITS: dict[str, tuple[float, str]] = {
    "rtt": (10.0, "10s"),
    "jitter": (10.0, "10s"),
    "bottleneck": (10e9 / 8, "10gbit"),
    "rate": (100e9 / 8, "100gbit"),
    "expect_rate": (100e9 / 8, "100gbit"),
    "handshake_at_least": (3600.0, "1h"),
    "burst": (2**30, "1GiB"),
    "after_bytes": (2**40, "1TiB"),
    "queue_delay": (60.0, "60s"),
    "queue_bytes": (2**30, "1GiB"),
    "sticky": (86400.0, "24h"),
    "idle_timeout": (86400.0, "24h"),
    "reassembly_limit": (2**20, "1MiB"),
    "give_up_bytes": (65535, "65535"),
    "size": (2**36, "64GiB"),
    "timeout": (86400.0, "24h"),
}
T = TypeVar("T")
D = TypeVar("D")
C = TypeVar("C", bound=str)


@dataclass
class _Reader:
    """Typed access to a TOML document that turns every problem into a ScenarioError."""

    label: str

    def fail(self, key: str, reason: str) -> NoReturn:
        raise ScenarioError(self.label, key, reason)

    def known(self, t: dict[str, Any], where: str, keys: set[str]) -> None:
        for key in t:
            if key not in keys:
                full = f"{where}.{key}" if where else key
                self.fail(full, f"is not a known key; known keys here: {', '.join(sorted(keys))}")

    def table(self, doc: dict[str, Any], key: str) -> dict[str, Any]:
        t = doc.get(key, {})
        if not isinstance(t, dict):
            self.fail(key, f"must be a table; write [{key}]")
        return t

    def array(self, doc: dict[str, Any], key: str) -> list[Any]:
        t = doc.get(key, [])
        if not isinstance(t, list):
            self.fail(key, f"must be an array of tables; write [[{key}]]")
        return t

    def get(self, t: dict[str, Any], key: str, typ: type[T], default: D) -> T | D:
        leaf = key.rsplit(".", 1)[-1]
        if leaf not in t:
            return default
        value = t[leaf]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            self.fail(key, f"{value!r} is not {_TYPE_WORDS.get(typ, typ.__name__)}")
        return value

    def conv(self, t: dict[str, Any], key: str, parse: Callable[[Any], T], default: D) -> T | D:
        leaf = key.rsplit(".", 1)[-1]
        if leaf not in t:
            return default
        try:
            value = parse(t[leaf])
        except (ValueError, TypeError) as exc:
            self.fail(key, str(exc))
        limit = _LIMITS.get(leaf)
        if limit is not None and isinstance(value, (int, float)) and value > limit[0]:
            self.fail(key, f"{t[leaf]!r} is more than {limit[1]}, the most this key takes")
        return value

    def count(self, t: dict[str, Any], key: str, default: int, minimum: int = 0) -> int:
        value = self.get(t, key, int, default)
        if value < minimum:
            self.fail(key, f"{value} is below {minimum}")
        return value

    def choice(self, t: dict[str, Any], key: str, choices: tuple[C, ...], default: C) -> C:
        value = self.get(t, key, str, default)
        for choice in choices:
            if choice == value:
                return choice
        self.fail(key, f'"{value}" is not one of {", ".join(choices)}')

    def networks(self, t: dict[str, Any], key: str) -> tuple[Network, ...]:
        out: list[Network] = []
        for j, text in enumerate(self.get(t, key, list, default=[]), 1):
            try:
                out.append(ipaddress.ip_network(text, strict=False))
            except (ValueError, TypeError):
                self.fail(f"{key}[{j}]", f"{text!r} is not an address or network; write e.g. 198.18.2.0/24")
        return tuple(out)
