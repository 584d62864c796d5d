"""The datagram loop: socket -> `Assembly` -> target, in one worker thread, with no await per datagram.

At 2 Gbit/s in 1400-byte payloads a datagram arrives every ~5 µs, too little for a trip through an event
loop. `Pump.run` is therefore a plain blocking loop meant for `trio.to_thread.run_sync`: a blocking socket
whose SO_RCVTIMEO (`multicast.RECEIVE_TIMEOUT`) bounds how long it can take to notice `stop`, one
preallocated receive buffer, and the assembly fed a memoryview of each datagram in it.

Receiving: with UDP GRO on (`multicast.enable_gro`, the default) one ``recvmsg_into`` returns a sender's whole
GSO batch (up to 45 frames, 64 KiB) with a control message naming the datagram size; the buffer is cut into
memoryview slices of that size (the last may be shorter), each fed to the assembly like a datagram of its
own: a bad one (a foreign cookie, a short one) is counted and dropped like any, and its neighbours are kept.
A buffer without the control message is one datagram (a sender without GSO, a metadata frame). Without GRO
(``--no-gro``, an old kernel) ``recv_into`` reads one datagram per call. The buffer is reused by the next
receive: every payload is copied into the stage (below) before that, and nothing else keeps a view of it.

Batching: GRO coalesces only what the device hands over together; a rate-limited link (tbf, a switch port
slower than the sender) hands over one datagram at a time, and then each costs a receive and a trip through
the assembly. The loop judges the link on its first `BATCH_JUDGED_AFTER` receives of whole frames: where few
came coalesced it turns GRO off and receives with ``recvmmsg`` (`batch_receive.DatagramBatch`): one call takes
every datagram queued (up to 64) into slots laid end to end, and each run of whole frames from one source port
reads like a coalesced buffer (`Assembly.receive_run`); the rest go one by one. It pays when the loop falls
behind (shared cores, a parity decode): the further behind, the more one call takes. ``--no-batch`` keeps one
receive per datagram.

Writes: new bytes that follow the previous ones are copied into a staging buffer (`STAGE_SIZE`) and written
with one `os.pwrite` per flush. The stage is flushed when a payload does not follow on (a gap, a late
joiner's wrap-around), when it is full, before a block is read back, and at the end.

Checks: when the assembly reports a complete block, it is read back from the target and judged by
`Assembly.check_block`; verified blocks go to the `Sha1Cursor` (with the bytes just read), which hashes the
image in order in a second thread. When the last block is verified the loop asks for the digest, calls
`check_image`, and fsyncs the target before it reports success. Unless told to keep it (``keep_cache``), the
image's pages leave the page cache as they are done with (`hashing`, "Writeback") and the rest after the
fsync. A corrupt block or image has already been forgotten by the assembly: the loop keeps receiving and takes
it again from a later loop of the sender, unless one block keeps coming back with the same wrong bytes
(`MAX_SAME_CORRUPTION`: a faulty target or sender), or wrong at all `MAX_CORRUPT_REPEATS` times; and up to
`MAX_IMAGE_MISMATCHES` times for the image.

Zeros that are never sent (docs/PROTOCOL.md section 5): the metadata names all-zero blocks (``zero``, counted
verified) and all-zero frames of the other blocks (``zero_frames``, counted held). The loop flushes the stage and
makes them read as zeros on the target (`Target.zero_range`: holes in a file, BLKZEROOUT or zeros written on a
device) before it reads back the blocks they complete, whose xxh3 covers the zeros (`zero_blocks`,
`zero_frames` count them); blocks they make decodable with the parity held are recovered then.

Parity (FEC, docs/PROTOCOL.md section 8): the assembly keeps the RaptorQ parity symbols that come for a block
and says when the block's frames held and symbols held are enough to decode it (`ParityReceived.decodable`, or
`DataReceived.decodable_block` when a data frame is the last piece). The loop then flushes the stage, reads
the block back as written, and `Assembly.recover_block` decodes it; the frames that were missing
(`BlockRecovered.frames`) are written at their offsets (inside the block, and the target refuses anything
past its end), and the block is read back and judged by `check_block` exactly like a block completed by data
frames: parity never bypasses the xxh3, and a wrong symbol (a wrong block) is forgotten and taken again. A
decode that needs one more symbol (`RecoveryFailed`) is counted and changes nothing else: the planner asks
for one more. A decode costs this thread 3-6 ms (`recovery_cpu_seconds`).

Repairs and the HTTP fallback (server mode): the loop follows the carousel for `repair.Repairs`: it compares a
receive's source port with that of the stream's metadata frames (repair frames come from another port,
docs/PROTOCOL.md section 7) and tells the planner the last carousel frame the receive held. With GRO every
receive has its port (``recvmsg`` returns it anyway, and a coalesced buffer holds one flow's datagrams), as
does every datagram of a batch (runs are cut where the port changes: parity comes from the repair port);
without either, one receive in `repair.OBSERVE_EVERY` asks for it (``recvfrom_into`` costs more than
``recv_into``). Every `TICK_EVERY` datagrams (looked at once per receive) and on every receive timeout, the
loop does its housekeeping: it polls the repair planner and applies blocks fetched by HTTP
(`deliver_block`, from `vmcast.receiver.fallback`): each is written at its offset, read back and judged by the
assembly like a block that came by multicast.

Resume: an assembly built from a checkpoint already holds the blocks verified before; the SHA-1 cursor is
told about them when it starts, and reads them back from the target when it reaches them, so the final
SHA-1 covers the whole image.

Progress is shared by plain attributes (`phase`, `datagrams`, `metadata_frames`, the assembly's counters,
`hashed_bytes`, `multicast_bytes`, `fetched_bytes`), written here and read by other tasks; no lock, since each
is a single int or str. `deliver_block` is the one method other threads call (a deque append). A change of
`phase` is also told to ``on_phase`` (from the pump's thread, so it must only hand the news over): a phase
may last less than any polling interval, and the receive acts on some (the lease goes once the blocks are
verified).

Error handling: `run` raises `ReceiveError` subclasses: `TargetRefused` (from `open_target`), `StreamBroken`,
`TargetIOError`, `TargetBoundsError`. It returns None when stopped before completion.
Resource handling: `run` owns the hashing thread, started and joined inside it. The socket and the target
belong to the caller.
"""

