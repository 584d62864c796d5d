"""Where the image goes: a regular file or a block device, checked for safety before a byte is written.

Rules (after ironic-python-agent, which refuses disks that are in use and fails closed):

* A block device must hold the whole image: its size comes from ``ioctl(BLKGETSIZE64)``, else from seeking
  to its end; a device whose size cannot be read is refused, even with ``--force``.
* A block device that is mounted, has a mounted partition, is active swap, or is held by another device
  (device mapper, LVM, software RAID: ``/sys/class/block/<dev>/holders``) is refused unless ``force``. So is
  one whose use cannot be determined (``/proc/self/mountinfo`` or ``/sys`` unreadable): "could not determine"
  is a refusal, not a log line. Without ``force`` the device is also opened with ``O_EXCL``, which the kernel
  refuses (``EBUSY``) while anything holds the device, a second guard against a check that missed something.
* A read-only device is refused, even with ``force``.
* A regular file is created (its directory must exist) and truncated to the image length, so it is sparse
  and the right size from the start. An existing non-empty file is refused unless ``force``, or ``reuse``:
  the receiver's state file says an earlier receive of this very image wrote it (`vmcast.receiver.resume`);
  it is then written in place, its bytes kept. A file system without room for the image is refused.
* Anything else (a directory, a character device, a FIFO) is refused.
* `Target.pwrite` never writes past the image length: the assembly already drops frames past the end, and
  the write boundary checks again.
* `Target.zero_range` makes a range read as zeros (the stream's zero blocks, which are never sent): a hole
  punched in a file, ``BLKZEROOUT`` on a device (the device's own zeroing: thin provisioning and SSDs
  make it cheap), plain zeros written where either is refused.
* `Target.start_writeback` asks the kernel to start writing a range to the disk now (``sync_file_range``
  with ``SYNC_FILE_RANGE_WRITE``), so that the final `Target.sync` has little left to write; `sync` alone is
  what makes bytes durable.
* `Target.drop_cached` lets the kernel forget a range's clean page-cache pages (``posix_fadvise`` with
  ``POSIX_FADV_DONTNEED``): the image's bytes are done with once verified, hashed and written back.

Resource handling: `open_target` returns an open `Target`; the caller closes it (`Target.close`, or use it as
a context manager). A file created by `open_target` that is then refused is removed again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno
import fcntl
import os
import stat
import struct
from pathlib import Path
from typing import Self

from .errors import TargetBoundsError, TargetIOError, TargetRefused

# linux/fs.h: _IOR(0x12, 114, size_t), the device size in bytes as a u64.
BLKGETSIZE64 = 0x80081272
# linux/fs.h: _IO(0x12, 127), zero a byte range [start, start + length) of a device (both 512-byte aligned).
BLKZEROOUT = 0x127F
# linux/falloc.h: deallocate the range (it reads as zeros) without changing the file's size.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# Plain zeros are written this much at a time where no faster way is allowed.
ZERO_CHUNK = 1 << 20

# sync_file_range(2) flag: start writeback of the range's dirty pages and return without waiting for it.
SYNC_FILE_RANGE_WRITE = 0x2
# ...and wait for any writeback of the range in progress before (and for the one started after): the range is
# on the disk when the call returns.
SYNC_FILE_RANGE_WAIT_BEFORE = 0x1
SYNC_FILE_RANGE_WAIT_AFTER = 0x4
# Errors by which sync_file_range says it cannot be used here (not a failed write): the hint is dropped.
_WRITEBACK_UNSUPPORTED = frozenset((errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP))

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
# Linux only (glibc and musl have it; elsewhere the attribute is missing and writeback is left to `sync`).
# ctypes releases the GIL around the call: it can block while the device's queue is full.
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    _sync_file_range.restype = ctypes.c_int

SYS_ROOT = Path("/sys")
PROC_ROOT = Path("/proc")


class TargetKind(enum.Enum):
    FILE = "file"
    BLOCK_DEVICE = "block_device"


class Target:
    """An open output, bounded to the image length.

    Error handling: I/O failures raise `TargetIOError`; a write past `length` raises `TargetBoundsError`
    before touching the disk.
    """

    __slots__ = ("_writeback", "capacity", "fd", "kind", "length", "path")

    def __init__(self, *, path: str, kind: TargetKind, length: int, capacity: int, fd: int) -> None:
        self.path = path
        """What the user named (for messages)."""
        self.kind = kind
        """A regular file or a block device."""
        self.length = length
        """The image length: no byte is ever written at or beyond it."""
        self.capacity = capacity
        """The device size (or, for a file, the image length)."""
        self.fd = fd
        """The open descriptor, read-write."""
        self._writeback = _sync_file_range is not None
        """Whether `start_writeback` still asks the kernel (False once it said it cannot)."""

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write all of `data` at `offset`, looping over short writes."""
        size = len(data)
        if offset < 0 or offset + size > self.length:
            raise TargetBoundsError(path=self.path, offset=offset, length=size, limit=self.length)
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self.fd, view, offset)
                if written == 0:
                    raise OSError(errno.ENOSPC, "wrote 0 bytes")
                view = view[written:]
                offset += written
        except OSError as error:
            raise TargetIOError(path=self.path, operation=f"writing {size} bytes at {offset} to", error=error) from error

    def pread_into(self, buffer: bytearray | memoryview, offset: int) -> None:
        """Fill all of `buffer` with the target's bytes at `offset`, looping over short reads."""
        view = memoryview(buffer)
        try:
            while view:
                read = os.preadv(self.fd, [view], offset)
                if read == 0:
                    raise OSError(errno.EIO, f"end of file at {offset}")
                view = view[read:]
                offset += read
        except OSError as error:
            raise TargetIOError(path=self.path, operation=f"reading back at {offset} from", error=error) from error

    def zero_range(self, offset: int, length: int) -> None:
        """Make `length` bytes at `offset` read as zeros: a hole in a file, BLKZEROOUT on a device, else zeros written."""
        if offset < 0 or offset + length > self.length:
            raise TargetBoundsError(path=self.path, offset=offset, length=length, limit=self.length)
        if length <= 0:
            return
        try:
            if self.kind is TargetKind.FILE:
                if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
                    return
                if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            else:
                aligned_start, aligned_end = -(-offset // 512) * 512, (offset + length) // 512 * 512
                if aligned_end > aligned_start:
                    try:
                        fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", aligned_start, aligned_end - aligned_start))
                    except OSError as error:
                        if error.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                            raise
                    else:
                        self._write_zeros(offset, aligned_start - offset)
                        self._write_zeros(aligned_end, offset + length - aligned_end)
                        return
        except OSError as error:
            raise TargetIOError(path=self.path, operation=f"zeroing {length} bytes at {offset} of", error=error) from error
        self._write_zeros(offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        zeros = bytes(min(length, ZERO_CHUNK))
        while length > 0:
            count = min(length, len(zeros))
            self.pwrite(memoryview(zeros)[:count], offset)
            offset += count
            length -= count

    def start_writeback(self, offset: int, length: int) -> None:
        """Start writing the dirty pages of `length` bytes at `offset` to the disk, without waiting for it.

        Why: with plenty of RAM the kernel starts writeback only past ``vm.dirty_background_ratio`` of memory or
        after ``vm.dirty_expire_centisecs`` (30 s), so written bytes pile up dirty until whoever syncs next
        writes them all at once: each state checkpoint (`vmcast.receiver.state`, every 2 s) and the final
        `sync` after the last block, which then waits for up to a checkpoint's worth (0.1 s at 2 Gbit/s on
        loopback). Started as bytes are done with, writeback overlaps the transfer and both find little left.
        The pages stay cached, but clean ones can be reclaimed and one under writeback makes a new write to it
        wait (on devices that need stable pages): call it only for bytes nobody reads or writes again soon
        (after they were verified and hashed). It is a hint: `sync` is what makes bytes durable.

        Error handling: where the kernel or the file cannot do it (ENOSYS, EINVAL, ESPIPE, EOPNOTSUPP, or no
        ``sync_file_range`` in libc) nothing happens, now or later: `sync` writes everything as before. Any
        other error is a write that failed (EIO, ENOSPC...): `TargetIOError` now, rather than from `sync` at
        the end.
        """
        if not self._writeback or length <= 0:
            return
        self._sync_range(offset, length, SYNC_FILE_RANGE_WRITE, "starting writeback of")

    def _sync_range(self, offset: int, length: int, flags: int, doing: str) -> None:
        """``sync_file_range`` with `flags`; where the kernel says it cannot be used, never again."""
        if _sync_file_range(self.fd, offset, length, flags) == 0:
            return
        code = ctypes.get_errno()
        if code in _WRITEBACK_UNSUPPORTED:
            self._writeback = False
            return
        error = OSError(code, os.strerror(code))
        raise TargetIOError(path=self.path, operation=f"{doing} {length} bytes at {offset} to", error=error)

    def drop_cached(self, offset: int, length: int) -> None:
        """Write `length` bytes at `offset` to the disk if they are not yet (waiting for it), then let the
        kernel forget their page-cache pages.

        Why: an image written through the page cache fills it with pages nobody reads again (verified,
        hashed, written back), pushing out what the machine caches for others, like ``dd oflag=nocache``
        avoids. And a page freed here is the next one the kernel hands out for the next write: a warm page.
        Writing into pages of memory nobody touched for a while costs several times as much on a virtual
        machine (the hypervisor maps each on first touch): on this machine's VM, 1 GiB written in 1 MiB writes
        took 1.2-1.6 CPU-s into fresh pages and 0.27-0.29 with the pages 64 MiB behind dropped as it went.

        Why wait for the disk first: where a page of the range cannot be dropped (dirty, under writeback) the
        kernel drains the page lists of every CPU (``lru_add_drain_all``: work queued on each core, waited
        for) and tries again. Dropping ranges still being written did that at every call: on the test bed's
        2 shared cores, 4 receivers doing it every 4 MiB cost the sender 9-10 s of its pacing at 5% loss.
        Call it for bytes written back some time ago (`start_writeback`), and the wait is short.

        Error handling: the write is `start_writeback`'s (a failed one raises `TargetIOError`; where
        ``sync_file_range`` cannot be used, pages not yet on the disk simply stay cached). The drop is a
        hint: where the kernel refuses (a pipe: ESPIPE) nothing happens, as without it.
        """
        if length <= 0:
            return
        if self._writeback:
            self._sync_range(offset, length, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER, "writing")
        try:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # a hint only: the pages stay cached, as without it

    def sync(self) -> None:
        """Make every byte written durable (file data, or the device's cache)."""
        try:
            os.fsync(self.fd)
        except OSError as error:
            raise TargetIOError(path=self.path, operation="syncing", error=error) from error

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_target(path: str | os.PathLike[str], *, force: bool, reuse: bool = False, sys_root: Path = SYS_ROOT, proc_root: Path = PROC_ROOT) -> TargetKind:
    """Everything `open_target` checks that does not need the image length; opens nothing, writes nothing.

    `reuse`: an existing regular file is an earlier receive of this image (resume): not refused for being
    non-empty. It changes nothing for block devices.

    Run it before joining a stream whose length is not known yet, to fail early on a plain mistake.
    """
    name = os.fspath(path)
    found = _stat(name)
    if found is None:
        _check_new_file(name)
        return TargetKind.FILE
    if stat.S_ISBLK(found.st_mode):
        _check_device_free(name, found.st_rdev, force=force, sys_root=sys_root, proc_root=proc_root)
        return TargetKind.BLOCK_DEVICE
    if stat.S_ISREG(found.st_mode):
        if found.st_size and not (force or reuse):
            raise TargetRefused(path=name, reason="the file exists and is not empty (--force overwrites it)")
        return TargetKind.FILE
    raise TargetRefused(path=name, reason=f"it is {_describe_mode(found.st_mode)}, not a regular file or a block device")


def open_target(path: str | os.PathLike[str], *, length: int, force: bool, reuse: bool = False, sys_root: Path = SYS_ROOT, proc_root: Path = PROC_ROOT) -> Target:
    """Check `path` for an image of `length` bytes and open it read-write; refuse with `TargetRefused`.

    An existing file is sized to `length` with ftruncate, which keeps its bytes below `length`: a resume
    (`reuse`) finds the blocks it verified before.
    """
    name = os.fspath(path)
    if length < 0:
        raise TargetRefused(path=name, reason=f"the image length {length} is negative")
    kind = check_target(name, force=force, reuse=reuse, sys_root=sys_root, proc_root=proc_root)
    if kind is TargetKind.BLOCK_DEVICE:
        return _open_device(name, length=length, force=force, sys_root=sys_root)
    return _open_file(name, length=length, force=force)


# -- block devices ------------------------------------------------------------------------------------------


def _open_device(name: str, *, length: int, force: bool, sys_root: Path) -> Target:
    rdev = os.stat(name).st_rdev
    try:
        read_only = (sys_root / "dev" / "block" / f"{os.major(rdev)}:{os.minor(rdev)}" / "ro").read_text().strip() == "1"
    except OSError:
        read_only = False  # (only reachable with force) opening read-write below fails on a read-only device
    if read_only:
        raise TargetRefused(path=name, reason="the device is read-only")
    flags = os.O_RDWR | os.O_CLOEXEC | (0 if force else os.O_EXCL)
    try:
        fd = os.open(name, flags)
    except OSError as error:
        if error.errno == errno.EBUSY:
            reason = "the kernel reports it busy (mounted, swap, or held by device mapper/RAID); --force skips this check"
        else:
            reason = f"cannot open it read-write: {error.strerror}"
        raise TargetRefused(path=name, reason=reason) from error
    try:
        capacity = _device_size(fd, name)
        if length > capacity:
            raise TargetRefused(path=name, reason=f"the image is {length} bytes, the device only {capacity}")
        return Target(path=name, kind=TargetKind.BLOCK_DEVICE, length=length, capacity=capacity, fd=fd)
    except BaseException:
        os.close(fd)
        raise


def _device_size(fd: int, name: str) -> int:
    try:
        (size,) = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))
        return size
    except OSError:
        pass
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError as error:
        raise TargetRefused(path=name, reason=f"could not determine the device size: {error.strerror}") from error


