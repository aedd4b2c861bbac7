"""Rates, sizes and durations as people write them in scenario files, read as tc(8) reads them.

Rates follow tc(8)'s RATES table exactly, letters in any case: a bare number and `bit` are bits
per second; `kbit`, `mbit`, `gbit`, `tbit` are SI multiples of bits (1,000); `kibit`, `mibit`...
binary ones (1,024); `bps` is bytes per second, so `kbps` is kilobytes per second (8,000 bits),
`mbps` megabytes per second, `kibps`, `mibps`... their binary counterparts. That `kbps` is
kilobytes, not the kilobits of the measurement reports' "130 kbps", is tc's reading; write `kbit`
for kilobits. A trailing `/s` is allowed (`1.5mbit/s`). What tc refuses as a rate (`16KB`, `16k`,
`100B`) is refused with the spellings that say what was meant.

Sizes follow tc(8)'s SIZES table: a bare number and `b` are bytes; `k`/`kb`, `m`/`mb`, `g`/`gb`
are binary multiples (16kb = 16,384 bytes, as in the "about 16 KB" of the policer reports), and
`kbit`, `mbit`, `gbit` the same multiples of bits; `KiB`, `MiB`, `GiB` (unambiguous) and `bytes`
are accepted too. Durations: `s`/`sec`/`secs`, `ms`/`msec`/`msecs`, `us`/`usec`/`usecs`, `min`,
`m`, `h`; a bare number is seconds.

Parsers return plain numbers in base units (bytes per second, bytes, seconds) and raise
`ValueError` with a hint; the scenario loader wraps that into an error naming the file and key.
"""

from __future__ import annotations

import math
import re

_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|usec|usecs|ms|msec|msecs|s|sec|secs|m|min|h)?\s*$", re.IGNORECASE)

_SI_PREFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BIN_PREFIX = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
# tc(8) RATES, lower-cased (tc compares without case): bits per second per unit.
RATE_UNITS: dict[str, float] = {"": 1.0}
for _p, _scale in (*_SI_PREFIX.items(), *_BIN_PREFIX.items()):
    RATE_UNITS[f"{_p}bit"] = float(_scale)
    RATE_UNITS[f"{_p}bps"] = 8.0 * _scale
# tc(8) SIZES, lower-cased: bytes per unit (binary multiples, as tc's), plus the IEC names.
SIZE_UNITS: dict[str, float] = {"": 1, "b": 1, "byte": 1, "bytes": 1}
for _p, _scale in (("k", 2**10), ("m", 2**20), ("g", 2**30)):
    SIZE_UNITS[_p] = SIZE_UNITS[f"{_p}b"] = SIZE_UNITS[f"{_p}ib"] = _scale
    SIZE_UNITS[f"{_p}bit"] = _scale / 8
_SECONDS = {None: 1.0, "us": 1e-6, "usec": 1e-6, "usecs": 1e-6, "ms": 0.001, "msec": 0.001, "msecs": 0.001,
            "s": 1.0, "sec": 1.0, "secs": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
RATE_EXAMPLE = "130kbit"


def _ambiguous_rate(number: str, unit: str) -> str:
    """What to write instead of a rate unit tc(8) does not know (`16KB`, `16k`, `100B`)."""
    p = unit[:1].lower() if unit[:1].lower() in "kmgt" else ""
    if not p:
        return f'"{number}{unit}" is not a tc(8) rate: write {number}bit (bits/s) or {number}bps (bytes/s)'
    word = {"k": "kilo", "m": "mega", "g": "giga", "t": "tera"}[p]
    binary = {"k": "kibi", "m": "mebi", "g": "gibi", "t": "tebi"}[p]
    return (f'"{number}{unit}" is not a tc(8) rate: write {number}{p}bit ({word}bits/s), {number}{p}bps '
            f"({word}bytes/s, as tc reads bps) or {number}{p}ibps ({binary}bytes/s)")


def parse_rate(text: str | int | float) -> float:
    """A rate in bytes per second from e.g. `130kbit`, `2mbit`, `16kbps` (16,000 B/s), `1.5mbit/s`.

    A number (TOML integer or float) is bits per second, as a bare number is in tc(8)."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a rate; write e.g. {RATE_EXAMPLE}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"{text!r} is not a rate; write a finite, positive one, e.g. {RATE_EXAMPLE}")
        return float(text) / 8.0
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a rate; write e.g. {RATE_EXAMPLE}")
    body = text.strip()
    body = body[:-2] if body.lower().endswith("/s") else body
    m = _NUMBER_UNIT.match(body)
    if not m:
        raise ValueError(f'"{text}" is not a rate; write e.g. {RATE_EXAMPLE}')
    number, unit = m.group(1), m.group(2)
    bits = RATE_UNITS.get(unit.lower())
    if bits is None:
        if unit and unit.lower().rstrip("b").rstrip("i") in ("", "k", "m", "g", "t") or unit.lower() in ("byte", "bytes"):
            raise ValueError(_ambiguous_rate(number, unit))
        raise ValueError(f'"{text}" is not a rate; write e.g. {RATE_EXAMPLE}')
    return float(number) * bits / 8.0


def parse_size(text: str | int) -> int:
    """A size in bytes from e.g. `16KB` (16,384), `256kb`, `64MB`, `1500`, `1.5MiB` (binary multiples, as tc)."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a size; write e.g. 16KB")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"{text} is negative; write e.g. 16KB")
        return text
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a size; write e.g. 16KB")
    m = _NUMBER_UNIT.match(text)
    scale = SIZE_UNITS.get(m.group(2).lower()) if m else None
    if m is None or scale is None:
        hint = " (sizes are bytes; rates take bps or bit)" if m and m.group(2).lower().endswith("ps") else ""
        raise ValueError(f'"{text}" is not a size; write e.g. 16KB (16,384 bytes) or 1500{hint}')
    return int(float(m.group(1)) * scale)


def parse_duration(text: str | int | float) -> float:
    """A duration in seconds from e.g. `600s`, `10min`, `250ms`, or a bare number of seconds."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a duration; write e.g. 600s")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"{text} is not a duration; write a finite, positive one, e.g. 600s")
        return float(text)
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a duration; write e.g. 600s")
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f'"{text}" is not a duration; write e.g. 600s or 250ms')
    unit = m.group(2).lower() if m.group(2) else None
    return float(m.group(1)) * _SECONDS[unit]


def format_rate(bytes_per_second: float) -> str:
    """Bits per second for people: `130.0 kbit/s`, `94.2 Mbit/s`."""
    bits = bytes_per_second * 8.0
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.1f} {unit}"
    return f"{bits:.0f} bit/s"


def format_size(nbytes: float) -> str:
    """Bytes for people, binary multiples: `16.0 KB`, `64.0 MB`."""
    for unit, scale in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"
