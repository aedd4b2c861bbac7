"""Rates, sizes and durations as people write them in scenario files.

`130kbit` is bits per second in SI units (as tc and the measurement papers use them); `16KB` is
bytes with binary multiples (16 KB = 16,384 bytes, as in the "about 16 KB" of the policer reports).
Parsers return plain numbers in base units (bytes per second, bytes, seconds) and raise
`ValueError` with a hint; the scenario loader wraps that into an error naming the file and key.
"""

from __future__ import annotations

import re

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(bit|bps|b|byte|Bps|B)?(?:/s)?\s*$", re.IGNORECASE)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(i?b|byte|bytes)?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h)?\s*$", re.IGNORECASE)

_SI = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}
_BIN = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_SECONDS = {None: 1.0, "ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_rate(text: str | int | float) -> float:
    """A rate in bytes per second from e.g. `130kbit`, `2mbit`, `16KBps`, `1.5mbit/s`.

    `bit` (or a bare number) means bits per second; `Bps`/`byte` means bytes per second.
    """
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a rate; write e.g. 130kbit")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"{text!r} is negative; write e.g. 130kbit")
        return float(text) / 8.0
    m = _RATE.match(text)
    if not m:
        raise ValueError(f'"{text}" is not a rate; write e.g. 130kbit')
    number, prefix, unit = float(m.group(1)), m.group(2).lower(), m.group(3)
    # Lower-case b is bits and capital B is bytes, as in tc(8): `kbit`, `kbps` vs `KB`, `KBps`.
    in_bytes = unit is not None and (unit.startswith("B") and unit.lower() != "bit" or unit.lower() == "byte")
    value = number * _SI[prefix]
    return value if in_bytes else value / 8.0


def parse_size(text: str | int) -> int:
    """A size in bytes from e.g. `16KB`, `256KB`, `64MB`, `1500`, `1.5MiB` (binary multiples)."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a size; write e.g. 16KB")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"{text} is negative; write e.g. 16KB")
        return text
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a size; write e.g. 16KB")
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f'"{text}" is not a size; write e.g. 16KB')
    return int(float(m.group(1)) * _BIN[m.group(2).lower()])


def parse_duration(text: str | int | float) -> float:
    """A duration in seconds from e.g. `600s`, `10min`, `250ms`, or a bare number of seconds."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a duration; write e.g. 600s")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"{text} is negative; write e.g. 600s")
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
