"""The receiver state machine: order, duplicates, late join, corruption, conflicts, resume."""

import hashlib
import os
import random

import pytest

from vmcast.protocol import (
    Assembly,
    AssemblyState,
    BlockCorrupt,
    Carousel,
    DataReceived,
    Dropped,
    DropReason,
    Duplicate,
    LocalProtocolError,
    MetadataConflict,
    StreamFailed,
    encode_data,
    encode_metadata,
    manifest_of,
)

from .memlink import MemoryReceiver, datagrams, run_until_complete

COOKIE = b"cookie!!"
FRAME = 1000


def image_of(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def all_datagrams(image: bytes, *, block_size: int | None = 4000, minimal: bool = False) -> tuple[list[bytes], list[bytes]]:
    """(metadata datagrams, data datagrams) of one loop."""
    manifest = manifest_of(image, frame_size=FRAME, block_size=block_size)
    if minimal:
        metadata = [encode_metadata(COOKIE, {"sha1": manifest.sha1, "len": len(image)})]
    else:
        metadata = [encode_metadata(COOKIE, f) for f in manifest.metadata_frames()]
    data = [encode_data(COOKIE, o, image[o : o + FRAME]) for o in range(0, len(image), FRAME)]
    return metadata, data


@pytest.mark.parametrize("minimal", [False, True], ids=["with-block-checksums", "sha1-and-len-only"])
@pytest.mark.parametrize("seed", range(5))
def test_frames_in_any_order_with_duplicates_assemble_the_exact_image(minimal, seed):
    image = image_of(23_456, seed)
    metadata, data = all_datagrams(image, minimal=minimal)
    rng = random.Random(seed)
    shuffled = data + rng.sample(data, 10)
    rng.shuffle(shuffled)
    receiver = MemoryReceiver(cookie=COOKIE)
    for datagram in metadata + shuffled:
        receiver.feed(datagram)
    assert receiver.complete
    assert bytes(receiver.disk) == image


def test_a_frame_already_held_is_a_duplicate_with_nothing_to_write():
    image = image_of(5000)
    metadata, data = all_datagrams(image)
    assembly = Assembly(cookie=COOKIE)
    assembly.receive_datagram(metadata[0])
    assert isinstance(assembly.receive_datagram(data[1]), DataReceived)
    assert isinstance(assembly.receive_datagram(data[1]), Duplicate)
    assert assembly.duplicates == 1


def test_data_before_metadata_is_dropped_and_counted():
    image = image_of(5000)
    metadata, data = all_datagrams(image)
    assembly = Assembly(cookie=COOKIE)
    result = assembly.receive_datagram(data[0])
    assert isinstance(result, Dropped) and result.reason is DropReason.BEFORE_METADATA
    assert assembly.drops[DropReason.BEFORE_METADATA] == 1


@pytest.mark.parametrize(
    ("offset", "payload", "reason"),
    [
        (4500, b"x" * 1000, DropReason.PAST_END),
        (5000, b"x", DropReason.PAST_END),
        (500, b"x" * 1000, DropReason.MISALIGNED),
        (1000, b"x" * 999, DropReason.MISALIGNED),
        (1000, b"", DropReason.EMPTY_PAYLOAD),
    ],
)
def test_data_frames_that_break_the_layout_are_dropped_with_a_reason(offset, payload, reason):
    metadata, _ = all_datagrams(image_of(5000))
    assembly = Assembly(cookie=COOKIE)
    assembly.receive_datagram(metadata[0])
    result = assembly.receive_datagram(encode_data(COOKIE, offset, payload))
    assert isinstance(result, Dropped) and result.reason is reason
    assert assembly.received_bytes == 0


def test_a_receiver_joining_mid_loop_completes_within_two_loops():
    image = image_of(200_000)
    manifest = manifest_of(image, frame_size=FRAME, block_size=8000)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=0.01)
    for _ in range(137):  # the receiver joins here, mid-loop
        datagrams(carousel, image, 0.0)
    receiver = MemoryReceiver(cookie=COOKIE)
    run_until_complete(carousel, image, [receiver], max_loops=2, tick=1e-4)
    assert bytes(receiver.disk) == image


