"""A thin ctypes layer over libbpf (Debian's libbpf1): build, open and load throttle's eBPF object,
check it against `layout`, and the map calls the censor needs. Nothing here attaches a program
(see `fastpath`).

The program is C (`bpf/throttle.bpf.c`, with `bpf/layout.h` generated from `layout`), compiled with
clang `-target bpf` by `throttle kernel build` (scripts/setup runs it) into `bpf/throttle.bpf.o`
beside it. When that file is missing or older than its sources (a wheel built without it, an
edited source), `object_path()` compiles it into a cache folder, if clang is here. When the
kernel's verifier rejects the program, the error carries the end of the verifier's log, which
names the source line (the object has BTF line info).

Every object is compared with `layout` through its BTF (its structs field by field, its maps'
sizes): `check_layout` without loading it (no root needed), and `BpfObject` once the kernel has
accepted the program and before anything can use it. A mismatch is a ThrottleError naming the
struct and the field, never a map of misread counters.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from throttle.children import capture
from throttle.errors import ThrottleError
from throttle.files import atomic_write
from throttle.kernel import layout
from throttle.kernel.tools import find_tool

SOURCE = "throttle.bpf.c"
OBJECT = "throttle.bpf.o"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "throttle"
BPF_F_LOCK = 4  # update a map value that holds a spin lock under that lock
BTF_KIND_STRUCT = 4
_LIB: ctypes.CDLL | None = None
_LOG: list[str] = []  # libbpf's messages while an object loads

_PrintFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


def _source_dir() -> Path:
    return Path(str(resources.files("throttle.kernel") / "bpf"))


def compile_object(out: Path, source: Path | None = None) -> Path:
    """Compile the program's source (or another) into `out` with clang; ThrottleError naming the fix."""
    clang = find_tool("clang")
    if clang is None:
        raise ThrottleError("clang is missing to build the eBPF program: apt-get install clang libbpf-dev "
                            "(or run scripts/setup)")
    source = source or _source_dir() / SOURCE
    gcc = find_tool("gcc")
    multiarch = capture([gcc, "-print-multiarch"], "gcc").out.strip() if gcc else ""
    include = [f"-I/usr/include/{multiarch}"] if multiarch else []
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    result = capture([clang, "-O2", "-g", "-Wall", "-target", "bpf", *include, "-c", str(source), "-o", str(tmp)],
                     "clang")
    if result.code != 0:
        tmp.unlink(missing_ok=True)
        lines = [line for line in result.err.splitlines() if "error" in line] or result.err.splitlines()
        hint = " (apt-get install libbpf-dev linux-libc-dev)" if "file not found" in result.err else ""
        raise ThrottleError(f"clang could not build {source.name}: {' / '.join(lines[:3])}{hint}")
    os.replace(tmp, out)
    return out


def _current(built: Path) -> bool:
    """Whether a compiled object is newer than the program's source and its header."""
    sources = (_source_dir() / SOURCE, _source_dir() / layout.HEADER)
    return built.exists() and built.stat().st_mtime >= max(s.stat().st_mtime for s in sources)


def write_header() -> bool:
    """Rewrite bpf/layout.h from `layout` when it differs; whether it did."""
    header = _source_dir() / layout.HEADER
    text = layout.c_header()
    if header.exists() and header.read_text() == text:
        return False
    try:
        atomic_write(header, text.encode())
    except OSError as exc:
        raise ThrottleError(f"cannot write {header}: {exc.strerror} (an installed copy: build in a checkout)") from None
    return True


def build() -> Path:
    """Write the header, then compile the program beside its source (scripts/setup, through
    `throttle kernel build`) unless it is there and up to date; either way check it against
    `layout`."""
    built = _source_dir() / OBJECT
    write_header()
    if not _current(built):
        compile_object(built)
    check_layout(built)
    return built


def object_path() -> Path:
    """The compiled program: the one scripts/setup built, or one compiled now into the cache."""
    built = _source_dir() / OBJECT
    if _current(built):
        return built
    cached = CACHE / OBJECT
    if _current(cached):
        return cached
    return compile_object(cached)


