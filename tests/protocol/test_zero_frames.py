"""Zero frames: all-zero frames of blocks that are not all zeros, announced in metadata (``"zero_frames"``),
never sent, zeroed by receivers and verified with their block's xxh3 (docs/PROTOCOL.md sections 3-5)."""

import dataclasses
import hashlib
import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from vmcast.protocol import (
    MAX_ZERO_FRAME_RUNS_PER_BLOCK,
    METADATA_PAYLOAD_LIMIT,
    Assembly,
    AssemblyState,
    Carousel,
    DataReceived,
    Dropped,
    ManifestBuilder,
    MetadataReceived,
    ParityEncoder,
    ParityReceived,
    RepairRequest,
    SendData,
    SendMetadata,
    encode_data,
    encode_metadata,
    encode_parity_header,
    manifest_of,
    parse_metadata,
)

from .memlink import MemoryReceiver, datagrams, run_until_complete, run_with_repair
from .zero_frames_example import EXAMPLE, EXAMPLE_JSON

COOKIE = b"zeroframe"[:8]
FRAME = 16
BLOCK = 64  # 4 frames
PROTOCOL_MD = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def image_of(pattern: str, *, frame_size: int = FRAME, seed: int = 0) -> bytes:
    """One frame per character: '0' all zeros, 'x' random, 'h' zeros but for its last byte."""
    rng = random.Random(seed)
    make = {"0": lambda: bytes(frame_size), "x": lambda: rng.randbytes(frame_size), "h": lambda: bytes(frame_size - 1) + b"\x01"}
    return b"".join(make[c]() for c in pattern)


def zero_frame_numbers(manifest) -> list[int]:
    return [frame for first, count in manifest.zero_frames for frame in range(first, first + count)]


def frame_datagram(image: bytes, k: int) -> bytes:
    """Data frame `k` of `image`, as the carousel would send it."""
    return encode_data(COOKIE, k * FRAME, image[k * FRAME : (k + 1) * FRAME])


def metadata_without(manifest, *keys: str) -> bytes:
    """The manifest's first metadata frame without `keys`. Leaving out "zero_frames" (and the "xxh3" it needs)
    lets a receiver learn the stream and keep data frames before it knows which frames are zeros: the order
    these tests need, the full metadata frame coming after."""
    return encode_metadata(COOKIE, {k: v for k, v in manifest.metadata_frames()[0].items() if k not in keys})


# -- the document's example ----------------------------------------------------------------------------------


def test_the_documents_example_is_what_vmcast_announces_and_parses_back():
    doc = PROTOCOL_MD.read_text()
    section3 = doc[doc.index("## 3. Metadata frames") : doc.index("## 4.")]
    assert re.findall(r"```json\n(.*?)\n```", section3, re.DOTALL) == [EXAMPLE_JSON]

    manifest = manifest_of(EXAMPLE, name="frames.raw", frame_size=FRAME, block_size=BLOCK, fec=False)
    assert manifest.sha1 == hashlib.sha1(EXAMPLE).hexdigest() == "be0f317642f41e6ee1ff742ee4b335cd8392276d"
    (fields,) = manifest.metadata_frames()
    assert json.dumps(fields, sort_keys=True, separators=(",", ":")) == EXAMPLE_JSON
    parsed = parse_metadata(json.loads(EXAMPLE_JSON))
    assert parsed.zero_runs == ((1, 1),) and parsed.zero_frame_runs == ((1, 2), (8, 1))


def test_the_documents_example_sends_frames_0_3_and_9_and_a_receiver_completes_from_them():
    manifest = manifest_of(EXAMPLE, name="frames.raw", frame_size=FRAME, block_size=BLOCK, fec=False)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=1e9)
    actions = [carousel.next_send(0.0) for _ in range(9)]
    assert [a.offset if isinstance(a, SendData) else "metadata" for a in actions] == ["metadata", 0, 48, 144] * 2 + ["metadata"]
    receiver = MemoryReceiver(cookie=COOKIE, disk=bytearray(b"\xee" * len(EXAMPLE)))  # a target that held other bytes
    for datagram in [*carousel.metadata_datagrams, *(encode_data(COOKIE, o, EXAMPLE[o : o + FRAME]) for o in (0, 48, 144))]:
        receiver.feed(datagram)
    assert receiver.complete and bytes(receiver.disk) == EXAMPLE


