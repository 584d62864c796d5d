"""Repair: receivers ask for the frames they lost; the sender merges every request into one work list.

The approach of Emulab's Frisbee and of NORM: a receiver that has seen the carousel pass a region and still
misses frames of it sends a small *repair request* (a NACK) to the sender, after a random delay and at a
bounded rate. The sender keeps one set of requested frames for all receivers and multicasts them ahead of the
carousel, so one retransmission serves every receiver that lost the same frame, and a frame asked for by a
thousand receivers is sent once.

Wire format (docs/PROTOCOL.md section 7)::

    request  = cookie (8) | 0xFFFFFFFFFFFFFFFE (u64 BE) | JSON {"v": 1, "frames": [[first, count], ...]}

sent by UDP unicast to the sender's repair address. Repair frames are ordinary data frames that the sender
sends from a UDP source port other than the carousel's (the one its metadata frames come from), so receivers
can follow the carousel's position without being misled by repairs.

Sans-IO: `RepairPlanner` (receiver side) and `RepairQueue` (sender side) take `now` and random draws from
the caller and return what to send.

Parity (docs/PROTOCOL.md section 8): on a stream whose metadata says ``"fec": "raptorq"``, a planner made with
``fec=True`` asks per block for a *number* of parity symbols instead of frames (``"parity": [[block, count]]``),
and the queue keeps, per block, the largest number any receiver asked for and hands out fresh symbol ids, so
one parity frame repairs one missing frame of that block at every receiver that lacks any. Each entry also
says the symbols the receiver has seen (``[block, count, seen]``), so that a request crossing symbols on
their way to it is merged with the request they answer rather than added to it (`PARITY_IN_FLIGHT`).
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from bitarray import bitarray
from bitarray.util import intervals

from .fec import ESI_LIMIT, MAX_SOURCE_SYMBOLS
from .frames import COOKIE_SIZE, HEADER, HEADER_SIZE, DropReason, Dropped
from .metadata import METADATA_PAYLOAD_LIMIT, PROTOCOL_VERSION, Layout

REPAIR_REQUEST_OFFSET = 0xFFFF_FFFF_FFFF_FFFE

# A receiver asks at most this often. With thousands of receivers the requests of one interval are merged by
# the sender anyway, so asking more often only costs the sender parsing time.
REQUEST_INTERVAL = 0.1
# Random extra delay before each request, up to this fraction of the interval: receivers that lost the same
# burst do not all ask in the same millisecond (NORM's NACK back-off, without the suppression round).
REQUEST_JITTER = 0.5
# Frames within this distance behind the carousel's position are not asked for yet: a datagram reordered by
# the network or still in a socket buffer is not lost.
REORDER_MARGIN = 64

# A step back of the carousel's position by at most this many frames, to beyond the image's first ones, is
# reordering on the way even at the end of a loop (a few late GRO batches of up to 64 datagrams each), not
# a wrap to the image's start.
REORDERED_STEP_BACK = 4 * REORDER_MARGIN

# A frame asked for is not asked for again before this long: time for the sender to serve the request. The
# scale model (benchmarks/simulate.py) put one bursty-loss receiver at 1.16x the limit with 1.0 s, 1.08x with 0.3.
REREQUEST_AFTER = 0.3
# With parity, the wait before asking again adapts to the round trips measured (a request's block getting a
# symbol the receiver had not seen when it asked): the smoothed round trip plus four times its mean deviation
# (TCP's retransmission timeout, RFC 6298; a block asked for again is not timed, Karn's rule), never below
# `REREQUEST_AFTER` nor above this. Why: on a loaded sender (its parity workers behind) or a receiver behind
# its socket, answers took longer than 0.3 s, every block was asked again before its answer came, and the
# sender sent parity twice or three times over (the bed at 5% loss: 103-159k symbols where 48-72k did),
# which loaded it more.
REREQUEST_AFTER_LIMIT = 2.0
# A parity request naming a block whose latest symbols this receiver has not seen yet, coming this soon after
# they were sent, crossed them on their way (the test bed's queues hold tens of ms): they count toward its
# need. Later, they count as lost at that receiver, and its count is sent anew. Too short a window sends
# parity twice for crossing requests (the bed at 1% loss: 15.7-40.9 symbols per block for receivers missing
# ~7.5 each); too long makes a receiver that lost some of them wait `REREQUEST_AFTER` for its next request.
PARITY_IN_FLIGHT = 0.1
# A request saying its receiver's round trip (``"rtt"``, `RepairPlanner.round_trip`) widens that window to it,
# up to `REREQUEST_AFTER_LIMIT`: symbols handed out less than a round trip ago may still be on their way. On
# the bed at 5% loss (sender's workers behind, receivers' round trips 0.35-1.9 s) the fixed window counted
# 80k symbols in flight as lost, of 120k sent, where 37k were first asked for.
# Round trips beyond this (ms) are sent as this; a request saying more, or not a whole number, is malformed.
MAX_ROUND_TRIP_MS = 60_000
# Parity symbols a receiver asks for beyond the frames it misses. Decoding from exactly K symbols fails ~1% of
# the time (from K + 1, 1 in 10,000), and one symbol of the answer may be lost on the way: either way, without
# a spare the receiver learns it needs one more only after the request's symbols came, and asks again when
# `REREQUEST_AFTER` has passed: at the end of a loop, that wait adds to the whole transfer's time. One
# spare costs one symbol per block asked for (the sender sends the most any receiver asked: ~0.13% of the
# image at 1% loss) and makes the round trip rare.
PARITY_MARGIN = 1
# The answer crosses the same lossy network: a receiver asks for `count / (1 - loss)` symbols (then the
# spare), `loss` being the share of frames it lacks in the blocks it asks for, fully passed, averaged over
# blocks (weight `LOSS_WEIGHT` each); blocks that lost a burst (`BURST_FRACTION` or more: an overflowing
# socket, a stall) are not the network's loss and are left out. Why: the sender sends per block what the
# receiver needing most asked; at 5% loss that receiver lost ~2 of its ~47 symbols, asked again a round trip
# later, and the last blocks of a loop waited two or three round trips (0.5-2 s each on the loaded bed).
LOSS_WEIGHT = 1 / 16
# While a receiver's socket overflows (`RepairPlanner.ask_frames_until`), blocks missing at least this fraction
# of their frames are asked for as frames. On the bed (4 receivers, 5% loss, 2 shared cores) one receiver
# starved for ~1 s lost 26k datagrams; asking for all its losses as frames then resent 60k frames to everyone.
BURST_FRACTION = 0.25
# Ranges per request datagram; the JSON stays under the metadata payload limit (about 20 bytes per range).
# Parity entries ([block, count], as long as a range) count against the same limit.
MAX_RANGES_PER_REQUEST = 48
# The largest parity count one entry may ask for: no block has more frames than this (`fec.MAX_SOURCE_SYMBOLS`),
# and a receiver never needs more symbols than its block's frames. Larger counts are malformed requests.
MAX_PARITY_COUNT = MAX_SOURCE_SYMBOLS
# Ranges per poll, sent as several datagrams: at 1 Gbit/s and 1% loss a receiver loses ~850 frames a second,
# more than one datagram per poll can name (the scale model: one receiver then took 2.0x the limit).
MAX_RANGES_PER_POLL = 8 * MAX_RANGES_PER_REQUEST


@dataclass(frozen=True, slots=True, kw_only=True)
class RepairRequest:
    """What a receiver asks for: frames, and on a parity stream numbers of parity symbols per block."""

    ranges: tuple[tuple[int, int], ...] = ()
    """``(first frame, count)`` ranges of frames to resend."""
    parity: tuple[tuple[int, ...], ...] = ()
    """``(block, count, seen)``: `count` (>= 1) more parity symbols of `block` needed by this receiver, which
    has seen the block's symbols below ESI `seen` (one past the highest it received; 0: none). ``(block,
    count)`` from a receiver that does not say (docs/PROTOCOL.md section 8)."""

    round_trip: float | None = None
    """The receiver's smoothed time from a parity request to its answer (seconds, sent as whole ms in
    ``"rtt"``); None: not measured, or not said. The sender's window for symbols in flight (`RepairQueue`)."""

    @property
    def frame_count(self) -> int:
        return sum(count for _, count in self.ranges)

    @property
    def parity_count(self) -> int:
        """Parity symbols asked for, over all blocks."""
        return sum(entry[1] for entry in self.parity)