def _device_dir(name: str, rdev: int, sys_root: Path) -> Path:
    device_dir = sys_root / "dev" / "block" / f"{os.major(rdev)}:{os.minor(rdev)}"
    if not device_dir.is_dir():
        raise TargetRefused(path=name, reason=f"could not determine whether it is in use: {device_dir} does not exist")
    return device_dir.resolve()


def _check_device_free(name: str, rdev: int, *, force: bool, sys_root: Path, proc_root: Path) -> None:
    """Refuse a device (or one of its partitions) that is mounted, swap, or held; fail closed."""
    try:
        uses = _device_uses(name, rdev, sys_root=sys_root, proc_root=proc_root)
    except TargetRefused:
        if force:
            return
        raise
    if uses and not force:
        raise TargetRefused(path=name, reason="it is in use: " + "; ".join(uses) + " (--force writes anyway)")


def _device_uses(name: str, rdev: int, *, sys_root: Path, proc_root: Path) -> list[str]:
    device_dir = _device_dir(name, rdev, sys_root)
    # The device itself and every partition on it: "<major>:<minor>" -> kernel name.
    devices = {f"{os.major(rdev)}:{os.minor(rdev)}": device_dir.name}
    try:
        for child in device_dir.iterdir():
            if (child / "partition").is_file():
                devices[_read_text(child / "dev", name).strip()] = child.name
    except OSError as error:
        raise TargetRefused(path=name, reason=f"could not determine its partitions: {error}") from error
    uses = []
    for number, kernel_name in devices.items():
        holders_dir = sys_root / "dev" / "block" / number / "holders"
        try:
            holders = sorted(entry.name for entry in holders_dir.iterdir())
        except OSError as error:
            raise TargetRefused(path=name, reason=f"could not determine whether it is in use: {holders_dir}: {error}") from error
        if holders:
            uses.append(f"{kernel_name} is held by {', '.join(holders)}")
    for mount_point, number in _mounts(name, proc_root):
        if number in devices:
            uses.append(f"{devices[number]} is mounted at {mount_point}")
    for swap in _swaps(name, proc_root):
        if swap in devices:
            uses.append(f"{devices[swap]} is active swap")
    return list(dict.fromkeys(uses))  # a mount found by number and by source is one mount