# -- finding them --------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(pattern=st.text(alphabet="0xh", min_size=1, max_size=40), tail=st.integers(0, FRAME - 1), zero_tail=st.booleans())
def test_the_manifest_finds_exactly_the_zero_frames_of_blocks_that_are_not_zero(pattern, tail, zero_tail):
    image = image_of(pattern) + (bytes(tail) if zero_tail else b"\x07" * tail)
    manifest = manifest_of(image, frame_size=FRAME, block_size=BLOCK)
    layout = manifest.layout
    zero_blocks = {b for first, count in manifest.zero_blocks for b in range(first, first + count)}
    assert zero_blocks == {b for b in range(layout.block_count) if not any(image[slice(*layout.block_span(b))])}
    expected = [
        k for k in range(len(image) // FRAME)  # whole frames only: a short last frame is always sent
        if k // 4 not in zero_blocks and not any(image[k * FRAME : (k + 1) * FRAME])
    ]
    assert zero_frame_numbers(manifest) == expected  # at most 2 runs per 4-frame block: never capped here
    assert all((first + count - 1) // 4 == first // 4 for first, count in manifest.zero_frames), "runs stay in a block"
    unsent = {k for first, count in manifest.unsent_frame_runs() for k in range(first, first + count)}
    assert unsent == set(expected) | {k for k in range(layout.frame_count) if k // 4 in zero_blocks}


@settings(max_examples=60, deadline=None)
@given(pattern=st.text(alphabet="00xh", min_size=1, max_size=40), cuts=st.lists(st.integers(1, 200), max_size=20))
def test_the_manifest_is_the_same_whatever_the_chunks_the_image_is_fed_in(pattern, cuts):
    image = image_of(pattern) + b"\x03" * 5
    builder = ManifestBuilder(name="image", format="raw", frame_size=FRAME, block_size=BLOCK)
    position = 0
    for cut in cuts:
        builder.update(memoryview(image)[position : position + cut])
        position += cut
    builder.update(image[position:])
    assert builder.finish() == manifest_of(image, frame_size=FRAME, block_size=BLOCK)


def test_a_block_announces_only_its_longest_runs_up_to_the_bound():
    # 749 frames of 1400 bytes: alternating zero and random frames, then one long zero run of 40.
    frames = ["0" if k % 2 == 0 else "x" for k in range(700)] + ["0"] * 40 + ["x"] * 9
    image = image_of("".join(frames), frame_size=1400)
    manifest = manifest_of(image)
    assert manifest.layout.frames_per_block == 749
    assert len(manifest.zero_frames) == MAX_ZERO_FRAME_RUNS_PER_BLOCK
    assert manifest.zero_frames[-1] == (700, 40) and all(count == 1 for _, count in manifest.zero_frames[:-1])
    assert manifest.zero_frames[:-1] == tuple((k, 1) for k in range(0, 30, 2)), "ties go to the earliest runs"


# -- metadata: validation and size ------------------------------------------------------------------------------


def example_fields(**changes) -> dict:
    fields = json.loads(EXAMPLE_JSON)
    fields.update(changes)
    return fields


@pytest.mark.parametrize(
    "zero_frames",
    [
        "all", [[1]], [[1, 2, 3]], [[1, 0]], [[1, -1]], [[-1, 1]], [[1, True]], [[1.0, 1]],
        [[8, 1], [1, 2]],  # out of order
        [[1, 2], [2, 1]],  # overlapping
        [[4, 1]],  # in block 1, which `zero` names
        [[3, 2]],  # reaches from block 0 into the zero block
        [[9, 2]],  # past the image's last frame (9)
    ],
    ids=["not-a-list", "single", "triple", "empty-run", "negative-count", "negative-frame", "bool", "float",
         "descending", "overlapping", "in-a-zero-block", "into-a-zero-block", "past-the-end"],
)
def test_malformed_zero_frames_drop_the_metadata_frame(zero_frames):
    assert isinstance(parse_metadata(example_fields(zero_frames=zero_frames)), Dropped)


def test_zero_frames_must_lie_in_the_blocks_whose_checksums_the_frame_carries():
    fields = example_fields(xxh3={"first": 2, "sums": ["c851794bc503c3bb"]}, zero=[])
    assert parse_metadata(dict(fields, zero_frames=[[8, 1]])).zero_frame_runs == ((8, 1),)
    assert isinstance(parse_metadata(dict(fields, zero_frames=[[1, 2]])), Dropped)
    del fields["xxh3"]
    assert isinstance(parse_metadata(dict(fields, zero_frames=[[8, 1]])), Dropped), "needs xxh3"


def test_a_malformed_zero_frames_field_is_a_counted_drop_and_the_stream_goes_on():
    assembly = Assembly(cookie=COOKIE)
    event = assembly.receive_datagram(encode_metadata(COOKIE, example_fields(zero_frames=[[8, 1], [1, 2]])))
    assert isinstance(event, Dropped) and assembly.drops[event.reason] == 1
    assert isinstance(assembly.receive_datagram(encode_metadata(COOKIE, example_fields())), MetadataReceived)


@pytest.mark.parametrize("name", ["img", "n" * 200])
def test_metadata_frames_with_the_most_runs_stay_under_the_limit_and_cover_every_block_and_run(name):
    # The worst case: alternating zero and non-zero frames in every block (374 runs a block, 16 announced).
    frames = 749 * 30
    image = image_of("".join("0x"[k % 2] for k in range(frames)), frame_size=1400)
    manifest = manifest_of(image, name=name)
    assert len(manifest.zero_frames) == 30 * MAX_ZERO_FRAME_RUNS_PER_BLOCK
    covered, runs = [], []
    objects = manifest.metadata_frames()
    for fields in objects:
        assert len(json.dumps(fields, separators=(",", ":"))) <= METADATA_PAYLOAD_LIMIT
        parsed = parse_metadata(fields)
        covered += range(parsed.checksums_first, parsed.checksums_first + len(parsed.checksums))
        runs += parsed.zero_frame_runs
    assert covered == list(range(30)) and tuple(runs) == manifest.zero_frames
    assert len(objects) > 1, "runs take room: these blocks do not fit one frame"


def test_without_zero_frames_a_frame_carries_as_many_checksums_as_before():
    manifest = manifest_of(random.Random(3).randbytes(200 * 1400), frame_size=1400, block_size=1400)
    assert [len(fields["xxh3"]["sums"]) for fields in manifest.metadata_frames()] == [49, 49, 49, 49, 4]


# -- the carousel ------------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(pattern=st.text(alphabet="0xh", min_size=1, max_size=40), tail=st.integers(0, FRAME - 1))
def test_the_carousel_sends_every_frame_but_the_unsent_ones_once_per_loop(pattern, tail):
    image = image_of(pattern) + b"\x05" * tail
    manifest = manifest_of(image, frame_size=FRAME, block_size=BLOCK)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=1e9)
    unsent = {k for first, count in manifest.unsent_frame_runs() for k in range(first, first + count)}
    expected = [k * FRAME for k in range(manifest.layout.frame_count) if k not in unsent]
    assert carousel.frames_per_loop == len(expected)
    assume(expected)  # an all-zero image is all metadata (tests/protocol/test_zero_blocks.py)
    loops: list[list[int]] = []
    for _ in range(3 * (len(expected) + 1)):
        action = carousel.next_send(0.0)
        if isinstance(action, SendMetadata):
            loops.append([])
        elif isinstance(action, SendData):
            loops[-1].append(action.offset)
    assert loops[:3] == [expected] * 3
    assert carousel.loops_completed == 3


def test_a_repair_request_for_a_zero_frame_is_served_with_its_zeros_like_a_zero_blocks():
    # A receiver that knows zero_frames never asks; one that predates the field may, and gets the zeros.
    manifest = manifest_of(EXAMPLE, frame_size=FRAME, block_size=BLOCK)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=1e9)
    carousel.next_send(0.0)
    carousel.request_repair(RepairRequest(ranges=((1, 1),)))
    action = carousel.next_send(0.0)
    assert isinstance(action, SendData) and action.repair and action.offset == FRAME
    assert EXAMPLE[action.offset : action.offset + action.length] == bytes(FRAME)


def test_the_carousel_tells_the_repair_queue_a_block_starts_at_its_first_sent_frame():
    # Block 0 starts with zero frames: its parity need is dropped when the carousel reaches its first sent frame.
    image = image_of("00xx" + "xxxx", frame_size=8)
    manifest = manifest_of(image, frame_size=8, block_size=32, fec=True)
    assert manifest.zero_frames == ((0, 2),)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=1e9)
    carousel.next_send(0.0)
    for _ in range(4):  # frames 2, 3, 4, 5: the next loop's block 0 starts at frame 2
        carousel.next_send(0.0)
    carousel.request_repair(RepairRequest(parity=((0, 2),)))
    while not (isinstance(action := carousel.next_send(0.0), SendData) and action.offset == 16 and not action.repair):
        pass
    assert carousel.repairs.parity_need(0) == 0


