"""The kernel fast path for decided flows: a tc eBPF program that forwards them past netfilter.

Once the engine has decided a flow, every later packet of it still costs the censor namespace its
netfilter hooks and conntrack (15-25 % of forwarding throughput on a small VM). This module loads
one small eBPF program on the clsact *ingress* hook of each censor interface (cls_bpf,
direct-action). For every IPv4/IPv6 TCP or UDP packet it looks the 5-tuple up in a BPF hash map;
on a hit it rewrites the Ethernet addresses, decrements the TTL / hop limit (fixing the IPv4 header
checksum) and redirects the packet to the egress interface stored with the flow, so it never
reaches the IP stack, netfilter or NFQUEUE. On a miss it returns TC_ACT_OK and the packet takes
the normal path. Packets it does not parse are always passed: IPv4 with options or fragments,
IPv6 with extension headers, anything but TCP and UDP, and packets whose TTL would expire (the
kernel then sends the ICMP error).

No compiler runs: the program is assembled here from `struct bpf_insn`s, loaded with the `bpf(2)`
syscall through ctypes, and attached with pyroute2 (`tc qdisc add ... clsact` and
`tc filter add ... ingress bpf da`). Everything attached is removed by `FastPath.close()`; deleting
the namespace removes it too. A FastPath left behind by a process that was killed keeps
forwarding the flows it had (fail-open, like `--queue-bypass`); the next FastPath on the same
interfaces replaces it.

pyroute2's synchronous API cannot run inside a running asyncio loop (the censor's hook is one),
so every netlink request runs on a worker thread of our own, created from the thread that
constructs the FastPath and therefore in the same network namespace.

Map layout (all in host order except where the packet's order is kept):

    key   (40 bytes)  u8 proto, u8 family (4|6), 2 zero bytes, src[16], dst[16],
                      be16 sport, be16 dport; IPv4 addresses in the first 4 bytes, rest zero
    value (32 bytes)  u32 egress ifindex, dst MAC[6], src MAC[6],
                      u64 CLOCK_MONOTONIC ns of the last packet forwarded (for `expire()`),
                      u64 bytes forwarded (an atomic add; for the exporter's speeds)

Because fast-pathed packets skip conntrack, the censor's conntrack entries of those flows stop
advancing; use `expire()` (or `remove()`) to hand idle or finished flows back to the slow path.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import platform
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Optional, TypeVar, Union

from throttle.errors import ThrottleError

__all__ = ["FastPath", "available", "interface_mac", "neighbour_mac"]

T = TypeVar("T")
Address = Union[bytes, str, ipaddress.IPv4Address, ipaddress.IPv6Address]  # packed, or any form ipaddress takes

# -- bpf(2) -------------------------------------------------------------------------------------

SYS_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280}

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_ANY = 0

ATTR_SIZE = 128  # larger than every attr we fill; the kernel checks the tail is zero
LOG_SIZE = 1 << 20

# -- tc -----------------------------------------------------------------------------------------

TC_H_CLSACT_INGRESS = 0xFFFFFFF2  # parent "ffff:fff2"
TC_H_CLSACT_EGRESS = 0xFFFFFFF3
FILTER_NAME = "throttle-fastpath"
FILTER_PRIO = 1  # evaluated before any other ingress filter
FILTER_HANDLE = 0x7A57
ETH_P_ALL = 0x0003

TC_ACT_OK = 0

# -- the program's data layout ------------------------------------------------------------------

KEY = struct.Struct("!BBxx16s16sHH")  # ports stay in network order, as in the packet
VALUE = struct.Struct("=I6s6sQQ")  # the timestamp lands 8-aligned at offset 16, the byte count at 24
assert KEY.size == 40 and VALUE.size == 32
HITS_KEY = struct.pack("=I", 0)

NUD_INVALID = 0x00 | 0x01 | 0x20  # NUD_NONE, NUD_INCOMPLETE, NUD_FAILED: no usable address


# -- a tiny eBPF assembler ----------------------------------------------------------------------

# Instruction classes, sizes, modes, operations (linux/bpf_common.h, linux/bpf.h).
_LD, _LDX, _ST, _STX, _ALU64, _JMP = 0x00, 0x01, 0x02, 0x03, 0x07, 0x05
_SIZES = {1: 0x10, 2: 0x08, 4: 0x00, 8: 0x18}
_IMM, _MEM = 0x00, 0x60
_K, _X = 0x00, 0x08
_ALU_OPS = {"add": 0x00, "sub": 0x10, "or": 0x40, "and": 0x50, "lsh": 0x60, "rsh": 0x70, "mov": 0xB0}
_JMP_OPS = {"ja": 0x00, "jeq": 0x10, "jgt": 0x20, "jge": 0x30, "jne": 0x50, "jlt": 0xA0, "jle": 0xB0}
_CALL, _EXIT = 0x80, 0x90
BPF_PSEUDO_MAP_FD = 1
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)

# Helpers (enum bpf_func_id).
FN_MAP_LOOKUP_ELEM = 1
FN_KTIME_GET_NS = 5
FN_SKB_STORE_BYTES = 9
FN_L3_CSUM_REPLACE = 10
FN_REDIRECT = 23
FN_SKB_LOAD_BYTES = 26


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One `struct bpf_insn` (little-endian bitfields: dst in the low nibble)."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


class Asm:
    """Builds a program instruction by instruction; jumps name labels, resolved by `code()`."""

    def __init__(self) -> None:
        self._insns: list[Union[bytes, tuple[int, int, int, int, str]]] = []
        self._labels: dict[str, int] = {}

    def raw(self, insn: bytes) -> None:
        self._insns.append(insn)

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"label {name} defined twice")
        self._labels[name] = len(self._insns)

    def alu(self, op: str, dst: int, src_or_imm: int, *, reg: bool = False) -> None:
        code = _ALU64 | _ALU_OPS[op] | (_X if reg else _K)
        self._insns.append(_insn(code, dst, src_or_imm if reg else 0, 0, 0 if reg else src_or_imm))

    def mov(self, dst: int, imm: int) -> None:
        self.alu("mov", dst, imm)

    def movr(self, dst: int, src: int) -> None:
        self.alu("mov", dst, src, reg=True)

    def ldx(self, size: int, dst: int, src: int, off: int) -> None:
        self._insns.append(_insn(_LDX | _MEM | _SIZES[size], dst, src, off))

    def stx(self, size: int, dst: int, off: int, src: int) -> None:
        self._insns.append(_insn(_STX | _MEM | _SIZES[size], dst, src, off))

    def st(self, size: int, dst: int, off: int, imm: int) -> None:
        self._insns.append(_insn(_ST | _MEM | _SIZES[size], dst, 0, off, imm))

    def ld_map_fd(self, dst: int, fd: int) -> None:
        """The two-slot 64-bit immediate load that the verifier turns into a map pointer."""
        self._insns.append(_insn(_LD | _IMM | 0x18, dst, BPF_PSEUDO_MAP_FD, 0, fd))
        self._insns.append(_insn(0))

    def jmp(self, op: str, dst: int, imm: int, target: str) -> None:
        self._insns.append((_JMP | _JMP_OPS[op] | _K, dst, 0, imm, target))

    def ja(self, target: str) -> None:
        self.jmp("ja", 0, 0, target)

    def call(self, helper: int) -> None:
        self._insns.append(_insn(_JMP | _CALL, imm=helper))

    def exit(self) -> None:
        self._insns.append(_insn(_JMP | _EXIT))

    def code(self) -> bytes:
        out = []
        for i, insn in enumerate(self._insns):
            if isinstance(insn, tuple):
                code, dst, src, imm, target = insn
                if target not in self._labels:
                    raise ValueError(f"jump to undefined label {target}")
                out.append(_insn(code, dst, src, self._labels[target] - i - 1, imm))
            else:
                out.append(insn)
        return b"".join(out)


# Stack layout of the program (offsets from r10; the verifier wants every access aligned to its
# size, so the packet copy starts 2 bytes past an 8-byte boundary and the IP header lands on one).
S_KEY = -48  # 40 bytes: the map key being built
S_HITS_KEY = -56  # u32 0: the key of the hit counter
S_FLAGS = -52  # 1 byte: TCP flags
S_ETH = -126  # 14 bytes of Ethernet header, then the IP header (and the ports) at S_IP
S_IP = S_ETH + 14  # -112: 20 bytes IPv4 + 4, or 40 bytes IPv6 + 4, up to -68
ETH_LEN = 14


def program(flows_fd: int, hits_fd: int) -> bytes:
    """The tc ingress program; see the module docstring for what it does."""
    a = Asm()
    a.movr(R6, R1)  # r6 = skb for the whole program

    def load_bytes(offset: int, stack: int, length: int) -> None:
        a.movr(R1, R6)
        a.mov(R2, offset)
        a.movr(R3, R10)
        a.alu("add", R3, stack)
        a.mov(R4, length)
        a.call(FN_SKB_LOAD_BYTES)
        a.jmp("jne", R0, 0, "pass")  # too short

    def store_bytes(offset: int, base: int, base_off: int, length: int, on_fail: str) -> None:
        """bpf_skb_store_bytes(skb, offset, base + base_off, length, 0); jump on failure."""
        a.movr(R1, R6)
        a.mov(R2, offset)
        a.movr(R3, base)
        a.alu("add", R3, base_off)
        a.mov(R4, length)
        a.mov(R5, 0)
        a.call(FN_SKB_STORE_BYTES)
        a.jmp("jne", R0, 0, on_fail)

    load_bytes(0, S_ETH, ETH_LEN)
    for off in range(0, 40, 8):
        a.st(8, R10, S_KEY + off, 0)
    a.ldx(2, R7, R10, S_ETH + 12)  # ethertype, as the little-endian load of two big-endian bytes
    a.jmp("jeq", R7, 0x0008, "ipv4")
    a.jmp("jeq", R7, 0xDD86, "ipv6")
    a.ja("pass")

    a.label("ipv4")
    load_bytes(ETH_LEN, S_IP, 20 + 4)
    a.ldx(1, R1, R10, S_IP)
    a.jmp("jne", R1, 0x45, "pass")  # version 4, no options
    a.ldx(2, R1, R10, S_IP + 6)
    a.alu("and", R1, 0xFF3F)  # MF and the fragment offset (bytes 0x3F 0xFF, loaded little-endian)
    a.jmp("jne", R1, 0, "pass")
    a.ldx(1, R8, R10, S_IP + 9)  # protocol
    a.st(1, R10, S_KEY + 1, 4)
    for src, dst in ((12, 4), (16, 20), (20, 36)):  # saddr, daddr, ports
        a.ldx(4, R1, R10, S_IP + src)
        a.stx(4, R10, S_KEY + dst, R1)
    a.mov(R9, 4)
    a.ja("l4")

    a.label("ipv6")
    load_bytes(ETH_LEN, S_IP, 40 + 4)
    a.ldx(1, R1, R10, S_IP)
    a.alu("rsh", R1, 4)
    a.jmp("jne", R1, 6, "pass")
    a.ldx(1, R8, R10, S_IP + 6)  # next header: only TCP or UDP directly
    a.st(1, R10, S_KEY + 1, 6)
    for i in range(0, 36, 4):  # saddr, daddr (8 + 8 words), then the ports
        a.ldx(4, R1, R10, S_IP + 8 + i)
        a.stx(4, R10, S_KEY + 4 + i, R1)
    a.mov(R9, 6)

    a.label("l4")
    a.jmp("jeq", R8, 6, "proto")
    a.jmp("jne", R8, 17, "pass")
    a.label("proto")
    a.stx(1, R10, S_KEY, R8)
    # A SYN always takes the normal path: a new connection that reuses a decided flow's 5-tuple
    # must be inspected afresh (the censor ends the old flow when it sees the SYN).
    a.jmp("jne", R8, 6, "lookup")
    a.mov(R2, ETH_LEN + 20 + 13)
    a.jmp("jeq", R9, 4, "flags")
    a.mov(R2, ETH_LEN + 40 + 13)
    a.label("flags")
    a.movr(R1, R6)
    a.movr(R3, R10)
    a.alu("add", R3, S_FLAGS)
    a.mov(R4, 1)
    a.call(FN_SKB_LOAD_BYTES)
    a.jmp("jne", R0, 0, "pass")
    a.ldx(1, R1, R10, S_FLAGS)
    a.alu("and", R1, 0x02)
    a.jmp("jne", R1, 0, "pass")
    a.label("lookup")
    a.ld_map_fd(R1, flows_fd)
    a.movr(R2, R10)
    a.alu("add", R2, S_KEY)
    a.call(FN_MAP_LOOKUP_ELEM)
    a.jmp("jeq", R0, 0, "pass")
    a.movr(R7, R0)  # r7 = the flow's value, for the rest of the program

    # The router's part of forwarding: TTL / hop limit. At 1 the kernel must answer (ICMP).
    a.jmp("jeq", R9, 6, "hop6")
    a.ldx(2, R8, R10, S_IP + 8)  # TTL and protocol as one checksum word (TTL in the low byte)
    a.movr(R1, R8)
    a.alu("and", R1, 0xFF)
    a.jmp("jle", R1, 1, "pass")
    a.movr(R1, R6)
    a.mov(R2, ETH_LEN + 10)  # the header checksum
    a.movr(R3, R8)
    a.movr(R4, R8)
    a.alu("sub", R4, 1)  # TTL - 1; no borrow, as TTL >= 2
    a.mov(R5, 2)
    a.call(FN_L3_CSUM_REPLACE)
    a.jmp("jne", R0, 0, "pass")
    a.alu("sub", R8, 1)
    a.stx(2, R10, S_IP + 8, R8)
    store_bytes(ETH_LEN + 8, R10, S_IP + 8, 1, "drop")  # checksum already changed: never let this one go on
    a.ja("macs")

    a.label("hop6")
    a.ldx(1, R1, R10, S_IP + 7)
    a.jmp("jle", R1, 1, "pass")
    a.alu("sub", R1, 1)
    a.stx(1, R10, S_IP + 7, R1)
    store_bytes(ETH_LEN + 7, R10, S_IP + 7, 1, "pass")

    a.label("macs")
    store_bytes(0, R7, 4, 12, "drop")  # the new destination and source MAC; TTL already decremented

    a.call(FN_KTIME_GET_NS)
    a.stx(8, R7, 16, R0)  # last used, for expire()
    a.ldx(4, R1, R6, 0)  # skb->len
    a.raw(_insn(0xDB, R7, R1, 24, 0))  # lock *(u64 *)(r7 + 24) += r1 (BPF_STX | BPF_ATOMIC | BPF_DW, BPF_ADD)
    a.st(4, R10, S_HITS_KEY, 0)
    a.ld_map_fd(R1, hits_fd)
    a.movr(R2, R10)
    a.alu("add", R2, S_HITS_KEY)
    a.call(FN_MAP_LOOKUP_ELEM)
    a.jmp("jeq", R0, 0, "redirect")
    a.ldx(8, R1, R0, 0)
    a.alu("add", R1, 1)
    a.stx(8, R0, 0, R1)  # a per-CPU counter: no atomics needed
    a.label("redirect")
    a.ldx(4, R1, R7, 0)
    a.mov(R2, 0)  # to the interface's egress
    a.call(FN_REDIRECT)  # TC_ACT_REDIRECT
    a.exit()

    a.label("drop")
    a.mov(R0, 2)  # TC_ACT_SHOT
    a.exit()
    a.label("pass")
    a.mov(R0, TC_ACT_OK)
    a.exit()
    return a.code()


# -- the syscall --------------------------------------------------------------------------------

_libc: Optional[ctypes.CDLL] = None


def _syscall_nr() -> int:
    machine = platform.machine()
    if machine not in SYS_BPF:
        raise ThrottleError(f"the fast path supports x86_64 and aarch64, not {machine}")
    return SYS_BPF[machine]


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    """bpf(cmd, attr, size); returns the result or raises OSError with the errno."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    ret = _libc.syscall(ctypes.c_long(_syscall_nr()), ctypes.c_long(cmd), attr, ctypes.c_ulong(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _attr() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(ATTR_SIZE)


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def _map_create(map_type: int, key_size: int, value_size: int, max_entries: int, name: str) -> int:
    attr = _attr()
    struct.pack_into("=IIIII", attr, 0, map_type, key_size, value_size, max_entries, 0)
    struct.pack_into("16s", attr, 28, name.encode())
    try:
        return _bpf(BPF_MAP_CREATE, attr)
    except OSError as exc:
        hint = " (not root, or no CAP_BPF)" if exc.errno == 1 else ""
        raise ThrottleError(f"the kernel refused a BPF map for the fast path: {exc.strerror}{hint}") from None


