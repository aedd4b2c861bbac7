"""Load for a running censor, as a program run in a lab's namespaces (test_signal.py's).

    censor_load.py sink PORT            (server namespace) TCP and UDP on PORT, read and dropped
    censor_load.py churn PORT SECONDS [FLOWS]   (client namespace) until SECONDS pass or it is killed:
    censor_load.py flood PORT SECONDS   (client namespace) new UDP flows back to back, 20 datagrams
                                        each, as fast as one process sends: more than the censor reads

rounds of FLOWS (default 20) short TCP connections, each a real ClientHello (names in turn: a shaped name, a policed name, an
unlimited one) and some payload, at most OPEN at once, the oldest closed first (so flows end and
their HTB classes go); and UDP bursts, each from a new socket (a new flow), BURST datagrams at line
rate. Every flow is new to the censor: its queue, the hand-over's netlink worker (an HTB class per
shaped flow, made and removed) and the walker (a map of a few thousand directions) all stay busy.
Churn: it prints "ready" once it started (flood too), and what it did when it ends.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import time

from throttle.lab.evasion.plans import client_hello
from throttle.lab.topology import SERVER_V4

NAMES = ("pbs.twimg.com", "upload.twitter.com", "example.org")  # shaped, policed, unlimited (LOAD_SCENARIO)
OPEN = 300  # TCP connections open at once
BURST = 100  # datagrams per UDP burst
PAYLOAD = 16384  # bytes sent after each ClientHello


def sink(port: int) -> int:
    sel = selectors.DefaultSelector()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((SERVER_V4, port))
    tcp.listen(4096)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((SERVER_V4, port))
    udp.setblocking(False)
    sel.register(tcp, selectors.EVENT_READ, "accept")
    sel.register(udp, selectors.EVENT_READ, "udp")
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                if key.data == "accept":
                    conn, _ = tcp.accept()
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "conn")
                elif key.data == "udp":
                    while True:
                        udp.recv(65536)
                elif not sock.recv(65536):
                    sel.unregister(sock)
                    sock.close()
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                if key.data == "conn":
                    sel.unregister(sock)
                    sock.close()


def churn(port: int, seconds: float, per_round: int = 20) -> int:
    hellos = [client_hello(name) for name in NAMES]
    payload = os.urandom(PAYLOAD)
    datagram = os.urandom(1200)
    opened: list[socket.socket] = []
    flows = bursts = 0
    deadline = time.monotonic() + seconds
    print("ready", flush=True)
    while time.monotonic() < deadline:
        for _ in range(per_round):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(0.5)
            try:
                s.connect((SERVER_V4, port))
                s.setblocking(False)
                s.send(hellos[flows % len(hellos)])
                s.send(payload)
            except OSError:
                pass  # the send buffer full (a limited flow), or the connection refused: the load goes on
            opened.append(s)
            flows += 1
        while len(opened) > OPEN:
            opened.pop(0).close()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(BURST):
            try:
                u.sendto(datagram, (SERVER_V4, port))
            except OSError:
                break
        u.close()
        bursts += 1
        time.sleep(0.01)
    print(json.dumps({"tcp_flows": flows, "udp_bursts": bursts}), flush=True)
    return 0


def flood(port: int, seconds: float) -> int:
    """New UDP flows back to back, as fast as this process sends, for SECONDS."""
    datagram = os.urandom(200)
    sent = 0
    deadline = time.monotonic() + seconds
    print("ready", flush=True)
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            for _ in range(20):
                try:
                    u.sendto(datagram, (SERVER_V4, port))
                    sent += 1
                except OSError:
                    break
    print(json.dumps({"datagrams": sent}), flush=True)
    return 0


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "flood":
        sys.exit(flood(int(sys.argv[2]), float(sys.argv[3])))
    if role == "sink":
        sys.exit(sink(int(sys.argv[2])))
    sys.exit(churn(int(sys.argv[2]), float(sys.argv[3]), *(int(n) for n in sys.argv[4:5])))
