"""The lab's kernel network state: its four namespaces, the veth pairs between them, the censor's
bridge (and br_netfilter, which hands the bridge's packets to iptables), addresses, default routes
(with the pinned congestion control), sysctls, MTU and offloads; and the router's link: netem
(delay, jitter) where the kernel has it, the TBF bottleneck.

Netlink through pyroute2; `ethtool -K`, `tc` (the link's qdiscs) and `modprobe br_netfilter` (when the
kernel has it as a module) are the only commands, run through `throttle.children`. `build` is idempotent and repairs
what is missing; `remove` deletes the namespaces (and with them every link) and succeeds whatever
is left, including nothing.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from throttle import children
from throttle.children import capture
from throttle.errors import ThrottleError
from throttle.kernel import netns
from throttle.kernel.netns import NETNS_DIR
from throttle.kernel.tools import find_tool
from throttle.lab.layout import (BOTTLENECK_BUFFER, BRIDGE, BRIDGE_PORTS, CONGESTION_CONTROL, GATEWAYS, INTERFACES,
                                 MTU, OFFLOADS, PATH_NETEM, PATH_STAGE, ROLES, ROUTER_PORTS, SYSCTLS_ALL,
                                 SYSCTLS_BRIDGE, SYSCTLS_ROLE, VETHS, Link, namespace)

IFA_F_NODAD = 0x02  # an IPv6 address usable at once, without duplicate address detection
LINKS_TIMEOUT = 15.0
BR_NETFILTER = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
BR_NETFILTER_MISSING = (
    "this kernel does not hand bridged packets to netfilter (no br_netfilter), so the lab's in-path "
    "censor would see nothing: load it with `modprobe br_netfilter` (CONFIG_BRIDGE_NETFILTER)")


class Network:
    """The namespaces and links of lab `lab`; see `throttle.lab.topology` for the picture."""

    def __init__(self, lab: str) -> None:
        self.lab = lab

    def ns(self, role: str) -> str:
        return namespace(self.lab, role)

    def build(self, ip: str, ethtool: str) -> None:
        """Create or repair everything: namespaces, sysctls, links, addresses, routes, offloads."""
        load_br_netfilter()
        for role in ROLES:
            self._ensure_namespace(self.ns(role))
        for role in ROLES:
            write_sysctls(self.ns(role), SYSCTLS_ALL + SYSCTLS_ROLE.get(role, ()))
        self._ensure_links()
        self._wait_links_up()
        for iface in INTERFACES:
            children.run([ip, "netns", "exec", self.ns(iface.role), ethtool, "-K", iface.name,
                          *(w for o in OFFLOADS for w in (o, "off"))], f"ethtool -K {iface.name}")

    def remove(self) -> None:
        """Delete the lab's namespaces; those already gone are no error."""
        from pyroute2 import netns as pyroute2_netns

        for role in ROLES:
            if os.path.lexists(NETNS_DIR / self.ns(role)):
                try:
                    pyroute2_netns.remove(self.ns(role))
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise ThrottleError(f"cannot remove namespace {self.ns(role)}: {exc}") from None

    def shape(self, ip: str, tc: str, link: Link) -> str:
        """Give the router's two ports the link: netem's delay (with the bottleneck as its child)
        when the kernel has netem, else the bottleneck alone. Returns the path that delays:
        PATH_NETEM, or PATH_STAGE when the caller must run the delay stage; "" when undelayed."""
        exec_tc = [ip, "netns", "exec", self.ns("router"), tc, "qdisc"]
        path = ""
        if link.delayed:
            path = PATH_NETEM
            for port in ROUTER_PORTS:
                if not self._qdiscs(exec_tc, port, link_qdiscs(link, netem=True)):
                    path = PATH_STAGE
                    break
        if path != PATH_NETEM:
            for port in ROUTER_PORTS:
                if not self._qdiscs(exec_tc, port, link_qdiscs(link, netem=False)):
                    raise ThrottleError("this kernel has no TBF (CONFIG_NET_SCH_TBF), which the bottleneck needs")
        return path

    @staticmethod
    def _qdiscs(exec_tc: list[str], port: str, commands: list[list[str]]) -> bool:
        """One port's root replaced by `commands` (or deleted, for none). False when the kernel
        lacks a qdisc they name; a ThrottleError for any other failure."""
        # Deleted first: a root is replaced in place only by one of its own kind.
        capture(exec_tc + ["del", "dev", port, "root"], "tc")  # none there is no error
        for command in commands:
            argv = exec_tc + [w.replace("{dev}", port) for w in command]
            done = capture(argv, "tc")
            if done.code != 0:
                if NO_QDISC in done.err:
                    capture(exec_tc + ["del", "dev", port, "root"], "tc")  # netem made, its child not
                    return False
                raise ThrottleError(f"{' '.join(argv)}: {done.err.strip() or f'exit {done.code}'}")
        return True

    def exists(self, role: str) -> bool:
        return os.path.ismount(NETNS_DIR / self.ns(role))

    @staticmethod
    def _ensure_namespace(ns: str) -> None:
        from pyroute2 import netns as pyroute2_netns

        path = NETNS_DIR / ns
        if path.exists() and not os.path.ismount(path):
            path.unlink()  # a leftover mount point with no namespace behind it
        if not path.exists():
            try:
                pyroute2_netns.create(ns)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise ThrottleError(f"cannot create namespace {ns}: {exc}") from None

    def _ipr(self, role: str) -> Any:
        from pyroute2 import IPRoute

        return IPRoute(netns=self.ns(role), flags=0)  # flags=0: never create a namespace by accident

    def _ensure_links(self) -> None:
        from pyroute2 import NetlinkError

        try:
            for (role, ifname), (peer_role, peer_if) in VETHS:
                with self._ipr(role) as ipr, self._ipr(peer_role) as other:
                    mine, theirs = ipr.link_lookup(ifname=ifname), other.link_lookup(ifname=peer_if)
                    if mine and theirs:
                        continue
                    # Half of a pair whose peer is gone, or a pair of an older layout of the lab.
                    for stale in mine:
                        ipr.link("del", index=stale)
                    for stale in other.link_lookup(ifname=peer_if):
                        other.link("del", index=stale)
                    fd = os.open(NETNS_DIR / self.ns(peer_role), os.O_RDONLY)
                    try:
                        ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": peer_if, "net_ns_fd": fd})
                    finally:
                        os.close(fd)
            self._bridge()
            for role in ROLES:
                with self._ipr(role) as ipr:
                    self._configure(ipr, role)
        except NetlinkError as exc:
            raise ThrottleError(f"cannot configure the lab's links: {exc}") from None

    @staticmethod
    def _configure(ipr: Any, role: str) -> None:
        """One namespace's loopback, interfaces (MTU, addresses, up) and default routes."""
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        for iface in (i for i in INTERFACES if i.role == role):
            index = ipr.link_lookup(ifname=iface.name)[0]
            ipr.link("set", index=index, mtu=MTU)
            if not iface.addresses:
                ipr.flush_addr(index=index)  # a bridge port (an older lab gave them some)
            for spec in iface.addresses:
                address, prefix = spec.split("/")
                v6 = ":" in address
                ipr.addr("replace", index=index, address=address, prefixlen=int(prefix),
                         **({"flags": IFA_F_NODAD} if v6 else {}))
            ipr.link("set", index=index, state="up")
        if role in GATEWAYS:
            gw4, gw6 = GATEWAYS[role]
            ipr.route("replace", dst="0.0.0.0/0", gateway=gw4, **_route_metrics())
            ipr.route("replace", dst="::/0", gateway=gw6, family=socket.AF_INET6, **_route_metrics())

    def _bridge(self) -> None:
        """The censor's bridge: both ports in it, no STP (ports forward at once), no address, and
        its IP packets handed to iptables and ip6tables."""
        with self._ipr("censor") as ipr:
            if not ipr.link_lookup(ifname=BRIDGE):
                ipr.link("add", ifname=BRIDGE, kind="bridge", br_stp_state=0, br_forward_delay=0,
                         br_mcast_snooping=0)
            bridge = ipr.link_lookup(ifname=BRIDGE)[0]
            for port in BRIDGE_PORTS:
                ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=bridge)
            ipr.link("set", index=bridge, mtu=MTU, state="up")
        write_sysctls(self.ns("censor"), SYSCTLS_BRIDGE, missing=BR_NETFILTER_MISSING)

    def _wait_links_up(self) -> None:
        """Wait for the kernel to finish bringing the veths up. Until linkwatch has run (up to a
        second after `state up`) a device has no qdisc and drops what is sent: the first SYN of
        a lab used at once would be lost and the first connection would take a second longer."""
        deadline = time.monotonic() + LINKS_TIMEOUT
        sockets = {role: self._ipr(role) for role in ROLES}
        try:
            pending = list(INTERFACES)
            while pending:
                pending = [
                    i for i in pending
                    if [link.get("operstate") for link in sockets[i.role].get_links(ifname=i.name)] != ["UP"]
                ]
                if pending and time.monotonic() > deadline:
                    names = ", ".join(f"{self.ns(i.role)}/{i.name}" for i in pending)
                    raise ThrottleError(f"lab interfaces did not come up: {names}")
                if pending:
                    time.sleep(0.02)
        finally:
            for ipr in sockets.values():
                ipr.close()


