"""The live page for a classroom: every flow the censor decided, its speed second by second against
its rule's rate line, the counts of flows limited and passed, the scenario's title and sources;
served with the Prometheus metrics by one small HTTP server.

    GET /              the page (throttle/data/page/: HTML, our own JS drawing on canvases, CSS)
    GET /page.js, /page.css
    GET /api/flows     JSON (`Board.snapshot`); ?since=SEQ gives only the history after tick SEQ
    anything else      the Prometheus exposition (prometheus_client's WSGI app), as before

`Board` is fed by `measure.exporter.Metrics`: a decision adds the flow (the `FlowDecided` event,
once per flow), and the once-a-second tick samples what the censor already counts for it: the
engine's per-flow counters (`Flow.sides`) plus the speed of its directions the eBPF program
carries, from its per-direction counters at the walker's last two walks (`Metrics`' per-key table,
looked up by the flow's two map keys, after each walk, at the walk's time: the walker's second and
the tick's would beat, showing 0 and twice the speed in turn). Nothing is added to the per-packet
path. At most `CAP` flows are kept (the most recently decided), each with
`WINDOW` one-second points; a flow that ended leaves the page once its last point left the window.

The HTTP server's threads read the board under its lock, by copying; the JSON is made off the
censor's loop. The page polls /api/flows once a second with `since`, so each poll carries about one
point per flow, not two minutes of them.
"""

from __future__ import annotations

import json
import socket
import socketserver
import struct
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from throttle.engine import Flow, State
from throttle.errors import ThrottleError
from throttle.kernel.maps import map_key
from throttle.scenario import Rule, Scenario

CAP = 300  # flows kept on the board: the most recently decided
WINDOW = 120  # one-second points kept per flow: two minutes
MEAN = 5  # points a flow's speed now is the mean of
DIRECTIONS = ("upload", "download")
ASSETS = {"/": ("page.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript; charset=utf-8"),
          "/page.css": ("page.css", "text/css; charset=utf-8")}
_COUNTS = struct.Struct("=QQQQ")  # the exporter's packed kernel counters: bytes, packets, dropped bytes, packets

Wsgi = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def rule_limits(rule: Rule | None) -> dict[str, float | None]:
    """The rate line of each direction: the rule's rate where it limits that direction by rate
    (police, shape), else None (a passed flow, a direction the rule leaves alone, drop, rst, loss)."""
    limits: dict[str, float | None] = {"upload": None, "download": None}
    if rule is None or rule.action not in ("police", "shape"):
        return limits
    for d in DIRECTIONS if rule.direction == "both" else (rule.direction,):
        limits[d] = float(rule.rate)
    return limits


class _Shown:
    """One flow on the board: what it is, its bytes as last sampled, its points (seq, up, down B/s)."""

    __slots__ = ("flow", "keys", "fields", "totals", "at", "walked", "kernel_rate", "points", "last_active", "speed")

    def __init__(self, flow: Flow, seq: int, now: float) -> None:
        self.flow = flow
        try:  # the eBPF program's keys of its two directions (TCP and UDP only)
            self.keys: tuple[bytes, bytes] | None = (
                map_key(flow.proto, flow.client, flow.client_port, flow.server, flow.server_port),
                map_key(flow.proto, flow.server, flow.server_port, flow.client, flow.client_port))
        except ThrottleError:
            self.keys = None
        limited = flow.state == State.LIMITED and flow.rule is not None
        rule = flow.rule if limited else None
        self.fields: dict[str, Any] = {
            "id": flow.id, "name": flow.name or "", "rule": rule.name if rule is not None else "none",
            "action": rule.action if rule is not None else "pass", "verdict": "limited" if limited else "passed",
            "transport": flow.transport, "client": flow.client_endpoint, "server": flow.server_endpoint,
            "decided": seq, "limit": rule_limits(rule)}
        # bytes before the decision are the inspection's: the first point counts from here
        self.totals = [side.bytes - side.dropped_bytes for side in flow.sides]  # what the engine passed
        self.at = now
        # per direction: the kernel's count at the last walk that saw it, and when; the speed between
        # the last two walks (the walker's clock, not the tick's: the two would beat)
        self.walked: list[tuple[float, int] | None] = [None, None]
        self.kernel_rate = [0.0, 0.0]
        self.points: deque[tuple[int, int, int]] = deque(maxlen=WINDOW)
        self.last_active = seq
        self.speed = {"upload": 0, "download": 0}  # the mean of the last `MEAN` points


