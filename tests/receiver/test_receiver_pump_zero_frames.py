"""The pump and zero frames (docs/PROTOCOL.md section 5, "Zero frames"): frames announced as zeros are never
sent, and the pump makes them read as zeros on the target before the blocks around them are checked, over old
bytes in a file or on a block device, in a sparse new file, and across a resume.

Real loopback multicast from a `Carousel` sender (receiver_testbed.py), real files and loop devices."""

from __future__ import annotations

import os
import threading
import time

import trio
from vmcast.protocol import Assembly, manifest_of
from vmcast.receiver.agent import FromGroup, ReceiveRequest, receive
from vmcast.receiver.multicast import open_group_socket
from vmcast.receiver.pump import Pump
from vmcast.receiver.state import read_state
from vmcast.receiver.target import open_target

from .receiver_testbed import LOOPBACK, read_device, sha1_of, write_device

TIMEOUT = 10.0
MiB = 1 << 20
FRAME = 1400


def image_of_zero_chunks() -> bytes:
    """1 MiB random, 2 MiB zeros, 1 MiB random: block 1 is all zeros, block 2 all but its last 72 bytes."""
    data = os.urandom(MiB) + bytes(2 * MiB) + os.urandom(MiB)
    manifest = manifest_of(data, frame_size=FRAME)
    assert manifest.zero_blocks == ((1, 1),)
    assert sum(count for _, count in manifest.zero_frames) >= 748
    return data


def request(sender, output, **options) -> ReceiveRequest:
    source = FromGroup(group=sender.group, port=sender.port, cookie=sender.cookie)
    return ReceiveRequest(source=source, output=str(output), interface=LOOPBACK, timeout=TIMEOUT, **options)


def unsent_bytes(data: bytes) -> int:
    return manifest_of(data, frame_size=FRAME).unsent_bytes()


async def test_zero_frames_read_as_zeros_over_the_old_bytes_of_a_file(make_sender, tmp_path):
    image = image_of_zero_chunks()
    output = tmp_path / "out.raw"
    output.write_bytes(b"\xff" * len(image))
    sender = make_sender(image).start()
    result = await receive(request(sender, output, force=True))
    assert result.sha1 == sha1_of(image) and output.read_bytes() == image
    assert result.bytes_received <= len(image) - unsent_bytes(image), "no zero frame came"


async def test_zero_frames_read_as_zeros_on_a_block_device_that_held_other_bytes(make_sender, loop_device):
    image = image_of_zero_chunks()
    device = loop_device(5 * MiB)
    write_device(device, b"\xff" * (5 * MiB))
    sender = make_sender(image).start()
    result = await receive(request(sender, device))
    assert result.sha1 == sha1_of(image)
    assert read_device(device, len(image) + 4) == image + b"\xff" * 4


def test_the_pump_zeroes_and_counts_zero_frames_and_a_new_file_stays_sparse(make_sender, tmp_path):
    image = image_of_zero_chunks()
    manifest = manifest_of(image, frame_size=FRAME)
    sender = make_sender(image)
    group_socket = open_group_socket(group=sender.group, port=sender.port, interface=LOOPBACK)
    output = tmp_path / "out.raw"
    pump = Pump(sock=group_socket.sock, assembly=Assembly(cookie=sender.cookie), gro=group_socket.gro,
                open_target=lambda metadata: open_target(output, length=metadata.length, force=False))
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(pump.run()))
    thread.start()
    sender.start()
    deadline = time.monotonic() + TIMEOUT
    while thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    pump.stop()
    thread.join()
    group_socket.sock.close()
    (result,) = outcome
    assert result is not None and result.sha1 == sha1_of(image)
    assert result.zero_frames == sum(count for _, count in manifest.zero_frames)
    assert result.zero_blocks == 1
    assert result.multicast_bytes == len(image) - manifest.unsent_bytes()
    pump.target.close()
    assert output.read_bytes() == image
    assert output.stat().st_blocks * 512 < len(image) - 2 * MiB + MiB // 4, "the zeros are holes"


async def test_a_resumed_receive_holds_zeros_where_its_blocks_have_zero_frames(make_sender, tmp_path):
    # Zeros every other MiB: most blocks hold zero frames. Old bytes where the zeros go, then an interrupted
    # receive, then one that resumes from the verified blocks.
    image = b"".join(os.urandom(MiB) if chunk % 2 else bytes(MiB) for chunk in range(6))
    assert manifest_of(image, frame_size=FRAME).zero_frames
    output = tmp_path / "out.raw"
    output.write_bytes(b"\xee" * len(image))
    sender = make_sender(image, rate=2e6)  # about 1.6 s for the 3 MiB that are sent
    with trio.move_on_after(1.0):
        async with trio.open_nursery() as nursery:
            await nursery.start(receive, request(sender, output, force=True))
            sender.start()
    saved = read_state(output)
    assert saved is not None and not saved.verified and 0 < saved.verified_block_count < saved.block_count
    result = await receive(request(sender, output))
    assert result.resumed_blocks >= saved.verified_block_count
    assert result.sha1 == sha1_of(image) and output.read_bytes() == image
