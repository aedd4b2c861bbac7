"""Every packet counted once, live: what the censor's `throttle_packets_total` adds up to for a
flow, over every path (queued and judged by the engine, the conntrack-mark rule, the eBPF fast
path), against what the server's own kernel counted arriving (an iptables rule in the server's
namespace, removed afterwards).

A line-rate burst of 100 UDP datagrams on a new flow is the hard case: its first datagram is
decided at once, the next ones are still queued (the engine judges them after the decision), then
the conntrack mark forwards them, then the eBPF entry, all within a millisecond or so.

A TCP upload is the other: the first flight (ten segments, the initial window) is queued before
the engine decides the flow at its first segment; the nine behind it come back from the queue
(REPEAT with the mark) after the conntrack entry was marked, and must not be counted again by the
conntrack-mark rules (they were, 2,909 for 2,900 segments, before the firewall's mark rules came
first). The upload is paced (SO_MAX_PACING_RATE, TCP's own pacing) so that nothing is lost after
the censor counted it: the test compares with what the server's kernel counted arriving.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests import pace
from tests.conftest import ROOT, lab_name
from throttle.lab.topology import SERVER_V4, Lab

from .conftest import lab_session, running_censor

pytestmark = pytest.mark.netns

METRICS_PORT = 19473
UDP_PORT, TCP_PORT = 9401, 9402
BURST = 100

SINK = """
import socket, sys
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
udp.bind((sys.argv[1], int(sys.argv[2])))
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((sys.argv[1], int(sys.argv[3])))
tcp.listen(8)
print("ready", flush=True)
import threading
threading.Thread(target=lambda: [udp.recv(65536) for _ in iter(int, 1)], daemon=True).start()
while True:
    conn, _ = tcp.accept()
    while conn.recv(1 << 16):
        pass
    conn.close()
"""

BURST_SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
data = b"x" * 1000
for _ in range(int(sys.argv[3])):
    s.sendto(data, (sys.argv[1], int(sys.argv[2])))
"""

TCP_SENDER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, 47, 25_000_000)  # SO_MAX_PACING_RATE, bytes/s: 200 Mbit/s
s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(b"\\x17" * int(sys.argv[3]))
s.shutdown(socket.SHUT_WR)
while s.recv(4096):
    pass
"""


@pytest.fixture(scope="module")
def counting_lab() -> Iterator[Lab]:
    """A lab of this module's own: exact counts need a quiet network. In the shared lab, after
    other modules, a full run counted one upload packet more than the server received in each
    test here (both passed alone): an earlier module's traffic still under way."""
    yield from lab_session(lab_name("counting"))


@pytest.fixture(scope="module")
def lab(counting_lab: Lab) -> Iterator[Lab]:
    """The lab with a sink on the server and the server's own count of what arrives there."""
    shared_lab = counting_lab
    rules = [["-p", "udp", "--dport", str(UDP_PORT)], ["-p", "tcp", "--dport", str(TCP_PORT)]]
    for rule in rules:
        subprocess.run(shared_lab.exec_argv("server", ["iptables", "-w", "-I", "INPUT", *rule]), check=True)
    sink = subprocess.Popen(shared_lab.exec_argv("server", [sys.executable, "-c", SINK, SERVER_V4, str(UDP_PORT),
                                                            str(TCP_PORT)]), stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        yield shared_lab
    finally:
        sink.kill()
        sink.wait()
        for rule in rules:
            subprocess.run(shared_lab.exec_argv("server", ["iptables", "-w", "-D", "INPUT", *rule]), check=False)


def arrived(lab: Lab, proto: str = "udp") -> int:
    """Packets of `proto` the server's kernel counted arriving on the sink's port."""
    out = subprocess.run(lab.exec_argv("server", ["iptables", "-w", "-S", "INPUT", "-v"]), capture_output=True,
                         text=True, check=True).stdout
    port = UDP_PORT if proto == "udp" else TCP_PORT
    m = re.search(rf"-p {proto} -m {proto} --dport {port} -c (\d+) \d+", out)
    assert m, out
    return int(m.group(1))


def counted(direction: str) -> tuple[int, dict[str, int]]:
    """The censor's throttle_packets_total for `direction`, over every stage, and by stage."""
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=pace.seconds(5)) as response:
        page = response.read().decode()
    stages: dict[str, int] = {}
    for m in re.finditer(r'^throttle_packets_total\{([^}]*)\} (\S+)$', page, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels["direction"] == direction:
            stages[labels["stage"]] = stages.get(labels["stage"], 0) + int(float(m.group(2)))
    return sum(stages.values()), stages


def settled(direction: str, at_least: int) -> tuple[int, dict[str, int]]:
    """The count once it reached `at_least`, and two more of the censor's ticks (each reads the
    engine's flows, the firewall's counters and the eBPF map once a second) added nothing."""
    deadline = time.monotonic() + 30
    total, stages = counted(direction)
    while total < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
        total, stages = counted(direction)
    time.sleep(2.5)
    return counted(direction)


def test_a_line_rate_udp_burst_on_a_new_flow_is_counted_packet_for_packet(lab: Lab) -> None:
    scenario = str(ROOT / "scenarios/twitter-2021-03-10.toml")
    paths: dict[str, int] = {}
    with running_censor(scenario, lab.name, "--metrics-listen", f"127.0.0.1:{METRICS_PORT}"):
        before, _ = settled("upload", 0)
        for attempt in range(20):
            server_before = arrived(lab)
            subprocess.run(lab.exec_argv("client", [sys.executable, "-c", BURST_SENDER, SERVER_V4, str(UDP_PORT),
                                                    str(BURST)]), check=True)
            after, stages = settled("upload", before + BURST)
            server = arrived(lab) - server_before
            assert (after - before, server) == (BURST, BURST), (attempt, stages)
            before = after
        paths = stages
    print(f"20 bursts of {BURST} datagrams, each counted {BURST} times; upload packets by stage at the end: {paths}")
    # The burst outran the decision: some datagrams took a path after the queue.
    assert paths.get("handover", 0) + paths.get("connmark", 0) + paths.get("kernel", 0) > 0, paths



def test_a_tcp_upload_is_counted_packet_for_packet(lab: Lab) -> None:
    """Unlimited TCP uploads (no name: they pass once the first data segment is read), every
    upload packet from the SYN to the last ACK, against the server's count."""
    scenario = str(ROOT / "scenarios/twitter-2021-03-10.toml")
    attempts, handover = 5, 0
    with running_censor(scenario, lab.name, "--metrics-listen", f"127.0.0.1:{METRICS_PORT}"):
        before, stages = settled("upload", 0)
        for attempt in range(attempts):
            server_before, handover_before = arrived(lab, "tcp"), stages.get("handover", 0)
            subprocess.run(lab.exec_argv("client", [sys.executable, "-c", TCP_SENDER, SERVER_V4, str(TCP_PORT),
                                                    str(4 << 20)]), check=True, timeout=pace.seconds(60))
            time.sleep(0.5)  # the last ACK of the close
            server = arrived(lab, "tcp") - server_before
            after, stages = settled("upload", before + server)
            assert after - before == server, (attempt, server, stages)
            handover += stages.get("handover", 0) - handover_before
            before = after
    print(f"{attempts} uploads of 4 MB, each counted as the server received it; upload packets by stage at the "
          f"end: {stages}")
    # Packets were queued behind the deciding one (the case that was counted twice).
    assert handover > attempts, stages