def _mounts(name: str, proc_root: Path) -> list[tuple[str, str]]:
    """(mount point, "major:minor") of every mount, by its device number and by its source path.

    Both, because some file systems (btrfs) report an anonymous device number in mountinfo's third field.
    """
    mountinfo = proc_root / "self" / "mountinfo"
    mounts = []
    for line in _read_text(mountinfo, name).splitlines():
        fields = line.split()
        try:
            number, mount_point = fields[2], fields[4]
            source = fields[fields.index("-", 6) + 2]
        except (IndexError, ValueError):
            raise TargetRefused(path=name, reason=f"could not determine whether it is mounted: cannot parse {mountinfo}: {line!r}") from None
        mounts.append((mount_point, number))
        source_number = _device_number(source)
        if source_number is not None:
            mounts.append((mount_point, source_number))
    return mounts


def _swaps(name: str, proc_root: Path) -> list[str]:
    swaps = proc_root / "swaps"
    if not swaps.exists():
        return []  # a kernel without swap support has no /proc/swaps
    numbers = []
    for line in _read_text(swaps, name).splitlines()[1:]:
        fields = line.split()
        number = _device_number(fields[0]) if fields else None
        if number is not None:
            numbers.append(number)
    return numbers


def _device_number(path: str) -> str | None:
    """ "major:minor" of a block device path, None when it is not one (or is gone)."""
    if not path.startswith("/"):
        return None
    try:
        found = os.stat(path)
    except OSError:
        return None
    return f"{os.major(found.st_rdev)}:{os.minor(found.st_rdev)}" if stat.S_ISBLK(found.st_mode) else None


