"""A scenario that reproduces a capture: inferences in, scenario TOML out (`throttle infer --write`).

Limited names become rules, grouped when they share a mechanism, a transport, the directions
limited and parameters within `SAME_RATE` / `SAME_BURST` of each other; names nothing limited
become controls; every connection becomes a probe of the direction that carried the most, of that
size and transport, expected to come out as the capture did (a limited transfer at the goodput it
had).
The capture's round-trip time goes in the scenario's `rtt` key when the scenario model has one.

Rates are written as the fitter gives them, IP-layer bits per second, which is what the engine's
buckets count. Flows without a name a censor could act on (plain TCP to an address) are left out,
each with a comment saying so: a rule by address would name the capture's servers, not the lab's.

The text is built here (pure); `write_scenario` writes it and loads it back with the project's
loader, so a file that `throttle run` would refuse is never left behind.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from throttle.errors import ScenarioError, ThrottleError
from throttle.files import atomic_write
from throttle.infer.trace import Inference, Mechanism
from throttle.scenario import Scenario
from throttle.scenario.load import parse_scenario
from throttle.scenario.model import NAME_SOURCES

__all__ = ["SAME_BURST", "SAME_RATE", "scenario_text", "transfers", "write_scenario"]

SAME_RATE = 0.10  # two limits this close in rate are one rule (the --check tolerance)
SAME_BURST = 0.25
BLOCKED_TIMEOUT = "10s"  # a blocked probe's wait: long enough to see a stall, short enough to run
CONTROL_SIZE = 262144
LIMITED: frozenset[Mechanism] = frozenset(("police", "window", "shape", "freeze", "reset", "timeout", "crawl"))


@dataclass
class _Limit:
    """One rule to be: a mechanism with its parameters, the names it limits, in which directions."""

    mechanism: Mechanism
    transport: str  # the rule's: tcp or udp
    direction: str  # upload, download, both
    rate_bps: float | None
    burst: float | None
    after_bytes: int | None
    queue_delay: float | None
    names: list[str] = field(default_factory=list)
    rate_floor: bool = False  # every rate averaged was a floor (the captures bound it from below only)

    def joins(self, other: _Limit) -> bool:
        return (self.mechanism, self.transport, self.direction) == (other.mechanism, other.transport, other.direction) \
            and _close(self.rate_bps, other.rate_bps, SAME_RATE) and _close(self.burst, other.burst, SAME_BURST) \
            and _close(self.after_bytes, other.after_bytes, SAME_BURST)


def _close(a: float | None, b: float | None, tolerance: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= tolerance * max(abs(a), abs(b), 1e-9)


def _rule_transport(inf: Inference) -> str:
    return "tcp" if inf.trace.transport == "tcp" else "udp"


def _limit(infs: Sequence[Inference], direction: str) -> _Limit:
    """The limit of one name's limited direction(s) (the most confident inference's mechanism;
    parameters averaged over the directions and flows that agree with it)."""
    best = max(infs, key=lambda i: i.confidence)
    same = [i for i in infs if i.mechanism == best.mechanism]

    def mean(values: list[float]) -> float | None:
        return statistics.fmean(values) if values else None

    rate = mean([i.rate_bps.value for i in same if i.rate_bps is not None])
    if rate is None and best.mechanism == "window" and best.period is not None and best.burst_bytes is not None \
            and best.period.value > 0:
        rate = best.burst_bytes.value * 8 / best.period.value
    after = [i.after_bytes for i in same if i.after_bytes is not None]
    return _Limit(mechanism=best.mechanism, transport=_rule_transport(best), direction=direction, rate_bps=rate,
                  burst=mean([i.burst_bytes.value for i in same if i.burst_bytes is not None]),
                  after_bytes=min(after) if after else None,
                  queue_delay=mean([i.queue_delay.value for i in same if i.queue_delay is not None]),
                  rate_floor=any(i.rate_bps is not None for i in same)
                  and all(i.rate_floor for i in same if i.rate_bps is not None))


def _limits(inferences: Sequence[Inference]) -> list[_Limit]:
    """Limited names grouped into rules, in the order their names first appear."""
    by_name: dict[tuple[str, str], dict[str, list[Inference]]] = {}
    for inf in inferences:
        name = inf.trace.server_name
        if name is None or inf.mechanism not in LIMITED:
            continue
        by_name.setdefault((name, _rule_transport(inf)), {}).setdefault(inf.trace.direction, []).append(inf)
    rules: list[_Limit] = []
    for (name, _), dirs in by_name.items():
        limits = [_limit(infs, d) for d, infs in dirs.items()]
        if len(limits) == 2 and limits[0].joins(dataclasses.replace(limits[1], direction=limits[0].direction)):
            limits = [_limit(dirs["upload"] + dirs["download"], "both")]
        for limit in limits:
            home = next((r for r in rules if r.joins(limit)), None)
            if home is None:
                rules.append(home := limit)
            home.names.append(name)
    return rules


def _q(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text)


def _rate(bps: float) -> str:
    return _q(f"{max(bps, 8.0) / 1000:.6g}kbit")


def _rule_lines(i: int, limit: _Limit) -> list[str]:
    names = sorted(set(limit.names))
    mech = limit.mechanism
    out = ["[[rule]]", f"name = {_q(f'inferred-{i}-{mech}')}", f"match = [{', '.join(_q(n) for n in names)}]",
           f"transport = {_q(limit.transport)}"]
    if mech in ("police", "window"):
        rate = limit.rate_bps if limit.rate_bps is not None else 130_000.0
        note = ("  # no rate inferred: assumed" if not limit.rate_bps else
                "  # a floor: the capture fits this rate and any faster one (it reproduces the capture as well)"
                if limit.rate_floor else "")
        out += ['action = "police"', f"rate = {_rate(rate)}" + note,
                f"burst = {_q(str(max(int(limit.burst or 1500), 1)))}"]
        if mech == "window":
            out.append('meter = "window"  # losses in periodic blackouts: burst bytes per burst / rate seconds')
    elif mech in ("shape", "crawl"):
        rate = limit.rate_bps if limit.rate_bps is not None else 1500.0
        delay = min(max(2 * (limit.queue_delay or 0.0), 1.0 if mech == "shape" else 20.0), 60.0)
        out += ['action = "shape"', f"rate = {_rate(rate)}",
                f"burst = {_q(str(max(int(limit.burst or (450 if mech == 'crawl' else 16384)), 1)))}",
                f"queue_delay = {_q(f'{delay:.3g}s')}  # twice the queueing seen, so the shaper delays, never drops"]
    elif mech == "freeze":
        out += ['action = "drop"', f"after_bytes = {_q(str(limit.after_bytes or 0))}  # nothing passes after this"]
    elif mech == "reset" and limit.transport == "tcp":
        out.append('action = "rst"')
    else:  # timeout, or a reset of a QUIC flow (no RST to inject): every packet after the hello dropped
        out.append('action = "drop"')
    if mech != "freeze" and limit.after_bytes:
        if mech in ("police", "window", "shape"):
            out.append(f"after_bytes = {_q(str(limit.after_bytes))}")
    out += [f"direction = {_q(limit.direction)}", 'scope = "flow"', ""]
    return out


def _protocol(inf: Inference) -> str:
    if inf.trace.transport != "tcp":
        return "quic"
    return "http" if inf.trace.name_source == "http" else "https"


def _goodput(inf: Inference) -> float | None:
    """Payload bytes per second the capture's transfer reached, first packet to last."""
    t = inf.trace
    seconds = t.last - t.first
    carried = t.delivered or t.payload
    return carried / seconds if seconds > 0 and carried > 0 else None


