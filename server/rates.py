"""Send rates as people write them (``1gbit``, ``300mbit``, ``500k``, ``2.5g``) <-> bits per second.

Prefixes are decimal, as in networking (1 Mbit/s = 1,000,000 bit/s), and the unit is always bits: an
uppercase ``B`` (bytes) is refused with the conversion spelled out, because "100MB" meaning megabits would
send eight times slower than the user expects.
"""

from __future__ import annotations

import re

_PREFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}

_RATE = re.compile(
    r"""\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*
        (?P<prefix>[kKmMgGtT]?)
        (?P<unit>bit/s|bits/s|bits|bit|bps|b/s|b)?\s*""",
    re.VERBOSE,
)
_BYTES = re.compile(r"\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<prefix>[kKmMgGtT]?)(?:B|B/s|Bps)\s*")

RATE_FORMS = (
    "a number of bits per second with an optional k, m, g or t prefix: 1gbit, 300mbit, 500k, 2.5g, 0 for unpaced"
)


def parse_rate(text: str | int) -> int:
    """Bits per second from a rate as written; 0 means unpaced.

    Error handling: raises `ValueError` with a message that shows the accepted forms.
    """
    if isinstance(text, bool):
        raise ValueError(f"not a rate: {text!r}; expected {RATE_FORMS}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a rate cannot be negative: {text}")
        return text
    match = _RATE.fullmatch(text)
    if match is None:
        in_bytes = _BYTES.fullmatch(text)
        if in_bytes is not None:
            bits = float(in_bytes["number"]) * 8
            raise ValueError(
                f"rates are in bits per second, {text!r} looks like bytes: write {bits:g}{in_bytes['prefix'].lower()}bit"
            )
        raise ValueError(f"not a rate: {text!r}; expected {RATE_FORMS}")
    return round(float(match["number"]) * _PREFIXES[match["prefix"].lower()])


def format_rate(bits_per_second: float, *, zero: str = "unpaced") -> str:
    """A short human form: ``1 Gbit/s``, ``312.5 Mbit/s``; `zero` for 0 (a configured 0 means unpaced)."""
    if bits_per_second <= 0:
        return zero if bits_per_second == 0 else f"{bits_per_second} bit/s"
    for prefix, scale in (("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if bits_per_second >= scale:
            return f"{bits_per_second / scale:.4g} {prefix}bit/s"
    return f"{bits_per_second:.4g} bit/s"
