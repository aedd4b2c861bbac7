"""The raw TLS evasion client: a real ClientHello disguised by one of the 2021 tricks, then junk.

`plan(evasion, sni)` returns the segments a trick writes (pure, testable offline against the
engine); `run(address, port, segments, size)` sends them and `size` bytes of junk to the lab
server's raw sink (TCP 8443) and measures the goodput. The tricks are docs/incidents.md §7:

    none      the hello in one segment (the control: the device sees it)
    split     the hello cut inside the server name into two TCP segments
    pad       a hello over 1,600 bytes, which the kernel must cut at the MSS
    scramble  101-200 random, non-TLS bytes first, then the hello
    ccs       a ChangeCipherSpec record and the hello in one segment
    dot       the SNI with a trailing dot (pbs.twimg.com.)
    fake      a hello for example.org first, then the real one (does NOT evade)

    python -m throttle.lab.evasion --address IP [--port 8443] --size BYTES [--sni NAME | --no-sni]
                               --evasion TRICK [--timeout S] [--local-port LO-HI] [--json]
"""

from __future__ import annotations

from throttle.lab.evasion.client import Result, run
from throttle.lab.evasion.plans import (
           EVASIONS,
           FAKE_SNI,
           Segment,
           client_hello,
           plan,
           replace_sni,
           segment_count,
           sni_span,
)

__all__ = ["EVASIONS", "FAKE_SNI", "Result", "Segment", "client_hello", "plan", "replace_sni", "run",
           "segment_count", "sni_span"]
