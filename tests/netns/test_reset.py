"""RST injection (action = "rst", docs/incidents.md §2.17 from 2022-03-04, §4.30): after a
ClientHello naming Twitter, the censor puts a RST on the wire towards each end. Checked on the lab's
in-path bridge (frames out of the ports) and in gateway mode on the router (a raw socket)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from tests import pace
from tests.conftest import ROOT
from throttle.lab.topology import SERVER_V4, Lab

from .conftest import SHARED_LAB, running_censor

pytestmark = pytest.mark.netns

LAB = SHARED_LAB

# A raw client: a real ClientHello, then wait for what comes back. Prints its local port, then
# "reset" when the connection is reset, or what else happened.
CLIENT = """
import socket, sys, time
from throttle.lab.evasion.plans import client_hello
s = socket.create_connection((sys.argv[1], 443), timeout=5)
print(s.getsockname()[1], flush=True)
s.sendall(client_hello(sys.argv[2]))
try:
    data = s.recv(65536)
    print("data" if data else "closed", flush=True)
except ConnectionResetError:
    print("reset", flush=True)
except socket.timeout:
    print("timeout", flush=True)
"""


@pytest.fixture(scope="module")
def lab(shared_lab: Lab) -> Lab:
    return shared_lab


def hello(lab: Lab, host: str) -> tuple[int, str]:
    result = subprocess.run(lab.exec_argv("client", [sys.executable, "-c", CLIENT, SERVER_V4, host]),
                            capture_output=True, text=True, timeout=pace.seconds(60), cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    port, outcome = result.stdout.split()
    return int(port), outcome


def server_has(lab: Lab, client_port: int) -> bool:
    """Whether the server still holds the connection from that client port (a RST ends it)."""
    out = subprocess.run(lab.exec_argv("server", ["ss", "-Htn", "state", "established", f"( dport = :{client_port} )"]),
                         capture_output=True, text=True, timeout=pace.seconds(30)).stdout
    return bool(out.strip())


def check_resets(lab: Lab) -> None:
    port, outcome = hello(lab, "pbs.twimg.com")
    assert outcome == "reset", outcome
    assert not server_has(lab, port), "the server's end was not reset"
    port, outcome = hello(lab, "example.org")  # not a Twitter name: the server answers
    assert outcome == "data", outcome


def check_counts(tail: str) -> None:
    """Two RSTs, both sent, for each flow limited. Usually that is one flow, the Twitter hello; a
    loaded CI run once counted two flows limited and 4 RSTs (0 not sent) while the client still
    read "reset" and the server lost the connection, so the count is checked per flow."""
    rsts = re.search(r"(\d+) RSTs injected \((\d+) not sent\)", tail)
    limited = re.search(r"flows limited (\d+)", tail)
    assert rsts and limited, tail
    assert int(rsts[2]) == 0 and int(limited[1]) >= 1 and int(rsts[1]) == 2 * int(limited[1]), tail


def test_the_bridge_resets_both_ends(lab: Lab) -> None:
    with running_censor("twitter-2022-03-04", LAB) as proc:
        check_resets(lab)
    check_counts(proc.tail)  # type: ignore[attr-defined]


def test_a_gateway_resets_both_ends(lab: Lab) -> None:
    """Gateway mode on the lab's router: RSTs go out through a raw socket, routed."""
    proc = subprocess.Popen(
        lab.exec_argv("router", [sys.executable, "-m", "throttle", "censor", "--scenario", "twitter-2022-03-04",
                                 "--inside", "to-censor", "--outside", "to-server", "--metrics-listen", "off", "-q"]),
        stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "active in" in line, line
        check_resets(lab)
    finally:
        proc.send_signal(signal.SIGINT)
        tail = proc.communicate(timeout=pace.seconds(20))[1]
    check_counts(tail)
