"""The datagram loop: socket -> `Assembly` -> target, in one worker thread, with no await per datagram.

At 2 Gbit/s in 1400-byte payloads a datagram arrives every ~5 µs, too little for a trip through an event
loop. `Pump.run` is therefore a plain blocking loop meant for `trio.to_thread.run_sync`: a blocking socket
whose SO_RCVTIMEO (`multicast.RECEIVE_TIMEOUT`) bounds how long it can take to notice `stop`, one
preallocated receive buffer filled with `recv_into`, and the assembly fed a memoryview of it.

Writes: new bytes that follow the previous ones are copied into a staging buffer (`STAGE_SIZE`) and written
with one `os.pwrite` per flush. The stage is flushed when a payload does not follow on (a gap, a late
joiner's wrap-around), when it is full, before a block is read back, and at the end.

Checks: when the assembly reports a complete block, it is read back from the target and judged by
`Assembly.check_block`; verified blocks go to the `Sha1Cursor` (with the bytes just read), which hashes the
image in order in a second thread. When the last block is verified the loop asks for the digest, calls
`check_image`, and fsyncs the target before it reports success. A corrupt block or image has already been
forgotten by the assembly: the loop keeps receiving and takes it again from a later loop of the sender,
up to `MAX_CORRUPT_REPEATS` times for one block and `MAX_IMAGE_MISMATCHES` for the image.

Progress is shared by plain attributes (`phase`, `datagrams`, `metadata_frames`, the assembly's counters,
`hashed_bytes`), written here and read by the progress task; no lock, since each is a single int or str.

Error handling: `run` raises `ReceiveError` subclasses: `TargetRefused` (from `open_target`), `StreamBroken`,
`TargetIOError`, `TargetBoundsError`. It returns None when stopped before completion.
Resource handling: `run` owns the hashing thread, started and joined inside it. The socket and the target
belong to the caller.
"""

from __future__ import annotations

import enum
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from vmcast.protocol import (
    HEADER_SIZE,
    Assembly,
    AssemblyState,
    BlockVerified,
    DataReceived,
    Duplicate,
    ImageVerified,
    MetadataReceived,
    StreamFailed,
    StreamMetadata,
)

from .errors import StreamBroken
from .hashing import Sha1Cursor
from .target import Target

log = logging.getLogger(__name__)

# Contiguous payloads are gathered into one write of up to this size: large enough that a write costs
# little per byte, small enough to stay in cache; a 1 MiB block is usually flushed whole before it is checked.
STAGE_SIZE = 4 << 20

# The receive buffer holds any UDP/IPv4 datagram (65,507 bytes of payload), so none is ever truncated.
RECEIVE_BUFFER_SIZE = 1 << 16

# A block read back wrong this many times is not bad luck on the wire but a failing target or sender.
MAX_CORRUPT_REPEATS = 8

# The whole-image SHA-1 disagreeing although every block matched its xxh3 is a sender announcing the wrong
# SHA-1 (or xxh3 collisions); retrying a few times tells it from a write that went bad after its check.
MAX_IMAGE_MISMATCHES = 3

# Blocks are read back whole to be checked, into buffers of a block each (`hashing.BUFFER_BUDGET`); a stream
# announcing blocks larger than this is refused rather than allowed to make us allocate that much. Senders
# aim at 1 MiB (`vmcast.protocol.metadata.TARGET_BLOCK_SIZE`).
MAX_BLOCK_SIZE = 64 << 20


class Phase(enum.Enum):
    WAITING = "waiting for metadata"
    RECEIVING = "receiving"
    HASHING = "hashing"
    SYNCING = "syncing"
    VERIFIED = "verified"


@dataclass(frozen=True, slots=True, kw_only=True)
class PumpResult:
    """What a completed pump proved and counted."""

    sha1: str
    """The verified SHA-1 of the image as written."""
    length: int
    """Image bytes."""
    format: str | None
    """The image format the stream announced, if it did."""
    started_at: float
    """`time.monotonic()` when the loop started (the group was already joined)."""
    finished_at: float
    """`time.monotonic()` after the target was synced."""
    cpu_seconds: float
    """CPU time of the pump's thread (not the hashing thread's): the cost of the datagram loop."""
    datagrams: int
    """Datagrams read from the socket, ours or not."""
    duplicates: int
    """Data frames of bytes we already held."""
    drops: dict[str, int]
    """Datagrams dropped by the assembly, by `DropReason` value."""
    corrupt_blocks: int
    """Blocks that read back wrong and were taken again."""
    image_mismatches: int
    """Times the whole image read back with the wrong SHA-1 and was taken again."""


