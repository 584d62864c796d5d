"""Metadata validation and building: what a stream may announce, and what a sender builds."""

import os

import pytest

from vmcast.protocol import (
    METADATA_PAYLOAD_LIMIT,
    Dropped,
    DropReason,
    Layout,
    StreamMetadata,
    default_block_size,
    encode_metadata,
    manifest_of,
    parse_metadata,
)

SHA1 = "0123456789abcdef0123456789abcdef01234567"


def test_sha1_and_len_alone_are_enough():
    metadata = parse_metadata({"sha1": SHA1, "len": 10})
    assert isinstance(metadata, StreamMetadata)
    assert (metadata.sha1, metadata.length, metadata.frame_size, metadata.block_size) == (SHA1, 10, None, None)


def test_uppercase_sha1_is_accepted_and_normalised():
    assert parse_metadata({"sha1": SHA1.upper(), "len": 1}).sha1 == SHA1


def test_unknown_fields_are_ignored():
    assert isinstance(parse_metadata({"sha1": SHA1, "len": 1, "zzz": [1, {}], "repair": None}), StreamMetadata)


@pytest.mark.parametrize(
    "fields",
    [
        {"len": 1},
        {"sha1": SHA1},
        {"sha1": "xyz", "len": 1},
        {"sha1": SHA1 + "00", "len": 1},
        {"sha1": 12, "len": 1},
        {"sha1": SHA1, "len": -1},
        {"sha1": SHA1, "len": True},
        {"sha1": SHA1, "len": 1.5},
        {"sha1": SHA1, "len": "10"},
        {"sha1": SHA1, "len": 2**53},
        {"sha1": SHA1, "len": 10, "frame": 0},
        {"sha1": SHA1, "len": 10, "frame": 70000},
        {"sha1": SHA1, "len": 10, "block": 4},
        {"sha1": SHA1, "len": 10, "frame": 3, "block": 4},
        {"sha1": SHA1, "len": 10, "frame": 2, "block": 4, "xxh3": {"first": 0, "sums": ["zz"]}},
        {"sha1": SHA1, "len": 10, "frame": 2, "block": 4, "xxh3": {"first": 2, "sums": ["0" * 16, "0" * 16]}},
        {"sha1": SHA1, "len": 10, "frame": 2, "xxh3": {"first": 0, "sums": []}},
        {"sha1": SHA1, "len": 10, "name": 5},
        {"sha1": SHA1, "len": 10, "v": 0},
    ],
)
def test_missing_or_ill_typed_fields_are_dropped_as_malformed(fields):
    result = parse_metadata(fields)
    assert isinstance(result, Dropped) and result.reason is DropReason.MALFORMED_METADATA, result


def test_a_newer_protocol_version_is_dropped_as_unsupported():
    result = parse_metadata({"sha1": SHA1, "len": 1, "v": 2})
    assert isinstance(result, Dropped) and result.reason is DropReason.UNSUPPORTED_VERSION


def test_layout_counts_frames_and_blocks_with_a_short_tail():
    layout = Layout(length=10_001, frame_size=1000, block_size=3000)
    assert (layout.frame_count, layout.block_count, layout.frames_per_block) == (11, 4, 3)
    assert layout.block_span(3) == (9000, 10_001)
    assert layout.frames_in_block(3) == 2


def test_default_block_size_is_whole_frames_near_one_mebibyte():
    assert default_block_size(1400) % 1400 == 0
    assert abs(default_block_size(1400) - (1 << 20)) < 1400
    assert default_block_size(8192) == 1 << 20


@pytest.mark.parametrize("size", [0, 1, 1399, 5 * (1 << 20) + 17])
def test_manifest_metadata_frames_cover_every_block_once_and_fit_the_limit(size):
    image = os.urandom(size)
    manifest = manifest_of(image, frame_size=1400)
    frames = manifest.metadata_frames()
    covered = []
    for fields in frames:
        assert len(encode_metadata(b"c" * 8, fields)) - 16 <= METADATA_PAYLOAD_LIMIT
        parsed = parse_metadata(fields)
        assert isinstance(parsed, StreamMetadata)
        covered.extend(range(parsed.checksums_first, parsed.checksums_first + len(parsed.checksums)))
    assert covered == list(range(manifest.layout.block_count))


def test_a_large_image_needs_several_metadata_frames():
    # 200 blocks of 1400 bytes: more checksums than one frame holds.
    manifest = manifest_of(os.urandom(200 * 1400), frame_size=1400, block_size=1400)
    assert len(manifest.metadata_frames()) > 1


def test_fec_names_the_parity_scheme_and_needs_block_checksums():
    metadata = parse_metadata({"sha1": SHA1, "len": 10, "frame": 8, "block": 8, "fec": "raptorq"})
    assert metadata.fec == "raptorq"
    assert parse_metadata({"sha1": SHA1, "len": 10, "frame": 8, "block": 8, "fec": "reed-solomon"}).fec == "reed-solomon"
    assert parse_metadata({"sha1": SHA1, "len": 10}).fec is None
    for bad in ({"fec": 1}, {"fec": ["raptorq"]}, {"fec": "raptorq", "block": None, "frame": None}):
        fields = {"sha1": SHA1, "len": 10, "frame": 8, "block": 8, **bad}
        fields = {k: v for k, v in fields.items() if v is not None}
        dropped = parse_metadata(fields)
        assert isinstance(dropped, Dropped) and dropped.reason is DropReason.MALFORMED_METADATA


def test_a_manifest_announces_parity_by_default_when_every_block_can_have_it():
    assert manifest_of(os.urandom(5000), frame_size=1000).fec is True
    assert manifest_of(os.urandom(5000), frame_size=1000).metadata_frames()[0]["fec"] == "raptorq"
    assert manifest_of(os.urandom(5000), frame_size=1001).fec is False  # symbols are multiples of 8 bytes
    off = manifest_of(os.urandom(5000), frame_size=1000, fec=False)
    assert off.fec is False and "fec" not in off.metadata_frames()[0]
    assert manifest_of(b"").fec is False
    with pytest.raises(ValueError):
        manifest_of(os.urandom(5000), frame_size=1001, fec=True)
