"""The live page's board and its HTTP answers, with engine events and literal times (no server
process, no kernel): /api/flows' schema, the speeds it gives from the engine's and the kernel's
counters, its cap, and the assets (shipped, and loading nothing from elsewhere)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from tests.conftest import ROOT
from throttle.engine import Engine, State
from throttle.kernel.maps import Counters, map_key
from throttle.measure.exporter import Metrics
from throttle.measure.page import ASSETS, CAP, WINDOW, Board, app, asset
from throttle.scenario import load_scenario

from .packets import Conversation, python_hello, udp

SCENARIO = ROOT / "scenarios/twitter-2021-03-10.toml"


def feed(e: Engine, m: Metrics, packets: Iterable[bytes], now: float) -> None:
    for p in packets:
        e.process(p, now)
    for ev in e.drain_events():
        m.on_event(ev)


def policed_and_passed() -> tuple[Engine, Metrics, Conversation, Conversation]:
    """A flow to pbs.twimg.com (limited by the rule twitter) and one to example.com (passed), decided."""
    s = load_scenario(SCENARIO)
    e, m = Engine(s.model, s.rules), Metrics()
    m.board.describe(s)
    limited, passed = Conversation(client_port=40000), Conversation(client_port=40001)
    feed(e, m, limited.handshake() + [limited.client(python_hello("pbs.twimg.com"))], 0.0)
    feed(e, m, passed.handshake() + [passed.client(python_hello("example.com"))], 0.0)
    for _ in range(200):  # a name that matched nothing: the model reads on before it passes the flow
        if all(f.state != State.INSPECTING for f in e.flows()):
            break
        feed(e, m, [passed.client(b"y" * 1400)], 0.0)
    m.tick(e, held=0, fast=None, now=0.0)
    return e, m, limited, passed


def check_schema(data: dict[str, Any]) -> None:
    assert set(data) == {"scenario", "seq", "interval", "window", "cap", "counts", "flows"}
    assert set(data["scenario"]) == {"name", "title", "sources"} and isinstance(data["scenario"]["sources"], list)
    assert isinstance(data["seq"], int) and data["window"] == WINDOW and data["cap"] == CAP
    assert set(data["counts"]) == {"limited", "passed", "active_limited", "active_passed", "shown"}
    assert all(isinstance(v, int) for v in data["counts"].values())
    for f in data["flows"]:
        assert set(f) == {"id", "name", "rule", "action", "verdict", "transport", "client", "server", "decided",
                          "limit", "ended", "speed", "history"}
        assert f["verdict"] in ("limited", "passed") and isinstance(f["ended"], bool)
        assert set(f["speed"]) == set(f["limit"]) == {"upload", "download"}
        assert all(isinstance(v, int) for v in f["speed"].values())
        assert all(v is None or isinstance(v, float) for v in f["limit"].values())
        for point in f["history"]:
            assert len(point) == 3 and all(isinstance(v, int) for v in point)


def get(m: Metrics, path: str, query: str = "") -> tuple[str, dict[str, str], bytes]:
    answer: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        answer["status"], answer["headers"] = status, dict(headers)

    from prometheus_client import make_wsgi_app

    body = b"".join(app(m.board, make_wsgi_app(m.registry))({"PATH_INFO": path, "QUERY_STRING": query,
                                                             "REQUEST_METHOD": "GET"}, start_response))
    return answer["status"], answer["headers"], body


def test_api_flows_schema_and_the_policed_speed_against_its_rate_line() -> None:
    e, m, limited, passed = policed_and_passed()
    chunk = limited.client(b"x" * 1400)
    other = passed.client(b"y" * 1400)
    for second in range(1, 11):  # 10 s: 145 kB/s offered to a 16,250 B/s policer, 145 kB/s unlimited
        for i in range(100):
            feed(e, m, [chunk, other], second - 1 + 0.01 * i)
        m.tick(e, held=0, fast=None, now=float(second))
    status, headers, body = get(m, "/api/flows")
    assert status == "200 OK" and headers["Content-Type"] == "application/json"
    data = json.loads(body)
    check_schema(data)
    assert data["scenario"]["name"] == "twitter-2021-03-10" and data["scenario"]["sources"]
    assert data["counts"]["limited"] == 1 and data["counts"]["passed"] == 1 and data["seq"] == 11
    by_name = {f["name"]: f for f in data["flows"]}
    twitter, control = by_name["pbs.twimg.com"], by_name["example.com"]
    assert (twitter["rule"], twitter["verdict"], control["rule"], control["verdict"]) == \
        ("twitter", "limited", "none", "passed")
    assert twitter["limit"] == {"upload": 16250.0, "download": 16250.0}
    assert control["limit"] == {"upload": None, "download": None}
    assert twitter["client"] == "198.18.0.2:40000" and twitter["server"] == "198.18.2.2:443"
    assert 13_000 < twitter["speed"]["upload"] < 20_000  # the policer's 16,250 B/s (IP bytes)
    assert control["speed"]["upload"] > 130_000
    assert len(twitter["history"]) == 11 and [p[0] for p in twitter["history"]] == list(range(1, 12))
    later = json.loads(get(m, "/api/flows", "since=9")[2])
    assert [p[0] for p in later["flows"][0]["history"]] == [10, 11]


def test_kernel_counters_are_the_speed_of_a_flow_the_kernel_carries() -> None:
    """Once the fast path carries a flow, its speed comes from the walker's per-key counters, at
    the walks' times: a walk that falls between two ticks or two walks within one tick change
    nothing (no beat between the walker's second and the tick's)."""
    e, m, limited, passed = policed_and_passed()
    up = map_key(6, bytes([198, 18, 0, 2]), 40001, bytes([198, 18, 2, 2]), 443)
    down = map_key(6, bytes([198, 18, 2, 2]), 443, bytes([198, 18, 0, 2]), 40001)
    m.fast_flow_added(up, "upload")
    m.fast_flow_added(down, "download")
    walks = [(0.1, 1_000_000, 10_000), (1.1, 6_000_000, 60_000), (1.95, 10_250_000, 102_500),
             (2.05, 10_750_000, 107_500), (4.1, 21_000_000, 210_000)]  # 5 MB/s up, 50 kB/s down
    ticks = iter([1.0, 2.0, 3.0, 4.0, 5.0])
    for at, sent, received in walks:
        m.kernel_tick({up: Counters(sent, sent // 1448, 0, 0, 0), down: Counters(received, 100, 0, 0, 0)}, now=at)
        if at in (0.1, 1.1, 2.05, 4.1):
            m.tick(e, held=0, fast=None, now=next(ticks))
    control = {f["name"]: f for f in m.board.snapshot()["flows"]}["example.com"]
    assert [p[1:] for p in control["history"][1:]] == [[0, 0]] + [[5_000_000, 50_000]] * 3
    m.kernel_tick({}, now=5.1)  # the flow left the kernel (it ended, or went idle)
    m.tick(e, held=0, fast=None, now=6.0)
    assert m.board.snapshot(since=m.board.seq - 1)["flows"][-1]["history"] == [[m.board.seq, 0, 0]]


def test_the_board_keeps_the_most_recent_flows_and_lets_ended_ones_go() -> None:
    s = load_scenario(SCENARIO)
    e, board = Engine(s.model, s.rules), Board(cap=3)
    for port in range(5000, 5005):
        e.process(udp("198.18.0.2", "198.18.2.2", port, 9999, b"z" * 100), 0.0)
    flows = sorted(e.flows(), key=lambda f: f.client_port)
    for flow in flows:
        board.decided(flow, 0.0)
    assert [f["client"] for f in board.snapshot()["flows"]] == [f"198.18.0.2:{p}" for p in (5004, 5003, 5002)]
    assert board.snapshot()["counts"]["passed"] == 5
    flows[4].end_reason = "idle"
    for t in range(1, WINDOW + 2):
        board.sample(float(t), {})
    assert [f["client"] for f in board.snapshot()["flows"]] == ["198.18.0.2:5003", "198.18.0.2:5002"]


def test_the_page_and_its_assets_are_served_and_load_nothing_from_elsewhere() -> None:
    m = Metrics()
    for path, (name, kind) in ASSETS.items():
        status, headers, body = get(m, path)
        assert status == "200 OK" and headers["Content-Type"] == kind and body == asset(name)
        assert not re.search(rb"""(src|href)=["']?(https?:)?//""", body), name  # no CDN
        assert b"import " not in body or name != "page.js"
    assert b'id="pause"' in asset("page.html") and b"api/flows?since=" in asset("page.js")
    status, headers, body = get(m, "/metrics")
    assert status.startswith("200") and b"throttle_packets_total" in body


def test_the_photo_page_uploads_to_the_lab_server_and_shows_progress_and_speed() -> None:
    from throttle.lab.server import photo_page

    page = photo_page()
    assert b"<progress" in page and b'xhr.open("POST", "/upload")' in page and b'type="file"' in page
    assert b"upload.onprogress" in page and b'id="speed"' in page
    assert not re.search(rb"""(src|href)=["']?(https?:)?//""", page)
