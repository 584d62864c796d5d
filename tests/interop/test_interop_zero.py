"""`zero` metadata (docs/PROTOCOL.md sections 3-6) in the independent peer (tests/interop/minimal_peer.py), and end to
end: the independent receiver takes an image with all-zero blocks from `vmcast serve`."""

import hashlib
import io
import json
import os
import re
from pathlib import Path

import pytest

from tests.e2e.processes import sha1_of

from .minimal_peer import (
    MalformedMetadata,
    Receiver,
    UnsupportedVersion,
    encode_frame,
    encode_metadata,
    parse_datagram,
    parse_metadata,
    run_sender,
)
from .peer_processes import (
    minimal_receiver_takes_from_vmcast_serve,
    write_image_of_mib_chunks,
)

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"

# Section 6, copied from the document.
COOKIE = bytes.fromhex("766d636173740001")
TINY = bytes(3000) + b"hello"
TINY_SHA1 = "15268c1c0acbfae8ecc1c2832b68f2c32e3c48d5"
GOLDEN_METADATA_JSON = (
    '{"block":2800,"format":"raw","frame":1400,"len":3005,"name":"tiny.raw",'
    '"sha1":"15268c1c0acbfae8ecc1c2832b68f2c32e3c48d5","v":1,'
    '"xxh3":{"first":0,"sums":["ab6938c82669c0e1","021700158e4df70f"]},"zero":[[0,1]]}'
)
GOLDEN_METADATA_FRAME = bytes.fromhex("766d636173740001ffffffffffffffff") + GOLDEN_METADATA_JSON.encode()
GOLDEN_DATA_FRAME_2800 = encode_frame(COOKIE, 2800, bytes(200) + b"hello")
ZERO_BLOCK_XXH3_2800 = "ab6938c82669c0e1"  # XXH3-64 of 2,800 zero bytes (section 6, block 0)


def golden_meta(**changes) -> dict:
    meta = json.loads(GOLDEN_METADATA_JSON)
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return meta


def new_receiver() -> tuple[Receiver, io.BytesIO]:
    out = io.BytesIO()
    return Receiver(COOKIE, out), out


# --------------------------------------------------------------------------------------------- golden example


def test_the_golden_metadata_is_the_documents_and_round_trips():
    doc = PROTOCOL_MD.read_text()
    section6 = doc[doc.index("## 6. Golden examples") : doc.index("## 7.")]
    blocks = re.findall(r"```json\n(.*?)\n```", section6, re.DOTALL)
    assert blocks == [GOLDEN_METADATA_JSON]
    assert "76 6d 63 61 73 74 00 01 ff ff ff ff ff ff ff ff" in section6

    assert encode_metadata(COOKIE, json.loads(GOLDEN_METADATA_JSON)) == GOLDEN_METADATA_FRAME
    cookie, offset, payload = parse_datagram(GOLDEN_METADATA_FRAME)
    assert (cookie, offset) == (COOKIE, 0xFFFFFFFFFFFFFFFF)
    meta = parse_metadata(payload)
    assert meta["zero"] == [[0, 1]] and meta["sha1"] == TINY_SHA1 == hashlib.sha1(TINY).hexdigest()


def test_the_tiny_image_completes_from_its_metadata_frame_and_the_one_data_frame():
    receiver, out = new_receiver()
    assert receiver.feed(GOLDEN_METADATA_FRAME) is False
    assert receiver.held_count == 2  # frames 0 and 1,400: block 0, named in zero, counts as received
    assert receiver.feed(GOLDEN_DATA_FRAME_2800) is True
    assert receiver.complete and receiver.verified_sha1 == TINY_SHA1
    assert out.getvalue() == TINY
    assert receiver.written == 1 and receiver.counters()["zero_blocks"] == 1
    assert not receiver.counters()["drops"]


def test_the_golden_frames_also_work_with_a_file_target_that_had_other_bytes(tmp_path):
    target = tmp_path / "out.raw"
    target.write_bytes(os.urandom(5000))
    with target.open("r+b") as out:
        receiver = Receiver(COOKIE, out)
        receiver.feed(GOLDEN_METADATA_FRAME)
        assert receiver.feed(GOLDEN_METADATA_FRAME) is False  # repeated metadata changes nothing
        assert receiver.feed(GOLDEN_DATA_FRAME_2800) is True
    assert target.read_bytes() == TINY


def test_the_same_image_from_a_minimal_sender_needs_all_three_frames():
    receiver, out = new_receiver()
    receiver.feed(encode_metadata(COOKIE, {"len": 3005, "sha1": TINY_SHA1}))
    assert receiver.feed(GOLDEN_DATA_FRAME_2800) is False  # not offset 0 and the last frame: proves no F
    assert receiver.feed(encode_frame(COOKIE, 0, TINY[:1400])) is False
    assert receiver.feed(encode_frame(COOKIE, 1400, TINY[1400:2800])) is False
    assert receiver.feed(GOLDEN_DATA_FRAME_2800) is True
    assert out.getvalue() == TINY


