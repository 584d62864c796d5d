"""The wire codec: bytes <-> frames. No state, no I/O.

Every datagram is::

    0        8                16
    +--------+----------------+------------------------------+
    | cookie | offset (u64 BE)| payload                      |
    +--------+----------------+------------------------------+

* ``offset < 2**64 - 1``: a *data frame*; the payload is the image bytes at ``[offset, offset + len(payload))``.
* ``offset == 2**64 - 1`` (`METADATA_OFFSET`): a *metadata frame*; the payload is a UTF-8 JSON object that
  describes the image (see `vmcast.protocol.metadata`).
* ``offset & 2**63`` (`PARITY_FLAG`) with a block field other than all ones: a *parity frame* (per-block
  RaptorQ repair symbol, `vmcast.protocol.fec`; docs/PROTOCOL.md section 8)::

      offset = 1 | block (39 bits) | esi (24 bits)       payload = one symbol of `frame` bytes

  The metadata offset and the repair-request offset (2**64 - 2) have the block field all ones, which is never
  a real block, so the three are told apart by the offset alone. A receiver that does not take parity sees an
  offset past the image's end and drops it as `PAST_END`.

The cookie is an opaque 8-byte stream identifier chosen by the sender; a receiver drops every datagram whose
cookie is not the one it was given (several streams may share a group and port).
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass

COOKIE_SIZE = 8
HEADER = struct.Struct(">8sQ")
HEADER_SIZE = HEADER.size  # 16
METADATA_OFFSET = 0xFFFF_FFFF_FFFF_FFFF

# The largest UDP payload IPv4 can carry (65535 - 20 IP - 8 UDP). No frame can be larger.
MAX_DATAGRAM = 65_507

# Parity frames (docs/PROTOCOL.md section 8): bit 63 of the offset set, then a 39-bit block and a 24-bit
# RaptorQ encoding symbol id (RFC 6330's ESI is 24 bits). Image offsets stay below 2**53, so bit 63 is free.
PARITY_FLAG = 1 << 63
PARITY_ESI_BITS = 24
PARITY_ESI_LIMIT = 1 << PARITY_ESI_BITS  # ESIs are 0 .. 2**24 - 1
_PARITY_ESI_MASK = PARITY_ESI_LIMIT - 1
# All ones in the block field: the metadata and repair-request offsets; never a parity frame's block.
PARITY_BLOCK_RESERVED = (1 << (63 - PARITY_ESI_BITS)) - 1


class DropReason(enum.Enum):
    """Why a datagram was counted and thrown away. Values are stable: they name metrics and log fields."""

    TOO_SHORT = "too_short"  # fewer than the 16 header bytes
    FOREIGN_COOKIE = "foreign_cookie"  # another stream's datagram on the same group and port
    MALFORMED_METADATA = "malformed_metadata"  # not UTF-8, not JSON, not an object, bad or missing field
    UNSUPPORTED_VERSION = "unsupported_version"  # a protocol version this receiver does not speak
    CONFLICTING_METADATA = "conflicting_metadata"  # contradicts earlier metadata of the same cookie
    BEFORE_METADATA = "before_metadata"  # data before any metadata told us the image length
    EMPTY_PAYLOAD = "empty_payload"  # a data frame with no bytes in it
    PAST_END = "past_end"  # a data frame reaching beyond the declared image length
    MISALIGNED = "misaligned"  # offset or length does not follow the stream's frame size
    MALFORMED_PARITY = "malformed_parity"  # a parity frame naming no block, a source symbol, or of the wrong size
    STREAM_FAILED = "stream_failed"  # anything arriving after the stream failed


@dataclass(frozen=True, slots=True, kw_only=True)
class DataFrame:
    """Image bytes at a position."""

    offset: int
    """Where the payload starts in the image, in bytes."""
    payload: memoryview
    """The bytes; a view into the datagram, not a copy (valid as long as the datagram buffer is)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MetadataFrame:
    """A metadata frame whose payload parsed as a JSON object (its fields are checked by `metadata`)."""

    fields: dict[str, object]
    """The decoded JSON object, unvalidated beyond being an object."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ParityFrame:
    """A RaptorQ repair symbol of one block (docs/PROTOCOL.md section 8); only the offset's shape is checked."""

    block: int
    """The checksum block it repairs."""
    esi: int
    """RaptorQ encoding symbol id (RFC 6330), >= the block's frame count for a repair symbol."""
    payload: memoryview
    """The symbol; a view into the datagram, not a copy."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Dropped:
    """A datagram that was not accepted."""

    reason: DropReason
    """The counter to increment."""
    detail: str = ""
    """A human-readable explanation, for logs."""


def encode_header(cookie: bytes, offset: int) -> bytes:
    """The 16 header bytes of a frame (send them with `socket.sendmsg` beside the payload: no copy)."""
    if len(cookie) != COOKIE_SIZE:
        raise ValueError(f"cookie must be {COOKIE_SIZE} bytes, got {len(cookie)}")
    return HEADER.pack(cookie, offset)


def parity_offset(*, block: int, esi: int) -> int:
    """The offset field of a parity frame. Raises `ValueError` for a block or ESI the field cannot carry."""
    if not 0 <= block < PARITY_BLOCK_RESERVED:
        raise ValueError(f"parity block out of range: {block}")
    if not 0 <= esi < PARITY_ESI_LIMIT:
        raise ValueError(f"parity ESI out of range: {esi}")
    return PARITY_FLAG | block << PARITY_ESI_BITS | esi


def encode_parity_header(cookie: bytes, *, block: int, esi: int) -> bytes:
    """The 16 header bytes of a parity frame (the symbol of `frame` bytes follows; send it beside, no copy)."""
    return encode_header(cookie, parity_offset(block=block, esi=esi))


def parity_fields(offset: int) -> tuple[int, int] | None:
    """``(block, esi)`` of a parity frame's offset; None for any other offset (data, metadata, repair request)."""
    if not offset & PARITY_FLAG:
        return None
    block = (offset >> PARITY_ESI_BITS) & PARITY_BLOCK_RESERVED
    if block == PARITY_BLOCK_RESERVED:
        return None
    return block, offset & _PARITY_ESI_MASK