def lib() -> ctypes.CDLL:
    """libbpf, with the signatures used here declared."""
    global _LIB
    if _LIB is not None:
        return _LIB
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        handle = ctypes.CDLL(name, use_errno=True)
    except OSError:
        raise ThrottleError("libbpf is missing: apt-get install libbpf1 (or run scripts/setup)") from None
    p, i, u64, u32p = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint32)
    for fn, args, res in (
        ("bpf_object__open_file", [ctypes.c_char_p, p], p),
        ("bpf_object__load", [p], i),
        ("bpf_object__close", [p], None),
        ("bpf_object__find_program_by_name", [p, ctypes.c_char_p], p),
        ("bpf_object__find_map_by_name", [p, ctypes.c_char_p], p),
        ("bpf_program__fd", [p], i),
        ("bpf_map__fd", [p], i),
        ("bpf_map__set_max_entries", [p, ctypes.c_uint32], i),
        ("libbpf_set_print", [_PrintFn], p),
        ("bpf_map_update_elem", [i, p, p, u64], i),
        ("bpf_map_lookup_elem", [i, p, p], i),
        ("bpf_map_delete_elem", [i, p], i),
        ("bpf_map_get_next_key", [i, p, p], i),
        ("bpf_map_lookup_batch", [i, p, p, p, p, u32p, p], i),
        ("bpf_map__key_size", [p], ctypes.c_uint32),
        ("bpf_map__value_size", [p], ctypes.c_uint32),
        ("bpf_map__max_entries", [p], ctypes.c_uint32),
        ("bpf_object__btf", [p], p),
        ("btf__find_by_name_kind", [p, ctypes.c_char_p, ctypes.c_uint32], ctypes.c_int32),
        ("btf__type_by_id", [p, ctypes.c_uint32], p),
        ("btf__name_by_offset", [p, ctypes.c_uint32], ctypes.c_char_p),
        ("btf__resolve_size", [p, ctypes.c_uint32], ctypes.c_int64),
        ("libbpf_num_possible_cpus", [], i),
        ("bpf_prog_test_run_opts", [i, p], i),
    ):
        f = getattr(handle, fn)
        f.argtypes, f.restype = args, res
    _LIB = handle
    return handle


def _libc_vsnprintf(level: int, fmt: bytes | None, args: int | None) -> int:
    buf = ctypes.create_string_buffer(4096)
    ctypes.CDLL(None).vsnprintf(buf, ctypes.c_size_t(len(buf)), fmt, ctypes.c_void_p(args))
    _LOG.extend(buf.value.decode(errors="replace").splitlines())
    return 0


# On x86_64 a va_list argument is a pointer, so libc's vsnprintf can format libbpf's messages.
_PRINT = _PrintFn(_libc_vsnprintf)


class BpfObject:
    """The loaded object: its program and map fds, valid until `close()`."""

    def __init__(self, path: Path, program: str, maps: tuple[str, ...],
                 max_entries: dict[str, int] | None = None) -> None:
        lb = lib()
        capture = sys.platform == "linux" and os.uname().machine == "x86_64"
        if capture:
            _LOG.clear()
            lb.libbpf_set_print(_PRINT)
        self._obj: int | None = _open(path)
        try:
            for name, entries in (max_entries or {}).items():
                m = lb.bpf_object__find_map_by_name(self._obj, name.encode())
                if not m or lb.bpf_map__set_max_entries(m, entries) != 0:
                    raise ThrottleError(f"cannot size map {name} of {path} to {entries} entries")
            if lb.bpf_object__load(self._obj) != 0:
                err = ctypes.get_errno()
                summary = _verifier_summary()
                hint = " (not root, or no CAP_BPF)" if err in (1, 13) and not summary else ""
                raise ThrottleError(f"the kernel refused the eBPF program{hint}: {summary or os.strerror(err)}")
            # After the load, so that a verifier's refusal is what a broken program reports; nothing
            # has used a map yet.
            _check_layout(self._obj, path)
            prog = lb.bpf_object__find_program_by_name(self._obj, program.encode())
            if not prog:
                raise ThrottleError(f"{path} has no program {program}")
            self.program_fd: int = lb.bpf_program__fd(prog)
            self.map_fds: dict[str, int] = {}
            for name in maps:
                m = lb.bpf_object__find_map_by_name(self._obj, name.encode())
                if not m:
                    raise ThrottleError(f"{path} has no map {name}")
                self.map_fds[name] = lb.bpf_map__fd(m)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._obj:
            lib().bpf_object__close(self._obj)  # closes the program and map fds
            self._obj = None


