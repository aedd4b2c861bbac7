"""`python -m throttle.lab.evasion`: one transfer through the censor with a disguised ClientHello.

Exit codes: 0 when the transfer ran, whatever its outcome (a timeout is a measurement: see `ok`
and `error` in the output), 2 for bad arguments, 130 when interrupted. With --json, stdout has a
`{"event":"progress",...}` line about every 0.5 s and one `{"event":"done",...}` line at the end
(`throttle.lab.lines`, which the runner reads them with).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Optional

from throttle.errors import ThrottleError
from throttle.lab.evasion.client import run
from throttle.lab.evasion.plans import EVASIONS, plan
from throttle.lab.lines import emit, event_line, port_range_argument, progress_event
from throttle.units import format_rate, parse_duration, parse_size

DEFAULT_SNI = "pbs.twimg.com"


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 or IPv6 address") from None


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return int(text)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the timeout must be more than 0 s")
    return value



def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m throttle.lab.evasion",
                                description="Send a disguised TLS ClientHello and junk to the lab's sink; measure the goodput.")
    p.add_argument("--address", type=_address, required=True, help="the sink's IP address (e.g. 198.18.1.2)")
    p.add_argument("--port", type=_port, default=8443, help="the sink's port (default 8443)")
    p.add_argument("--size", type=_size, required=True, help="bytes of junk after the hello (e.g. 160KB, 163840)")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--sni", default=DEFAULT_SNI, help=f"the server name in the hello (default {DEFAULT_SNI})")
    names.add_argument("--no-sni", action="store_true", help="send the hello without a server name")
    p.add_argument("--evasion", choices=EVASIONS, default="none", help="how to disguise the hello (default none)")
    p.add_argument("--ech", action="store_true", help="add an encrypted_client_hello extension to the hello")
    p.add_argument("--timeout", type=_seconds, default=60.0, help="give up after this long (default 60 s)")
    p.add_argument("--local-port", type=port_range_argument, default=None, metavar="LO-HI",
                   help="take the client's TCP port from this range (as curl's --local-port)")
    p.add_argument("--json", action="store_true", help="JSON lines: progress about every 0.5 s, then the result")
    args = p.parse_args(argv)
    sni = None if args.no_sni else args.sni
    try:
        segments = plan(args.evasion, sni, ech=args.ech)
    except ThrottleError as exc:
        p.error(str(exc))  # exits 2
    progress = (lambda n, t: emit(event_line(progress_event(n, t)), sys.stdout)) if args.json else None
    try:
        result = run(args.address, args.port, segments, args.size, timeout=args.timeout, progress=progress,
                     local_ports=args.local_port)
    except KeyboardInterrupt:
        return 130
    if args.json:
        emit(event_line(result.as_json()), sys.stdout)
    elif result.ok:
        rate = format_rate(result.bytes / result.seconds) if result.seconds > 0 else "-"
        emit(f"{args.evasion} ({sni or 'no SNI'}): {result.bytes} bytes in {result.seconds:.3f} s, {rate}; "
             f"hello {result.hello_bytes} bytes in {result.segments_planned} segments", sys.stdout)
    else:
        emit(f"{args.evasion} ({sni or 'no SNI'}): failed after {result.seconds:.3f} s: {result.error}", sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