def encode_data(cookie: bytes, offset: int, payload: bytes) -> bytes:
    """A whole data frame."""
    if not 0 <= offset < METADATA_OFFSET:
        raise ValueError(f"data offset out of range: {offset}")
    return encode_header(cookie, offset) + bytes(payload)


def encode_metadata(cookie: bytes, fields: dict[str, object]) -> bytes:
    """A whole metadata frame; JSON without insignificant white space, keys in a stable order."""
    body = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return encode_header(cookie, METADATA_OFFSET) + body


def decode(datagram: bytes | bytearray | memoryview, *, cookie: bytes) -> DataFrame | MetadataFrame | ParityFrame | Dropped:
    """Classify one datagram. Never raises, whatever the input.

    Only what the datagram itself shows is checked here; whether a data frame fits the image is the
    assembly's business (`vmcast.protocol.assembly`), since only it knows the image.
    """
    if len(datagram) < HEADER_SIZE:
        return Dropped(reason=DropReason.TOO_SHORT, detail=f"{len(datagram)} bytes")
    their_cookie, offset = HEADER.unpack_from(datagram)
    if their_cookie != cookie:
        return Dropped(reason=DropReason.FOREIGN_COOKIE, detail=their_cookie.hex())
    view = memoryview(datagram)[HEADER_SIZE:]
    if offset != METADATA_OFFSET:
        parity = parity_fields(offset)
        if parity is not None:
            return ParityFrame(block=parity[0], esi=parity[1], payload=view)
        return DataFrame(offset=offset, payload=view)
    return decode_metadata_payload(view)


def decode_metadata_payload(payload: bytes | memoryview) -> MetadataFrame | Dropped:
    """Parse a metadata payload as a JSON object. Never raises."""
    try:
        fields = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        return Dropped(reason=DropReason.MALFORMED_METADATA, detail=f"not UTF-8 JSON: {error}")
    if not isinstance(fields, dict):
        return Dropped(reason=DropReason.MALFORMED_METADATA, detail=f"JSON {type(fields).__name__}, not an object")
    return MetadataFrame(fields=fields)