def test_a_corrupt_write_is_detected_by_its_block_checksum_and_taken_again():
    image = image_of(40_000)
    manifest = manifest_of(image, frame_size=FRAME, block_size=4000)
    carousel = Carousel(manifest=manifest, cookie=COOKIE)
    receiver = MemoryReceiver(cookie=COOKIE)
    damaged = {5000}

    def flip_once(offset: int, payload: bytes) -> bytes:
        if offset in damaged:
            damaged.discard(offset)
            return bytes([payload[0] ^ 0xFF]) + payload[1:]
        return payload

    now = 0.0
    while not receiver.complete:
        assert carousel.loops_completed < 3
        for datagram in datagrams(carousel, image, now):
            receiver.feed(datagram, damage_write=flip_once)
        now += 1e-4
    assert receiver.corrupt_blocks_seen == [1]
    assert receiver.assembly.corrupt_blocks == 1
    assert bytes(receiver.disk) == image


def test_without_block_checksums_a_wrong_sha1_forgets_everything_and_the_next_loop_repairs_it():
    image = image_of(10_000)
    metadata, data = all_datagrams(image, minimal=True)
    receiver = MemoryReceiver(cookie=COOKIE)
    receiver.feed(metadata[0])
    for datagram in data:
        receiver.feed(datagram, damage_write=lambda off, p: p[:-1] + b"!" if off == 3000 else p)
    assert not receiver.complete
    assert receiver.image_checks == 1
    assert receiver.assembly.received_bytes == 0
    for datagram in data:
        receiver.feed(datagram)
    assert receiver.complete and bytes(receiver.disk) == image


def test_a_corrupt_image_is_never_reported_complete():
    image = image_of(10_000)
    metadata, data = all_datagrams(image)
    assembly = Assembly(cookie=COOKIE)
    assembly.receive_datagram(metadata[0])
    for datagram in data:
        event = assembly.receive_datagram(datagram)
        if isinstance(event, DataReceived) and event.completed_block is not None:
            start, end = assembly.layout.block_span(event.completed_block)
            assembly.check_block(event.completed_block, image[start:end])
    assert assembly.state is AssemblyState.VERIFYING_IMAGE
    result = assembly.check_image(hashlib.sha1(b"something else").hexdigest())
    assert assembly.state is AssemblyState.RECEIVING and result.expected != result.actual


@pytest.mark.parametrize(
    "changed",
    [{"sha1": "f" * 40}, {"len": 10_001}, {"frame": 500, "block": 4000}, {"block": 8000}],
    ids=["sha1", "len", "frame", "block"],
)
def test_metadata_contradicting_the_stream_fails_it_with_a_typed_error(changed):
    image = image_of(10_000)
    metadata, data = all_datagrams(image)
    assembly = Assembly(cookie=COOKIE)
    assembly.receive_datagram(metadata[0])
    manifest = manifest_of(image, frame_size=FRAME, block_size=4000)
    fields = dict(manifest.metadata_frames()[0], **changed)
    fields.pop("xxh3")
    result = assembly.receive_datagram(encode_metadata(COOKIE, fields))
    assert isinstance(result, StreamFailed) and isinstance(result.error, MetadataConflict)
    assert assembly.state is AssemblyState.FAILED
    after = assembly.receive_datagram(data[0])
    assert isinstance(after, Dropped) and after.reason is DropReason.STREAM_FAILED


def test_a_changed_block_checksum_fails_the_stream():
    image = image_of(10_000)
    metadata, _ = all_datagrams(image)
    fields = manifest_of(image, frame_size=FRAME, block_size=4000).metadata_frames()[0]
    fields["xxh3"]["sums"][1] = "0123456789abcdef"
    assembly = Assembly(cookie=COOKIE)
    assembly.receive_datagram(metadata[0])
    result = assembly.receive_datagram(encode_metadata(COOKIE, fields))
    assert isinstance(result, StreamFailed) and result.error.field == "xxh3[1]"


