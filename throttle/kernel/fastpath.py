"""The kernel's part of the censor: once the engine has decided a flow, the kernel carries the
decision out, and Python never sees the flow's packets again. `FastPath` is the facade.

It loads the eBPF program of `bpf/throttle.bpf.c` (C, built with clang, loaded with libbpf through
`throttle.kernel.libbpf`) once, and attaches it to the clsact *ingress* hook of each censor
interface (`throttle.kernel.tc`). For every IPv4/IPv6 TCP or UDP packet the program looks the
5-tuple up in the `flows` map; on a hit it applies the direction's limit, if any (a token bucket or
a window meter in the `buckets` map: the engine's policer, in the kernel; a shaped direction gets
its HTB class, `throttle.kernel.htb`; a direction of a loss rule drops packets at random with the
kernel's own PRNG), rewrites the Ethernet addresses, decrements the TTL / hop limit and
redirects the packet to the egress interface, so it never reaches the IP stack, netfilter or
NFQUEUE. When both interfaces are ports of a bridge (the lab's in-path censor) a flow's entries
carry no MACs (`NO_MAC`) and the program redirects the frame unchanged, TTL included. On a miss it
returns TC_ACT_OK and the packet takes the normal path (to the engine). Packets it does not parse
always take the normal path: IPv4 with options or fragments, IPv6 with extension headers, anything
but TCP and UDP, a TCP SYN, and packets whose TTL would expire (the kernel then sends the ICMP
error).

The parts, each a module of `throttle.kernel`: `maps` (the layout of the program's maps, the map
key, the counters read back), `tc` (attaching, and adopting what a killed process left), `htb`
(the shaper's qdiscs and classes), `neighbours` (interfaces and next hops' MACs), `netlink` (the
worker thread every netlink request runs on), `walker` (the periodic walk of the whole map). Map
calls are bpf syscalls, fast enough for the packet loop; netlink requests are not: `submit` queues
one without waiting (`throttle.kernel.handover` completes a flow's hand-over when it is done),
while the methods that wait (`add_flow`, `add_class`, `enable_shaping`) are for start-up and
tools.

Everything attached is removed by `FastPath.close()`; deleting the namespace removes it too. A
FastPath left behind by a process that was killed keeps forwarding (and limiting) the flows it had
(fail-open, like `--queue-bypass`) until its lease runs out (`renew`); the next FastPath on the
same interfaces replaces it. Because redirected packets skip conntrack, the censor's conntrack
entries of those flows stop advancing; `expire_stale` (or `remove`) hands idle or finished flows
back to the slow path.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Optional, TypeVar

from throttle.errors import ThrottleError
from throttle.kernel import libbpf, tc
from throttle.kernel.htb import Qdiscs
from throttle.kernel.maps import (HITS_KEY, INDEX, KEY, LEASE, LEASE_KEY, MAPS, NO_LIMIT, NS, PROGRAM, VALUE,
                                  Address, Counters, Limit, Snapshot, bucket_value, flow_value, last_ns, map_key,
                                  packed, window_value)
from throttle.kernel.neighbours import Hop, Hops, bridge_port, ifindex
from throttle.kernel.netlink import Netlink
from throttle.kernel.walker import Walker

__all__ = ["FastPath", "Limit", "Snapshot", "Walker"]

T = TypeVar("T")
BPF_NOEXIST = 1  # map update flags: only a new key
MAX_ENTRIES = 262144


class FastPath:
    """The eBPF data path on the ingress of `interfaces` of the current network namespace.

    Constructing one is the test of whether the fast path works here (root, BPF, tc): it raises
    ThrottleError saying why not. Use as a context manager or call `close()`; both remove the
    filters and the clsact qdiscs this instance added.
    """

    def __init__(self, interfaces: list[str], max_entries: int = MAX_ENTRIES) -> None:
        if os.geteuid() != 0:
            raise ThrottleError("the fast path needs root (BPF and tc): run with sudo")
        self.max_entries = max_entries
        self.hops = Hops()
        self.qdiscs = Qdiscs()  # the shaper's, used on the netlink worker only
        self._attached: list[tuple[int, bool]] = []  # (ifindex, clsact is ours to delete)
        self._ifindex: dict[str, int] = {}
        self._lock = threading.Lock()  # map writes against the walker's expiry (see expire_stale)
        self._entries = 0  # directions in the map: we alone add and delete them
        self._closed = False
        self._netlink: Optional[Netlink] = None
        self._object: Optional[libbpf.BpfObject] = None
        self._walkers: list[Walker] = []
        try:
            self._object = libbpf.BpfObject(libbpf.object_path(), PROGRAM, MAPS, max_entries={"flows": max_entries})
            self._prog = self._object.program_fd
            self._flows = self._object.map_fds["flows"]
            self._buckets = self._object.map_fds["buckets"]
            self._hits = self._object.map_fds["hits"]
            self._lease = self._object.map_fds["lease"]
            self._fallbacks = self._object.map_fds["fallbacks"]
            self._netlink = Netlink()
            for name in interfaces:
                self._attach(name)
        except BaseException:
            self.close()
            raise

    def _attach(self, name: str) -> None:
        prog = self._prog
        index, ours = self._worker().call(lambda ipr: tc.attach(ipr, name, prog))
        self._attached.append((index, ours))
        self._ifindex[name] = index
        if self._worker().call(lambda ipr: bridge_port(ipr, index)):
            self.hops.bridged.add(index)

    def _worker(self) -> Netlink:
        self._check_open()
        assert self._netlink is not None
        return self._netlink

    # -- netlink ------------------------------------------------------------------------------

    def submit(self, fn: Callable[[Any], T]) -> Future[T]:
        """Queue fn(ipr) on the netlink worker without waiting (see `throttle.kernel.netlink`)."""
        return self._worker().submit(fn)

    def ifindex(self, name: str) -> int:
        """An interface's index: known without netlink for the interfaces attached to."""
        if name not in self._ifindex:
            self._ifindex[name] = self._worker().call(lambda ipr: ifindex(ipr, name))
        return self._ifindex[name]

    # -- flows ----------------------------------------------------------------------------------

    def put(self, key: bytes, hop: Hop, limit: Limit = NO_LIMIT) -> bool:
        """Forward the direction whose map key is `key` (see `maps.map_key`) out of the hop's
        interface with its MACs (both `NO_MAC`: unchanged, bridged), through `limit`. False when
        the map is full (the direction then stays on the normal path)."""
        self._check_open()
        egress, dst_mac, src_mac = hop
        try:
            with self._lock:  # see expire_stale
                value = flow_value(egress, dst_mac, src_mac, time.monotonic_ns(), limit)
                try:
                    libbpf.map_update(self._flows, key, value, BPF_NOEXIST)
                    self._entries += 1
                except OSError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
                    libbpf.map_update(self._flows, key, value)  # a 5-tuple handed over again
        except OSError as exc:
            if exc.errno == errno.E2BIG:  # the map is full
                return False
            raise ThrottleError(f"cannot add a flow to the fast path: {exc.strerror}") from None
        return True

    def delete(self, key: bytes) -> None:
        """Stop fast-forwarding one direction; no error if it was not there."""
        self._check_open()
        try:
            with self._lock:
                if libbpf.map_delete(self._flows, key):
                    self._entries -= 1
        except OSError as exc:
            raise ThrottleError(f"cannot remove a flow from the fast path: {exc.strerror}") from None

    def put_flow(self, up: bytes, down: bytes, hops: tuple[Hop, Hop], upload: Optional[Limit] = None,
                 download: Optional[Limit] = None) -> bool:
        """Both directions of a flow, by their map keys, each with its way out and its limit;
        False, with nothing added, when they do not both fit."""
        if not self.put(up, hops[0], upload or NO_LIMIT):
            return False
        if not self.put(down, hops[1], download or NO_LIMIT):
            self.delete(up)
            return False
        return True

    def add(self, proto: int, src: Address, sport: int, dst: Address, dport: int, egress_ifindex: int,
            dst_mac: bytes, src_mac: bytes, limit: Optional[Limit] = None) -> bool:
        """`put` by 5-tuple: packets src:sport -> dst:dport out of `egress_ifindex`."""
        self._check_open()
        return self.put(map_key(proto, src, sport, dst, dport), (egress_ifindex, dst_mac, src_mac), limit or NO_LIMIT)

    def remove(self, proto: int, src: Address, sport: int, dst: Address, dport: int) -> None:
        """`delete` by 5-tuple."""
        self.delete(map_key(proto, src, sport, dst, dport))

    def add_flow(self, proto: int, client: Address, cport: int, server: Address, sport: int,
                 client_if: str, server_if: str, upload: Optional[Limit] = None,
                 download: Optional[Limit] = None) -> bool:
        """Both directions of a decided flow: client -> server packets (arriving on client_if) go
        out of server_if to the server's next hop, and the replies the other way, each through its
        limit if given. False, with nothing added, when a next hop's MAC is not in the neighbour
        table or the map is full. For tools and tests: it waits for the netlink worker to look up
        next hops it does not know (the censor's hand-over never waits)."""
        self._check_open()
        client, server = packed(client), packed(server)
        cidx, sidx = self.ifindex(client_if), self.ifindex(server_if)
        missing = self.hops.missing(cidx, client, sidx, server)
        if missing:
            self.hops.remember(self._worker().call(lambda ipr: Hops.lookup(ipr, missing)))
        hops = self.hops.flow(cidx, client, sidx, server)
        if hops is None:
            return False
        return self.put_flow(map_key(proto, client, cport, server, sport), map_key(proto, server, sport, client, cport),
                             hops, upload, download)

    def remove_flow(self, proto: int, client: Address, cport: int, server: Address, sport: int) -> None:
        """Both directions of a flow back to the normal path."""
        self.remove(proto, client, cport, server, sport)
        self.remove(proto, server, sport, client, cport)

    def set_bucket(self, index: int, rate: float, burst: int, tokens: float, stamp: float) -> bool:
        """Bucket `index` (1 and up) a token bucket with this rate (bytes/s), burst (bytes), and
        credit `tokens` (bytes) as of `stamp` (CLOCK_MONOTONIC seconds, the clock of the censor's
        event loop)."""
        return self._write_bucket(index, bucket_value(index, rate, burst, tokens, stamp))

    def set_window(self, index: int, rate: float, burst: int, start: float | None = None, used: int = 0) -> bool:
        """Bucket `index` (1 and up) a window meter: `burst` bytes in each interval of burst /
        `rate` seconds, the current one begun at `start` (CLOCK_MONOTONIC seconds, as `stamp`;
        None: the first begins at the next packet that meets it) with `used` bytes passed."""
        return self._write_bucket(index, window_value(index, rate, burst, start, used))

    def _write_bucket(self, index: int, value: bytes) -> bool:
        self._check_open()
        try:
            libbpf.map_update(self._buckets, INDEX.pack(index), value)
        except OSError as exc:
            raise ThrottleError(f"cannot set a fast-path bucket: {exc.strerror}") from None
        return True

    # -- shaping (waits for netlink: at start-up, and for tools) ---------------------------------

    def enable_shaping(self, interfaces: list[str]) -> None:
        """Make each interface's root qdisc the shaper's HTB, so that shaped directions can be
        given classes (`throttle.kernel.htb`)."""
        for name in interfaces:
            index = self.ifindex(name)
            self._worker().call(lambda ipr: self.qdiscs.enable(ipr, index))

    def add_class(self, ifname: str, minor: int, rate: float, burst: int, limit: int) -> int:
        """A shaping class on `ifname` (see `htb.Qdiscs.add`); returns its class id, the
        skb->priority of the packets it shapes."""
        index = self.ifindex(ifname)
        return self._worker().call(lambda ipr: self.qdiscs.add(ipr, index, minor, rate, burst, limit))

    def remove_class(self, ifname: str, minor: int) -> None:
        """Delete a shaping class (and its queue); no error if it is gone."""
        index = self.ifindex(ifname)
        self._worker().call(lambda ipr: self.qdiscs.remove(ipr, index, minor))

    # -- what the kernel did ---------------------------------------------------------------------

    def expire(self, idle: float, now_ns: Optional[int] = None) -> int:
        """Remove every direction that saw no packet for `idle` seconds (and was added at least
        that long ago); returns how many. `now_ns` is CLOCK_MONOTONIC, as the kernel's."""
        return len(self.expire_stale(self.counters(), idle, now_ns))

    def expire_stale(self, counters: Mapping[bytes, Counters], idle: float, now_ns: Optional[int] = None) -> list[bytes]:
        """Remove the directions that `counters` (a snapshot from `counters()`) shows idle for
        `idle` seconds and that are still idle now; returns the keys removed. Each key is looked up
        again and deleted under the lock `put` takes, so a direction added (or a 5-tuple reused)
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
                    if value is None or last_ns(value) >= limit:
                        continue
                    if libbpf.map_delete(self._flows, key):
                        self._entries -= 1
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
            libbpf.map_update(self._lease, LEASE_KEY, LEASE.pack(until))
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
        """What the kernel did with every direction in the map, by map key; read in batches, a few
        syscalls for the whole map."""
        self._check_open()
        try:
            return Snapshot.from_batches(libbpf.map_batches(self._flows, KEY.size, VALUE.size))
        except OSError as exc:
            raise ThrottleError(f"cannot read the fast-path flows: {exc.strerror}") from None

    def __len__(self) -> int:
        """Directions in the map now: counted as they are added and deleted (nothing else adds or
        deletes them), not walked."""
        return self._entries

    @property
    def hits(self) -> int:
        """Packets redirected so far, on all CPUs."""
        self._check_open()
        try:
            return libbpf.percpu_sum(self._hits, HITS_KEY)
        except OSError as exc:
            raise ThrottleError(f"cannot read the fast-path counter: {exc.strerror}") from None

    def fallbacks(self) -> dict[str, int]:
        """Packets the program handed to the normal path so far, by reason (`layout.FALLBACKS`):
        not in the map, a SYN, a fragment ... on all CPUs. One lookup per reason: for the
        walker's once-a-second read, not for every packet."""
        self._check_open()
        try:
            return libbpf.fallbacks(self._fallbacks)
        except OSError as exc:
            raise ThrottleError(f"cannot read the fast path's fallback counters: {exc.strerror}") from None

    # -- closing --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ThrottleError("this fast path is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Detach from every interface, delete the qdiscs added, close the fds. Idempotent;
        interfaces (or the namespace) already gone are no error."""
        for walker in self._walkers:  # before the maps' fds close under them
            walker.stop()
        self._walkers.clear()
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors: list[str] = []
        if self._netlink is not None:
            try:
                errors += self._netlink.call(self.qdiscs.disable)
            except ThrottleError as exc:
                errors.append(str(exc))
            for index, ours in self._attached:
                try:
                    self._netlink.call(lambda ipr: tc.detach(ipr, index, ours))
                except ThrottleError as exc:
                    errors.append(str(exc))
            self._attached.clear()
            self._netlink.close()
            self._netlink = None
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
