"""The sender's schedule: what goes on the wire next. Sans-IO: the caller reads the image, paces and sends.

A carousel loops over the image's frames forever, in order, so a receiver that joins at any moment has
everything after one loop. Metadata goes out at the start of every loop and again whenever
`METADATA_INTERVAL` seconds have passed, so a late joiner waits at most that long to learn the image.
"""

from __future__ import annotations

from dataclasses import dataclass

from .frames import encode_header, encode_metadata, METADATA_OFFSET
from .metadata import METADATA_PAYLOAD_LIMIT, Manifest

# How often metadata is repeated within a loop. A receiver drops data until it has metadata, so this bounds
# what a late joiner throws away (at 1 Gbit/s, one second is 119 MB it will take on the next loop instead).
METADATA_INTERVAL = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SendData:
    """Send the image bytes ``[offset, offset + length)`` behind `header`."""

    header: bytes
    offset: int
    length: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Idle:
    """Nothing to send before `until` (an empty image has only metadata to repeat)."""

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
        self._next_frame = 0
        self._metadata_due_at: float | None = None  # None: due now (start of the first loop)

    def next_send(self, now: float) -> SendData | SendMetadata | Idle:
        if self._metadata_due_at is None or now >= self._metadata_due_at:
            self._metadata_due_at = now + self.metadata_interval
            return SendMetadata(datagrams=self.metadata_datagrams)
        frame_count = self.layout.frame_count
        if frame_count == 0:
            # An empty image is all metadata: each metadata round is a whole loop, and between rounds there is
            # nothing to send (sending metadata back to back would flood the group).
            self.loops_completed += 1
            return Idle(until=self._metadata_due_at)
        frame = self._next_frame
        offset = frame * self.layout.frame_size
        length = min(self.layout.frame_size, self.layout.length - offset)
        self._next_frame += 1
        self.data_frames_sent += 1
        if self._next_frame == frame_count:
            self._next_frame = 0
            self.loops_completed += 1
            self._metadata_due_at = None  # every loop starts with metadata
        return SendData(header=encode_header(self.cookie, offset), offset=offset, length=length)
