"""Name patterns: how a rule's `match` entries are compiled, each to the cheapest test.

Pattern syntax, as the measurement reports write the censor's lists (docs/incidents.md §1):
- `twitter.com`     exact name
- `*.twimg.com`     any name ending in `.twimg.com` (not `twimg.com` itself)
- `*twitter.com`    any name ending in `twitter.com` (also `nottwitter.com`)
- `*t.co*`          any name containing `t.co` (the 2021 bug: `reddit.com`, `microsoft.com`)
- `re:^pbs\\d*\\.`  a regular expression, searched in the normalised name
Other `*` positions are globs (`*` is any run of characters). Names reach a pattern normalised
(`throttle.wire.names.normalise`).

Every test is linear in the name, whatever the pattern, so no name on the wire can stall the
censor: globs are matched part by part with `str.find` (never as backtracking regular
expressions), and `re:` patterns run on RE2 (google-re2), whose matching is linear-time; a pattern
RE2 cannot express (backreferences, lookaround) is refused when the scenario loads.
"""

from __future__ import annotations

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
        return Pattern(text, "regex", _found_by(_re2(text)))
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
    return Pattern(text, "glob", _glob(body.split("*")))


def _re2(text: str) -> Callable[[str], object]:
    """The search function of a `re:` pattern, compiled by RE2 (linear-time matching)."""
    try:
        import re2
    except ImportError:
        raise ValueError(f'"{text}": re: patterns need the google-re2 package (pip install google-re2), '
                         "whose matching cannot be made to take exponential time") from None
    options = re2.Options()
    options.log_errors = False  # the error is ours to report, in one line
    try:
        return re2.compile(text[3:], options).search  # type: ignore[no-any-return]
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f'"{text}" is not a valid regular expression for RE2 ({reason}); RE2 has no '
                         "backreferences or lookaround, so matching stays linear in the name") from None


def _glob(parts: list[str]) -> Callable[[str], bool]:
    """`a*b*c`: the name starts with a, ends with c, and holds b between them. Each middle part is
    found leftmost (str.find), which is enough for `*`: linear in the name, no backtracking."""
    first, last, middle = parts[0], parts[-1], parts[1:-1]

    def test(name: str) -> bool:
        if len(name) < len(first) + len(last) or not name.startswith(first) or not name.endswith(last):
            return False
        pos, end = len(first), len(name) - len(last)
        for part in middle:
            found = name.find(part, pos, end)
            if found < 0:
                return False
            pos = found + len(part)
        return True

    return test


def _found_by(search: Callable[[str], object]) -> Callable[[str], bool]:
    return lambda name: search(name) is not None


def _contains(core: str) -> Callable[[str], bool]:
    return lambda name: core in name


def _endswith(core: str) -> Callable[[str], bool]:
    return lambda name: name.endswith(core)


def _startswith(core: str) -> Callable[[str], bool]:
    return lambda name: name.startswith(core)
