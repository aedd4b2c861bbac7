"""Name patterns: how a rule's `match` entries are compiled, each to the cheapest test.

Pattern syntax, as the measurement reports write the censor's lists (docs/incidents.md §1):
- `twitter.com`     exact name
- `*.twimg.com`     any name ending in `.twimg.com` (not `twimg.com` itself)
- `*twitter.com`    any name ending in `twitter.com` (also `nottwitter.com`)
- `*t.co*`          any name containing `t.co` (the 2021 bug: `reddit.com`, `microsoft.com`)
- `re:^pbs\\d*\\.`  a regular expression, searched in the normalised name
Other `*` positions are globs (`*` is any run of characters). Names reach a pattern normalised
(`throttle.wire.names.normalise`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from throttle.wire.names import normalise

PatternKind = Literal["exact", "suffix", "substring", "prefix", "glob", "regex"]


@dataclass(frozen=True, slots=True)
class Pattern:
    """One name pattern of a rule, compiled to the cheapest test that expresses it."""

    text: str
    kind: PatternKind
    test: Callable[[str], bool]

    def matches(self, name: str) -> bool:
        return self.test(name)


def compile_pattern(text: str) -> Pattern:
    """Compile a pattern; raises ValueError with a hint when it cannot be used."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{text!r} is not a name pattern; write e.g. *.twimg.com")
    text = text.strip()
    if text.startswith("re:"):
        try:
            rx = re.compile(text[3:])
        except re.error as exc:
            raise ValueError(f'"{text}" is not a valid regular expression ({exc})') from None
        return Pattern(text, "regex", _found_by(rx.search))
    body = text.lower()
    stars = body.count("*")
    if stars == 0:
        return Pattern(text, "exact", normalise(body).__eq__)
    core = body.strip("*")
    if "*" not in core:
        if body.startswith("*") and body.endswith("*") and stars == 2:
            return Pattern(text, "substring", _contains(core))
        if body.startswith("*") and stars == 1:
            return Pattern(text, "suffix", _endswith(core))
        if body.endswith("*") and stars == 1:
            return Pattern(text, "prefix", _startswith(core))
    glob = re.compile(".*".join(re.escape(part) for part in body.split("*")))
    return Pattern(text, "glob", _found_by(glob.fullmatch))


def _found_by(search: Callable[[str], re.Match[str] | None]) -> Callable[[str], bool]:
    return lambda name: search(name) is not None


def _contains(core: str) -> Callable[[str], bool]:
    return lambda name: core in name


def _endswith(core: str) -> Callable[[str], bool]:
    return lambda name: name.endswith(core)


def _startswith(core: str) -> Callable[[str], bool]:
    return lambda name: name.startswith(core)