def _open(path: Path) -> int:
    """bpf_object__open_file: the ELF object read, its BTF parsed; nothing in the kernel yet."""
    obj: int | None = lib().bpf_object__open_file(str(path).encode(), None)
    if not obj:
        raise ThrottleError(f"libbpf cannot open {path}: {os.strerror(ctypes.get_errno())}")
    return obj


def _btf_struct(btf: int, name: str) -> tuple[int, list[tuple[str, int, int]]] | None:
    """A struct as BTF describes it: (size, [(member, byte offset, size), ...]), or None."""
    lb = lib()
    type_id = lb.btf__find_by_name_kind(btf, name.encode(), BTF_KIND_STRUCT)
    if type_id < 0:
        return None
    address = lb.btf__type_by_id(btf, type_id)
    _, info, size = (ctypes.c_uint32 * 3).from_address(address)  # struct btf_type: name_off, info, size
    vlen, kflag = info & 0xFFFF, info >> 31
    words = (ctypes.c_uint32 * (3 * vlen)).from_address(address + 12)  # struct btf_member each
    members = []
    for i in range(vlen):
        name_off, member_type, offset = words[3 * i : 3 * i + 3]
        bits = offset & 0xFFFFFF if kflag else offset  # kflag: the top 8 bits are a bitfield's size
        member = lb.btf__name_by_offset(btf, name_off) or b""
        members.append((member.decode(), bits // 8, int(lb.btf__resolve_size(btf, member_type))))
    return int(size), members


def _layout_problem(obj: int) -> str | None:
    """What of an opened object differs from `layout`, in one line; None when nothing does."""
    lb = lib()
    btf = lb.bpf_object__btf(obj)
    if not btf:
        return "it has no BTF (compile it with clang -g)"
    for struct_ in layout.STRUCTS:
        problem = struct_.mismatch(_btf_struct(btf, struct_.name))
        if problem:
            return problem
    for name in layout.MAPS:
        m = lb.bpf_object__find_map_by_name(obj, name.encode())
        if not m:
            return f"it has no map {name}"
        problem = layout.map_mismatch(name, lb.bpf_map__key_size(m), lb.bpf_map__value_size(m),
                                      lb.bpf_map__max_entries(m))
        if problem:
            return problem
    return None


def _check_layout(obj: int, path: Path) -> None:
    problem = _layout_problem(obj)
    if problem:
        raise ThrottleError(f"the eBPF object {path} does not match throttle/kernel/layout.py: {problem} "
                            "(rebuild it: throttle kernel build)")


def check_layout(path: Path) -> None:
    """A ThrottleError naming the struct and field unless the object at `path` matches `layout`;
    reads the file only (no root, nothing loaded)."""
    obj = _open(path)
    try:
        _check_layout(obj, path)
    finally:
        lib().bpf_object__close(obj)


def _verifier_summary() -> str:
    """The verifier's verdict from its log: the last source line it reached (BTF line info: the C
    line, file and line number), then the failing instruction and the reason. "" without a log."""
    try:
        start = next(i for i, line in enumerate(_LOG) if "BEGIN PROG LOAD LOG" in line) + 1
        end = next(i for i, line in enumerate(_LOG) if "END PROG LOAD LOG" in line)
    except StopIteration:
        return ""
    log = [line.strip() for line in _LOG[start:end] if line.strip() and not line.startswith("processed ")]
    source = [line.lstrip("; ") for line in log if line.startswith(";")]
    tail = [line for line in log if not line.startswith(";")][-3:]
    return " / ".join(([f"at {source[-1]}"] if source else []) + tail)


def _check(ret: int, what: str) -> None:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")


def map_update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    _check(lib().bpf_map_update_elem(fd, key, value, flags), "map update")


def map_lookup(fd: int, key: bytes, size: int) -> bytes | None:
    out = ctypes.create_string_buffer(size)
    ret = lib().bpf_map_lookup_elem(fd, key, out)
    if ret == -2:  # ENOENT
        return None
    _check(ret, "map lookup")
    return out.raw


def map_delete(fd: int, key: bytes) -> bool:
    ret = lib().bpf_map_delete_elem(fd, key)
    if ret == -2:
        return False
    _check(ret, "map delete")
    return True


def map_batches(fd: int, key_size: int, value_size: int, batch: int = 4096) -> Iterator[tuple[bytes, bytes, int]]:
    """Every entry of a hash map, `batch` at a time (one syscall per batch): (keys, values, n),
    the n keys and n values of a batch each packed end to end."""
    lb = lib()
    keys = ctypes.create_string_buffer(key_size * batch)
    values = ctypes.create_string_buffer(value_size * batch)
    token = ctypes.create_string_buffer(max(key_size, 8))
    count = ctypes.c_uint32()
    first = True
    while True:
        count.value = batch
        ret = lb.bpf_map_lookup_batch(fd, None if first else token, token, keys, values, ctypes.byref(count), None)
        first = False
        n = count.value
        if n:
            # One copy of each buffer per batch (`.raw` would copy the whole buffer per access).
            yield ctypes.string_at(keys, n * key_size), ctypes.string_at(values, n * value_size), n
        if ret == -2:  # ENOENT: that was the last batch
            return
        _check(ret, "map batch lookup")
        if n == 0:
            return


def map_items(fd: int, key_size: int, value_size: int, batch: int = 4096) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of a hash map, read `batch` at a time (one syscall per batch)."""
    for kraw, vraw, n in map_batches(fd, key_size, value_size, batch):
        for i in range(n):
            yield kraw[i * key_size : (i + 1) * key_size], vraw[i * value_size : (i + 1) * value_size]


def possible_cpus() -> int:
    """How many values a per-CPU map holds per key: one per *possible* CPU (libbpf's count)."""
    count = int(lib().libbpf_num_possible_cpus())
    if count < 1:
        raise ThrottleError(f"libbpf cannot count the possible CPUs: {os.strerror(-count)}")
    return count


def percpu_sum(fd: int, key: bytes) -> int:
    """A per-CPU map's __u64 value at `key`, summed over CPUs (0 for no entry)."""
    cpus = possible_cpus()
    raw = map_lookup(fd, key, 8 * cpus)
    return sum(struct.unpack(f"={cpus}Q", raw)) if raw else 0


def fallbacks(fd: int) -> dict[str, int]:
    """How many packets the program returned to the normal path, by reason (`layout.FALLBACKS`,
    every reason present), summed over CPUs, since the object was loaded; `fd` is its `fallbacks`
    map (`BpfObject(..., maps=(..., "fallbacks"))`). One lookup per reason: for an exporter's
    scrape (`throttle_fastpath_fallbacks_total{reason}`), not for every packet. OSError if the
    map cannot be read."""
    return {reason.name: percpu_sum(fd, struct.pack("=I", i)) for i, reason in enumerate(layout.FALLBACKS)}


class _TestRunOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


def run_program(fd: int, frame: bytes) -> tuple[int, bytes]:
    """Run a loaded tc program once on an Ethernet frame (BPF_PROG_TEST_RUN: no interface, nothing
    sent): (its return value, the frame as it left the program). Needs root, as loading does."""
    data_in = ctypes.create_string_buffer(frame, len(frame))
    data_out = ctypes.create_string_buffer(len(frame) + 256)
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.addressof(data_in),
                        data_out=ctypes.addressof(data_out), data_size_in=len(frame),
                        data_size_out=len(data_out), repeat=1)
    _check(lib().bpf_prog_test_run_opts(fd, ctypes.byref(opts)), "program test run")
    return opts.retval, data_out.raw[: opts.data_size_out]
