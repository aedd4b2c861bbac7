from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from throttle.scenario import compile_pattern
from throttle.wire.names import normalise


@pytest.mark.parametrize(
    "pattern,name,expected",
    [
        ("*t.co*", "reddit.com", True),  # the 2021 substring bug (docs/incidents.md §2)
        ("*t.co*", "www.microsoft.com", True),
        ("*t.co*", "rt.com", True),  # N65
        ("*t.co*", "example.org", False),
        ("*t.co*", "t.co", True),
        ("*t.co*", "githubusercontent.com", True),
        ("*.twimg.com", "pbs.twimg.com", True),
        ("*.twimg.com", "garbage.twimg.com", True),
        ("*.twimg.com", "twimg.com", False),
        ("*.twimg.com", "pbs.twimg.com.", False),  # a trailing dot evaded the 2021 devices
        ("*twitter.com", "nottwitter.com", True),
        ("twitter.com", "www.twitter.com", False),
        ("www.twitter.com", "www.twitter.com", True),
        ("re:^pbs\\d*\\.twimg\\.com$", "pbs2.twimg.com", True),
        ("re:^pbs\\d*\\.twimg\\.com$", "xpbs.twimg.com", False),
        ("a*b*c", "axxbyyc", True),
        ("a*b*c", "axxbyy", False),
        ("upload.*", "upload.twitter.com", True),
    ],
)
def test_patterns(pattern: str, name: str, expected: bool) -> None:
    assert compile_pattern(pattern).matches(name) is expected


def test_bad_patterns() -> None:
    for bad in ["", "   ", "re:("]:
        with pytest.raises(ValueError):
            compile_pattern(bad)


def test_normalise() -> None:
    assert normalise("PBS.TwImg.COM") == "pbs.twimg.com"
    assert normalise("pbs.twimg.com.") == "pbs.twimg.com"
    assert normalise("pbs.twimg.com.", strip_trailing_dot=False) == "pbs.twimg.com."
    assert normalise("bücher.example") == "xn--bcher-kva.example"


@given(st.text(max_size=80))
def test_normalise_never_raises(text: str) -> None:
    assert isinstance(normalise(text), str)
