"""The one definition of what the eBPF program and Python share: the map structs (`flow_key`,
`flow_value`, with a direction's random loss, `bucket`: a token bucket or a window meter), the maps that hold them, and the
reasons a packet falls back to the normal path (the index of the `fallbacks` map).

Both sides come from here. `c_header()` is the text of `bpf/layout.h`, which throttle.bpf.c
includes (`throttle kernel build` rewrites it when this definition changes; a unit test keeps the
committed copy current), and each `Struct` is the Python codec of one C struct: its size, `pack`
from named fields, `unpack` to named fields, and `iter_fields`/`column` over a packed array of
values (a walk of the flows map), which leave all per-entry work to `struct` and `operator`.

The definition is Python, not C, because Python needs the layout where there is no compiled
object (the unit tier, a base install, `struct` formats made once at import). The C compiler could
still disagree (a stale object, a hand-edited header, a struct declared in the .c), so
`throttle.kernel.libbpf` compares every object it opens with this definition through the object's
BTF, field by field (`Struct.mismatch`, `map_mismatch`), and refuses one that differs with a
ThrottleError naming the struct and the field: two same-sized fields swapped can never again
pass unnoticed and corrupt counters or buckets.

Every field sits at its natural alignment with explicit padding (`pad`), checked here, so the
`struct` formats (no alignment, "=" or "!") and the C compiler place every byte alike. Nothing
here does I/O.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["BUCKET", "FALLBACKS", "FLOW_KEY", "FLOW_VALUE", "MAPS", "STRUCTS", "Fallback", "Field", "Map",
           "Struct", "c_header", "map_mismatch"]


@dataclass(frozen=True, slots=True)
class CType:
    """A C type a field may have: its spelling, size, `struct` code ("" for bytes the kernel owns,
    which Python leaves as zero padding), and whether it is big-endian (network order)."""

    c: str
    size: int
    code: str
    big_endian: bool = False


U8 = CType("__u8", 1, "B")
BE16 = CType("__be16", 2, "H", big_endian=True)
U32 = CType("__u32", 4, "I")
U64 = CType("__u64", 8, "Q")
SPIN_LOCK = CType("struct bpf_spin_lock", 4, "")


@dataclass(frozen=True, slots=True)
class Field:
    """One member of a struct. `count` > 1 makes an array (of bytes only: a `bytes` value in
    Python); `pad` makes it padding, zero and not a named value."""

    name: str
    type: CType
    count: int = 1
    doc: str = ""
    pad: bool = False

    @property
    def size(self) -> int:
        return self.type.size * self.count

    @property
    def named(self) -> bool:
        """Whether Python reads and writes it (padding and the kernel's spin lock it does not)."""
        return not self.pad and bool(self.type.code)


class Struct:
    """A C struct and its Python codec. Values go in and come out by field name; `struct` (the
    underlying `struct.Struct`) packs them in the definition's order, padding left out."""

    def __init__(self, name: str, doc: str, fields: Sequence[Field]) -> None:
        self.name = name
        self.doc = doc
        self.fields = tuple(fields)
        self.offsets: dict[str, int] = {}
        codes, offset, align, orders = [], 0, 1, set()
        for f in self.fields:
            if f.name in self.offsets:
                raise ValueError(f"struct {name}: field {f.name} twice")
            if f.count > 1 and f.type is not U8:
                raise ValueError(f"struct {name}: {f.name}: arrays are of __u8 only")
            if offset % f.type.size:
                raise ValueError(f"struct {name}: {f.name} at byte {offset} is not aligned: add a pad field")
            self.offsets[f.name] = offset
            offset += f.size
            align = max(align, f.type.size)
            if not f.named:
                codes.append(f"{f.size}x")
            elif f.count > 1:
                codes.append(f"{f.count}s")
            else:
                codes.append(f.type.code)
                if f.size > 1:
                    orders.add(f.type.big_endian)
        if offset % align:
            raise ValueError(f"struct {name}: {offset} bytes, not a multiple of {align}: add a pad field at the end")
        if len(orders) > 1:
            raise ValueError(f"struct {name}: both network-order and host-order fields; struct has one byte order")
        self.struct = struct.Struct(("!" if orders == {True} else "=") + "".join(codes))
        assert self.struct.size == offset
        self.size = offset
        self.names = tuple(f.name for f in self.fields if f.named)
        self.positions = {n: i for i, n in enumerate(self.names)}  # index in an unpacked tuple
        self._zero: list[Any] = [bytes(f.count) if f.count > 1 else 0 for f in self.fields if f.named]

    def __repr__(self) -> str:
        return f"<struct {self.name}, {self.size} bytes: {', '.join(self.names)}>"

    def pack(self, **values: Any) -> bytes:
        """The packed struct; fields not given are zero."""
        packed = self._zero.copy()
        for name, value in values.items():
            try:
                packed[self.positions[name]] = value
            except KeyError:
                raise TypeError(f"struct {self.name} has no field {name}") from None
        return self.struct.pack(*packed)

    def unpack(self, raw: bytes, offset: int = 0) -> dict[str, Any]:
        """The struct at `offset` of `raw`, by field name."""
        return dict(zip(self.names, self.struct.unpack_from(raw, offset)))

    def getter(self, *names: str) -> Callable[[tuple[Any, ...]], Any]:
        """An itemgetter of these fields from a tuple `struct` unpacked: one value for one name,
        a tuple for several."""
        try:
            return operator.itemgetter(*(self.positions[n] for n in names))
        except KeyError as exc:
            raise TypeError(f"struct {self.name} has no field {exc.args[0]}") from None

    def iter_fields(self, raw: bytes, *names: str) -> Iterator[tuple[Any, ...]]:
        """A tuple of the named fields (all, in order, when none are named) of every struct
        packed end to end in `raw`; the per-entry work is `struct`'s and `operator`'s, in C."""
        if not names:
            return self.struct.iter_unpack(raw)
        if len(names) == 1:
            return zip(self.column(raw, names[0]))
        return map(self.getter(*names), self.struct.iter_unpack(raw))

    def column(self, raw: bytes, name: str) -> Iterator[Any]:
        """One field of every struct packed end to end in `raw`."""
        return map(self.getter(name), self.struct.iter_unpack(raw))

    def mismatch(self, found: tuple[int, Sequence[tuple[str, int, int]]] | None) -> str | None:
        """What differs between this definition and a struct as an object's BTF describes it:
        (size, [(member, byte offset, size), ...] in order), or None for no such struct. None when
        they agree; else one line naming the struct and the field."""
        if found is None:
            return f"it has no struct {self.name}"
        size, members = found
        theirs = {m[0]: m for m in members}
        for f in self.fields:
            if f.name not in theirs:
                return f"its struct {self.name} has no field {f.name}"
            _, offset, fsize = theirs[f.name]
            if (offset, fsize) != (self.offsets[f.name], f.size):
                clash = [m[0] for m in members if m[1] == self.offsets[f.name] and m[0] != f.name]
                where = f" (where layout.py has {f.name}, it has {clash[0]})" if clash else ""
                return (f"its struct {self.name} has field {f.name} at byte {offset}, {fsize} bytes; layout.py "
                        f"expects byte {self.offsets[f.name]}, {f.size} bytes{where}")
        extra = [m[0] for m in members if m[0] not in self.offsets]
        if extra:
            return f"its struct {self.name} has field {extra[0]}, which layout.py does not define"
        if size != self.size:
            return f"its struct {self.name} is {size} bytes; layout.py expects {self.size}"
        return None

    def c(self) -> str:
        """The C declaration."""
        lines = [_commented(f"struct {self.name} {{", self.doc)]
        for f in self.fields:
            lines.append(_commented(f"\t{f.type.c} {f.name}{f'[{f.count}]' if f.count > 1 else ''};", f.doc))
        return "\n".join(lines + ["};"])


def _commented(code: str, doc: str, column: int = 32) -> str:
    """`code` with its comment from `column` (tabs of 8), as the rest of the C is written."""
    if not doc:
        return code
    width = len(code.expandtabs(8))
    return f"{code}{' ' * max(1, column - width)}/* {doc} */"


# -- the maps' structs ------------------------------------------------------------------------------

FLOW_KEY = Struct("flow_key", "one direction of a flow, addresses and ports as on the wire", (
    Field("proto", U8, doc="IPPROTO_TCP or IPPROTO_UDP"),
    Field("family", U8, doc="4 or 6"),
    Field("pad", U8, 2, pad=True),
    Field("src", U8, 16, doc="IPv4: the first 4 bytes, the rest zero"),
    Field("dst", U8, 16),
    Field("sport", BE16),
    Field("dport", BE16),
))

FLOW_VALUE = Struct("flow_value", "what the program does with one direction, and what it did", (
    Field("ifindex", U32, doc="egress interface"),
    Field("dst_mac", U8, 6, doc="the next hop's; all zero: bridged, the frame goes out as it came"),
    Field("src_mac", U8, 6, doc="the egress interface's"),
    Field("last_ns", U64, doc="CLOCK_MONOTONIC of the last packet seen, for idle expiry"),
    Field("bytes", U64, doc="IP bytes forwarded"),
    Field("packets", U64),
    Field("dropped_bytes", U64, doc="IP bytes the policer dropped"),
    Field("dropped_packets", U64),
    Field("payload", U64, doc="transport payload carried so far, dropped packets included"),
    Field("after_bytes", U64, doc="payload that passes before the bucket applies"),
    Field("bucket", U32, doc="index into `buckets`; 0: this direction is not limited"),
    Field("priority", U32, doc="skb->priority: the shaper's HTB class (major:minor); 0: not shaped"),
    Field("loss", U64, doc="random loss: a packet drops when a 32-bit random draw is below this; 0: none"),
))

BUCKET = Struct("bucket", "a policer's meter (engine/buckets.py): a token bucket, or a window", (
    Field("lock", SPIN_LOCK, doc="the kernel's; Python leaves it zero"),
    Field("pad", U32, pad=True),
    Field("rate", U64, doc="bytes per second; 0 freezes once the burst is spent"),
    Field("burst", U64, doc="bytes (a window's: its budget per interval)"),
    Field("fill_ns", U64, doc="how long an empty bucket takes to fill: burst / rate"),
    Field("tokens", U64, doc="credit, in bytes x 10^9"),
    Field("stamp_ns", U64, doc="when the credit was last brought up to date"),
    Field("window_ns", U64, doc="a window's interval, burst / rate; 0: a token bucket (Policer)"),
    Field("start_ns", U64, doc="when the window's interval began; 0: at its next packet"),
    Field("used", U64, doc="bytes the window passed in its interval"),
))

STRUCTS = (FLOW_KEY, FLOW_VALUE, BUCKET)

# -- why a packet takes the normal path ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fallback:
    """A reason the program returns a packet to the normal path; its index in FALLBACKS is its
    index in the `fallbacks` map and its value in the C enum (FALLBACK_<NAME>)."""

    name: str
    doc: str


FALLBACKS = (
    Fallback("short", "the frame ends inside a header the program reads"),
    Fallback("not_ip", "neither IPv4 nor IPv6 (ARP, a VLAN tag, ...)"),
    Fallback("ipv4_options", "an IPv4 header with options (or not version 4)"),
    Fallback("ipv4_fragment", "an IPv4 fragment"),
    Fallback("ipv6_extension", "an IPv6 extension header before the transport's"),
    Fallback("not_tcp_udp", "a transport other than TCP and UDP"),
    Fallback("tcp_syn", "a TCP SYN: a new connection on an old 5-tuple is inspected afresh"),
    Fallback("no_flow", "no entry in `flows`: not decided (yet), or not the fast path's"),
    Fallback("lease_expired", "the censor's lease ran out: its decisions no longer hold"),
    Fallback("ttl_expiring", "a routed direction whose TTL or hop limit would expire here"),
    Fallback("store_failed", "rewriting the TTL or the IPv4 checksum failed"),
)

# -- the maps -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Map:
    """What Python expects of one map of the object: key and value sizes, and a fixed number of
    entries (0: Python may size it)."""

    key_size: int
    value_size: int
    max_entries: int = 0


MAPS = {
    "flows": Map(FLOW_KEY.size, FLOW_VALUE.size),
    "buckets": Map(4, BUCKET.size),
    "fallbacks": Map(4, 8, len(FALLBACKS)),  # per CPU: a __u64 count each
}


def map_mismatch(name: str, key_size: int, value_size: int, max_entries: int) -> str | None:
    """What differs between the map `name` of an object and MAPS; None when nothing does."""
    want = MAPS[name]
    if (key_size, value_size) != (want.key_size, want.value_size):
        return (f"its map {name} has {key_size}-byte keys and {value_size}-byte values; layout.py expects "
                f"{want.key_size} and {want.value_size}")
    if want.max_entries and max_entries != want.max_entries:
        return f"its map {name} has {max_entries} entries; layout.py expects {want.max_entries}"
    return None


# -- the C side -----------------------------------------------------------------------------------------

HEADER = "layout.h"  # beside throttle.bpf.c


def c_header() -> str:
    """The text of bpf/layout.h."""
    enum = [_commented("enum fallback_reason {", "why a packet took the normal path: its index in `fallbacks`")]
    for i, reason in enumerate(FALLBACKS):
        enum.append(_commented(f"\tFALLBACK_{reason.name.upper()} = {i},", reason.doc, 40))
    enum += [f"\tFALLBACK_REASONS = {len(FALLBACKS)}", "};"]
    parts = [
        "/* SPDX-License-Identifier: GPL-2.0 */",
        "/* Generated from throttle/kernel/layout.py, the one definition of the data this program shares with\n"
        " * Python: edit that, then run `throttle kernel build`, which rewrites this file. Do not edit it here. */",
        "#ifndef THROTTLE_LAYOUT_H\n#define THROTTLE_LAYOUT_H",
        "#include <linux/types.h>\n#include <linux/bpf.h>",
        *(s.c() for s in STRUCTS),
        "\n".join(enum),
        "#endif",
    ]
    return "\n\n".join(parts) + "\n"
