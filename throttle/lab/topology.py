"""The namespace lab: four network namespaces, a client, an ISP's in-path middlebox (the censor),
a router and a server, and the `Lab` that builds, describes and removes them.

    NAME-client              NAME-censor (a bridge)          NAME-router                  NAME-server
    to-censor 198.18.0.2 --- to-client [bridge inpath] to-server --- to-censor 198.18.0.1
              2001:2:0:1::2                                                2001:2:0:1::1
                                                                 to-server 198.18.1.1 --- to-router 198.18.1.2 (.3, .4)
                                                                           2001:2:0:2::1          2001:2:0:2::2 (::3, ::4)

The censor is in-path and does not route, as the TSPU devices of docs/incidents.md §4.30 are: its
namespace bridges its two ports and has no address, and the bridge hands every IPv4 and IPv6
packet it forwards to netfilter (br_netfilter's `bridge-nf-call-iptables`), where the censor's
NFQUEUE rules see it. It spends no TTL, so a packet from the client whose TTL runs out at the
first hop reaches the censor and then dies at the router, which answers with ICMP time exceeded
(§1.15-16: TTL-limited packets reach the device; that is how fake-packet evasions and locating the
device work). The router forwards between the client's and the server's subnets; the client and
the server route everything through it. Every lab interface has MTU 1500 and GRO/GSO/TSO off, so
the censor sees wire-sized segments, as on a real link. The server namespace runs
`throttle.lab.server` (HTTPS for any name, signed by the lab CA; HTTP), `throttle.lab.h3` (HTTP/3
on UDP 443, the same names and routes) and dnsmasq (every name resolves to 198.18.1.2 and
2001:2:0:2::2). The client namespace resolves names with that dnsmasq and trusts the lab CA through
`/etc/netns/NAME-client/`, which `ip netns exec` mounts over `/etc`, so
`ip netns exec NAME-client curl https://pbs.twimg.com/` just works.

`Lab` is a facade over the parts, each a module of its own: `layout` (the shape above as data),
`network` (namespaces, links, addresses, routes, sysctls, offloads, br_netfilter), `services`
(dnsmasq and the two servers: start, readiness, stop, strays), `client_etc` (the client's /etc
files and CA bundle), `procs` (the /proc scans), `ca` (the certificates), and the router's link
(`layout.Link`: its delay by netem through `network`, or by the delay stage `delay` that
`services` runs when the kernel has no netem; its bottleneck a TBF through `network`). This module keeps
the lab's state directory (`/run/throttle/NAME/`) and re-exports the layout's names, which other
code imports from here. `up()` is idempotent and repairs what is missing; `down()` removes all of
it and succeeds whatever is left, including nothing. `up(link=...)` sets the link (no delay
unless one is asked for); `up()` without one keeps the link lab.json records.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Optional

from throttle import children
from throttle.errors import ThrottleError
from throttle.files import atomic_write
from throttle.kernel.netns import NETNS_DIR
from throttle.kernel.tools import require_root, require_tool
from throttle.lab import procs
from throttle.lab.client_etc import HOSTS_FILE, SYSTEM_CA_BUNDLE, client_etc, remove_etc, write_client_etc
from throttle.lab.layout import (BRIDGE, BRIDGE_PORTS, CENSOR_CLIENT_IF, CENSOR_SERVER_IF, CLIENT_IF, CLIENT_V4,
                                 CLIENT_V6, CONGESTION_CONTROL, DNS_V4, DNS_V6, ETC_NETNS, GATEWAYS, INTERFACES, MTU,
                                 OFFLOADS, ROLES, ROUTER_CLIENT_IF, ROUTER_CLIENT_V4, ROUTER_CLIENT_V6,
                                 ROUTER_SERVER_IF, ROUTER_SERVER_V4, ROUTER_SERVER_V6, SERVER_ADDRESSES,
                                 SERVER_EXTRA_V4, SERVER_EXTRA_V6, SERVER_IF, SERVER_V4, SERVER_V6, STATE_ROOT,
                                 SYSCTLS_ALL, SYSCTLS_BRIDGE, SYSCTLS_ROLE, VETHS, Iface, Link, namespace)
from throttle.lab.network import IFA_F_NODAD, Network
from throttle.lab.layout import PATH_NETEM, PATH_STAGE
from throttle.lab.services import DELAY, DNSMASQ, H3SERVER, LABSERVER, SERVICES, START_TIMEOUT, Services

__all__ = [
    "BRIDGE", "BRIDGE_PORTS", "CENSOR_CLIENT_IF", "CENSOR_SERVER_IF", "CLIENT_IF", "CLIENT_V4", "CLIENT_V6",
    "CONGESTION_CONTROL", "DNS_V4", "DNS_V6", "ETC_NETNS", "GATEWAYS", "HOSTS_FILE", "IFA_F_NODAD", "INTERFACES",
    "MTU", "NETNS_DIR", "OFFLOADS", "PATH_NETEM", "PATH_STAGE", "ROLES", "ROUTER_CLIENT_IF", "ROUTER_CLIENT_V4", "ROUTER_CLIENT_V6",
    "ROUTER_SERVER_IF", "ROUTER_SERVER_V4", "ROUTER_SERVER_V6", "SERVER_ADDRESSES", "SERVER_EXTRA_V4",
    "SERVER_EXTRA_V6", "SERVER_IF", "SERVER_V4", "SERVER_V6", "START_TIMEOUT", "STATE_FILES", "STATE_ROOT",
    "STOP_TIMEOUT", "SYSCTLS_ALL", "SYSCTLS_BRIDGE", "SYSCTLS_ROLE", "SYSTEM_CA_BUNDLE", "VETHS", "Iface", "Lab",
    "LabStatus", "Link", "LinkStatus", "RoleStatus",
]

STATE_FILES = (  # what the lab writes in its state directory, besides certs/
    "ca.pem", "ca-key.pem", "leaf-key.pem", "lab.json", "delay.json",
    *(f"{service.key}.{kind}" for service in SERVICES for kind in ("pid", "log")), "*.tmp", ".*.tmp",
)
STOP_TIMEOUT = 3.0


def _require_live_packages() -> None:
    for module in ("pyroute2", "aioquic"):  # aioquic: the lab's HTTP/3 server
        if importlib.util.find_spec(module) is None:
            raise ThrottleError(f"the Python package {module} is missing: .venv/bin/pip install {module} "
                                "(both come with the [live] extra; scripts/setup installs them)")


class Lab:
    """Four namespaces and what runs in them; see the module docstring for the layout."""

    def __init__(self, name: str = "throttle", state_dir: Optional[Path] = None) -> None:
        if not name or len(name) > 24 or not all(c.isalnum() or c in "-_" for c in name):
            raise ThrottleError(f"lab name {name!r}: use up to 24 letters, digits, - or _")
        self.name = name
        self.state_dir = Path(state_dir) if state_dir is not None else STATE_ROOT / name
        self._network = Network(name)

    @property
    def _services(self) -> Services:
        return Services(self.name, self.state_dir)  # made on use: state_dir is a plain attribute

    def ns(self, role: str) -> str:
        """The namespace name of a role: `ns("client")` is "NAME-client"."""
        return namespace(self.name, role)

    def exec_argv(self, role: str, argv: list[str]) -> list[str]:
        """`argv` run inside a role's namespace (with its /etc/netns files), as an argument list."""
        return [require_tool("ip", "iproute2"), "netns", "exec", self.ns(role), *argv]

    @property
    def ca_cert(self) -> Path:
        return self.state_dir / "ca.pem"

    def __enter__(self) -> Lab:
        try:
            self.up()
        except BaseException:
            try:
                self.down()
            except ThrottleError:
                pass  # the error from up() is the one worth reporting
            raise
        return self

    def __exit__(self, t: Optional[type[BaseException]], e: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.down()

    def up(self, hostnames: Iterable[str] = (), link: Optional[Link] = None) -> LabStatus:
        """Create or repair the lab; returns `status()`. Hostnames get certificates at start.
        `link`: the router's delay and bottleneck (None: keep the link the lab has)."""
        require_root("the lab needs root")
        _require_live_packages()
        from throttle.lab.ca import ensure_ca  # cryptography: only where certificates are made
        ip = require_tool("ip", "iproute2")
        ethtool = require_tool("ethtool", "ethtool")
        dnsmasq = require_tool("dnsmasq", "dnsmasq-base")
        hostnames = [h for h in hostnames if h]

        STATE_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self._network.build(ip, ethtool)
        ca_before = self._read_ca()
        ensure_ca(self.state_dir, self.name)
        write_client_etc(self.name, self.ca_cert)
        # A new CA (the old one was lost) restarts the servers, which sign with it.
        self._services.start(ip, dnsmasq, hostnames, restart=self._read_ca() != ca_before)
        link = self._read_json().link if link is None else link
        path = self._network.shape(ip, require_tool("tc", "iproute2"), link)
        if path == PATH_STAGE:
            self._services.start_delay(ip, link.one_way, link.jitter)
        else:
            self._services.stop_delay()
        atomic_write(self.state_dir / "lab.json", json.dumps({"name": self.name, "hostnames": hostnames,
                                                              "link": link.to_json(), "link_path": path}).encode(), 0o600)
        return self.status()

    def _read_json(self) -> LinkStatus:
        """What lab.json records: the link and the path that delays it (none for a lab without)."""
        try:
            data = json.loads((self.state_dir / "lab.json").read_text())
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        path = data.get("link_path", "")
        return LinkStatus(Link.from_json(data.get("link")), path if isinstance(path, str) else "",
                          tuple(str(h) for h in data.get("hostnames", []) if isinstance(h, str)))

    def _read_ca(self) -> Optional[bytes]:
        try:
            return self.ca_cert.read_bytes()
        except OSError:
            return None

    def down(self) -> None:
        """Remove everything the lab made. No error when parts, or all of it, are already gone."""
        require_root("the lab needs root")
        pids = {p for pids in self._in_namespaces().values() for p in pids} | self._services.orphans()
        pids -= {os.getpid(), 1}
        children.stop(pids, STOP_TIMEOUT)
        self._network.remove()
        remove_etc(self.name)
        self._remove_state()

    def _in_namespaces(self) -> dict[str, list[int]]:
        """Every process whose network namespace is one of the lab's, by role."""
        return procs.pids_in({role: self.ns(role) for role in ROLES})

    def _remove_state(self) -> None:
        """Delete the files the lab writes, then the directory if that leaves it empty: a state
        directory given by the caller may hold other things, and those are not ours to delete."""
        d = self.state_dir
        for sub, patterns in (("certs", ("*.pem", "*.tmp")), ("", STATE_FILES)):
            where = d / sub if sub else d
            for pattern in patterns:
                for path in where.glob(pattern):
                    if path.is_file() or path.is_symlink():
                        path.unlink(missing_ok=True)
            try:
                where.rmdir()
            except OSError:
                pass  # missing, or not empty

    def status(self) -> LabStatus:
        require_root("the lab needs root")
        labserver = self._services.running(LABSERVER)
        h3server = self._services.running(H3SERVER)
        dnsmasq = self._services.running(DNSMASQ)
        recorded = self._read_json()
        stage = self._services.running(DELAY)
        link = LinkStatus(recorded.link, recorded.path, (), stage, self._stage_counts() if stage else {})
        roles = {role: _role_status(self.ns(role), role, self._network.exists(role)) for role in ROLES}
        return LabStatus(
            name=self.name,
            up=(all(r.exists for r in roles.values()) and labserver is not None and h3server is not None
                and dnsmasq is not None and (link.path != PATH_STAGE or stage is not None)),
            roles=roles,
            dns=DNS_V4,
            dns6=DNS_V6,
            ca=str(self.ca_cert) if self.ca_cert.exists() else None,
            state_dir=str(self.state_dir),
            etc=str(client_etc(self.name)),
            hostnames=recorded.hostnames,
            labserver=labserver,
            dnsmasq=dnsmasq,
            in_namespaces=self._in_namespaces(),
            h3server=h3server,
            link=link,
        )

    def _stage_counts(self) -> dict[str, Any]:
        """The delay stage's last status file (its counts: module docstring of lab.delay)."""
        try:
            data = json.loads(self._services.delay_status_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


@dataclass(frozen=True, slots=True)
class RoleStatus:
    """One namespace of the lab: whether it exists, its interfaces and addresses."""

    namespace: str
    exists: bool
    interfaces: tuple[str, ...]
    ipv4: str  # the address a peer uses
    ipv6: str
    ipv4_all: tuple[str, ...]
    ipv6_all: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LinkStatus:
    """The router's link as recorded, the path that delays it ("netem", "throttle delay stage", or
    "" when undelayed), and the delay stage's pid and counts when it runs."""

    link: Link = Link()
    path: str = ""
    hostnames: tuple[str, ...] = ()  # (what lab.json records besides)
    stage: int | None = None
    counts: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self.link.to_json(), "path": self.path, "stage_pid": self.stage, "stage": self.counts or {}}


@dataclass(frozen=True, slots=True)
class LabStatus:
    name: str
    up: bool  # every namespace exists and the servers (web, HTTP/3, DNS) run
    roles: dict[str, RoleStatus]
    dns: str
    dns6: str
    ca: str | None  # the CA certificate's path, once made
    state_dir: str
    etc: str  # the client's /etc/netns folder (resolv.conf, the CA bundle)
    hostnames: tuple[str, ...]
    labserver: int | None  # pids, when running
    dnsmasq: int | None
    in_namespaces: dict[str, list[int]]  # every process in each namespace, by role
    h3server: int | None = None  # the HTTP/3 server's pid, when running
    link: LinkStatus = LinkStatus()

    def to_json(self) -> dict[str, Any]:
        """The shape `throttle lab status --json` prints."""
        return {
            "name": self.name,
            "up": self.up,
            "namespaces": {role: {"name": r.namespace, "exists": r.exists} for role, r in self.roles.items()},
            "interfaces": {role: list(r.interfaces) for role, r in self.roles.items()},
            "addresses": {role: {"ipv4": r.ipv4, "ipv6": r.ipv6, "ipv4_all": list(r.ipv4_all),
                                 "ipv6_all": list(r.ipv6_all)} for role, r in self.roles.items()},
            "dns": self.dns,
            "dns6": self.dns6,
            "ca": self.ca,
            "state_dir": self.state_dir,
            "etc": self.etc,
            "hostnames": list(self.hostnames),
            "processes": {"labserver": self.labserver, "h3server": self.h3server, "dnsmasq": self.dnsmasq,
                          "delay": self.link.stage, "in_namespaces": self.in_namespaces},
            "link": self.link.to_json(),
        }


def _role_status(namespace: str, role: str, exists: bool) -> RoleStatus:
    specs = [a.split("/")[0] for i in INTERFACES if i.role == role for a in i.addresses]
    v4 = tuple(a for a in specs if ipaddress.ip_address(a).version == 4)
    v6 = tuple(a for a in specs if ipaddress.ip_address(a).version == 6)
    return RoleStatus(namespace, exists, tuple(i.name for i in INTERFACES if i.role == role),
                      v4[0] if v4 else "", v6[0] if v6 else "", v4, v6)
