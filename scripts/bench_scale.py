"""`scripts/bench-scale`: many concurrent throttled flows through the lab's censor, side by side with
the same flows and no censor, in one run.

Every flow is a real TCP connection from the lab's client to a sink on the lab's server: it sends a
real ClientHello (OpenSSL's, for `--sni`, default pbs.twimg.com) and then uploads as fast as TCP
lets it. The sink counts what each connection delivered; the goodput of a flow is what the sink
received from it during the measurement window, after every flow is connected and past its burst.

For each N (default 1,000 2,000 5,000 10,000) it prints one line: per-flow goodput percentiles
against the goodput the rule gives (`expected_kbit`), flows within +-10% of it, flows that escaped
(at least twice the rate), packets lost before inspection (the kernel's NFQUEUE drops), the
censor's CPU and peak RSS, and the generator's and sink's CPU, so they are seen not to be the
bottleneck. Then the same flows with no censor, as the reference line. `--json` prints the rows as
JSON. Needs root; builds its own lab (`scale`) and always takes it down.

`--page`: what the live page (throttle.measure.page) costs the censor. Each censored run is made
twice, side by side, with the censor serving its metrics and page: once with the page closed, once
with it open and refreshing, its requests made as the page makes them (the HTML, script and style
once, then GET /api/flows?since=SEQ every second), or by a real headless Chromium with the page
open (`--page-browser`; it competes with the flows for this machine's CPUs). The page line's
accuracy and censor CPU beside the closed line's are the comparison.

    scripts/bench-scale [--flows 1000,2000] [--scenario twitter-2021-03-10] [--shape] [--page] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from throttle.errors import ThrottleError
from throttle.lab.evasion.plans import client_hello
from throttle.lab.topology import SERVER_V4, Lab
from throttle.measure.runner import CensorProcess
from throttle.scenario import Rule, load_scenario
from throttle.scenario.library import find_scenario

LAB = "scale"
PORT = 9100
PAGE_PORT = 19483  # the censor's metrics and page, on the host's loopback, with --page
CHUNK = 65536
MSS, PACKET = 1448, 1500  # a full-sized segment's payload and its IP packet (TCP timestamps on)
TCP_NOTSENT_LOWAT = 25  # payload per wire byte of a full-sized segment


# ---- the sink (server namespace) ----------------------------------------------------------------
def sink(port: int) -> int:
    """Accept every connection and count its bytes; on "snap" (stdin) print {client port: bytes}."""
    sel = selectors.DefaultSelector()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((SERVER_V4, port))
    listener.listen(16384)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    sel.register(sys.stdin, selectors.EVENT_READ, "control")
    counts: dict[int, int] = {}
    buf = bytearray(CHUNK)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select(timeout=1.0):
            if key.data is None:
                while True:
                    try:
                        conn, addr = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    counts[addr[1]] = 0
                    sel.register(conn, selectors.EVENT_READ, addr[1])
            elif key.data == "control":
                line = sys.stdin.readline().strip()
                if line == "snap":
                    print(json.dumps({"t": time.monotonic(), "counts": counts, "cpu": _cpu()}), flush=True)
                elif line in ("quit", ""):
                    return 0
            else:
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                try:
                    n = conn.recv_into(buf)
                except (ConnectionError, BlockingIOError):
                    n = -1
                if n > 0:
                    counts[key.data] += n
                elif n == 0:
                    sel.unregister(conn)
                    conn.close()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- the generator (client namespace) -----------------------------------------------------------
def generate(flows: int, port: int, sni: str, seconds: float) -> int:
    """Open `flows` connections (in batches, so the SYNs do not come as one wave), send each a real
    ClientHello, then junk as fast as each socket takes it, for `seconds`; print CPU used."""
    hello = client_hello(sni)
    junk = os.urandom(CHUNK)
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, memoryview] = {}
    opened = 0
    start = time.monotonic()
    deadline = start + seconds
    max_gap, last = 0.0, start  # the longest time between two wake-ups: > 1 s means it fell behind
    print("ready", flush=True)
    while time.monotonic() < deadline:
        now = time.monotonic()
        max_gap, last = max(max_gap, now - last), now
        while opened < flows and opened < (time.monotonic() - start) * 2000 + 200:  # 2,000 new flows/s
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # Writable only when less than 64 KB wait unsent: one wake-up per 64 KB, not per ACK.
            s.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, CHUNK)
            s.setblocking(False)
            try:
                s.connect((SERVER_V4, port))
            except BlockingIOError:
                pass
            pending[s] = memoryview(hello)
            sel.register(s, selectors.EVENT_WRITE)
            opened += 1
        for key, _ in sel.select(timeout=0.05):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            data = pending[s]
            try:
                sent = s.send(data)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                sel.unregister(s)
                s.close()
                continue
            rest = data[sent:]
            pending[s] = rest if rest else memoryview(junk)
    for s in list(pending):
        s.close()
    print(json.dumps({"opened": opened, "cpu": _cpu(), "max_gap": round(max_gap, 3)}), flush=True)
    return 0


def expected_kbit(rule: Rule) -> float:
    """The payload goodput (kbit/s) one bulk upload of full-sized segments gets under `rule`: a token
    bucket passes `rate` IP bytes/s, of which MSS/PACKET is payload; a window meter (§1.11) passes the
    whole packets that fit in `burst` once per burst / rate seconds (16 KB: 10 packets, 14,480
    payload bytes per 1.008 s, 114.9 kbit/s at 130 kbit/s), since a packet that does not fit is dropped.
    (Until a shared prediction lands in throttle/measure.)"""
    if rule.meter == "window":
        return (rule.burst // PACKET) * MSS * 8 / (rule.burst / rule.rate) / 1000
    return rule.rate * 8 / 1000 * MSS / PACKET


# ---- one run -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    flows: int
    censor: bool
    page: str  # the live page: "off" (no metrics server), "closed", "open" (polled), "browser"
    measured: int  # flows the sink saw deliver during the window
    p5_kbit: float
    p50_kbit: float
    p95_kbit: float
    within_10pct: int
    escaped: int
    lost_before_inspection: int | None
    censor_cpu_percent: float | None
    censor_peak_rss_mb: float | None
    generator_cpu_percent: float
    sink_cpu_percent: float
    window_seconds: float


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _queue_losses(lab: Lab) -> int | None:
    out = subprocess.run(lab.exec_argv("censor", ["cat", "/proc/net/netfilter/nfnetlink_queue"]),
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 7 and f[0] == "0":
            return int(f[5]) + int(f[6])
    return None


class PageReader:
    """The live page, open and refreshing: its requests as the page's script makes them, from a
    thread (the assets once, then /api/flows?since=SEQ once a second), or a headless Chromium."""

    def __init__(self, browser: bool) -> None:
        self.browser = browser
        self.stop = threading.Event()
        self.polls = 0
        self.failed = 0
        self.thread: threading.Thread | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.profile = ""

    def _poll(self) -> None:
        base = f"http://127.0.0.1:{PAGE_PORT}/"
        seq = 0
        for path in ("", "page.js", "page.css"):
            self._get(base + path)
        while not self.stop.wait(1.0):
            body = self._get(f"{base}api/flows?since={seq}")
            if body:
                seq = json.loads(body)["seq"]
                self.polls += 1

    def _get(self, url: str) -> bytes:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()  # type: ignore[no-any-return]
        except OSError:
            self.failed += 1
            return b""

    def __enter__(self) -> PageReader:
        if self.browser:
            from throttle.kernel.tools import require_tool
            from throttle.measure.commands import CHROMIUM_FLAGS

            self.profile = tempfile.mkdtemp(prefix="bench-page-")
            self.proc = subprocess.Popen([require_tool("chromium", "chromium"), *CHROMIUM_FLAGS,
                                          f"--user-data-dir={self.profile}", "--window-size=1600,1100",
                                          "--remote-debugging-port=0", f"http://127.0.0.1:{PAGE_PORT}/"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            shutil.rmtree(self.profile, ignore_errors=True)


def run_once(lab: Lab, flows: int, scenario_path: str | None, target: float, sni: str, warmup: float,
             window: float, page: str = "off") -> Row:
    here = str(Path(__file__).resolve())
    sink_proc = subprocess.Popen(lab.exec_argv("server", [sys.executable, here, "sink", "--port", str(PORT)]),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    censor: CensorProcess | None = None
    reader: PageReader | None = None
    gen: subprocess.Popen[str] | None = None
    try:
        assert sink_proc.stdout is not None and sink_proc.stdin is not None
        if sink_proc.stdout.readline().strip() != "ready":
            raise ThrottleError("the sink did not start")
        if scenario_path is not None:
            listen = "off" if page == "off" else f"127.0.0.1:{PAGE_PORT}"
            censor = CensorProcess(scenario_path, lab.ns("censor"), "--metrics-listen", listen)
            censor.__enter__()
        reader = PageReader(page == "browser") if page in ("open", "browser") else None
        if reader is not None:
            reader.__enter__()
        pid = censor.proc.pid if censor is not None and censor.proc is not None else None
        ramp = flows / 2000 + 1
        seconds = ramp + warmup + window + 2
        gen = subprocess.Popen(lab.exec_argv("client", [sys.executable, here, "gen", "--flows", str(flows), "--port",
                                                        str(PORT), "--sni", sni, "--seconds", f"{seconds:.1f}"]),
                               stdout=subprocess.PIPE, text=True)
        assert gen.stdout is not None
        gen.stdout.readline()
        time.sleep(ramp + warmup)

        def snap() -> dict[str, object]:
            sink_proc.stdin.write("snap\n")  # type: ignore[union-attr]
            sink_proc.stdin.flush()  # type: ignore[union-attr]
            return json.loads(sink_proc.stdout.readline())  # type: ignore[union-attr,no-any-return]

        cpu0 = _proc_cpu(pid) if pid else None
        first = snap()
        time.sleep(window)
        second = snap()
        cpu1 = _proc_cpu(pid) if pid else None
        rss = _peak_rss_mb(pid) if pid else None
        lost = _queue_losses(lab) if censor is not None else None
        gen_out = json.loads(gen.stdout.readline() or "{}")
        gen.wait(timeout=30)
    finally:
        if reader is not None:
            reader.__exit__(None, None, None)
        if gen is not None and gen.poll() is None:
            gen.kill()
            gen.wait()
        if censor is not None:
            censor.__exit__(None, None, None)
        if sink_proc.poll() is None:
            try:
                sink_proc.stdin.write("quit\n")  # type: ignore[union-attr]
                sink_proc.stdin.flush()  # type: ignore[union-attr]
                sink_proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                sink_proc.kill()
                sink_proc.wait()
    if reader is not None and reader.thread is not None and (reader.failed or not reader.polls):
        raise ThrottleError(f"the page's polls: {reader.polls} answered, {reader.failed} failed")
    span = float(second["t"]) - float(first["t"])  # type: ignore[arg-type]
    before: dict[str, int] = first["counts"]  # type: ignore[assignment]
    after: dict[str, int] = second["counts"]  # type: ignore[assignment]
    speeds = sorted((after[k] - before.get(k, 0)) * 8 / span / 1000 for k in after)
    speeds = speeds[-flows:]
    q = statistics.quantiles(speeds, n=20) if len(speeds) >= 2 else speeds * 19
    gen_cpu = float(gen_out.get("cpu", 0.0))
    return Row(
        flows=flows, censor=censor is not None, page=page if censor is not None else "off", measured=len(speeds),
        p5_kbit=round(q[0], 1),
        p50_kbit=round(statistics.median(speeds), 1) if speeds else 0.0, p95_kbit=round(q[-1], 1),
        within_10pct=sum(abs(s - target) <= 0.1 * target for s in speeds),
        escaped=sum(s >= 2 * target for s in speeds), lost_before_inspection=lost,
        censor_cpu_percent=round(100 * (cpu1 - cpu0) / span, 1) if cpu0 is not None and cpu1 is not None else None,
        censor_peak_rss_mb=round(rss, 1) if rss is not None else None,
        generator_cpu_percent=round(100 * gen_cpu / (ramp + warmup + window + 2), 1),
        sink_cpu_percent=round(100 * (float(second["cpu"]) - float(first["cpu"])) / span, 1),  # type: ignore[arg-type]
        window_seconds=round(span, 1),
    )


def _shaped(path: Path, tmp: Path) -> str:
    """The scenario with every rule shaping instead of policing (the same rate, burst and queue)."""
    text = path.read_text()
    out = tmp / f"{path.stem}-shaped.toml"
    # a shaper has no window meter (the loader refuses one): the token bucket, at the same rate
    lines = [line for line in text.splitlines() if not line.strip().startswith(("action", "meter"))]
    body = "\n".join(lines).replace("[[rule]]", '[[rule]]\naction = "shape"')
    out.write_text(body + "\n")
    return str(out)


def main(argv: list[str]) -> int:
    if argv[:1] == ["sink"]:
        return sink(int(argv[argv.index("--port") + 1]))
    if argv[:1] == ["gen"]:
        p = argparse.ArgumentParser()
        p.add_argument("--flows", type=int)
        p.add_argument("--port", type=int)
        p.add_argument("--sni")
        p.add_argument("--seconds", type=float)
        a = p.parse_args(argv[1:])
        return generate(a.flows, a.port, a.sni, a.seconds)
    p = argparse.ArgumentParser(prog="scripts/bench-scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--flows", default="1000,2000,5000,10000", help="comma-separated flow counts")
    p.add_argument("--scenario", default="twitter-2021-03-10")
    p.add_argument("--shape", action="store_true", help="every rule shapes (delays) instead of policing")
    p.add_argument("--sni", default="pbs.twimg.com")
    p.add_argument("--warmup", type=float, default=8.0, help="seconds after the last connection before measuring")
    p.add_argument("--window", type=float, default=20.0, help="seconds measured")
    p.add_argument("--no-reference", action="store_true", help="skip the runs without a censor")
    p.add_argument("--lab", default=LAB, help=f"lab name (default {LAB}); taken down first and at the end")
    p.add_argument("--page", action="store_true", help="each censored run twice: the live page closed, then open")
    p.add_argument("--page-browser", action="store_true", help="with --page: a headless Chromium has the page open")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    pages = ("closed", "browser" if a.page_browser else "open") if a.page else ("off",)
    counts = [int(n) for n in a.flows.split(",") if n]
    path = find_scenario(a.scenario)
    scenario = load_scenario(path)
    rule = min((r for r in scenario.rules if r.rate > 0), key=lambda r: r.rate)
    target = expected_kbit(dataclasses.replace(rule, meter="bucket") if a.shape else rule)
    rows: list[Row] = []
    lab = Lab(a.lab)
    lab.down()
    say = (lambda text: print(text, file=sys.stderr, flush=True))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            scen_path = _shaped(path, Path(tmp)) if a.shape else str(path)
            lab.up([])
            for n in counts:
                runs = [(True, page) for page in pages] + ([(False, "off")] if not a.no_reference else [])
                for with_censor, page in runs:
                    shown = "no censor" if not with_censor else "through the censor" + \
                        ("" if page == "off" else f", the page {page}")
                    say(f"bench-scale: {n} flows, {shown} ...")
                    rows.append(run_once(lab, n, scen_path if with_censor else None, target, a.sni, a.warmup,
                                         a.window, page))
                    say(f"  {rows[-1]}")
    finally:
        lab.down()
    if a.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return 0
    meter = f"{rule.meter} meter" if not a.shape else "shaped"
    print(f"\n{scenario.name} ({meter}): rate {rule.rate * 8 / 1000:.1f} kbit/s, burst {rule.burst} B, goodput target "
          f"{target:.1f} kbit/s (+-10%: {0.9 * target:.1f}-{1.1 * target:.1f}); window {a.window:.0f} s")
    header = ("flows", "censor", "page", "p5", "p50", "p95 kbit/s", "within 10%", "escaped", "lost", "censor CPU",
              "RSS MB", "gen CPU", "sink CPU")
    print("  ".join(f"{h:>10}" for h in header))
    for r in rows:
        cells = (r.flows, "yes" if r.censor else "no", r.page if r.censor else "-", r.p5_kbit, r.p50_kbit, r.p95_kbit,
                 f"{r.within_10pct} ({100 * r.within_10pct / max(1, r.flows):.1f}%)", r.escaped,
                 "-" if r.lost_before_inspection is None else r.lost_before_inspection,
                 "-" if r.censor_cpu_percent is None else f"{r.censor_cpu_percent}%",
                 "-" if r.censor_peak_rss_mb is None else r.censor_peak_rss_mb,
                 f"{r.generator_cpu_percent}%", f"{r.sink_cpu_percent}%")
        print("  ".join(f"{c!s:>10}" for c in cells))
    closed = {r.flows: r for r in rows if r.page == "closed"}
    for r in rows:
        before = closed.get(r.flows)
        if r.page in ("open", "browser") and before is not None and r.censor_cpu_percent is not None \
                and before.censor_cpu_percent is not None:
            cost = r.censor_cpu_percent - before.censor_cpu_percent
            print(f"{r.flows} flows: the page {r.page} costs the censor {cost:+.1f} CPU points "
                  f"({before.censor_cpu_percent}% closed, {r.censor_cpu_percent}% open); within 10%: "
                  f"{before.within_10pct} closed, {r.within_10pct} open")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        sys.exit(main(sys.argv[1:]))
    except ThrottleError as exc:
        print(f"bench-scale: {exc}", file=sys.stderr)
        sys.exit(2)
