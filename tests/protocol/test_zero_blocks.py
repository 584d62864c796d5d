"""Zero blocks: announced in metadata with their checksums, never sent, counted as received by receivers."""

import random

import pytest
from hypothesis import given, settings, strategies as st

from vmcast.protocol import (
    METADATA_PAYLOAD_LIMIT,
    Carousel,
    Dropped,
    Idle,
    SendData,
    encode_metadata,
    manifest_of,
    parse_metadata,
)

from .memlink import MemoryReceiver, run_until_complete

COOKIE = b"zerozero"
BLOCK = 4000


def image_with(pattern: str, seed: int = 0) -> bytes:
    """One 4000-byte block per character: '0' all zeros, 'x' random, 'h' zeros with one byte set."""
    rng = random.Random(seed)
    blocks = {"0": lambda: bytes(BLOCK), "x": lambda: rng.randbytes(BLOCK), "h": lambda: bytes(BLOCK - 1) + b"\x01"}
    return b"".join(blocks[c]() for c in pattern)


def test_the_manifest_finds_exactly_the_all_zero_blocks():
    manifest = manifest_of(image_with("00x0hx00"), frame_size=1000, block_size=BLOCK)
    assert manifest.zero_blocks == ((0, 2), (3, 1), (6, 2))


def test_the_carousel_sends_only_the_frames_of_nonzero_blocks_every_loop():
    image = image_with("0x00x0")
    carousel = Carousel(manifest=manifest_of(image, frame_size=1000, block_size=BLOCK), cookie=COOKIE, metadata_interval=1e9)
    offsets = [a.offset for a in (carousel.next_send(0.0) for _ in range(30)) if isinstance(a, SendData)]
    one_loop = [*range(4000, 8000, 1000), *range(16000, 20000, 1000)]
    assert offsets[:16] == one_loop + one_loop
    assert carousel.frames_per_loop == 8 and carousel.loops_completed >= 3


def test_an_all_zero_image_is_all_metadata():
    carousel = Carousel(manifest=manifest_of(bytes(3 * BLOCK), frame_size=1000, block_size=BLOCK), cookie=COOKIE)
    carousel.next_send(0.0)
    assert isinstance(carousel.next_send(0.1), Idle)
    receiver = MemoryReceiver(cookie=COOKIE)
    for datagram in carousel.metadata_datagrams:
        receiver.feed(datagram)
    assert receiver.complete and bytes(receiver.disk) == bytes(3 * BLOCK)


@settings(max_examples=40, deadline=None)
@given(pattern=st.text(alphabet="0xh", min_size=1, max_size=12), seed=st.integers(0, 1000), join_after=st.integers(0, 30))
def test_receivers_joining_anywhere_assemble_images_with_any_zero_pattern(pattern, seed, join_after):
    image = image_with(pattern, seed) + bytes(seed % 3000)  # and a short, maybe zero, tail
    carousel = Carousel(manifest=manifest_of(image, frame_size=1000, block_size=BLOCK), cookie=COOKIE, metadata_interval=0.002)
    for _ in range(join_after):
        carousel.next_send(0.0)
    receiver = MemoryReceiver(cookie=COOKIE)
    run_until_complete(carousel, image, [receiver], max_loops=carousel.loops_completed + 3, tick=1e-4)
    assert bytes(receiver.disk) == image


def test_zero_runs_share_frames_with_checksums_and_every_frame_fits():
    # Alternating zero and random blocks: the most runs per frame.
    image = image_with("0x" * 300)
    manifest = manifest_of(image, frame_size=1000, block_size=BLOCK)
    covered, zeros = [], []
    for fields in manifest.metadata_frames():
        assert len(encode_metadata(COOKIE, fields)) - 16 <= METADATA_PAYLOAD_LIMIT
        parsed = parse_metadata(fields)
        covered += range(parsed.checksums_first, parsed.checksums_first + len(parsed.checksums))
        zeros += [b for first, count in parsed.zero_runs for b in range(first, first + count)]
    assert covered == list(range(600))
    assert zeros == list(range(0, 600, 2))


@pytest.mark.parametrize(
    "zero",
    [[[0, 0]], [[5, 1]], [[-1, 1]], [[0, 1, 2]], "all", [[0, True]]],
    ids=["empty-run", "outside-frame", "negative", "triple", "not-a-list", "bool-count"],
)
def test_malformed_zero_runs_are_dropped(zero):
    fields = manifest_of(image_with("0x0"), frame_size=1000, block_size=BLOCK).metadata_frames()[0]
    fields["zero"] = zero
    assert isinstance(parse_metadata(fields), Dropped)


def test_a_zero_block_whose_data_already_arrived_is_checked_not_assumed():
    image = image_with("0x")
    manifest = manifest_of(image, frame_size=1000, block_size=BLOCK)
    from vmcast.protocol import encode_data

    receiver = MemoryReceiver(cookie=COOKIE)
    identity = {k: v for k, v in manifest.metadata_frames()[0].items() if k not in ("xxh3", "zero")}
    receiver.feed(encode_metadata(COOKIE, identity))
    for offset in range(0, 4000, 1000):  # a sender that does send zeros
        receiver.feed(encode_data(COOKIE, offset, image[offset : offset + 1000]))
    event = receiver.assembly.receive_datagram(encode_metadata(COOKIE, manifest.metadata_frames()[0]))
    assert event.blocks_to_check == (0,) and event.zero_blocks == ()
