"""The eBPF fast path in a real censor namespace: speed, correctness, removal and cleanup.

The fast path runs where the censor would, inside `fptest-censor`: this module doubles as the
helper process (`python -m tests.netns.test_fastpath` under `ip netns exec`), which holds a
FastPath on both censor interfaces and obeys JSON lines on stdin until told to close (or until
stdin closes). Every test fails, never skips, when root or a tool is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import pace
from tests.conftest import ROOT as REPO
from tests.conftest import lab_name
from tests.netns.conftest import SBIN_PATH, require_lab_prerequisites
from throttle.errors import ThrottleError
from throttle.lab.topology import CENSOR_CLIENT_IF, CENSOR_SERVER_IF, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, Lab
from throttle.measure.bypass import bridge_without_netfilter

pytestmark = pytest.mark.netns

LAB_NAME = lab_name("fptest")  # our own: other labs on this machine are never touched
IPERF_PORT = 5201
CONNMARK_RULE = ["-m", "connmark", "--mark", "0x40000000/0x7f800000", "-j", "RETURN"]  # as the censor's
TARGET_RATIO = 0.90
REPLY_TIMEOUT = 20.0


# -- the helper process (runs inside the censor namespace) ---------------------------------------


def _reply(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve() -> int:
    from throttle.kernel.fastpath import FastPath, Limit

    try:  # making it is the test of whether the fast path works here
        fp = FastPath([CENSOR_CLIENT_IF, CENSOR_SERVER_IF])
    except ThrottleError as exc:
        _reply({"error": str(exc)})
        return 1
    _reply({"result": "ready"})
    try:
        for line in sys.stdin:
            request = json.loads(line)
            op, args = request["op"], request.get("args", [])
            try:
                if op == "add_flow":
                    result: Any = fp.add_flow(*args, CENSOR_CLIENT_IF, CENSOR_SERVER_IF)
                elif op == "add_policed":  # proto, client, cport, server, sport, rate, burst: upload policed
                    proto, client, cport, server, sport, rate, burst = args
                    fp.set_bucket(1, rate, burst, burst, time.monotonic())
                    result = fp.add_flow(proto, client, cport, server, sport, CENSOR_CLIENT_IF, CENSOR_SERVER_IF,
                                         upload=Limit(1))
                elif op == "counters":
                    result = [[c.bytes, c.packets, c.dropped_bytes, c.dropped_packets] for c in fp.counters().values()]
                elif op == "remove_flow":
                    result = fp.remove_flow(*args)
                elif op == "hits":
                    result = fp.hits
                elif op == "len":
                    result = len(fp)
                elif op == "close":
                    fp.close()
                    fp.close()  # idempotent
                    _reply({"result": None})
                    return 0
                else:
                    result = {"error": f"unknown op {op}"}
            except ThrottleError as exc:
                _reply({"error": str(exc)})
                continue
            _reply({"result": result})
    finally:
        fp.close()  # stdin closed: the test that drove us is gone
    return 0


class Helper:
    """A FastPath in the lab's censor namespace, in a process of its own."""

    def __init__(self, lab: Lab) -> None:
        argv = lab.exec_argv("censor", [sys.executable, "-m", "tests.netns.test_fastpath"])
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=REPO)
        self._read()  # "ready", or the error that kept it from starting

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            pytest.fail(f"the fast-path helper died or hung: {err.strip()[-2000:]}")
        reply = json.loads(line)
        if "error" in reply:
            pytest.fail(f"the fast-path helper: {reply['error']}")
        return reply["result"]

    def call(self, op: str, *args: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "args": list(args)}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    @property
    def hits(self) -> int:
        return int(self.call("hits"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.call("close")
            assert self.proc.wait(timeout=pace.seconds(10)) == 0

    def stop(self) -> None:
        """End the helper whatever its state: EOF on stdin makes it close the fast path; a
        helper that does not exit then is killed."""
        if self.proc.poll() is None:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
                self.proc.wait(timeout=pace.seconds(10))
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self.proc.wait(timeout=pace.seconds(10))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=pace.seconds(10))


# -- fixtures and tools --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fplab() -> Iterator[Lab]:
    """The `fptest` lab with an iperf3 server, up for the module; down afterwards whatever happened."""
    require_lab_prerequisites()
    for tool, package in (("iperf3", "iperf3"), ("iptables", "iptables"), ("ip6tables", "iptables"), ("ss", "iproute2")):
        if not (shutil.which(tool) or shutil.which(tool, path=SBIN_PATH)):
            pytest.fail(f"{tool} is missing: apt-get install {package}")
    lab = Lab(LAB_NAME)
    lab.down()  # the remains of an interrupted earlier run
    iperf: subprocess.Popen[bytes] | None = None
    try:
        lab.up(["pbs.twimg.com"])
        iperf = subprocess.Popen(lab.exec_argv("server", ["iperf3", "-s", "-B", SERVER_V4]),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Traffic through the censor, so it knows both neighbours in both families.
        for family, server in (("-4", SERVER_V4), ("-6", f"[{SERVER_V6}]")):
            run(lab, "client", ["curl", "-sS", "--fail", "--max-time", "10", family, "-o", "/dev/null", f"http://{server}/info"])
        _wait_for_iperf(lab)
        yield lab
    finally:
        if iperf is not None:
            iperf.terminate()
            try:
                iperf.wait(timeout=pace.seconds(5))
            except subprocess.TimeoutExpired:
                iperf.kill()
                iperf.wait()
        lab.down()


@pytest.fixture
def helper(fplab: Lab) -> Iterator[Helper]:
    h = Helper(fplab)
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture
def rules(fplab: Lab) -> Iterator[None]:
    """Whatever a test adds to the censor's mangle table is gone after it."""
    yield
    for tool in ("iptables", "ip6tables"):
        run(fplab, "censor", [tool, "-w", "-t", "mangle", "-F", "FORWARD"])


def run(lab: Lab, role: str, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(lab.exec_argv(role, argv), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(argv)} in {role}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}"
    return proc


def _wait_for_iperf(lab: Lab) -> None:
    deadline = time.monotonic() + 10
    while f":{IPERF_PORT}" not in subprocess.run(lab.exec_argv("server", ["ss", "-ltn"]), capture_output=True, text=True).stdout:
        if time.monotonic() > deadline:
            pytest.fail("the iperf3 server did not start in the server namespace")
        time.sleep(0.05)


def iperf(lab: Lab, cport: int, seconds: int = 3) -> tuple[float, int]:
    """One client -> server run from a fixed client port: (bits/s received, bytes sent)."""
    proc = subprocess.run(
        lab.exec_argv("client", ["iperf3", "-c", SERVER_V4, "-t", str(seconds), "-O", "1", "-J", "--cport", str(cport)]),
        capture_output=True, text=True, timeout=seconds + 30,
    )
    try:
        end = json.loads(proc.stdout)["end"]
        return float(end["sum_received"]["bits_per_second"]), int(end["sum_sent"]["bytes"])
    except (ValueError, KeyError):
        pytest.fail(f"iperf3 --cport {cport} failed: {proc.stderr.strip() or proc.stdout[-500:]}")


def iptables(lab: Lab, v6: bool, *args: str) -> None:
    run(lab, "censor", ["ip6tables" if v6 else "iptables", "-w", "-t", "mangle", *args])


def counter(lab: Lab, v6: bool, comment: str) -> int:
    """Packets counted by the FORWARD rule carrying `comment`."""
    out = run(lab, "censor", ["ip6tables" if v6 else "iptables", "-w", "-t", "mangle", "-L", "FORWARD", "-v", "-n", "-x"]).stdout
    for line in out.splitlines():
        if f"/* {comment} */" in line:
            return int(line.split()[0])
    pytest.fail(f"no rule {comment} in the censor's FORWARD chain:\n{out}")


def rx_packets(lab: Lab) -> int:
    """Packets received by both censor interfaces so far."""
    from pyroute2 import IPRoute

    with IPRoute(netns=lab.ns("censor"), flags=0) as ipr:
        return sum(link.get("stats64")["rx_packets"] for link in ipr.get_links() if link.get("ifname") != "lo")


def curl_upload(lab: Lab, family: str, port: int, body: Path) -> int:
    proc = run(lab, "client", ["curl", "-sS", "--fail", "--max-time", "20", family, "--local-port", str(port),
                               "-T", str(body), "https://pbs.twimg.com/upload"])
    return int(json.loads(proc.stdout)["received"])


def tc_state(lab: Lab) -> dict[str, dict[str, Any]]:
    """Per censor interface: its qdisc kinds and its ingress/egress filter kinds, through pyroute2."""
    from pyroute2 import IPRoute

    out = {}
    with IPRoute(netns=lab.ns("censor"), flags=0) as ipr:
        for name in (CENSOR_CLIENT_IF, CENSOR_SERVER_IF):
            index = ipr.link_lookup(ifname=name)[0]
            qdiscs = [q.get("kind") for q in ipr.get_qdiscs(index)]
            filters = []
            if "clsact" in qdiscs:
                for parent in (0xFFFFFFF2, 0xFFFFFFF3):
                    filters += [f.get("kind") for f in ipr.get_filters(index=index, parent=parent)]
            out[name] = {"qdiscs": qdiscs, "filters": filters}
    return out


# -- tests ---------------------------------------------------------------------------------------


def test_decided_flow_runs_at_no_censor_speed(fplab: Lab, rules: None) -> None:
    """iperf3 through the censor: the bridge with no netfilter on it (the fastest it goes, as
    scripts/bench-bypass's reference), vs conntrack + the connmark rule with the flow on the fast
    path (best of 3 each, interleaved), and the rules alone for comparison."""
    bare, fast, slow = [], [], []
    hit_ratio = []
    for _ in range(3):
        with bridge_without_netfilter(fplab):
            bare.append(iperf(fplab, 52010)[0])
        for v6 in (False, True):
            iptables(fplab, v6, "-A", "FORWARD", *CONNMARK_RULE)
        h = Helper(fplab)
        try:
            assert h.call("add_flow", 6, CLIENT_V4, 52011, SERVER_V4, IPERF_PORT) is True
            hits0, rx0 = h.hits, rx_packets(fplab)
            bps, sent = iperf(fplab, 52011)
            hits, rx = h.hits - hits0, rx_packets(fplab) - rx0
            h.close()
        finally:
            h.stop()
        fast.append(bps)
        # The data segments alone are sent/1448; acks come on top. Only the control connection
        # (a few dozen packets) goes the slow way.
        assert hits >= 0.95 * sent / 1448, f"{hits} hits for {sent} bytes"
        hit_ratio.append(hits / rx)
        for v6 in (False, True):
            iptables(fplab, v6, "-F", "FORWARD")
    for v6 in (False, True):
        iptables(fplab, v6, "-A", "FORWARD", *CONNMARK_RULE)
    for _ in range(2):
        slow.append(iperf(fplab, 52012)[0])
    base, best, rules_only = max(bare), max(fast), max(slow)
    print(f"\niperf3 client -> server (best of {len(bare)}/{len(fast)}/{len(slow)}, 3 s each):")
    print(f"  no netfilter, no fast path  {base / 1e6:8.0f} Mbit/s  (runs: {', '.join(f'{b / 1e6:.0f}' for b in bare)})")
    print(f"  conntrack+connmark rule     {rules_only / 1e6:8.0f} Mbit/s  ratio {rules_only / base:.3f}")
    print(f"  rules + fast path           {best / 1e6:8.0f} Mbit/s  ratio {best / base:.3f}  (runs: {', '.join(f'{b / 1e6:.0f}' for b in fast)})")
    print(f"  packets on the fast path: {min(hit_ratio):.4f} of those the censor received, at worst")
    # Behaviour: every packet of the flow took the fast path. The throughput ratio is a benchmark
    # figure (scripts/bench-bypass), printed here, not asserted: it depends on the machine's load.
    print(f"  target ratio {TARGET_RATIO} (a benchmark figure): {'met' if best >= TARGET_RATIO * base else 'not met'}")
    assert min(hit_ratio) > 0.99


@pytest.mark.parametrize("family, client, server, port", [
    ("-4", CLIENT_V4, SERVER_V4, 41011),
    ("-6", CLIENT_V6, SERVER_V6, 41016),
])
def test_uploads_are_whole_and_skip_netfilter(fplab: Lab, helper: Helper, rules: None, tmp_path: Path,
                                              family: str, client: str, server: str, port: int) -> None:
    v6 = family == "-6"
    size = 3_000_000
    body = tmp_path / "upload.bin"
    body.write_bytes(os.urandom(size))
    comment = f"fptest-{port}"
    for match in (["--sport", str(port)], ["--dport", str(port)]):
        iptables(fplab, v6, "-A", "FORWARD", "-p", "tcp", *match, "-m", "comment", "--comment", comment)
    assert helper.call("add_flow", 6, client, port, server, 443) is True
    before = helper.hits
    assert curl_upload(fplab, family, port, body) == size
    hits = helper.hits - before
    assert hits >= size / 1448, f"only {hits} packets took the fast path"
    # Only the SYN takes the normal path (a new connection is always inspected afresh).
    assert counter(fplab, v6, comment) == 1, "netfilter saw more of a fast-path flow than its SYN"
    # The lab's censor is a bridge: frames went out as they came. The routed rewrite (next-hop
    # MACs, TTL decremented, IPv4 checksum fixed) carries test_gateway's flows, on the router.


UDP_SENDER = """
import json, socket, sys, time
n, size, gap, port = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", port))
times, start = [], time.monotonic()
for i in range(n):
    while time.monotonic() < start + i * gap:
        pass
    s.sendto(b"x" * size, (sys.argv[5], 9999))
    times.append(time.monotonic())
print(json.dumps(times))
"""
UDP_RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 9999))
s.settimeout(float(sys.argv[2]))
n = 0
try:
    while True:
        s.recv(65536)
        n += 1
