"""The receiver's state machine: turns datagrams into "write these bytes here" and decides when an image is whole.

Sans-IO, after h11: the caller owns the socket and the disk. It feeds every datagram to
`Assembly.receive_datagram`, acts on the event returned, and answers two questions the state machine cannot
answer without I/O: "here are the bytes of block N as written" (`check_block`) and "here is the SHA-1 of the
whole image as written" (`check_image`).

States and their rules::

    AWAITING_METADATA --first valid metadata (and a known frame size)--> RECEIVING
    RECEIVING --last block verified--> VERIFYING_IMAGE
    VERIFYING_IMAGE --check_image(right sha1)--> COMPLETE
    VERIFYING_IMAGE --check_image(wrong sha1)--> RECEIVING   (everything forgotten, taken again)
    any --metadata contradicting the stream's identity--> FAILED   (terminal)

* Data may arrive in any order, any number of times, starting anywhere in the sender's loop (late join).
* A block is checked as soon as all its frames are in and its checksum is known; a corrupt block is
  forgotten and taken again on a later loop.
* Frames the sender never sends are taken from metadata: all-zero blocks (``zero``) count as received and
  verified; all-zero frames (``zero_frames``) count as held, and `MetadataReceived.zero_frames` names them so
  the caller zeros them on its target before it checks the blocks they complete: those blocks' xxh3 covers
  the zeros. A forgotten block forgets its zero frames; the next metadata round names them again.
* Senders that announce only ``sha1`` and ``len`` (a minimal third-party sender) work: the frame size is
  learned from the data, blocks are bookkeeping units with nothing to check, and SHA-1 decides at the end.
* Received data is tracked in a bitarray with one bit per frame; memory is one bit per frame plus 4 bytes per
  block (about 100 KB and 4 KB for a 1 GiB image in 1400-byte frames).

Parity (docs/PROTOCOL.md section 8), only when metadata says ``"fec": "raptorq"`` and the stream has block
checksums: a parity frame of block ``b`` is kept (copied) while ``b`` is unverified and misses frames, up to
the frames it misses plus `PARITY_SPARE` symbols and `PARITY_MEMORY_LIMIT` bytes over all blocks; any other
is counted in `parity_unused` and returned as `ParityUnused`. When frames held plus parity held reach the
block's frame count, `ParityReceived.decodable` (or `DataReceived.decodable_block`) says so; the caller then
calls `recover_block` with the block's bytes as written, writes the frames `BlockRecovered` names and checks
the block with `check_block` like any complete block: parity never bypasses the block checksum.
"""

from __future__ import annotations

import enum
import struct
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import xxhash
from bitarray import bitarray
from bitarray.util import intervals

from .errors import LocalProtocolError, MetadataConflict, RemoteProtocolError
from .fec import FEC_SCHEME, decode_block, stream_fec_possible
from .frames import (
    COOKIE_SIZE,
    HEADER,
    HEADER_SIZE,
    METADATA_OFFSET,
    PARITY_FLAG,
    Dropped,
    DropReason,
    decode_metadata_payload,
    parity_fields,
)
from .metadata import Layout, StreamMetadata, default_block_size, parse_metadata

# Parity symbols a block keeps beyond the frames it misses. Decoding from exactly K symbols fails ~1% of the
# time (RFC 6330: 1 in 100 at K, 1 in 10,000 at K + 1); a receiver that failed needs one more symbol, and
# the sender sends the most any receiver asked for, so a receiver often gets one or two more than it needs:
# keeping two spare makes a failed decode almost never wait for another request round.
PARITY_SPARE = 2
# Bytes of parity symbols one assembly holds at most, over all blocks (64 MiB: ~48,000 symbols of 1400
# bytes, the parity of ~64 blocks missing everything). Parity is only asked for blocks the carousel passed,
# so this binds only for parity others asked for, of blocks this receiver has not been sent yet.
PARITY_MEMORY_LIMIT = 64 << 20


class AssemblyState(enum.Enum):
    AWAITING_METADATA = "awaiting_metadata"
    RECEIVING = "receiving"
    VERIFYING_IMAGE = "verifying_image"
    COMPLETE = "complete"
    FAILED = "failed"


# -- Events -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MetadataReceived:
    """A valid metadata frame of this stream."""

    metadata: StreamMetadata
    """What the frame said."""
    first_metadata: bool
    """True for the stream's first accepted metadata: the image's identity and size are known now."""
    blocks_to_check: tuple[int, ...] = ()
    """Complete blocks whose checksums arrived with this frame: call `check_block` for each."""
    zero_blocks: tuple[int, ...] = ()
    """Blocks this frame announced as all zeros, which the sender never sends: make them read as zeros on
    the target (a hole, BLKZEROOUT, or nothing on a new sparse file). They count as received and verified."""
    zero_frames: tuple[tuple[int, int], ...] = ()
    """Runs ``(first frame, count)`` of frames this frame announced as all zeros (``"zero_frames"``), which the
    sender never sends, and that were not held: make them read as zeros on the target *before* checking
    `blocks_to_check` (a block they complete is named there, and its xxh3 covers them). They count as held."""
    blocks_to_recover: tuple[int, ...] = ()
    """Blocks that those zero frames made decodable with the parity held for them (parity streams only): once
    the zeros are on the target, call `recover_block` for each, as after `ParityReceived.decodable`."""