def _probe_lines(i: int, inf: Inference, limited_names: set[str], limit: _Limit | None) -> list[str]:
    t = inf.trace
    assert t.server_name is not None
    size = max(t.payload, 1024)
    out = ["[[probe]]", f"name = {_q(f'{t.server_name}-{t.direction}-{i}')}", f"host = {_q(t.server_name)}",
           f"direction = {_q(t.direction)}", f"size = {_q(str(size))}", f"protocol = {_q(_protocol(inf))}"]
    note = f"  # {t.client} -> {t.server}: {inf.mechanism} ({inf.confidence:.2f}): {inf.reason}"
    mech = limit.mechanism if limit is not None else "none"
    if mech in ("police", "window", "shape"):
        out.append('expect = "throttled"' + note)
        rate = _goodput(inf)
        if rate is not None:
            out += [f"expect_rate = {_rate(rate * 8)}  # the goodput the capture's transfer had", 'tolerance = "25%"']
    elif mech == "crawl":
        done = t.fin
        out.append(f'expect = "{"throttled" if done else "blocked"}"' + note)
        if _protocol(inf) in ("https", "quic"):
            out.append('expect_handshake = "slow"')
        if not done:
            out.append(f"timeout = {_q(BLOCKED_TIMEOUT)}")
    elif mech in ("freeze", "reset", "timeout"):
        out.append('expect = "blocked"' + note)
        if mech == "freeze" and limit is not None and limit.after_bytes is not None:
            low, high = max(0, limit.after_bytes - 4 * t.mss), limit.after_bytes + 4 * t.mss
            out.append(f"freeze_bytes = [{_q(str(low))}, {_q(str(high))}]")
        by = "reset" if mech == "reset" and t.transport == "tcp" else "timeout"
        out += [f"blocked_by = {_q(by)}", f"timeout = {_q(BLOCKED_TIMEOUT)}"]
    else:
        out.append('expect = "normal"' + note)
        if t.server_name not in limited_names:
            out.append("control = true")
    return out + [""]