# -- receivers ------------------------------------------------------------------------------------------------


def test_a_block_with_zero_frames_completes_from_its_other_frames_and_is_verified_by_its_xxh3():
    image = image_of("x00x" "xxxx" "0x0h")
    manifest = manifest_of(image, frame_size=FRAME, block_size=BLOCK)
    assert manifest.zero_frames == ((1, 2), (8, 1), (10, 1))
    receiver = MemoryReceiver(cookie=COOKIE, disk=bytearray(b"\xab" * len(image)))
    event = receiver.assembly.receive_datagram(encode_metadata(COOKIE, manifest.metadata_frames()[0]))
    assert event.zero_frames == ((1, 2), (8, 1), (10, 1)) and event.blocks_to_check == ()
    receiver = MemoryReceiver(cookie=COOKIE, disk=bytearray(b"\xab" * len(image)))
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=1e9)
    run_until_complete(carousel, image, [receiver], max_loops=1)
    assert bytes(receiver.disk) == image and receiver.corrupt_blocks_seen == []
    assert carousel.data_frames_sent == 8


def test_zero_frames_that_complete_a_block_name_it_to_check_after_zeroing():
    image = image_of("x00x")
    manifest = manifest_of(image, frame_size=FRAME, block_size=BLOCK)
    assembly = Assembly(cookie=COOKIE)
    assembly.receive_datagram(metadata_without(manifest, "xxh3", "zero_frames"))
    for k in (0, 3):
        assert isinstance(assembly.receive_datagram(frame_datagram(image, k)), DataReceived)
    event = assembly.receive_datagram(encode_metadata(COOKIE, manifest.metadata_frames()[0]))
    assert event.zero_frames == ((1, 2),) and event.blocks_to_check == (0,)
    assert assembly.check_block(0, image).__class__.__name__ == "BlockVerified"
    assert assembly.state is AssemblyState.VERIFYING_IMAGE