def test_a_block_completed_before_its_checksum_is_checked_when_the_checksum_arrives():
    image = image_of(10_000)
    manifest = manifest_of(image, frame_size=FRAME, block_size=4000)
    identity = {k: v for k, v in manifest.metadata_frames()[0].items() if k != "xxh3"}
    assembly = Assembly(cookie=COOKIE)
    assembly.receive_datagram(encode_metadata(COOKIE, identity))
    events = [assembly.receive_datagram(encode_data(COOKIE, o, image[o : o + FRAME])) for o in range(0, 4000, FRAME)]
    assert all(e.completed_block is None for e in events)
    later = assembly.receive_datagram(encode_metadata(COOKIE, manifest.metadata_frames()[0]))
    assert later.blocks_to_check == (0,)


def test_an_empty_image_is_complete_once_its_sha1_is_checked():
    assembly = Assembly(cookie=COOKIE)
    assembly.receive_datagram(encode_metadata(COOKIE, {"sha1": hashlib.sha1().hexdigest(), "len": 0}))
    assert assembly.state is AssemblyState.VERIFYING_IMAGE
    assembly.check_image(hashlib.sha1().hexdigest())
    assert assembly.state is AssemblyState.COMPLETE


def test_a_resumed_assembly_keeps_its_verified_blocks_and_takes_only_the_rest():
    image = image_of(40_000)
    metadata, data = all_datagrams(image)
    first = MemoryReceiver(cookie=COOKIE)
    for datagram in metadata + data[:22]:
        first.feed(datagram)
    checkpoint = first.assembly.checkpoint()
    assert first.assembly.verified_blocks == 5
    resumed = MemoryReceiver(cookie=COOKIE, assembly=Assembly(cookie=COOKIE, checkpoint=checkpoint), disk=first.disk)
    resumed.feed(metadata[0])
    assert resumed.assembly.resumed_blocks == 5
    fresh_writes = [d for d in data if isinstance(resumed.assembly.receive_datagram(d), DataReceived)]
    assert len(fresh_writes) == 40 - 20  # blocks 0-4 (frames 0-19) are not taken again


def test_a_checkpoint_of_another_image_is_ignored():
    image = image_of(40_000)
    metadata, data = all_datagrams(image)
    first = MemoryReceiver(cookie=COOKIE)
    for datagram in metadata + data:
        first.feed(datagram)
    other_metadata, _ = all_datagrams(image_of(40_000, seed=99))
    resumed = Assembly(cookie=COOKIE, checkpoint=first.assembly.checkpoint())
    resumed.receive_datagram(other_metadata[0])
    assert resumed.resumed_blocks == 0 and resumed.received_bytes == 0


def test_checking_a_block_that_is_not_complete_is_a_local_error():
    metadata, data = all_datagrams(image_of(10_000))
    assembly = Assembly(cookie=COOKIE)
    assembly.receive_datagram(metadata[0])
    assembly.receive_datagram(data[0])
    with pytest.raises(LocalProtocolError):
        assembly.check_block(0, bytes(4000))


def test_the_frame_size_of_a_minimal_sender_is_learned_from_a_frame_that_proves_it():
    image = image_of(10_500)
    metadata, data = all_datagrams(image, minimal=True)
    assembly = Assembly(cookie=COOKIE)
    assembly.receive_datagram(metadata[0])
    tail = assembly.receive_datagram(data[-1])  # short last frame: proves nothing
    assert isinstance(tail, Dropped) and tail.reason is DropReason.BEFORE_METADATA
    assert isinstance(assembly.receive_datagram(data[3]), DataReceived)
    assert assembly.layout.frame_size == FRAME


def test_a_frame_past_the_end_cannot_teach_a_wrong_frame_size():
    image = image_of(10_500)
    metadata, data = all_datagrams(image, minimal=True)
    assembly = Assembly(cookie=COOKIE)
    assembly.receive_datagram(metadata[0])
    result = assembly.receive_datagram(encode_data(COOKIE, 0, bytes(20_000)))
    assert isinstance(result, Dropped) and result.reason is DropReason.PAST_END
    assert assembly.layout is None
    assert isinstance(assembly.receive_datagram(data[0]), DataReceived)
    assert assembly.layout.frame_size == FRAME