class Pump:
    """Receives one stream into one target; `run` in a worker thread, `stop` from anywhere.

    `open_target` is called with the stream's first metadata, before any data is written; it returns the
    open target (or raises, e.g. `TargetRefused`, or `StreamBroken` when the stream is not the image
    expected).

    `expected`, when given, is a metadata frame to feed the assembly before anything from the socket: what a
    lease already told us about the stream (`vmcast.receiver.agent`), so data is kept from the first datagram
    instead of dropped until the sender's next metadata. The stream's own metadata must agree with it, field
    by field, or the stream fails (the assembly's conflict rule); and it must carry block checksums if
    `expected` announced a block size, or the blocks could never be checked: that fails the stream too.
    """

    def __init__(self, *, sock: socket.socket, assembly: Assembly, open_target: Callable[[StreamMetadata], Target], expected: bytes | None = None, stage_size: int = STAGE_SIZE) -> None:
        self.assembly = assembly
        self._expected = expected
        self._confirm_expected = expected is not None
        self._sock = sock
        self._open_target = open_target
        self._stage = memoryview(bytearray(stage_size))
        self._stop = False
        self._target: Target | None = None
        self._cursor: Sha1Cursor | None = None
        self._cursor_thread: threading.Thread | None = None
        self._scratch: bytearray | None = None
        self._corrupt_repeats: Counter[int] = Counter()
        self._image_mismatches = 0
        self._result: PumpResult | None = None
        self.phase = Phase.WAITING
        self.datagrams = 0
        self.metadata_frames = 0
        self.started_at: float | None = None
        self._cpu_started_at = 0.0

    @property
    def target(self) -> Target | None:
        """The open target, once the first metadata arrived."""
        return self._target

    @property
    def hashed_bytes(self) -> int:
        cursor = self._cursor
        return cursor.hashed_bytes if cursor is not None else 0

    def stop(self) -> None:
        """Ask the loop to end; it does within `multicast.RECEIVE_TIMEOUT` (thread-safe: one flag)."""
        self._stop = True

    def stopped(self) -> bool:
        return self._stop

    def run(self) -> PumpResult | None:
        """Receive until the image is verified (its result) or `stop` (None)."""
        self.started_at = time.monotonic()
        self._cpu_started_at = time.thread_time()
        try:
            self._loop()
        finally:
            if self._cursor is not None:
                self._cursor.close()
                self._cursor_thread.join()
        return self._result

    # -- the hot loop -----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        if self._expected is not None:
            event = self.assembly.receive_datagram(self._expected)
            if not isinstance(event, MetadataReceived):
                raise StreamBroken(reason=f"the expected metadata was not accepted: {event}")
            self._first_metadata(event.metadata)
        recv_into = self._sock.recv_into
        buffer = bytearray(RECEIVE_BUFFER_SIZE)
        view = memoryview(buffer)
        receive = self.assembly.receive_datagram
        stage = self._stage
        capacity = len(stage)
        stage_start = stage_end = stage_fill = 0

        def flush() -> None:
            nonlocal stage_start, stage_fill
            if stage_fill:
                self._target.pwrite(stage[:stage_fill], stage_start)
                stage_start, stage_fill = stage_end, 0

        while not self._stop:
            try:
                size = recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                continue  # SO_RCVTIMEO expired: look at the stop flag
            self.datagrams += 1
            event = receive(view[:size])
            kind = event.__class__
            if kind is DataReceived:
                offset = event.offset
                length = size - HEADER_SIZE
                if offset != stage_end or stage_fill + length > capacity:
                    flush()
                    stage_start = stage_end = offset
                stage[stage_fill : stage_fill + length] = event.payload
                stage_fill += length
                stage_end += length
                if event.completed_block is not None:
                    flush()
                    self._check_block(event.completed_block)
                    if self._result is not None:
                        return
            elif kind is Duplicate:
                pass
            elif kind is MetadataReceived:
                self.metadata_frames += 1
                if self._confirm_expected:
                    self._confirm(event.metadata)
                if event.first_metadata:
                    self._first_metadata(event.metadata)
                if event.blocks_to_check:
                    flush()
                    mismatches = self._image_mismatches
                    for block in event.blocks_to_check:
                        self._check_block(block)
                        if self._result is not None:
                            return
                        if self._image_mismatches != mismatches:
                            break  # the image was forgotten: the other blocks are no longer complete
                if self.assembly.state is AssemblyState.VERIFYING_IMAGE:
                    self._finish_image()  # an empty image: verified by its metadata alone
                    if self._result is not None:
                        return
            elif kind is StreamFailed:
                raise StreamBroken(reason=f"the stream failed: {event.error}")
        flush()

    # -- the rare paths ------------------------------------------------------------------------------------------

    def _first_metadata(self, metadata: StreamMetadata) -> None:
        if metadata.block_size is not None and metadata.block_size > MAX_BLOCK_SIZE:
            raise StreamBroken(reason=f"the stream's blocks are {metadata.block_size} bytes, more than the {MAX_BLOCK_SIZE} this receiver reads back")
        log.info("stream: image %s, %d bytes, sha1 %s", metadata.name or "(unnamed)", metadata.length, metadata.sha1)
        self._target = self._open_target(metadata)
        if self._target.length != metadata.length:
            raise StreamBroken(reason=f"the target was opened for {self._target.length} bytes, the stream has {metadata.length}")
        self.phase = Phase.RECEIVING

    def _confirm(self, metadata: StreamMetadata) -> None:
        """The stream's first metadata after `expected`: the assembly compared the fields it states."""
        self._confirm_expected = False
        expected = self.assembly.layout
        if expected is not None and metadata.block_size is None and metadata.length:
            raise StreamBroken(reason=f"the lease announced checksum blocks of {expected.block_size} bytes, the stream sends no block checksums")

    def _sha1_cursor(self) -> Sha1Cursor:
        if self._cursor is None:
            layout = self.assembly.layout
            self._cursor = Sha1Cursor(target=self._target, layout=layout)
            self._scratch = bytearray(layout.block_size)
            self._cursor_thread = threading.Thread(target=self._cursor.run, name="vmcast-sha1", daemon=True)
            self._cursor_thread.start()
        return self._cursor

    def _check_block(self, block: int) -> None:
        cursor = self._sha1_cursor()
        start, end = self.assembly.layout.block_span(block)
        lent = cursor.take_buffer()
        view = memoryview(lent if lent is not None else self._scratch)[: end - start]
        self._target.pread_into(view, start)
        event = self.assembly.check_block(block, view)
        if isinstance(event, BlockVerified):
            cursor.verified(block, lent)
            if event.image_complete:
                self._finish_image()
            return
        if lent is not None:
            cursor.give_back(lent)
        self._corrupt_repeats[block] += 1
        repeats = self._corrupt_repeats[block]
        log.warning("block %d read back corrupt (xxh3 %016x, expected %016x); taking it again", block, event.actual, event.expected)
        if repeats >= MAX_CORRUPT_REPEATS:
            raise StreamBroken(reason=f"block {block} read back corrupt {repeats} times: the target or the sender is faulty")

    def _finish_image(self) -> None:
        self.phase = Phase.HASHING
        sha1 = self._sha1_cursor().digest(stopped=self.stopped)
        if sha1 is None:
            return  # stopped while hashing
        event = self.assembly.check_image(sha1)
        if not isinstance(event, ImageVerified):
            self._image_mismatches += 1
            log.warning("image read back with sha1 %s, expected %s; taking it all again", event.actual, event.expected)
            if self._image_mismatches >= MAX_IMAGE_MISMATCHES:
                raise StreamBroken(reason=f"the image read back with sha1 {event.actual}, not the announced {event.expected}, {self._image_mismatches} times")
            self._cursor.reset()
            self.phase = Phase.RECEIVING
            return
        self.phase = Phase.SYNCING
        self._target.sync()
        self.phase = Phase.VERIFIED
        assembly = self.assembly
        self._result = PumpResult(
            sha1=event.sha1,
            length=assembly.layout.length,
            format=assembly.metadata.format,
            started_at=self.started_at,
            finished_at=time.monotonic(),
            cpu_seconds=time.thread_time() - self._cpu_started_at,
            datagrams=self.datagrams,
            duplicates=assembly.duplicates,
            drops={reason.value: count for reason, count in assembly.drops.items()},
            corrupt_blocks=assembly.corrupt_blocks,
            image_mismatches=self._image_mismatches,
        )