def _prog_load(code: bytes, name: str) -> int:
    """Load a SCHED_CLS program. On rejection, load again with a log to say why."""
    insns = ctypes.create_string_buffer(code, len(code))
    gpl = ctypes.create_string_buffer(b"GPL")  # the helpers used are GPL-only

    def load(log_level: int, log: Optional[ctypes.Array[ctypes.c_char]]) -> int:
        attr = _attr()
        struct.pack_into("=IIQQIIQ", attr, 0, BPF_PROG_TYPE_SCHED_CLS, len(code) // 8, _addr(insns),
                         _addr(gpl), log_level, len(log) if log is not None else 0,
                         _addr(log) if log is not None else 0)
        struct.pack_into("16s", attr, 48, name.encode())
        return _bpf(BPF_PROG_LOAD, attr)

    try:
        return load(0, None)
    except OSError:
        log = ctypes.create_string_buffer(LOG_SIZE)
        try:
            return load(1, log)  # loads with a log but not without one: keep it
        except OSError as exc:
            lines = [line.strip() for line in log.value.decode(errors="replace").splitlines()
                     if line.strip() and not line.startswith(("processed ", "verification time"))]
            detail = " / ".join(lines[-3:]) if lines else exc.strerror  # the rejection is at the end
            hint = " (not root, or no CAP_BPF)" if exc.errno == 1 and not lines else ""
            raise ThrottleError(f"the kernel refused the fast-path BPF program: {detail}{hint}") from None


