"""Soak and fault tests in real namespaces: many shaped flows for minutes, the censor killed, the
lab server killed during a run, and the kernel map's walks at 65,536 entries.

Labs of our own: `soak` (module fixture) and `fault` (made and removed by the tests that need it).
Load comes from scripts/bench_scale.py's generator (client namespace) and sink (server namespace):
real TCP connections that send a real ClientHello, then upload as fast as TCP lets them.

`THROTTLE_SOAK_SECONDS` (default 180, at least 150) sets the length of the shaped soak; the
per-flow rates are judged over all of it but the first 30 s (warm-up) and the last 5. Every test fails, never
skips, when root or a tool is missing; when the machine cannot generate the load the soak fails
saying so, rather than passing or blaming the shaper.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import pace
from tests.conftest import ROOT as REPO
from tests.conftest import lab_name
from tests.netns.conftest import SBIN_PATH, lab_session
from throttle.kernel.handover import LEASE
from throttle.lab.topology import CENSOR_CLIENT_IF, CENSOR_SERVER_IF, SERVER_V4, Lab

pytestmark = pytest.mark.netns


FAULT = lab_name("fault")
BENCH = REPO / "scripts" / "bench_scale.py"
SOAK_SECONDS = float(os.environ.get("THROTTLE_SOAK_SECONDS", "180"))
SOAK_FLOWS = int(pace.load(300, 20))  # 300, fewer only on a machine too slow to generate them
SOAK_METRICS = 18231  # our own ports, on the host's loopback
FAULT_METRICS = 18232
SINK_PORT = 9150
RATE = 16250.0  # 130kbit in bytes/s, the rules' rate below
# Payload per byte the limit counts: 1448 bytes of a 1500-byte packet; HTB also counts the 14-byte
# Ethernet header, so a shaped flow's goodput is 1448/1514 of the rate (within 1% of each other).
GOODPUT = 1448 / 1514

SHAPED = """
[scenario]
name = "soak-shaped"
title = "soak: every Twitter name shaped to 130 kbit/s per flow"
[model]
window_packets = 1
window_extension = 16
name_sources = ["tls"]
idle_timeout = "600s"
max_flows = 4096
[[rule]]
name = "shaped"
match = ["*.twimg.com"]
action = "shape"
rate = "130kbit"
burst = "16KB"
direction = "both"
scope = "flow"
"""

MIXED = """
[scenario]
name = "fault-mixed"
title = "fault: one name policed, one shaped"
[model]
window_packets = 1
window_extension = 16
name_sources = ["tls"]
[[rule]]
name = "policed"
match = ["pbs.twimg.com"]
action = "police"
rate = "130kbit"
burst = "16KB"
direction = "both"
[[rule]]
name = "shaped"
match = ["abs.twimg.com"]
action = "shape"
rate = "130kbit"
burst = "16KB"
direction = "both"
"""


# -- tools -----------------------------------------------------------------------------------------


def _tool(name: str, package: str) -> None:
    if not (shutil.which(name) or shutil.which(name, path=SBIN_PATH)):
        pytest.fail(f"{name} is missing: apt-get install {package}")


class Sink:
    """bench_scale's sink in the server namespace: {client port: bytes} on demand."""

    def __init__(self, lab: Lab, port: int = SINK_PORT) -> None:
        self.proc = subprocess.Popen(lab.exec_argv("server", [sys.executable, str(BENCH), "sink", "--port", str(port)]),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            pytest.fail("the sink did not start in the server namespace")

    def snap(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("snap\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            pytest.fail("the sink died")
        return json.loads(line)  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=pace.seconds(10))
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.proc.wait(timeout=pace.seconds(10))


def generator(lab: Lab, flows: int, seconds: float, sni: str = "pbs.twimg.com",
              port: int = SINK_PORT) -> subprocess.Popen[str]:
    gen = subprocess.Popen(lab.exec_argv("client", [sys.executable, str(BENCH), "gen", "--flows", str(flows), "--port",
                                                    str(port), "--sni", sni, "--seconds", f"{seconds:.1f}"]),
                           stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert gen.stdout is not None
    if gen.stdout.readline().strip() != "ready":
        pytest.fail("the generator did not start in the client namespace")
    return gen


def finish(gen: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    try:
        out, _ = gen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        gen.kill()
        gen.wait()
        pytest.fail("the generator did not finish")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def kill(proc: subprocess.Popen[Any] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
    if proc is not None:
        proc.wait(timeout=pace.seconds(10))


def speeds(first: dict[str, Any], second: dict[str, Any]) -> dict[str, float]:
    """Bytes per second each connection delivered between two sink snapshots."""
    span = float(second["t"]) - float(first["t"])
    before, after = first["counts"], second["counts"]
    return {port: (after[port] - before.get(port, 0)) / span for port in after}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    pytest.fail(f"no VmRSS for process {pid}")


def scrape(port: int) -> dict[str, float]:
    """The censor's metrics: {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=pace.seconds(10)) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series of `name` whose labels include `labels`."""
    total = 0.0
    for series, value in metrics.items():
        base, _, rest = series.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def censor(scenario: Path, lab: Lab, metrics_port: int | None) -> subprocess.Popen[str]:
    """`throttle censor` in the lab's censor namespace (our child, so its pid is the censor's)."""
    listen = f"127.0.0.1:{metrics_port}" if metrics_port else "off"
    proc = subprocess.Popen([sys.executable, "-m", "throttle", "censor", "--scenario", str(scenario), "--netns",
                             lab.ns("censor"), "--metrics-listen", listen],
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if "active in namespace" not in line:
        kill(proc)
        pytest.fail(f"the censor did not start: {line}{proc.stderr.read()}")
    notes = [proc.stderr.readline() for _ in range(2 if metrics_port else 1)]
    assert any("eBPF fast path on" in n for n in notes), notes
    return proc


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGINT, as a user stops it; what it printed on the way out."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=pace.seconds(30))
    except subprocess.TimeoutExpired:
        kill(proc)
        pytest.fail("the censor did not stop within 30 s of SIGINT")
    return err


def tc_classes(lab: Lab) -> str:
    """The shaper's classes on the upload's egress, with their statistics."""
    return subprocess.run(lab.exec_argv("censor", ["tc", "-s", "class", "show", "dev", CENSOR_SERVER_IF]),
                          capture_output=True, text=True).stdout


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def soak() -> Iterator[Lab]:
    for tool, package in (("tc", "iproute2"), ("bpftool", "bpftool"), ("iptables", "iptables")):
        _tool(tool, package)
    yield from lab_session(lab_name("soak"), ["pbs.twimg.com"])


# -- the kernel map's walks ----------------------------------------------------------------------

WALK = """
import asyncio, json, socket, struct, sys, threading, time
from throttle.kernel.fastpath import FastPath
from throttle.measure.exporter import Metrics
N, SECONDS = int(sys.argv[1]), float(sys.argv[2])
out = {}
with FastPath([], max_entries=262144) as fp:
    mac = bytes(6)
    for i in range(N):
        assert fp.add(6, struct.pack("!I", 0xC6120000 + i), 1000 + i % 50000, bytes([198, 19, 0, 1]), 443, 1, mac, mac)
    m = Metrics()
    for k in fp.counters():
        m.fast_flow_added(k, "upload", "r", "a.example")
    t = time.perf_counter(); snap = fp.counters(); out["read_seconds"] = time.perf_counter() - t
    t = time.perf_counter(); m.kernel_tick(snap); out["count_seconds"] = time.perf_counter() - t
    t = time.perf_counter(); fp.expire_stale(snap, 600); out["expire_seconds"] = time.perf_counter() - t

    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.settimeout(0.1)
        gaps, last, threads, stop = [], [time.perf_counter()], set(), threading.Event()
        def feed():
            while not stop.is_set():
                try:
                    b.send(b"x")
                except OSError:
                    pass
                time.sleep(0.001)
        def readable():
            try:
                while a.recv(4096):
                    pass
            except BlockingIOError:
                pass
            now = time.perf_counter(); gaps.append(now - last[0]); last[0] = now
        def on_walk(c):
            threads.add(threading.get_ident()); m.kernel_tick(c)
        loop.add_reader(a.fileno(), readable)
        th = threading.Thread(target=feed, daemon=True); th.start()
        w = fp.walker(every=0.5, idle=600, expire_every=0.5, on_walk=on_walk, on_expired=print, on_error=print)
        await asyncio.sleep(SECONDS)
        w.stop()
        stop.set(); th.join()
        out.update(walks=w.walks, longest_walk=w.longest_walk_seconds, longest_gap=max(gaps),
                   p99_gap=sorted(gaps)[int(len(gaps) * 0.99)], batches=len(gaps),
                   walker_off_loop=threading.get_ident() not in threads and len(threads) == 1,
                   kernel_flows=m.tables.labels("kernel_flows")._value.get())
    asyncio.run(main())
print(json.dumps(out))
"""


def test_the_walks_of_a_65536_entry_map_run_off_the_packet_loop(soak: Lab) -> None:
    """65,536 directions in the map, walked twice a second for 6 s by the fast path's walker while
    an event loop reads a socket fed every millisecond: the walks run on the walker's thread, not
    the loop's, and every walk saw every entry. The durations are printed (before this change: a
    walk of 3.5-4.3 s on the loop, the loop's longest gap as long)."""
    proc = subprocess.run(soak.exec_argv("censor", [sys.executable, "-c", WALK, "65536", f"{pace.seconds(6):.1f}"]),
                          capture_output=True, text=True, timeout=pace.seconds(300), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    print(f"\n65,536 entries: read {r['read_seconds']:.3f} s, counted {r['count_seconds']:.3f} s, expiry check "
          f"{r['expire_seconds']:.3f} s; walker: {r['walks']} walks, longest {r['longest_walk']:.3f} s; loop: "
          f"{r['batches']} batches, longest gap {r['longest_gap'] * 1000:.1f} ms, p99 {r['p99_gap'] * 1000:.1f} ms")
    assert r["walker_off_loop"]
    assert r["walks"] >= 2 and r["kernel_flows"] == 65536


# -- the shaped soak ---------------------------------------------------------------------------


def test_300_shaped_flows_for_minutes(soak: Lab, tmp_path: Path) -> None:
    """300 shaped flows through the censor for THROTTLE_SOAK_SECONDS (default 180): each flow
    within 10% of its rate over the window after warm-up, the censor's RSS flat after warm-up,
    nothing held at the end, nothing lost before inspection, no engine errors."""
    # The window must be long: a flow's count at the sink is off by up to a socket's unread data
    # and a TCP retransmission timeout or two (tens of KB, a few seconds) at either end. Measured:
    # over 25 s, 256 of 300 flows within 10% (92-162 kbit/s); over 55 s, 298-299; over 145 s, all
    # 300 (121-128 kbit/s for a target of 124).
    assert SOAK_SECONDS >= 150, "THROTTLE_SOAK_SECONDS: at least 150 (a window of two minutes)"
    scenario = tmp_path / "soak-shaped.toml"
    scenario.write_text(SHAPED)
    warmup = 30.0
    window_start = warmup
    window = SOAK_SECONDS - warmup - 5
    sink = Sink(soak)
    gen: subprocess.Popen[str] | None = None
    proc = censor(scenario, soak, SOAK_METRICS)
    rss: list[tuple[float, int]] = []
    try:
        t0 = time.monotonic()
        gen = generator(soak, SOAK_FLOWS, SOAK_SECONDS)
        first: dict[str, Any] | None = None
        while time.monotonic() - t0 < window_start + window:
            rss.append((time.monotonic() - t0, rss_kb(proc.pid)))
            if first is None and time.monotonic() - t0 >= window_start:
                first = sink.snap()
            assert proc.poll() is None, f"the censor died: {proc.stderr.read() if proc.stderr else ''}"
            time.sleep(5)
        assert first is not None
        second = sink.snap()
        during = scrape(SOAK_METRICS)
        classes = tc_classes(soak)
        gen_out = finish(gen, timeout=SOAK_SECONDS + 60)
        # The generator's sockets still hold unsent data (close() sends it on): the sink's close
        # resets them, and what is queued then must leave or be dropped within the queue bound.
        sink.stop()
        time.sleep(5)
        after = scrape(SOAK_METRICS)
        classes_after = tc_classes(soak)
    finally:
        kill(gen)
        err = stop(proc)
        sink.stop()

    per_flow = speeds(first, second)
    target = RATE * GOODPUT
    off = {port: s for port, s in per_flow.items() if abs(s - target) > 0.1 * target}
    rates = sorted(per_flow.values())
    spread = (f"per-flow goodput over {float(second['t']) - float(first['t']):.0f} s: min {rates[0] * 8 / 1000:.1f}, "
              f"median {rates[len(rates) // 2] * 8 / 1000:.1f}, max {rates[-1] * 8 / 1000:.1f} kbit/s "
              f"(target {target * 8 / 1000:.1f}); {len(per_flow) - len(off)}/{len(per_flow)} within 10%")
    warm = [kb for t, kb in rss if t >= warmup]
    print(f"\n{spread}\ncensor RSS (MB) every 5 s: {' '.join(f'{kb / 1024:.0f}' for _, kb in rss)}\n"
          f"generator: {gen_out}\nmetrics: held {after.get('throttle_queue_held_packets')}, lost "
          f"{after.get('throttle_packets_lost_before_inspection_total')}, flows "
          f"{metric(during, 'throttle_table_entries', table='flows')}, kernel_flows "
          f"{metric(during, 'throttle_table_entries', table='kernel_flows')}, delayed by the engine "
          f"{metric(after, 'throttle_packets_total', verdict='delayed')}, kernel bytes "
          f"{metric(after, 'throttle_bytes_total', stage='kernel')}\nHTB classes during the run: "
          f"{classes.count('class htb')}\ncensor: {err.strip().splitlines()[-1] if err.strip() else ''}")
    # The load was really there: every flow opened, and the generator never fell behind.
    if gen_out.get("opened") != SOAK_FLOWS or float(gen_out.get("max_gap", 99)) > 1.0 or off and rates[0] < 0.5 * target:
        assert not off, (f"the generator could not keep up on this machine (opened {gen_out.get('opened')} of "
                         f"{SOAK_FLOWS}, longest stall {gen_out.get('max_gap')} s): no verdict on the shaper; {spread}")
    assert len(per_flow) == SOAK_FLOWS, f"the sink saw {len(per_flow)} flows of {SOAK_FLOWS}"
    assert not off, spread
    # Memory: flat after warm-up (a generous bound: 16 MB or 20%, whichever is more).
    assert max(warm) - warm[0] <= max(16 * 1024, 0.2 * warm[0]), f"RSS grew from {warm[0]} to {max(warm)} kB"
    # Nothing stuck, nothing lost: every held packet left or was dropped by the queue bound.
    assert after.get("throttle_queue_held_packets") == 0
    assert after.get("throttle_packets_lost_before_inspection_total", 0) == 0
    assert metric(after, "throttle_engine_errors_total") == 0, {k: v for k, v in after.items() if "errors" in k}
    backlogs = [int(b) for b in re.findall(r"backlog \d+b (\d+)p", classes_after)]
    assert not any(backlogs), f"packets still queued in the HTB classes after the traffic stopped:\n{classes_after}"
    assert metric(during, "throttle_table_entries", table="kernel_flows") >= 2 * SOAK_FLOWS


# -- faults --------------------------------------------------------------------------------------


def _bpf_prog_ids(lab: Lab) -> set[int]:
    out = subprocess.run(lab.exec_argv("censor", ["bpftool", "-j", "net", "show"]), capture_output=True,
                         text=True).stdout
    ids: set[int] = set()
    for entry in json.loads(out or "[]"):
        for tc in entry.get("tc", []):
            if "id" in tc:
                ids.add(int(tc["id"]))
    return ids


def _host_state() -> dict[str, Any]:
    return {
        "pinned": sorted(str(p) for p in Path("/sys/fs/bpf").rglob("*")) if Path("/sys/fs/bpf").exists() else [],
        "nfqueue_in_host": "NFQUEUE" in subprocess.run(["iptables-save"], capture_output=True, text=True).stdout,
    }


def test_a_killed_censor_fails_open_and_lab_down_leaves_nothing(tmp_path: Path) -> None:
    """SIGKILL to a censor that polices and shapes: traffic keeps flowing (new flows unlimited
    through --queue-bypass; decided flows keep going in the kernel, limited until the fast path's
    lease runs out and free after it), then `throttle lab down`
    leaves no namespace, process, program, pinned map or state file."""
    for tool, package in (("tc", "iproute2"), ("bpftool", "bpftool"), ("iptables-save", "iptables")):
        _tool(tool, package)
    host_before = _host_state()
    scenario = tmp_path / "fault-mixed.toml"
    scenario.write_text(MIXED)
    lab = Lab(FAULT)
    lab.down()
    procs: list[subprocess.Popen[Any]] = []
    try:
        lab.up(["pbs.twimg.com"])
        sink = Sink(lab)
        procs.append(sink.proc)
        proc = censor(scenario, lab, None)
        procs.append(proc)
        # they outlive the test's steps (`lab down` ends them): an emulated VM took over 60 s for those
        gens = [generator(lab, 4, pace.seconds(60), sni) for sni in ("pbs.twimg.com", "abs.twimg.com")]
        procs += gens
        time.sleep(12)  # past the 16 KB burst
        a = sink.snap()
        time.sleep(8)
        b = sink.snap()
        progs = _bpf_prog_ids(lab)
        assert progs, "no eBPF program attached in the censor namespace"
        proc.kill()  # SIGKILL: no cleanup at all
        killed = time.monotonic()
        proc.wait(timeout=pace.seconds(10))
        time.sleep(2)
        c = sink.snap()
        time.sleep(8)
        d = sink.snap()
        left = subprocess.run(lab.exec_argv("censor", ["tc", "filter", "show", "dev", CENSOR_CLIENT_IF, "ingress"]),
                              capture_output=True, text=True).stdout
        htb = subprocess.run(lab.exec_argv("censor", ["tc", "qdisc", "show", "dev", CENSOR_SERVER_IF]), capture_output=True,
                             text=True).stdout
        # A new flow after the censor died: not inspected, not limited (fail-open).
        fresh = generator(lab, 1, 8, "pbs.twimg.com")
        procs.append(fresh)
        e = sink.snap()
        finish(fresh, timeout=pace.seconds(30))
        f = sink.snap()
        # Past the fast path's lease (10 s without the censor renewing it): the dead censor's
        # decisions no longer hold, and the flows it had limited run free.
        time.sleep(max(0.0, killed + LEASE + 2 - time.monotonic()))
        g = sink.snap()
        time.sleep(5)
        h = sink.snap()
        curl = subprocess.run(lab.exec_argv("client", ["curl", "-sS", "--fail", "--max-time", "10", "-o", "/dev/null",
                                                       f"http://{SERVER_V4}/info"]), capture_output=True, text=True)
        before, after_kill, after_lease = speeds(a, b), speeds(c, d), speeds(g, h)
        new = {p: s for p, s in speeds(e, f).items() if p not in after_kill}
        print(f"\nbefore SIGKILL (kbit/s): {sorted(round(s * 8 / 1000) for s in before.values())}"
              f"\nafter SIGKILL  (kbit/s): {sorted(round(s * 8 / 1000) for s in after_kill.values())}"
              f"\na new flow after it: {[round(s * 8 / 1000) for s in new.values()]} kbit/s"
              f"\nafter the lease (kbit/s): {sorted(round(s * 8 / 1000) for s in after_lease.values())}"
              f"\nleft attached: bpf filter {'bpf' in left}, HTB {'htb' in htb}, programs {sorted(progs)}")
        assert len(before) == 8 and all(s < 3 * RATE for s in before.values()), before
        # Fail-open: every decided flow still moves, a new flow is not limited, plain HTTP works.
        # (Moving, not a rate: a policed TCP flow right after losses may run below half the rate for
        # a few seconds on a busy machine.)
        assert len(after_kill) == 8 and all(s > 0 for s in after_kill.values()), after_kill
        assert new and max(new.values()) > 3 * RATE, f"a flow opened after the censor died was limited: {new}"
        old_flows = {k: v for k, v in after_lease.items() if k in after_kill}
        assert len(old_flows) == 8 and all(v > 3 * RATE for v in old_flows.values()), \
            f"flows the dead censor limited are still limited after its lease ran out: {old_flows}"
        assert curl.returncode == 0, curl.stderr
        # `throttle lab down` as a user runs it.
        down = subprocess.run([sys.executable, "-m", "throttle", "lab", "down", "--lab", FAULT], capture_output=True,
                              text=True, timeout=pace.seconds(120), cwd=REPO)
        assert down.returncode == 0, down.stderr
        for p in procs:
            try:
                p.wait(timeout=pace.seconds(10))
            except subprocess.TimeoutExpired:
                pytest.fail(f"process {p.pid} ({p.args}) outlived `throttle lab down`")
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not re.search(rf"^{FAULT}-", namespaces, re.M), namespaces
        assert not Path(f"/run/throttle/{FAULT}").exists(), list(Path(f"/run/throttle/{FAULT}").rglob("*"))
        assert not Path("/etc/netns/fault-client").exists()
        for prog in progs:
            shown = subprocess.run(["bpftool", "prog", "show", "id", str(prog)], capture_output=True, text=True)
            assert shown.returncode != 0, f"eBPF program {prog} outlived the lab: {shown.stdout}"
        assert _host_state() == host_before
        strays = subprocess.run(["pgrep", "-af", "fault-(censor|client|server)|/run/throttle/fault"],
                                capture_output=True, text=True).stdout
        assert not strays.strip(), strays
    finally:
        for p in procs:
            kill(p)
        lab.down()


def test_a_run_whose_lab_server_dies_fails_naming_it(tmp_path: Path) -> None:
    """`throttle run` in lab `fault`; the lab server is killed once the probes run: the run ends
    in bounded time (not a hang) with a message naming the lab server, not a verdict."""
    lab = Lab(FAULT)
    lab.down()
    pid_file = Path(f"/run/throttle/{FAULT}/labserver.pid")
    run = subprocess.Popen([sys.executable, "-m", "throttle", "run", "--lab", FAULT, "--metrics-listen", "off",
                            "twitter-2021-03-10"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    t0 = time.monotonic()
    said = ""
    try:
        # Killed once the probes run (the run says so on stderr), whatever this machine's speed.
        assert run.stderr is not None
        while "running the probes" not in said and time.monotonic() - t0 < pace.seconds(120):
            if not select.select([run.stderr], [], [], 1.0)[0]:
                continue
            chunk = os.read(run.stderr.fileno(), 4096)  # past the text wrapper, which would buffer
            if not chunk:
                break
            said += chunk.decode(errors="replace")
        assert "running the probes" in said, f"the run never reached its probes: {said}"
        time.sleep(1)
        os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        try:
            out, err = run.communicate(timeout=pace.seconds(180))
            err = said + err
        except subprocess.TimeoutExpired:
            pytest.fail("`throttle run` still running 3 minutes after its lab server was killed")
        took = time.monotonic() - t0
    finally:
        kill(run)
        lab.down()
    print(f"\nthrottle run ended {took:.0f} s after it started, exit {run.returncode}: {err.strip().splitlines()[-1]}")
    assert run.returncode == 2
    assert "lab server" in err.splitlines()[-1], err[-1000:]


# -- churn through the live censor ----------------------------------------------------------------

CHURN_FLOWS = int(os.environ.get("THROTTLE_CHURN_FLOWS", "100000"))
CHURN_RATE = 1000  # new connections a second
# A machine too slow for that load (tests/pace.py) gets fewer connections at a lower rate through a
# table as much smaller, so the table still overflows as often.
CHURN_LOAD = CHURN_FLOWS / pace.load(CHURN_FLOWS, 2000)
CHURN_TABLE = round(1000 / CHURN_LOAD)
CHURN_METRICS = 18233
CHURN = """
import json, resource, selectors, socket, struct, sys, time
from throttle.lab.evasion.plans import client_hello
total, rate, host, port = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
# up to 2,000 sockets at once: more than a systemd service's 1,024 descriptors (a VM's test run)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft != resource.RLIM_INFINITY and soft < 2100:
    resource.setrlimit(resource.RLIMIT_NOFILE, (2100 if hard == resource.RLIM_INFINITY else min(2100, hard), hard))
at_once = min(2000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100)
hello = client_hello("pbs.twimg.com")
linger = struct.pack("ii", 1, 0)  # close() sends a RST: no TIME_WAIT, ports free at once
sel = selectors.DefaultSelector()
opened = done = failed = 0
since = {}
start = time.monotonic()
print("ready", flush=True)
while done < total and time.monotonic() - start < 3 * total / rate + 60:
    now = time.monotonic()
    while opened < total and opened < (now - start) * rate and len(since) < at_once:
        s = socket.socket()
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        sel.register(s, selectors.EVENT_WRITE)
        since[s] = now
        opened += 1
    for key, _ in sel.select(0.01):
        s = key.fileobj
        try:
            s.send(hello)
        except OSError:
            failed += 1
        sel.unregister(s)
        del since[s]
        s.close()
        done += 1
    for s, t in list(since.items()):
        if now - t > 10:
            sel.unregister(s); del since[s]; s.close(); failed += 1; done += 1
print(json.dumps({"opened": opened, "done": done, "failed": failed, "seconds": time.monotonic() - start}), flush=True)
"""


def test_a_churn_of_100000_flows_through_the_live_censor_stays_at_the_bounds(soak: Lab, tmp_path: Path) -> None:
    """THROTTLE_CHURN_FLOWS (default 100,000) connections at 1,000 a second, each a handshake, a
    real ClientHello that a policing rule matches, and a RST, through the censor with a flow table
    of 1,000: the engine's and the kernel's tables stay at their bounds (sampled every 2 s from
    throttle_table_entries), the censor lives, its RSS grows by at most 32 MB (or 25%) after the
    first quarter, and the flows are classified. Measured: 62-64 MB over 250,000 flows at 1,000 a
    second; 61-68 MB over 100,000 on a loaded machine, where 40,000-57,000 stray packets of flows
    already evicted (a table of 1,000 holds a flow about a second) became flows of their own,
    passed. The cause of those few MB is not known yet."""
    scenario = tmp_path / "churn.toml"
    flows, rate = round(CHURN_FLOWS / CHURN_LOAD), CHURN_RATE / CHURN_LOAD
    scenario.write_text(MIXED.replace('name_sources = ["tls"]', f'name_sources = ["tls"]\nmax_flows = {CHURN_TABLE}'))
    sink = Sink(soak, 9151)
    proc = censor(scenario, soak, CHURN_METRICS)
    gen: subprocess.Popen[str] | None = None
    peaks: dict[str, float] = {}
    rss: list[int] = []
    try:
        gen = subprocess.Popen(soak.exec_argv("client", [sys.executable, "-c", CHURN, str(flows), str(rate),
                                                         SERVER_V4, "9151"]),
                               stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert gen.stdout is not None and gen.stdout.readline().strip() == "ready"
        while gen.poll() is None:
            time.sleep(2)
            m = scrape(CHURN_METRICS)
            for table in ("flows", "shared_buckets", "sticky", "dns", "kernel_flows"):
                peaks[table] = max(peaks.get(table, 0.0), metric(m, "throttle_table_entries", table=table))
            rss.append(rss_kb(proc.pid))
            assert proc.poll() is None, "the censor died"
        said = gen.stdout.read().strip().splitlines()
        assert said and said[-1].startswith("{"), f"the generator failed (its traceback is below): {said}"
        out = json.loads(said[-1])
        time.sleep(3)
        final = scrape(CHURN_METRICS)
    finally:
        kill(gen)
        err = stop(proc)
        sink.stop()
    classified = metric(final, "throttle_flows_classified_total")
    limited = metric(final, "throttle_flows_classified_total", verdict="limited")
    lost = final.get("throttle_packets_lost_before_inspection_total", 0)
    print(f"\nchurn: {flows} connections at {rate:.0f} a second through a table of {CHURN_TABLE}: {out}\n"
          f"peak table sizes: {peaks}\nclassified {classified:.0f} ({limited:.0f} limited), "
          f"lost before inspection {lost:.0f}, engine errors {metric(final, 'throttle_engine_errors_total'):.0f}\n"
          f"censor RSS (MB) every 2 s: {' '.join(f'{kb / 1024:.0f}' for kb in rss)}\n"
          f"censor: {err.strip().splitlines()[-1] if err.strip() else ''}")
    # A slower or lossier generator (a busy machine: 351 s and 4.7% failed connections with both
    # cores taken by a CPU hog) still pushes 100,000 flows through a table of 1,000 (flows are
    # evicted, never idle: the idle timeout is 600 s), so the bounds are tested all the same; only
    # a generator that mostly failed leaves no verdict.
    if out["failed"] > 0.1 * flows:
        pytest.fail(f"the generator could not open its connections on this machine ({out}): no verdict on the tables")
    # Two kernel directions per engine flow; a walk of the map is not atomic (a batch read of a hash
    # map while ~2,000 keys a second come and go), so it may count a key removed and its successor
    # both: a few over 2,000 (2,002 seen), never the 200,000 that an unbounded table would hold.
    assert peaks["flows"] <= CHURN_TABLE and peaks["kernel_flows"] <= 2 * CHURN_TABLE * 1.02 + 4, peaks
    assert classified >= 0.8 * flows, f"only {classified:.0f} of {flows} flows classified"
    assert metric(final, "throttle_engine_errors_total") == 0
    assert max(rss[len(rss) // 4:]) - rss[len(rss) // 4] <= max(32 * 1024, 0.25 * rss[len(rss) // 4]), rss
