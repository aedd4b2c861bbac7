from __future__ import annotations

import pytest

from throttle.units import format_rate, parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    "text,bytes_per_second",
    [("130kbit", 16250.0), ("130 kbit", 16250.0), ("2mbit", 250000.0), ("1.5Mbit/s", 187500.0),
     ("128kbit", 16000.0), ("16KBps", 16000.0), ("100Bps", 100.0), ("8000", 1000.0), (8000, 1000.0),
     # tc(8): bps is bytes per second, whatever the case; ki/mi are binary
     ("16kbps", 16000.0), ("16kibps", 16384.0), ("1mbps", 1e6), ("1kibit", 128.0), ("1.5mbit/s", 187500.0)],
)
def test_rates(text, bytes_per_second) -> None:
    assert parse_rate(text) == bytes_per_second


@pytest.mark.parametrize("bad", ["13O kbit", "fast", "", "-1kbit", "kbit", True])
def test_bad_rates(bad) -> None:
    with pytest.raises(ValueError, match="130kbit"):
        parse_rate(bad)


@pytest.mark.parametrize("bad,named", [("16KB", "16kbps"), ("16k", "16kbit"), ("100B", "100bps"), ("2MB", "2mibps")])
def test_rates_tc_refuses_are_refused_with_the_alternatives(bad, named) -> None:
    with pytest.raises(ValueError, match="tc\\(8\\)") as info:
        parse_rate(bad)
    assert named in str(info.value) and "bit" in str(info.value)


def test_sizes_follow_tc() -> None:
    assert parse_size("16kb") == parse_size("16K") == parse_size("16KiB") == 16384
    assert parse_size("16kbit") == 2048
    assert parse_size("1.5MiB") == 1572864
    with pytest.raises(ValueError, match="rates take"):
        parse_size("16kbps")


def test_durations_take_tc_spellings() -> None:
    assert parse_duration("250msec") == parse_duration("250ms") == 0.25
    assert parse_duration("500us") == pytest.approx(0.0005)
    assert parse_duration("2secs") == 2.0


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
