"""Target safety: what `open_target` accepts, what it refuses, and that a refusal writes nothing; and that
`Target.start_writeback` starts writing what it is asked to (seen with cachestat(2)), or nothing at all; and
`Target.drop_cached` takes clean pages out of the page cache and loses no byte.

Real files, real loop devices (root and losetup), a real ext4 mount; "cannot inspect" cases point the
checks at /proc and /sys trees built in a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from vmcast.receiver import target as target_module
from vmcast.receiver.errors import TargetBoundsError, TargetRefused
from vmcast.receiver.target import Target, TargetKind, check_target, open_target

from ..page_cache import page_cache

MiB = 1 << 20

def dirty_pages(fd: int) -> int:
    """Dirty (not yet written back) cached pages of the whole file behind `fd`; skips where cachestat is missing."""
    return page_cache(fd)[1]


def test_a_new_file_is_created_sparse_at_the_image_length(tmp_path):
    path = tmp_path / "image.raw"
    with open_target(path, length=64 * MiB, force=False) as target:
        assert target.kind is TargetKind.FILE
        assert os.path.getsize(path) == 64 * MiB
        assert os.stat(path).st_blocks * 512 < MiB  # sparse: nothing allocated yet


def test_an_existing_non_empty_file_is_refused_without_force(tmp_path):
    path = tmp_path / "image.raw"
    path.write_bytes(b"precious")
    with pytest.raises(TargetRefused, match="exists and is not empty"):
        open_target(path, length=MiB, force=False)
    assert path.read_bytes() == b"precious"
    with open_target(path, length=MiB, force=True):
        assert os.path.getsize(path) == MiB


def test_an_existing_empty_file_is_used(tmp_path):
    path = tmp_path / "image.raw"
    path.touch()
    with open_target(path, length=MiB, force=False) as target:
        assert target.length == MiB


@pytest.mark.parametrize("make, reason", [
    (lambda tmp: str(tmp), "a directory"),
    (lambda tmp: "/dev/null", "a character device"),
    (lambda tmp: str(tmp / "missing-dir" / "image.raw"), "does not exist"),
])
def test_what_is_neither_file_nor_block_device_is_refused(tmp_path, make, reason):
    with pytest.raises(TargetRefused, match=reason):
        open_target(make(tmp_path), length=MiB, force=True)


def test_a_file_system_without_room_for_the_image_is_refused_and_the_file_removed(tmp_path):
    path = tmp_path / "huge.raw"
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(TargetRefused, match="free"):
        open_target(path, length=free + 1024 * MiB, force=False)
    assert not path.exists()


def test_writes_stop_at_the_image_length(tmp_path):
    with open_target(tmp_path / "image.raw", length=10, force=False) as target:
        target.pwrite(b"0123456789", 0)
        with pytest.raises(TargetBoundsError):
            target.pwrite(b"x", 10)
        with pytest.raises(TargetBoundsError):
            target.pwrite(b"abc", 8)
    assert (tmp_path / "image.raw").read_bytes() == b"0123456789"


def check_writeback_starts_and_bytes_stay(target: Target, path: str) -> None:
    data = os.urandom(8 * MiB)
    target.pwrite(data, 0)
    if dirty_pages(target.fd) == 0:
        pytest.skip("this file system keeps no dirty pages (tmpfs?): nothing to write back")
    target.start_writeback(MiB, 4 * MiB)
    assert 0 < dirty_pages(target.fd) <= 4 * MiB // os.sysconf("SC_PAGE_SIZE")  # only that range was started
    target.start_writeback(0, 8 * MiB)
    assert dirty_pages(target.fd) == 0  # submitted (under writeback, or written already): not left for sync
    target.sync()
    with open(path, "rb") as written:
        assert written.read(8 * MiB) == data


@pytest.fixture(params=["file", "block device"])
def target_of_8_mib(request, tmp_path):
    """An open 8 MiB target and its path: a new file, or a loop device (the page cache works alike for both)."""
    path = str(tmp_path / "image.raw") if request.param == "file" else request.getfixturevalue("loop_device")(8 * MiB)
    with open_target(path, length=8 * MiB, force=False) as target:
        yield target, path


def test_start_writeback_submits_the_range_and_keeps_the_bytes(target_of_8_mib):
    check_writeback_starts_and_bytes_stay(*target_of_8_mib)


def test_start_writeback_does_nothing_where_the_kernel_cannot_do_it(tmp_path):
    # A pipe: sync_file_range refuses it (ESPIPE); the hint is dropped, and never tried again.
    read_end, write_end = os.pipe()
    try:
        target = Target(path="pipe", kind=TargetKind.FILE, length=MiB, capacity=MiB, fd=write_end)
        target.start_writeback(0, MiB)
        target.start_writeback(0, MiB)
    finally:
        os.close(read_end)
        os.close(write_end)


def check_clean_pages_are_dropped_and_bytes_stay(target: Target, path: str) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    data = os.urandom(8 * MiB)
    target.pwrite(data, 0)
    target.sync()  # every page clean: the kernel may drop any of them
    if page_cache(target.fd, 0, 8 * MiB)[0] < 8 * MiB // page:
        pytest.skip("this file system does not keep the pages written in the page cache")
    target.drop_cached(0, 4 * MiB)
    assert page_cache(target.fd, 0, 4 * MiB)[0] == 0  # the range asked: gone
    assert page_cache(target.fd, 4 * MiB, 4 * MiB)[0] == 4 * MiB // page  # the rest: untouched
    target.pwrite(data[:MiB], 0)  # dirty again: not on the disk yet, written first, then dropped too
    target.drop_cached(0, 8 * MiB)
    assert page_cache(target.fd, 0, 8 * MiB) == (0, 0)
    target.drop_cached(0, 0)  # nothing asked: nothing happens
    with open(path, "rb") as written:
        assert written.read(8 * MiB) == data  # dropped from memory, not from the disk


def test_drop_cached_forgets_clean_pages_and_loses_no_byte(target_of_8_mib):
    check_clean_pages_are_dropped_and_bytes_stay(*target_of_8_mib)


def test_drop_cached_does_nothing_where_the_kernel_cannot_do_it():
    read_end, write_end = os.pipe()  # posix_fadvise refuses a pipe (ESPIPE): a hint, dropped
    try:
        Target(path="pipe", kind=TargetKind.FILE, length=MiB, capacity=MiB, fd=write_end).drop_cached(0, MiB)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_start_writeback_does_nothing_without_sync_file_range_in_libc(tmp_path, monkeypatch):
    monkeypatch.setattr(target_module, "_sync_file_range", None)  # a libc without it (not Linux)
    with open_target(tmp_path / "image.raw", length=MiB, force=False) as target:
        target.pwrite(b"x" * MiB, 0)
        target.start_writeback(0, MiB)
        target.sync()
    assert (tmp_path / "image.raw").read_bytes() == b"x" * MiB


def test_a_free_block_device_large_enough_is_accepted(loop_device):
    device = loop_device(4 * MiB)
    with open_target(device, length=3 * MiB, force=False) as target:
        assert target.kind is TargetKind.BLOCK_DEVICE
        assert target.capacity == 4 * MiB
        assert target.length == 3 * MiB


def test_an_image_larger_than_the_block_device_is_refused_and_nothing_written(loop_device):
    device = loop_device(MiB)
    with open(device, "rb") as before:
        original = before.read()
    with pytest.raises(TargetRefused, match=f"the device only {MiB}"):
        open_target(device, length=MiB + 1, force=True)  # --force never overrides the size
    with open(device, "rb") as after:
        assert after.read() == original


def test_a_mounted_block_device_is_refused_unless_forced(loop_device, tmp_path):
    device = loop_device(16 * MiB)
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed")
    subprocess.run(["mkfs.ext4", "-q", device], check=True)
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", device, str(mount_point)], check=False, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount here: {mounted.stderr.strip()}")
    try:
        with pytest.raises(TargetRefused, match=f"is mounted at {mount_point}"):
            check_target(device, force=False)
        with pytest.raises(TargetRefused, match="mounted"):
            open_target(device, length=MiB, force=False)
        with open_target(device, length=MiB, force=True) as target:  # opened only; nothing is written here
            assert target.kind is TargetKind.BLOCK_DEVICE
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_device_whose_use_cannot_be_determined_is_refused(loop_device, tmp_path):
    device = loop_device(MiB)
    empty_proc = tmp_path / "proc"
    empty_proc.mkdir()
    with pytest.raises(TargetRefused, match="could not determine"):
        open_target(device, length=MiB, force=False, proc_root=empty_proc)
    empty_sys = tmp_path / "sys"
    empty_sys.mkdir()
    with pytest.raises(TargetRefused, match="could not determine"):
        open_target(device, length=MiB, force=False, sys_root=empty_sys)
    with open_target(device, length=MiB, force=True, proc_root=empty_proc):
        pass  # --force accepts the risk of an unknown state, not of a wrong size


def test_a_device_held_by_another_device_is_refused(loop_device, tmp_path):
    """Device mapper, LVM and RAID show as holders in sysfs; a copied sysfs entry with a holder added stands in."""
    device = loop_device(MiB)
    rdev = os.stat(device).st_rdev
    number = f"{os.major(rdev)}:{os.minor(rdev)}"
    fake_device = tmp_path / "sys" / "devices" / os.path.basename(device)
    (fake_device / "holders" / "dm-7").mkdir(parents=True)
    (fake_device / "ro").write_text("0\n")
    (tmp_path / "sys" / "dev" / "block").mkdir(parents=True)
    (tmp_path / "sys" / "dev" / "block" / number).symlink_to(fake_device)
    with pytest.raises(TargetRefused, match="held by dm-7"):
        open_target(device, length=MiB, force=False, sys_root=tmp_path / "sys")


# -- zero_range: what zero blocks and zero frames (docs/PROTOCOL.md section 5) become on the target ---------------


# Frame-sized ranges (1,400 bytes) start and end anywhere in a 4 KiB page or a 512-byte sector.
UNALIGNED_RANGES = [(1400, 2800), (4096 - 1400, 1400), (3 * 1400, 749 * 1400), (MiB - 7, 1400 * 3 + 11)]


def check_zero_range(target: Target, path: str, size: int) -> None:
    data = bytearray(os.urandom(size))
    target.pwrite(data, 0)
    for offset, length in UNALIGNED_RANGES:
        target.zero_range(offset, length)
        data[offset : offset + length] = bytes(length)
    target.sync()
    with open(path, "rb") as written:
        assert written.read(size) == data  # the bytes around each range are untouched


def test_zero_range_zeroes_unaligned_ranges_of_a_file_and_leaves_the_rest(tmp_path):
    path = tmp_path / "image.raw"
    with open_target(path, length=4 * MiB, force=False) as target:
        check_zero_range(target, str(path), 4 * MiB)


def test_zero_range_zeroes_unaligned_ranges_of_a_block_device_and_leaves_the_rest(loop_device):
    device = loop_device(4 * MiB)
    with open_target(device, length=4 * MiB, force=False) as target:
        check_zero_range(target, device, 4 * MiB)


def test_zero_range_of_a_whole_region_of_a_file_leaves_a_hole(tmp_path):
    path = tmp_path / "image.raw"
    with open_target(path, length=8 * MiB, force=False) as target:
        target.pwrite(os.urandom(8 * MiB), 0)
        target.sync()
        target.zero_range(1400, 6 * MiB)  # unaligned at both ends, as a run of zero frames is
        target.sync()
    allocated = os.stat(path).st_blocks * 512
    assert allocated <= 2 * MiB + 2 * 4096, f"{allocated} bytes still allocated"
    assert path.read_bytes()[1400 : 1400 + 6 * MiB] == bytes(6 * MiB)


def test_zero_range_stops_at_the_image_length(tmp_path):
    with open_target(tmp_path / "image.raw", length=10, force=False) as target, pytest.raises(TargetBoundsError):
        target.zero_range(8, 3)
