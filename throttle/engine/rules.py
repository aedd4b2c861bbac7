"""Which rule limits a flow: by name, by server address, or because its server is sticky.

Rules are tried in file order; the first that matches wins. A rule with patterns matches a name
(and, when it also lists addresses or ports, only flows to those); a rule with addresses and no
patterns matches a flow by its server address alone, when it starts; a rule with QUIC versions
matches a UDP flow by the version of its first Initial (Russia 2022, docs/incidents.md §4.25). A
rule may be limited to one transport (tcp or udp), to hellos with or without ECH (§4.29), and may
allow some server addresses (§4.25's allowed servers). Sticky rules (Turkey 2022,
docs/incidents.md §2.20) keep a triggering flow's server address limited for a while: later flows to
it are limited whatever their name; from the triggering client only (`sticky_scope = "client_server"`)
or from every client (`"server"`).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

from throttle.engine.flows import Flow
from throttle.scenario import Network, Rule


def in_networks(addr: bytes, nets: tuple[Network, ...]) -> bool:
    ip = ipaddress.ip_address(addr)
    return any(ip.version == n.version and ip in n for n in nets)


def _fits(rule: Rule, flow: Flow) -> bool:
    """The rule's port, transport and allow-list conditions hold for the flow."""
    if rule.ports and flow.server_port not in rule.ports:
        return False
    if rule.transport != "any" and rule.transport != flow.transport:
        return False
    return not (rule.allow and in_networks(flow.server, rule.allow))


class RuleSet:
    """The scenario's rules, in order, and the sticky server addresses they armed."""

    def __init__(self, rules: tuple[Rule, ...], max_sticky: int) -> None:
        self.rules = rules
        self.address_rules = tuple(r for r in rules if r.addresses and not r.patterns)
        self.version_rules = tuple(r for r in rules if r.quic_versions)
        self._max_sticky = max_sticky
        # sticky key -> (rule, until), least recently armed first: bounded, O(1) eviction. The key is
        # the server address (scope "server") or client + server (scope "client_server"); their
        # lengths (4 or 16 bytes, 8 or 32) tell them apart.
        self._sticky: OrderedDict[bytes, tuple[Rule, float]] = OrderedDict()

    def by_name(self, flow: Flow, name: str, ech: bool = False) -> Rule | None:
        """The first rule whose patterns match `name` and whose addresses, ports, transport and
        ECH condition fit the flow (`ech`: the hello that carried the name had an ECH extension)."""
        for rule in self.rules:
            if rule.patterns and rule.matches_name(name):
                if not _fits(rule, flow):
                    continue
                if rule.addresses and not in_networks(flow.server, rule.addresses):
                    continue
                if rule.ech is not None and rule.ech != ech:
                    continue
                return rule
        return None

    def by_address(self, flow: Flow) -> Rule | None:
        """The first address-only rule that covers the flow's server address and port."""
        for rule in self.address_rules:
            if _fits(rule, flow) and in_networks(flow.server, rule.addresses):
                return rule
        return None

    def by_quic_version(self, flow: Flow, version: int) -> Rule | None:
        """The first rule for QUIC `version` (the version of the flow's first Initial) that fits."""
        for rule in self.version_rules:
            if version in rule.quic_versions and _fits(rule, flow):
                return rule
        return None

    def sticky(self, flow: Flow, now: float) -> Rule | None:
        """The rule an earlier flow to this server armed (from this client, or from any client for
        a rule of scope "server"), while it lasts."""
        if not self._sticky:
            return None
        for key in (flow.client + flow.server, flow.server):
            entry = self._sticky.get(key)
            if entry is not None and entry[1] > now:
                return entry[0]
        return None

    def arm(self, flow: Flow, rule: Rule, now: float) -> None:
        """A real trigger of a sticky rule: its server stays limited for `rule.sticky` seconds, for
        the triggering client (scope "client_server") or for every client (scope "server")."""
        key = flow.server if rule.sticky_scope == "server" else flow.client + flow.server
        self._sticky[key] = (rule, now + rule.sticky)
        self._sticky.move_to_end(key)
        while len(self._sticky) > self._max_sticky:
            self._sticky.popitem(last=False)

    def __len__(self) -> int:
        """Sticky marks (server addresses, or client and server pairs) remembered now."""
        return len(self._sticky)