# -- regular files ------------------------------------------------------------------------------------------


def _check_new_file(name: str) -> None:
    directory = os.path.dirname(os.path.abspath(name))
    if not os.path.isdir(directory):
        raise TargetRefused(path=name, reason=f"the directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise TargetRefused(path=name, reason=f"cannot create files in {directory}")


def _open_file(name: str, *, length: int, force: bool) -> Target:
    created = _stat(name) is None
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if created else 0)
    try:
        fd = os.open(name, flags, 0o644)
    except OSError as error:
        raise TargetRefused(path=name, reason=f"cannot open it read-write: {error.strerror}") from error
    try:
        try:
            info = os.fstatvfs(fd)
            allocated = os.fstat(fd).st_blocks * 512
        except OSError as error:
            raise TargetRefused(path=name, reason=f"could not determine the free space: {error.strerror}") from error
        free = info.f_bavail * info.f_frsize + allocated
        if length > free:
            raise TargetRefused(path=name, reason=f"the image is {length} bytes, the file system has {free} free")
        try:
            os.ftruncate(fd, length)
        except OSError as error:
            raise TargetRefused(path=name, reason=f"cannot size it to {length} bytes: {error.strerror}") from error
        return Target(path=name, kind=TargetKind.FILE, length=length, capacity=length, fd=fd)
    except BaseException:
        os.close(fd)
        if created:
            os.unlink(name)
        raise


# -- helpers ------------------------------------------------------------------------------------------------


def _stat(name: str) -> os.stat_result | None:
    try:
        return os.stat(name)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise TargetRefused(path=name, reason=f"could not inspect it: {error.strerror}") from error


def _read_text(path: Path, name: str) -> str:
    try:
        return path.read_text()
    except OSError as error:
        raise TargetRefused(path=name, reason=f"could not determine whether it is safe to write: cannot read {path}: {error.strerror or error}") from error


def _describe_mode(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"