def test_zero_block_frames_that_arrive_anyway_are_duplicates():
    receiver, out = new_receiver()
    receiver.feed(GOLDEN_METADATA_FRAME)
    assert receiver.feed(encode_frame(COOKIE, 0, bytes(1400))) is False
    assert receiver.duplicates == 1 and receiver.written == 0
    assert receiver.feed(GOLDEN_DATA_FRAME_2800) is True
    assert out.getvalue() == TINY


# --------------------------------------------------------------------------------------------- zero semantics


def test_a_partly_held_zero_block_is_made_zeros_and_counted_received():
    receiver, out = new_receiver()
    receiver.feed(encode_metadata(COOKIE, golden_meta(zero=None)))  # same stream, zero not yet named
    receiver.feed(encode_frame(COOKIE, 0, b"\xff" * 1400))  # a corrupt frame of block 0
    assert receiver.held_count == 1
    receiver.feed(GOLDEN_METADATA_FRAME)
    assert receiver.held_count == 2
    assert out.getvalue()[:2800] == bytes(2800)
    assert receiver.feed(GOLDEN_DATA_FRAME_2800) is True
    assert out.getvalue() == TINY


def test_a_fully_held_zero_block_is_verified_like_any_block():
    receiver, out = new_receiver()
    receiver.feed(encode_metadata(COOKIE, golden_meta(zero=None)))
    receiver.feed(encode_frame(COOKIE, 0, bytes(1400)))
    receiver.feed(encode_frame(COOKIE, 1400, bytes(1400)))
    receiver.feed(GOLDEN_METADATA_FRAME)
    assert receiver.held_count == 2 and receiver.written == 2
    assert receiver.feed(GOLDEN_DATA_FRAME_2800) is True
    assert out.getvalue() == TINY


def test_a_zero_block_never_makes_a_wrong_image_complete():
    # A sender that names block 0 zero although the image's SHA-1 says otherwise: never complete.
    image = b"\x01" * 2800 + TINY[2800:]
    meta = golden_meta(sha1=hashlib.sha1(image).hexdigest())
    receiver, out = new_receiver()
    receiver.feed(encode_metadata(COOKIE, meta))
    for _ in range(3):
        assert receiver.feed(encode_frame(COOKIE, 0, image[:1400])) is False  # held by zero: duplicates
        assert receiver.feed(encode_frame(COOKIE, 2800, image[2800:])) is False
        receiver.feed(encode_metadata(COOKIE, meta))
    assert not receiver.complete and receiver.sha1_mismatches == 3
    assert out.getvalue()[:2800] == bytes(2800)  # what zero said, whatever came


def test_after_a_sha1_mismatch_zero_blocks_stay_received_and_zeros():
    receiver, out = new_receiver()
    receiver.feed(GOLDEN_METADATA_FRAME)
    assert receiver.feed(encode_frame(COOKIE, 2800, bytes(200) + b"HELLO")) is False  # corrupt: SHA-1 differs
    assert receiver.sha1_mismatches == 1 and receiver.held_count == 2  # data forgotten, block 0 still held
    assert receiver.feed(GOLDEN_DATA_FRAME_2800) is True
    assert out.getvalue() == TINY


def test_an_all_zero_image_completes_from_metadata_alone():
    image = bytes(5600)
    meta = {
        "sha1": hashlib.sha1(image).hexdigest(), "len": len(image), "frame": 1400, "block": 2800,
        "xxh3": {"first": 0, "sums": [ZERO_BLOCK_XXH3_2800] * 2}, "zero": [[0, 2]],
    }
    receiver, out = new_receiver()
    assert receiver.feed(encode_metadata(COOKIE, meta)) is True
    assert out.getvalue() == image


def test_zero_runs_spread_over_several_metadata_frames():
    # Two blocks, their checksums (and zero runs) in two metadata frames; the last block (205 bytes) is not zero.
    whole = golden_meta(name=None, format=None)
    first = dict(whole, xxh3={"first": 0, "sums": whole["xxh3"]["sums"][:1]}, zero=[[0, 1]])
    second = dict(whole, xxh3={"first": 1, "sums": whole["xxh3"]["sums"][1:]}, zero=[])
    receiver, out = new_receiver()
    receiver.feed(encode_metadata(COOKIE, second))
    assert receiver.held_count == 0
    receiver.feed(encode_metadata(COOKIE, first))
    assert receiver.feed(GOLDEN_DATA_FRAME_2800) is True
    assert out.getvalue() == TINY