# Not frozen, unlike the other events: this one is made for every datagram, and a frozen dataclass's
# __init__ (object.__setattr__ per field) costs about 0.3 µs more — 10% of the receiver's per-datagram budget.
# Treat it as immutable all the same.
@dataclass(slots=True, kw_only=True)
class DataReceived:
    """New image bytes: write them at `offset` before feeding the next datagram."""

    offset: int
    """Byte position in the image."""
    payload: memoryview
    """The bytes (a view into the datagram)."""
    completed_block: int | None
    """A block that this frame completed and that can be checked now: call `check_block` after writing."""
    decodable_block: int | None = None
    """A block that this frame made decodable with the parity held for it: after writing this frame, call
    `recover_block` (parity streams only; at most one of this and `completed_block` is set)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunReceived:
    """New image bytes, a run of consecutive whole frames from one buffer (`Assembly.receive_run`): write the
    payload of datagram ``i`` (the buffer's bytes from ``i * segment + HEADER_SIZE``, one frame long) at
    ``offset + i * frame size``, for ``i`` below `count`; then check each of `completed_blocks`, in order."""

    offset: int
    """Byte position in the image of the first frame."""
    count: int
    """Frames (datagrams) in the run: all of the buffer's."""
    completed_blocks: tuple[int, ...]
    """Blocks the run completed whose checksums are known: call `check_block` for each after writing."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ParityReceived:
    """A parity symbol of an unverified block was kept (copied: the datagram buffer may be reused)."""

    block: int
    """The block it repairs."""
    esi: int
    """Its RaptorQ encoding symbol id."""
    decodable: bool
    """True when frames held plus parity held now reach the block's frame count: call `recover_block` with
    the block's bytes as written."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ParityUnused:
    """A well-formed parity symbol that was not kept (counted in `Assembly.parity_unused`)."""

    block: int
    esi: int
    reason: str
    """Why: ``"verified"`` (the block is verified), ``"complete"`` (every frame held), ``"duplicate"`` (this
    symbol is held already), ``"enough"`` (missing frames + `PARITY_SPARE` held), ``"memory"``
    (`PARITY_MEMORY_LIMIT` reached), ``"refused"`` (the block's last parity-decoded copy failed its checksum:
    its data frames must complete it first). Stable values: they name metrics."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockRecovered:
    """`recover_block` decoded the block: write `frames`, then read the block back and call `check_block`."""

    block: int
    frames: tuple[tuple[int, bytes], ...]
    """``(image offset, bytes)`` of every frame of the block that was missing; they now count as held."""
    checksum_known: bool
    """True: call `check_block` now. False: the block's checksum has not arrived yet; a later
    `MetadataReceived.blocks_to_check` names the block (as for a block completed by data frames)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryFailed:
    """`recover_block` could not decode yet (RaptorQ from K symbols fails ~1% of the time): one more symbol of
    this block is needed. The parity is kept; `parity_held` now counts one less, so the repair planner asks
    for one more and the next symbol makes the block decodable again."""

    block: int
    symbols: int
    """Symbols (frames held + parity held) the attempt used."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Duplicate:
    """Bytes we already hold; nothing to write."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamFailed:
    """The stream broke the protocol; the assembly is now FAILED for good."""

    error: RemoteProtocolError


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockVerified:
    """A block's bytes as written match its checksum (or the stream has no block checksums)."""

    block: int
    image_complete: bool
    """True when this was the last block: compute the image's SHA-1 and call `check_image`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockCorrupt:
    """A block's bytes as written do not match: it was forgotten and will be taken again."""

    block: int
    expected: int
    actual: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageVerified:
    """The whole image as written has the announced SHA-1."""

    sha1: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageCorrupt:
    """The whole image as written has another SHA-1: everything was forgotten and will be taken again."""

    expected: str
    actual: str


DatagramEvent = MetadataReceived | DataReceived | Duplicate | ParityReceived | ParityUnused | Dropped | StreamFailed


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """What a receiver saves to resume after a crash: the image identity and which blocks were verified.

    Only verified blocks are kept; a block that was complete but unchecked is taken again, because the
    receiver may not have flushed it to disk.
    """

    sha1: str
    length: int
    frame_size: int
    block_size: int
    verified_blocks: bytes
    """`bitarray.tobytes()` of one bit per block, big-endian bit order."""


# -- The state machine --------------------------------------------------------------------------------------


class Assembly:
    """Reassembles one stream (one cookie) into an image.

    Error handling: never raises on datagrams; foreign or malformed ones are counted in `drops` by
    `DropReason`. Metadata that contradicts the stream's identity moves it to FAILED and returns
    `StreamFailed`. Wrong calls from the caller raise `LocalProtocolError`.
    """

    def __init__(self, *, cookie: bytes, checkpoint: Checkpoint | None = None) -> None:
        if len(cookie) != COOKIE_SIZE:
            raise ValueError(f"cookie must be {COOKIE_SIZE} bytes")
        self.cookie = cookie
        self.state = AssemblyState.AWAITING_METADATA
        self.drops: Counter[DropReason] = Counter()
        self.duplicates = 0
        self.corrupt_blocks = 0
        self.failure: RemoteProtocolError | None = None
        self.metadata: StreamMetadata | None = None
        self.layout: Layout | None = None
        self._checkpoint = checkpoint
        self.resumed_blocks = 0
        self._has_block_checksums = False
        self._checksums: list[int | None] = []
        self._received: bitarray = bitarray()
        self._block_frames = array("I")
        self._verified: bitarray = bitarray()
        self._verified_count = 0
        self._received_bytes = 0
        self._frames_per_block = 1
        self._last_block = -1
        self._frames_in_last_block = 0
        self._fec = False
        self.parity_held = array("I")
        """Per block, parity symbols held that count toward decoding it: symbols kept less one per failed
        decode attempt (`RecoveryFailed`). Read by `RepairPlanner`; never write it."""
        self.parity_seen = array("I")
        """Per block, one past the highest parity ESI that arrived (0: none), kept or not: what the repair
        planner tells the sender it has seen (docs/PROTOCOL.md section 8). Read by `RepairPlanner`."""
        self.parity_refused = bitarray()
        """Per block, set while the block takes no parity: its last parity-decoded copy failed its checksum, so
        a symbol held may have been wrong (corrupted in flight with a valid UDP checksum). Each new decode
        would use the symbols held, and with any rate of such corruption could fail forever; the block's data
        frames complete it instead (the planner asks for them as frames). Cleared when the block verifies.
        Read by `RepairPlanner`; never write it."""
        self._recovered_unchecked: set[int] = set()  # recovered by parity, not yet judged by check_block
        self._parity: dict[int, dict[int, bytes]] = {}  # block -> esi -> symbol
        self._parity_failures: dict[int, int] = {}
        self._parity_bytes = 0
        self.parity_kept = 0
        self.parity_unused = 0
        self.blocks_recovered = 0
        self.recoveries_failed = 0
        self._run_headers: dict[int, Callable[[bytes | bytearray | memoryview], tuple]] = {}
        """Per datagram count, the header parser of a coalesced buffer of whole frames (`receive_run`)."""

    # -- progress --------------------------------------------------------------------------------------------

    @property
    def received_bytes(self) -> int:
        """Image bytes held (verified or not), for progress."""
        return self._received_bytes

    @property
    def verified_blocks(self) -> int:
        return self._verified_count

    @property
    def length(self) -> int | None:
        return self.metadata.length if self.metadata else None

    @property
    def fec(self) -> bool:
        """Whether this stream takes parity frames (metadata said ``"fec": "raptorq"``, with block checksums)."""
        return self._fec

    @property
    def parity_bytes(self) -> int:
        """Bytes of parity symbols held now (at most `PARITY_MEMORY_LIMIT`)."""
        return self._parity_bytes

    @property
    def held_frames(self) -> bitarray:
        """One bit per frame, set when the frame is held (for `RepairPlanner`). Read it; never write it."""
        return self._received

    def is_verified(self, block: int) -> bool:
        """Whether `block` is verified (a fallback must not overwrite a block multicast already verified)."""
        return bool(self._verified[block])

    def missing_blocks(self) -> list[int]:
        """Blocks not yet verified, in order (what to ask a repair server for)."""
        return list(self._verified.search(0)) if self.layout else []

    def checkpoint(self) -> Checkpoint | None:
        """What to save to resume later; None before the layout is known."""
        if self.layout is None or self.metadata is None:
            return None
        return Checkpoint(
            sha1=self.metadata.sha1,
            length=self.layout.length,
            frame_size=self.layout.frame_size,
            block_size=self.layout.block_size,
            verified_blocks=self._verified.tobytes(),
        )

    # -- datagrams ---------------------------------------------------------------------------------------------

    def receive_datagram(self, datagram: bytes | bytearray | memoryview) -> DatagramEvent:
        """Classify one datagram and update the state. Never raises.

        This is the per-datagram hot path: it allocates only the view and the event it returns.
        """
        if len(datagram) < HEADER_SIZE:
            return self._drop(DropReason.TOO_SHORT, f"{len(datagram)} bytes")
        cookie, offset = HEADER.unpack_from(datagram)
        if cookie != self.cookie:
            return self._drop(DropReason.FOREIGN_COOKIE, cookie.hex())
        if self.state is AssemblyState.FAILED:
            return self._drop(DropReason.STREAM_FAILED, str(self.failure))
        if offset == METADATA_OFFSET:
            return self._receive_metadata(memoryview(datagram)[HEADER_SIZE:])
        metadata = self.metadata
        if metadata is None:
            return self._drop(DropReason.BEFORE_METADATA, f"data at {offset}")
        size = len(datagram) - HEADER_SIZE
        if size == 0:
            return self._drop(DropReason.EMPTY_PAYLOAD, f"at {offset}")
        end = offset + size
        if end > metadata.length:
            if offset & PARITY_FLAG and self._fec:
                return self._receive_parity(offset, datagram, size)
            return self._drop(DropReason.PAST_END, f"[{offset}, {end}) past {metadata.length}")
        layout = self.layout
        if layout is None:
            if not self._learn_frame_size(offset, size):
                return self._drop(DropReason.BEFORE_METADATA, f"frame size not yet known (data at {offset})")
            layout = self.layout
        frame, misaligned = divmod(offset, layout.frame_size)
        if misaligned or (size != layout.frame_size and end != layout.length):
            return self._drop(DropReason.MISALIGNED, f"{size} bytes at {offset}, frame size {layout.frame_size}")
        received = self._received
        if received[frame]:
            self.duplicates += 1
            return Duplicate(offset=offset, length=size)
        received[frame] = 1
        self._received_bytes += size
        block = frame // self._frames_per_block
        block_frames = self._block_frames
        block_frames[block] += 1
        completed = None
        frames_in_block = self._frames_per_block if block != self._last_block else self._frames_in_last_block
        if block_frames[block] == frames_in_block:
            if not self._has_block_checksums or self._checksums[block] is not None:
                completed = block
        elif self._parity and self.parity_held[block] and block_frames[block] + self.parity_held[block] == frames_in_block:
            return DataReceived(offset=offset, payload=memoryview(datagram)[HEADER_SIZE:], completed_block=None, decodable_block=block)
        return DataReceived(offset=offset, payload=memoryview(datagram)[HEADER_SIZE:], completed_block=completed)

    def receive_run(self, datagrams: bytes | bytearray | memoryview, segment: int) -> RunReceived | None:
        """Take the datagrams of one coalesced receive (UDP GRO: `segment` bytes each) at once, when they are the
        common case: whole frames of this stream, consecutive, all new, none of a block that parity could
        complete. None, with nothing changed, otherwise: feed each to `receive_datagram` then.

        The same outcome as `receive_datagram` for each, in a tenth of the per-datagram time: one header parse
        for the whole buffer, one bit range set, block counts updated once per block touched (at payload 1400
        a receive holds up to 45 datagrams, and the per-datagram path costs ~1.5 µs each).
        """
        layout = self.layout
        if self.state is not AssemblyState.RECEIVING or layout is None:
            return None
        frame_size = layout.frame_size
        count, rest = divmod(len(datagrams), segment)
        if rest or count < 2 or segment != HEADER_SIZE + frame_size:
            return None
        unpack = self._run_headers.get(count)
        if unpack is None:
            unpack = self._run_headers[count] = struct.Struct(">" + f"8sQ{frame_size}x" * count).unpack_from
        fields = unpack(datagrams)
        first = fields[1]
        if (
            fields[0::2].count(self.cookie) != count
            or first % frame_size
            or first + count * frame_size > layout.length
            or fields[1::2] != tuple(range(first, first + count * frame_size, frame_size))
        ):
            return None
        frame = first // frame_size
        end = frame + count
        received = self._received
        if received.find(1, frame, end) >= 0:
            return None  # a duplicate among them: counted by the per-datagram path
        per_block, block_frames = self._frames_per_block, self._block_frames
        blocks = range(frame // per_block, (end - 1) // per_block + 1)
        if self._parity:
            parity_held = self.parity_held
            if any(parity_held[block] for block in blocks):
                return None  # the run may make a block decodable: the per-datagram path says which frame
        received[frame:end] = 1
        self._received_bytes += count * frame_size
        completed = []
        last_block, checksums = self._last_block, self._checksums
        for block in blocks:
            block_frames[block] += min(end, (block + 1) * per_block) - max(frame, block * per_block)
            if block_frames[block] == (per_block if block != last_block else self._frames_in_last_block) and (
                not self._has_block_checksums or checksums[block] is not None
            ):
                completed.append(block)
        return RunReceived(offset=first, count=count, completed_blocks=tuple(completed))

    def _receive_parity(self, offset: int, datagram: bytes | bytearray | memoryview, size: int) -> ParityReceived | ParityUnused | Dropped:
        fields = parity_fields(offset)
        if fields is None:
            return self._drop(DropReason.PAST_END, f"offset {offset:#x} past {self.layout.length}")
        block, esi = fields
        layout = self.layout
        if block >= layout.block_count:
            return self._drop(DropReason.MALFORMED_PARITY, f"parity of block {block}, the image has {layout.block_count}")
        frames_in_block = layout.frames_in_block(block)
        if esi < frames_in_block:
            return self._drop(DropReason.MALFORMED_PARITY, f"parity ESI {esi} of block {block} names a source symbol")
        if size != layout.frame_size:
            return self._drop(DropReason.MALFORMED_PARITY, f"parity symbol of {size} bytes, frame size {layout.frame_size}")
        if esi >= self.parity_seen[block]:
            self.parity_seen[block] = esi + 1
        held = self._block_frames[block]
        symbols = self._parity.get(block)
        kept = len(symbols) if symbols else 0
        if self._verified[block]:
            return self._unused(block, esi, "verified")
        if self.parity_refused[block]:
            return self._unused(block, esi, "refused")
        if held == frames_in_block:
            return self._unused(block, esi, "complete")
        if symbols and esi in symbols:
            return self._unused(block, esi, "duplicate")
        if kept >= frames_in_block - held + PARITY_SPARE:
            return self._unused(block, esi, "enough")
        if self._parity_bytes + size > PARITY_MEMORY_LIMIT:
            return self._unused(block, esi, "memory")
        if symbols is None:
            symbols = self._parity[block] = {}
        symbols[esi] = bytes(memoryview(datagram)[HEADER_SIZE:])
        self._parity_bytes += size
        self.parity_kept += 1
        counted = max(0, kept + 1 - self._parity_failures.get(block, 0))
        self.parity_held[block] = counted
        return ParityReceived(block=block, esi=esi, decodable=held + counted >= frames_in_block)

    def parity_room(self) -> int:
        """The parity symbols that still fit in `PARITY_MEMORY_LIMIT` beside those held (0 before the layout)."""
        return (PARITY_MEMORY_LIMIT - self._parity_bytes) // self.layout.frame_size if self.layout is not None else 0

    def _unused(self, block: int, esi: int, reason: str) -> ParityUnused:
        self.parity_unused += 1
        return ParityUnused(block=block, esi=esi, reason=reason)

    def _receive_metadata(self, payload: memoryview) -> MetadataReceived | Dropped | StreamFailed:
        decoded = decode_metadata_payload(payload)
        if isinstance(decoded, Dropped):
            return self._count(decoded)
        metadata = parse_metadata(decoded.fields)
        if isinstance(metadata, Dropped):
            return self._count(metadata)
        first_metadata = self.metadata is None
        had_layout = self.layout is not None
        if first_metadata:
            self.metadata = metadata
            if metadata.frame_size is not None or metadata.length == 0:
                self._set_layout(metadata.frame_size or 1, metadata.block_size)
        else:
            conflict = self._conflict(metadata)
            if conflict is not None:
                return self._fail(conflict)
            if self.layout is None and metadata.frame_size is not None:
                self.metadata = metadata
                self._set_layout(metadata.frame_size, metadata.block_size)
        ready = self._store_checksums(metadata) if metadata.checksums else ()
        if isinstance(ready, StreamFailed):
            return ready
        zeros = self._take_zero_blocks(metadata.zero_runs, ready) if metadata.zero_runs and self.layout else ()
        zero_frames: tuple[tuple[int, int], ...] = ()
        decodable: tuple[int, ...] = ()
        if metadata.zero_frame_runs and self.layout is not None and self._has_block_checksums:
            zero_frames, completed, decodable = self._take_zero_frames(metadata.zero_frame_runs)
            ready += completed
        if metadata.fec == FEC_SCHEME and not self._fec and self.layout is not None and self._has_block_checksums:
            layout = self.layout
            self._fec = stream_fec_possible(length=layout.length, frame_size=layout.frame_size, block_size=layout.block_size)
        if not had_layout and self.layout is not None and self._verified_count == len(self._verified):
            # An empty image, or a resumed one that was already whole: nothing left to receive.
            self.state = AssemblyState.VERIFYING_IMAGE
        return MetadataReceived(metadata=metadata, first_metadata=first_metadata, blocks_to_check=ready, zero_blocks=zeros,
                                zero_frames=zero_frames, blocks_to_recover=decodable)

    def _conflict(self, metadata: StreamMetadata) -> MetadataConflict | None:
        assert self.metadata is not None
        known = self.metadata.identity_fields()
        if self.layout is not None:
            known["frame"] = self.layout.frame_size
            if self._has_block_checksums:
                known["block"] = self.layout.block_size
        for name, value in metadata.identity_fields().items():
            # A field a frame leaves out says nothing; only two stated values can contradict.
            if value is not None and known[name] is not None and value != known[name]:
                return MetadataConflict(field=name, first=known[name], now=value)
        if metadata.block_size is not None and not self._has_block_checksums and self.layout is not None:
            return MetadataConflict(field="block", first=None, now=metadata.block_size)
        return None

    def _learn_frame_size(self, offset: int, size: int) -> bool:
        """Infer the frame size of a sender that did not announce it (docs/PROTOCOL.md, "Frame size")."""
        assert self.metadata is not None
        if size == 0:
            return False
        if offset == 0 or (offset % size == 0 and offset + size < self.metadata.length):
            self._set_layout(size, None)
            return True
        return False

    def _set_layout(self, frame_size: int, block_size: int | None) -> None:
        assert self.metadata is not None
        self._has_block_checksums = block_size is not None
        layout = Layout(length=self.metadata.length, frame_size=frame_size, block_size=block_size or default_block_size(frame_size))
        self.layout = layout
        self._frames_per_block = layout.frames_per_block
        self._last_block = layout.block_count - 1
        self._frames_in_last_block = layout.frames_in_block(self._last_block) if layout.block_count else 0
        self._received = bitarray(layout.frame_count)
        self._received.setall(0)
        self._block_frames = array("I", bytes(4 * layout.block_count))
        self._verified = bitarray(layout.block_count)
        self._verified.setall(0)
        self._checksums = [None] * layout.block_count
        self.parity_held = array("I", bytes(4 * layout.block_count))
        self.parity_seen = array("I", bytes(4 * layout.block_count))
        self.parity_refused = bitarray(layout.block_count)
        self.parity_refused.setall(0)
        self.state = AssemblyState.RECEIVING
        self._apply_checkpoint()

    def _apply_checkpoint(self) -> None:
        checkpoint, self._checkpoint = self._checkpoint, None
        layout, metadata = self.layout, self.metadata
        if checkpoint is None or layout is None or metadata is None:
            return
        same_image = (checkpoint.sha1, checkpoint.length, checkpoint.frame_size, checkpoint.block_size) == (
            metadata.sha1, layout.length, layout.frame_size, layout.block_size)
        if not same_image:
            return
        verified = bitarray()
        verified.frombytes(checkpoint.verified_blocks)
        del verified[layout.block_count :]
        if len(verified) != layout.block_count:
            return
        for block in verified.search(1):
            self._mark_block_received(block)
        self._verified = verified
        self._verified_count = verified.count(1)
        self.resumed_blocks = self._verified_count

    def _mark_block_received(self, block: int) -> None:
        layout = self.layout
        first = block * self._frames_per_block
        count = layout.frames_in_block(block)
        self._received[first : first + count] = 1
        self._block_frames[block] = count
        start, end = layout.block_span(block)
        self._received_bytes += end - start

    def _checksum_known(self, block: int) -> bool:
        return not self._has_block_checksums or self._checksums[block] is not None

    def _store_checksums(self, metadata: StreamMetadata) -> tuple[int, ...] | StreamFailed:
        if self.layout is None or not self._has_block_checksums:
            return ()
        ready = []
        for index, value in enumerate(metadata.checksums, start=metadata.checksums_first):
            known = self._checksums[index]
            if known is None:
                self._checksums[index] = value
                if self._block_frames[index] == self.layout.frames_in_block(index) and not self._verified[index]:
                    ready.append(index)
            elif known != value:
                return self._fail(MetadataConflict(field=f"xxh3[{index}]", first=f"{known:016x}", now=f"{value:016x}"))
        return tuple(ready)

    def _take_zero_blocks(self, runs: tuple[tuple[int, int], ...], ready: tuple[int, ...]) -> tuple[int, ...]:
        """Count announced zero blocks as received and verified, unless their data already came (then it is
        checked like any block, via `ready`)."""
        if not self._has_block_checksums:
            return ()
        taken = []
        for first, count in runs:
            for block in range(first, first + count):
                if self._verified[block] or block in ready:
                    continue
                self._forget_block(block)
                self._mark_block_received(block)
                self._verified[block] = 1
                self._verified_count += 1
                taken.append(block)
        if taken and self._verified_count == len(self._verified) and self.state is AssemblyState.RECEIVING:
            self.state = AssemblyState.VERIFYING_IMAGE
        return tuple(taken)

    def _take_zero_frames(
        self, runs: tuple[tuple[int, int], ...]
    ) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...], tuple[int, ...]]:
        """Count announced zero frames as held, except in verified blocks and where the frame is held already
        (its data came: it is not zeroed again, and the block's xxh3 judges it). Returns the runs to zero on the
        target, the blocks that this completed (to check once the zeros are there) and those it made decodable
        with the parity held (to recover then: zero frames are source symbols held).

        A block forgotten later (corrupt, or the image's SHA-1 was wrong) forgets its zero frames too; the next
        metadata round announces them again and they are zeroed again, as their data never comes."""
        layout, received, block_frames = self.layout, self._received, self._block_frames
        per_block, frame_size = self._frames_per_block, layout.frame_size
        last_frame = layout.frame_count - 1
        zeroed: list[list[int]] = []
        completed, decodable = [], []
        for start, count in runs:
            stop = start + count
            while start < stop:
                block = start // per_block
                end = min(stop, (block + 1) * per_block)
                missing = 0 if self._verified[block] else received.count(0, start, end)
                if missing:
                    for value, low, high in intervals(received[start:end]):
                        if value:
                            continue
                        if zeroed and zeroed[-1][0] + zeroed[-1][1] == start + low:
                            zeroed[-1][1] += high - low
                        else:
                            zeroed.append([start + low, high - low])
                    held_bytes = missing * frame_size
                    if end - 1 == last_frame and not received[last_frame]:
                        held_bytes -= frame_size - (layout.length - last_frame * frame_size)  # a short last frame
                    received[start:end] = 1
                    block_frames[block] += missing
                    self._received_bytes += held_bytes
                    frames_in_block = layout.frames_in_block(block)
                    if block_frames[block] == frames_in_block:
                        if self._checksums[block] is not None:
                            completed.append(block)
                    elif self._parity and self.parity_held[block] and block_frames[block] + self.parity_held[block] >= frames_in_block:
                        decodable.append(block)
                start = end
        # A block named twice (two runs) once; one that a later run completed is checked, not recovered.
        decodable = sorted({block for block in decodable if block_frames[block] < layout.frames_in_block(block)})
        return tuple((first, count) for first, count in zeroed), tuple(completed), tuple(decodable)

    # -- checks the caller performs with its own I/O ---------------------------------------------------------

    def check_block(self, block: int, data: bytes | bytearray | memoryview) -> BlockVerified | BlockCorrupt:
        """Judge a complete block by its bytes as written (read back from the target).

        Error handling: raises `LocalProtocolError` if the block is not complete or has no checksum yet.
        """
        layout = self.layout
        if layout is None or not 0 <= block < layout.block_count:
            raise LocalProtocolError(f"no block {block}")
        if self._block_frames[block] != layout.frames_in_block(block) or not self._checksum_known(block):
            raise LocalProtocolError(f"block {block} is not ready to check")
        start, end = layout.block_span(block)
        if len(data) != end - start:
            raise LocalProtocolError(f"block {block} is {end - start} bytes, got {len(data)}")
        if self._verified[block]:
            return BlockVerified(block=block, image_complete=self.state is AssemblyState.VERIFYING_IMAGE)
        if self._has_block_checksums:
            expected = self._checksums[block]
            actual = xxhash.xxh3_64_intdigest(data)
            if actual != expected:
                self.corrupt_blocks += 1
                if block in self._recovered_unchecked:
                    self._recovered_unchecked.discard(block)
                    self.parity_refused[block] = 1
                self._forget_block(block)
                return BlockCorrupt(block=block, expected=expected, actual=actual)
        self._verified[block] = 1
        self._verified_count += 1
        if self._fec:
            self._recovered_unchecked.discard(block)
            self.parity_refused[block] = 0
        if self._parity:
            self._drop_parity(block)
        if self._verified_count == layout.block_count:
            self.state = AssemblyState.VERIFYING_IMAGE
        return BlockVerified(block=block, image_complete=self.state is AssemblyState.VERIFYING_IMAGE)

    def recover_block(self, block: int, data: bytes | bytearray | memoryview) -> BlockRecovered | RecoveryFailed:
        """Decode a block from its frames held and its parity held (after `ParityReceived.decodable` or
        `DataReceived.decodable_block`).

        `data` is the block's bytes as written on the target: the frames held must be right there; what is
        at the missing frames does not matter. On success every frame of the block counts as held and
        `BlockRecovered.frames` are the bytes to write; then read the block back and call `check_block`
        exactly as for a block completed by data frames (a wrong symbol makes a wrong block, which its
        checksum catches: `BlockCorrupt`, and the block and its parity are forgotten).

        Error handling: raises `LocalProtocolError` if the stream takes no parity, the block does not exist,
        is verified or complete, is not decodable (frames held + `parity_held` < its frames), or `data` is
        not the block's size. Cost: one RaptorQ decode, 1-6 ms for a 1 MiB block.
        """
        layout = self.layout
        if not self._fec or layout is None or not 0 <= block < layout.block_count:
            raise LocalProtocolError(f"no parity block {block} in this stream")
        frames_in_block = layout.frames_in_block(block)
        held = self._block_frames[block]
        if self._verified[block] or held == frames_in_block:
            raise LocalProtocolError(f"block {block} has all its frames: check it, do not recover it")
        if held + self.parity_held[block] < frames_in_block:
            raise LocalProtocolError(f"block {block} is not decodable: {held} frames and {self.parity_held[block]} symbols of {frames_in_block}")
        start, end = layout.block_span(block)
        if len(data) != end - start:
            raise LocalProtocolError(f"block {block} is {end - start} bytes, got {len(data)}")
        frame_size, first = layout.frame_size, block * self._frames_per_block
        view, received = memoryview(data), self._received
        present = [(index, view[index * frame_size : (index + 1) * frame_size]) for index in range(frames_in_block) if received[first + index]]
        symbols = self._parity.get(block, {})
        decoded = decode_block(block_length=end - start, frame_size=frame_size, held=present, parity=symbols.items())
        if decoded is None:
            self.recoveries_failed += 1
            self._parity_failures[block] = failures = self._parity_failures.get(block, 0) + 1
            self.parity_held[block] = max(0, len(symbols) - failures)
            return RecoveryFailed(block=block, symbols=held + len(symbols))
        frames = []
        for index in range(frames_in_block):
            if not received[first + index]:
                piece = decoded[index * frame_size : (index + 1) * frame_size]
                frames.append((start + index * frame_size, piece))
                self._received_bytes += len(piece)
        received[first : first + frames_in_block] = 1
        self._block_frames[block] = frames_in_block
        self._drop_parity(block)
        self._recovered_unchecked.add(block)
        self.blocks_recovered += 1
        return BlockRecovered(block=block, frames=tuple(frames), checksum_known=self._checksum_known(block))

    def _drop_parity(self, block: int) -> None:
        symbols = self._parity.pop(block, None)
        if symbols:
            self._parity_bytes -= sum(len(symbol) for symbol in symbols.values())
        self._parity_failures.pop(block, None)
        if self.parity_held:
            self.parity_held[block] = 0

    def accept_block(self, block: int, data: bytes | bytearray | memoryview) -> BlockVerified | BlockCorrupt:
        """Take a whole block that arrived out of band (the HTTP fallback), as written to the target.

        Its frames count as received. With its checksum known it is checked like `check_block`; without one
        (a stream whose checksums have not been seen, as when multicast never arrived) it is accepted and the
        whole image's SHA-1 decides, as for a sender without block checksums.

        Error handling: raises `LocalProtocolError` for a block that does not exist or data of the wrong size.
        """
        layout = self.layout
        if layout is None or not 0 <= block < layout.block_count:
            raise LocalProtocolError(f"no block {block}")
        start, end = layout.block_span(block)
        if len(data) != end - start:
            raise LocalProtocolError(f"block {block} is {end - start} bytes, got {len(data)}")
        if self.state is AssemblyState.FAILED:
            raise LocalProtocolError("the stream failed")
        if self._verified[block]:
            return BlockVerified(block=block, image_complete=self.state is AssemblyState.VERIFYING_IMAGE)
        self._forget_block(block)  # start from a clean count: some of its frames may have come by multicast
        self._mark_block_received(block)
        if self._has_block_checksums and self._checksums[block] is not None:
            return self.check_block(block, data)
        self._verified[block] = 1
        self._verified_count += 1
        if self._verified_count == layout.block_count:
            self.state = AssemblyState.VERIFYING_IMAGE
        return BlockVerified(block=block, image_complete=self.state is AssemblyState.VERIFYING_IMAGE)

    def check_image(self, sha1_hex: str) -> ImageVerified | ImageCorrupt:
        """Judge the whole image by the SHA-1 of its bytes as written.

        Error handling: raises `LocalProtocolError` unless every block is verified.
        """
        if self.state is not AssemblyState.VERIFYING_IMAGE:
            raise LocalProtocolError(f"cannot check the image in state {self.state.value}")
        assert self.metadata is not None and self.layout is not None
        if sha1_hex.lower() == self.metadata.sha1:
            self.state = AssemblyState.COMPLETE
            return ImageVerified(sha1=self.metadata.sha1)
        for block in range(self.layout.block_count):
            self._forget_block(block)
        self.state = AssemblyState.RECEIVING if self.layout.block_count else AssemblyState.VERIFYING_IMAGE
        return ImageCorrupt(expected=self.metadata.sha1, actual=sha1_hex.lower())

    def _forget_block(self, block: int) -> None:
        layout = self.layout
        first = block * self._frames_per_block
        stop = first + layout.frames_in_block(block)
        held_bytes = self._received.count(1, first, stop) * layout.frame_size
        if self._received[stop - 1]:
            # The image's last frame may be shorter than the others.
            held_bytes -= layout.frame_size - min(layout.frame_size, layout.length - (stop - 1) * layout.frame_size)
        self._received_bytes -= held_bytes
        self._received[first:stop] = 0
        self._block_frames[block] = 0
        if self._parity:
            self._drop_parity(block)  # a corrupt block may owe it to a wrong symbol: take new ones
        if self._verified[block]:
            self._verified[block] = 0
            self._verified_count -= 1
        if self.state is AssemblyState.VERIFYING_IMAGE or self.state is AssemblyState.COMPLETE:
            self.state = AssemblyState.RECEIVING

    # -- bookkeeping -----------------------------------------------------------------------------------------------

    def _drop(self, reason: DropReason, detail: str) -> Dropped:
        self.drops[reason] += 1
        return Dropped(reason=reason, detail=detail)

    def _count(self, dropped: Dropped) -> Dropped:
        self.drops[dropped.reason] += 1
        return dropped

    def _fail(self, error: RemoteProtocolError) -> StreamFailed:
        self.drops[DropReason.CONFLICTING_METADATA] += 1
        self.state = AssemblyState.FAILED
        self.failure = error
        return StreamFailed(error=error)
