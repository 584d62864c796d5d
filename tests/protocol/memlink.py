"""An in-memory link between a `Carousel` and `Assembly` receivers, with explicit time and chosen loss.

Writes go to a bytearray per receiver, so tests can corrupt "the disk" and check what was written.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from vmcast.protocol import (
    Assembly,
    AssemblyState,
    BlockCorrupt,
    Carousel,
    DataReceived,
    Idle,
    MetadataReceived,
    SendMetadata,
)


class MemoryReceiver:
    """Drives an `Assembly` the way the real receiver does, with a bytearray as its disk."""

    def __init__(self, *, cookie: bytes, assembly: Assembly | None = None, disk: bytearray | None = None) -> None:
        self.assembly = assembly or Assembly(cookie=cookie)
        self.disk = disk if disk is not None else bytearray()
        self.corrupt_blocks_seen: list[int] = []
        self.image_checks = 0

    @property
    def complete(self) -> bool:
        return self.assembly.state is AssemblyState.COMPLETE

    def feed(self, datagram: bytes, *, damage_write: Callable[[int, bytes], bytes] | None = None) -> None:
        event = self.assembly.receive_datagram(datagram)
        ready: tuple[int, ...] = ()
        if isinstance(event, MetadataReceived):
            if event.first_metadata and len(self.disk) < event.metadata.length:
                self.disk.extend(bytes(event.metadata.length - len(self.disk)))
            ready = event.blocks_to_check
        elif isinstance(event, DataReceived):
            payload = bytes(event.payload)
            if damage_write is not None:
                payload = damage_write(event.offset, payload)
            self.disk[event.offset : event.offset + len(payload)] = payload
            ready = () if event.completed_block is None else (event.completed_block,)
        self._check(ready)
        if self.assembly.state is AssemblyState.VERIFYING_IMAGE:
            self.image_checks += 1
            self.assembly.check_image(hashlib.sha1(self.disk).hexdigest())

    def _check(self, blocks: tuple[int, ...]) -> None:
        for block in blocks:
            start, end = self.assembly.layout.block_span(block)
            result = self.assembly.check_block(block, self.disk[start:end])
            if isinstance(result, BlockCorrupt):
                self.corrupt_blocks_seen.append(block)


def datagrams(carousel: Carousel, image: bytes, now: float) -> list[bytes]:
    """The datagrams of the carousel's next action."""
    action = carousel.next_send(now)
    if isinstance(action, SendMetadata):
        return list(action.datagrams)
    if isinstance(action, Idle):
        return []
    return [action.header + image[action.offset : action.offset + action.length]]


def run_until_complete(
    carousel: Carousel,
    image: bytes,
    receivers: list[MemoryReceiver],
    *,
    loss: float = 0.0,
    rng: random.Random | None = None,
    max_loops: int = 20,
    tick: float = 1e-4,
) -> float:
    """Run the link until every receiver is complete; return simulated seconds. Fails after `max_loops`."""
    rng = rng or random.Random(0)
    now = 0.0
    while not all(r.complete for r in receivers):
        if carousel.loops_completed >= max_loops:
            raise AssertionError(f"not complete after {max_loops} loops: {[r.assembly.state for r in receivers]}")
        for datagram in datagrams(carousel, image, now):
            for receiver in receivers:
                if not receiver.complete and (loss == 0.0 or rng.random() >= loss):
                    receiver.feed(datagram)
        now += tick
    return now