def test_a_block_fetched_out_of_band_completes_the_image_alongside_multicast():
    from vmcast.protocol import BlockVerified

    image = image_of(12_000)
    metadata, data = all_datagrams(image)
    receiver = MemoryReceiver(cookie=COOKIE)
    for datagram in metadata + data[:4] + data[9:10]:  # block 0 by multicast, one frame of block 2
        receiver.feed(datagram)
    for block in (1, 2):
        start, end = receiver.assembly.layout.block_span(block)
        receiver.disk[start:end] = image[start:end]
        result = receiver.assembly.accept_block(block, receiver.disk[start:end])
        assert isinstance(result, BlockVerified)
    assert result.image_complete
    assert receiver.assembly.received_bytes == len(image)
    receiver.assembly.check_image(hashlib.sha1(receiver.disk).hexdigest())
    assert receiver.complete


def test_a_corrupt_block_fetched_out_of_band_is_refused_by_its_checksum():
    image = image_of(12_000)
    metadata, _ = all_datagrams(image)
    assembly = Assembly(cookie=COOKIE)
    assembly.receive_datagram(metadata[0])
    result = assembly.accept_block(1, b"\x00" * 4000)
    assert isinstance(result, BlockCorrupt)
    assert assembly.received_bytes == 0 and assembly.missing_blocks() == [0, 1, 2]


def test_without_checksums_an_out_of_band_block_is_accepted_and_the_sha1_decides():
    image = image_of(12_000)
    metadata, _ = all_datagrams(image, minimal=True)
    assembly = Assembly(cookie=COOKIE)
    assembly.receive_datagram(metadata[0])
    assembly.receive_datagram(encode_data(COOKIE, 0, image[:FRAME]))  # teaches the frame size
    for block in range(assembly.layout.block_count):
        start, end = assembly.layout.block_span(block)
        assembly.accept_block(block, image[start:end] if block else b"\x01" * (end - start))
    assert assembly.state is AssemblyState.VERIFYING_IMAGE
    wrong = assembly.check_image(hashlib.sha1(b"\x01" * 12_000).hexdigest())
    assert wrong.expected != wrong.actual and assembly.state is AssemblyState.RECEIVING


# -- parity (docs/PROTOCOL.md section 8) ------------------------------------------------------------------------


def feed(assembly: Assembly, disk: bytearray, datagrams: list[bytes]) -> None:
    """Feed datagrams and write what they bring (no checks)."""
    for datagram in datagrams:
        event = assembly.receive_datagram(datagram)
        if isinstance(event, DataReceived):
            disk[event.offset : event.offset + len(event.payload)] = event.payload


def parity_stream(image: bytes, *, frame_size: int = FRAME, block_size: int = 8000, fec: bool | None = None):
    """(manifest, metadata datagrams, data datagrams by frame, parity(block, esi) -> datagram)."""
    from vmcast.protocol import ParityEncoder, encode_parity_header

    manifest = manifest_of(image, frame_size=frame_size, block_size=block_size, fec=fec)
    layout = manifest.layout
    metadata = [encode_metadata(COOKIE, f) for f in manifest.metadata_frames()]
    data = [encode_data(COOKIE, o, image[o : o + frame_size]) for o in range(0, len(image), frame_size)]
    encoders = {}

    def parity(block: int, esi: int, *, symbol: bytes | None = None) -> bytes:
        if symbol is None:
            if block not in encoders:
                start, end = layout.block_span(block)
                encoders[block] = ParityEncoder(image[start:end], frame_size=frame_size)
            symbol = encoders[block].symbols(esi, 1)[0]
        return encode_parity_header(COOKIE, block=block, esi=esi) + symbol

    return manifest, metadata, data, parity


