"""The golden examples of docs/PROTOCOL.md section 6, checked in both directions."""

import json
import re
from pathlib import Path

from vmcast.protocol import (
    DataFrame,
    MetadataFrame,
    decode,
    encode_data,
    encode_metadata,
    manifest_of,
    parse_metadata,
)

from .memlink import MemoryReceiver, run_until_complete
from vmcast.protocol import Carousel

COOKIE = bytes.fromhex("766d636173740001")
TINY_IMAGE = bytes(3000) + b"hello"
TINY_SHA1 = "15268c1c0acbfae8ecc1c2832b68f2c32e3c48d5"
DATA_FRAME = bytes.fromhex("76 6d 63 61 73 74 00 01 00 00 00 00 00 00 0a f0 76 6d 63 61 73 74 21")
METADATA_JSON = (
    '{"block":2800,"format":"raw","frame":1400,"len":3005,"name":"tiny.raw",'
    '"sha1":"15268c1c0acbfae8ecc1c2832b68f2c32e3c48d5","v":1,'
    '"xxh3":{"first":0,"sums":["ab6938c82669c0e1","021700158e4df70f"]},"zero":[[0,1]]}'
)
METADATA_FRAME = bytes.fromhex("766d636173740001ffffffffffffffff") + METADATA_JSON.encode()
SPEC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def test_data_frame_encodes_to_the_golden_bytes():
    assert encode_data(COOKIE, 2800, b"vmcast!") == DATA_FRAME


def test_golden_data_frame_decodes_to_offset_and_payload():
    frame = decode(DATA_FRAME, cookie=COOKIE)
    assert isinstance(frame, DataFrame)
    assert (frame.offset, bytes(frame.payload)) == (2800, b"vmcast!")


def test_tiny_image_manifest_encodes_to_the_golden_metadata_frame():
    manifest = manifest_of(TINY_IMAGE, name="tiny.raw", frame_size=1400, block_size=2800)
    assert manifest.sha1 == TINY_SHA1
    assert [f"{s:016x}" for s in manifest.block_xxh3] == ["ab6938c82669c0e1", "021700158e4df70f"]
    (only,) = manifest.metadata_frames()
    assert encode_metadata(COOKIE, only) == METADATA_FRAME


def test_golden_metadata_frame_decodes_to_the_tiny_image():
    frame = decode(METADATA_FRAME, cookie=COOKIE)
    assert isinstance(frame, MetadataFrame)
    metadata = parse_metadata(frame.fields)
    assert (metadata.sha1, metadata.length, metadata.frame_size, metadata.block_size) == (TINY_SHA1, 3005, 1400, 2800)
    assert metadata.checksums == (0xAB6938C82669C0E1, 0x021700158E4DF70F)
    assert metadata.zero_runs == ((0, 1),)


def test_the_carousel_never_sends_the_zero_block_of_the_tiny_image():
    manifest = manifest_of(TINY_IMAGE, name="tiny.raw", frame_size=1400, block_size=2800)
    carousel = Carousel(manifest=manifest, cookie=COOKIE, metadata_interval=100.0)
    actions = [carousel.next_send(0.0) for _ in range(4)]
    assert [getattr(a, "offset", None) for a in actions] == [None, 2800, None, 2800]  # metadata, data, ...


def test_tiny_image_completes_from_its_metadata_and_its_one_data_frame():
    receiver = MemoryReceiver(cookie=COOKIE)
    receiver.feed(METADATA_FRAME)
    receiver.feed(encode_data(COOKIE, 2800, TINY_IMAGE[2800:]))
    assert receiver.complete
    assert bytes(receiver.disk) == TINY_IMAGE


def test_the_specification_quotes_the_golden_bytes_verbatim():
    spec = SPEC.read_text()
    assert METADATA_JSON in spec
    assert "76 6d 63 61 73 74 00 01  00 00 00 00 00 00 0a f0  76 6d 63 61 73 74 21" in spec
    assert TINY_SHA1 in spec


def test_tiny_image_from_the_golden_frames_assembles_and_verifies():
    receiver = MemoryReceiver(cookie=COOKIE)
    receiver.feed(METADATA_FRAME)
    for offset in (2800, 0, 1400):  # any order
        receiver.feed(encode_data(COOKIE, offset, TINY_IMAGE[offset : offset + 1400]))
    assert receiver.complete
    assert bytes(receiver.disk) == TINY_IMAGE


def test_tiny_image_from_a_minimal_sender_assembles_and_verifies():
    minimal = encode_metadata(COOKIE, json.loads('{"len":3005,"sha1":"%s"}' % TINY_SHA1))
    receiver = MemoryReceiver(cookie=COOKIE)
    receiver.feed(minimal)
    for offset in (1400, 2800, 0):
        receiver.feed(encode_data(COOKIE, offset, TINY_IMAGE[offset : offset + 1400]))
    assert receiver.complete
    assert bytes(receiver.disk) == TINY_IMAGE
