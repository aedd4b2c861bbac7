"""Scenarios: the model of a real incident (how the censor inspects, what it limits, which probes
to try), loaded from TOML into frozen dataclasses, and the library of bundled scenario files."""

from __future__ import annotations

from throttle.scenario.load import load_scenario, parse_scenario
from throttle.scenario.model import (ACTIONS, DIRECTIONS, EVASIONS, NAME_SOURCES, OUTCOMES, PROBE_DIRECTIONS,
                                     PROTOCOLS, SCOPES, TRANSPORTS, Action, Evasion, Model, NameSourceKind, Network, Outcome,
                                     Probe, ProbeDirection, Protocol, Rule, RuleDirection, Scenario, Scope,
                                     Transport, probe_rule)
from throttle.scenario.patterns import Pattern, compile_pattern

__all__ = [
    "ACTIONS", "DIRECTIONS", "EVASIONS", "NAME_SOURCES", "OUTCOMES", "PROBE_DIRECTIONS", "PROTOCOLS", "SCOPES",
    "TRANSPORTS", "Transport",
    "Action", "Evasion", "Model", "NameSourceKind", "Network", "Outcome", "Pattern", "Probe", "ProbeDirection",
    "Protocol", "Rule", "RuleDirection", "Scenario", "Scope", "compile_pattern", "load_scenario", "parse_scenario",
    "probe_rule",
]