def test_a_block_missing_frames_is_recovered_from_as_many_parity_symbols_and_verified_by_its_checksum():
    from vmcast.protocol import BlockRecovered, BlockVerified, ParityReceived

    image = image_of(749 * 1400 * 2, seed=4)  # two real-size blocks of 749 frames
    manifest, metadata, data, parity = parity_stream(image, frame_size=1400, block_size=749 * 1400)
    assembly = Assembly(cookie=COOKIE)
    disk = bytearray(len(image))
    for datagram in metadata:
        assembly.receive_datagram(datagram)
    assert assembly.fec
    lost = set(random.Random(1).sample(range(749), 25))
    for frame in range(749):
        if frame not in lost:
            event = assembly.receive_datagram(data[frame])
            disk[event.offset : event.offset + len(event.payload)] = event.payload
    events = [assembly.receive_datagram(parity(0, 749 + i)) for i in range(25)]
    assert all(isinstance(e, ParityReceived) for e in events)
    assert [e.decodable for e in events] == [False] * 24 + [True]
    assert assembly.parity_held[0] == 25
    recovered = assembly.recover_block(0, disk[: 749 * 1400])
    if not isinstance(recovered, BlockRecovered):  # 1% of K-symbol decodes need one more symbol
        assembly.receive_datagram(parity(0, 749 + 25))
        recovered = assembly.recover_block(0, disk[: 749 * 1400])
    assert isinstance(recovered, BlockRecovered) and recovered.checksum_known
    assert sorted(offset // 1400 for offset, _ in recovered.frames) == sorted(lost)
    for offset, payload in recovered.frames:
        disk[offset : offset + len(payload)] = payload
    assert isinstance(assembly.check_block(0, disk[: 749 * 1400]), BlockVerified)
    assert bytes(disk[: 749 * 1400]) == image[: 749 * 1400]
    assert assembly.parity_held[0] == 0 and assembly.parity_bytes == 0  # the parity is freed


def test_wrong_parity_bytes_make_a_recovered_block_fail_its_checksum_and_it_is_never_verified():
    from vmcast.protocol import BlockRecovered

    image = image_of(16_000)
    _, metadata, data, parity = parity_stream(image)
    receiver = MemoryReceiver(cookie=COOKIE)
    for datagram in metadata + data[1:8]:  # frame 0 of block 0 lost
        receiver.feed(datagram)
    event = receiver.assembly.receive_datagram(parity(0, 8, symbol=bytes(FRAME)))  # a symbol of the wrong bytes
    assert event.decodable
    recovered = receiver.assembly.recover_block(0, receiver.disk[:8000])
    assert isinstance(recovered, BlockRecovered)
    for offset, payload in recovered.frames:
        receiver.disk[offset : offset + len(payload)] = payload
    verdict = receiver.assembly.check_block(0, receiver.disk[:8000])
    assert isinstance(verdict, BlockCorrupt)
    assert not receiver.assembly.is_verified(0)
    assert receiver.assembly.held_frames[:8].count() == 0 and receiver.assembly.parity_held[0] == 0  # all taken again
    for datagram in data:
        receiver.feed(datagram)
    assert receiver.complete and bytes(receiver.disk) == image


def test_after_a_parity_decoded_copy_fails_its_checksum_the_block_takes_no_parity_until_its_data_completes_it():
    # A symbol corrupted in flight (with a valid UDP checksum) would otherwise be used again by every new
    # decode of the block: with any rate of such corruption the block could fail forever.
    from vmcast.protocol import BlockRecovered, BlockVerified, ParityReceived, ParityUnused

    image = image_of(16_000)
    _, metadata, data, parity = parity_stream(image)
    receiver = MemoryReceiver(cookie=COOKIE)
    for datagram in metadata + data[1:8]:
        receiver.feed(datagram)
    receiver.assembly.receive_datagram(parity(0, 8, symbol=bytes(FRAME)))
    recovered = receiver.assembly.recover_block(0, receiver.disk[:8000])
    assert isinstance(recovered, BlockRecovered)
    for offset, payload in recovered.frames:
        receiver.disk[offset : offset + len(payload)] = payload
    assert isinstance(receiver.assembly.check_block(0, receiver.disk[:8000]), BlockCorrupt)
    assert receiver.assembly.parity_refused[0]
    refused = receiver.assembly.receive_datagram(parity(0, 9))
    assert isinstance(refused, ParityUnused) and refused.reason == "refused"
    assert receiver.assembly.parity_held[0] == 0
    for datagram in data[:8]:
        receiver.feed(datagram)
    assert receiver.assembly.is_verified(0) and not receiver.assembly.parity_refused[0]
    # Other blocks take parity as before.
    assert isinstance(receiver.assembly.receive_datagram(parity(1, 8)), (ParityReceived, ParityUnused))


def test_a_data_frame_that_makes_a_block_decodable_with_parity_held_says_so():
    image = image_of(16_000)
    _, metadata, data, parity = parity_stream(image)
    receiver = MemoryReceiver(cookie=COOKIE)
    for datagram in metadata + data[2:7]:  # frames 0, 1 and 7 of block 0 missing
        receiver.feed(datagram)
    assert not receiver.assembly.receive_datagram(parity(0, 8)).decodable
    assert not receiver.assembly.receive_datagram(parity(0, 9)).decodable
    event = receiver.assembly.receive_datagram(data[7])
    assert isinstance(event, DataReceived) and event.decodable_block == 0 and event.completed_block is None


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda parity: parity(2, 8, symbol=bytes(FRAME)), DropReason.MALFORMED_PARITY),  # block 2 of a 2-block image
        (lambda parity: parity(0, 7, symbol=bytes(FRAME)), DropReason.MALFORMED_PARITY),  # ESI 7 is frame 7
        (lambda parity: parity(0, 8)[:-1], DropReason.MALFORMED_PARITY),  # a symbol one byte short
        (lambda parity: parity(0, 8) + b"x", DropReason.MALFORMED_PARITY),
        (lambda parity: parity(0, 8)[:16], DropReason.EMPTY_PAYLOAD),
    ],
    ids=["no-such-block", "source-esi", "short", "long", "empty"],
)
def test_malformed_parity_is_a_counted_drop_with_a_reason(make, reason):
    image = image_of(16_000)
    _, metadata, data, parity = parity_stream(image)
    assembly = Assembly(cookie=COOKIE)
    for datagram in metadata + data[1:5]:
        assembly.receive_datagram(datagram)
    event = assembly.receive_datagram(make(parity))
    assert isinstance(event, Dropped) and event.reason is reason
    assert assembly.drops[reason] == 1 and assembly.parity_kept == 0


