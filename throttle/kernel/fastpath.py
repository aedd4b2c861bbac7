"""The kernel's part of the censor: once the engine has decided a flow, the kernel carries the
decision out, and Python never sees the flow's packets again.

This module loads the eBPF program of `bpf/throttle.bpf.c` (C, built with clang, loaded with
libbpf through `throttle.kernel.libbpf`) on the clsact *ingress* hook of each censor interface
(cls_bpf, direct-action), and keeps its maps. For every IPv4/IPv6 TCP or UDP packet the program
looks the 5-tuple up in the `flows` map; on a hit it applies the direction's limit, if any (a
token bucket in the `buckets` map: the engine's policer, in the kernel; a shaped direction gets
its HTB class), rewrites the Ethernet addresses, decrements the TTL / hop limit and redirects the
packet to the egress interface, so it never reaches the IP stack, netfilter or NFQUEUE. When both
interfaces are ports of a bridge (the lab's in-path censor) a flow's entries carry no MACs
(`NO_MAC`) and the program redirects the frame unchanged, TTL included. On a miss
it returns TC_ACT_OK and the packet takes the normal path (to the engine). Packets it does not
parse always take the normal path: IPv4 with options or fragments, IPv6 with extension headers,
anything but TCP and UDP, a TCP SYN, and packets whose TTL would expire (the kernel then sends
the ICMP error).

It is attached with pyroute2 (`tc qdisc add ... clsact`, `tc filter add ... ingress bpf da`).
Everything attached is removed by `FastPath.close()`; deleting the namespace removes it too. A
FastPath left behind by a process that was killed keeps forwarding (and limiting) the flows it had
(fail-open, like `--queue-bypass`); the next FastPath on the same interfaces replaces it.

pyroute2's synchronous API cannot run inside a running asyncio loop (the censor's hook is one),
so every netlink request runs on a worker thread of our own, created from the thread that
constructs the FastPath and therefore in the same network namespace.

Map layout: `KEY`, `VALUE` and `BUCKET` below mirror the C structs. Because redirected packets
skip conntrack, the censor's conntrack entries of those flows stop advancing; `expire()` (or
`remove()`) hands idle or finished flows back to the slow path.

Walks of the whole flows map (every direction's counters for the exporter, idle expiry) run on a
`Walker` thread (`FastPath.walker`), never on the censor's packet loop: `counters()` reads the map
in batches into a `Snapshot` (raw values, no object per entry), and `expire_stale` deletes a key
only if it is still idle, under the lock `add()` takes. `close()` stops the walkers first.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Optional, TypeVar, Union

from throttle.errors import ThrottleError
from throttle.kernel import libbpf

__all__ = ["FastPath", "Snapshot", "Walker", "available", "interface_mac", "neighbour_mac"]

T = TypeVar("T")
Address = Union[bytes, str, ipaddress.IPv4Address, ipaddress.IPv6Address]  # packed, or any form ipaddress takes

# -- tc -----------------------------------------------------------------------------------------

TC_H_CLSACT_INGRESS = 0xFFFFFFF2  # parent "ffff:fff2"
TC_H_CLSACT_EGRESS = 0xFFFFFFF3
FILTER_NAME = "throttle-fastpath"
MIN_BURST = 1600  # an HTB class's smallest burst: a full-size packet and its framing
NO_MAC = bytes(6)  # a flow entry without MACs: bridged, the frame goes out unchanged
FILTER_PRIO = 1  # evaluated before any other ingress filter
FILTER_HANDLE = 0x7A57
ETH_P_ALL = 0x0003

TC_ACT_OK = 0

# -- the program's data layout (bpf/throttle.bpf.c) ----------------------------------------------

KEY = struct.Struct("!BBxx16s16sHH")  # ports stay in network order, as in the packet
# egress ifindex, dst MAC, src MAC, last_ns, bytes, packets, dropped bytes, dropped packets,
# payload carried, after_bytes, bucket index, skb priority
VALUE = struct.Struct("=I6s6sQQQQQQQII")
# spin lock, pad, rate (B/s), burst (B), fill_ns, tokens (B x 1e9), stamp_ns
BUCKET = struct.Struct("=IIQQQQQ")
assert KEY.size == 40 and VALUE.size == 80 and BUCKET.size == 48
HITS_KEY = struct.pack("=I", 0)
BUCKETS = 131072  # entries of the buckets array; index 0 means "not limited"
HTB_MAJOR = 0x7A57  # the shaper's HTB qdisc handle (7a57:), its classes 7a57:minor
HTB_CLASSES = HTB_MAJOR  # class minors 1 .. 0x7a56; minor m's queue is qdisc m: (never the HTB's own)
PROGRAM = "throttle_ingress"
NS = 1_000_000_000

NUD_INVALID = 0x00 | 0x01 | 0x20  # NUD_NONE, NUD_INCOMPLETE, NUD_FAILED: no usable address


@dataclass(frozen=True, slots=True)
class Limit:
    """How the kernel limits one direction of a flow: its bucket (an index given to `set_bucket`),
    the payload that passes free first, what the direction already carried, and for a shaped
    direction its egress class (skb->priority, major:minor)."""

    bucket: int
    after_bytes: int = 0
    carried: int = 0
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Counters:
    """What the kernel did with one direction of a flow since it was added."""

    bytes: int
    packets: int
    dropped_bytes: int
    dropped_packets: int
    last_ns: int


class Snapshot(Mapping[bytes, Counters]):
    """Every direction's counters as one walk of the map read them: a read-only mapping of map key
    to `Counters`, made on access. It holds the keys and the raw values, not an object per entry:
    a walk of 65,536 directions every second must not feed the garbage collector (whose full
    collections, run by whichever thread allocates, would stall the packet loop)."""

    __slots__ = ("_keys", "_raw", "_index")

    def __init__(self, keys: list[bytes], raw: bytes) -> None:
        self._keys = keys
        self._raw = raw
        self._index: dict[bytes, int] | None = None

    def _at(self, i: int) -> Counters:
        _, _, _, last, nbytes, packets, dbytes, dpackets, *_ = VALUE.unpack_from(self._raw, i * VALUE.size)
        return Counters(nbytes, packets, dbytes, dpackets, last)

    def __getitem__(self, key: bytes) -> Counters:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self._keys)}
        return self._at(self._index[key])

    def __contains__(self, key: object) -> bool:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self._keys)}
        return key in self._index

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def totals(self) -> Iterator[tuple[bytes, int, int, int, int]]:
        """(key, bytes, packets, dropped bytes, dropped packets) of every direction, quickly."""
        for key, (_, _, _, _, nbytes, packets, dbytes, dpackets, *_) in zip(self._keys, VALUE.iter_unpack(self._raw)):
            yield key, nbytes, packets, dbytes, dpackets

    def stale(self, limit_ns: int) -> list[bytes]:
        """Keys whose last packet was before `limit_ns` (CLOCK_MONOTONIC)."""
        return [key for key, value in zip(self._keys, VALUE.iter_unpack(self._raw)) if value[3] < limit_ns]


class BucketSlots:
    """Which slot of the kernel's `buckets` array holds which of the engine's buckets.

    A bucket shared by several flows (scope client or rule) gets one slot, counted once per flow
    direction that uses it; a slot is free again when the last of them leaves the kernel."""

    def __init__(self, size: int = BUCKETS) -> None:
        self._free = list(range(size - 1, 0, -1))  # slot 0 means "not limited"
        self._slot: dict[int, int] = {}  # id(engine bucket) -> slot
        self._users: dict[int, tuple[int, int, object]] = {}  # slot -> (id, users, the bucket itself)

    def acquire(self, bucket: object) -> tuple[int | None, bool]:
        """(slot, whether it is new and must be written), or (None, False) when all are taken."""
        slot = self._slot.get(id(bucket))
        if slot is not None:
            key, users, kept = self._users[slot]
            self._users[slot] = (key, users + 1, kept)
            return slot, False
        if not self._free:
            return None, False
        slot = self._free.pop()
        self._slot[id(bucket)] = slot
        self._users[slot] = (id(bucket), 1, bucket)  # kept alive, so its id stays unique
        return slot, True

    def release(self, slot: int) -> None:
        entry = self._users.get(slot)
        if entry is None:
            return
        key, users, kept = entry
        if users > 1:
            self._users[slot] = (key, users - 1, kept)
            return
        del self._users[slot], self._slot[key]
        self._free.append(slot)

    def __len__(self) -> int:
        """Slots in use."""
        return len(self._users)

    def __contains__(self, slot: object) -> bool:
        """Whether `slot` is in use."""
        return slot in self._users


def _possible_cpus() -> int:
    """Per-CPU maps hold one value per *possible* CPU."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