class Board:
    """The flows the page shows and their speed histories; see the module docstring."""

    def __init__(self, cap: int = CAP) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        self._shown: OrderedDict[int, _Shown] = OrderedDict()  # by flow id, oldest decision first
        self.seq = 0  # ticks sampled
        self.limited = self.passed = 0  # flows decided since the censor started
        self.active = {"limited": 0, "passed": 0}  # in the flow table at the last tick
        self.scenario: dict[str, Any] = {"name": "", "title": "", "sources": []}

    def describe(self, scenario: Scenario) -> None:
        self.scenario = {"name": scenario.name, "title": scenario.title, "sources": list(scenario.sources)}

    def decided(self, flow: Flow, now: float) -> None:
        """A flow decided (`FlowDecided`): on the board from now, the oldest dropped past the cap."""
        shown = _Shown(flow, self.seq, now)
        with self._lock:
            if shown.fields["verdict"] == "limited":
                self.limited += 1
            else:
                self.passed += 1
            self._shown.pop(flow.id, None)
            self._shown[flow.id] = shown
            while len(self._shown) > self.cap:
                self._shown.popitem(last=False)

    def walked(self, now: float, kernel: Mapping[bytes, bytes]) -> None:
        """After each walk of the eBPF map (on the walker's thread; `kernel`: the exporter's packed
        counters by map key): the speed of each shown flow's kernel-carried directions between
        this walk and the last, at the walks' own times."""
        with self._lock:
            for shown in self._shown.values():
                keys = shown.keys
                if keys is None:
                    continue
                for d in (0, 1):
                    packed = kernel.get(keys[d])
                    if packed is None:  # not (yet, or no longer) in the kernel
                        shown.walked[d], shown.kernel_rate[d] = None, 0.0
                        continue
                    count, before = _COUNTS.unpack(packed)[0], shown.walked[d]
                    if before is not None and now > before[0]:
                        shown.kernel_rate[d] = max(count - before[1], 0) / (now - before[0])
                    shown.walked[d] = (now, count)

    def sample(self, now: float, active: Mapping[str, int]) -> None:
        """Once a second (the censor's tick): each shown flow's speed per direction since the last
        sample, from the engine's counters, plus the kernel's speed at the last walk (`walked`)."""
        with self._lock:
            self.seq += 1
            seq = self.seq
            self.active = {"limited": active.get("limited", 0), "passed": active.get("passed", 0)}
            gone = []
            for fid, shown in self._shown.items():
                flow, totals, kernel_rate = shown.flow, shown.totals, shown.kernel_rate
                span = now - shown.at
                speeds = [0, 0]
                for d in (0, 1):
                    side = flow.sides[d]
                    total = side.bytes - side.dropped_bytes
                    engine = (total - totals[d]) / span if span > 0 and total > totals[d] else 0.0
                    totals[d] = max(total, totals[d])
                    speeds[d] = round(engine + kernel_rate[d])
                shown.at = now
                points = shown.points
                points.append((seq, speeds[0], speeds[1]))
                n = min(len(points), MEAN)
                recent = [points[-i] for i in range(1, n + 1)]
                shown.speed = {"upload": round(sum(p[1] for p in recent) / n),
                               "download": round(sum(p[2] for p in recent) / n)}
                if speeds[0] or speeds[1]:
                    shown.last_active = seq
                elif flow.end_reason is not None and seq - shown.last_active >= WINDOW:
                    gone.append(fid)
            for fid in gone:
                del self._shown[fid]

    def snapshot(self, since: int = 0) -> dict[str, Any]:
        """What /api/flows answers: the flows (newest decision first) with their points after tick
        `since` (all of the window with 0) and their speed now (the mean of the last `MEAN` points).
        Only those points are copied, under the lock; the rest is made outside it."""
        with self._lock:
            seq, limited, passed, active = self.seq, self.limited, self.passed, dict(self.active)
            shown = []
            for s in self._shown.values():
                points = s.points
                n = min(len(points), max(seq - since, 0))
                shown.append((s.fields, s.flow.end_reason is not None, s.speed,
                              [points[i] for i in range(len(points) - n, len(points))]))
        flows = [{**fields, "ended": ended, "speed": speed, "history": [list(p) for p in points]}
                 for fields, ended, speed, points in reversed(shown)]
        return {"scenario": self.scenario, "seq": seq, "interval": 1.0, "window": WINDOW, "cap": self.cap,
                "counts": {"limited": limited, "passed": passed, "active_limited": active["limited"],
                           "active_passed": active["passed"], "shown": len(flows)},
                "flows": flows}


def asset(name: str) -> bytes:
    return (resources.files("throttle") / "data" / "page" / name).read_bytes()


def app(board: Board, metrics_app: Wsgi) -> Wsgi:
    """The WSGI application: the page, its assets and /api/flows; the metrics everywhere else."""
    cache: dict[str, bytes] = {}

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/api/flows":
            query = parse_qs(environ.get("QUERY_STRING", ""))
            since = query.get("since", ["0"])[0]
            body = json.dumps(board.snapshot(int(since) if since.isdigit() else 0),
                              separators=(",", ":")).encode()
            kind = "application/json"
        elif path in ASSETS:
            name, kind = ASSETS[path]
            body = cache.get(name) or cache.setdefault(name, asset(name))
        else:
            return metrics_app(environ, start_response)
        start_response("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-store")])
        return [body]

    return serve


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow browser never holds up the censor's exit


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass  # one line per poll would bury the censor's own output


def serve(board: Board, registry: Any, addr: str, port: int) -> WSGIServer:
    """The metrics and the page on addr:port, served by daemon threads from now (bound before
    returning: an OSError if the port is taken)."""
    from prometheus_client import make_wsgi_app

    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("PageServer", (_Server,), {"address_family": family})
    httpd: WSGIServer = make_server(addr, port, app(board, make_wsgi_app(registry)), server_class, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="page", daemon=True).start()
    return httpd


def browser_argv(url: str, profile: str, *, screenshot: str | None = None, width: int = 1600,
                 height: int = 1100, wait_ms: int = 4000) -> list[str]:
    """Headless Chromium showing the page at `url` for `wait_ms` of its (virtual) time, then
    printing its DOM, or saving a screenshot: what the namespace test reads and what
    scripts/page-screenshot makes the README's picture with."""
    from throttle.kernel.tools import require_tool
    from throttle.measure.commands import CHROMIUM_FLAGS

    out = [f"--screenshot={screenshot}", "--hide-scrollbars"] if screenshot else ["--dump-dom"]
    return [require_tool("chromium", "chromium"), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
            f"--window-size={width},{height}", f"--virtual-time-budget={wait_ms}", *out, url]
