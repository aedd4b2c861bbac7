"""The firewall rules that send undecided and limited flows to the censor's queue.

Rules live in one chain of our own per address family (`THROTTLE_Q<n>` in the mangle table),
jumped to from FORWARD, and are created inside a context manager that always removes them. On a
router the jumps name the two interfaces (`-i`/`-o`); on a bridge (the lab's in-path censor) the
two ports, with physdev, since br_netfilter hands bridged packets to FORWARD.

    -p tcp --syn -j CONNMARK (clear BIT)      a new connection is never a decided one
    -m mark --mark BIT/BIT -j CONNMARK ...    the engine passed it and handed its flow over (verdict
    -m mark --mark BIT/BIT -j RETURN          REPEAT with the mark): remember that on the conntrack entry
    -m connmark --mark BIT/BIT                a decided flow: the kernel forwards it, no Python;
       -m conntrack --ctdir ORIGINAL -j RETURN    one rule per conntrack direction (the opener's
    -m connmark --mark BIT/BIT -j RETURN          is upload), so their counters count each
    -p tcp -j NFQUEUE --queue-bypass          everything else goes to Python; with no process
    -p udp -j NFQUEUE --queue-bypass          bound to the queue, the kernel passes it (fail-open)

BIT is not one fixed bit but this censor's own value in MARK_MASK (`fresh_mark`): conntrack entries
outlive the censor that marked them (UDP's for up to two minutes after their last packet, TCP's for
days), and a later censor in the same namespace must not take an earlier one's decisions for its
own. With one fixed bit, a QUIC flow passed by one run let the same 5-tuple through the next run's
censor unseen, whatever that scenario said of its name; a SYN clears the mark, but UDP has none.

The two conntrack-mark rules are a path of their own for packets (passed flows the eBPF program
does not carry, or not yet): `connmark_counters` reads their kernel counters, so that every packet
is counted once (`throttle.measure.exporter`, stage connmark). The packets the engine judged come
back through this chain (REPEAT) and are counted by the engine already, so the mark rules come
before the conntrack-mark ones: the packets of a TCP flow queued behind the one that decided it
(the rest of its first flight) come back after that one marked the conntrack entry, and were
counted twice when the conntrack-mark rules came first (9 of a 4 MB upload's 2,900 packets).

Commands are argument lists run with `-w` (wait for the xtables lock), never shell strings.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from throttle.children import Captured, capture
from throttle.errors import ThrottleError
from throttle.kernel.tools import find_tool, require_tool

MARK_MASK = 0x7F800000  # the packet and conntrack mark bits the censor owns: 8 bits, 23-30
TABLE = "mangle"


def fresh_mark(now: float | None = None) -> int:
    """A censor's own decided-flow mark in MARK_MASK: from the clock's seconds, so censors started
    one after the other (within 255 s) in a namespace never share one; never 0 (no decision)."""
    seconds = int(time.time() if now is None else now)
    return (1 + seconds % 255) << 23


@dataclass(frozen=True)
class Firewall:
    queue: int = 0
    mark: int = field(default_factory=fresh_mark)  # this censor's value in MARK_MASK
    hook_chain: str = "FORWARD"
    # One jump into our chain per entry, each with its extra matches. In the lab: one jump for
    # everything the censor namespace forwards. In gateway mode: only packets between the two
    # named interfaces, in both directions, so nothing else on the router is touched.
    jumps: tuple[tuple[str, ...], ...] = ((),)

    @classmethod
    def gateway(cls, inside: str, outside: str, queue: int = 0) -> Firewall:
        return cls(queue=queue, jumps=(("-i", inside, "-o", outside), ("-i", outside, "-o", inside)))

    @classmethod
    def bridge(cls, inside: str, outside: str, queue: int = 0) -> Firewall:
        """Gateway mode on two ports of a bridge (an in-path device that does not route): bridged
        packets reach FORWARD through br_netfilter with the bridge as their interface, so the
        ports are matched with physdev, by the port a packet came in on."""
        return cls(queue=queue, jumps=tuple(("-m", "physdev", "--physdev-is-bridged", "--physdev-in", port)
                                            for port in (inside, outside)))

    @property
    def chain(self) -> str:
        return f"THROTTLE_Q{self.queue}"

    def connmark_rules(self) -> tuple[list[str], list[str]]:
        """The rules that forward decided flows (conntrack mark set): upload (the conntrack entry's
        original direction, the opener's), then download."""
        m = f"{self.mark:#x}/{MARK_MASK:#x}"
        return (["-m", "connmark", "--mark", m, "-m", "conntrack", "--ctdir", "ORIGINAL", "-j", "RETURN"],
                ["-m", "connmark", "--mark", m, "-j", "RETURN"])

    def rules(self) -> list[list[str]]:
        m = f"{self.mark:#x}/{MARK_MASK:#x}"
        q = ["-j", "NFQUEUE", "--queue-num", str(self.queue), "--queue-bypass"]
        return [
            # A new connection forgets the decision of an old one with the same 5-tuple (whose
            # end the censor may never have seen, its packets having bypassed it).
            ["-p", "tcp", "--syn", "-j", "CONNMARK", "--set-xmark", f"0x0/{MARK_MASK:#x}"],
            # Before the conntrack-mark rules, whose counters count only packets never queued.
            ["-m", "mark", "--mark", m, "-j", "CONNMARK", "--save-mark", "--nfmask", hex(MARK_MASK),
             "--ctmask", hex(MARK_MASK)],
            ["-m", "mark", "--mark", m, "-j", "RETURN"],
            *self.connmark_rules(),
            ["-p", "tcp", *q],
            ["-p", "udp", *q],
        ]


def _tool(name: str) -> str:
    return require_tool(name, "iptables", " (or run scripts/setup)")


def _run(argv: Sequence[str], check: bool = True) -> Captured:
    result = capture(argv, argv[0])
    if check and result.code != 0:
        err = result.err.strip().splitlines()[-1] if result.err.strip() else f"exit {result.code}"
        if "NFQUEUE" in " ".join(argv) and ("No chain/target/match" in err or "Protocol not supported" in err):
            raise ThrottleError("the kernel has no NFQUEUE support (xt_NFQUEUE / nfnetlink_queue): load it with modprobe nfnetlink_queue xt_NFQUEUE")
        raise ThrottleError(f"{' '.join(argv)}: {err}")
    return result


def _remove(tool: str, fw: Firewall) -> None:
    _remove_chain(tool, fw.hook_chain, fw.chain)


def _remove_chain(tool: str, hook_chain: str, chain: str) -> None:
    """Delete every jump into `chain` (whatever its matches, so a killed censor's rules go too),
    then the chain itself."""
    base = [tool, "-w", "-t", TABLE]
    listing = _run([*base, "-S", hook_chain], check=False).out
    for line in listing.splitlines():
        words = shlex.split(line)
        if words[:2] == ["-A", hook_chain] and words[-2:] == ["-j", chain]:
            _run([*base, "-D", *words[1:]], check=False)
    _run([*base, "-F", chain], check=False)
    _run([*base, "-X", chain], check=False)


def cleanup() -> list[str]:
    """Remove every throttle queue chain (and the jumps into it) in the current namespace, for
    both address families; returns what was removed. `throttle cleanup` runs it (the systemd
    unit's `ExecStopPost=`, after a crash)."""
    removed = []
    for name in ("iptables", "ip6tables"):
        path = find_tool(name)
        if path is None:
            continue
        listing = _run([path, "-w", "-t", TABLE, "-S"], check=False).out
        chains = sorted({w for line in listing.splitlines() for w in line.split()[1:2]
                         if line.startswith("-N ") and w.startswith("THROTTLE_Q")})
        for chain in chains:
            _remove_chain(path, "FORWARD", chain)
            removed.append(f"{name} {TABLE} {chain}")
    return removed


def connmark_counters(fw: Firewall) -> dict[str, tuple[int, int]]:
    """The kernel's counters of `fw`'s conntrack-mark rules, IPv4 and IPv6 together: cumulative
    (packets, bytes) per direction, "upload" and "download". Runs iptables: call it off the packet
    loop. A family whose chain cannot be read adds nothing (the chain is gone, or not made yet)."""
    upload, download = (" ".join(rule) for rule in fw.connmark_rules())
    totals = {"upload": (0, 0), "download": (0, 0)}
    for name in ("iptables", "ip6tables"):
        path = find_tool(name)
        if path is None:
            continue
        listing = _run([path, "-w", "-t", TABLE, "-S", fw.chain, "-v"], check=False).out
        for line in listing.splitlines():
            words = line.split()
            if words[:2] != ["-A", fw.chain] or "-c" not in words:
                continue
            at = words.index("-c")
            rule = " ".join(words[2:at] + words[at + 3:])
            direction = "upload" if rule == upload else "download" if rule == download else None
            if direction is not None:
                packets, size = totals[direction]
                totals[direction] = (packets + int(words[at + 1]), size + int(words[at + 2]))
    return totals


@contextmanager
def installed(fw: Firewall) -> Iterator[Firewall]:
    """Install the queue rules for IPv4 and IPv6 in the current namespace; always remove them."""
    tools = [_tool("iptables"), _tool("ip6tables")]
    for tool in tools:  # rules left by a censor that was killed: start clean
        _remove(tool, fw)
    try:
        for tool in tools:
            base = [tool, "-w", "-t", TABLE]
            _run([*base, "-N", fw.chain])
            for rule in fw.rules():
                _run([*base, "-A", fw.chain, *rule])
            for match in fw.jumps:
                _run([*base, "-I", fw.hook_chain, "1", *match, "-j", fw.chain])
        yield fw
    finally:
        for tool in tools:
            _remove(tool, fw)

