"""Scenario files: the bundled ones load, and every broken file gets file, key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT
from throttle.errors import ScenarioError
from throttle.scenario import load_scenario, parse_scenario

BUNDLED = sorted((ROOT / "scenarios").glob("*.toml"))

GOOD_RULE = '[[rule]]\nmatch = ["*.twimg.com"]\nrate = "130kbit"\n'


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_bundled_scenarios_load_and_cite_sources(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.name == path.stem
    assert scenario.rules
    assert scenario.sources, "every scenario cites the docs/incidents.md points it models"
    assert all("docs/incidents.md" in s for s in scenario.sources)


def test_twitter_day_one_values() -> None:
    s = load_scenario(ROOT / "scenarios/twitter-2021-03-10.toml")
    rule = s.rules[0]
    assert rule.rate == 16250.0 and rule.burst == 16384 and rule.action == "police"
    assert not s.model.reassemble and s.model.window_packets == 1 and s.model.give_up_bytes == 101
    assert s.model.idle_timeout == 600 and not s.model.fin_rst_ends_flow


@pytest.mark.parametrize(
    "text,message",
    [
        (GOOD_RULE + '[[rule]]\nmatch = ["x"]\nrate = "13O kbit"\n',
         'x.toml: rule[2].rate: "13O kbit" is not a rate; write e.g. 130kbit'),
        ('[[rule]]\nmatch = ["x"]\n', 'x.toml: rule[1].rate: is missing; write e.g. rate = "130kbit"'),
        ("", "x.toml: rule: no [[rule]] tables"),
        ("[[rule]\n", "x.toml: is not valid TOML"),
        (GOOD_RULE + 'direction = "sideways"\n', 'x.toml: rule[1].direction: "sideways" is not one of upload, download, both'),
        (GOOD_RULE + 'burst = "lots"\n', 'x.toml: rule[1].burst: "lots" is not a size; write e.g. 16KB'),
        (GOOD_RULE + 'match2 = 1\n', "x.toml: rule[1].match2: is not a known key"),
        ('[model]\nreassemble = "yes"\n' + GOOD_RULE, "x.toml: model.reassemble: 'yes' is not true or false"),
        ('[model]\nidle_timeout = "forever"\n' + GOOD_RULE, 'x.toml: model.idle_timeout: "forever" is not a duration'),
        ('[model]\nname_sources = ["smoke"]\n' + GOOD_RULE, 'x.toml: model.name_sources: "smoke" is not a name source'),
        ('[model]\ninside = ["10.0.0.0/33"]\n' + GOOD_RULE, "x.toml: model.inside[1]: '10.0.0.0/33' is not an address or network"),
        ('[[rule]]\nmatch = ["re:("]\nrate = "1kbit"\n', 'x.toml: rule[1].match[1]: "re:(" is not a valid regular expression'),
        ('[[rule]]\nrate = "1kbit"\n', "x.toml: rule[1]: matches nothing"),
        (GOOD_RULE + 'name = "t"\n' + GOOD_RULE + 'name = "t"\n', 'x.toml: rule[2].name: "t" is used by an earlier rule'),
        (GOOD_RULE + '[[probe]]\ndirection = "upload"\n', "x.toml: probe[1].host: is missing"),
        (GOOD_RULE + '[[probe]]\nhost = "a"\nexpect = "slow"\n', 'x.toml: probe[1].expect: "slow" is not one of throttled, normal, blocked'),
        ("rule = 3\n", "x.toml: rule: must be an array of tables"),
    ],
)
def test_errors_name_file_key_and_fix(text: str, message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "x.toml")
    assert str(info.value).startswith(message), str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="no such file"):
        load_scenario(tmp_path / "nope.toml")


def test_a_kbps_rate_is_kilobytes_as_in_tc(tmp_path: Path) -> None:
    """tc(8) reads kbps as kilobytes per second: "16kbps" is 16,000 B/s (128 kbit/s), not 16 kbit/s."""
    path = tmp_path / "kbps.toml"
    path.write_text('[[rule]]\nmatch = ["*.twimg.com"]\nrate = "16kbps"\n')
    (rule,) = load_scenario(path).rules
    assert rule.rate == 16000.0


def test_a_rate_in_bare_kilobytes_is_refused_naming_the_alternatives(tmp_path: Path) -> None:
    path = tmp_path / "kb.toml"
    path.write_text('[[rule]]\nmatch = ["*.twimg.com"]\nrate = "16KB"\n')
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    message = str(info.value)
    assert "rule[1].rate" in message and "16kbps" in message and "16kbit" in message