def encode_repair_request(cookie: bytes, request: RepairRequest) -> bytes:
    """One request datagram. ``"frames"`` is always there (a sender without parity requires it); ``"parity"``
    only when the request has parity entries."""
    fields: dict[str, object] = {"v": PROTOCOL_VERSION, "frames": [list(r) for r in request.ranges]}
    if request.parity:
        fields["parity"] = [list(p) for p in request.parity]
    if request.round_trip is not None:
        fields["rtt"] = min(round(request.round_trip * 1000), MAX_ROUND_TRIP_MS)
    body = json.dumps(fields, separators=(",", ":"))
    return HEADER.pack(cookie, REPAIR_REQUEST_OFFSET) + body.encode()


def encode_repair_requests(cookie: bytes, request: RepairRequest) -> list[bytes]:
    """A request as datagrams of at most `MAX_RANGES_PER_REQUEST` entries (ranges and parity entries) each."""
    entries = [(False, r) for r in request.ranges] + [(True, p) for p in request.parity]
    datagrams = []
    for start in range(0, len(entries), MAX_RANGES_PER_REQUEST):
        chunk = entries[start : start + MAX_RANGES_PER_REQUEST]
        part = RepairRequest(ranges=tuple(e for is_parity, e in chunk if not is_parity),
                             parity=tuple(e for is_parity, e in chunk if is_parity), round_trip=request.round_trip)
        datagrams.append(encode_repair_request(cookie, part))
    return datagrams


