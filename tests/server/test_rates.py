"""Send rates as people write them."""

from __future__ import annotations

import pytest
from vmcast.server.rates import format_rate, parse_rate


@pytest.mark.parametrize(
    ("text", "bits_per_second"),
    [
        ("1gbit", 1_000_000_000),
        ("300mbit", 300_000_000),
        ("500k", 500_000),
        ("2.5g", 2_500_000_000),
        ("123456", 123_456),
        ("0", 0),
        ("1Gbit/s", 1_000_000_000),
        ("10 Mbps", 10_000_000),
        ("100m", 100_000_000),
        (".5g", 500_000_000),
        ("1t", 10**12),
        ("64kbit", 64_000),
        (750_000, 750_000),
    ],
)
def test_rates_parse_to_bits_per_second_with_decimal_prefixes(text: str | int, bits_per_second: int) -> None:
    assert parse_rate(text) == bits_per_second


@pytest.mark.parametrize("garbage", ["", "fast", "1x", "-5m", "1.2.3g", "m", "1 gigabit", "1e9", "5 mbit extra"])
def test_garbage_is_refused_with_the_accepted_forms(garbage: str) -> None:
    with pytest.raises(ValueError, match=r"not a rate: .*1gbit, 300mbit, 500k, 2.5g"):
        parse_rate(garbage)


def test_bytes_are_refused_with_the_rate_in_bits_spelled_out() -> None:
    with pytest.raises(ValueError, match=r"bits per second.*write 800mbit"):
        parse_rate("100MB/s")


def test_a_negative_number_of_bits_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_rate(-1)


def test_rates_print_short_with_their_unit() -> None:
    assert format_rate(1_000_000_000) == "1 Gbit/s"
    assert format_rate(312_500_000) == "312.5 Mbit/s"
    assert format_rate(500_000) == "500 kbit/s"
    assert format_rate(0) == "unpaced"
    assert format_rate(0, zero="0") == "0"