from __future__ import annotations

import collections
import enum
import functools
import logging
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from bitarray import bitarray
from vmcast.protocol import (
    HEADER_SIZE,
    Assembly,
    AssemblyState,
    BlockCorrupt,
    BlockRecovered,
    BlockVerified,
    DataReceived,
    Duplicate,
    ImageVerified,
    MetadataReceived,
    ParityReceived,
    StreamFailed,
    StreamMetadata,
)

from .batch_receive import SLOTS, DatagramBatch
from .errors import StreamBroken
from .hashing import Sha1Cursor
from .multicast import SOL_UDP, UDP_GRO, kernel_drops
from .repair import OBSERVE_EVERY, Repairs
from .target import Target

log = logging.getLogger(__name__)

# Contiguous payloads are gathered into one write of up to this size: large enough that a write costs
# little per byte, small enough to stay in cache; a 1 MiB block is usually flushed whole before it is checked.
STAGE_SIZE = 4 << 20

# The receive buffer holds any UDP/IPv4 datagram (65,507 bytes of payload), so none is ever truncated; and
# any buffer UDP GRO coalesces, which must fit the 16-bit length of the one UDP/IP packet it stands for.
RECEIVE_BUFFER_SIZE = 1 << 16
# Room for the one control message UDP GRO adds to a coalesced buffer: the segment size, an int (udp(7)).
ANCILLARY_SIZE = socket.CMSG_SPACE(struct.calcsize("i"))
# recvmsg flags that say the buffer (MSG_TRUNC) or the control message (MSG_CTRUNC) did not fit: neither can
# happen with the sizes above, and what did not fit is counted and dropped (`Pump.truncated`) if it does.
TRUNCATED = socket.MSG_TRUNC | socket.MSG_CTRUNC

# A block read back with the *same* wrong xxh3 this many times is a failing target (it returns the same bad
# bytes) or a sender whose data does not match its own checksum; corruption on the wire hits different frames
# each pass and gives a different wrong xxh3 every time. At 0.1% corrupt datagrams a 749-frame block arrives
# corrupt about half the time, so counting every bad pass would give up on healthy receivers.
MAX_SAME_CORRUPTION = 3
# Any wrong xxh3, however varied, this many times for one block: the wire is too bad to finish (at 50% bad
# passes the chance of reaching it by bad luck is 2**-64).
MAX_CORRUPT_REPEATS = 64

# The whole-image SHA-1 disagreeing although every block matched its xxh3 is a sender announcing the wrong
# SHA-1 (or xxh3 collisions); retrying a few times tells it from a write that went bad after its check.
MAX_IMAGE_MISMATCHES = 3

# Blocks are read back whole to be checked, into buffers of a block each (`hashing.BUFFER_BUDGET`); a stream
# announcing blocks larger than this is refused rather than allowed to make us allocate that much. Senders
# aim at 1 MiB (`vmcast.protocol.metadata.TARGET_BLOCK_SIZE`).
MAX_BLOCK_SIZE = 64 << 20

# Housekeeping (repair planner, blocks fetched by HTTP) every this many datagrams, and on every receive
# timeout: at ~5 µs a datagram that is every ~80 µs while data flows, and one clock read per 16 datagrams.
TICK_EVERY = 16

# With UDP GRO on, the first this many receives of whole frames tell whether the link coalesces; where fewer
# than one in BATCH_WHEN_COALESCED_BELOW came coalesced (a rate-limited link hands the kernel one packet at a
# time), the pump turns GRO off and takes datagrams with recvmmsg (`batch_receive`) from then on: ~1,000
# frames are 40 ms of a 300 Mbit/s link. Where the link coalesces (loopback, a NIC doing GRO), GRO stays: one
# buffer per sender batch costs the kernel less than a datagram each.
BATCH_JUDGED_AFTER = 1024
BATCH_WHEN_COALESCED_BELOW = 8

