from __future__ import annotations

import pytest

from throttle.units import format_rate, parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    "text,bytes_per_second",
    [("130kbit", 16250.0), ("130 kbit", 16250.0), ("2mbit", 250000.0), ("1.5Mbit/s", 187500.0),
     ("128kbps", 16000.0), ("16KBps", 16000.0), ("100B", 100.0), ("8000", 1000.0), (8000, 1000.0)],
)
def test_rates(text, bytes_per_second) -> None:
    assert parse_rate(text) == bytes_per_second


@pytest.mark.parametrize("bad", ["13O kbit", "fast", "", "-1kbit", "kbit", True])
def test_bad_rates(bad) -> None:
    with pytest.raises(ValueError, match="130kbit"):
        parse_rate(bad)


def test_sizes_and_durations() -> None:
    assert parse_size("16KB") == 16384
    assert parse_size("64MB") == 64 * 1024 * 1024
    assert parse_size("1500") == 1500
    assert parse_size(101) == 101
    assert parse_duration("600s") == 600
    assert parse_duration("10min") == 600
    assert parse_duration("250ms") == 0.25
    for bad in ["16 XB", "-5"]:
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_format_rate() -> None:
    assert format_rate(16250) == "130.0 kbit/s"
    assert format_rate(12.5e6) == "100.0 Mbit/s"
