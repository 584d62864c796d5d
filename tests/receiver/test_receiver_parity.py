"""Parity repair (FEC, docs/PROTOCOL.md section 8) in the receiver: frames lost in a loop come back as RaptorQ
parity frames, the pump decodes the block, writes what was missing and checks the block's xxh3 like any.

Real multicast on 127.0.0.1 from the test bed's sender (`receiver_testbed.Sender`), which loses chosen frames
in its first loop and sends parity of their blocks right after them, from another socket, as a server does.
"""

from __future__ import annotations

import trio
from vmcast.receiver.agent import FromGroup, ReceiveRequest, receive

from .receiver_testbed import LOOPBACK, sha1_of

FRAME = 1400
BLOCK_FRAMES = 749  # ~1 MiB blocks of 1400-byte frames
TIMEOUT = 10.0


def lost_frames(image: bytes) -> tuple[frozenset[int], dict[int, int]]:
    """20 frames of block 1 and the last 3 of the image's last block (its short last frame among them), and
    parity for each block: what it lost plus 2 (a decode from exactly K symbols fails ~1% of the time)."""
    frames = -(-len(image) // FRAME)
    lost = [*range(BLOCK_FRAMES + 100, BLOCK_FRAMES + 120), frames - 3, frames - 2, frames - 1]
    last_block = (frames - 1) // BLOCK_FRAMES
    return frozenset(frame * FRAME for frame in lost), {1: 22, last_block: 5}


async def receive_while_sending(sender, output):
    request = ReceiveRequest(
        source=FromGroup(group=sender.group, port=sender.port, cookie=sender.cookie),
        output=str(output), interface=LOOPBACK, timeout=TIMEOUT,
    )  # fmt: skip
    outcome = []
    async with trio.open_nursery() as nursery:

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            outcome.append(await receive(request, task_status=task_status))

        await nursery.start(run)
        sender.start()  # after the join: the receiver hears the first loop, losses and parity
    return outcome[0]


async def test_frames_lost_in_a_loop_are_decoded_from_parity_written_and_verified(image, make_sender, tmp_path):
    lost, parity = lost_frames(image)
    sender = make_sender(image, lost_offsets=lost, parity=parity)
    assert sender.manifest.fec, "1400-byte frames: the stream announces parity"
    result = await receive_while_sending(sender, tmp_path / "out.raw")
    assert result.sha1 == sha1_of(image)
    assert (tmp_path / "out.raw").read_bytes() == image
    assert result.recovered_blocks == 2 and result.recovered_frames == len(lost)
    assert result.corrupt_blocks == 0
    assert len(lost) <= result.parity_frames <= sender.parity_sent
    summary = result.as_dict()
    assert (summary["recovered_blocks"], summary["recovered_frames"]) == (2, len(lost))
    assert summary["recovery_cpu_seconds"] >= 0 and "recovery_failures" in summary


async def test_corrupt_parity_makes_a_wrong_block_that_its_checksum_catches_and_a_later_loop_mends(
    image, make_sender, tmp_path
):
    lost, parity = lost_frames(image)
    sender = make_sender(image, lost_offsets=lost, parity=parity, corrupt_parity=True)
    result = await receive_while_sending(sender, tmp_path / "out.raw")
    # The decodes gave wrong bytes for the missing frames; the blocks' xxh3 refused them, the blocks were taken
    # again from the next loop, and only the right image was reported verified.
    assert result.recovered_blocks >= 1 and result.corrupt_blocks >= 1
    assert result.sha1 == sha1_of(image)
    assert (tmp_path / "out.raw").read_bytes() == image
