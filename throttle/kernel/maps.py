"""The eBPF program's maps as Python reads and writes them: the kernel's key of one direction of a
flow (`map_key`), a direction's value (with its random loss, `loss_threshold`) and a meter (a token
bucket or a window) packed for the maps, and what the program
counted, read back (`Counters`, `Snapshot`). The structs themselves (`KEY`, `VALUE`, `BUCKET`) are
the codecs of `throttle.kernel.layout`, the one definition both the C program and Python are made
from (libbpf refuses an object whose BTF differs from it).

Pure: no syscalls here (`throttle.kernel.fastpath` makes the map calls).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Union

from throttle.errors import ThrottleError
from throttle.kernel.layout import BUCKET, FLOW_KEY, FLOW_VALUE

__all__ = [
    "BUCKET", "BUCKETS", "HITS_KEY", "INDEX", "KEY", "LEASE", "LEASE_KEY", "LOSS_SCALE", "MAPS", "NO_LIMIT", "NO_MAC",
    "NS", "PROGRAM", "VALUE", "Address", "Counters", "Limit", "Snapshot", "bucket_value", "flow_value", "last_ns",
    "loss_threshold", "map_key", "packed", "window_value",
]

# An address: packed, or any form ipaddress takes.
Address = Union[bytes, str, ipaddress.IPv4Address, ipaddress.IPv6Address]

# -- the program's data layout (throttle.kernel.layout) -------------------------------------------

KEY, VALUE = FLOW_KEY, FLOW_VALUE
INDEX = struct.Struct("=I")  # the key of the array maps (buckets, hits, lease)
LEASE = struct.Struct("=Q")  # the lease's value: CLOCK_MONOTONIC ns
HITS_KEY = INDEX.pack(0)
LEASE_KEY = INDEX.pack(0)
BUCKETS = 131072  # entries of the buckets array; index 0 means "not limited"
PROGRAM = "throttle_ingress"
MAPS = ("flows", "buckets", "hits", "lease", "fallbacks")
NS = 1_000_000_000
NO_MAC = bytes(6)  # a flow entry without MACs: bridged, the frame goes out unchanged
LOSS_SCALE = 1 << 32  # bpf_get_prandom_u32()'s range: a loss probability of 1


@dataclass(frozen=True, slots=True)
class Limit:
    """How the kernel limits one direction of a flow: its bucket (an index given to `set_bucket`),
    the payload that passes free first, what the direction already carried, for a shaped
    direction its egress class (skb->priority, major:minor), and for random loss (action "loss")
    the chance each packet is dropped."""

    bucket: int
    after_bytes: int = 0
    carried: int = 0
    priority: int = 0
    loss: float = 0.0


NO_LIMIT = Limit(0)


def packed(address: Address) -> bytes:
    """An address as 4 (IPv4) or 16 (IPv6) bytes."""
    if isinstance(address, bytes):
        if len(address) not in (4, 16):
            raise ThrottleError(f"an address is 4 or 16 packed bytes, not {len(address)}")
        return address
    try:
        return ipaddress.ip_address(address).packed
    except ValueError:
        raise ThrottleError(f"not an IP address: {address!r}") from None


def map_key(proto: int, src: Address, sport: int, dst: Address, dport: int) -> bytes:
    """The kernel's 40-byte key of one direction of a flow, src:sport -> dst:dport (the engine's
    own key of a flow is `throttle.wire.ip.flow_key`; this one is the program's struct)."""
    src, dst = packed(src), packed(dst)
    if len(src) != len(dst):
        raise ThrottleError("a flow's addresses must be of one family")
    if proto not in (6, 17):
        raise ThrottleError(f"the fast path forwards TCP (6) and UDP (17), not protocol {proto}")
    if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
        raise ThrottleError(f"ports must be 0-65535, not {sport} and {dport}")
    family = 4 if len(src) == 4 else 6
    return KEY.pack(proto=proto, family=family, src=src.ljust(16, b"\0"), dst=dst.ljust(16, b"\0"), sport=sport,
                    dport=dport)