# -- netlink, on a thread of our own ------------------------------------------------------------


class _Rtnl:
    """One pyroute2 IPRoute used only from one worker thread (see the module docstring).

    The thread is started by the constructor, so it is in the constructing thread's namespace.
    """

    def __init__(self) -> None:
        try:
            import pyroute2  # noqa: F401
        except ImportError:
            raise ThrottleError("the Python package pyroute2 is missing: .venv/bin/pip install pyroute2") from None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastpath-rtnl")
        self._ipr: Any = None
        try:
            self._ipr = self._pool.submit(self._open).result()
        except Exception as exc:
            self._pool.shutdown()
            raise ThrottleError(f"cannot open a netlink socket for the fast path: {exc}") from None

    @staticmethod
    def _open() -> Any:
        from pyroute2 import IPRoute

        return IPRoute()

    def __call__(self, fn: Callable[[Any], T]) -> T:
        """Run fn(ipr) on the worker; whatever it raises arrives as a ThrottleError."""
        try:
            return self._pool.submit(fn, self._ipr).result()
        except ThrottleError:
            raise
        except Exception as exc:
            raise ThrottleError(f"netlink request for the fast path failed: {exc}") from None

    def close(self) -> None:
        if self._ipr is not None:
            try:
                self._pool.submit(self._ipr.close).result()
            except Exception:
                pass  # closing a socket: nothing left to undo
            self._ipr = None
        self._pool.shutdown()


