"""Interfaces and neighbours, for the fast path: an interface's index and Ethernet address,
whether it is a port of a bridge, and the MAC of the next hop towards an address.

A routed flow's entries in the kernel's map carry the MACs its frames get on the way out (the next
hop's as destination, the egress interface's as source); a bridged one's carry none (`NO_MAC`).
`Hops` caches them on the side of the thread that writes the map, and looks up what it lacks with
functions of an IPRoute that run on the netlink worker (`throttle.kernel.netlink`); so the packet
loop never waits for a neighbour dump. `interface_mac` and `neighbour_mac` are the same lookups for
tools, each on a worker of its own.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional, Union

from throttle.errors import ThrottleError
from throttle.kernel.maps import NO_MAC, Address, packed
from throttle.kernel.netlink import Netlink

__all__ = ["Found", "Hop", "Hops", "Wanted", "bridge_port", "ifindex", "interface_mac", "neighbour_mac"]

NUD_INVALID = 0x00 | 0x01 | 0x20  # NUD_NONE, NUD_INCOMPLETE, NUD_FAILED: no usable address

Hop = tuple[int, bytes, bytes]  # a direction's way out: egress ifindex, destination MAC, source MAC
Wanted = tuple[int, bytes]  # (egress ifindex, packed address): a next hop to look up
Found = dict[Wanted, Optional[tuple[bytes, bytes]]]  # -> (next hop's MAC, egress interface's MAC), or None


def ifindex(ipr: Any, ifname_or_index: Union[str, int]) -> int:
    if isinstance(ifname_or_index, int):
        return ifname_or_index
    found = ipr.link_lookup(ifname=ifname_or_index)
    if not found:
        raise ThrottleError(f"no interface {ifname_or_index} in this network namespace")
    return int(found[0])


def bridge_port(ipr: Any, index: int) -> bool:
    """Whether an interface is a port of a bridge: its frames are then forwarded as they came."""
    links = ipr.get_links(index)
    master = links[0].get("master") if links else None
    if not master:
        return False
    masters = ipr.get_links(master)
    info = masters[0].get_attr("IFLA_LINKINFO") if masters else None
    return bool(info is not None and info.get_attr("IFLA_INFO_KIND") == "bridge")


def _mac_bytes(text: Optional[str]) -> Optional[bytes]:
    if not text:
        return None
    mac = bytes.fromhex(text.replace(":", ""))
    return mac if len(mac) == 6 else None


def _interface_mac(ipr: Any, ifname_or_index: Union[str, int]) -> bytes:
    index = ifindex(ipr, ifname_or_index)
    links = ipr.get_links(index)
    mac = _mac_bytes(links[0].get("address")) if links else None
    if mac is None:
        raise ThrottleError(f"interface {ifname_or_index} has no Ethernet address")
    return mac


def _neighbour_mac(ipr: Any, ifname_or_index: Union[str, int], address: bytes) -> Optional[bytes]:
    index = ifindex(ipr, ifname_or_index)
    ip = str(ipaddress.ip_address(address))
    for msg in ipr.neigh("dump", ifindex=index, dst=ip):
        if msg.get("state", 0) & ~NUD_INVALID:
            mac = _mac_bytes(msg.get("lladdr"))
            if mac is not None and msg.get("dst") == ip:
                return mac
    return None


def _next_hop(ipr: Any, index: int, address: bytes) -> bytes:
    """The address whose MAC a packet to `address` out of `index` carries: the route's gateway, or
    the address itself when it is on-link (or the route leaves by another interface)."""
    ip = ipaddress.ip_address(address)
    try:
        routes = ipr.route("get", dst=str(ip))
    except Exception:  # no route: on-link is the only guess
        return address
    for route in routes:
        gateway = route.get("gateway")
        if gateway and route.get("oif") == index:
            return ipaddress.ip_address(gateway).packed
    return address


class Hops:
    """Each direction's way out, cached: the next hops' MACs by (egress ifindex, address), and
    the interfaces' own. Read and filled by one thread (the one writing the map); `lookup` runs
    on the netlink worker and only returns what it found, for `remember`."""

    def __init__(self) -> None:
        self.bridged: set[int] = set()  # ifindexes that are ports of a bridge (an in-path censor)
        self._next: dict[Wanted, bytes] = {}
        self._own: dict[int, bytes] = {}

    def _both_bridged(self, client_if: int, server_if: int) -> bool:
        return client_if in self.bridged and server_if in self.bridged

    def missing(self, client_if: int, client: bytes, server_if: int, server: bytes) -> list[Wanted]:
        """The next hops a flow between these needs and the cache lacks (none when bridged)."""
        if self._both_bridged(client_if, server_if):
            return []
        wanted = ((server_if, server), (client_if, client))
        return [w for w in wanted if w not in self._next or w[0] not in self._own]

    def flow(self, client_if: int, client: bytes, server_if: int, server: bytes) -> Optional[tuple[Hop, Hop]]:
        """(the way to the server, the way to the client) from the cache; None when a next hop is
        not known (not looked up yet, or the kernel has not resolved it)."""
        if self._both_bridged(client_if, server_if):  # frames go out unchanged: no MACs
            return (server_if, NO_MAC, NO_MAC), (client_if, NO_MAC, NO_MAC)
        to_server, to_client = self._next.get((server_if, server)), self._next.get((client_if, client))
        if to_server is None or to_client is None:
            return None
        return (server_if, to_server, self._own[server_if]), (client_if, to_client, self._own[client_if])

    @staticmethod
    def lookup(ipr: Any, wanted: list[Wanted]) -> Found:
        """On the netlink worker: each wanted next hop's MAC and its interface's."""
        found: Found = {}
        for index, address in wanted:
            mac = _neighbour_mac(ipr, index, _next_hop(ipr, index, address))
            found[(index, address)] = None if mac is None else (mac, _interface_mac(ipr, index))
        return found

    def remember(self, found: Found) -> None:
        """What `lookup` found. An unresolved neighbour may resolve later: it is asked again then."""
        for (index, address), macs in found.items():
            if macs is not None:
                self._next[(index, address)], self._own[index] = macs


def _one_request(fn: Any) -> Any:
    netlink = Netlink()
    try:
        return netlink.call(fn)
    finally:
        netlink.close()


def interface_mac(ifname: Union[str, int]) -> bytes:
    """The Ethernet address of an interface of the current network namespace."""
    mac: bytes = _one_request(lambda ipr: _interface_mac(ipr, ifname))
    return mac


def neighbour_mac(ifname_or_index: Union[str, int], address: Address) -> Optional[bytes]:
    """The MAC of a next hop (packed IPv4/IPv6 address) from the neighbour table, or None when the
    kernel has not resolved it (or failed to)."""
    found = packed(address)
    mac: Optional[bytes] = _one_request(lambda ipr: _neighbour_mac(ipr, ifname_or_index, found))
    return mac
