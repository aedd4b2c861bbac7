"""HTTP/3 in the lab: the QUIC probe's client against the lab's `throttle.lab.h3`, with no censor.

One lab (`h3test`, used by no other test) serves the module and is always taken down. Behaviour
only: sizes, what the server says it received, which certificate a name gets, how a failure is
reported; never how fast (machines running the tests may be loaded).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import pace
from tests.conftest import ROOT, lab_name

from .conftest import lab_session

pytestmark = pytest.mark.netns

LAB = lab_name("h3test")  # only this lab: others on this machine belong to other tests and people
V4, V6 = "198.18.1.2", "2001:2:0:2::2"
SIZE = 3 * 1024 * 1024 + 17  # not a multiple of any chunk size


@pytest.fixture(scope="module")
def lab() -> Iterator[object]:
    try:
        import aioquic  # noqa: F401
    except ImportError:
        pytest.fail("the Python package aioquic is missing: .venv/bin/pip install -e '.[live]' (or scripts/setup)")
    yield from lab_session(LAB, ["pbs.twimg.com"])


def probe(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The QUIC client in the lab's client namespace, as the runner starts it."""
    return subprocess.run(["ip", "netns", "exec", f"{LAB}-client", sys.executable, "-m", "throttle.lab.h3probe", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def result(proc: subprocess.CompletedProcess[str]) -> tuple[int, int, int]:
    """(HTTP status, bytes uploaded as the server counted them, bytes downloaded) of a success."""
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"^RESULT (\d+) (\d+) (\d+) [\d.]+ [\d.]+$", proc.stdout, re.M)
    assert m, proc.stdout
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def server_log() -> str:
    return Path(f"/run/throttle/{LAB}/h3server.log").read_text(errors="replace")


def scenario_file(tmp_path: Path, probes: str) -> Path:
    path = tmp_path / "quic.toml"
    path.write_text(f"""
[scenario]
name = "quic-lab-test"
[[rule]]
name = "unused"
match = ["*.twimg.com"]
rate = "130kbit"
{probes}
""")
    return path


def run_probes(lab: object, path: Path) -> list[object]:
    from throttle.measure.runner import Runner
    from throttle.scenario import load_scenario

    runner = Runner(load_scenario(path), lab, path.parent)  # type: ignore[arg-type]
    return runner.run().runs  # type: ignore[return-value]


def test_the_lab_runs_the_http3_server_on_its_addresses_only(lab: object) -> None:
    st = lab.status()  # type: ignore[attr-defined]
    assert st.up and st.h3server
    out = subprocess.run(["ip", "netns", "exec", f"{LAB}-server", "ss", "-Hulnp", "sport = :443"],
                         capture_output=True, text=True, check=True).stdout
    bound = {line.split()[3].rsplit(":", 1)[0].strip("[]") for line in out.splitlines()}
    assert {V4, V6} <= bound and not bound & {"0.0.0.0", "*", "::"}, out


def test_runner_quic_probes_download_and_upload_over_ipv4_and_ipv6(lab: object, tmp_path: Path) -> None:
    probes = "".join(f"""
[[probe]]
name = "{d}-{fam}"
host = "pbs.twimg.com"
protocol = "quic"
direction = "{d}"
size = {SIZE}
address = "{addr}"
expect = "normal"
control = {str(d == "download" and fam == "v4").lower()}
timeout = "240s"
""" for d in ("download", "upload") for fam, addr in (("v4", V4), ("v6", V6)))
    before = server_log()
    runs = run_probes(lab, scenario_file(tmp_path, probes))
    for run in runs:
        name = run.probe.name  # type: ignore[attr-defined]
        assert run.completed, f"{name}: {run.error}"  # type: ignore[attr-defined]
        assert run.bytes == SIZE, name  # type: ignore[attr-defined]
        assert run.samples, f"{name}: no progress seen"  # type: ignore[attr-defined]
        assert run.samples[-1][1] <= SIZE  # type: ignore[attr-defined]
        assert run.observed in ("normal", "throttled"), name  # type: ignore[attr-defined]
    # The uploads were counted by the server itself, over both families.
    new = server_log()[len(before):]
    assert new.count(f"h3 POST /upload: received {SIZE} ") == 2, new
    assert "2001:2:0:1::2 h3 POST" in new and "198.18.0.2 h3 POST" in new


def test_sni_none_and_another_name_get_matching_certificates(lab: object) -> None:
    before = server_log()
    # No SNI: the certificate must name the address (the client checks it against the address).
    nosni = probe("pbs.twimg.com", "--address", V4, "--download", "1000", "--no-sni")
    assert result(nosni) == (200, 0, 1000)
    nosni6 = probe("pbs.twimg.com", "--address", V6, "--upload", "5000", "--no-sni")
    assert result(nosni6) == (200, 5000, result(nosni6)[2])
    # Another name than the host, issued on demand at the handshake.
    other = probe("pbs.twimg.com", "--address", "198.18.1.3", "--download", "100k", "--sni", "other.example")
    assert result(other)[::2] == (200, 102400)
    new = server_log()[len(before):]
    assert "198.18.0.2 h3 GET /bytes/1000 (sni None, authority 198.18.1.2)" in new
    assert "(sni None, authority [2001:2:0:2::2])" in new
    assert "h3 GET /bytes/102400 (sni other.example, authority other.example)" in new


def test_an_untrusted_certificate_fails_the_handshake_with_a_message(lab: object, tmp_path: Path) -> None:
    import shutil

    system = Path("/etc/ssl/certs/ca-certificates.crt")
    bundle = tmp_path / "system-only.pem"
    shutil.copy(system, bundle)  # the host's bundle: no lab CA in it
    bad = probe("pbs.twimg.com", "--address", V4, "--download", "10", "--cafile", str(bundle))
    assert bad.returncode == 35 and "h3probe: the QUIC handshake failed" in bad.stderr, bad.stderr
    assert "RESULT" not in bad.stdout


def test_a_killed_server_fails_the_probe_with_a_message_not_a_hang(lab: object, tmp_path: Path) -> None:
    from throttle.measure.runner import Runner
    from throttle.scenario import load_scenario

    path = scenario_file(tmp_path, """
[[probe]]
name = "big"
host = "pbs.twimg.com"
protocol = "quic"
direction = "download"
size = "20GB"
timeout = "200s"
control = true
""")
    runner = Runner(load_scenario(path), lab, tmp_path)  # type: ignore[arg-type]
    report: list[object] = []
    worker = threading.Thread(target=lambda: report.append(runner.run()), daemon=True)
    worker.start()
    run = runner.runs[0]
    deadline = time.monotonic() + 60
    while run.bytes < 1_000_000:  # well under way
        assert worker.is_alive() and time.monotonic() < deadline, f"the download did not start: {run.error}"
        time.sleep(0.05)
    pid = lab.status().h3server  # type: ignore[attr-defined]
    os.kill(pid, signal.SIGKILL)
    worker.join(timeout=pace.seconds(260))  # the probe's own timeout and the runner's watchdog are far shorter
    assert not worker.is_alive(), "the probe hung after its server was killed"
    # A dead server is the lab's failure, not the censor's: judged "error" (the run fails), never "blocked".
    assert not run.completed and run.observed == "error" and run.cause == "lab", (run.observed, run.cause)
    assert "nothing answers on UDP 198.18.1.2 port 443" in run.error, run.error
    lab.up()  # type: ignore[attr-defined]  # the lab repairs itself: a new HTTP/3 server
    assert lab.status().h3server not in (None, pid)  # type: ignore[attr-defined]
    assert result(probe("pbs.twimg.com", "--address", V4, "--download", "1000"))[2] == 1000


def test_lab_down_leaves_no_http3_server(lab: object) -> None:
    from throttle.lab.topology import Lab

    pid = lab.status().h3server  # type: ignore[attr-defined]
    assert pid
    Lab(LAB).down()
    assert not Path(f"/proc/{pid}").exists()
    left = [pid for pid, argv in processes() if "throttle.lab.h3" in argv and f"/run/throttle/{LAB}" in " ".join(argv)]
    assert not left, left


def processes() -> Iterator[tuple[int, list[str]]]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue  # gone meanwhile
            yield int(entry), [a.decode(errors="replace") for a in raw.split(b"\0") if a]
