"""Per-block parity (FEC): RaptorQ (RFC 6330) repair symbols of one checksum block. Pure computation, no I/O.

Why: per-frame repair resends the *union* of every receiver's losses; a parity symbol of block ``b`` instead
stands in for *any one* missing frame of ``b`` at *every* receiver, so the sender sends, per block, only the
largest number of symbols one receiver still needs (NORM, RFC 5740, "NACK with parity"). docs/PROTOCOL.md
section 8 is the wire contract; this module is the coding, done by the `raptorq` library (Rust, via pyo3).

How a vmcast block maps onto RaptorQ: a block is exactly one RaptorQ source block (SBN 0) whose source symbols
are the block's frames: symbol size = the frame size ``F``, ``K`` = frames in the block, source symbol ``i`` =
frame ``i`` of the block (the block's last frame, if short, zero-padded to ``F``). Repair symbols have ESIs
``K, K + 1, ...`` (below ``2**24``). That needs ``F % 8 == 0`` (RFC 6330 symbol alignment) and a block small
enough for one source block without sub-blocking; `fec_possible` checks it against the library itself, and
a stream where it fails has no parity.

Cost (measured here, K = 749, F = 1400): an encoder ~6 ms per 1 MiB block, further symbols ~4 µs each;
decoding 1-6 ms per block whatever the number missing. Decoding from exactly K symbols succeeds ~99% of the
time, from K + 1 ~99.99%: a failed decode needs one more symbol, not a different one.

Error handling: bad arguments from the caller raise `ValueError` (symbols of the wrong size, ESIs out of
range): the assembly checks everything from the wire before it comes here. The library's own panics cannot
be reached with checked arguments; one that happens anyway makes `decode_block` answer "not decodable".
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import raptorq

FEC_SCHEME = "raptorq"
"""The value of the metadata field ``"fec"`` that announces RaptorQ parity frames."""

# RFC 6330 section 4.3: symbols are a multiple of the alignment Al; the library uses Al = 8.
SYMBOL_ALIGNMENT = 8
# The 4-byte RaptorQ payload id (SBN u8, ESI u24) the library puts before each symbol; not sent by vmcast,
# where the frame header's offset carries block and ESI.
PAYLOAD_ID_SIZE = 4
# Encoding symbol ids are 24 bits (RFC 6330 section 3.2).
ESI_LIMIT = 1 << 24
# A block of more frames than this is not coded: with the library's defaults (10 MB decoder working memory)
# a larger block is cut into sub-blocks, so source symbol i would no longer be frame i. vmcast's ~1 MiB blocks
# have 749 frames of 1400 bytes (or ~1000 of 1000); this leaves room for frames down to 128 bytes.
MAX_SOURCE_SYMBOLS = 8192
# Symbols a `ParityEncoder` makes at least per call to the library (which starts from ESI K every time):
# generating in chunks that at least double keeps asking for one symbol at a time linear overall.
ENCODE_CHUNK = 64


def _packet_limit(frame_size: int) -> int:
    # The library's "maximum transmission unit" argument, from which it derives the symbol size. Measured
    # (raptorq 2.0): passing F gives symbols of exactly F bytes for every F % 8 == 0 from 8 to 65,488;
    # F + 4 does too from 64 on, but gives F + 4 below. `fec_possible` checks the outcome anyway.
    return frame_size


@functools.lru_cache(maxsize=64)
def fec_possible(frame_size: int, frames_in_block: int) -> bool:
    """Whether blocks of `frames_in_block` frames of `frame_size` bytes map onto one RaptorQ source block.

    Checked against the library itself once per pair (a trial encode of a patterned block, a few ms for
    1 MiB): exactly K source packets, all SBN 0, source packet i = frame i.
    """
    if frame_size <= 0 or frame_size % SYMBOL_ALIGNMENT or frame_size > 0xFFFF:
        return False
    if not 1 <= frames_in_block <= MAX_SOURCE_SYMBOLS:
        return False
    pattern = b"".join(index.to_bytes(4, "big") * (frame_size // 4) + bytes(frame_size % 4) for index in range(frames_in_block))
    try:
        packets = raptorq.Encoder.with_defaults(pattern, _packet_limit(frame_size)).get_encoded_packets(1)
    except Exception:  # noqa: BLE001 - any refusal of the library means "no parity for this layout"
        return False
    if len(packets) != frames_in_block + 1:
        return False
    for index, packet in enumerate(packets):
        if len(packet) != PAYLOAD_ID_SIZE + frame_size or packet[0] != 0 or int.from_bytes(packet[1:4], "big") != index:
            return False
        if index < frames_in_block and packet[PAYLOAD_ID_SIZE:] != pattern[index * frame_size : (index + 1) * frame_size]:
            return False
    return True


@functools.lru_cache(maxsize=8)
def _source_payload_ids(k: int) -> tuple[bytes, ...]:
    """The payload ids (SBN 0, ESI i) of source symbols 0 .. k - 1: made once per K, not once per frame of
    every block decoded (at 1% loss nearly every block is, and building them was a third of the Python time
    of a decode)."""
    return tuple(b"\x00" + index.to_bytes(3, "big") for index in range(k))


def stream_fec_possible(*, length: int, frame_size: int, block_size: int) -> bool:
    """Whether every block of an image (`length` bytes, blocks of `block_size`) can have parity."""
    if length <= 0 or block_size % frame_size:
        return False
    per_block = block_size // frame_size
    if not fec_possible(frame_size, min(per_block, -(-length // frame_size))):
        return False
    last_block_length = length - (length - 1) // block_size * block_size
    return fec_possible(frame_size, -(-last_block_length // frame_size))


def source_symbols(block_length: int, frame_size: int) -> int:
    """K: the frames (source symbols) of a block of `block_length` bytes."""
    return -(-block_length // frame_size)


class ParityEncoder:
    """Repair symbols of one block, made on demand.

    `symbols(first_esi, count)` returns symbol bytes (no payload id) for ESIs ``first_esi ..``. Symbols are
    generated in chunks (at least `ENCODE_CHUNK`, at least doubling) and kept from the lowest ESI asked in
    the latest call on: a sender asks for fresh ESIs in increasing order and never again for one it sent,
    so memory stays about what was asked for recently, and an ESI asked for again is made again.

    Error handling: `ValueError` for a block that cannot be coded (`fec_possible`) or ESIs out of range.
    Resource handling: holds the block's bytes (inside the library's encoder) and the kept symbols: about
    the block's size plus the symbols asked for; drop the object to free them.
    """

    def __init__(self, block_bytes: bytes | bytearray | memoryview, *, frame_size: int) -> None:
        data = bytes(block_bytes)
        self.frame_size = frame_size
        self.block_length = len(data)
        self.source_symbols = source_symbols(len(data), frame_size)
        """K: the block's frames; repair ESIs start here."""
        if not fec_possible(frame_size, self.source_symbols):
            raise ValueError(f"no parity for blocks of {self.source_symbols} frames of {frame_size} bytes")
        self._encoder = raptorq.Encoder.with_defaults(data, _packet_limit(frame_size))
        self._kept_from = self.source_symbols  # ESI of self._kept[0]
        self._kept: list[bytes] = []

    def symbols(self, first_esi: int, count: int) -> list[bytes]:
        """Symbols for ESIs ``first_esi .. first_esi + count - 1`` (each `frame_size` bytes)."""
        k = self.source_symbols
        if count < 0 or first_esi < k or first_esi + count > ESI_LIMIT:
            raise ValueError(f"repair ESIs [{first_esi}, {first_esi + count}) outside [{k}, {ESI_LIMIT})")
        if count == 0:
            return []
        stop = first_esi + count
        kept_stop = self._kept_from + len(self._kept)
        if first_esi < self._kept_from or stop > kept_stop:
            made = kept_stop - k  # repair symbols the latest generation reached
            wanted = min(ESI_LIMIT - k, max(stop - k, 2 * made, made + ENCODE_CHUNK))
            packets = self._encoder.get_encoded_packets(wanted)  # ESIs 0 .. k + wanted - 1, in order
            self._kept = [bytes(packet[PAYLOAD_ID_SIZE:]) for packet in packets[first_esi : k + wanted]]
            self._kept_from = first_esi
        start = first_esi - self._kept_from
        result = self._kept[start : start + count]
        # Forget what came before this call's first ESI: the sender moved past it.
        if start:
            del self._kept[:start]
            self._kept_from = first_esi
        return result


