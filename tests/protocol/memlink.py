"""An in-memory link between a `Carousel` and `Assembly` receivers, with explicit time and chosen loss.

Writes go to a bytearray per receiver, so tests can corrupt "the disk" and check what was written. Parity
frames are made with real RaptorQ symbols (`ParitySource`) and recovered blocks are decoded for real.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from vmcast.protocol import (
    Assembly,
    AssemblyState,
    BlockCorrupt,
    BlockRecovered,
    Carousel,
    DataReceived,
    Idle,
    Manifest,
    MetadataReceived,
    ParityEncoder,
    ParityReceived,
    RepairPlanner,
    SendMetadata,
    SendParity,
)


class MemoryReceiver:
    """Drives an `Assembly` the way the real receiver does, with a bytearray as its disk."""

    def __init__(self, *, cookie: bytes, assembly: Assembly | None = None, disk: bytearray | None = None) -> None:
        self.assembly = assembly or Assembly(cookie=cookie)
        self.disk = disk if disk is not None else bytearray()
        self.corrupt_blocks_seen: list[int] = []
        self.recovered_blocks: list[int] = []
        self.failed_recoveries = 0
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
            layout = self.assembly.layout
            for block in event.zero_blocks:  # what the target's zero_range does (the disk may hold old bytes)
                start, end = layout.block_span(block)
                self.disk[start:end] = bytes(end - start)
            for first, count in event.zero_frames:  # before the blocks they complete are checked
                start, end = first * layout.frame_size, min((first + count) * layout.frame_size, layout.length)
                self.disk[start:end] = bytes(end - start)
            ready = event.blocks_to_check
            for block in event.blocks_to_recover:
                ready += self._recover(block)
        elif isinstance(event, DataReceived):
            payload = bytes(event.payload)
            if damage_write is not None:
                payload = damage_write(event.offset, payload)
            self.disk[event.offset : event.offset + len(payload)] = payload
            ready = () if event.completed_block is None else (event.completed_block,)
            if event.decodable_block is not None:
                ready = self._recover(event.decodable_block)
        elif isinstance(event, ParityReceived) and event.decodable:
            ready = self._recover(event.block)
        self._check(ready)
        if self.assembly.state is AssemblyState.VERIFYING_IMAGE:
            self.image_checks += 1
            self.assembly.check_image(hashlib.sha1(self.disk).hexdigest())

    def _recover(self, block: int) -> tuple[int, ...]:
        """Decode a block from what is on the disk and the parity held; write the frames it gives back."""
        start, end = self.assembly.layout.block_span(block)
        result = self.assembly.recover_block(block, self.disk[start:end])
        if not isinstance(result, BlockRecovered):
            self.failed_recoveries += 1
            return ()
        self.recovered_blocks.append(block)
        for offset, data in result.frames:
            self.disk[offset : offset + len(data)] = data
        return (block,) if result.checksum_known else ()

    def _check(self, blocks: tuple[int, ...]) -> None:
        for block in blocks:
            start, end = self.assembly.layout.block_span(block)
            result = self.assembly.check_block(block, self.disk[start:end])
            if isinstance(result, BlockCorrupt):
                self.corrupt_blocks_seen.append(block)


class ParitySource:
    """What a sender does for `SendParity`: an encoder per block (made on first use), real RaptorQ symbols."""

    def __init__(self, manifest: Manifest, image: bytes) -> None:
        self.layout, self.image = manifest.layout, image
        self._encoders: dict[int, ParityEncoder] = {}

    def payload(self, action: SendParity) -> bytes:
        encoder = self._encoders.get(action.block)
        if encoder is None:
            start, end = self.layout.block_span(action.block)
            encoder = self._encoders[action.block] = ParityEncoder(self.image[start:end], frame_size=self.layout.frame_size)
        return encoder.symbols(action.esi, 1)[0]


def datagrams(carousel: Carousel, image: bytes, now: float, parity: ParitySource | None = None) -> list[bytes]:
    """The datagrams of the carousel's next action."""
    return [datagram for datagram, _ in tagged_datagrams(carousel, image, now, parity)]


def tagged_datagrams(carousel: Carousel, image: bytes, now: float, parity: ParitySource | None = None) -> list[tuple[bytes, int | None]]:
    """The datagrams of the carousel's next action, each with the carousel frame it is (None: metadata or repair)."""
    action = carousel.next_send(now)
    if isinstance(action, SendMetadata):
        return [(d, None) for d in action.datagrams]
    if isinstance(action, Idle):
        return []
    if isinstance(action, SendParity):
        parity = parity or ParitySource(carousel.manifest, image)
        return [(action.header + parity.payload(action), None)]
    frame = None if action.repair else action.offset // carousel.layout.frame_size
    return [(action.header + image[action.offset : action.offset + action.length], frame)]


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


def run_with_repair(
    carousel: Carousel,
    image: bytes,
    receivers: list[MemoryReceiver],
    *,
    loss: float,
    rng: random.Random,
    fec: bool,
    max_seconds: float = 10.0,
    tick: float = 1e-4,
    interval: float = 0.01,
    rerequest_after: float = 0.05,
) -> float:
    """Run the link with repair requests (lost like datagrams, delivered at once) until every receiver is
    complete; return simulated seconds. `fec`: receivers whose stream takes parity ask for parity."""
    parity = ParitySource(carousel.manifest, image)
    planners: list[RepairPlanner | None] = [None] * len(receivers)
    now = 0.0
    while not all(r.complete for r in receivers):
        if now >= max_seconds:
            raise AssertionError(f"not complete after {max_seconds} s: {[r.assembly.state for r in receivers]}")
        for datagram, frame in tagged_datagrams(carousel, image, now, parity):
            for index, receiver in enumerate(receivers):
                if receiver.complete or rng.random() < loss:
                    continue
                receiver.feed(datagram)
                assembly = receiver.assembly
                if planners[index] is None and assembly.layout is not None:
                    planners[index] = RepairPlanner(layout=assembly.layout, received=assembly.held_frames, interval=interval,
                                                    rerequest_after=rerequest_after, parity_held=assembly.parity_held,
                                                    fec=fec and assembly.fec)
                if planners[index] is not None and frame is not None:
                    planners[index].observe_carousel(frame)
        for planner, receiver in zip(planners, receivers):
            if planner is not None and not receiver.complete:
                request = planner.poll(now, jitter=rng.random())
                if request is not None and rng.random() >= loss:
                    carousel.request_repair(request)
        now += tick
    return now
