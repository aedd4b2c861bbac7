"""`scripts/bench-churn`: short TLS flows opened at a fixed rate through the lab's censor, half of
them to a limited name: is every one of those limited, and if not, is the shortfall counted?

Each flow is a real TCP connection from the lab's client to a sink on the lab's server: a real
ClientHello (OpenSSL's; every other flow names `--limited`, default pbs.twimg.com, the rest
`--other`, default example.org), 2 KB after it, then FIN; the sink reads to the end and closes. For
each rate (default 250, 500 and 1,000 new flows per second, `--seconds` each, default 30) a fresh
censor runs the scenario (default twitter-2021-03-10) with its metrics on the host's loopback, and
the script reads them once the flows are done:

- limited: flows the censor limited (`throttle_flows_classified_total{verdict="limited"}`);
- queue drops: packets the kernel dropped because the censor's queue was full, counted by the
  censor (`throttle_packets_total{stage="queue",verdict="dropped"}`, also in its 5-second line):
  the censor fell behind, and TCP sends those packets again, so their flows are inspected late,
  not missed;
- passed, and flows that closed while still under inspection (`throttle_flows_ended_total`).

One line per rate: the rate the generator reached, the flows opened and completed per name, flows
limited against the limited name's flows (`shortfall`: limited-name flows not limited; with no
queue drops beside it, the censor missed them without saying so), the censor's CPU (percent of one
core over the churn). `--json` prints the rows. Needs root; builds its own lab (`--lab`, default
churn) and always takes it down. `churn` runs the rates in a lab that is up (the CI test's reduced
run, tests/netns/test_churn.py).

    scripts/bench-churn [--rates 250,500,1000] [--seconds 30] [--scenario twitter-2021-03-10] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import select
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from throttle.errors import ThrottleError
from throttle.lab.evasion.plans import client_hello
from throttle.lab.topology import SERVER_V4, Lab
from throttle.measure.runner import CensorProcess
from throttle.scenario.library import find_scenario

PORT = 9200  # the sink's first port
# Server ports per rate, taken in turn: each rate has its own, and a port sees at most 1/8 of a
# rate's flows. One port for 30,000 flows in 30 s made the client's kernel reuse the local ports of
# connections in TIME_WAIT (216 at 1,000/s), and under a model that keeps a flow's state past its
# end (twitter-2021-03-10, syn_restarts_flow = false, §1.14) a connection on a 5-tuple used before
# joins that flow: it is limited or not as the earlier one was, and not a new flow. With 8 ports a
# few still are (19 of 30,000 at 1,000/s): the table shows them beside the shortfall.
PORTS_PER_RATE = 8
METRICS = 19471
BODY = 2048
FLOW_TIMEOUT = 20.0  # seconds a flow may take (SYN and hello retransmissions included)


# ---- the sink (server namespace) ----------------------------------------------------------------
def sink(ports: list[int]) -> int:
    """Accept every connection on `ports`, read each to its end, close it. Runs until stdin closes."""
    sel = selectors.DefaultSelector()
    for port in ports:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((SERVER_V4, port))
        listener.listen(65535)
        listener.setblocking(False)
        sel.register(listener, selectors.EVENT_READ, "listener")
    sel.register(sys.stdin, selectors.EVENT_READ, "control")
    buf = bytearray(65536)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select(timeout=1.0):
            if key.data == "listener":
                listener = key.fileobj
                assert isinstance(listener, socket.socket)
                while True:
                    try:
                        conn, _addr = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "conn")
            elif key.data == "control":
                if not sys.stdin.readline():
                    return 0
            else:
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                try:
                    n = conn.recv_into(buf)
                except BlockingIOError:
                    continue
                except ConnectionError:
                    n = 0
                if n == 0:
                    sel.unregister(conn)
                    conn.close()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- the generator (client namespace) -----------------------------------------------------------
def generate(rate: float, seconds: float, ports: list[int], limited: str, other: str) -> int:
    """Open flow i at start + i / rate (even i: the limited name; to port i // 2 mod len(ports), so
    each port gets both names), each: hello + BODY bytes, FIN,
    read to the end. Prints one JSON line: flows opened and completed per name, the rate reached."""
    hellos = {limited: client_hello(limited) + os.urandom(BODY), other: client_hello(other) + os.urandom(BODY)}
    sel = selectors.DefaultSelector()
    flows: dict[socket.socket, tuple[str, float, memoryview | None]] = {}  # name, opened at, data unsent
    opened = {limited: 0, other: 0}
    completed = {limited: 0, other: 0}
    failed = {limited: 0, other: 0}
    total = int(rate * seconds)
    used: list[tuple[int, int]] = []  # (local port, server port): one used twice is a 5-tuple used twice
    print("ready", flush=True)
    start = time.monotonic()
    i = 0
    while i < total or flows:
        now = time.monotonic()
        while i < total and start + i / rate <= now:
            name = limited if i % 2 == 0 else other
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect((SERVER_V4, ports[i // 2 % len(ports)]))
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                failed[name] += 1
                i += 1
                continue
            try:
                used.append((s.getsockname()[1], ports[i // 2 % len(ports)]))
            except OSError:
                pass
            flows[s] = (name, now, memoryview(hellos[name]))
            sel.register(s, selectors.EVENT_WRITE)
            opened[name] += 1
            i += 1
        last_open = now
        wait = max(0.0, start + i / rate - time.monotonic()) if i < total else 0.2
        for key, _ in sel.select(timeout=min(wait, 0.2)):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            name, at, data = flows[s]
            try:
                if data is not None:
                    sent = s.send(data)
                    rest = data[sent:]
                    if rest:
                        flows[s] = (name, at, rest)
                        continue
                    s.shutdown(socket.SHUT_WR)
                    flows[s] = (name, at, None)
                    sel.modify(s, selectors.EVENT_READ)
                    continue
                if s.recv(4096):
                    continue
                completed[name] += 1
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                failed[name] += 1
            sel.unregister(s)
            s.close()
            del flows[s]
        now = time.monotonic()
        for s, (name, at, _) in list(flows.items()):
            if now - at > FLOW_TIMEOUT:
                failed[name] += 1
                sel.unregister(s)
                s.close()
                del flows[s]
        if i >= total and not flows:
            break
    span = (last_open - start) if total > 1 else 1.0
    print(json.dumps({"opened": opened, "completed": completed, "failed": failed,
                      "rate_reached": round((total - 1) / span, 1) if span > 0 else 0.0,
                      "ports_reused": len(used) - len(set(used)), "cpu": round(_cpu(), 2)}), flush=True)
    return 0


# ---- the censor's metrics ---------------------------------------------------------------------------
SAMPLE = re.compile(r'^(\w+)(?:\{([^}]*)\})? (\S+)$')


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        page = response.read().decode()
    samples = []
    for line in page.splitlines():
        m = SAMPLE.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            samples.append((m.group(1), labels, float(m.group(3))))
    return samples


def total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> int:
    return int(sum(v for n, ls, v in samples if n == name and all(ls.get(k) == x for k, x in labels.items())))


@dataclasses.dataclass
class Row:
    rate: float
    rate_reached: float
    seconds: float
    limited_opened: int
    limited_completed: int
    other_opened: int
    other_completed: int
    failed: int
    ports_reused: int  # flows on a 5-tuple an earlier flow of the run had (the censor may take them as one)
    limited: int  # flows the censor limited
    queue_drops: int  # packets dropped because the censor's queue was full (sent again by TCP)
    shortfall: int  # limited-name flows not limited
    passed: int
    ended_inspecting: int  # flows that closed while still under inspection
    inspecting_now: int
    active: int  # flows in the censor's table, every state
    censor_cpu_percent: float
    generator_cpu_percent: float
    censor_line: str


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _watch_queue(lab: Lab, gen: subprocess.Popen[str]) -> list[int]:
    """While the generator runs: the most packets waiting in queue 0, and its kernel counters."""
    peak = [0, 0, 0]
    assert gen.stdout is not None
    while not select.select([gen.stdout], [], [], 0.5)[0]:
        out = subprocess.run(lab.exec_argv("censor", ["cat", "/proc/net/netfilter/nfnetlink_queue"]),
                             capture_output=True, text=True).stdout.split()
        if len(out) >= 7:
            peak = [max(peak[0], int(out[2])), int(out[5]), int(out[6])]
    return peak


def run_rate(lab: Lab, scenario: str, rate: float, seconds: float, ports: list[int], limited: str, other: str,
             metrics_port: int, diagnose: bool = False) -> Row:
    here = str(Path(__file__).resolve())
    censor = CensorProcess(scenario, lab.ns("censor"), "--metrics-listen", f"127.0.0.1:{metrics_port}")
    with censor:
        gen = subprocess.Popen(lab.exec_argv("client", [sys.executable, here, "gen", "--rate", str(rate), "--seconds",
                                                        str(seconds), "--ports", ",".join(map(str, ports)),
                                                        "--limited", limited,
                                                        "--other", other]),
                               stdout=subprocess.PIPE, text=True)
        try:
            assert gen.stdout is not None
            gen.stdout.readline()
            cpu0, t0 = _proc_cpu(censor.pid), time.monotonic()
            if diagnose:
                peak = _watch_queue(lab, gen)
            out = json.loads(gen.stdout.readline() or "{}")
            cpu1, t1 = _proc_cpu(censor.pid), time.monotonic()
            gen.wait(timeout=30)
        finally:
            if gen.poll() is None:
                gen.kill()
                gen.wait()
        time.sleep(2.5)  # two of the censor's ticks: its counters read the kernel's once a second
        samples = scrape(metrics_port)
        if diagnose:
            rules = subprocess.run(lab.exec_argv("censor", ["iptables", "-w", "-t", "mangle", "-L", "THROTTLE_Q0", "-v",
                                                            "-x", "-n"]), capture_output=True, text=True).stdout
            print(f"queue peak {peak}\n{rules}", file=sys.stderr)
    if diagnose:
        print(censor.tail, file=sys.stderr)
    if not out:
        raise ThrottleError("the generator printed nothing")
    limited_flows = total(samples, "throttle_flows_classified_total", verdict="limited")
    opened, completed = out["opened"], out["completed"]
    return Row(
        rate=rate, rate_reached=out["rate_reached"], seconds=seconds,
        limited_opened=opened[limited], limited_completed=completed[limited], other_opened=opened[other],
        other_completed=completed[other], failed=sum(out["failed"].values()),
        ports_reused=out["ports_reused"],
        limited=limited_flows,
        queue_drops=total(samples, "throttle_packets_total", stage="queue", verdict="dropped"),
        shortfall=max(0, opened[limited] - limited_flows),
        passed=total(samples, "throttle_flows_classified_total", verdict="passed"),
        ended_inspecting=total(samples, "throttle_flows_ended_total", state="inspecting"),
        inspecting_now=total(samples, "throttle_flows_active", state="inspecting"),
        active=total(samples, "throttle_flows_active"),
        censor_cpu_percent=round(100 * (cpu1 - cpu0) / max(t1 - t0, 1e-9), 1),
        generator_cpu_percent=round(100 * float(out["cpu"]) / max(t1 - t0, 1e-9), 1),
        censor_line=censor.tail.strip().splitlines()[-1] if censor.tail.strip() else "",
    )


def churn(lab: Lab, scenario: str, rates: list[float], seconds: float, limited: str, other: str,
          metrics_port: int, diagnose: bool = False, say: Callable[[str], None] | None = None) -> list[Row]:
    """One row per rate, in `lab` (up): a sink on its server for the whole run, a fresh censor per rate."""
    here = str(Path(__file__).resolve())
    ports = [[PORT + PORTS_PER_RATE * i + j for j in range(PORTS_PER_RATE)] for i in range(len(rates))]
    rows: list[Row] = []
    sink_proc = subprocess.Popen(lab.exec_argv("server", [sys.executable, here, "sink", "--ports",
                                                          ",".join(str(p) for group in ports for p in group)]),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert sink_proc.stdout is not None
        if sink_proc.stdout.readline().strip() != "ready":
            raise ThrottleError("the sink did not start")
        for rate, group in zip(rates, ports):
            if say is not None:
                say(f"bench-churn: {rate:.0f} new flows/s for {seconds:.0f} s ...")
            rows.append(run_rate(lab, scenario, rate, seconds, group, limited, other, metrics_port, diagnose))
            if say is not None:
                say(f"  {rows[-1]}")
    finally:
        if sink_proc.stdin is not None:
            sink_proc.stdin.close()
        try:
            sink_proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sink_proc.kill()
            sink_proc.wait()
    return rows


def main(argv: list[str]) -> int:
    if argv[:1] == ["sink"]:
        return sink([int(p) for p in argv[argv.index("--ports") + 1].split(",")])
    if argv[:1] == ["gen"]:
        p = argparse.ArgumentParser()
        p.add_argument("--rate", type=float)
        p.add_argument("--seconds", type=float)
        p.add_argument("--ports")
        p.add_argument("--limited")
        p.add_argument("--other")
        g = p.parse_args(argv[1:])
        return generate(g.rate, g.seconds, [int(x) for x in g.ports.split(",")], g.limited, g.other)
    p = argparse.ArgumentParser(prog="scripts/bench-churn", description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="250,500,1000", help="comma-separated new flows per second")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--scenario", default="twitter-2021-03-10")
    p.add_argument("--limited", default="pbs.twimg.com")
    p.add_argument("--other", default="example.org")
    p.add_argument("--lab", default="churn")
    p.add_argument("--metrics-port", type=int, default=METRICS)
    p.add_argument("--json", action="store_true")
    p.add_argument("--diagnose", action="store_true", help="the queue's peak and the firewall's counters, on stderr")
    a = p.parse_args(argv)
    rates = [float(r) for r in a.rates.split(",") if r]
    scenario = str(find_scenario(a.scenario))
    say = (lambda text: print(text, file=sys.stderr, flush=True))
    lab = Lab(a.lab)
    lab.down()
    try:
        lab.up([])
        # 30,000 flows in 30 s, each in TIME_WAIT for a minute after: more than the default 28,232 ports.
        subprocess.run(lab.exec_argv("client", ["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"]),
                       check=True)
        rows = churn(lab, scenario, rates, a.seconds, a.limited, a.other, a.metrics_port, a.diagnose, say)
    finally:
        lab.down()
    if a.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return 0
    print(f"\n{a.scenario}: short TLS flows (hello + {BODY} B, FIN), half to {a.limited}, {a.seconds:.0f} s per rate")
    header = ("rate", "reached", "limited-name flows", "limited", "queue drops", "shortfall",
              "other flows", "passed", "closed inspecting", "5-tuples reused", "censor CPU", "gen CPU")
    print("  ".join(f"{h:>10}" for h in header))
    for r in rows:
        cells = (f"{r.rate:.0f}/s", f"{r.rate_reached:.0f}/s", r.limited_opened, r.limited, r.queue_drops,
                 r.shortfall, r.other_opened, r.passed, r.ended_inspecting, r.ports_reused, f"{r.censor_cpu_percent}%",
                 f"{r.generator_cpu_percent}%")
        print("  ".join(f"{c!s:>10}" for c in cells))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        sys.exit(main(sys.argv[1:]))
    except ThrottleError as exc:
        print(f"bench-churn: {exc}", file=sys.stderr)
        sys.exit(2)
