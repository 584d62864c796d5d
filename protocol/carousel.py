"""The sender's schedule: what goes on the wire next. Sans-IO: the caller reads the image, paces and sends.

A carousel loops over the image's frames forever, in order, so a receiver that joins at any moment has
everything after one loop. Metadata goes out at the start of every loop and again whenever
`METADATA_INTERVAL` seconds have passed, so a late joiner waits at most that long to learn the image.

Frames the metadata announces as never sent (those of all-zero blocks, and all-zero frames) are skipped: the
carousel keeps them as ordered runs and a cursor on the next run, so moving on costs one comparison per frame.

Repairs go out ahead of the carousel, at most `MAX_REPAIRS_IN_A_ROW` before each carousel frame: requested
frames (`SendData` with ``repair=True``) and, when the manifest has ``fec``, parity symbols (`SendParity`),
the two taking turns when both are pending.

Resting (docs/PROTOCOL.md section 7): when the caller knows every receiver and when the last of them began
listening (`listening_since`), a loop that started after that was heard whole by all of them. After such a
loop the carousel *rests*: it sends no more carousel frames, only the requested repairs (the server's
sender paces them at half the rate, as beside the loop), the metadata every `metadata_interval`, and a small
rest frame (``"rest": true``) every `REST_SIGNAL_INTERVAL`, which tells receivers that everything has passed,
so that they ask now for what they lack instead of waiting for a loop that is not coming. A new receiver
(the caller sets `listening_since` to None, or to a time after that loop's start) ends the rest, and so do
repairs of `REST_REPAIR_SHARE` of a loop: the next loop starts at once. Without a rest a stream whose
receivers are all done but the last few would send part of a loop more, for no one: the time between the
loop's end and the last release (~0.15 s on the test bed).
"""

from __future__ import annotations

from dataclasses import dataclass

from .frames import HEADER, encode_header, encode_metadata, encode_parity_header
from .metadata import METADATA_PAYLOAD_LIMIT, Manifest
from .repair import RepairQueue, RepairRequest

# When repairs are pending, at most this many are sent in a row before a carousel frame: receivers that
# joined late still need the carousel to move, so repairs take at most half of the rate.
MAX_REPAIRS_IN_A_ROW = 1

# How often metadata is repeated within a loop. A receiver drops data until it has metadata, so this bounds
# what a late joiner throws away (at 1 Gbit/s, one second is 119 MB it will take on the next loop instead).
METADATA_INTERVAL = 1.0

# A rest ends (the next loop starts) once it has sent repairs of this share of a loop's frames: a receiver that
# lacks that much is better served by a loop, which costs it nothing to take, than by repairs alone (parity
# costs both sides CPU, and repairs back to back overflow a receiver that could not keep up with the loop:
# unpaced on loopback, one that had lost half a loop kept losing the parity sent for it).
REST_REPAIR_SHARE = 1 / 8

# While the carousel rests it says so this often (a frame of ~250 bytes): a receiver whose rest frame was lost
# asks for its last frames this much later, not a second later.
REST_SIGNAL_INTERVAL = 0.1


# Not frozen, unlike the other actions: one is made per datagram sent, and a frozen dataclass's __init__ costs
# about a microsecond more per frame on the sender's hot path. Treat it as immutable all the same.
@dataclass(slots=True, kw_only=True)
class SendData:
    """Send the image bytes ``[offset, offset + length)`` behind `header`."""

    header: bytes
    offset: int
    length: int
    repair: bool = False
    """True for a frame resent because a receiver asked: send it from the repair socket (docs/PROTOCOL.md 7)."""