def transfers(inferences: Sequence[Inference]) -> list[Inference]:
    """One per connection: the direction that carried the most (an upload's other half carries
    the handshake and the server's reply, not a transfer of its own)."""
    best: dict[tuple[str, str, str], Inference] = {}
    for inf in inferences:
        key = (inf.trace.client, inf.trace.server, inf.trace.transport)
        if key not in best or inf.trace.payload > best[key].trace.payload:
            best[key] = inf
    return list(best.values())


def _rtt(inferences: Sequence[Inference]) -> float | None:
    samples = [i.trace.base_rtt for i in inferences if i.trace.base_rtt is not None and i.trace.base_rtt > 0]
    return statistics.median(samples) if samples else None


def scenario_text(inferences: Sequence[Inference], captures: Sequence[str | Path], name: str | None = None) -> str:
    """The scenario (TOML) that reproduces these inferences of `captures`."""
    from throttle import __version__

    stem = Path(str(captures[0])).stem if captures else "capture"
    name = name or f"inferred-{stem}"
    limits = _limits(inferences)
    limited_names = {n for lim in limits for n in lim.names}
    named = [i for i in inferences if i.trace.server_name is not None]
    unnamed = [i for i in inferences if i.trace.server_name is None]
    sources = sorted({s for i in named if (s := i.trace.name_source) in NAME_SOURCES}) or ["tls"]
    if any(i.trace.transport != "tcp" for i in named) and "quic" not in sources:
        sources.append("quic")
    lines = [f"# Written by throttle infer {__version__} from {', '.join(str(c) for c in captures)}.",
             "# Rates are IP-layer, as the fitter measured them; every probe repeats one connection of the capture.",
             *(f"# not reproduced: {i.trace.client} -> {i.trace.server} {i.trace.transport} {i.trace.direction} "
               f"({i.mechanism}): no name a censor could act on" for i in unnamed), ""]
    rtt = _rtt(inferences)
    if rtt is not None and "rtt" in {f.name for f in dataclasses.fields(Scenario)}:
        lines += [f"rtt = {_q(f'{rtt * 1000:.0f}ms')}  # the smallest round trip the capture shows", ""]
    summary = "; ".join(f"{', '.join(sorted(set(lim.names)))}: {lim.mechanism} {lim.direction}" for lim in limits)
    lines += ["[scenario]", f"name = {_q(name)}", f"title = {_q(f'Inferred from {stem}: ' + (summary or 'nothing limited'))}",
              f"description = {_q('What throttle infer found in the capture, as a scenario to run in the lab.')}",
              "sources = [", *(f"  {_q(f'capture {c}: read by throttle infer {__version__}')}," for c in captures), "]",
              "", "[model]", "reassemble = true  # assumed: a capture cannot show whether the censor joins segments",
              f"name_sources = [{', '.join(_q(s) for s in sources)}]", ""]
    if limits:
        for i, limit in enumerate(limits, 1):
            lines += _rule_lines(i, limit)
    else:  # the loader needs a rule; one that names nothing in the capture limits nothing
        lines += ["[[rule]]", 'name = "nothing-limited"', 'match = ["nothing-was-limited.invalid"]', 'action = "drop"', ""]
    for i, inf in enumerate(transfers(named), 1):
        t = inf.trace
        lim = next((lim for lim in limits if t.server_name in lim.names and lim.direction in ("both", t.direction)
                    and lim.transport == _rule_transport(inf)), None)
        lines += _probe_lines(i, inf, limited_names, lim)
    if not any(i.trace.server_name not in limited_names for i in named):
        lines += ["[[probe]]  # the capture had no unlimited flow; the runner needs a control for its baseline",
                  'name = "control"', 'host = "example.org"', 'direction = "upload"', f'size = "{CONTROL_SIZE}"',
                  'expect = "normal"', "control = true", ""]
    return "\n".join(lines)


def write_scenario(path: Path, inferences: Sequence[Inference], captures: Sequence[str | Path],
                   name: str | None = None) -> Scenario:
    """The scenario written to `path` and loaded back: what `throttle run` will read."""
    text = scenario_text(inferences, captures, name)
    try:
        scenario = parse_scenario(text, str(path))
    except ScenarioError as exc:  # a bug here, not the user's: say so with what was refused
        raise ThrottleError(f"the scenario inferred from {', '.join(map(str, captures))} does not load ({exc}); "
                            "please report it with the capture") from None
    atomic_write(path, text.encode())
    return scenario