def _ifindex(ipr: Any, ifname_or_index: Union[str, int]) -> int:
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
    index = _ifindex(ipr, ifname_or_index)
    links = ipr.get_links(index)
    mac = _mac_bytes(links[0].get("address")) if links else None
    if mac is None:
        raise ThrottleError(f"interface {ifname_or_index} has no Ethernet address")
    return mac


def _neighbour_mac(ipr: Any, ifname_or_index: Union[str, int], address: bytes) -> Optional[bytes]:
    index = _ifindex(ipr, ifname_or_index)
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


def interface_mac(ifname: Union[str, int]) -> bytes:
    """The Ethernet address of an interface of the current network namespace."""
    rtnl = _Rtnl()
    try:
        return rtnl(lambda ipr: _interface_mac(ipr, ifname))
    finally:
        rtnl.close()


def neighbour_mac(ifname_or_index: Union[str, int], address: Address) -> Optional[bytes]:
    """The MAC of a next hop (packed IPv4/IPv6 address) from the neighbour table, or None when the
    kernel has not resolved it (or failed to)."""
    rtnl = _Rtnl()
    try:
        return rtnl(lambda ipr: _neighbour_mac(ipr, ifname_or_index, _packed(address)))
    finally:
        rtnl.close()


# -- the fast path ------------------------------------------------------------------------------


def _packed(address: Address) -> bytes:
    if isinstance(address, bytes):
        if len(address) not in (4, 16):
            raise ThrottleError(f"an address is 4 or 16 packed bytes, not {len(address)}")
        return address
    try:
        return ipaddress.ip_address(address).packed
    except ValueError:
        raise ThrottleError(f"not an IP address: {address!r}") from None


def flow_key(proto: int, src: Address, sport: int, dst: Address, dport: int) -> bytes:
    """The 40-byte map key of one direction of a flow."""
    src, dst = _packed(src), _packed(dst)
    if len(src) != len(dst):
        raise ThrottleError("a flow's addresses must be of one family")
    if proto not in (6, 17):
        raise ThrottleError(f"the fast path forwards TCP (6) and UDP (17), not protocol {proto}")
    if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
        raise ThrottleError(f"ports must be 0-65535, not {sport} and {dport}")
    family = 4 if len(src) == 4 else 6
    return KEY.pack(proto, family, src.ljust(16, b"\0"), dst.ljust(16, b"\0"), sport, dport)


