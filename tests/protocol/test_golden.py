"""The golden examples of docs/PROTOCOL.md section 6, checked in both directions."""

import json
import re
from pathlib import Path

from vmcast.protocol import (
    DataFrame,
    MetadataFrame,
    ParityEncoder,
    ParityFrame,
    decode,
    encode_data,
    encode_metadata,
    encode_parity_header,
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
    # The example is a sender without parity; with parity (the default here) "fec":"raptorq" is added.
    manifest = manifest_of(TINY_IMAGE, name="tiny.raw", frame_size=1400, block_size=2800, fec=False)
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


# -- Parity (docs/PROTOCOL.md section 8's example) ---------------------------------------------------------

FOX = b"The quick brown fox jumps over the lazy dog"  # 43 bytes: frames of 16, blocks of 32 (K = 2 and 1)
FOX_METADATA_JSON = (
    '{"block":32,"fec":"raptorq","format":"raw","frame":16,"len":43,"name":"fox.txt",'
    '"sha1":"2fd4e1c67a2d28fced849ee1bb76e7391b93eb12","v":1,"xxh3":{"first":0,"sums":["7faa8dfb9e729c7b","9490120d36eba518"]}}'
)
PARITY_FRAME = bytes.fromhex(
    "76 6d 63 61 73 74 00 01 80 00 00 00 00 00 00 02 f2 42 16 91 07 31 90 7b 47 91 48 02 fd bc df 83"
)  # block 0, ESI 2: the first repair symbol of "The quick brown fox jumps over t"


def test_the_fox_image_announces_raptorq_parity_in_its_golden_metadata():
    manifest = manifest_of(FOX, name="fox.txt", frame_size=16, block_size=32)
    (only,) = manifest.metadata_frames()
    assert encode_metadata(COOKIE, only) == bytes.fromhex("766d636173740001ffffffffffffffff") + FOX_METADATA_JSON.encode()


def test_the_first_repair_symbol_of_block_0_encodes_to_the_golden_parity_frame():
    symbol = ParityEncoder(FOX[:32], frame_size=16).symbols(2, 1)[0]
    assert encode_parity_header(COOKIE, block=0, esi=2) + symbol == PARITY_FRAME


def test_the_golden_parity_frame_decodes_to_block_0_esi_2():
    frame = decode(PARITY_FRAME, cookie=COOKIE)
    assert isinstance(frame, ParityFrame)
    assert (frame.block, frame.esi, bytes(frame.payload)) == (0, 2, PARITY_FRAME[16:])


def test_the_golden_parity_frame_replaces_a_lost_frame_of_block_0():
    receiver = MemoryReceiver(cookie=COOKIE)
    receiver.feed(bytes.fromhex("766d636173740001ffffffffffffffff") + FOX_METADATA_JSON.encode())
    receiver.feed(encode_data(COOKIE, 16, FOX[16:32]))  # frame 0 ("The quick brown ") is lost
    receiver.feed(encode_data(COOKIE, 32, FOX[32:]))
    receiver.feed(PARITY_FRAME)
    assert receiver.recovered_blocks == [0]
    assert receiver.complete and bytes(receiver.disk) == FOX


def test_the_specification_quotes_the_golden_parity_bytes_verbatim():
    spec = SPEC.read_text()
    assert FOX_METADATA_JSON in spec
    assert "76 6d 63 61 73 74 00 01  80 00 00 00 00 00 00 02  f2 42 16 91 07 31 90 7b 47 91 48 02 fd bc df 83" in spec