def _map_update(fd: int, key: bytes, value: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    attr = _attr()
    struct.pack_into("=IxxxxQQQ", attr, 0, fd, _addr(k), _addr(v), BPF_ANY)
    _bpf(BPF_MAP_UPDATE_ELEM, attr)


def _map_delete(fd: int, key: bytes) -> bool:
    k = ctypes.create_string_buffer(key, len(key))
    attr = _attr()
    struct.pack_into("=IxxxxQ", attr, 0, fd, _addr(k))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, attr)
    except OSError as exc:
        if exc.errno == 2:  # ENOENT
            return False
        raise
    return True


def _map_lookup(fd: int, key: bytes, value_size: int) -> Optional[bytes]:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    attr = _attr()
    struct.pack_into("=IxxxxQQ", attr, 0, fd, _addr(k), _addr(v))
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr)
    except OSError as exc:
        if exc.errno == 2:
            return None
        raise
    return v.raw


def _map_keys(fd: int, key_size: int) -> list[bytes]:
    keys: list[bytes] = []
    cur: Optional[ctypes.Array[ctypes.c_char]] = None
    while True:
        nxt = ctypes.create_string_buffer(key_size)
        attr = _attr()
        struct.pack_into("=IxxxxQQ", attr, 0, fd, _addr(cur) if cur is not None else 0, _addr(nxt))
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr)
        except OSError as exc:
            if exc.errno == 2:
                return keys
            raise
        keys.append(nxt.raw)
        cur = nxt


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
    """The eBPF fast path on the ingress of `interfaces` of the current network namespace.

    Use as a context manager or call `close()`; both remove the filters and the clsact qdiscs
    this instance added.
    """

    def __init__(self, interfaces: list[str], max_entries: int = 65536) -> None:
        if os.geteuid() != 0:
            raise ThrottleError("the fast path needs root (BPF and tc): run with sudo")
        _syscall_nr()
        self.max_entries = max_entries
        self._fds: list[int] = []
        self._attached: list[tuple[int, bool]] = []  # (ifindex, clsact is ours to delete)
        self._ifindex: dict[str, int] = {}
        self._macs: dict[tuple[int, bytes], bytes] = {}  # (ifindex, address) -> next hop's MAC
        self._if_macs: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._rtnl: Optional[_Rtnl] = None
        try:
            self._flows = _map_create(BPF_MAP_TYPE_HASH, KEY.size, VALUE.size, max_entries, "fp_flows")
            self._fds.append(self._flows)
            self._hits = _map_create(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 1, "fp_hits")
            self._fds.append(self._hits)
            self._prog = _prog_load(program(self._flows, self._hits), "throttle_fp")
            self._fds.append(self._prog)
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

    # -- flows ----------------------------------------------------------------------------------

    def add(self, proto: int, src: Address, sport: int, dst: Address, dport: int, egress_ifindex: int,
            dst_mac: bytes, src_mac: bytes) -> bool:
        """Forward packets src:sport -> dst:dport out of `egress_ifindex` with these MACs.
        False when the map is full (the flow then stays on the normal path)."""
        self._check_open()
        if len(dst_mac) != 6 or len(src_mac) != 6:
            raise ThrottleError("MAC addresses are 6 bytes")
        key = flow_key(proto, src, sport, dst, dport)
        value = VALUE.pack(egress_ifindex, dst_mac, src_mac, time.monotonic_ns(), 0)
        try:
            _map_update(self._flows, key, value)
        except OSError as exc:
            if exc.errno == 7:  # E2BIG: the map is full
                return False
            raise ThrottleError(f"cannot add a flow to the fast path: {exc.strerror}") from None
        return True

    def remove(self, proto: int, src: Address, sport: int, dst: Address, dport: int) -> None:
        """Stop fast-forwarding one direction of a flow; no error if it was not there."""
        self._check_open()
        try:
            _map_delete(self._flows, flow_key(proto, src, sport, dst, dport))
        except OSError as exc:
            raise ThrottleError(f"cannot remove a flow from the fast path: {exc.strerror}") from None

    def add_flow(self, proto: int, client: Address, cport: int, server: Address, sport: int,
                 client_if: str, server_if: str) -> bool:
        """Both directions of a decided flow: client -> server packets (arriving on client_if) go
        out of server_if to the server's next hop, and the replies the other way. False, with
        nothing added, when a next hop's MAC is not in the neighbour table or the map is full."""
        self._check_open()
        client, server = _packed(client), _packed(server)
        cidx, sidx = self._index(client_if), self._index(server_if)
        to_server = self._next_hop_mac(sidx, server)
        to_client = self._next_hop_mac(cidx, client)
        if to_server is None or to_client is None:
            return False
        if not self.add(proto, client, cport, server, sport, sidx, to_server, self._if_mac(sidx)):
            return False
        if not self.add(proto, server, sport, client, cport, cidx, to_client, self._if_mac(cidx)):
            self.remove(proto, client, cport, server, sport)
            return False
        return True

    def remove_flow(self, proto: int, client: Address, cport: int, server: Address, sport: int) -> None:
        """Both directions of a flow back to the normal path."""
        self.remove(proto, client, cport, server, sport)
        self.remove(proto, server, sport, client, cport)

    def expire(self, idle: float, now_ns: Optional[int] = None) -> int:
        """Remove every direction that forwarded nothing for `idle` seconds (and was added at
        least that long ago); returns how many. `now_ns` is CLOCK_MONOTONIC, as the kernel's."""
        self._check_open()
        now = time.monotonic_ns() if now_ns is None else now_ns
        limit = now - int(idle * 1e9)
        removed = 0
        try:
            for key in _map_keys(self._flows, KEY.size):
                value = _map_lookup(self._flows, key, VALUE.size)
                if value is not None and VALUE.unpack(value)[3] < limit:
                    removed += _map_delete(self._flows, key)
        except OSError as exc:
            raise ThrottleError(f"cannot read the fast-path flows: {exc.strerror}") from None
        return removed

    def flow_bytes(self) -> dict[bytes, int]:
        """Bytes forwarded so far by every direction in the map, by map key (see `flow_key`)."""
        self._check_open()
        out = {}
        try:
            for key in _map_keys(self._flows, KEY.size):
                value = _map_lookup(self._flows, key, VALUE.size)
                if value is not None:
                    out[key] = VALUE.unpack(value)[4]
        except OSError as exc:
            raise ThrottleError(f"cannot read the fast-path flows: {exc.strerror}") from None
        return out

    def __len__(self) -> int:
        """Directions in the map now."""
        self._check_open()
        try:
            return len(_map_keys(self._flows, KEY.size))
        except OSError as exc:
            raise ThrottleError(f"cannot read the fast-path flows: {exc.strerror}") from None

    @property
    def hits(self) -> int:
        """Packets redirected so far, on all CPUs."""
        self._check_open()
        cpus = _possible_cpus()
        try:
            raw = _map_lookup(self._hits, HITS_KEY, 8 * cpus)
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
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors: list[str] = []
        if self._rtnl is not None:
            for index, ours in self._attached:
                try:
                    self._rtnl(lambda ipr: _detach(ipr, index, ours))
                except ThrottleError as exc:
                    errors.append(str(exc))
            self._attached.clear()
            self._rtnl.close()
            self._rtnl = None
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        if errors:
            raise ThrottleError(errors[0])

    def __enter__(self) -> FastPath:
        return self

    def __exit__(self, t: Optional[type[BaseException]], e: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.close()

    def __del__(self) -> None:
        # Only the fds: detaching needs netlink, which is not for a finalizer. Filters stay until
        # close(), namespace removal, or the next FastPath on the interface.
        for fd in getattr(self, "_fds", ()):
            try:
                os.close(fd)
            except OSError:
                pass


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
    if platform.machine() not in SYS_BPF:
        return f"the fast path supports x86_64 and aarch64, not {platform.machine()}"
    try:
        with FastPath(["lo"], max_entries=1):
            pass
    except ThrottleError as exc:
        return str(exc)
    return None
