"""The codec: every input gives a typed frame or a counted drop, never an exception."""

import json

import pytest
from hypothesis import given, strategies as st

from vmcast.protocol import (
    METADATA_OFFSET,
    PARITY_FLAG,
    REPAIR_REQUEST_OFFSET,
    DataFrame,
    Dropped,
    DropReason,
    MetadataFrame,
    ParityFrame,
    decode,
    encode_data,
    encode_header,
    encode_metadata,
    encode_parity_header,
    parity_fields,
)
from vmcast.protocol.frames import PARITY_BLOCK_RESERVED, PARITY_ESI_LIMIT

COOKIE = b"\x01\x02\x03\x04\x05\x06\x07\x08"


@given(offset=st.integers(0, PARITY_FLAG - 1), payload=st.binary(max_size=2000))
def test_data_frames_round_trip(offset, payload):
    frame = decode(encode_data(COOKIE, offset, payload), cookie=COOKIE)
    assert isinstance(frame, DataFrame)
    assert (frame.offset, bytes(frame.payload)) == (offset, payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(fields=st.dictionaries(st.text(max_size=10), json_values, max_size=6))
def test_metadata_objects_round_trip(fields):
    frame = decode(encode_metadata(COOKIE, fields), cookie=COOKIE)
    assert isinstance(frame, MetadataFrame)
    assert frame.fields == fields


@given(datagram=st.binary(max_size=15))
def test_datagrams_shorter_than_the_header_are_dropped_as_too_short(datagram):
    assert decode(datagram, cookie=COOKIE).reason is DropReason.TOO_SHORT


def test_another_streams_cookie_is_dropped_as_foreign():
    result = decode(encode_data(b"XXXXXXXX", 0, b"abc"), cookie=COOKIE)
    assert isinstance(result, Dropped) and result.reason is DropReason.FOREIGN_COOKIE


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe", b"{not json", b"[1, 2]", b'"text"', b"42", b"", b"[" * 100_000],
    ids=["not-utf8", "not-json", "array", "string", "number", "empty", "deeply-nested"],
)
def test_metadata_payloads_that_are_not_json_objects_are_dropped_as_malformed(payload):
    result = decode(encode_header(COOKIE, METADATA_OFFSET) + payload, cookie=COOKIE)
    assert isinstance(result, Dropped) and result.reason is DropReason.MALFORMED_METADATA


@given(datagram=st.binary(max_size=300))
def test_decoding_never_raises(datagram):
    decode(datagram, cookie=COOKIE)
    decode(COOKIE + datagram, cookie=COOKIE)
    decode(encode_header(COOKIE, METADATA_OFFSET) + datagram, cookie=COOKIE)


def test_data_frame_payload_is_a_view_not_a_copy():
    datagram = bytearray(encode_data(COOKIE, 7, b"abc"))
    frame = decode(datagram, cookie=COOKIE)
    datagram[-1] = ord("z")
    assert bytes(frame.payload) == b"abz"


def test_cookie_must_be_eight_bytes():
    with pytest.raises(ValueError):
        encode_header(b"short", 0)


def test_metadata_json_is_compact_and_sorted_so_frames_are_reproducible():
    datagram = encode_metadata(COOKIE, {"sha1": "a" * 40, "len": 1})
    assert datagram[16:] == json.dumps({"len": 1, "sha1": "a" * 40}, separators=(",", ":")).encode()


@given(block=st.integers(0, PARITY_BLOCK_RESERVED - 1), esi=st.integers(0, PARITY_ESI_LIMIT - 1), symbol=st.binary(max_size=64))
def test_parity_frames_round_trip(block, esi, symbol):
    frame = decode(encode_parity_header(COOKIE, block=block, esi=esi) + symbol, cookie=COOKIE)
    assert isinstance(frame, ParityFrame)
    assert (frame.block, frame.esi, bytes(frame.payload)) == (block, esi, symbol)


def test_the_parity_header_puts_flag_block_and_esi_in_the_offset():
    header = encode_parity_header(COOKIE, block=0x12_3456, esi=0xABCDEF)
    assert header == COOKIE + bytes.fromhex("80 00 12 34 56 ab cd ef")  # 1 | block (39 bits) | esi (24 bits)
    assert int.from_bytes(header[8:], "big") == PARITY_FLAG | 0x12_3456 << 24 | 0xABCDEF


def test_metadata_and_repair_request_offsets_are_not_parity():
    assert parity_fields(METADATA_OFFSET) is None
    assert parity_fields(REPAIR_REQUEST_OFFSET) is None
    assert parity_fields(2800) is None
    assert parity_fields(PARITY_FLAG | 7 << 24 | 800) == (7, 800)


@pytest.mark.parametrize(("block", "esi"), [(-1, 0), (PARITY_BLOCK_RESERVED, 0), (0, PARITY_ESI_LIMIT), (0, -1)])
def test_a_parity_header_the_offset_cannot_carry_is_refused(block, esi):
    with pytest.raises(ValueError):
        encode_parity_header(COOKIE, block=block, esi=esi)