def test_a_zero_frame_that_already_arrived_as_data_is_not_zeroed_again_and_its_block_judges_it():
    image = image_of("x00x")
    manifest = manifest_of(image, frame_size=FRAME, block_size=BLOCK)
    receiver = MemoryReceiver(cookie=COOKIE)
    receiver.feed(metadata_without(manifest, "xxh3", "zero_frames"))
    receiver.feed(encode_data(COOKIE, FRAME, b"\x01" * FRAME))  # frame 1, wrong bytes (a faulty sender or wire)
    event = receiver.assembly.receive_datagram(encode_metadata(COOKIE, manifest.metadata_frames()[0]))
    assert event.zero_frames == ((2, 1),)
    receiver.disk[2 * FRAME : 3 * FRAME] = bytes(FRAME)
    for k in (0, 3):
        receiver.feed(frame_datagram(image, k))
    assert receiver.corrupt_blocks_seen == [0], "frame 1's bytes were kept, and the block's xxh3 caught them"
    # The block was forgotten with its zero frames; the next metadata round names them again; the carousel
    # brings frames 0 and 3; frame 1 is zeros now.
    receiver.feed(encode_metadata(COOKIE, manifest.metadata_frames()[0]))
    for k in (0, 3):
        receiver.feed(frame_datagram(image, k))
    assert receiver.complete and bytes(receiver.disk) == image


