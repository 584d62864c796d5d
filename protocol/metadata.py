"""Metadata: what a stream says about its image, parsed into types, and built from an image.

A metadata frame's payload is a JSON object. Every frame carries the image's identity, so any single frame
is enough to start; block checksums are spread over several frames so each stays under the path MTU::

    {"v": 1, "sha1": "<40 hex>", "len": <bytes>,            # required: the original design's two fields
     "frame": <bytes>, "block": <bytes>,                     # optional: data frame and checksum block sizes
     "name": "<image>", "format": "raw",                     # optional: informational
     "xxh3": {"first": <block index>, "sums": ["<16 hex>", ...]},   # optional: some blocks' xxh3-64
     "zero": [[<block>, <count>], ...],    # optional: which of those blocks are all zeros (never sent)
     "zero_frames": [[<frame>, <count>], ...],   # optional: all-zero frames of the other blocks (never sent)
     "fec": "raptorq"}                     # optional: the sender sends parity frames (vmcast.protocol.fec)

A receiver ignores fields it does not know, so later versions can add fields without breaking it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

import xxhash

from .fec import FEC_SCHEME, stream_fec_possible
from .frames import MAX_DATAGRAM, HEADER_SIZE, DropReason, Dropped

PROTOCOL_VERSION = 1

# A metadata payload stays at or under this many bytes: with the 16-byte header and 28 bytes of IPv4+UDP
# headers the datagram is 1244 bytes, under the 1280-byte IPv6 minimum MTU and any Ethernet path.
METADATA_PAYLOAD_LIMIT = 1200

# Checksum blocks aim at about 1 MiB: small enough that a corrupt or missing block costs little to send
# again, large enough that a 1 TiB image needs only a million checksums (~19 MB of metadata per loop... sent
# spread out, and 8 MB in a receiver's memory).
TARGET_BLOCK_SIZE = 1 << 20

# Images are addressed by a u64 offset whose top value means "metadata"; JSON integers above 2**53 do not
# survive every JSON parser, so lengths are kept below that, which is 8 PiB.
MAX_IMAGE_LENGTH = (1 << 53) - 1

# Image names are informational in metadata; longer ones are cut so that every frame keeps room for checksums.
MAX_NAME_IN_METADATA = 200

# Zero detection compares this much of a block first: random data differs within a few bytes, so only blocks
# that start with zeros pay for the full comparison.
_ZERO_PROBE = 4096

# Zero-frame runs announced per block at most (the longest ones; the frames of the others are sent). A run
# costs up to ~25 bytes in every metadata round (at least one a second) and saves at least one frame (1,444
# bytes on the wire) in every loop; the bound keeps the worst block (alternating zero and non-zero frames:
# 374 runs) to ~400 bytes, so a block's checksum and runs always fit one metadata frame with the identity,
# and even an image made only of such blocks has metadata rounds within ~22x its checksums' (section 3).
MAX_ZERO_FRAME_RUNS_PER_BLOCK = 16

_SHA1_HEX = re.compile(r"[0-9a-f]{40}")
_XXH3_HEX = re.compile(r"[0-9a-f]{16}")


def default_block_size(frame_size: int) -> int:
    """The checksum block size for a frame size: a whole number of frames, close to `TARGET_BLOCK_SIZE`."""
    return frame_size * max(1, round(TARGET_BLOCK_SIZE / frame_size))


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """How an image of `length` bytes is cut into frames and checksum blocks (a block is whole frames)."""

    length: int
    """Image size in bytes."""
    frame_size: int
    """Payload bytes of every data frame but the last."""
    block_size: int
    """Bytes per checksum block, a multiple of `frame_size`; the last block may be shorter."""

    def __post_init__(self) -> None:
        if self.frame_size <= 0 or self.block_size <= 0 or self.block_size % self.frame_size:
            raise ValueError(f"block size {self.block_size} is not a positive multiple of frame size {self.frame_size}")

    @property
    def frame_count(self) -> int:
        return -(-self.length // self.frame_size)

    @property
    def block_count(self) -> int:
        return -(-self.length // self.block_size)

    @property
    def frames_per_block(self) -> int:
        return self.block_size // self.frame_size

    def block_span(self, block: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of a block."""
        start = block * self.block_size
        return start, min(start + self.block_size, self.length)

    def frames_in_block(self, block: int) -> int:
        start, end = self.block_span(block)
        return -(-(end - start) // self.frame_size)


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamMetadata:
    """One metadata frame, validated."""

    version: int
    """Protocol version the sender speaks."""
    sha1: str
    """SHA-1 of the whole image, 40 lowercase hex digits."""
    length: int
    """Image size in bytes."""
    frame_size: int | None = None
    """Data frame payload size, when the sender says it (else the receiver learns it from the data)."""
    block_size: int | None = None
    """Checksum block size; present exactly when the sender sends per-block checksums."""
    name: str | None = None
    """Image name, informational."""
    format: str | None = None
    """Image format on the wire (raw, qcow2), informational."""
    checksums_first: int = 0
    """Index of the block whose checksum is ``checksums[0]``."""
    checksums: tuple[int, ...] = ()
    """xxh3-64 of blocks ``checksums_first ...``, as integers."""
    zero_runs: tuple[tuple[int, int], ...] = ()
    """Runs ``(first block, count)`` of all-zero blocks among those this frame has checksums for."""
    zero_frame_runs: tuple[tuple[int, int], ...] = ()
    """Runs ``(first frame, count)`` of all-zero frames in those blocks (not in `zero_runs`' blocks), ascending
    and apart: the sender never sends them (``"zero_frames"``, docs/PROTOCOL.md section 3)."""
    fec: str | None = None
    """The parity scheme the sender sends (``"raptorq"``: `vmcast.protocol.fec`), or None. Another value is a
    scheme this receiver does not know: it takes no parity then (docs/PROTOCOL.md section 8)."""
    rest: bool = False
    """The carousel rests: it finished a loop that every receiver heard whole and sends no more of the image
    until a receiver comes; everything it sent has passed, so what a receiver lacks it asks for now
    (``"rest": true``, docs/PROTOCOL.md section 7)."""

    def identity_fields(self) -> dict[str, object]:
        """The fields that must never change within a stream (each compared on its own)."""
        return {"sha1": self.sha1, "len": self.length, "frame": self.frame_size, "block": self.block_size}


def parse_metadata(fields: dict[str, object]) -> StreamMetadata | Dropped:
    """Validate a decoded metadata object. Never raises."""

    def bad(detail: str) -> Dropped:
        return Dropped(reason=DropReason.MALFORMED_METADATA, detail=detail)

    version = fields.get("v", PROTOCOL_VERSION)
    if not _is_int(version) or version < 1:
        return bad(f"'v' must be a positive integer, got {version!r}")
    if version > PROTOCOL_VERSION:
        return Dropped(reason=DropReason.UNSUPPORTED_VERSION, detail=f"version {version}, this receiver speaks {PROTOCOL_VERSION}")
    sha1 = fields.get("sha1")
    if not isinstance(sha1, str) or not _SHA1_HEX.fullmatch(sha1.lower()):
        return bad(f"'sha1' must be 40 hex digits, got {sha1!r}")
    length = fields.get("len")
    if not _is_int(length) or not 0 <= length <= MAX_IMAGE_LENGTH:
        return bad(f"'len' must be an integer in [0, 2**53), got {length!r}")
    frame_size = fields.get("frame")
    if frame_size is not None and (not _is_int(frame_size) or not 0 < frame_size <= MAX_DATAGRAM - HEADER_SIZE):
        return bad(f"'frame' must be an integer in [1, {MAX_DATAGRAM - HEADER_SIZE}], got {frame_size!r}")
    block_size = fields.get("block")
    if block_size is not None:
        if frame_size is None:
            return bad("'block' needs 'frame'")
        if not _is_int(block_size) or block_size <= 0 or block_size % frame_size:
            return bad(f"'block' must be a positive multiple of 'frame', got {block_size!r}")
    for text_field in ("name", "format"):
        if text_field in fields and not isinstance(fields[text_field], str):
            return bad(f"{text_field!r} must be a string")
    first, sums = 0, ()
    if "xxh3" in fields:
        if block_size is None:
            return bad("'xxh3' needs 'block'")
        parsed = _parse_checksums(fields["xxh3"], block_count=-(-length // block_size))
        if isinstance(parsed, str):
            return bad(parsed)
        first, sums = parsed
    fec = fields.get("fec")
    if fec is not None:
        if not isinstance(fec, str):
            return bad(f"'fec' must be a string, got {fec!r}")
        if block_size is None:
            return bad("'fec' needs 'block' (parity is per checksum block)")
    rest = fields.get("rest", False)
    if not isinstance(rest, bool):
        return bad(f"'rest' must be true or false, got {rest!r}")
    zero_runs: tuple[tuple[int, int], ...] = ()
    if "zero" in fields:
        if not sums:
            return bad("'zero' needs 'xxh3' checksums of the blocks it names")
        zero_runs = _parse_zero_runs(fields["zero"], first=first, stop=first + len(sums))
        if isinstance(zero_runs, str):
            return bad(zero_runs)
    zero_frame_runs: tuple[tuple[int, int], ...] = ()
    if "zero_frames" in fields:
        if not sums:
            return bad("'zero_frames' needs 'xxh3' checksums of the blocks it names frames of")
        zero_frame_runs = _parse_zero_frame_runs(
            fields["zero_frames"], layout=Layout(length=length, frame_size=frame_size, block_size=block_size),
            first_block=first, stop_block=first + len(sums), zero_blocks=zero_runs,
        )
        if isinstance(zero_frame_runs, str):
            return bad(zero_frame_runs)
    return StreamMetadata(
        version=version,
        sha1=sha1.lower(),
        length=length,
        frame_size=frame_size,
        block_size=block_size,
        name=fields.get("name"),
        format=fields.get("format"),
        checksums_first=first,
        checksums=sums,
        zero_runs=zero_runs,
        zero_frame_runs=zero_frame_runs,
        fec=fec,
        rest=rest,
    )


def _is_int(value: object) -> bool:
    # bool is an int subclass in Python, and `true` is not a length.
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_checksums(value: object, *, block_count: int) -> tuple[int, tuple[int, ...]] | str:
    if not isinstance(value, dict):
        return "'xxh3' must be an object"
    first, sums = value.get("first"), value.get("sums")
    if not _is_int(first) or first < 0:
        return "'xxh3.first' must be a non-negative integer"
    if not isinstance(sums, list) or not all(isinstance(s, str) and _XXH3_HEX.fullmatch(s.lower()) for s in sums):
        return "'xxh3.sums' must be a list of 16-hex-digit strings"
    if first + len(sums) > block_count:
        return f"'xxh3' covers blocks up to {first + len(sums) - 1}, the image has {block_count}"
    return first, tuple(int(s, 16) for s in sums)


def _parse_zero_runs(value: object, *, first: int, stop: int) -> tuple[tuple[int, int], ...] | str:
    if not isinstance(value, list):
        return "'zero' must be a list of [block, count] pairs"
    runs = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and all(_is_int(v) for v in item)):
            return f"'zero' entry {item!r} is not a [block, count] pair"
        start, count = item
        if count < 1 or start < first or start + count > stop:
            return f"'zero' run {item!r} is outside blocks [{first}, {stop}) this frame has checksums for"
        runs.append((start, count))
    return tuple(runs)


def _parse_zero_frame_runs(value: object, *, layout: Layout, first_block: int, stop_block: int,
                           zero_blocks: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...] | str:
    """``"zero_frames"``: ascending, apart, inside the frames of blocks ``[first_block, stop_block)`` and in none
    of the blocks this frame names in ``"zero"`` (section 3). Unlike ``"zero"`` runs, these must be ordered: a
    receiver takes them in one pass, and a run in a zero block would be two claims about one block."""
    if not isinstance(value, list):
        return "'zero_frames' must be a list of [frame, count] pairs"
    per_block = layout.frames_per_block
    low = first_block * per_block
    high = min(stop_block * per_block, layout.frame_count)
    zero: set[int] = set()
    for start, count in zero_blocks:
        zero.update(range(start, start + count))
    runs, end_of_previous = [], low
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and all(_is_int(v) for v in item)):
            return f"'zero_frames' entry {item!r} is not a [frame, count] pair"
        start, count = item
        if count < 1 or start < end_of_previous or start + count > high:
            return (f"'zero_frames' run {item!r} is out of order, overlaps another, or is outside frames "
                    f"[{low}, {high}) of the blocks this frame has checksums for")
        if zero and any(block in zero for block in range(start // per_block, (start + count - 1) // per_block + 1)):
            return f"'zero_frames' run {item!r} lies in a block this frame names in 'zero'"
        runs.append((start, count))
        end_of_previous = start + count
    return tuple(runs)


def zero_runs_of(flags: list[bool] | tuple[bool, ...]) -> tuple[tuple[int, int], ...]:
    """``(first, count)`` runs of the True entries."""
    runs, start = [], None
    for index, flag in enumerate(flags):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            runs.append((start, index - start))
            start = None
    if start is not None:
        runs.append((start, len(flags) - start))
    return tuple(runs)


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """Everything a sender announces about an image: its identity, layout and block checksums."""

    name: str
    """Image name."""
    format: str
    """Format of the bytes streamed (raw, qcow2, ...)."""
    sha1: str
    """SHA-1 of the whole image, lowercase hex."""
    layout: Layout
    """Frame and block sizes."""
    block_xxh3: tuple[int, ...] = field(repr=False)
    """xxh3-64 of every block, in order."""
    zero_blocks: tuple[tuple[int, int], ...] = ()
    """Runs ``(first block, count)`` of all-zero blocks: announced in metadata and never sent."""
    zero_frames: tuple[tuple[int, int], ...] = ()
    """Runs ``(first frame, count)`` of all-zero frames in the other blocks, ascending, each inside one block,
    at most `MAX_ZERO_FRAME_RUNS_PER_BLOCK` per block: announced in metadata (``"zero_frames"``) and never sent."""
    fec: bool | None = None
    """Whether the sender announces and sends RaptorQ parity (``"fec": "raptorq"``). None (the default) becomes
    True exactly when every block of the layout can be coded (`vmcast.protocol.fec.stream_fec_possible`:
    frame size a multiple of 8, blocks of at most 8,192 frames); True for a layout that cannot is a
    `ValueError`; False turns parity off."""

    def __post_init__(self) -> None:
        layout = self.layout
        possible = stream_fec_possible(length=layout.length, frame_size=layout.frame_size, block_size=layout.block_size)
        if self.fec is None:
            object.__setattr__(self, "fec", possible)
        elif self.fec and not possible:
            raise ValueError(f"no parity for frames of {layout.frame_size} bytes in blocks of {layout.block_size}")

    def zero_block_flags(self) -> list[bool]:
        flags = [False] * self.layout.block_count
        for first, count in self.zero_blocks:
            flags[first : first + count] = [True] * count
        return flags

    def unsent_frame_runs(self) -> tuple[tuple[int, int], ...]:
        """``(first frame, count)`` runs of the frames a loop never sends: those of zero blocks and the zero
        frames, in order, adjacent runs merged."""
        layout, per_block = self.layout, self.layout.frames_per_block
        runs = [(first * per_block, min((first + count) * per_block, layout.frame_count) - first * per_block)
                for first, count in self.zero_blocks]
        runs += self.zero_frames
        runs.sort()
        merged: list[list[int]] = []
        for first, count in runs:
            if merged and merged[-1][0] + merged[-1][1] >= first:
                merged[-1][1] = max(merged[-1][1], first + count - merged[-1][0])
            else:
                merged.append([first, count])
        return tuple((first, count) for first, count in merged)

    def unsent_bytes(self) -> int:
        """Image bytes that a loop never sends (zero blocks and zero frames; the last frame may be short)."""
        layout = self.layout
        return sum(min((first + count) * layout.frame_size, layout.length) - first * layout.frame_size
                   for first, count in self.unsent_frame_runs())

    def metadata_frames(self, *, payload_limit: int = METADATA_PAYLOAD_LIMIT) -> list[dict[str, object]]:
        """The metadata objects that together announce the manifest, each under `payload_limit` bytes encoded.

        Every object carries the identity; the checksums are shared out in order. An empty image or one
        short enough needs a single object.
        """
        base = self._identity()
        zero = self.zero_block_flags()
        frame_runs = self._zero_frame_runs_by_block()
        # Most checksums a frame carries (as before zero frames): a frame of a few blocks is re-sent often.
        most = max(1, (payload_limit - 260) // 19)
        objects: list[dict[str, object]] = []
        first, total = 0, len(self.block_xxh3)
        while first < total:
            # Blocks are added while an upper bound of the encoding fits (each block's runs counted whole: a
            # block's checksum and its runs travel together); the exact encoding is then checked, and the
            # count shrunk if it is over, which the bound should make impossible.
            used = len(json.dumps(dict(base, xxh3={"first": first, "sums": []}, zero=[], zero_frames=[]), separators=(",", ":")))
            count = 0
            while first + count < total and count < most:
                block = first + count
                cost = 19 + (len(f"[{block},1],") if zero[block] else 0)
                cost += sum(len(f"[{start},{length}],") for start, length in frame_runs.get(block, ()))
                if count and used + cost > payload_limit:
                    break
                used += cost
                count += 1
            while True:
                fields = self._checksum_frame(base, first, count, zero, frame_runs)
                if len(json.dumps(fields, separators=(",", ":"))) <= payload_limit:
                    break
                if count == 1:
                    raise ValueError(f"metadata payload limit {payload_limit} leaves no room for a checksum")
                count = max(1, count * 3 // 4)
            objects.append(fields)
            first += count
        return objects or [base]

    def rest_metadata(self) -> dict[str, object]:
        """The metadata object a resting carousel sends (docs/PROTOCOL.md section 7): the identity, no checksums."""
        return dict(self._identity(), rest=True)

    def _identity(self) -> dict[str, object]:
        """The fields every metadata object carries."""
        identity: dict[str, object] = {
            "v": PROTOCOL_VERSION,
            "sha1": self.sha1,
            "len": self.layout.length,
            "frame": self.layout.frame_size,
            "block": self.layout.block_size,
            # Informational, and a URL can be long: it must not crowd out the checksums.
            "name": self.name[:MAX_NAME_IN_METADATA],
            "format": self.format,
        }
        if self.fec:
            identity["fec"] = FEC_SCHEME
        return identity

    def _zero_frame_runs_by_block(self) -> dict[int, list[tuple[int, int]]]:
        per_block = self.layout.frames_per_block
        runs: dict[int, list[tuple[int, int]]] = {}
        for start, count in self.zero_frames:
            runs.setdefault(start // per_block, []).append((start, count))
        return runs

    def _checksum_frame(self, base: dict[str, object], first: int, count: int, zero: list[bool],
                        frame_runs: dict[int, list[tuple[int, int]]]) -> dict[str, object]:
        sums = [f"{value:016x}" for value in self.block_xxh3[first : first + count]]
        fields = dict(base, xxh3={"first": first, "sums": sums})
        runs = zero_runs_of(zero[first : first + count])
        if runs:
            fields["zero"] = [[first + start, length] for start, length in runs]
        zero_frames = [[start, length] for block in range(first, first + count) for start, length in frame_runs.get(block, ())]
        if zero_frames:
            fields["zero_frames"] = zero_frames
        return fields


class ManifestBuilder:
    """Hashes an image fed to it in order, in chunks of any size, and makes its `Manifest`.

    One pass computes SHA-1, the per-block xxh3-64, which blocks are all zeros and, in the others, which frames
    are, so a sender reads its image once. Zero detection is exact (a byte comparison, not a hash), since a zero
    block or frame is never sent. Each block is copied into a buffer of one block for the frame scan, which
    costs a block that holds no run of a frame's worth of zeros one C-level search (`_zero_frames_in`).
    """

    def __init__(self, *, name: str, format: str, frame_size: int, block_size: int | None = None, fec: bool | None = None) -> None:
        self._name, self._format, self._frame_size, self._fec = name, format, frame_size, fec
        self._block_size = block_size or default_block_size(frame_size)
        if self._block_size % frame_size:
            raise ValueError("block size must be a multiple of the frame size")
        self._zeros = bytes(self._block_size)
        self._zero_frame = bytes(frame_size)
        self._sha1 = hashlib.sha1()
        self._block = xxhash.xxh3_64()
        self._block_bytes = bytearray(self._block_size)
        self._block_filled = 0
        self._block_is_zero = True
        self._sums: list[int] = []
        self._zero_flags: list[bool] = []
        self._zero_frames: list[tuple[int, int]] = []
        self._length = 0

    def update(self, data: bytes | memoryview) -> None:
        self._sha1.update(data)
        self._length += len(data)
        view = memoryview(data)
        while view:
            take = min(len(view), self._block_size - self._block_filled)
            piece = view[:take]
            self._block.update(piece)
            self._block_bytes[self._block_filled : self._block_filled + take] = piece
            if self._block_is_zero:
                self._block_is_zero = self._is_zero(piece)
            self._block_filled += take
            view = view[take:]
            if self._block_filled == self._block_size:
                self._end_block()

    def _is_zero(self, piece: memoryview) -> bool:
        probe = min(len(piece), _ZERO_PROBE)
        if bytes(piece[:probe]) != self._zeros[:probe]:
            return False
        return bytes(piece) == self._zeros[: len(piece)]

    def _end_block(self) -> None:
        self._sums.append(self._block.intdigest())
        self._zero_flags.append(self._block_is_zero)
        if not self._block_is_zero:
            frames = _zero_frames_in(self._block_bytes, self._block_filled, self._zero_frame)
            if frames:
                first = (len(self._sums) - 1) * (self._block_size // self._frame_size)
                runs = sorted(_runs_of_indexes(frames), key=lambda run: -run[1])[:MAX_ZERO_FRAME_RUNS_PER_BLOCK]
                self._zero_frames += sorted((first + start, count) for start, count in runs)
        self._block.reset()
        self._block_filled = 0
        self._block_is_zero = True

    def finish(self) -> Manifest:
        if self._block_filled:
            self._end_block()
        layout = Layout(length=self._length, frame_size=self._frame_size, block_size=self._block_size)
        return Manifest(
            name=self._name,
            format=self._format,
            sha1=self._sha1.hexdigest(),
            layout=layout,
            block_xxh3=tuple(self._sums),
            zero_blocks=zero_runs_of(self._zero_flags),
            zero_frames=tuple(self._zero_frames),
            fec=self._fec,
        )


def _zero_frames_in(block: bytearray, filled: int, zero_frame: bytes) -> list[int]:
    """Indexes of the whole frames (of ``len(zero_frame)`` bytes) in ``block[:filled]`` that are all zeros.

    One search for a frame's worth of zeros anywhere (C speed; random data has none), then frame by frame from
    the first frame boundary at or after the match while frames are zeros, then a search again. A zero frame at
    boundary ``s`` is itself a match, so no search from before ``s`` can pass it. The image's short last frame
    is never one.
    """
    size = len(zero_frame)
    found = []
    match = block.find(zero_frame, 0, filled)
    while match >= 0:
        index = -(-match // size)
        start = index * size
        while start + size <= filled and block[start : start + size] == zero_frame:
            found.append(index)
            index += 1
            start += size
        if start + size > filled:
            break
        match = block.find(zero_frame, start + 1, filled)
    return found


def _runs_of_indexes(indexes: list[int]) -> list[tuple[int, int]]:
    """``(first, count)`` runs of ascending distinct integers."""
    runs: list[tuple[int, int]] = []
    for index in indexes:
        if runs and runs[-1][0] + runs[-1][1] == index:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs


def manifest_of(data: bytes, *, name: str = "image", format: str = "raw", frame_size: int = 1400, block_size: int | None = None,
                fec: bool | None = None) -> Manifest:
    """The manifest of an image held in memory (tests, simulations). `fec`: as `Manifest.fec`."""
    builder = ManifestBuilder(name=name, format=format, frame_size=frame_size, block_size=block_size, fec=fec)
    builder.update(data)
    return builder.finish()