def tbf(rate: float) -> list[str]:
    """A TBF's arguments for a bottleneck of `rate` bytes/s: a small bucket (two frames, or 2 ms at
    the rate) so it shapes rather than lets bursts by, and BOTTLENECK_BUFFER of queue behind it."""
    burst = max(2 * (MTU + 14), int(rate * 0.002))
    return ["tbf", "rate", f"{int(rate * 8)}bit", "burst", str(burst), "limit", str(burst + int(rate * BOTTLENECK_BUFFER))]


def link_qdiscs(link: Link, netem: bool) -> list[list[str]]:
    """The `tc qdisc` commands (the words after `tc qdisc`, "{dev}" for the port) that give one
    router port the link, after its root is deleted, with netem doing the delay or not; [] when
    the port needs no qdisc."""
    if netem and link.delayed:
        delay = ["delay", f"{round(link.one_way * 1e6)}us"]
        if link.jitter:
            delay.append(f"{round(link.jitter * 5e5)}us")  # netem's jitter is +-: half the RTT's each way
        root = ["add", "dev", "{dev}", "root", "handle", "1:", "netem", *delay, "limit", "1000000"]
        if not link.bottleneck:
            return [root]
        return [root, ["add", "dev", "{dev}", "parent", "1:1", "handle", "10:", *tbf(link.bottleneck)]]
    if link.bottleneck:
        return [["add", "dev", "{dev}", "root", "handle", "1:", *tbf(link.bottleneck)]]
    return []