def test_frames_announced_zero_that_are_not_make_a_block_that_never_verifies():
    # A sender whose zero_frames are wrong: frame 1 holds data, its block's xxh3 says so, the receiver zeroes it.
    image = image_of("x00x" "xxxx")
    wrong = bytearray(image)
    wrong[FRAME : FRAME + 4] = b"data"
    manifest = manifest_of(image, frame_size=FRAME, block_size=BLOCK)
    lying = dataclasses.replace(manifest_of(bytes(wrong), frame_size=FRAME, block_size=BLOCK), zero_frames=manifest.zero_frames)
    carousel = Carousel(manifest=lying, cookie=COOKIE, metadata_interval=1e9)
    receiver = MemoryReceiver(cookie=COOKIE)
    with pytest.raises(AssertionError, match="not complete after 5 loops"):
        run_until_complete(carousel, bytes(wrong), [receiver], max_loops=5)
    assert not receiver.assembly.is_verified(0) and receiver.assembly.is_verified(1)
    assert len(receiver.corrupt_blocks_seen) >= 4 and set(receiver.corrupt_blocks_seen) == {0}
    assert receiver.image_checks == 0


def test_a_resumed_receiver_holds_zeros_where_its_verified_blocks_have_zero_frames():
    image = image_of("x00x" "0xx0" "xx0x" "x0x0", seed=4)
    manifest = manifest_of(image, frame_size=FRAME, block_size=BLOCK)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=1e9)
    first = MemoryReceiver(cookie=COOKIE, disk=bytearray(b"\xcc" * len(image)))
    for _ in range(5):  # metadata and blocks 0 and 1 (frames 0, 3, 5, 6)
        for datagram in datagrams(carousel, image, 0.0):
            first.feed(datagram)
    assert [first.assembly.is_verified(b) for b in range(4)] == [True, True, False, False]
    checkpoint = first.assembly.checkpoint()
    disk = bytearray(first.disk)
    disk[2 * BLOCK :] = b"\xcc" * (len(image) - 2 * BLOCK)  # what was not verified may be anything
    resumed = MemoryReceiver(cookie=COOKIE, assembly=Assembly(cookie=COOKIE, checkpoint=checkpoint), disk=disk)
    event = resumed.assembly.receive_datagram(carousel.metadata_datagrams[0])
    assert resumed.assembly.resumed_blocks == 2
    assert event.zero_frames == ((10, 1), (13, 1), (15, 1)), "only the unverified blocks' zero frames"
    assert disk[: 2 * BLOCK] == image[: 2 * BLOCK]
    run_until_complete(carousel, image, [resumed], max_loops=carousel.loops_completed + 2)
    assert bytes(resumed.disk) == image