def decode_repair_request(
    datagram: bytes | memoryview, *, cookie: bytes, frame_count: int, block_count: int | None = None
) -> RepairRequest | Dropped:
    """Parse a repair request for a stream of `frame_count` frames. Never raises.

    `block_count`: the stream's blocks, for a sender that sends parity; then ``"parity"`` entries are checked
    (``0 <= block < block_count``, ``1 <= count <= MAX_PARITY_COUNT``; anything else drops the whole request
    as malformed). None: a sender without parity, which ignores ``"parity"`` and serves the frames.
    """
    if len(datagram) < HEADER_SIZE:
        return Dropped(reason=DropReason.TOO_SHORT, detail=f"{len(datagram)} bytes")
    their_cookie, marker = HEADER.unpack_from(datagram)
    if their_cookie != cookie:
        return Dropped(reason=DropReason.FOREIGN_COOKIE, detail=their_cookie.hex())
    if marker != REPAIR_REQUEST_OFFSET:
        return Dropped(reason=DropReason.MALFORMED_METADATA, detail="not a repair request")
    try:
        fields = json.loads(bytes(datagram[HEADER_SIZE:]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        return Dropped(reason=DropReason.MALFORMED_METADATA, detail=f"repair request is not JSON: {error}")
    ranges = fields.get("frames") if isinstance(fields, dict) else None
    if not isinstance(ranges, list):
        return Dropped(reason=DropReason.MALFORMED_METADATA, detail="repair request without a 'frames' list")
    parsed = []
    for item in ranges:
        if not (isinstance(item, list) and len(item) == 2 and all(type(v) is int for v in item)):
            return Dropped(reason=DropReason.MALFORMED_METADATA, detail=f"bad range {item!r}")
        first, count = item
        if first < 0 or count <= 0 or first + count > frame_count:
            return Dropped(reason=DropReason.MALFORMED_METADATA, detail=f"range {item!r} outside {frame_count} frames")
        parsed.append((first, count))
    parity: list[tuple[int, int]] = []
    entries = fields.get("parity", [])
    if block_count is not None and entries:
        if not isinstance(entries, list):
            return Dropped(reason=DropReason.MALFORMED_METADATA, detail="repair request 'parity' is not a list")
        for item in entries:
            if not (isinstance(item, list) and len(item) in (2, 3) and all(type(v) is int for v in item)):
                return Dropped(reason=DropReason.MALFORMED_METADATA, detail=f"bad parity entry {item!r}")
            block, count = item[0], item[1]
            if not 0 <= block < block_count or not 1 <= count <= MAX_PARITY_COUNT:
                return Dropped(reason=DropReason.MALFORMED_METADATA,
                               detail=f"parity entry {item!r} outside {block_count} blocks or 1..{MAX_PARITY_COUNT} symbols")
            if len(item) == 3 and not 0 <= item[2] <= ESI_LIMIT:
                return Dropped(reason=DropReason.MALFORMED_METADATA, detail=f"parity entry {item!r}: seen outside 0..{ESI_LIMIT}")
            parity.append(tuple(item))
    round_trip = fields.get("rtt")
    if round_trip is not None and not (type(round_trip) is int and 0 <= round_trip <= MAX_ROUND_TRIP_MS):
        return Dropped(reason=DropReason.MALFORMED_METADATA, detail=f"repair request 'rtt' {round_trip!r} is not 0..{MAX_ROUND_TRIP_MS} ms")
    return RepairRequest(ranges=tuple(parsed), parity=tuple(parity), round_trip=None if round_trip is None else round_trip / 1000)


class RepairPlanner:
    """Receiver side: decides when to ask for which lost frames.

    Feed it every carousel frame index (`observe_carousel`, not repair frames) and call `poll(now, jitter)`
    regularly; it returns a `RepairRequest` when there is something to ask for. `received` is the assembly's
    bitarray of held frames (read, never written).

    A frame is *passed* when the carousel went past it since this receiver joined: from the first frame it saw
    (the join point) to the latest one, cyclically; after a whole loop everything is passed. Only passed frames,
    more than `REORDER_MARGIN` behind the position, not asked for in the last `REREQUEST_AFTER` seconds, are
    asked for.

    With ``fec=True`` (the stream's metadata says ``"fec": "raptorq"``: `Assembly.fec`) it asks for parity
    instead, per block: ``count`` = the block's frames it would ask for (the rules above) less the parity
    held for the block (`parity_held`, the assembly's array) that is not already answering an earlier
    request of this block, grown by the share the answer is likely to lose (`loss`, `LOSS_WEIGHT`), plus
    `PARITY_MARGIN`; those frames then count as asked for, so they are not counted again before
    `rerequest_after` (`REREQUEST_AFTER`, longer once parity requests are timed: `REREQUEST_AFTER_LIMIT`).
    A request still in flight is thus not asked twice, and parity that came beyond what was asked (the
    sender sends the most any receiver needs) stands in for frames lost since. With
    `parity_seen` (the assembly's array: per block, one past the highest ESI that arrived) each entry also
    says what this receiver has seen, ``(block, count, seen)``, for the sender's merging (`RepairQueue`).

    `parity_room`: how many parity symbols the assembly still has room for (`Assembly.parity_room`). Symbols
    beyond it are dropped on arrival, so a request never asks for more than that; the blocks past it are
    asked for as frames. It binds only for a receiver that lost dozens of blocks
    wholesale (an unpaced sender outrunning it): asked as parity, their symbols filled the memory with blocks
    none of which could be decoded, and every further symbol was dropped and asked for again.
    """

    def __init__(self, *, layout: Layout, received: bitarray, interval: float = REQUEST_INTERVAL, rerequest_after: float = REREQUEST_AFTER,
                 parity_held: array | None = None, fec: bool = False, parity_refused: bitarray | None = None,
                 parity_seen: array | None = None, parity_room: Callable[[], int] | None = None) -> None:
        if fec and parity_held is None:
            raise ValueError("a parity planner needs the assembly's parity_held")
        self.layout = layout
        self.received = received
        self.interval = interval
        self.rerequest_after = rerequest_after
        """Seconds before frames asked for are asked for again: adapted to the round trips measured (parity
        streams, `REREQUEST_AFTER_LIMIT`), never below the value given."""
        self._rerequest_floor = rerequest_after
        self.loss = 0.0
        """Share of frames lost in the blocks asked for parity (`LOSS_WEIGHT`): requests add as many symbols
        again as the answer is likely to lose."""
        self.round_trip: float | None = None
        """Smoothed round trip of parity requests (seconds), once one was measured."""
        self._round_trip_deviation = 0.0
        # Parity asked per block, while unanswered: (symbols seen when asked, when, asked again since).
        self._parity_asks: dict[int, tuple[int, float, bool]] = {}
        self.fec = fec
        self.parity_held = parity_held
        self.parity_refused = parity_refused
        """The assembly's blocks that take no parity for now (`Assembly.parity_refused`): asked for as frames."""
        self.parity_seen = parity_seen
        self.parity_room = parity_room
        self._frames_until = float("-inf")
        self.requests_sent = 0
        self.frames_requested = 0
        self.parity_requested = 0
        self.steps_back = 0
        """Times the carousel's position went back from the middle of the image (`observe_carousel`)."""
        self.last_step_back: tuple[int, int] | None = None
        """``(from frame, to frame)`` of the latest of those."""
        self._join: int | None = None
        self._head = 0
        self._behind = False  # the latest frames observed were behind `_head` (a step back not yet made up)
        self._resting = False  # the carousel said it rests, and has not moved since
        self._passed_everything = False
        self._wrapped = False
        self._next_request_at: float | None = None
        self._outstanding: list[tuple[int, int, float]] = []  # (first, count, when asked), oldest first
        self._requested = bitarray(layout.frame_count)
        self._requested.setall(0)

    def due(self, now: float) -> bool:
        """Whether `poll(now)` may send a request (its interval has passed)."""
        return self._next_request_at is not None and now >= self._next_request_at and self._join is not None

    def ask_frames_until(self, until: float) -> None:
        """On a parity stream, ask for the frames of blocks that lost a burst (`BURST_FRACTION` of their
        frames or more) rather than parity, until `until` (`poll`'s clock); the other blocks' still as parity.

        For a receiver whose own socket overflows: it loses runs of frames because it cannot keep up, and
        decoding parity (milliseconds per block) would take more of the time it lacks, so it would lose more;
        resent frames cost it nothing beyond receiving them, and for a block lost wholesale the same bandwidth
        as parity. Its scattered losses stay parity: as frames every other receiver's would be sent too."""
        self._frames_until = max(self._frames_until, until)

    @property
    def passed_everything(self) -> bool:
        """Whether the carousel went a whole loop since this receiver joined (every frame has been sent once)."""
        return self._passed_everything

    def observe_rest(self) -> None:
        """The carousel rests (a metadata frame from its port said ``"rest": true``, docs/PROTOCOL.md 7): it
        has passed everything, and no frame of it is still on its way (the rest frame left after the last),
        so every frame this receiver lacks is asked for, those just behind the position too."""
        self._passed_everything = self._resting = True
        if self._join is None:  # joined while it rested (a receiver without a lease): nothing is coming either
            self._join = self._head = 0

    def observe_carousel(self, frame: int) -> None:
        """The carousel sent `frame` (a data frame from the carousel's source port)."""
        self._resting = False
        if self._join is None:
            self._join = self._head = frame
            return
        if frame < self._head:
            if self._head - frame <= REORDERED_STEP_BACK and frame >= REORDERED_STEP_BACK:
                # A step back of a few frames is reordering on the way (a late GRO batch: the test bed saw 39
                # frames), not a wrap. Only a step back to the image's first frames can be a wrap (in a small
                # image, any step back).
                return
            if not self._at_loop_end(self._head):
                # A step back from the middle of the image: datagrams reordered by more than a few batches,
                # or a sender that restarted its loop (a server restart). Either way, what the carousel passed
                # is still passed, and the position stays until the carousel is past it again. Frames lost
                # between here and there are asked for now; after a restart the carousel would bring them
                # again soon, so a few may come twice. Taking the step for a new join point instead would
                # make every frame lost before it wait a whole loop, whichever it was.
                if not self._behind:  # counted once, not for every frame until it is past the position again
                    self._behind = True
                    self.steps_back += 1
                    self.last_step_back = (self._head, frame)
                return
            # The carousel wrapped to the image's start (it only goes forward otherwise).
            if self._wrapped:
                self._passed_everything = True
            self._wrapped = True
        elif self._wrapped and frame >= self._join:
            self._passed_everything = True
        self._head = frame
        self._behind = False

    def _at_loop_end(self, head: int) -> bool:
        """Whether `head` was the last frame of a loop rather than a point the carousel stepped back from.

        Near the image's end (the last 1%, at least the reorder margin) it is a loop end: a burst lost across
        the end of a loop must not hide the wrap (the scale model caught a missed wrap costing a whole loop).
        Elsewhere, it is a loop end only when all after it is held but a few frames: the image ends in zero
        blocks (held from the start).
        """
        total = len(self.received)
        if total - head - 1 <= max(REORDER_MARGIN, total // 100):
            return True
        return self.received.count(0, head + 1) <= REORDER_MARGIN

    def poll(self, now: float, *, jitter: float) -> RepairRequest | None:
        """What to ask for now, if anything. `jitter` is a random draw in [0, 1) from the caller."""
        if self._next_request_at is None:
            self._next_request_at = now + self.interval * (1 + REQUEST_JITTER * jitter)
            return None
        if not self.due(now):
            return None
        self._next_request_at = now + self.interval * (1 + REQUEST_JITTER * jitter)
        if self._parity_asks:
            self._time_round_trips(now)
        self._expire_requests(now)
        wanted = self._wanted_frames()
        if self.fec:
            return self._ask_parity(wanted, now, bursts_as_frames=now < self._frames_until)
        ranges: list[tuple[int, int]] = []
        for value, start, stop in intervals(wanted):
            if value:
                ranges.append((start, stop - start))
                if len(ranges) == MAX_RANGES_PER_POLL:
                    break
        if not ranges:
            return None
        for first, count in ranges:
            self._requested[first : first + count] = 1
            self._outstanding.append((first, count, now))
        self.requests_sent += 1
        request = RepairRequest(ranges=tuple(ranges))
        self.frames_requested += request.frame_count
        return request

    def _ask_parity(self, wanted: bitarray, now: float, *, bursts_as_frames: bool = False) -> RepairRequest | None:
        """Per block with wanted frames: how many symbols to ask for (see the class docstring). With
        `bursts_as_frames`, the frames of blocks missing `BURST_FRACTION` of them or more (`ask_frames_until`)."""
        per_block = self.layout.frames_per_block
        wanted_in_block: dict[int, list[tuple[int, int]]] = {}
        for value, start, stop in intervals(wanted):
            if not value:
                continue
            while start < stop:  # cut at block boundaries
                block = start // per_block
                end = min(stop, (block + 1) * per_block)
                wanted_in_block.setdefault(block, []).append((start, end))
                start = end
        parity: list[tuple[int, int]] = []
        ranges: list[tuple[int, int]] = []
        held, received, requested = self.parity_held, self.received, self._requested
        refused = self.parity_refused
        budget = None if self.parity_room is None else self.parity_room()
        for block, spans in wanted_in_block.items():
            first, stop = block * per_block, min((block + 1) * per_block, len(received))
            # Its last parity-decoded copy failed its checksum, or it lost a burst: its frames, not symbols.
            as_frames = (refused is not None and refused[block]) or (
                bursts_as_frames and received.count(0, first, stop) >= BURST_FRACTION * (stop - first)
            )
            if not as_frames:
                count = sum(end - start for start, end in spans)
                if held[block]:
                    # Parity held first answers the frames of this block already asked for (still missing).
                    answering = (requested[first:stop] & ~received[first:stop]).count()
                    count -= max(0, held[block] - answering)
                if count <= 0:
                    continue
                if self._passed_everything or stop <= self._head - REORDER_MARGIN:  # lost, not still to come
                    lost = received.count(0, first, stop) / (stop - first)
                    if lost < BURST_FRACTION:
                        self.loss += (lost - self.loss) * LOSS_WEIGHT
                count = int(count / (1 - self.loss) + 0.5) + PARITY_MARGIN  # the nearest: never less than asked
                if budget is not None:
                    as_frames = count > budget  # more than the assembly could keep: frames instead
                    if not as_frames:
                        budget -= count
            if as_frames:
                for start, end in spans:
                    ranges.append((start, end - start))
                    requested[start:end] = 1
                    self._outstanding.append((start, end - start, now))
                if len(parity) + len(ranges) >= MAX_RANGES_PER_POLL:
                    break
                continue
            if self.parity_seen is None:
                parity.append((block, count))
            else:
                seen = self.parity_seen[block]
                parity.append((block, count, seen))
                self._parity_asks[block] = (seen, now, block in self._parity_asks)
            for start, end in spans:
                requested[start:end] = 1
                self._outstanding.append((start, end - start, now))
            if len(parity) + len(ranges) >= MAX_RANGES_PER_POLL:
                break
        if not parity and not ranges:
            return None
        self.requests_sent += 1
        request = RepairRequest(ranges=tuple(ranges), parity=tuple(parity), round_trip=self.round_trip)
        self.frames_requested += request.frame_count
        self.parity_requested += request.parity_count
        return request

    def _wanted_frames(self) -> bitarray:
        wanted = ~self.received
        wanted &= ~self._requested
        if not self._passed_everything:
            passed = bitarray(len(wanted))
            passed.setall(0)
            start, head = self._join, max(self._head - REORDER_MARGIN, -1)
            if not self._wrapped:
                if head >= start:
                    passed[start : head + 1] = 1
            else:
                passed[start:] = 1
                if head >= 0:
                    passed[: head + 1] = 1
            wanted &= passed
        elif not self._resting:
            # Everything was passed, but frames just behind the position may still be on their way.
            low = max(self._head - REORDER_MARGIN + 1, 0)
            wanted[low : self._head + 1] = 0
        return wanted

    def _time_round_trips(self, now: float) -> None:
        """Time the parity requests answered since the last poll (a symbol of the block the receiver had not
        seen when it asked), and adapt `rerequest_after`. Measured at polls, so each round trip is rounded up
        to the next one (0.1-0.15 s apart): that errs towards waiting, never towards asking twice."""
        seen = self.parity_seen
        answered = [block for block, (seen_then, _, _) in self._parity_asks.items() if seen[block] > seen_then]
        for block in answered:
            _, asked_at, asked_again = self._parity_asks.pop(block)
            if asked_again:
                continue  # which request was answered is unknown (Karn's rule)
            sample = now - asked_at
            if self.round_trip is None:
                self.round_trip, self._round_trip_deviation = sample, sample / 2
            else:
                self._round_trip_deviation += (abs(sample - self.round_trip) - self._round_trip_deviation) / 4
                self.round_trip += (sample - self.round_trip) / 8
            timeout = self.round_trip + 4 * self._round_trip_deviation
            self.rerequest_after = min(max(timeout, self._rerequest_floor), max(REREQUEST_AFTER_LIMIT, self._rerequest_floor))
        # Asks never answered (their symbols lost, or the block completed by frames) are forgotten after a while.
        stale = [block for block, (_, asked_at, _) in self._parity_asks.items() if now - asked_at > 2 * REREQUEST_AFTER_LIMIT]
        for block in stale:
            del self._parity_asks[block]

    def _expire_requests(self, now: float) -> None:
        while self._outstanding and now - self._outstanding[0][2] >= self.rerequest_after:
            first, count, _ = self._outstanding.pop(0)
            self._requested[first : first + count] = 0


class RepairQueue:
    """Sender side: the union of every receiver's requests, served in frame order ahead of the carousel.

    One bit per frame: a frame requested by any number of receivers is sent once. When the carousel itself
    sends a requested frame, the request is satisfied too. The carousel asks it about every frame it sends,
    so the empty case costs one comparison.

    With ``fec=True`` it also keeps, per block, the number of parity symbols still to send: the *largest*
    count any receiver asked for (``need[b] = max(need[b], count)``, not a sum: each symbol serves every
    receiver), capped at the block's frames. A request whose receiver has not seen the block's latest symbols
    (``seen`` below the next ESI) coming within `PARITY_IN_FLIGHT` (or the round trip the request says, up to
    `REREQUEST_AFTER_LIMIT`) of their sending (`pop_parity`'s `now`, or `parity_left`'s for symbols that
    waited for the parity workers) crossed them: they count toward its count (``need = max(need, max(seen, K) + count - next ESI)``).
    `pop_parity` hands them out one block after another (a burst of loss then hits many blocks once rather
    than one block many times), each with the block's next fresh ESI,
    starting at K and never reused, so every parity frame is new to every receiver. When the carousel starts
    sending a block again, that block's need is dropped: the carousel brings its frames anyway. Without
    ``fec``, parity entries in requests are ignored (counted in `parity_ignored`).
    Memory: one bit per frame; with fec, 8 bytes and one bit per block.
    """

    def __init__(self, *, layout: Layout, fec: bool = False) -> None:
        self.layout = layout
        self.fec = fec
        self._pending = bitarray(layout.frame_count)
        self._pending.setall(0)
        self._pending_count = 0
        self._cursor = 0
        self.requests_received = 0
        self.frames_requested = 0
        self.parity_requested = 0
        self.parity_ignored = 0
        blocks = layout.block_count if fec else 0
        self._parity_need = array("I", bytes(4 * blocks))
        self._next_esi = array("I", (layout.frames_in_block(block) for block in range(blocks)))
        self._parity_blocks = bitarray(blocks)  # set where need > 0
        self._parity_blocks.setall(0)
        self._parity_pending = 0  # sum of need
        self._parity_cursor = 0
        self._parity_sent_at = array("d", [-PARITY_IN_FLIGHT] * blocks)  # when the block's last symbol was handed out

    def add(self, request: RepairRequest, now: float | None = None) -> None:
        """Merge a request. `now`: when it came, on `pop_parity`'s clock; None: symbols a receiver has not
        seen count as lost (nothing is then merged with symbols in flight)."""
        self.requests_received += 1
        for first, count in request.ranges:
            self.frames_requested += count
            already = self._pending.count(1, first, first + count)
            self._pending[first : first + count] = 1
            self._pending_count += count - already
        in_flight = PARITY_IN_FLIGHT
        if request.round_trip is not None:
            in_flight = min(max(in_flight, request.round_trip), REREQUEST_AFTER_LIMIT)
        for entry in request.parity:
            block, count = entry[0], entry[1]
            self.parity_requested += count
            if not self.fec or not 0 <= block < len(self._parity_need):
                self.parity_ignored += count
                continue
            frames_in_block, next_esi = self.layout.frames_in_block(block), self._next_esi[block]
            count = min(count, frames_in_block, ESI_LIMIT - next_esi)
            if len(entry) > 2 and entry[2] < next_esi and now is not None and now - self._parity_sent_at[block] < in_flight:
                count = max(entry[2], frames_in_block) + count - next_esi  # those on their way count
            need = self._parity_need[block]
            if count > need:
                self._parity_need[block] = count
                self._parity_pending += count - need
                self._parity_blocks[block] = 1

    @property
    def parity_pending(self) -> int:
        """Parity symbols still to send, over all blocks."""
        return self._parity_pending

    def parity_need(self, block: int) -> int:
        """Parity symbols of `block` still to send."""
        return self._parity_need[block] if self.fec else 0

    def parity_left(self, block: int, now: float) -> None:
        """Symbols of `block` handed out earlier (`pop_parity`) left only now: they waited for the server's
        parity workers. Their time in flight (`PARITY_IN_FLIGHT`) counts from now: from the hand-out, a request
        crossing them on their way would count them lost and have them made and sent again, and on a server
        short of CPU (workers behind) that fed itself: the bed at 5% loss sent 2.2x the parity, 3,155 jobs
        for 1,024 blocks."""
        if self.fec and 0 <= block < len(self._parity_sent_at) and now > self._parity_sent_at[block]:
            self._parity_sent_at[block] = now

    def block_started_by_carousel(self, block: int) -> None:
        """The carousel sends the first frame of `block` again: its frames come anyway, drop its parity need."""
        need = self._parity_need[block] if self._parity_pending else 0
        if need:
            self._parity_need[block] = 0
            self._parity_pending -= need
            self._parity_blocks[block] = 0

    def pop_parity(self, now: float | None = None) -> tuple[int, int] | None:
        """The next parity symbol to send as ``(block, esi)``, blocks in turn from the last one; or None.
        `now`: when it leaves (see `add`)."""
        if not self._parity_pending:
            return None
        blocks = self._parity_blocks
        try:
            block = blocks.index(1, self._parity_cursor)
        except ValueError:
            block = blocks.index(1)
        esi = self._next_esi[block]
        self._next_esi[block] = esi + 1
        if now is not None:
            self._parity_sent_at[block] = now
        need = self._parity_need[block] - 1
        if esi + 1 >= ESI_LIMIT:  # ids exhausted (2**24 - K symbols sent for one block): the carousel must do
            self._parity_pending -= need
            need = 0
        self._parity_need[block] = need
        self._parity_pending -= 1
        if not need:
            blocks[block] = 0
        self._parity_cursor = block + 1 if block + 1 < len(blocks) else 0
        return block, esi

    def sent_by_carousel(self, frame: int) -> None:
        if self._pending_count and self._pending[frame]:
            self._pending[frame] = 0
            self._pending_count -= 1

    @property
    def pending(self) -> int:
        return self._pending_count

    def pop(self) -> int | None:
        """The next requested frame to send (in frame order from the last one), or None."""
        if not self._pending_count:
            return None
        try:
            frame = self._pending.index(1, self._cursor)
        except ValueError:
            frame = self._pending.index(1)
        self._pending[frame] = 0
        self._pending_count -= 1
        self._cursor = frame + 1
        return frame


def request_fits(request: RepairRequest, cookie: bytes) -> bool:
    """Whether the encoded request stays under the metadata payload limit (tests use this)."""
    return len(encode_repair_request(cookie, request)) - HEADER_SIZE <= METADATA_PAYLOAD_LIMIT and len(cookie) == COOKIE_SIZE
