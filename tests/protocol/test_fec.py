"""Per-block RaptorQ parity (vmcast.protocol.fec): real symbols, real decoding."""

import random

import pytest

from vmcast.protocol import ParityEncoder, decode_block, fec_possible, stream_fec_possible
from vmcast.protocol.fec import ESI_LIMIT, MAX_SOURCE_SYMBOLS

FRAME = 1400
K = 749  # a vmcast block: 1 MiB in 1400-byte frames


def block_of(frames: int, *, short_by: int = 0, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(frames * FRAME - short_by)


def frames_of(block: bytes) -> list[tuple[int, bytes]]:
    return [(index, block[at : at + FRAME]) for index, at in enumerate(range(0, len(block), FRAME))]


def test_a_full_block_decodes_from_its_held_frames_and_as_many_symbols_as_frames_missing_plus_one():
    block = block_of(K)
    encoder = ParityEncoder(block, frame_size=FRAME)
    assert encoder.source_symbols == K
    missing = set(random.Random(2).sample(range(K), 40))
    held = [(i, f) for i, f in frames_of(block) if i not in missing]
    parity = list(zip(range(K, K + 41), encoder.symbols(K, 41)))
    assert decode_block(block_length=len(block), frame_size=FRAME, held=held, parity=parity) == block


def test_the_short_last_block_round_trips_with_its_short_last_frame():
    block = block_of(502, short_by=613)  # the image's end: 502 frames, the last one 787 bytes
    encoder = ParityEncoder(block, frame_size=FRAME)
    assert encoder.source_symbols == 502
    held = [(i, f) for i, f in frames_of(block) if i % 10]  # the short last frame (501) is held, as on the wire
    assert len(held[-1][1]) == 787
    needed = 502 - len(held) + 1
    parity = list(zip(range(502, 502 + needed), encoder.symbols(502, needed)))
    assert decode_block(block_length=len(block), frame_size=FRAME, held=held, parity=parity) == block


def test_a_block_decodes_from_parity_alone():
    block = block_of(5, short_by=100)
    encoder = ParityEncoder(block, frame_size=FRAME)
    parity = list(zip(range(5, 12), encoder.symbols(5, 7)))
    assert decode_block(block_length=len(block), frame_size=FRAME, held=[], parity=parity) == block


def test_fewer_symbols_than_frames_do_not_decode():
    block = block_of(20)
    encoder = ParityEncoder(block, frame_size=FRAME)
    held = frames_of(block)[:15]
    parity = list(zip(range(20, 24), encoder.symbols(20, 4)))
    assert decode_block(block_length=len(block), frame_size=FRAME, held=held, parity=parity) is None


def test_symbols_asked_one_at_a_time_are_those_asked_all_at_once():
    block = block_of(30)
    one_by_one = ParityEncoder(block, frame_size=FRAME)
    singles = [one_by_one.symbols(esi, 1)[0] for esi in range(30, 30 + 300)]
    assert singles == ParityEncoder(block, frame_size=FRAME).symbols(30, 300)
    assert one_by_one.symbols(30, 2) == singles[:2]  # asked again after the encoder moved on: made again


def test_a_wrong_symbol_decodes_to_a_wrong_block_and_only_the_checksum_can_tell():
    block = block_of(10)
    held = frames_of(block)[1:]
    wrong = bytes(FRAME)
    decoded = decode_block(block_length=len(block), frame_size=FRAME, held=held, parity=[(10, wrong)])
    assert decoded is not None and decoded != block  # hence Assembly.check_block after every recovery


@pytest.mark.parametrize(
    ("frame_size", "frames", "possible"),
    [(1400, 749, True), (1000, 1049, True), (8, 1, True), (1401, 749, False), (1404, 10, False), (1400, 0, False),
     (1400, MAX_SOURCE_SYMBOLS + 1, False)],
)
def test_parity_needs_a_frame_size_multiple_of_8_and_a_block_of_one_source_block(frame_size, frames, possible):
    assert fec_possible(frame_size, frames) is possible


def test_a_stream_has_parity_only_when_its_last_block_can_have_it_too():
    assert stream_fec_possible(length=3005, frame_size=1400, block_size=2800)
    assert not stream_fec_possible(length=0, frame_size=1400, block_size=2800)
    assert not stream_fec_possible(length=3005, frame_size=1001, block_size=2002)


def test_bad_arguments_are_value_errors_not_library_panics():
    block = block_of(3)
    encoder = ParityEncoder(block, frame_size=FRAME)
    with pytest.raises(ValueError):
        encoder.symbols(2, 1)  # ESI 2 is a source symbol
    with pytest.raises(ValueError):
        encoder.symbols(ESI_LIMIT - 1, 2)
    with pytest.raises(ValueError):
        decode_block(block_length=len(block), frame_size=FRAME, held=[(0, block[:100])], parity=[])
    with pytest.raises(ValueError):
        decode_block(block_length=len(block), frame_size=FRAME, held=[], parity=[(3, bytes(FRAME - 1))])
    with pytest.raises(ValueError):
        ParityEncoder(bytes(1001 * 3), frame_size=1001)
