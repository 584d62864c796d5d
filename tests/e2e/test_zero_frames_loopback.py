"""Zero frames end to end over real loopback multicast: an image whose zeros are 1 MiB-aligned chunks, which the
1,048,600-byte checksum blocks straddle, is sent as its non-zero frames only (docs/PROTOCOL.md section 3,
``zero_frames``), and `vmcast receive` writes a verified, sparse copy."""

import hashlib
import json
import os
import time

import httpx

from .processes import receiver_result, running_server, sha1_of, start_receiver

MIB = 1 << 20
FRAME = 1400
BLOCK = 749 * FRAME  # vmcast's default block: 1,048,600 bytes
CHUNKS = 24
NONZERO_CHUNKS = {2, 7, 11, 12, 18}  # 5 of 24 MiB hold data (79% zeros), alone and side by side


def write_zero_chunk_image(path) -> bytes:
    data = b"".join(os.urandom(MIB) if chunk in NONZERO_CHUNKS else bytes(MIB) for chunk in range(CHUNKS))
    path.write_bytes(data)
    return data


def frames_holding_data(data: bytes) -> int:
    return sum(1 for offset in range(0, len(data), FRAME) if any(data[offset : offset + FRAME]))


def frames_of_blocks_holding_data(data: bytes) -> int:
    """What a sender that skipped only all-zero blocks would send per loop."""
    return sum(-(-len(data[start : start + BLOCK]) // FRAME) for start in range(0, len(data), BLOCK) if any(data[start : start + BLOCK]))


def test_an_image_of_zero_chunks_sends_only_its_nonzero_frames_and_arrives_verified_and_sparse(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    data = write_zero_chunk_image(images / "chunks.raw")
    expected = hashlib.sha1(data).hexdigest()
    data_frames = frames_holding_data(data)
    block_frames = frames_of_blocks_holding_data(data)
    assert block_frames > 1.6 * data_frames, "the blocks straddle the zero chunks: skipping zero blocks is not enough"

    output = tmp_path / "out.raw"
    with running_server(images, tmp_path, "--rate", "300mbit") as url:
        # The test's own lease keeps the stream going after the receiver is done, to count whole loops.
        lease = httpx.post(f"{url}/v1/streams", json={"image": "chunks.raw"}, timeout=120).json()
        try:
            receiver = start_receiver("chunks.raw", "--server", url, "--output", str(output), log=tmp_path / "r.log")
            code, summary = receiver_result(receiver, timeout=120)
            assert code == 0, (tmp_path / "r.log").read_text()[-2000:]
            deadline = time.monotonic() + 30
            while (stream := httpx.get(f"{url}/v1/streams/{lease['stream_id']}").json())["loops_completed"] < 3:
                assert time.monotonic() < deadline, f"the stream made {stream['loops_completed']} loops"
                time.sleep(0.05)
        finally:
            httpx.delete(f"{url}/v1/leases/{lease['lease_id']}")

    assert summary["sha1"] == expected == sha1_of(output)
    assert output.stat().st_size == len(data)
    allocated, size = output.stat().st_blocks * 512, len(data)
    assert allocated < 0.3 * size, f"the copy is sparse: {allocated} bytes allocated of {size}"
    # The receiver wrote the frames that hold data, not the zeros around them; and what it asked for by repair
    # (before its first metadata frame it does not know which frames are zeros, and the server serves those too).
    assert summary["bytes_received"] <= (data_frames + summary["repair_frames_requested"]) * FRAME, json.dumps(summary)
    assert summary["bytes_received"] < 0.7 * block_frames * FRAME

    # The server: per loop, the frames holding data and a few metadata frames (one a round: 24 blocks fit one).
    loops = stream["loops_completed"]
    carousel_datagrams = stream["datagrams_sent"] - stream["repair_frames_sent"] - stream["parity_frames_sent"]
    assert loops * data_frames <= carousel_datagrams <= (loops + 1) * (data_frames + 10), (
        f"{carousel_datagrams} datagrams in {loops}+ loops; {data_frames} frames hold data, {block_frames} lie in "
        f"blocks that hold data"
    )