def decode_block(
    *,
    block_length: int,
    frame_size: int,
    held: Iterable[tuple[int, bytes | bytearray | memoryview]],
    parity: Iterable[tuple[int, bytes | bytearray | memoryview]],
) -> bytes | None:
    """The block's bytes from some of its frames and some repair symbols, or None if they do not decode yet.

    `held`: ``(frame index within the block, frame bytes)`` — full frames, except the block's last, which may
    be short (as on the wire). `parity`: ``(esi, symbol)`` with ``esi >= K`` and symbols of `frame_size`
    bytes. Only these symbols are used: K of them, any mix, decode ~99% of the time, K + 1 ~99.99%.
    The result is only as good as its inputs: a wrong symbol gives a wrong block, which the block checksum
    catches (the caller must check it as for any block: `Assembly.check_block`).

    Error handling: `ValueError` for a block that cannot be coded, or an index, ESI or size out of range.
    """
    k = source_symbols(block_length, frame_size)
    if block_length <= 0 or not fec_possible(frame_size, k):
        raise ValueError(f"no parity for a block of {block_length} bytes in frames of {frame_size}")
    last_length = block_length - (k - 1) * frame_size
    headers = _source_payload_ids(k)
    packets: list[bytes] = []
    for index, frame in held:
        expected = last_length if index == k - 1 else frame_size
        if not 0 <= index < k or len(frame) != expected:
            raise ValueError(f"frame {index} of {len(frame)} bytes does not fit a block of {k} frames of {frame_size}")
        # One copy per packet (bytes + any buffer makes the packet): the library takes bytes only.
        packets.append(headers[index] + frame if expected == frame_size else headers[index] + bytes(frame) + bytes(frame_size - expected))
    for esi, symbol in parity:
        if not k <= esi < ESI_LIMIT or len(symbol) != frame_size:
            raise ValueError(f"repair symbol {esi} of {len(symbol)} bytes does not fit a block of {k} frames of {frame_size}")
        packets.append(b"\x00" + esi.to_bytes(3, "big") + symbol)
    if len(packets) < k:
        return None
    decoder = raptorq.Decoder.with_defaults(block_length, _packet_limit(frame_size))
    try:
        for packet in packets:
            result = decoder.decode(packet)
            if result is not None:
                return bytes(result[:block_length]) if len(result) >= block_length else None
    except BaseException as error:  # a pyo3 PanicException derives from BaseException, not Exception
        if type(error).__module__ != "pyo3_runtime":
            raise
        return None
    return None
