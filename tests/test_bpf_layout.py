"""The eBPF program's data layout, defined once in throttle/kernel/layout.py: the generated header
is current, the codecs pack and unpack by name, and an object whose structs differ from the
definition (two same-sized fields swapped) is refused by name. Compiling with clang and reading an
object's BTF need no root; the namespace tier runs the program itself (tests/netns/test_bpf_program.py)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from tests.conftest import ROOT
from throttle.errors import ThrottleError
from throttle.kernel import layout, libbpf
from throttle.kernel.layout import BUCKET, FALLBACKS, FLOW_KEY, FLOW_VALUE, Field, Struct

BPF = ROOT / "throttle/kernel/bpf"
SAMPLES = {"B": 0x12, "H": 0x1234, "I": 0x12345678, "Q": 0x123456789ABCDEF0}  # every byte distinct


def program_copy(tmp_path: Path, edit: tuple[str, str] | None = None) -> Path:
    """The program's source and header copied into tmp_path, the header with `edit` (old, new)
    made once; the object compiled from them."""
    (tmp_path / libbpf.SOURCE).write_text((BPF / libbpf.SOURCE).read_text())
    header = (BPF / layout.HEADER).read_text()
    if edit is not None:
        old, new = edit
        assert header.count(old) == 1, old
        header = header.replace(old, new)
    (tmp_path / layout.HEADER).write_text(header)
    return libbpf.compile_object(tmp_path / "copy.bpf.o", tmp_path / libbpf.SOURCE)


def swap_lines(first: str, second: str) -> tuple[str, str]:
    """An edit of the header that swaps two adjacent member lines, comments and all."""
    text = (BPF / layout.HEADER).read_text()
    a = next(line for line in text.splitlines() if line.split("/*")[0].strip() == first)
    b = next(line for line in text.splitlines() if line.split("/*")[0].strip() == second)
    return f"{a}\n{b}\n", f"{b}\n{a}\n"


# -- one definition ---------------------------------------------------------------------------------


def test_the_header_is_generated_from_the_definition() -> None:
    assert (BPF / layout.HEADER).read_text() == layout.c_header(), \
        "bpf/layout.h is stale: run `throttle kernel build` (it rewrites the header from layout.py)"


def test_the_program_takes_its_structs_and_reasons_from_the_header_only() -> None:
    source = (BPF / libbpf.SOURCE).read_text()
    assert '#include "layout.h"' in source
    for s in layout.STRUCTS:
        assert not re.search(rf"struct {s.name}\s*{{", source), f"struct {s.name} is declared in the .c too"
    assert "FALLBACK_REASONS" in source  # the size of the fallbacks map
    # every return to the normal path counts a reason; the one bare TC_ACT_OK is fall_back's own
    assert source.count("return TC_ACT_OK;") == 1
    for reason in FALLBACKS:
        assert f"FALLBACK_{reason.name.upper()}" in source, f"no return counts {reason.name}"


def test_the_structs_have_the_sizes_and_order_of_the_maps() -> None:
    assert (FLOW_KEY.size, FLOW_VALUE.size, BUCKET.size) == (40, 88, 72)
    assert FLOW_KEY.struct.format == "!BB2x16s16sHH"  # ports in network order, as in the packet
    assert FLOW_VALUE.names == ("ifindex", "dst_mac", "src_mac", "last_ns", "bytes", "packets", "dropped_bytes",
                                "dropped_packets", "payload", "after_bytes", "bucket", "priority", "loss")
    # lock and pad: the kernel's, zero; the window meter's fields after the token bucket's
    assert BUCKET.names == ("rate", "burst", "fill_ns", "tokens", "stamp_ns", "window_ns", "start_ns", "used")
    assert [m.key_size for m in layout.MAPS.values()] == [40, 4, 4]
    assert layout.MAPS["fallbacks"].max_entries == len(FALLBACKS) == len({r.name for r in FALLBACKS})


def test_pack_and_unpack_by_name() -> None:
    raw = FLOW_VALUE.pack(ifindex=3, dst_mac=b"\x02" * 6, src_mac=b"\x04" * 6, bytes=1500, packets=1, bucket=9)
    assert len(raw) == 88 and struct.unpack_from("=Q", raw, 24) == (1500,) and struct.unpack_from("=Q", raw, 32) == (1,)
    value = FLOW_VALUE.unpack(raw)
    assert value["bytes"] == 1500 and value["packets"] == 1 and value["bucket"] == 9 and value["priority"] == 0
    assert value["dst_mac"] == b"\x02" * 6 and value["last_ns"] == 0  # not given: zero
    key = FLOW_KEY.pack(proto=6, family=4, src=bytes([10, 0, 0, 1]).ljust(16, b"\0"), dst=bytes(16), sport=443, dport=1)
    assert key[36:38] == b"\x01\xbb" and key[2:4] == b"\0\0"
    bucket = BUCKET.pack(rate=1, burst=2, fill_ns=3, tokens=4, stamp_ns=5)
    assert bucket[:8] == bytes(8) and BUCKET.unpack(bucket)["stamp_ns"] == 5
    with pytest.raises(TypeError, match="no field bytez"):
        FLOW_VALUE.pack(bytez=1)
    with pytest.raises(TypeError, match="no field lock"):
        BUCKET.getter("lock")


def test_a_window_meter_packs_into_the_bucket_struct() -> None:
    """A window meter (engine/buckets.py WindowMeter) in the kernel: its interval in ns (a token
    bucket has window_ns 0), its current interval's start and the bytes used; an interval not
    begun is start_ns 0, which the program begins at the next packet."""
    from throttle.kernel.maps import bucket_value, window_value

    begun = BUCKET.unpack(window_value(3, 16250.0, 16384, 12.5, 4500))
    assert (begun["window_ns"], begun["start_ns"], begun["used"]) == (1_008_246_154, 12_500_000_000, 4500)
    assert (begun["rate"], begun["burst"], begun["tokens"], begun["fill_ns"]) == (16250, 16384, 0, 0)
    unbegun = BUCKET.unpack(window_value(3, 16250.0, 16384, None, 4500))
    assert (unbegun["start_ns"], unbegun["used"]) == (0, 0)
    assert BUCKET.unpack(bucket_value(3, 16250.0, 16384, 100.0, 1.0))["window_ns"] == 0
    with pytest.raises(ThrottleError, match="outside"):
        window_value(0, 16250.0, 16384, None, 0)


def test_walks_unpack_arrays_of_values_by_name() -> None:
    values = [FLOW_VALUE.pack(bytes=i * 10, packets=i, dropped_bytes=i * 3, dropped_packets=i * 4, last_ns=100 + i)
              for i in range(5)]
    raw = b"".join(values)
    assert list(FLOW_VALUE.column(raw, "last_ns")) == [100, 101, 102, 103, 104]
    assert list(FLOW_VALUE.iter_fields(raw, "bytes", "packets")) == [(i * 10, i) for i in range(5)]
    assert list(FLOW_VALUE.iter_fields(raw, "packets")) == [(i,) for i in range(5)]
    assert list(FLOW_VALUE.iter_fields(raw)) == list(FLOW_VALUE.struct.iter_unpack(raw))
    assert FLOW_VALUE.unpack(raw, 3 * FLOW_VALUE.size)["dropped_packets"] == 12


# The structs as fastpath.py wrote them before layout.py (its KEY, VALUE, BUCKET), positional, in
# the order its comments gave: the maps must keep exactly these bytes. (The bucket has since grown
# the window meter's three fields, after the token bucket's, which kept their bytes; the flow value
# the loss threshold of action "loss", after the rest.)
BEFORE = {
    "flow_key": (struct.Struct("!BBxx16s16sHH"), ("proto", "family", "src", "dst", "sport", "dport")),
    "flow_value": (struct.Struct("=I6s6sQQQQQQQIIQ"), ("ifindex", "dst_mac", "src_mac", "last_ns", "bytes", "packets",
                                                         "dropped_bytes", "dropped_packets", "payload", "after_bytes",
                                                         "bucket", "priority", "loss")),
    "bucket": (struct.Struct("=IIQQQQQQQQ"), ("lock", "pad", "rate", "burst", "fill_ns", "tokens", "stamp_ns",
                                              "window_ns", "start_ns", "used")),
}


def test_the_codecs_pack_what_fastpath_packed_field_by_field() -> None:
    """Each field packed alone with a distinct value lands where the old positional struct read it."""
    for new in layout.STRUCTS:
        old, order = BEFORE[new.name]
        assert new.size == old.size, new.name
        codes = [(int(n or 1), code) for n, code in re.findall(r"(\d*)([a-zA-Z])", old.format) if code != "x"]
        zeros: list[int | bytes] = [bytes(n) if code == "s" else 0 for n, code in codes]
        assert len(zeros) == len(order)
        for i, name in enumerate(order):
            if name not in new.positions:  # the lock and padding: zero on both sides
                continue
            n, code = codes[i]
            sample = bytes(range(1, n + 1)) if code == "s" else SAMPLES[code]
            args = zeros.copy()
            args[i] = sample
            assert new.pack(**{name: sample}) == old.pack(*args), f"{new.name}.{name}"
            assert new.unpack(old.pack(*args))[name] == sample


def test_a_definition_with_hidden_padding_or_mixed_byte_order_is_refused() -> None:
    with pytest.raises(ValueError, match="not aligned"):
        Struct("bad", "", (Field("a", layout.U8), Field("b", layout.U32)))
    with pytest.raises(ValueError, match="multiple of 8"):
        Struct("bad", "", (Field("a", layout.U64), Field("b", layout.U32)))
    with pytest.raises(ValueError, match="one byte order"):
        Struct("bad", "", (Field("a", layout.BE16), Field("b", layout.U8, 2), Field("c", layout.U32)))


def test_mismatches_name_the_struct_and_the_field() -> None:
    members = [(f.name, FLOW_VALUE.offsets[f.name], f.size) for f in FLOW_VALUE.fields]
    assert FLOW_VALUE.mismatch((88, members)) is None
    swapped = [(n, 32 if n == "bytes" else 24 if n == "packets" else o, s) for n, o, s in members]
    message = FLOW_VALUE.mismatch((88, swapped))
    assert message is not None and "flow_value" in message and "bytes" in message and "packets" in message
    assert FLOW_VALUE.mismatch(None) == "it has no struct flow_value"
    assert "has no field loss" in str(FLOW_VALUE.mismatch((80, members[:-1])))  # an object built before loss
    assert "which layout.py does not define" in str(FLOW_VALUE.mismatch((96, members + [("extra", 88, 8)])))
    expected = f"its map fallbacks has 3 entries; layout.py expects {len(FALLBACKS)}"
    assert layout.map_mismatch("fallbacks", 4, 8, 3) == expected


# -- objects compiled with clang, read without root -------------------------------------------------


def test_the_program_as_built_matches_the_definition(tmp_path: Path) -> None:
    libbpf.check_layout(program_copy(tmp_path))


def test_an_object_with_two_fields_swapped_is_refused_by_name(tmp_path: Path) -> None:
    """bytes and packets of flow_value are both __u64: sizes alone cannot tell them apart."""
    obj = program_copy(tmp_path, swap_lines("__u64 bytes;", "__u64 packets;"))
    with pytest.raises(ThrottleError) as caught:
        libbpf.check_layout(obj)
    message = str(caught.value)
    assert "flow_value" in message and "field bytes at byte 32" in message and "it has packets" in message, message


def test_an_object_with_bucket_fields_swapped_is_refused(tmp_path: Path) -> None:
    obj = program_copy(tmp_path, swap_lines("__u64 rate;", "__u64 burst;"))
    with pytest.raises(ThrottleError, match=r"struct bucket has field rate at byte 16"):
        libbpf.check_layout(obj)


def test_an_object_counting_fewer_fallback_reasons_is_refused(tmp_path: Path) -> None:
    n = len(FALLBACKS)
    obj = program_copy(tmp_path, (f"FALLBACK_REASONS = {n}\n", f"FALLBACK_REASONS = {n - 1}\n"))
    with pytest.raises(ThrottleError, match=f"map fallbacks has {n - 1} entries"):
        libbpf.check_layout(obj)


# -- the command that builds it ------------------------------------------------------------------------


def test_a_build_error_is_one_line_naming_the_fix(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from throttle.cli.app import main

    monkeypatch.setattr(libbpf, "_current", lambda built: False)  # as if the source had changed
    monkeypatch.setattr(libbpf, "find_tool", lambda name: None)  # and clang were not installed
    with pytest.raises(SystemExit) as exit_:
        main(["kernel", "build"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("throttle: clang is missing") and "apt-get install clang" in err


def test_the_build_command_is_hidden() -> None:
    from typer.testing import CliRunner

    from throttle.cli.app import app

    runner = CliRunner()
    assert " kernel " not in runner.invoke(app, ["--help"]).output
    assert "build" in runner.invoke(app, ["kernel", "--help"]).output


def test_the_build_command_prints_where_the_object_is() -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "throttle", "kernel", "build"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"built {BPF / libbpf.OBJECT}\n"
