"""The lab's shape as data: its four roles, their interfaces and addresses, the veth pairs, the
censor's bridge, the gateways, the sysctls and offloads each namespace gets, the router's link
(`Link`: delay, jitter, bottleneck), and where the lab keeps its files. No I/O: `lab.network`
builds this in the kernel, `lab.topology` describes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from throttle.scenario.model import Scenario

ROLES = ("client", "censor", "router", "server")
ETC_NETNS = Path("/etc/netns")
STATE_ROOT = Path("/run/throttle")
MTU = 1500

# Interface names as seen inside each namespace.
CLIENT_IF = "to-censor"
CENSOR_CLIENT_IF = "to-client"  # the censor's two bridge ports
CENSOR_SERVER_IF = "to-server"  # (towards the server, through the router)
BRIDGE = "inpath"
ROUTER_CLIENT_IF = "to-censor"
ROUTER_SERVER_IF = "to-server"
SERVER_IF = "to-router"

CLIENT_V4 = "198.18.0.2"
CLIENT_V6 = "2001:2:0:1::2"
ROUTER_CLIENT_V4 = "198.18.0.1"  # the client's gateway
ROUTER_CLIENT_V6 = "2001:2:0:1::1"
ROUTER_SERVER_V4 = "198.18.1.1"  # the server's gateway
ROUTER_SERVER_V6 = "2001:2:0:2::1"
SERVER_V4 = "198.18.1.2"
SERVER_V6 = "2001:2:0:2::2"
SERVER_EXTRA_V4 = ("198.18.1.3", "198.18.1.4")  # other servers, for names sent elsewhere
SERVER_EXTRA_V6 = ("2001:2:0:2::3", "2001:2:0:2::4")
SERVER_ADDRESSES = (SERVER_V4, *SERVER_EXTRA_V4, SERVER_V6, *SERVER_EXTRA_V6)  # what the servers listen on
DNS_V4 = SERVER_V4
DNS_V6 = SERVER_V6


@dataclass(frozen=True, slots=True)
class Iface:
    role: str
    name: str
    addresses: tuple[str, ...]  # "address/prefixlen"


INTERFACES = (
    Iface("client", CLIENT_IF, (f"{CLIENT_V4}/24", f"{CLIENT_V6}/64")),
    Iface("censor", CENSOR_CLIENT_IF, ()),  # bridge ports: no addresses
    Iface("censor", CENSOR_SERVER_IF, ()),
    Iface("router", ROUTER_CLIENT_IF, (f"{ROUTER_CLIENT_V4}/24", f"{ROUTER_CLIENT_V6}/64")),
    Iface("router", ROUTER_SERVER_IF, (f"{ROUTER_SERVER_V4}/24", f"{ROUTER_SERVER_V6}/64")),
    Iface(
        "server", SERVER_IF,
        tuple(f"{a}/24" for a in (SERVER_V4, *SERVER_EXTRA_V4))
        + tuple(f"{a}/64" for a in (SERVER_V6, *SERVER_EXTRA_V6)),
    ),
)
# Veth pairs, (role, interface) at each end; the first end's namespace creates the pair.
VETHS = (
    (("censor", CENSOR_CLIENT_IF), ("client", CLIENT_IF)),
    (("censor", CENSOR_SERVER_IF), ("router", ROUTER_CLIENT_IF)),
    (("router", ROUTER_SERVER_IF), ("server", SERVER_IF)),
)
BRIDGE_PORTS = (CENSOR_CLIENT_IF, CENSOR_SERVER_IF)
GATEWAYS = {
    "client": (ROUTER_CLIENT_V4, ROUTER_CLIENT_V6),
    "server": (ROUTER_SERVER_V4, ROUTER_SERVER_V6),
}
SYSCTLS_ALL = (
    # No DAD (addresses usable at once), no router advertisements or solicitations on the wire.
    ("net.ipv6.conf.all.accept_dad", "0"),
    ("net.ipv6.conf.default.accept_dad", "0"),
    ("net.ipv6.conf.all.accept_ra", "0"),
    ("net.ipv6.conf.default.accept_ra", "0"),
    ("net.ipv6.conf.default.router_solicitations", "0"),
)
# The lab's TCP is pinned, not inherited from the host: a namespace starts with the host's default
# congestion control (bbr on some machines), and BBR's model of the path misreads a policer (it
# paces a policed flow at the bandwidth it sampled during drops, often far below the rate), so the
# same scenario would measure differently on two machines. CUBIC is Linux's default and what the
# clients of the 2021 measurements ran; set on the client's and server's default routes, when this
# kernel has it.
CONGESTION_CONTROL = "cubic"
SYSCTLS_ROLE = {
    "router": (("net.ipv4.ip_forward", "1"), ("net.ipv6.conf.all.forwarding", "1")),
    # The censor has no IP of its own: no IPv6 link-local addresses, no forwarding; the bridge's
    # packets go through iptables and ip6tables (written once the bridge exists, see lab.network).
    "censor": (("net.ipv4.ip_forward", "0"), ("net.ipv6.conf.all.disable_ipv6", "1"),
               ("net.ipv6.conf.default.disable_ipv6", "1")),
}
SYSCTLS_BRIDGE = (
    ("net.bridge.bridge-nf-call-iptables", "1"),
    ("net.bridge.bridge-nf-call-ip6tables", "1"),
    ("net.bridge.bridge-nf-call-arptables", "0"),
)
OFFLOADS = ("gro", "gso", "tso")


def namespace(lab: str, role: str) -> str:
    """The namespace name of a role: `namespace("NAME", "client")` is "NAME-client"."""
    if role not in ROLES:
        raise ValueError(f"{role!r} is not one of {', '.join(ROLES)}")
    return f"{lab}-{role}"


# The router's link (docs: README "Link delay"). The delay sits on the router, off the censor's
# path, half of the round trip on each direction's way out: the client's packets are delayed as
# they leave towards the server and the server's as they leave towards the client, so a ping, a
# SYN's answer, and every ACK clock see the whole RTT, and each direction's data and ACKs queue
# as on a long path. The bottleneck is a TBF on the same two ports, one per direction.
ROUTER_PORTS = (ROUTER_SERVER_IF, ROUTER_CLIENT_IF)
DELAY_QUEUE = 7  # the delay stage's netfilter queue in the router namespace (queues are per namespace)
DELAY_CHAIN = "THROTTLE_DELAY"  # its iptables chain there (mangle table, jumped to from FORWARD)
BOTTLENECK_BUFFER = 0.05  # seconds of queue at the bottleneck's rate, then tail drops
MAX_RTT = 10.0  # seconds: past this a "delay" is a typo (ms forgotten)
MIN_BOTTLENECK = 1000.0  # bytes/s (8 kbit/s): below a packet a second or so, TBF cannot shape
MAX_BOTTLENECK = 10e9 / 8  # bytes/s (10 Gbit/s): faster than the lab's veths carry
PATH_NETEM = "netem"
PATH_STAGE = "throttle delay stage"


@dataclass(frozen=True, slots=True)
class Link:
    """What the router does to every packet it forwards: `rtt` seconds of round trip added (half
    each way), each one-way delay varied uniformly by +-`jitter`/2 (so a round trip takes rtt +-
    jitter), and a `bottleneck` of that many bytes/s each way (0: none)."""

    rtt: float = 0.0
    jitter: float = 0.0
    bottleneck: float = 0.0

    def __post_init__(self) -> None:
        problem = link_problem(self.rtt, self.jitter, self.bottleneck)
        if problem is not None:
            raise ValueError(problem)

    @property
    def one_way(self) -> float:
        return self.rtt / 2

    @property
    def delayed(self) -> bool:
        return self.rtt > 0

    def to_json(self) -> dict[str, Any]:
        return {"rtt": self.rtt, "jitter": self.jitter, "bottleneck": self.bottleneck}

    @classmethod
    def of(cls, scenario: Scenario) -> Link:
        """The link a scenario asks for (its top-level rtt, jitter and bottleneck; validated on load)."""
        return cls(scenario.rtt, scenario.jitter, scenario.bottleneck)

    @classmethod
    def from_json(cls, data: Any) -> Link:
        """The link a lab.json holds; no link when it holds none or nonsense (a lab of an older version)."""
        try:
            return cls(float(data["rtt"]), float(data["jitter"]), float(data["bottleneck"]))
        except (TypeError, KeyError, ValueError):
            return cls()


def link_problem(rtt: float, jitter: float, bottleneck: float) -> str | None:
    """What is wrong with a link's values, or None. Also the scenario loader's rules (it cannot
    import the lab): jitter within the delay (a packet is never sent before it arrived), limits."""
    if not 0 <= rtt <= MAX_RTT:
        return f"an RTT of {rtt:g} s is outside 0-{MAX_RTT:g} s; write e.g. 50ms"
    if jitter < 0 or jitter > rtt:
        return (f"a jitter of {jitter * 1e3:g} ms needs an RTT of at least as much (each packet's delay varies "
                f"by half the jitter around half the RTT); write e.g. rtt = 50ms, jitter = 2ms")
    if bottleneck and not MIN_BOTTLENECK <= bottleneck <= MAX_BOTTLENECK:
        return f"a bottleneck of {bottleneck * 8:g} bit/s is outside 8kbit-10gbit; write e.g. 5mbit"
    return None