NO_QDISC = "qdisc kind is unknown"  # what tc says when the kernel lacks one (sch_netem)


def _route_metrics() -> dict[str, Any]:
    """The lab's default routes carry the congestion control (a namespace may not set a default
    that the host restricts, but a route may name it); nothing when this kernel lacks it."""
    try:
        available = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    except OSError:
        return {}
    return {"metrics": {"RTAX_CC_ALGO": CONGESTION_CONTROL}} if CONGESTION_CONTROL in available else {}


def write_sysctls(ns: str, values: Iterable[tuple[str, str]], missing: str | None = None) -> None:
    """Write sysctls inside a namespace (files under /proc/sys/net belong to the namespace of the
    thread that opens them: `netns.run_in` writes them from a thread inside it). `missing`: the
    message when a key does not exist (its kernel feature is absent)."""
    values = list(values)

    def work() -> None:
        for key, value in values:
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)

    try:
        netns.run_in(ns, work)
    except FileNotFoundError as exc:
        if missing is not None:
            raise ThrottleError(missing) from None
        raise ThrottleError(f"cannot set sysctls in namespace {ns}: {exc}") from None
    except OSError as exc:
        raise ThrottleError(f"cannot set sysctls in namespace {ns}: {exc}") from None


def load_br_netfilter() -> None:
    """br_netfilter, when this kernel has it as a module that is not loaded (Debian's and Ubuntu's
    kernels do; it is built in on others). Loading it makes every namespace's bridges, the host's
    included, hand their packets to iptables by default; this process sets the host's three
    switches back to 0 at once, as they behaved before, so that only the lab's bridge is affected."""
    if BR_NETFILTER.exists():
        return  # built in or loaded already (by us or by whoever runs bridges here)
    modprobe = find_tool("modprobe")
    if modprobe is None:
        raise ThrottleError(BR_NETFILTER_MISSING)
    try:
        children.run([modprobe, "br_netfilter"], "modprobe br_netfilter")
    except ThrottleError as exc:
        raise ThrottleError(f"{BR_NETFILTER_MISSING} ({exc})") from None
    if not BR_NETFILTER.exists():
        raise ThrottleError(f"{BR_NETFILTER_MISSING} (modprobe failed)")
    for key in ("iptables", "ip6tables", "arptables"):
        try:
            Path(f"/proc/sys/net/bridge/bridge-nf-call-{key}").write_text("0")
        except OSError:
            pass
