"""Which rule limits a flow: by name, by server address, or because its server is sticky.

Rules are tried in file order; the first that matches wins. A rule with patterns matches a name
(and, when it also lists addresses or ports, only flows to those); a rule with addresses and no
patterns matches a flow by its server address alone, when it starts. Sticky rules (Turkey 2022,
docs/incidents.md §2.20) keep a triggering flow's server address limited for a while: later flows to
it are limited whatever their name.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

from throttle.engine.flows import Flow
from throttle.scenario import Network, Rule


def in_networks(addr: bytes, nets: tuple[Network, ...]) -> bool:
    ip = ipaddress.ip_address(addr)
    return any(ip.version == n.version and ip in n for n in nets)


class RuleSet:
    """The scenario's rules, in order, and the sticky server addresses they armed."""

    def __init__(self, rules: tuple[Rule, ...], max_sticky: int) -> None:
        self.rules = rules
        self.address_rules = tuple(r for r in rules if r.addresses and not r.patterns)
        self._max_sticky = max_sticky
        # server address -> (rule, until), least recently armed first: bounded, O(1) eviction
        self._sticky: OrderedDict[bytes, tuple[Rule, float]] = OrderedDict()

    def by_name(self, flow: Flow, name: str) -> Rule | None:
        """The first rule whose patterns match `name` and whose addresses and ports fit the flow."""
        for rule in self.rules:
            if rule.patterns and rule.matches_name(name):
                if rule.addresses and not in_networks(flow.server, rule.addresses):
                    continue
                if rule.ports and flow.server_port not in rule.ports:
                    continue
                return rule
        return None

    def by_address(self, flow: Flow) -> Rule | None:
        """The first address-only rule that covers the flow's server address and port."""
        for rule in self.address_rules:
            if rule.ports and flow.server_port not in rule.ports:
                continue
            if in_networks(flow.server, rule.addresses):
                return rule
        return None

    def sticky(self, server: bytes, now: float) -> Rule | None:
        """The rule an earlier flow to this server armed, while it lasts."""
        if not self._sticky:
            return None
        entry = self._sticky.get(server)
        if entry is not None and entry[1] > now:
            return entry[0]
        return None

    def arm(self, server: bytes, rule: Rule, now: float) -> None:
        """A real trigger of a sticky rule: its server stays limited for `rule.sticky` seconds."""
        self._sticky[server] = (rule, now + rule.sticky)
        self._sticky.move_to_end(server)
        while len(self._sticky) > self._max_sticky:
            self._sticky.popitem(last=False)

    def __len__(self) -> int:
        """Sticky server addresses remembered now."""
        return len(self._sticky)
