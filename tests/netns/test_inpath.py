"""The censor as an in-path device that does not route (docs/incidents.md §4.30, §1.15-16).

The lab's censor namespace is a bridge with no address, and a router stands between it and the
server. A packet from the client whose TTL runs out at the first hop therefore reaches the censor
(which sees it and counts it) and dies at the router, before the server, as on the real network:
that is what TTL-limited fake packets and the locating of the device by TTL rely on.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request

import pytest

from tests import pace
from tests.conftest import ROOT
from throttle.lab.topology import (
    BRIDGE,
    CENSOR_CLIENT_IF,
    CENSOR_SERVER_IF,
    ROUTER_CLIENT_V4,
    ROUTER_CLIENT_V6,
    SERVER_V4,
    SERVER_V6,
    Lab,
)

from .conftest import SHARED_LAB, running_censor

pytestmark = pytest.mark.netns

LAB = SHARED_LAB
METRICS_PORT = 19731
DATAGRAMS = 50
UDP_PORT = 40001


@pytest.fixture(scope="module")
def lab(shared_lab: Lab) -> Lab:
    return shared_lab


def run_in(lab: Lab, role: str, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lab.exec_argv(role, argv), capture_output=True, text=True,  # type: ignore[call-overload, no-any-return]
                          timeout=pace.seconds(60), **kw)


def packets_seen() -> float:
    """Every packet the censor has counted, by every stage (inspection, rules, kernel)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=pace.seconds(5)) as response:
        page = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(page) if family.name == "throttle_packets"
               for sample in family.samples if sample.name == "throttle_packets_total")


def test_the_censor_bridges_and_has_no_address(lab: Lab) -> None:
    addresses = run_in(lab, "censor", ["ip", "-o", "addr", "show"]).stdout
    assert [line for line in addresses.splitlines() if " lo " not in line] == [], addresses
    ports = run_in(lab, "censor", ["ip", "-o", "link", "show", "master", BRIDGE]).stdout
    assert CENSOR_CLIENT_IF in ports and CENSOR_SERVER_IF in ports, ports
    assert run_in(lab, "censor", ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "0"
    assert run_in(lab, "router", ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"


@pytest.mark.parametrize("family", ["-4", "-6"])
def test_ping_with_ttl_1_dies_at_the_router(lab: Lab, family: str) -> None:
    server = SERVER_V4 if family == "-4" else SERVER_V6
    router = ROUTER_CLIENT_V4 if family == "-4" else ROUTER_CLIENT_V6
    one = run_in(lab, "client", ["ping", family, "-n", "-c", "1", "-W", "3", "-t", "1", server])
    assert one.returncode != 0, one.stdout
    assert re.search(rf"From {re.escape(router)} .*(Time to live exceeded|Time exceeded)", one.stdout), one.stdout
    two = run_in(lab, "client", ["ping", family, "-n", "-c", "1", "-W", "3", "-t", "2", server])
    assert two.returncode == 0, two.stdout + two.stderr  # the censor is no hop: TTL 2 gets there


SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 40002))
s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
for i in range(int(sys.argv[1])):
    s.sendto(b"ttl-1 datagram %d" % i, (sys.argv[2], int(sys.argv[3])))
    time.sleep(0.01)
time.sleep(0.5)
s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 64)
s.sendto(b"ttl-64 datagram", (sys.argv[2], int(sys.argv[3])))
"""

RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
s.settimeout(float(sys.argv[3]))
try:
    while True:
        print(s.recv(100).decode(), flush=True)
except socket.timeout:
    pass
"""


def test_ttl_1_datagrams_reach_the_censor_and_not_the_server(lab: Lab) -> None:
    with running_censor("twitter-2021-03-10", LAB, "--metrics-listen", f"127.0.0.1:{METRICS_PORT}"):
        before = packets_seen()
        receiver = subprocess.Popen(lab.exec_argv("server", [sys.executable, "-c", RECEIVER, SERVER_V4,
                                                             str(UDP_PORT), "4"]), stdout=subprocess.PIPE, text=True)
        try:
            assert receiver.stdout is not None and receiver.stdout.readline().strip() == "listening"
            sent = run_in(lab, "client", [sys.executable, "-c", SENDER, str(DATAGRAMS), SERVER_V4, str(UDP_PORT)])
            assert sent.returncode == 0, sent.stderr
            received = receiver.communicate(timeout=pace.seconds(30))[0].split("\n")
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
        # The censor counts kernel-forwarded packets once a second: wait (bounded) for the count.
        deadline = time.monotonic() + 15
        seen = packets_seen() - before
        while seen < DATAGRAMS + 1 and time.monotonic() < deadline:
            time.sleep(0.5)
            seen = packets_seen() - before
    print(f"in-path: censor counted {seen:.0f} packets; server received {[r for r in received if r]}")
    assert [r for r in received if r] == ["ttl-64 datagram"]  # none of the TTL-1 ones; the path works
    assert seen >= DATAGRAMS + 1


HELLO_TTL_1 = """
import socket, sys, time
from throttle.lab.evasion.plans import client_hello
s = socket.create_connection((sys.argv[1], 443), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
s.sendall(client_hello("pbs.twimg.com"))
time.sleep(0.1)  # the hello left with TTL 1; what the kernel retransmits goes with TTL 1 too
s.close()
"""


def test_a_ttl_limited_client_hello_triggers_the_censor(lab: Lab) -> None:
    """§1.16's way of locating the device: a ClientHello whose TTL ends before the server still
    reaches the censor, which limits the flow."""
    with running_censor("twitter-2021-03-10", LAB) as proc:
        sent = run_in(lab, "client", [sys.executable, "-c", HELLO_TTL_1, SERVER_V4], cwd=ROOT,
                      env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        assert sent.returncode == 0, sent.stderr
    tail = proc.tail  # type: ignore[attr-defined]
    assert re.search(r"flows limited 1\b", tail), tail