# Blocks fetched by HTTP wait for the pump in a queue of at most this many (the fetcher waits when it is
# full): 16 MiB at the usual 1 MiB blocks.
MAX_QUEUED_BLOCKS = 16


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
    """Datagrams read from the socket, ours or not (each datagram of a coalesced buffer counts)."""
    coalesced: int
    """Receives that returned several datagrams in one buffer (UDP GRO)."""
    batched: int
    """recvmmsg receives that returned several datagrams (the link did not coalesce: `BATCH_JUDGED_AFTER`)."""
    duplicates: int
    """Data frames of bytes we already held."""
    drops: dict[str, int]
    """Datagrams dropped by the assembly, by `DropReason` value."""
    corrupt_blocks: int
    """Blocks that read back wrong and were taken again."""
    image_mismatches: int
    """Times the whole image read back with the wrong SHA-1 and was taken again."""
    resumed_blocks: int
    """Blocks verified by an earlier, interrupted receive (from the checkpoint), not received again."""
    multicast_bytes: int
    """Image bytes written from multicast datagrams in this run."""
    fetched_blocks: int
    """Blocks fetched by HTTP and accepted (verified or not) in this run."""
    fetched_bytes: int
    """Their bytes."""
    zero_blocks: int
    """Blocks the stream announced as all zeros (never sent) and that were zeroed on the target."""
    zero_frames: int = 0
    """Frames of the other blocks the stream announced as all zeros (never sent), zeroed on the target."""
    parity_frames: int = 0
    """Parity frames kept by the assembly (FEC; those it had no use for are in `Assembly.parity_unused`)."""
    rest_frames: int = 0
    """Metadata frames that said the carousel rests (docs/PROTOCOL.md section 7)."""
    recovered_blocks: int = 0
    """Blocks completed by decoding parity (then judged by xxh3 like any block)."""
    recovered_frames: int = 0
    """Missing frames of those blocks, decoded from parity and written."""
    recovery_failures: int = 0
    """Decodes that needed one more symbol (not fatal: the planner asks for more)."""
    recovery_cpu_seconds: float = 0.0
    """CPU time of the pump's thread spent reading blocks back and decoding them (part of `cpu_seconds`)."""
    sha1_cpu_seconds: float = 0.0
    """CPU time of the hashing thread: the whole image's SHA-1, computed while the blocks came in."""
    hash_tail_seconds: float = 0.0
    """From the last block verified to the image's SHA-1 known: the hashing left for the end."""
    unhashed_at_end: int = 0
    """Bytes not hashed yet when the last block was verified."""
    sync_seconds: float = 0.0
    """The final sync of the target."""


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

    `repairs`, when given (server mode), follows the carousel and sends repair requests (see `repair`).

    `gro`: UDP GRO is on for `sock` (`multicast.enable_gro`): receives then go through ``recvmsg`` and a
    coalesced buffer is split into its datagrams. It must be True for a socket with GRO on, or coalesced
    buffers would be taken for single (misaligned) datagrams and dropped; for one without it, True works too,
    at the cost of ``recvmsg``. `buffer_size`: of the receive buffer; anything smaller than the default can
    truncate a receive (what did not fit is counted in `truncated` and dropped). `batch`: with GRO on, turn to
    recvmmsg where the link does not coalesce (`BATCH_JUDGED_AFTER`); False keeps one receive per datagram.
    """

    def __init__(self, *, sock: socket.socket, assembly: Assembly, open_target: Callable[[StreamMetadata], Target], expected: bytes | None = None, repairs: Repairs | None = None, stage_size: int = STAGE_SIZE, gro: bool = False, buffer_size: int = RECEIVE_BUFFER_SIZE, carousel_port: int | None = None, on_phase: Callable[[Phase], None] | None = None, batch: bool = True, keep_cache: bool = False) -> None:
        self.assembly = assembly
        self._batch = batch
        self._keep_cache = keep_cache
        self._carousel_port = carousel_port
        self._gro = gro
        self._buffer_size = buffer_size
        self._expected = expected
        self._confirm_expected = expected is not None
        self._sock = sock
        self._open_target = open_target
        self._stage = memoryview(bytearray(stage_size))
        self._stop = False
        self._target: Target | None = None
        self._cursor: Sha1Cursor | None = None
        self._cursor_thread: threading.Thread | None = None
        self._hash_tail_seconds = 0.0
        self._sync_seconds = 0.0
        self._scratch: bytearray | None = None
        self._corrupt_repeats: Counter[int] = Counter()
        self._same_corruption: Counter[tuple[int, int]] = Counter()
        self._image_mismatches = 0
        self._verified_sha1: str | None = None
        self._finished_at = 0.0
        self._result: PumpResult | None = None
        self._fetched: collections.deque[tuple[int, bytes]] = collections.deque()
        self._resume_noted = False
        self.repairs = repairs
        self._on_phase = on_phase
        self._phase = Phase.WAITING
        self.datagrams = 0
        self.coalesced = 0
        """Receives that returned more than one datagram (UDP GRO)."""
        self.batched = 0
        """recvmmsg receives that returned more than one datagram (after the turn to batching)."""
        self.truncated = 0
        """Receives whose buffer or control message did not fit (never seen; what did not fit is dropped)."""
        self.metadata_frames = 0
        self.rest_frames = 0
        """Metadata frames that said the carousel rests (docs/PROTOCOL.md section 7)."""
        self.multicast_bytes = 0
        """Image bytes written from multicast (counted when flushed)."""
        self.fetched_blocks = 0
        self.fetched_bytes = 0
        self.fetched_discarded = 0
        """Fetched blocks thrown away: verified by multicast meanwhile, or of the wrong length."""
        self.zero_blocks = 0
        """Blocks the stream announced as all zeros (never sent), zeroed on the target."""
        self.zero_frames = 0
        """Frames of the other blocks the stream announced as all zeros (never sent), zeroed on the target."""
        self.parity_frames = 0
        """Parity frames kept by the assembly (FEC)."""
        self.recovered_blocks = 0
        """Blocks completed by decoding parity."""
        self.recovered_frames = 0
        """Missing frames decoded from parity and written."""
        self.recovery_failures = 0
        """Decodes that needed one more symbol."""
        self.recovery_cpu_seconds = 0.0
        """CPU time of the pump's thread spent reading back and decoding blocks to recover them."""
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

    def heard_the_stream(self) -> bool:
        """Whether anything of the stream came by multicast: metadata, new data or duplicates (any thread)."""
        return bool(self.metadata_frames or self.multicast_bytes or self.assembly.duplicates)

    @property
    def phase(self) -> Phase:
        return self._phase

    @phase.setter
    def phase(self, phase: Phase) -> None:
        if phase is not self._phase:
            self._phase = phase
            if self._on_phase is not None:
                self._on_phase(phase)

    def deliver_block(self, block: int, data: bytes) -> None:
        """(Any thread.) The bytes of `block`, fetched out of band: the pump writes and judges them soon."""
        self._fetched.append((block, data))

    @property
    def queued_blocks(self) -> int:
        """Delivered blocks the pump has not applied yet."""
        return len(self._fetched)

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
        if self._verified_sha1 is not None:
            assembly = self.assembly
            self._result = PumpResult(
                sha1=self._verified_sha1,
                length=assembly.layout.length,
                format=assembly.metadata.format,
                started_at=self.started_at,
                finished_at=self._finished_at,
                cpu_seconds=time.thread_time() - self._cpu_started_at,
                datagrams=self.datagrams,
                coalesced=self.coalesced,
                batched=self.batched,
                duplicates=assembly.duplicates,
                drops={reason.value: count for reason, count in assembly.drops.items()},
                corrupt_blocks=assembly.corrupt_blocks,
                image_mismatches=self._image_mismatches,
                resumed_blocks=assembly.resumed_blocks,
                multicast_bytes=self.multicast_bytes,
                fetched_blocks=self.fetched_blocks,
                fetched_bytes=self.fetched_bytes,
                zero_blocks=self.zero_blocks,
                zero_frames=self.zero_frames,
                parity_frames=self.parity_frames,
                rest_frames=self.rest_frames,
                recovered_blocks=self.recovered_blocks,
                recovered_frames=self.recovered_frames,
                recovery_failures=self.recovery_failures,
                recovery_cpu_seconds=self.recovery_cpu_seconds,
                sha1_cpu_seconds=self._cursor.cpu_seconds if self._cursor is not None else 0.0,
                hash_tail_seconds=self._hash_tail_seconds,
                unhashed_at_end=self._cursor.unhashed_at_digest if self._cursor is not None else 0,
                sync_seconds=self._sync_seconds,
            )
        return self._result

    # -- the hot loop -----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        assembly = self.assembly
        if self._expected is not None:
            event = assembly.receive_datagram(self._expected)
            if not isinstance(event, MetadataReceived):
                raise StreamBroken(reason=f"the expected metadata was not accepted: {event}")
            self._first_metadata(event.metadata)
            if assembly.state is AssemblyState.VERIFYING_IMAGE:
                self._finish_image()  # resumed with every block verified: only the image SHA-1 is left
                if self._verified_sha1 is not None:
                    return
        sock = self._sock
        gro = self._gro
        recv_into, recvfrom_into, recvmsg_into = sock.recv_into, sock.recvfrom_into, sock.recvmsg_into
        buffer = bytearray(self._buffer_size)
        buffers = [buffer]
        view = memoryview(buffer)
        one_datagram = (0,)
        receive = assembly.receive_datagram
        receive_run = assembly.receive_run
        stage = self._stage
        capacity = len(stage)
        stage_start = stage_end = stage_fill = 0
        repairs = self._repairs_or_none()
        following = repairs is not None  # the carousel's position is followed (server mode)
        # The source port of the stream's metadata frames, once seen: data frames from it are the carousel's.
        # The lease names it, when the server says: then the planner follows the carousel from the first
        # datagram, and frames lost before the first metadata frame are asked for in this loop, not the next.
        carousel_port: int | None = None
        observe: Callable[[int], None] | None = None
        frame_size = 1
        if following and self._carousel_port is not None and repairs.planner is not None:
            carousel_port, observe = self._carousel_port, repairs.planner.observe_carousel
            frame_size = assembly.layout.frame_size
            log.info("carousel frames come from port %d (the lease says); repair requests %s", carousel_port, "on" if repairs.asks else "off")
        sample_mask = OBSERVE_EVERY - 1
        count = 0
        next_tick = TICK_EVERY
        monotonic = time.monotonic

        def flush() -> None:
            nonlocal stage_start, stage_fill
            if stage_fill:
                self._target.pwrite(stage[:stage_fill], stage_start)
                self.multicast_bytes += stage_fill
                stage_start, stage_fill = stage_end, 0

        behind = False  # the latest batch receive filled every slot: more is queued (`Repairs.poll`)

        def housekeeping() -> bool:
            """Poll the repair planner, apply fetched blocks; True once the image is verified."""
            self.datagrams = count
            if self._fetched:
                flush()  # staged bytes of a fetched block must not land on top of it afterwards
                if self._apply_fetched():
                    return True
            if repairs is not None:
                repairs.poll(monotonic(), behind=behind)
            return False

        # Batching (module docstring, "Receiving"): with GRO on, whether the link coalesces is judged on the first
        # BATCH_JUDGED_AFTER receives of whole frames; where it rarely does, recvmmsg takes over (`DatagramBatch`).
        batch: DatagramBatch | None = None
        judging = gro and self._batch
        full_size = -1  # a whole data frame's datagram, once the layout is known
        judged = coalesced_seen = 0  # receives of whole frames looked at, and how many of them came coalesced

        def take(datagrams: memoryview | bytes, size: int, segment: int, port: int) -> bool:
            """The datagrams of one receive (`size` bytes, `segment` each, the last may be shorter; one datagram
            when they are equal), from source `port`; True once the image is verified."""
            nonlocal stage_start, stage_end, stage_fill, count, carousel_port, observe, frame_size, repairs
            if segment < size:
                run = receive_run(datagrams, segment)
                if run is not None:
                    # The common case, whole: consecutive new frames (`Assembly.receive_run`).
                    count += run.count
                    offset, frame_length = run.offset, segment - HEADER_SIZE
                    length = run.count * frame_length
                    if offset != stage_end or stage_fill + length > capacity:
                        flush()
                        stage_start = stage_end = offset
                    for start in range(HEADER_SIZE, size, segment):
                        stage[stage_fill : stage_fill + frame_length] = datagrams[start : start + frame_length]
                        stage_fill += frame_length
                    stage_end += length
                    mismatches = self._image_mismatches
                    for block in run.completed_blocks:
                        flush()
                        self._check_block(block)
                        if self._verified_sha1 is not None:
                            return True
                        if self._image_mismatches != mismatches:
                            break  # the image was forgotten: the other block is no longer complete
                    if port == carousel_port:
                        observe(stage_end // frame_size - 1)
                    return False
                starts = range(0, size, segment)
            else:
                starts = one_datagram
            count += len(starts)
            head = -1  # the last carousel position in this receive (one observation covers them all)
            for start in starts:
                event = receive(datagrams[start : start + segment])
                kind = event.__class__
                if kind is DataReceived:
                    head = offset = event.offset
                    payload = event.payload
                    length = len(payload)
                    if offset != stage_end or stage_fill + length > capacity:
                        flush()
                        stage_start = stage_end = offset
                    # Copied now: the receive buffer is reused by the next receive.
                    stage[stage_fill : stage_fill + length] = payload
                    stage_fill += length
                    stage_end += length
                    if event.completed_block is not None:
                        flush()
                        self._check_block(event.completed_block)
                        if self._verified_sha1 is not None:
                            return True
                    elif event.decodable_block is not None:  # parity came first; this frame completes it
                        flush()
                        self._recover_block(event.decodable_block)
                        if self._verified_sha1 is not None:
                            return True
                elif kind is Duplicate:
                    head = event.offset
                elif kind is ParityReceived:  # a repair frame: it says nothing of the carousel's position
                    self.parity_frames += 1
                    if event.decodable:
                        flush()  # the block is read back as written: its staged frames first
                        self._recover_block(event.block)
                        if self._verified_sha1 is not None:
                            return True
                elif kind is MetadataReceived:
                    self.metadata_frames += 1
                    if self._confirm_expected:
                        self._confirm(event.metadata)
                    if event.first_metadata:
                        self._first_metadata(event.metadata)
                    if following and port >= 0:
                        repairs = self._repairs_or_none()  # started now if the layout just became known
                        if repairs is not None and repairs.planner is not None:
                            if carousel_port is None:
                                log.info("carousel frames come from port %d; repair requests %s", port, "on" if repairs.asks else "off")
                            elif carousel_port != port:
                                log.info("carousel frames now come from port %d, not %d (the sender restarted?)", port, carousel_port)
                            carousel_port, observe = port, repairs.planner.observe_carousel
                            frame_size = assembly.layout.frame_size
                            if event.metadata.rest:
                                repairs.planner.observe_rest()
                                self.rest_frames += 1
                    if event.zero_blocks:
                        flush()  # staged bytes of those blocks must not land on the zeros afterwards
                        self._zero_blocks(event.zero_blocks)
                    if event.zero_frames:
                        flush()  # before the blocks they complete (in blocks_to_check) are read back
                        self._zero_frames(event.zero_frames)
                    mismatches = self._image_mismatches
                    if event.blocks_to_check:
                        flush()
                        for block in event.blocks_to_check:
                            self._check_block(block)
                            if self._verified_sha1 is not None:
                                return True
                            if self._image_mismatches != mismatches:
                                break  # the image was forgotten: the other blocks are no longer complete
                    for block in event.blocks_to_recover:  # zero frames made them decodable with parity held
                        if self._image_mismatches != mismatches:
                            break  # the image was forgotten, parity with it
                        flush()
                        self._recover_block(block)
                        if self._verified_sha1 is not None:
                            return True
                    if assembly.state is AssemblyState.VERIFYING_IMAGE:
                        self._finish_image()  # an empty image: verified by its metadata alone
                        if self._verified_sha1 is not None:
                            return True
                elif kind is StreamFailed:
                    raise StreamBroken(reason=f"the stream failed: {event.error}")
            if head >= 0 and port == carousel_port:
                observe(head // frame_size)
            return False

        try:
            while not self._stop:
                if batch is not None:
                    # Up to SLOTS datagrams at once; runs of whole frames from one port go in one step.
                    try:
                        received = batch.receive()
                    except (BlockingIOError, InterruptedError):
                        behind = False
                        if housekeeping():
                            return
                        continue
                    behind = received == SLOTS
                    if count >= next_tick:
                        next_tick = count + TICK_EVERY
                        if housekeeping():
                            return
                    if received > 1:
                        self.batched += 1
                    lengths, ports, slots = batch.lengths(received), batch.ports(received), batch.view
                    index = 0
                    while index < received:
                        port = ports[index]
                        end = index + 1
                        if lengths[index] == full_size:
                            while end < received and lengths[end] == full_size and ports[end] == port:
                                end += 1
                        if end - index > 1:
                            size = (end - index) * full_size
                            if take(slots[index * full_size : end * full_size], size, full_size, port):
                                return
                        elif take(batch.datagram(index), lengths[index], lengths[index], port):
                            return
                        index = end
                    continue
                # One receive: `size` bytes in `buffer`, datagrams of `segment` bytes each (the last may be
                # shorter); without GRO, or a buffer without its control message, one datagram (segment == size).
                try:
                    if gro:
                        # The source address comes with every recvmsg at no extra cost, and covers up to 45 frames.
                        size, ancillary, flags, source = recvmsg_into(buffers, ANCILLARY_SIZE)
                        port = source[1]
                        segment = _segment_size(ancillary, size) if ancillary else size
                        if flags & TRUNCATED:
                            size, segment = self._truncated(size, segment, flags)
                            if not size:
                                continue
                    elif following and (carousel_port is None or not count & sample_mask):
                        size, source = recvfrom_into(buffer)
                        port = source[1]
                        segment = size
                    else:
                        size = segment = recv_into(buffer)
                        port = -1
                except (BlockingIOError, InterruptedError):
                    # SO_RCVTIMEO expired: look at the stop flag, and keep house while nothing arrives
                    if housekeeping():
                        return
                    continue
                if count >= next_tick:
                    next_tick = count + TICK_EVERY
                    if housekeeping():
                        return
                if segment < size:
                    self.coalesced += 1
                    if take(view[:size], size, segment, port):  # cut at size: the last datagram may be shorter
                        return
                elif take(view, size, size, port):
                    return
                if judging:
                    # Does the link coalesce? Judged on whole frames (metadata never is), once the layout is known.
                    if full_size < 0:
                        if assembly.layout is not None:
                            full_size = HEADER_SIZE + assembly.layout.frame_size
                    elif segment < size or size == full_size:
                        judged += 1
                        coalesced_seen += segment < size
                        if judged >= BATCH_JUDGED_AFTER:
                            judging = False
                            if coalesced_seen * BATCH_WHEN_COALESCED_BELOW < judged:
                                batch = self._start_batching(full_size, coalesced_seen)
            flush()
        finally:
            self.datagrams = count

    # -- the rare paths ------------------------------------------------------------------------------------------

    def _start_batching(self, slot_size: int, coalesced: int) -> DatagramBatch | None:
        """Turn GRO off and receive with recvmmsg from now on; None (GRO stays) where the C library cannot."""
        try:
            batch = DatagramBatch(self._sock, slot_size=slot_size)
        except OSError as error:
            log.info("the link coalesces few datagrams, but recvmmsg is not available (%s): one receive each", error)
            return None
        # Datagrams the kernel already queued coalesced stay so: one such buffer reads as a datagram too long to
        # be a frame and is dropped (counted), and its frames come again. It can only be a rare one: few were.
        self._sock.setsockopt(SOL_UDP, UDP_GRO, 0)
        log.info("%d of the first %d receives of whole frames came coalesced: GRO off, up to %d datagrams per receive (recvmmsg)", coalesced, BATCH_JUDGED_AFTER, SLOTS)
        return batch

    def _truncated(self, size: int, segment: int, flags: int) -> tuple[int, int]:
        """A receive that did not fit: keep the whole datagrams it holds, if its segment size is known."""
        self.truncated += 1
        if self.truncated == 1:
            log.warning("a receive did not fit its buffer (recvmsg flags %#x); what did not fit is dropped", flags)
        if flags & socket.MSG_CTRUNC or segment >= size:
            return 0, 0  # the segment size is unknown, or the one datagram was cut short
        return size - size % segment, segment

    def _repairs_or_none(self) -> Repairs | None:
        """The repairs, started with the planner once the layout is known (None in server-less mode)."""
        repairs = self.repairs
        if repairs is not None and repairs.planner is None and self.assembly.layout is not None:
            assembly = self.assembly
            repairs.start(layout=assembly.layout, held=assembly.held_frames, parity_held=assembly.parity_held, fec=assembly.fec,
                          parity_refused=assembly.parity_refused, parity_seen=assembly.parity_seen,
                          overflows=functools.partial(kernel_drops, self._sock), parity_room=assembly.parity_room)
        return repairs

    def _first_metadata(self, metadata: StreamMetadata) -> None:
        if metadata.block_size is not None and metadata.block_size > MAX_BLOCK_SIZE:
            raise StreamBroken(reason=f"the stream's blocks are {metadata.block_size} bytes, more than the {MAX_BLOCK_SIZE} this receiver reads back")
        log.info("stream: image %s, %d bytes, sha1 %s", metadata.name or "(unnamed)", metadata.length, metadata.sha1)
        self._target = self._open_target(metadata)
        if self._target.length != metadata.length:
            raise StreamBroken(reason=f"the target was opened for {self._target.length} bytes, the stream has {metadata.length}")
        self.phase = Phase.RECEIVING
        self._note_resumed()

    def _note_resumed(self) -> None:
        assembly = self.assembly
        if assembly.resumed_blocks and not self._resume_noted:
            self._resume_noted = True
            log.info("resuming the interrupted receive: %d of %d blocks were verified before", assembly.resumed_blocks, assembly.layout.block_count)

    def _confirm(self, metadata: StreamMetadata) -> None:
        """The stream's first metadata after `expected`: the assembly compared the fields it states."""
        self._confirm_expected = False
        expected = self.assembly.layout
        if expected is not None and metadata.block_size is None and metadata.length:
            raise StreamBroken(reason=f"the lease announced checksum blocks of {expected.block_size} bytes, the stream sends no block checksums")

    def _sha1_cursor(self) -> Sha1Cursor:
        if self._cursor is None:
            layout = self.assembly.layout
            self._note_resumed()
            self._cursor = Sha1Cursor(target=self._target, layout=layout, drop_cache=not self._keep_cache)
            self._scratch = bytearray(layout.block_size)
            # Blocks verified before this run (a resume): the cursor reads them back from the target.
            checkpoint = self.assembly.checkpoint()
            if self.assembly.resumed_blocks and checkpoint is not None:
                verified = bitarray()
                verified.frombytes(checkpoint.verified_blocks)
                for block in verified.search(1, 0, layout.block_count):
                    self._cursor.verified(block, None)
            self._cursor_thread = threading.Thread(target=self._cursor.run, name="vmcast-sha1", daemon=True)
            self._cursor_thread.start()
        return self._cursor

    def _zero_blocks(self, blocks: tuple[int, ...]) -> None:
        """Blocks the stream announced as zeros (never sent), already counted verified by the assembly: make
        them read as zeros on the target, and let the SHA-1 cursor read them back like any verified block."""
        layout = self.assembly.layout
        cursor = self._sha1_cursor()
        for first, last in _runs_of(blocks):
            start, end = layout.block_span(first)[0], layout.block_span(last)[1]
            self._target.zero_range(start, end - start)
            for block in range(first, last + 1):
                cursor.verified(block, None)
        self.zero_blocks += len(blocks)

    def _zero_frames(self, runs: tuple[tuple[int, int], ...]) -> None:
        """Frames the stream announced as zeros (never sent), already counted held by the assembly: make them read
        as zeros on the target (a hole in a file, BLKZEROOUT or written zeros on a device; unaligned edges are
        the target's business). Their blocks are checked by xxh3 like any, zeros included, once complete."""
        layout = self.assembly.layout
        for first, count in runs:
            start = first * layout.frame_size
            self._target.zero_range(start, min((first + count) * layout.frame_size, layout.length) - start)
            self.zero_frames += count

    def _check_block(self, block: int) -> None:
        cursor = self._sha1_cursor()
        start, end = self.assembly.layout.block_span(block)
        lent = cursor.take_buffer()
        view = memoryview(lent if lent is not None else self._scratch)[: end - start]
        self._target.pread_into(view, start)
        self._judged(self.assembly.check_block(block, view), lent)

    def _recover_block(self, block: int) -> None:
        """Decode `block` from what is written of it and its parity; write the frames that were missing; then
        judge it like any complete block (when its checksum is known; else a later metadata frame names it)."""
        started = time.thread_time()
        assembly = self.assembly
        self._sha1_cursor()  # makes the scratch buffer
        start, end = assembly.layout.block_span(block)
        data = memoryview(self._scratch)[: end - start]
        self._target.pread_into(data, start)
        outcome = assembly.recover_block(block, data)
        if not isinstance(outcome, BlockRecovered):
            self.recovery_failures += 1
            self.recovery_cpu_seconds += time.thread_time() - started
            return
        for offset, payload in outcome.frames:
            if not (start <= offset and offset + len(payload) <= end):
                raise StreamBroken(reason=f"parity recovery of block {block} gave bytes at {offset}, outside it")
            self._target.pwrite(payload, offset)
            self.multicast_bytes += len(payload)
        self.recovered_blocks += 1
        self.recovered_frames += len(outcome.frames)
        self.recovery_cpu_seconds += time.thread_time() - started
        if outcome.checksum_known:
            self._check_block(block)  # read back as written and judged by its xxh3, like any completed block

    def _apply_fetched(self) -> bool:
        """Write, read back and judge the blocks fetched by HTTP; True once the image is verified."""
        assembly = self.assembly
        layout = assembly.layout
        while self._fetched:
            block, data = self._fetched.popleft()
            if layout is None or self._target is None:
                self.fetched_discarded += 1
                continue
            start, end = layout.block_span(block)
            if len(data) != end - start or assembly.is_verified(block):
                self.fetched_discarded += 1  # multicast verified it meanwhile: keep the bytes already checked
                continue
            self._target.pwrite(data, start)
            cursor = self._sha1_cursor()
            lent = cursor.take_buffer()
            view = memoryview(lent if lent is not None else self._scratch)[: end - start]
            self._target.pread_into(view, start)
            self.fetched_blocks += 1
            self.fetched_bytes += end - start
            self._judged(assembly.accept_block(block, view), lent)
            if self._verified_sha1 is not None:
                return True
        return False

    def _judged(self, event: BlockVerified | BlockCorrupt, lent: bytearray | None) -> None:
        """Act on the assembly's verdict on a block whose bytes (as read back) are in `lent` or the scratch buffer."""
        cursor = self._cursor
        block = event.block
        if isinstance(event, BlockVerified):
            cursor.verified(block, lent)
            if event.image_complete:
                self._finish_image()
            return
        if lent is not None:
            cursor.give_back(lent)
        self._corrupt_repeats[block] += 1
        self._same_corruption[block, event.actual] += 1
        repeats, same = self._corrupt_repeats[block], self._same_corruption[block, event.actual]
        log.warning("block %d read back corrupt (xxh3 %016x, expected %016x); taking it again", block, event.actual, event.expected)
        if same >= MAX_SAME_CORRUPTION:
            raise StreamBroken(
                reason=f"block {block} read back {same} times with the same wrong bytes (xxh3 {event.actual:016x}): "
                "the target returns what was not written, or the sender's data does not match its checksum"
            )
        if repeats >= MAX_CORRUPT_REPEATS:
            raise StreamBroken(reason=f"block {block} read back corrupt {repeats} times: the network corrupts too much to finish")

    def _finish_image(self) -> None:
        self.phase = Phase.HASHING
        hashing_from = time.monotonic()
        sha1 = self._sha1_cursor().digest(stopped=self.stopped)
        if sha1 is None:
            return  # stopped while hashing
        self._hash_tail_seconds = time.monotonic() - hashing_from
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
        syncing_from = time.monotonic()
        self._target.sync()
        if not self._keep_cache:
            self._target.drop_cached(0, self._target.length)  # all of it is clean now (module docstring, "Checks")
        self._sync_seconds = time.monotonic() - syncing_from
        self.phase = Phase.VERIFIED
        self._finished_at = time.monotonic()
        self._verified_sha1 = event.sha1


def _segment_size(ancillary: list[tuple[int, int, bytes]], size: int) -> int:
    """The datagram size of a coalesced buffer of `size` bytes, from recvmsg's control messages: the UDP_GRO
    one (an int in host byte order), else `size` (a single datagram)."""
    for level, kind, data in ancillary:
        if level == SOL_UDP and kind == UDP_GRO:
            segment = int.from_bytes(data, sys.byteorder)
            return segment if 0 < segment < size else size
    return size


def _runs_of(blocks: tuple[int, ...]) -> list[tuple[int, int]]:
    """Ascending `blocks` as (first, last) runs of consecutive blocks."""
    runs: list[tuple[int, int]] = []
    for block in sorted(blocks):
        if runs and block == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], block)
        else:
            runs.append((block, block))
    return runs