def test_zero_named_before_the_frame_size_is_learned():
    # block/xxh3/zero without `frame` (a sender MUST NOT, but the receiver still learns F from data, section 4)
    image = bytes(2800) + os.urandom(2800) + b"tail"
    meta = {
        "sha1": hashlib.sha1(image).hexdigest(), "len": len(image), "block": 2800,
        "xxh3": {"first": 0, "sums": [ZERO_BLOCK_XXH3_2800, "0" * 16, "0" * 16]}, "zero": [[0, 1]],
    }
    receiver, out = new_receiver()
    receiver.feed(encode_metadata(COOKIE, meta))
    assert receiver.feed(encode_frame(COOKIE, 2800, image[2800:4200])) is False  # proves F = 1400
    assert receiver.held_count == 3
    assert receiver.feed(encode_frame(COOKIE, 4200, image[4200:5600])) is False
    assert receiver.feed(encode_frame(COOKIE, 5600, image[5600:])) is True
    assert out.getvalue() == image


def test_a_block_size_not_a_multiple_of_the_learned_frame_size_still_completes():
    # A sender breaking "block is a multiple of frame": only frames wholly inside zero blocks count as received.
    image = bytes(2100) + os.urandom(2100)
    meta = {
        "sha1": hashlib.sha1(image).hexdigest(), "len": len(image), "block": 2100,
        "xxh3": {"first": 0, "sums": ["0" * 16, "0" * 16]}, "zero": [[0, 1]],
    }
    receiver, out = new_receiver()
    receiver.feed(encode_metadata(COOKIE, meta))
    assert receiver.feed(encode_frame(COOKIE, 1400, image[1400:2800])) is False  # proves F = 1400; straddles
    assert receiver.held_count == 2  # frame 0 (inside block 0) and this one
    assert receiver.feed(encode_frame(COOKIE, 2800, image[2800:])) is True
    assert out.getvalue() == image


@pytest.mark.parametrize(
    "zero",
    [
        {"0": 1},  # not a list
        [0, 1],  # not a list of runs
        [[0]],
        [[0, 1, 2]],
        [[0.0, 1]],
        [[0, True]],
        [["0", 1]],
        [[0, 0]],  # empty run
        [[-1, 1]],
        [[0, 3]],  # past the last block of this frame's xxh3
        [[2, 1]],
        [[1, 1], [0, 3]],
    ],
)
def test_malformed_zero_runs_drop_the_frame(zero):
    with pytest.raises(MalformedMetadata):
        parse_metadata(json.dumps(golden_meta(zero=zero)).encode())
    receiver, _ = new_receiver()
    receiver.feed(encode_metadata(COOKIE, golden_meta(zero=zero)))
    assert receiver.drops["malformed_metadata"] == 1 and receiver.sha1 is None


def test_zero_needs_xxh3_and_stays_inside_its_range():
    with pytest.raises(MalformedMetadata):
        parse_metadata(json.dumps(golden_meta(xxh3=None)).encode())  # zero without xxh3
    with pytest.raises(MalformedMetadata):  # the run is outside first .. first + len(sums) - 1
        parse_metadata(json.dumps(golden_meta(xxh3={"first": 1, "sums": ["021700158e4df70f"]})).encode())
    assert parse_metadata(json.dumps(golden_meta(zero=[])).encode())["zero"] == []
    assert parse_metadata(json.dumps(golden_meta(zero=[[0, 1], [1, 1], [0, 2]])).encode())["zero"] == [[0, 1], [1, 1], [0, 2]]
    # A newer version wins over a malformed zero (section 3: "A receiver checks `v` first").
    with pytest.raises(UnsupportedVersion):
        parse_metadata(json.dumps(golden_meta(v=2, zero="nonsense")).encode())


def test_the_minimal_sender_does_not_announce_zero(tmp_path):
    image = tmp_path / "tiny.raw"
    image.write_bytes(TINY)
    with pytest.raises(ValueError):
        run_sender("239.255.201.9", 9, "0123456789abcdef", str(image), loops=1, extra_metadata={"zero": [[0, 1]]})


# --------------------------------------------------------------------------------------------- end to end


ZERO_MIB = {0, 1, 2, 3, 6, 8, 11, 15}  # 8 of 16 MiB, in runs and alone, first and last included


def test_the_minimal_receiver_takes_a_half_zero_image_from_vmcast_serve(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    expected = write_image_of_mib_chunks(images / "half-zero.raw", data_mib=set(range(16)) - ZERO_MIB)
    output = tmp_path / "out.raw"
    peer = minimal_receiver_takes_from_vmcast_serve(images / "half-zero.raw", output=output, tmp=tmp_path)
    assert peer.returncode == 0, peer.stdout + peer.stderr
    assert f"verified sha1={expected}" in peer.stdout
    assert output.stat().st_size == 16 << 20
    assert sha1_of(output) == expected == sha1_of(images / "half-zero.raw")