class FastPath:
    """The eBPF data path on the ingress of `interfaces` of the current network namespace.

    Use as a context manager or call `close()`; both remove the filters and the clsact qdiscs
    this instance added.
    """

    def __init__(self, interfaces: list[str], max_entries: int = 262144) -> None:
        if os.geteuid() != 0:
            raise ThrottleError("the fast path needs root (BPF and tc): run with sudo")
        self.max_entries = max_entries
        self._attached: list[tuple[int, bool]] = []  # (ifindex, clsact is ours to delete)
        self._ifindex: dict[str, int] = {}
        self._macs: dict[tuple[int, bytes], bytes] = {}  # (ifindex, address) -> next hop's MAC
        self._if_macs: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._rtnl: Optional[_Rtnl] = None
        self._object: Optional[libbpf.BpfObject] = None
        self._shaping: list[int] = []  # ifindexes whose root qdisc is our HTB
        self._walkers: list[Walker] = []
        self._bridged: set[int] = set()  # ifindexes that are ports of a bridge (an in-path censor)
        try:
            self._object = libbpf.BpfObject(libbpf.object_path(), PROGRAM, ("flows", "buckets", "hits", "lease"),
                                            max_entries={"flows": max_entries})
            self._prog = self._object.program_fd
            self._flows = self._object.map_fds["flows"]
            self._buckets = self._object.map_fds["buckets"]
            self._hits = self._object.map_fds["hits"]
            self._lease = self._object.map_fds["lease"]
            self._rtnl = _Rtnl()
            for name in interfaces:
                self._attach(name)
        except BaseException:
            self.close()
            raise

    # -- attaching ------------------------------------------------------------------------------

    def _attach(self, name: str) -> None:
        from pyroute2 import NetlinkError

        assert self._rtnl is not None
        prog = self._prog

        def work(ipr: Any) -> tuple[int, bool]:
            index = _ifindex(ipr, name)
            ours = True
            try:
                ipr.tc("add", "clsact", index=index)
            except NetlinkError as exc:
                if exc.code != 17:  # EEXIST: someone's clsact, or one a killed FastPath left
                    raise ThrottleError(f"cannot add a clsact qdisc to {name}: {exc} (no clsact in this kernel?)") from None
                ours = _adopt_leftover(ipr, index)
            try:
                ipr.tc("add-filter", "bpf", index=index, handle=FILTER_HANDLE, parent=TC_H_CLSACT_INGRESS,
                       prio=FILTER_PRIO, protocol=ETH_P_ALL, fd=prog, name=FILTER_NAME, direct_action=True)
            except NetlinkError as exc:
                if ours:
                    _delete_clsact(ipr, index)
                raise ThrottleError(f"cannot attach the fast-path BPF filter to {name}: {exc}") from None
            return index, ours

        index, ours = self._rtnl(work)
        self._attached.append((index, ours))
        self._ifindex[name] = index
        if self._rtnl(lambda ipr: bridge_port(ipr, index)):
            self._bridged.add(index)

    # -- flows ----------------------------------------------------------------------------------

    def add(self, proto: int, src: Address, sport: int, dst: Address, dport: int, egress_ifindex: int,
            dst_mac: bytes, src_mac: bytes, limit: Optional[Limit] = None) -> bool:
        """Forward packets src:sport -> dst:dport out of `egress_ifindex` with these MACs (both
        `NO_MAC`: unchanged, bridged), through `limit`'s bucket if given. False when the map is full (the flow then stays on the normal
        path)."""
        self._check_open()
        if len(dst_mac) != 6 or len(src_mac) != 6 or (dst_mac == NO_MAC) != (src_mac == NO_MAC):
            raise ThrottleError("MAC addresses are 6 bytes")
        key = flow_key(proto, src, sport, dst, dport)
        lim = limit or Limit(0)
        try:
            with self._lock:  # see expire_stale
                value = VALUE.pack(egress_ifindex, dst_mac, src_mac, time.monotonic_ns(), 0, 0, 0, 0, lim.carried,
                                   lim.after_bytes, lim.bucket, lim.priority)
                libbpf.map_update(self._flows, key, value)
        except OSError as exc:
            if exc.errno == 7:  # E2BIG: the map is full
                return False
            raise ThrottleError(f"cannot add a flow to the fast path: {exc.strerror}") from None
        return True

    def set_bucket(self, index: int, rate: float, burst: int, tokens: float, stamp: float) -> bool:
        """Bucket `index` (1 and up) with this rate (bytes/s), burst (bytes), and credit `tokens`
        (bytes) as of `stamp` (CLOCK_MONOTONIC seconds, the clock of the censor's event loop)."""
        self._check_open()
        if not 0 < index < BUCKETS:
            raise ThrottleError(f"bucket index {index} is outside 1-{BUCKETS - 1}")
        fill_ns = int(burst * NS / rate) + 1 if rate > 0 else 0
        value = BUCKET.pack(0, 0, int(rate), int(burst), fill_ns, int(max(0.0, tokens) * NS), int(stamp * NS))
        try:
            libbpf.map_update(self._buckets, struct.pack("=I", index), value)
        except OSError as exc:
            raise ThrottleError(f"cannot set a fast-path bucket: {exc.strerror}") from None
        return True

    # -- shaping: an HTB qdisc on the egress of each interface, a class per shaped bucket ------------

    def enable_shaping(self, interfaces: list[str]) -> None:
        """Make each interface's root qdisc an HTB whose unclassified traffic goes out at once (its
        direct queue), so that shaped directions can be given classes (`add_class`)."""
        self._check_open()
        assert self._rtnl is not None
        for name in interfaces:
            index = self._index(name)

            def work(ipr: Any) -> None:
                ipr.tc("replace", "htb", index=index, handle=HTB_MAJOR << 16, default=0)

            self._rtnl(work)
            self._shaping.append(index)

    def add_class(self, ifname: str, minor: int, rate: float, burst: int, limit: int) -> int:
        """A shaping class on `ifname`: `rate` bytes/s with a `burst` of bytes, and a queue of about
        `limit` bytes, counted in full-sized packets (a packet beyond it is dropped, as the engine's
        Shaper drops what would wait too long). Returns its class id, the skb->priority of the
        packets it shapes."""
        self._check_open()
        assert self._rtnl is not None
        if not 0 < minor < HTB_CLASSES:
            raise ThrottleError(f"shaping class {minor} is outside 1-{HTB_CLASSES - 1}")
        index = self._index(ifname)
        classid = (HTB_MAJOR << 16) | minor
        bits = f"{max(8, int(rate * 8))}bit"

        def work(ipr: Any) -> None:
            ipr.tc("replace-class", "htb", index=index, handle=classid, parent=HTB_MAJOR << 16, rate=bits,
                   ceil=bits, burst=max(burst, MIN_BURST), cburst=max(burst, MIN_BURST), quantum=1514)
            ipr.tc("replace", "pfifo", index=index, handle=minor << 16, parent=classid, limit=max(2, -(-limit // 1500)))

        self._rtnl(work)
        return classid

    def remove_class(self, ifname: str, minor: int) -> None:
        """Delete a shaping class (and its queue); no error if it is gone."""
        self._check_open()
        assert self._rtnl is not None
        index = self._index(ifname)

        def work(ipr: Any) -> None:
            from pyroute2 import NetlinkError

            try:
                ipr.tc("del-class", "htb", index=index, handle=(HTB_MAJOR << 16) | minor, parent=HTB_MAJOR << 16)
            except NetlinkError as exc:
                if exc.code not in (2, 19, 22):
                    raise

        self._rtnl(work)

    def remove(self, proto: int, src: Address, sport: int, dst: Address, dport: int) -> None:
        """Stop fast-forwarding one direction of a flow; no error if it was not there."""
        self._check_open()
        try:
            libbpf.map_delete(self._flows, flow_key(proto, src, sport, dst, dport))
        except OSError as exc:
            raise ThrottleError(f"cannot remove a flow from the fast path: {exc.strerror}") from None

    def add_flow(self, proto: int, client: Address, cport: int, server: Address, sport: int,
                 client_if: str, server_if: str, upload: Optional[Limit] = None,
                 download: Optional[Limit] = None) -> bool:
        """Both directions of a decided flow: client -> server packets (arriving on client_if) go
        out of server_if to the server's next hop, and the replies the other way, each through its
        limit if given. False, with nothing added, when a next hop's MAC is not in the neighbour
        table or the map is full."""
        self._check_open()
        client, server = _packed(client), _packed(server)
        cidx, sidx = self._index(client_if), self._index(server_if)
        if cidx in self._bridged and sidx in self._bridged:  # frames go out unchanged: no MACs
            if not self.add(proto, client, cport, server, sport, sidx, NO_MAC, NO_MAC, upload):
                return False
            if not self.add(proto, server, sport, client, cport, cidx, NO_MAC, NO_MAC, download):
                self.remove(proto, client, cport, server, sport)
                return False
            return True
        to_server = self._next_hop_mac(sidx, server)
        to_client = self._next_hop_mac(cidx, client)
        if to_server is None or to_client is None:
            return False
        if not self.add(proto, client, cport, server, sport, sidx, to_server, self._if_mac(sidx), upload):
            return False
        if not self.add(proto, server, sport, client, cport, cidx, to_client, self._if_mac(cidx), download):
            self.remove(proto, client, cport, server, sport)
            return False
        return True

    def remove_flow(self, proto: int, client: Address, cport: int, server: Address, sport: int) -> None:
        """Both directions of a flow back to the normal path."""
        self.remove(proto, client, cport, server, sport)
        self.remove(proto, server, sport, client, cport)

    def expire(self, idle: float, now_ns: Optional[int] = None) -> int:
        """Remove every direction that saw no packet for `idle` seconds (and was added at least
        that long ago); returns how many. `now_ns` is CLOCK_MONOTONIC, as the kernel's."""
        return len(self.expire_keys(idle, now_ns))

    def expire_keys(self, idle: float, now_ns: Optional[int] = None) -> list[bytes]:
        """`expire`, returning the map keys removed."""
        return self.expire_stale(self.counters(), idle, now_ns)

    def expire_stale(self, counters: Mapping[bytes, Counters], idle: float, now_ns: Optional[int] = None) -> list[bytes]:
        """Remove the directions that `counters` (a snapshot from `counters()`) shows idle for
        `idle` seconds and that are still idle now; returns the keys removed. Each key is looked up
        again and deleted under the lock `add` takes, so a direction added (or a 5-tuple reused)
        after the snapshot is never removed: safe from another thread than the one adding flows."""
        self._check_open()
        now = time.monotonic_ns() if now_ns is None else now_ns
        limit = now - int(idle * 1e9)
        removed = []
        try:
            stale = counters.stale(limit) if isinstance(counters, Snapshot) else \
                [key for key, c in counters.items() if c.last_ns < limit]
            for key in stale:
                with self._lock:
                    value = libbpf.map_lookup(self._flows, key, VALUE.size)
                    if value is None or VALUE.unpack(value)[3] >= limit:
                        continue
                    if libbpf.map_delete(self._flows, key):
                        removed.append(key)
        except OSError as exc:
            raise ThrottleError(f"cannot remove idle fast-path flows: {exc.strerror}") from None
        return removed

    def renew(self, seconds: float) -> None:
        """The map's decisions hold for `seconds` from now, and no longer unless renewed: a censor
        that dies (SIGKILL) leaves a program and maps behind, and the lease makes them inert once
        it runs out (every packet back on the normal path, which fails open). Without a first
        renewal the decisions hold forever (what tests of the map alone want)."""
        self._check_open()
        until = time.monotonic_ns() + int(seconds * NS)
        try:
            libbpf.map_update(self._lease, struct.pack("=I", 0), struct.pack("=Q", until))
        except OSError as exc:
            raise ThrottleError(f"cannot renew the fast path's lease: {exc.strerror}") from None

    def walker(self, *, every: float, idle: float, expire_every: float,
               on_walk: Callable[[Snapshot], None],
               on_expired: Callable[[list[bytes]], None],
               on_error: Callable[[str], None], lease: float = 0.0) -> Walker:
        """A `Walker` of this fast path's map, started; stopped by `close()` at the latest. With
        `lease`, it renews the map's lease for that long before every walk (see `renew`)."""
        self._check_open()
        if lease:
            self.renew(lease)
        walker = Walker(self, every=every, idle=idle, expire_every=expire_every, on_walk=on_walk,
                        on_expired=on_expired, on_error=on_error, lease=lease)
        self._walkers.append(walker)
        walker.start()
        return walker

    def counters(self) -> Snapshot:
        """What the kernel did with every direction in the map, by map key (see `flow_key`); read
        in batches, a few syscalls for the whole map."""
        self._check_open()
        keys: list[bytes] = []
        values: list[bytes] = []
        try:
            for kraw, vraw, n in libbpf.map_batches(self._flows, KEY.size, VALUE.size):
                keys += [kraw[i * KEY.size : (i + 1) * KEY.size] for i in range(n)]
                values.append(vraw)
        except OSError as exc:
            raise ThrottleError(f"cannot read the fast-path flows: {exc.strerror}") from None
        return Snapshot(keys, b"".join(values))

    def flow_bytes(self) -> dict[bytes, int]:
        """Bytes forwarded so far by every direction in the map, by map key (see `flow_key`)."""
        return {key: c.bytes for key, c in self.counters().items()}

    def __len__(self) -> int:
        """Directions in the map now."""
        return len(self.counters())

    @property
    def hits(self) -> int:
        """Packets redirected so far, on all CPUs."""
        self._check_open()
        cpus = _possible_cpus()
        try:
            raw = libbpf.map_lookup(self._hits, HITS_KEY, 8 * cpus)
        except OSError as exc:
            raise ThrottleError(f"cannot read the fast-path counter: {exc.strerror}") from None
        return sum(struct.unpack(f"={cpus}Q", raw)) if raw else 0

    # -- MACs -----------------------------------------------------------------------------------

    def _index(self, name: str) -> int:
        if name not in self._ifindex:
            assert self._rtnl is not None
            self._ifindex[name] = self._rtnl(lambda ipr: _ifindex(ipr, name))
        return self._ifindex[name]

    def _if_mac(self, index: int) -> bytes:
        if index not in self._if_macs:
            assert self._rtnl is not None
            self._if_macs[index] = self._rtnl(lambda ipr: _interface_mac(ipr, index))
        return self._if_macs[index]

    def _next_hop_mac(self, index: int, address: bytes) -> Optional[bytes]:
        mac = self._macs.get((index, address))
        if mac is None:
            assert self._rtnl is not None
            mac = self._rtnl(lambda ipr: _neighbour_mac(ipr, index, _next_hop(ipr, index, address)))
            if mac is not None:  # an unresolved neighbour may resolve later: ask again then
                self._macs[(index, address)] = mac
        return mac

    # -- closing --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ThrottleError("this fast path is closed")

    def close(self) -> None:
        """Detach from every interface, delete the clsact qdiscs added, close the fds. Idempotent;
        interfaces (or the namespace) already gone are no error."""
        for walker in self._walkers:  # before the maps' fds close under them
            walker.stop()
        self._walkers.clear()
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors: list[str] = []
        if self._rtnl is not None:
            for index in self._shaping:
                try:
                    self._rtnl(lambda ipr: _delete_root(ipr, index))
                except ThrottleError as exc:
                    errors.append(str(exc))
            self._shaping.clear()
            for index, ours in self._attached:
                try:
                    self._rtnl(lambda ipr: _detach(ipr, index, ours))
                except ThrottleError as exc:
                    errors.append(str(exc))
            self._attached.clear()
            self._rtnl.close()
            self._rtnl = None
        if self._object is not None:
            self._object.close()
            self._object = None
        if errors:
            raise ThrottleError(errors[0])

    def __enter__(self) -> FastPath:
        return self

    def __exit__(self, t: Optional[type[BaseException]], e: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.close()

    def __del__(self) -> None:
        # Only the BPF object: detaching needs netlink, which is not for a finalizer. Filters stay
        # until close(), namespace removal, or the next FastPath on the interface.
        obj = getattr(self, "_object", None)
        if obj is not None:
            obj.close()


class Walker:
    """The periodic walk of the whole flows map, on a thread of its own, never on the thread that
    reads packets: every `every` seconds it reads every direction's counters (`on_walk(counters)`,
    called on this thread) and every `expire_every` seconds removes the directions idle for `idle`
    seconds (`on_expired(keys)`, also on this thread: hand them to the packet loop with
    `loop.call_soon_threadsafe`). Errors go to `on_error(message)` and the walks go on.

    Reading 65,536 directions costs tens of milliseconds of Python and a few syscalls; the thread
    gives the interpreter back to the packet loop every switch interval (5 ms) meanwhile. Made by
    `FastPath.walker`; `stop()` (or the FastPath's `close()`) ends and joins the thread."""

    def __init__(self, fastpath: FastPath, *, every: float, idle: float, expire_every: float,
                 on_walk: Callable[[Snapshot], None], on_expired: Callable[[list[bytes]], None],
                 on_error: Callable[[str], None], lease: float = 0.0) -> None:
        self._fp = fastpath
        self.lease = lease
        self.every, self.idle, self.expire_every = every, idle, expire_every
        self._on_walk, self._on_expired, self._on_error = on_walk, on_expired, on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastpath-walker", daemon=True)
        self.walks = 0
        self.last_walk_seconds = 0.0  # the last walk's duration (read, callbacks, expiry)
        self.longest_walk_seconds = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the thread and wait for it (a walk in progress finishes first). Idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        last_expire = time.monotonic()
        while not self._stop.wait(self.every):
            start = time.monotonic()
            try:
                if self.lease:
                    self._fp.renew(self.lease)
                counters = self._fp.counters()
                self._on_walk(counters)
                if start - last_expire >= self.expire_every:
                    last_expire = start
                    expired = self._fp.expire_stale(counters, self.idle)
                    if expired:
                        self._on_expired(expired)
            except ThrottleError as exc:
                if self._stop.is_set():
                    return  # closed under us: nothing more to read
                self._on_error(str(exc))
            except Exception as exc:  # noqa: BLE001 - a bug in a callback must not end the walks
                self._on_error(f"fast-path walk: {type(exc).__name__}: {exc}")
            took = time.monotonic() - start
            self.walks += 1
            self.last_walk_seconds = took
            self.longest_walk_seconds = max(self.longest_walk_seconds, took)


def _filters(ipr: Any, index: int, parent: int) -> list[Any]:
    return list(ipr.get_filters(index=index, parent=parent))


def _bpf_name(msg: Any) -> Optional[str]:
    if msg.get("kind") != "bpf":
        return None
    options = msg.get("options")
    return options.get("TCA_BPF_NAME") if options is not None else None


def _filter_ids(msgs: list[Any]) -> set[tuple[int, int]]:
    """(prio, handle) of real filters: a dump also lists each priority's chain head (handle 0)."""
    return {(m["info"] >> 16, m["handle"]) for m in msgs if m["handle"]}


def _adopt_leftover(ipr: Any, index: int) -> bool:
    """On an existing clsact: delete fast-path filters a killed process left. Returns True when
    nothing else uses the qdisc (so close() may delete it), False when it is someone else's."""
    ingress = _filters(ipr, index, TC_H_CLSACT_INGRESS)
    for prio, handle in _filter_ids([m for m in ingress if _bpf_name(m) == FILTER_NAME]):
        _delete_filter(ipr, index, prio, handle)
    others = _filter_ids(_filters(ipr, index, TC_H_CLSACT_INGRESS)) | _filter_ids(_filters(ipr, index, TC_H_CLSACT_EGRESS))
    return not others


def _delete_filter(ipr: Any, index: int, prio: int, handle: int) -> None:
    from pyroute2 import NetlinkError

    try:
        ipr.tc("del-filter", index=index, parent=TC_H_CLSACT_INGRESS, handle=handle,
               info=(prio << 16) | (ETH_P_ALL << 8 & 0xFF00) | (ETH_P_ALL >> 8 & 0xFF))
    except NetlinkError as exc:
        if exc.code not in (2, 19, 22):  # ENOENT, ENODEV, EINVAL: already gone
            raise ThrottleError(f"cannot remove the fast-path filter from interface {index}: {exc}") from None


def _delete_clsact(ipr: Any, index: int) -> None:
    from pyroute2 import NetlinkError

    try:
        ipr.tc("del", "clsact", index=index)
    except NetlinkError as exc:
        if exc.code not in (2, 19, 22):
            raise ThrottleError(f"cannot remove the clsact qdisc from interface {index}: {exc}") from None


def _delete_root(ipr: Any, index: int) -> None:
    """Back to the interface's default root qdisc (noqueue on a veth)."""
    from pyroute2 import NetlinkError

    try:
        ipr.tc("del", "htb", index=index, handle=HTB_MAJOR << 16)
    except NetlinkError as exc:
        if exc.code not in (2, 19, 22):
            raise ThrottleError(f"cannot remove the shaper's qdisc from interface {index}: {exc}") from None


def _detach(ipr: Any, index: int, ours: bool) -> None:
    _delete_filter(ipr, index, FILTER_PRIO, FILTER_HANDLE)
    if ours:
        _delete_clsact(ipr, index)


def available() -> Optional[str]:
    """None when the fast path can work in this namespace, else a one-line reason.

    Probes for real: loads the program and attaches it (with an empty map, so it passes every
    packet) to the loopback interface for a moment.
    """
    if os.geteuid() != 0:
        return "the fast path needs root (BPF and tc)"
    try:
        with FastPath(["lo"], max_entries=1):
            pass
    except ThrottleError as exc:
        return str(exc)
    return None
