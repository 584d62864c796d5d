"""Direct I/O: frames of whole pages are written by O_DIRECT, past the page cache (seen with cachestat(2)),
into files and block devices; blocks are judged from the bytes written, so a corrupted frame is still
caught; anything the kernel refuses falls back to ordinary writes. Real files, loop devices, multicast."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

import pytest
import trio
from vmcast.receiver.agent import FromGroup, ReceiveRequest, receive
from vmcast.receiver.target import DIRECT_ALIGNMENT, open_target

from .receiver_testbed import LOOPBACK, read_device, sha1_of, write_device

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
TIMEOUT = 20.0
SYS_CACHESTAT = 451  # cachestat(2), Linux 6.5: the same number on every architecture
_libc = ctypes.CDLL(None, use_errno=True)


def cached_pages(path: str) -> int:
    """Pages of the file (or device) at `path` in the page cache; skips where cachestat is missing."""
    fd = os.open(path, os.O_RDONLY)
    try:
        counts = ctypes.create_string_buffer(5 * 8)
        whole_file = struct.pack("QQ", 0, 0)
        if _libc.syscall(SYS_CACHESTAT, ctypes.c_uint(fd), ctypes.c_char_p(whole_file), counts, ctypes.c_uint(0)) != 0:
            pytest.skip(f"cachestat(2) is not available here: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
    return struct.unpack("5Q", counts.raw)[0]


def aligned(data: bytes) -> memoryview:
    """`data` in page-aligned memory (an anonymous map), as the receiver's stage holds it."""
    memory = mmap.mmap(-1, len(data))
    memory[:] = data
    return memoryview(memory)


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def check_direct_writes_leave_no_pages_cached(path: str, length: int) -> None:
    data = os.urandom(4 * MiB)
    with open_target(path, length=length, force=False) as target:
        if not target.open_direct():
            pytest.skip("this file system refuses O_DIRECT")
        drop_cache(path)
        target.pwrite_direct(aligned(data), MiB)
        assert cached_pages(path) == 0, "direct writes go past the page cache"
        target.pwrite(b"beside", 0)  # an ordinary write beside them, by the other descriptor
        assert cached_pages(path) >= 1
        target.sync()
    with open(path, "rb") as written:
        assert written.read(5 * MiB) == b"beside" + bytes(MiB - 6) + data


def test_direct_writes_to_a_file_leave_no_pages_cached(tmp_path):
    check_direct_writes_leave_no_pages_cached(str(tmp_path / "image.raw"), 8 * MiB)


def test_direct_writes_to_a_block_device_leave_no_pages_cached(loop_device):
    device = loop_device(8 * MiB)
    check_direct_writes_leave_no_pages_cached(device, 8 * MiB)


def test_a_direct_write_is_in_whole_pages_and_inside_the_image(tmp_path):
    with open_target(tmp_path / "image.raw", length=MiB, force=False) as target:
        target.open_direct()
        with pytest.raises(ValueError):
            target.pwrite_direct(aligned(bytes(DIRECT_ALIGNMENT)), 100)
        with pytest.raises(ValueError):
            target.pwrite_direct(aligned(bytes(5000)), 0)
        from vmcast.receiver.errors import TargetBoundsError

        with pytest.raises(TargetBoundsError):
            target.pwrite_direct(aligned(bytes(2 * DIRECT_ALIGNMENT)), MiB - DIRECT_ALIGNMENT)


def test_a_direct_write_the_kernel_refuses_is_written_as_usual_and_direct_io_ends(tmp_path):
    path = tmp_path / "image.raw"
    data = os.urandom(64 * 1024)
    with open_target(path, length=MiB, force=False) as target:
        if not target.open_direct():
            pytest.skip("this file system refuses O_DIRECT")
        misaligned = memoryview(bytearray(len(data) + 1))[1:]  # one byte past an allocation: never page-aligned
        misaligned[:] = data
        target.pwrite_direct(misaligned, 0)  # EINVAL from the kernel: written by the ordinary descriptor
        assert not target.direct
        target.sync()
    assert path.read_bytes()[: len(data)] == data


def receive_request(sender, output, **options) -> ReceiveRequest:
    source = FromGroup(group=sender.group, port=sender.port, cookie=sender.cookie)
    return ReceiveRequest(source=source, output=str(output), interface=LOOPBACK, timeout=TIMEOUT, **options)


async def test_a_stream_of_page_sized_frames_is_written_past_the_page_cache(image, make_sender, tmp_path):
    sender = make_sender(image, frame_size=8192).start()
    output = tmp_path / "out.raw"
    result = await receive(receive_request(sender, output))
    assert result.sha1 == sha1_of(image)
    # The image's short last frame (and its block) go the ordinary way: a few pages at most, not ~800.
    assert cached_pages(str(output)) <= 2 * MiB // PAGE
    assert output.read_bytes() == image

    buffered = tmp_path / "buffered.raw"
    result = await receive(receive_request(sender, buffered, direct_io=False))
    assert result.sha1 == sha1_of(image)
    assert cached_pages(str(buffered)) >= len(image) // PAGE - 1, "--no-direct-io writes through the cache"


async def test_with_direct_io_a_corrupted_frame_still_fails_its_block_which_is_taken_again(image, make_sender, tmp_path):
    # Blocks written by direct I/O are judged from the bytes handed to the device: corrupt ones too.
    frame = 8192
    sender = make_sender(image, frame_size=frame, corrupt_offsets=frozenset({frame * 10, frame * 200}))
    async with trio.open_nursery() as nursery:
        outcome = []

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            outcome.append(await receive(receive_request(sender, tmp_path / "out.raw"), task_status=task_status))

        await nursery.start(run)
        sender.start()  # after the join, so the receiver sees the corrupted first loop
    result = outcome[0]
    assert result.corrupt_blocks == 2
    assert result.sha1 == sha1_of(image)
    assert (tmp_path / "out.raw").read_bytes() == image


async def test_a_block_device_receives_page_sized_frames_by_direct_io(image, make_sender, loop_device):
    device = loop_device(4 * MiB)
    write_device(device, bytes(len(image)) + b"tail" * 1000)
    sender = make_sender(image, frame_size=8192).start()
    result = await receive(receive_request(sender, device))
    assert result.sha1 == sha1_of(image)
    assert read_device(device, len(image) + 4000) == image + b"tail" * 1000  # never written past the image
