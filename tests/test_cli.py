"""The command line as a user meets it: scenarios list/show/validate, errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def throttle(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "throttle", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_scenarios_list_names_every_bundled_file() -> None:
    result = throttle("scenarios", "list")
    assert result.returncode == 0
    for path in (ROOT / "scenarios").glob("*.toml"):
        assert path.stem in result.stdout
    assert "BROKEN" not in result.stdout


def test_scenarios_show_prints_sources_rules_and_probes() -> None:
    result = throttle("scenarios", "show", "twitter-2021-03-10")
    assert result.returncode == 0
    assert "docs/incidents.md §1" in result.stdout and "*t.co*" in result.stdout
    assert "police at 130.0 kbit/s" in result.stdout and "reddit.com" in result.stdout


def test_validate(tmp_path: Path) -> None:
    good = throttle("scenarios", "validate", str(ROOT / "scenarios/turkey-2022.toml"))
    assert good.returncode == 0 and "ok" in good.stdout
    broken = tmp_path / "x.toml"
    broken.write_text('[[rule]]\nmatch = ["*.twimg.com"]\nrate = "130kbit"\nscope = "planet"\n')
    bad = throttle("scenarios", "validate", str(broken))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == f'throttle: {broken}: rule[1].scope: "planet" is not one of flow, client, rule'


def test_run_with_a_broken_or_missing_scenario_fails_before_touching_anything(tmp_path: Path) -> None:
    broken = tmp_path / "y.toml"
    broken.write_text('[[rule]]\nmatch = ["a"]\nrate = "fast"\n')
    result = throttle("run", str(broken))
    assert result.returncode == 2
    assert result.stderr.strip() == f'throttle: {broken}: rule[1].rate: "fast" is not a rate; write e.g. 130kbit'
    missing = throttle("run", "no-such-scenario")
    assert missing.returncode == 2 and "no such scenario" in missing.stderr


def test_censor_needs_an_existing_namespace() -> None:
    result = throttle("censor", "--scenario", "twitter-2021-03-10", "--netns", "no-such-ns-censor")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no-such-ns-censor" in result.stderr or "root" in result.stderr


def test_systemd_unit_matches_the_command_line() -> None:
    """The service runs options that exist, and its clean-up entry point answers."""
    unit = (ROOT / "deploy/systemd/throttle-censor.service").read_text()
    start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    help_text = throttle("censor", "--help").stdout
    for option in ("--scenario", "--inside", "--outside", "--metrics-listen"):
        assert option in start and option in help_text, option
    assert "KillSignal=SIGINT" in unit and "Restart=on-failure" in unit
    assert "ExecStopPost=/opt/throttle/.venv/bin/throttle cleanup" in unit
    usage = throttle("cleanup", "--no-such-option")
    assert usage.returncode == 2 and "cleanup" in usage.stderr


def test_version_help_and_completion_script() -> None:
    version = throttle("--version")
    assert version.returncode == 0 and version.stdout.startswith("throttle 0.")
    short_help = throttle("-h")
    assert short_help.returncode == 0 and "classify" in short_help.stdout and "cleanup" in short_help.stdout
    assert throttle("run", "-h").returncode == 0
    script = throttle("--show-completion", "bash")
    assert script.returncode == 0 and "complete" in script.stdout


def test_completion_offers_scenario_names() -> None:
    import os

    env = {**os.environ, "_THROTTLE_COMPLETE": "complete_bash", "COMP_WORDS": "throttle run twitter-2021-0",
           "COMP_CWORD": "2"}
    result = subprocess.run([sys.executable, "-m", "throttle"], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=60)
    assert "twitter-2021-03-10" in result.stdout and "twitter-2021-04-02" in result.stdout
    assert "turkey-2022" not in result.stdout


def test_validate_takes_bundled_names_and_suggests_one_for_a_typo() -> None:
    good = throttle("scenarios", "validate", "turkey-2022")
    assert good.returncode == 0 and "ok (turkey-2022" in good.stdout
    typo = throttle("scenarios", "validate", "turky-2022")
    assert typo.returncode == 2 and "did you mean turkey-2022?" in typo.stderr
    assert throttle("scenarios", "show", "-s", "turkey-2022").returncode == 0


def test_one_json_convention(tmp_path: Path) -> None:
    import json

    listed = throttle("scenarios", "list", "--json")
    assert listed.returncode == 0
    assert {s["name"] for s in json.loads(listed.stdout)} >= {"twitter-2021-03-10", "turkey-2022"}
    out = tmp_path / "list.json"
    written = throttle("scenarios", "list", "-o", str(out))
    assert written.returncode == 0 and "twitter-2021-03-10" in written.stdout
    assert json.loads(out.read_text()) == json.loads(listed.stdout)


def test_two_different_scenarios_are_refused() -> None:
    result = throttle("run", "twitter-2021-03-10", "--scenario", "turkey-2022")
    assert result.returncode == 2 and "give one" in result.stderr
    none = throttle("bench")
    assert none.returncode == 2 and "which scenario?" in none.stderr


def test_cleanup_is_a_command() -> None:
    result = throttle("cleanup", "--help")
    assert result.returncode == 0 and "--lab" in result.stdout and "--netns" in result.stdout


def test_lab_exec_on_a_lab_that_is_down_says_so() -> None:
    import os

    result = throttle("lab", "exec", "--lab", "probenone", "--", "true")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    if os.geteuid() == 0:  # as root it looks at the namespaces; otherwise it says root is needed
        assert "lab probenone is down" in result.stderr and "throttle lab up --lab probenone" in result.stderr
    no_command = throttle("lab", "exec", "--lab", "probenone")
    assert no_command.returncode == 2 and "Missing argument" in no_command.stderr