# Not frozen, like SendData (one per parity datagram). Treat it as immutable all the same.
@dataclass(slots=True, kw_only=True)
class SendParity:
    """Send `header` then RaptorQ repair symbol `esi` of `block` (`frame_size` bytes), from the repair socket.

    The caller makes the symbol: ``ParityEncoder(block bytes, frame_size=...).symbols(esi, 1)[0]`` (keep the
    encoders of the few blocks being repaired: making one costs a few ms, a further symbol a few µs). ESIs of
    a block only grow, so an encoder is asked for each symbol once.
    """

    header: bytes
    """The 16 header bytes (`encode_parity_header`)."""
    block: int
    """The block the symbol repairs."""
    esi: int
    """The symbol's RaptorQ encoding symbol id (>= the block's frame count)."""
    repair: bool = True
    """Always True: parity frames are repair frames (docs/PROTOCOL.md 7): send them from the repair socket."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Idle:
    """Nothing to send before `until` (an empty image has only metadata to repeat; a resting carousel waits),
    unless the caller hands over a repair request or a new `Carousel.listening_since` first."""

    until: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SendMetadata:
    """Send these complete datagrams (metadata frames), in order."""

    datagrams: tuple[bytes, ...]


class Carousel:
    """Loops over an image's frames, with metadata at each loop start and at least every `metadata_interval`.

    `next_send(now)` is called with the caller's clock reading and returns one action.
    """

    def __init__(self, *, manifest: Manifest, cookie: bytes, metadata_interval: float = METADATA_INTERVAL, metadata_payload_limit: int = METADATA_PAYLOAD_LIMIT) -> None:
        self.manifest = manifest
        self.cookie = cookie
        self.layout = manifest.layout
        self.metadata_interval = metadata_interval
        self.metadata_datagrams = tuple(
            encode_metadata(cookie, fields) for fields in manifest.metadata_frames(payload_limit=metadata_payload_limit)
        )
        self.loops_completed = 0
        self.data_frames_sent = 0
        # Frames of all-zero blocks and all-zero frames are never sent: metadata says which they are. They are
        # kept as ordered runs with a cursor on the next one, so the per-frame path compares one integer.
        self._frame_size, self._length = self.layout.frame_size, self.layout.length
        self._frame_count, self._per_block = self.layout.frame_count, self.layout.frames_per_block
        self._pack = HEADER.pack
        unsent = manifest.unsent_frame_runs()
        self._skip_starts = [first for first, _ in unsent]
        self._skip_ends = [first + count for first, count in unsent]
        self.frames_per_loop = self._frame_count - sum(count for _, count in unsent)
        self._next_run = 0  # index of the next run of unsent frames ahead of the carousel
        self._skip_at = -1  # where that run starts (-1: none ahead in this loop)
        # A frame that starts a block on the carousel's way though not the block's first frame (those before it
        # are unsent): the repair queue is told, as for a first frame, that the block is being sent again.
        self._enters_block_at = -1
        self._next_frame = self._loop_start() if self.frames_per_loop else 0
        self._metadata_due_at: float | None = None  # None: due now (start of the first loop)
        self.fec = bool(manifest.fec)
        self.repairs = RepairQueue(layout=manifest.layout, fec=self.fec)
        self.repair_frames_sent = 0
        """Requested data frames sent (parity frames are counted apart, in `parity_frames_sent`)."""
        self.parity_frames_sent = 0
        self._repairs_in_a_row = 0
        self._parity_turn = False
        self.listening_since: float | None = None
        """When the last of the stream's receivers began listening (`next_send`'s clock), set by a caller that
        knows every receiver; None when it does not (a receiver yet to join, or no way to know): then the
        carousel never rests."""
        self.resting = False
        """True while the carousel rests (see the module docstring)."""
        self.rests = 0
        """Times the carousel came to rest."""
        self.rest_datagrams = (encode_metadata(cookie, manifest.rest_metadata()),)
        self._loop_started_at = 0.0  # set when a loop starts (its metadata is sent)
        self._rest_signal_due_at = 0.0
        self._rest_repairs_left = 0

    def request_repair(self, request: RepairRequest, now: float | None = None) -> None:
        """Merge a receiver's request, which came at `now` (`next_send`'s clock), into the work list;
        requested frames and parity go out ahead of the carousel (parity only with `fec`; otherwise its
        entries are ignored)."""
        self.repairs.add(request, now)

    def next_send(self, now: float) -> SendData | SendParity | SendMetadata | Idle:
        if self.resting:
            if self._loop_heard_whole():
                return self._rest(now)
            self.resting = False  # a receiver came: the next loop starts now, with metadata
            self._metadata_due_at = None
        if self._metadata_due_at is None or now >= self._metadata_due_at:
            if self._metadata_due_at is None:
                self._loop_started_at = now
            self._metadata_due_at = now + self.metadata_interval
            if self.frames_per_loop == 0:
                # An empty (or all-zero) image is all metadata: each metadata round is a whole loop.
                self.loops_completed += 1
            return SendMetadata(datagrams=self.metadata_datagrams)
        if self.frames_per_loop == 0:
            # Nothing to send between rounds (sending metadata back to back would flood the group).
            return Idle(until=self._metadata_due_at)
        repairs = self.repairs
        if self._repairs_in_a_row < MAX_REPAIRS_IN_A_ROW and (repairs._pending_count or repairs._parity_pending):
            repair = self._next_repair(now)
            if repair is not None:
                self._repairs_in_a_row += 1
                return repair
        self._repairs_in_a_row = 0
        # The per-datagram path (a few hundred thousand calls a second): locals, no validation, no scans.
        frame = self._next_frame
        if repairs._pending_count:
            repairs.sent_by_carousel(frame)
        if repairs._parity_pending and (frame % self._per_block == 0 or frame == self._enters_block_at):
            repairs.block_started_by_carousel(frame // self._per_block)
        frame_size = self._frame_size
        offset = frame * frame_size
        length = self._length - offset
        if length > frame_size:
            length = frame_size
        self.data_frames_sent += 1
        following = frame + 1
        if following == self._skip_at:
            following = self._skip_run()
        if following >= self._frame_count:
            following = self._loop_start()
            self.loops_completed += 1
            self._metadata_due_at = None  # every loop starts with metadata
            if self._loop_heard_whole():
                self.resting = True
                self.rests += 1
                self._rest_signal_due_at = now
                # (A small image's loop may be shorter than one request's worth of repairs: a loop at least.)
                self._rest_repairs_left = max(int(self.frames_per_loop * REST_REPAIR_SHARE), min(self.frames_per_loop, 64))
        self._next_frame = following
        return SendData(header=self._pack(self.cookie, offset), offset=offset, length=length)

    def _loop_heard_whole(self) -> bool:
        """Whether every receiver listened since the latest loop started (`listening_since`): after it, they all
        heard it whole, and while it holds a rest goes on."""
        listening_since = self.listening_since
        return listening_since is not None and listening_since <= self._loop_started_at

    def _next_repair(self, now: float) -> SendData | SendParity | None:
        """The next repair frame, if any is pending: parity and requested frames take turns."""
        repairs = self.repairs
        if repairs._parity_pending and (self._parity_turn or not repairs._pending_count):
            self._parity_turn = False
            block, esi = repairs.pop_parity(now)
            self.parity_frames_sent += 1
            return SendParity(header=encode_parity_header(self.cookie, block=block, esi=esi), block=block, esi=esi)
        self._parity_turn = True
        repair = repairs.pop()
        if repair is None:
            return None
        self.repair_frames_sent += 1
        offset = repair * self.layout.frame_size
        length = min(self.layout.frame_size, self.layout.length - offset)
        return SendData(header=encode_header(self.cookie, offset), offset=offset, length=length, repair=True)

    def _rest(self, now: float) -> SendMetadata | SendData | SendParity | Idle:
        """What a resting carousel sends: the rest frame when due, metadata when due, else any repair."""
        if now >= self._rest_signal_due_at:
            self._rest_signal_due_at = now + REST_SIGNAL_INTERVAL
            return SendMetadata(datagrams=self.rest_datagrams)
        if self._metadata_due_at is None or now >= self._metadata_due_at:
            self._metadata_due_at = now + self.metadata_interval  # a receiver without a lease may come
            return SendMetadata(datagrams=self.metadata_datagrams)
        repair = self._next_repair(now)
        if repair is not None:
            self._rest_repairs_left -= 1
            if not self._rest_repairs_left:
                # Receivers lack much: the next loop starts after this frame (and may end in a rest again).
                self.resting = False
                self._metadata_due_at = None
            return repair
        return Idle(until=min(self._rest_signal_due_at, self._metadata_due_at))

    def _loop_start(self) -> int:
        """The first frame a loop sends (frame 0 unless it is unsent), with the run cursor at the image's start."""
        self._next_run = 0
        self._skip_at = self._skip_starts[0] if self._skip_starts else -1
        return self._skip_run() if self._skip_at == 0 else 0

    def _skip_run(self) -> int:
        """The carousel reached the run of unsent frames at `_skip_at`: the frame after it (runs are merged, so
        that one is sent, or is the image's end), with the cursor moved to the next run."""
        start, following = self._skip_starts[self._next_run], self._skip_ends[self._next_run]
        if following % self._per_block and start <= following - following % self._per_block:
            self._enters_block_at = following
        self._next_run += 1
        self._skip_at = self._skip_starts[self._next_run] if self._next_run < len(self._skip_starts) else -1
        return following