except socket.timeout:
    print(n)
"""


def test_kernel_and_python_policers_pass_the_same_packets(fplab: Lab, helper: Helper) -> None:
    """The same traffic through the kernel's bucket and the engine's Policer: 300 UDP datagrams of
    1,000 bytes (1,028 on the wire) at 100 a second, against 130 kbit/s with a 16 KB burst. Both
    let the burst through at once and then the rate; the counts agree to a packet or two (the
    kernel sees each datagram microseconds after it was sent)."""
    from throttle.engine.buckets import Policer

    rate, burst, n, size, gap, cport = 16250, 16384, 300, 1000, 0.01, 52099
    assert helper.call("add_policed", 17, CLIENT_V4, cport, SERVER_V4, 9999, rate, burst) is True
    receiver = subprocess.Popen(fplab.exec_argv("server", [sys.executable, "-c", UDP_RECEIVER, SERVER_V4, "2"]),
                                stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    sent = run(fplab, "client", [sys.executable, "-c", UDP_SENDER, str(n), str(size), str(gap), str(cport),
                                 SERVER_V4], timeout=pace.seconds(60))
    received = int(receiver.communicate(timeout=pace.seconds(30))[0])
    times = json.loads(sent.stdout)
    policer = Policer(rate, burst, times[0])
    python_passed = sum(policer.allow(size + 28, t) for t in times)
    (kernel,) = [c for c in helper.call("counters") if c[1] or c[3]]
    print(f"\nkernel passed {kernel[1]} and dropped {kernel[3]} of {n}; the engine's Policer passes {python_passed}; "
          f"the server received {received}")
    assert kernel[1] + kernel[3] == n and received == kernel[1]
    assert abs(kernel[1] - python_passed) <= 2
    assert python_passed < n / 2  # the limit bites: this is not a test of an idle bucket


def test_remove_sends_packets_through_netfilter_again(fplab: Lab, helper: Helper, rules: None) -> None:
    cport = 52013
    iptables(fplab, False, "-A", "FORWARD", "-p", "tcp", "--sport", str(cport), "-m", "comment", "--comment", "fptest-rm")
    assert helper.call("add_flow", 6, CLIENT_V4, cport, SERVER_V4, IPERF_PORT) is True
    assert helper.call("len") == 2
    client = subprocess.Popen(
        fplab.exec_argv("client", ["iperf3", "-c", SERVER_V4, "-t", "2", "-J", "--cport", str(cport)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(0.8)
        hits0 = helper.hits
        assert hits0 > 1000, f"{hits0} hits while iperf3 runs"
        assert counter(fplab, False, "fptest-rm") == 1  # the SYN only
        helper.call("remove_flow", 6, CLIENT_V4, cport, SERVER_V4, IPERF_PORT)
        assert helper.call("len") == 0
        time.sleep(0.1)  # packets already inside the program on another CPU
        hits1 = helper.hits
        time.sleep(0.5)
        hits2 = helper.hits
        slow = counter(fplab, False, "fptest-rm")
        out, err = client.communicate(timeout=pace.seconds(30))
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, f"iperf3: {err.strip() or out[-500:]}"
    assert hits2 == hits1, f"{hits2 - hits1} hits after remove()"
    assert slow > 1000, f"netfilter saw only {slow} packets after remove()"


def test_close_leaves_no_qdisc_and_no_filter(fplab: Lab) -> None:
    assert all(s == {"qdiscs": ["noqueue"], "filters": []} for s in tc_state(fplab).values()), tc_state(fplab)
    h = Helper(fplab)
    try:
        state = tc_state(fplab)
        for name, s in state.items():
            assert "clsact" in s["qdiscs"], state
            assert "bpf" in s["filters"], state
        h.close()
    finally:
        h.stop()
    assert all(s == {"qdiscs": ["noqueue"], "filters": []} for s in tc_state(fplab).values()), tc_state(fplab)


def test_a_killed_fast_path_is_replaced_then_removed(fplab: Lab) -> None:
    """kill -9 leaves the filters (fail-open: decided flows keep flowing); the next FastPath takes
    them over, and its close() removes everything."""
    h = Helper(fplab)
    h.kill()  # SIGKILL: no chance to clean up
    assert all("bpf" in s["filters"] for s in tc_state(fplab).values())
    h = Helper(fplab)
    try:
        assert all(s["filters"].count("bpf") == 2 for s in tc_state(fplab).values()), tc_state(fplab)  # head + ours
        h.close()
    finally:
        h.stop()
    assert all(s == {"qdiscs": ["noqueue"], "filters": []} for s in tc_state(fplab).values()), tc_state(fplab)


BROKEN_PROGRAM = """
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 1); __type(key, int); __type(value, int); } flows SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 1); __type(key, int); __type(value, int); } buckets SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 1); __type(key, int); __type(value, int); } hits SEC(".maps");
SEC("tc") int throttle_ingress(struct __sk_buff *skb) {
    return *(int *)(long)skb->data;  /* no bounds check: the verifier must refuse this */
}
char LICENSE[] SEC("license") = "GPL";
"""


def test_map_full_expire_and_errors(tmp_path: Path) -> None:
    """In this process's own namespace, with no interface attached: nothing but BPF objects."""
    require_lab_prerequisites()
    from throttle.kernel import libbpf
    from throttle.kernel.fastpath import FastPath

    with FastPath([], max_entries=2) as fp:
        a, b = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
        mac = bytes(6)
        assert fp.add(6, a, 1, b, 2, 1, mac, mac) and fp.add(17, a, 1, b, 2, 1, mac, mac)
        assert fp.add(6, a, 1, b, 2, 1, mac, mac)  # an update, not a new entry
        assert not fp.add(6, a, 3, b, 2, 1, mac, mac)  # full
        assert len(fp) == 2 and fp.hits == 0
        assert fp.expire(60) == 0
        assert fp.expire(60, now_ns=time.monotonic_ns() + 61 * 10**9) == 2
        fp.remove(6, a, 1, b, 2)  # gone already: no error
        with pytest.raises(ThrottleError, match="not protocol 1"):
            fp.add(1, a, 0, b, 0, 1, mac, mac)
        with pytest.raises(ThrottleError, match="one family"):
            fp.add(6, a, 1, bytes(16), 2, 1, mac, mac)
    with pytest.raises(ThrottleError, match="closed"):
        fp.add(6, a, 1, b, 2, 1, mac, mac)
    fp.close()  # idempotent
    with pytest.raises(ThrottleError, match="no interface fptest-nope"):
        FastPath(["fptest-nope"])

    async def in_a_running_loop() -> bool:  # as the censor's hook calls it: pyroute2 must cope
        with FastPath([]) as fp:
            return fp.add_flow(6, "127.0.0.1", 1, "127.0.0.2", 2, "lo", "lo")  # lo has no neighbours

    assert asyncio.run(in_a_running_loop()) is False
    # A program the verifier rejects: the error names the source line (BTF line info), so a
    # reader of the C finds the fault.
    broken = tmp_path / "broken.bpf.c"
    broken.write_text(BROKEN_PROGRAM)
    obj = libbpf.compile_object(tmp_path / "broken.bpf.o", broken)
    real = libbpf.object_path
    try:
        libbpf.object_path = lambda: obj
        with pytest.raises(ThrottleError, match=r"the kernel refused the eBPF program: .*skb->data"):
            FastPath([])
    finally:
        libbpf.object_path = real


if __name__ == "__main__":
    sys.exit(serve())
