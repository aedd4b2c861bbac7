"""The release as a new user meets it: the wheel, built from this tree and installed WITHOUT extras
into a fresh virtual environment in a temporary folder, runs its root-free commands from there.

Dependencies (typer, rich, google-re2) come from the package index: when pip cannot reach it, the test fails
with a message saying so, after pip's own short timeouts, never hanging.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

VECTORS = ROOT / "tests" / "vectors"
PIP_NET = ["--disable-pip-version-check", "--timeout", "30", "--retries", "2"]
STEP_TIMEOUT = 900  # seconds for one pip step: generous, as a slow mirror may need it


def run(argv: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    try:
        result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: no answer within {STEP_TIMEOUT} s (is the package index reachable?)")
    if result.returncode != 0 and argv[1:3] == ["-m", "pip"]:
        tail = (result.stdout + result.stderr)[-1500:]
        unreachable = any(w in tail for w in ("NewConnectionError", "Max retries", "Temporary failure in name resolution",
                                              "Network is unreachable", "No matching distribution"))
        pytest.fail(f"{what} failed{' (pip could not reach the package index)' if unreachable else ''}:\n{tail}")
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the fresh venv's bin folder, a working folder outside the repository)."""
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *PIP_NET, "-w", str(dist), str(ROOT)], tmp,
        "pip wheel --no-deps .")
    (wheel,) = dist.glob("throttle_lab-*.whl")
    venv = tmp / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, f"python -m venv failed (Debian: apt-get install python3-venv): {made.stderr}"
    run([str(venv / "bin" / "python"), "-m", "pip", "install", *PIP_NET, str(wheel)], tmp,
        "pip install of the wheel without extras")
    work = tmp / "elsewhere"
    work.mkdir()
    return venv / "bin", work


def throttle(installed: tuple[Path, Path], *args: str) -> subprocess.CompletedProcess[str]:
    bin_dir, work = installed
    return run([str(bin_dir / "throttle"), *args], work, "throttle " + " ".join(args))


def test_version(installed: tuple[Path, Path]) -> None:
    result = throttle(installed, "--version")
    assert result.returncode == 0 and result.stdout.startswith("throttle "), result.stderr


def test_scenarios_are_in_the_wheel(installed: tuple[Path, Path]) -> None:
    result = throttle(installed, "scenarios", "list")
    assert result.returncode == 0, result.stderr
    for path in (ROOT / "scenarios").glob("*.toml"):
        assert path.stem in result.stdout
    shown = throttle(installed, "scenarios", "show", "twitter-2021-03-10")
    assert shown.returncode == 0 and "docs/incidents.md §1" in shown.stdout, shown.stderr


def test_classify_two_captures(installed: tuple[Path, Path]) -> None:
    result = throttle(installed, "classify", str(VECTORS / "curl-tls12-www.microsoft.com.pcap"),
                      str(VECTORS / "curl-tls13-pbs.twimg.com.pcap"))
    assert result.returncode == 0, result.stderr
    assert "www.microsoft.com" in result.stdout and "pbs.twimg.com" in result.stdout
    assert "2 flows, 2 limited under twitter-2021-03-10" in result.stdout


def test_demo_offline(installed: tuple[Path, Path]) -> None:
    result = throttle(installed, "demo", "--offline")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("THROTTLED") == 17


def test_no_live_or_plot_packages_and_a_clear_message(installed: tuple[Path, Path]) -> None:
    bin_dir, work = installed
    shown = subprocess.run([str(bin_dir / "python"), "-m", "pip", "show", "netfilterqueue", "matplotlib"],
                           capture_output=True, text=True, cwd=work, timeout=120)
    assert "Name:" not in shown.stdout, shown.stdout
    listed = subprocess.run([str(bin_dir / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, cwd=work, timeout=120).stdout.lower()
    for package in ("netfilterqueue", "matplotlib", "pyroute2", "aioquic", "prometheus"):
        assert package not in listed, listed
    result = throttle(installed, "run", "twitter-2021-04-02")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "[live] extra" in line and "pip install 'throttle-lab[live]'" in line


def test_the_live_page_ships_in_the_wheel(installed: tuple[Path, Path]) -> None:
    """The censor's page and the lab server's upload page are package data (no CDN, no repository)."""
    bin_dir, work = installed
    code = ("from importlib import resources; folder = resources.files('throttle') / 'data' / 'page'; "
            "print(' '.join(sorted(p.name for p in folder.iterdir() if p.read_bytes())))")
    result = run([str(bin_dir / "python"), "-c", code], work, "the page's assets")
    assert result.returncode == 0 and result.stdout.split() == ["page.css", "page.html", "page.js", "photo.html"], \
        result.stdout + result.stderr