def test_parity_of_a_verified_or_complete_block_or_beyond_what_it_misses_plus_the_spare_is_unused():
    from vmcast.protocol import PARITY_SPARE, ParityReceived, ParityUnused

    image = image_of(24_000)
    _, metadata, data, parity = parity_stream(image)
    assembly = Assembly(cookie=COOKIE)
    disk = bytearray(len(image))
    feed(assembly, disk, metadata + data[:8] + data[9:16] + data[17:])  # block 0 whole; frames 8 and 16 lost
    assert assembly.receive_datagram(parity(0, 8)) == ParityUnused(block=0, esi=8, reason="complete")  # not checked yet
    assembly.check_block(0, disk[:8000])
    assert assembly.receive_datagram(parity(0, 9)) == ParityUnused(block=0, esi=9, reason="verified")
    events = [assembly.receive_datagram(parity(1, 8 + i)) for i in range(1 + PARITY_SPARE + 1)]
    assert [type(e) for e in events] == [ParityReceived] * (1 + PARITY_SPARE) + [ParityUnused]
    assert events[-1].reason == "enough"  # block 1 misses one frame: one symbol and the spare are kept
    assert assembly.parity_unused == 3 and assembly.parity_kept == 1 + PARITY_SPARE
    # What arrived counts as seen, used or not (the sender merges requests by it); a malformed one does not.
    assert list(assembly.parity_seen)[:2] == [10, 8 + 1 + PARITY_SPARE + 1]
    assembly.receive_datagram(parity(1, 7, symbol=bytes(FRAME)))  # ESI 7 names a source symbol: dropped
    assembly.receive_datagram(parity(1, 9))  # an older ESI arriving late leaves the highest as it is
    assert list(assembly.parity_seen)[:2] == [10, 8 + 1 + PARITY_SPARE + 1]