def flow_value(egress: int, dst_mac: bytes, src_mac: bytes, now_ns: int, limit: Limit) -> bytes:
    """A direction's map value as first written: no counts yet, last seen `now_ns`."""
    if len(dst_mac) != 6 or len(src_mac) != 6 or (dst_mac == NO_MAC) != (src_mac == NO_MAC):
        raise ThrottleError("MAC addresses are 6 bytes")
    return VALUE.pack(ifindex=egress, dst_mac=dst_mac, src_mac=src_mac, last_ns=now_ns, payload=limit.carried,
                      after_bytes=limit.after_bytes, bucket=limit.bucket, priority=limit.priority,
                      loss=loss_threshold(limit.loss))


def loss_threshold(probability: float) -> int:
    """The program's form of a loss probability: it drops a packet when bpf_get_prandom_u32() is
    below this, so 2^32 drops every one and 0 none (a probability above 0 is never rounded to 0)."""
    if not 0 <= probability <= 1:
        raise ThrottleError(f"a loss probability is between 0 and 1, not {probability}")
    return max(1, round(probability * LOSS_SCALE)) if probability > 0 else 0


def last_ns(value: bytes) -> int:
    """When the direction of a map value saw its last packet (CLOCK_MONOTONIC ns)."""
    return int(VALUE.unpack(value)["last_ns"])


def bucket_value(index: int, rate: float, burst: int, tokens: float, stamp: float) -> bytes:
    """Bucket `index`'s value as a token bucket: `rate` bytes/s, `burst` bytes, credit `tokens`
    bytes as of `stamp` (CLOCK_MONOTONIC seconds)."""
    _check_index(index)
    fill_ns = int(burst * NS / rate) + 1 if rate > 0 else 0
    return BUCKET.pack(rate=int(rate), burst=int(burst), fill_ns=fill_ns, tokens=int(max(0.0, tokens) * NS),
                       stamp_ns=int(stamp * NS))


def window_value(index: int, rate: float, burst: int, start: float | None, used: int) -> bytes:
    """Bucket `index`'s value as a window meter (engine/buckets.py WindowMeter): `burst` bytes in
    each interval of burst / `rate` seconds, the current one begun at `start` (CLOCK_MONOTONIC
    seconds; None: the first begins at the next packet) with `used` bytes passed in it."""
    _check_index(index)
    if rate <= 0 or burst <= 0:
        raise ThrottleError("a window meter needs a positive rate and burst")
    window_ns = max(1, round(burst * NS / rate))
    start_ns = 0 if start is None else max(1, int(start * NS))  # 0 is "not begun"
    return BUCKET.pack(rate=int(rate), burst=int(burst), window_ns=window_ns, start_ns=start_ns,
                       used=used if start is not None else 0)


def _check_index(index: int) -> None:
    if not 0 < index < BUCKETS:
        raise ThrottleError(f"bucket index {index} is outside 1-{BUCKETS - 1}")


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

    @classmethod
    def from_batches(cls, batches: Iterator[tuple[bytes, bytes, int]]) -> Snapshot:
        """From a batched read of the map (`libbpf.map_batches`): keys and values end to end."""
        keys: list[bytes] = []
        values: list[bytes] = []
        for kraw, vraw, n in batches:
            keys += [kraw[i * KEY.size : (i + 1) * KEY.size] for i in range(n)]
            values.append(vraw)
        return cls(keys, b"".join(values))

    def _at(self, i: int) -> Counters:
        v = VALUE.unpack(self._raw, i * VALUE.size)
        return Counters(v["bytes"], v["packets"], v["dropped_bytes"], v["dropped_packets"], v["last_ns"])

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
        totals = VALUE.iter_fields(self._raw, "bytes", "packets", "dropped_bytes", "dropped_packets")
        for key, (nbytes, packets, dbytes, dpackets) in zip(self._keys, totals):
            yield key, nbytes, packets, dbytes, dpackets

    def stale(self, limit_ns: int) -> list[bytes]:
        """Keys whose last packet was before `limit_ns` (CLOCK_MONOTONIC)."""
        return [key for key, last in zip(self._keys, VALUE.column(self._raw, "last_ns")) if last < limit_ns]