@settings(max_examples=40, deadline=None)
@given(pattern=st.text(alphabet="00xh", min_size=1, max_size=48), seed=st.integers(0, 1000), join_after=st.integers(0, 40))
def test_receivers_joining_anywhere_assemble_images_with_any_zero_frame_pattern(pattern, seed, join_after):
    image = image_of(pattern, seed=seed) + bytes(seed % FRAME)
    carousel = Carousel(manifest=manifest_of(image, frame_size=FRAME, block_size=BLOCK), cookie=COOKIE, metadata_interval=0.002)
    for _ in range(join_after):
        carousel.next_send(0.0)
    receiver = MemoryReceiver(cookie=COOKIE, disk=bytearray(random.Random(seed).randbytes(len(image))))
    run_until_complete(carousel, image, [receiver], max_loops=carousel.loops_completed + 3, tick=1e-4)
    assert bytes(receiver.disk) == image


@pytest.mark.parametrize("fec", [False, True])
def test_lossy_receivers_with_repair_and_parity_complete_an_image_with_zero_frames(fec):
    # Zero frames are source symbols the receivers hold: parity decodes blocks around them.
    rng = random.Random(7)
    chunks = [bytes(4000) if rng.random() < 0.5 else rng.randbytes(4000) for _ in range(100)]
    image = b"".join(chunks)
    manifest = manifest_of(image, frame_size=200, block_size=3000, fec=fec)
    assert manifest.zero_frames and manifest.fec is fec
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=0.01)
    nodes = [MemoryReceiver(cookie=COOKIE, disk=bytearray(b"\x99" * len(image))) for _ in range(4)]
    run_with_repair(carousel, image, nodes, loss=0.05, rng=rng, fec=fec, max_seconds=30.0)
    assert all(bytes(node.disk) == image for node in nodes)
    unsent = {k for first, count in manifest.unsent_frame_runs() for k in range(first, first + count)}
    assert carousel.frames_per_loop == manifest.layout.frame_count - len(unsent)
    if fec:
        assert sum(len(node.recovered_blocks) for node in nodes) > 0


def test_zero_frames_that_make_a_block_decodable_with_the_parity_held_name_it_to_recover():
    # Frame size 16 (a multiple of 8: parity possible). Block 0: frames 0 and 3 data, 1 and 2 zeros; frame 3 is
    # lost, one parity symbol came before the metadata that names the zero frames.
    image = image_of("x00x" "xxxx")
    manifest = manifest_of(image, frame_size=FRAME, block_size=BLOCK, fec=True)
    (fields,) = manifest.metadata_frames()
    receiver = MemoryReceiver(cookie=COOKIE, disk=bytearray(b"\xab" * len(image)))
    receiver.feed(metadata_without(manifest, "xxh3", "zero", "zero_frames"))
    assert receiver.assembly.fec
    receiver.feed(encode_data(COOKIE, 0, image[:FRAME]))
    symbol = ParityEncoder(image[:BLOCK], frame_size=FRAME).symbols(4, 1)[0]
    parity = receiver.assembly.receive_datagram(encode_parity_header(COOKIE, block=0, esi=4) + symbol)
    assert isinstance(parity, ParityReceived) and not parity.decodable  # 1 frame + 1 symbol of 4
    event = receiver.assembly.receive_datagram(encode_metadata(COOKIE, fields))
    assert event.zero_frames == ((1, 2),) and event.blocks_to_recover == (0,) and event.blocks_to_check == ()
    receiver.disk[FRAME : 3 * FRAME] = bytes(2 * FRAME)  # what the caller does with zero_frames first
    recovered = receiver.assembly.recover_block(0, receiver.disk[:BLOCK])
    assert recovered.frames == ((3 * FRAME, image[3 * FRAME : BLOCK]),)
    receiver.disk[3 * FRAME : BLOCK] = recovered.frames[0][1]
    assert receiver.assembly.check_block(0, receiver.disk[:BLOCK]).__class__.__name__ == "BlockVerified"
