"""HTTP ``Range`` requests (RFC 9110 section 14) for the unicast fallback: which bytes of an image to send.

Pure: a header value and a length in, a decision out. The rules, in order:

* No ``Range`` header, or one this server ignores, -> the whole image, 200. Ignored (as RFC 9110 section
  14.2 allows): a unit other than ``bytes``, and a header that does not parse (a client that sent
  nonsense gets the representation, not an error it may not expect).
* ``bytes=a-b`` (``b`` clamped to the last byte), ``bytes=a-`` (to the end), ``bytes=-n`` (the last ``n``
  bytes, or all of them if fewer) -> 206 with ``Content-Range: bytes first-last/length``.
* A range that starts at or past the end, or ``bytes=-0``, is unsatisfiable; so is every range of an empty
  image -> 416 with ``Content-Range: bytes */length``.
* Several ranges (``bytes=0-9,20-29``): this server never sends ``multipart/byteranges``. It serves the
  *first satisfiable* range alone, as a 206 with its ``Content-Range``, which RFC 9110 permits (a server
  may send fewer ranges than asked for). Clients must read ``Content-Range`` to know what they got, and ask
  again for the rest. If none is satisfiable: 416.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPEC = re.compile(r"\s*(?:(\d+)\s*-\s*(\d*)|-\s*(\d+))\s*")
# A header longer than this is not a reasonable request for one file; it is ignored rather than parsed.
MAX_HEADER_LENGTH = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class ByteRange:
    """Bytes ``[first, last]`` (inclusive, as HTTP writes them) of a representation of `length` bytes."""

    first: int
    last: int
    length: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.first}-{self.last}/{self.length}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsatisfiable:
    """No requested range overlaps the representation: answer 416."""

    length: int

    @property
    def content_range(self) -> str:
        return f"bytes */{self.length}"


def parse_range(header: str | None, length: int) -> ByteRange | Unsatisfiable | None:
    """What to send for a ``Range`` header over `length` bytes: a range (206), `Unsatisfiable` (416), or
    None for the whole representation (200: no header, or one that is ignored)."""
    if header is None or len(header) > MAX_HEADER_LENGTH:
        return None
    unit, separator, specs = header.partition("=")
    if not separator or unit.strip().lower() != "bytes":
        return None
    parsed = []
    for spec in specs.split(","):
        match = _SPEC.fullmatch(spec)
        if match is None:
            return None  # a header that does not parse is ignored as a whole
        first, last, suffix = match.groups()
        if suffix is not None:
            parsed.append((None, int(suffix)))
        else:
            start, end = int(first), (int(last) if last else None)
            if end is not None and end < start:
                return None  # "bytes=9-3" is invalid syntax (RFC 9110 14.1.1): ignore the header
            parsed.append((start, end))
    for start, end in parsed:
        if start is None:  # a suffix: the last `end` bytes
            if end == 0 or length == 0:
                continue
            return ByteRange(first=max(0, length - end), last=length - 1, length=length)
        if start >= length:
            continue
        return ByteRange(first=start, last=length - 1 if end is None else min(end, length - 1), length=length)
    return Unsatisfiable(length=length)