def test_a_duplicate_parity_symbol_is_unused():
    image = image_of(16_000)
    _, metadata, data, parity = parity_stream(image)
    assembly = Assembly(cookie=COOKIE)
    for datagram in metadata + data[3:]:
        assembly.receive_datagram(datagram)
    assert assembly.receive_datagram(parity(0, 8)).__class__.__name__ == "ParityReceived"
    assert assembly.receive_datagram(parity(0, 8)).reason == "duplicate"
    assert assembly.parity_held[0] == 1


def test_parity_memory_is_bounded_by_a_named_limit(monkeypatch):
    from vmcast.protocol import assembly as assembly_module

    monkeypatch.setattr(assembly_module, "PARITY_MEMORY_LIMIT", 3 * FRAME)
    image = image_of(40_000)  # five blocks, nothing of them held
    _, metadata, _, parity = parity_stream(image)
    assembly = Assembly(cookie=COOKIE)
    for datagram in metadata:
        assembly.receive_datagram(datagram)
    events = [assembly.receive_datagram(parity(block, 8)) for block in range(5)]
    assert [getattr(e, "reason", "kept") for e in events] == ["kept"] * 3 + ["memory"] * 2
    assert assembly.parity_bytes == 3 * FRAME


def test_a_stream_without_fec_drops_parity_as_past_the_end_like_an_old_receiver():
    image = image_of(16_000)
    _, metadata, data, parity = parity_stream(image, fec=False)
    assembly = Assembly(cookie=COOKIE)
    for datagram in metadata + data[1:]:
        assembly.receive_datagram(datagram)
    assert not assembly.fec
    event = assembly.receive_datagram(parity(0, 8))
    assert isinstance(event, Dropped) and event.reason is DropReason.PAST_END


def test_a_failed_decode_counts_one_symbol_less_so_one_more_is_asked_for():
    from vmcast.protocol import BlockRecovered, RecoveryFailed

    image = image_of(16_000)
    _, metadata, data, parity = parity_stream(image)
    assembly = Assembly(cookie=COOKIE)
    disk = bytearray(len(image))
    feed(assembly, disk, metadata + data[2:8])
    # Frames 2-7 with symbols 19 and 27 are 8 symbols for 8 frames that do not decode (found by search: RaptorQ
    # from exactly K symbols fails ~1% of the time; RFC 6330 symbols are the same on every implementation).
    assembly.receive_datagram(parity(0, 19))
    assert assembly.receive_datagram(parity(0, 27)).decodable
    assert assembly.recover_block(0, disk[:8000]) == RecoveryFailed(block=0, symbols=8)
    assert assembly.parity_held[0] == 1 and assembly.recoveries_failed == 1  # the planner asks for one more
    with pytest.raises(LocalProtocolError):
        assembly.recover_block(0, disk[:8000])  # not decodable until one more symbol comes
    assert assembly.receive_datagram(parity(0, 8)).decodable
    recovered = assembly.recover_block(0, disk[:8000])
    assert isinstance(recovered, BlockRecovered)
    assert [offset for offset, _ in recovered.frames] == [0, FRAME]
    assert b"".join(payload for _, payload in recovered.frames) == image[: 2 * FRAME]


def test_recovering_a_block_that_is_not_decodable_is_a_local_error():
    image = image_of(16_000)
    _, metadata, data, parity = parity_stream(image)
    assembly = Assembly(cookie=COOKIE)
    for datagram in metadata + data[2:]:
        assembly.receive_datagram(datagram)
    assembly.receive_datagram(parity(0, 8))
    with pytest.raises(LocalProtocolError):
        assembly.recover_block(0, bytes(8000))
    with pytest.raises(LocalProtocolError):
        assembly.recover_block(1, bytes(8000))  # complete: check it instead
