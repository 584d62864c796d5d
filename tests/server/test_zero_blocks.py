"""Zero blocks (and the zero frames of a block that is not all zeros) end to end on the server: detected when
the manifest is made, kept in its cache, announced in metadata, and never sent (docs/PROTOCOL.md sections 3 and
4), heard on real loopback multicast."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator

import pytest
from vmcast.protocol import HEADER_SIZE, default_block_size
from vmcast.server.app import create_app
from vmcast.server.settings import Settings

from .server_testing import Images, MulticastListener, TestClient

FRAME = 1400
BLOCK = default_block_size(FRAME)  # 749 frames
ZERO_BLOCKS = {0, 2, 5}
# Fast enough for a few loops of the 3 MB of data within a second, slow enough for a listener on a busy machine.
RATE = "100mbit"


def image_with_zero_blocks() -> bytes:
    """Blocks: zeros, random, zeros, zeros but for the last byte, random, and a short last block of zeros."""
    zeros = bytes(BLOCK)
    return zeros + os.urandom(BLOCK) + zeros + zeros[:-1] + b"\x01" + os.urandom(BLOCK) + bytes(BLOCK // 3)


@pytest.fixture
def zero_client(settings_for: Callable[..., Settings], images: Images) -> Iterator[tuple[TestClient, bytes]]:
    data = image_with_zero_blocks()
    images.path("sparse.raw").write_bytes(data)
    with TestClient(create_app(settings_for(rate=RATE))) as client:
        yield client, data


def test_zero_blocks_are_announced_and_never_sent_and_a_loop_carries_only_the_other_bytes(
    zero_client: tuple[TestClient, bytes], listen: Callable[..., MulticastListener]
) -> None:
    client, data = zero_client
    started = client.post("/v1/streams", json={"image": "sparse.raw"})
    assert started.status_code == 201, started.text
    stream = started.json()
    zero_bytes = 2 * BLOCK + BLOCK // 3 + 748 * FRAME  # the zero blocks, and block 3's zero frames
    assert stream["zero_bytes"] == zero_bytes
    listener = listen(stream["group"], stream["port"], stream["cookie"])
    heard = listener.listen(1.2)  # about four loops of the 3.1 MB that are not zeros

    metadata = [json.loads(item.payload) for item in heard if item.is_metadata]
    assert metadata, "metadata is heard"
    runs = [run for fields in metadata for run in fields.get("zero", [])]
    announced = {block for first, count in runs for block in range(first, first + count)}
    assert announced == ZERO_BLOCKS

    data_frames = [item for item in heard if not item.is_metadata]
    assert not [item.offset for item in data_frames if item.offset // BLOCK in ZERO_BLOCKS], "a zero block was sent"
    # Block 3 is zeros but for its last byte: exactly detected, so not a zero block; its other 748 frames are
    # zero frames (announced in "zero_frames"), so only its last frame is sent.
    assert {item.offset for item in data_frames if item.offset // BLOCK == 3} == {3 * BLOCK + 748 * FRAME}
    zero_frame_runs = {tuple(run) for fields in metadata for run in fields.get("zero_frames", [])}
    assert zero_frame_runs == {(3 * 749, 748)}

    # One loop, from one start of the carousel (block 1's first frame, the first frame not in a zero block) to
    # the next: every frame outside the zero blocks once, nothing else but metadata.
    starts = [index for index, item in enumerate(heard) if item.offset == BLOCK]
    assert len(starts) >= 3, f"at least two whole loops heard, got {len(starts) - 1}"
    nonzero_bytes = len(data) - zero_bytes
    expected_offsets = [
        offset for offset in range(0, len(data), FRAME)
        if offset // BLOCK not in ZERO_BLOCKS and not (offset // BLOCK == 3 and offset < 3 * BLOCK + 748 * FRAME)
    ]
    for begin, end in itertools.pairwise(starts):
        loop = heard[begin:end]
        loop_data = [item for item in loop if not item.is_metadata]
        assert sorted(item.offset for item in loop_data) == expected_offsets
        data_bytes = sum(item.size - HEADER_SIZE for item in loop_data)
        assert data_bytes == nonzero_bytes
        sent = sum(item.size for item in loop)  # UDP payload, frame headers included (as bytes_sent counts)
        metadata_bytes = sum(item.size for item in loop if item.is_metadata)
        assert sent <= 1.03 * nonzero_bytes + metadata_bytes

    status = client.get(f"/v1/streams/{stream['stream_id']}").json()
    assert status["zero_bytes"] == zero_bytes
    assert status["gso"] is True
