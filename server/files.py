"""File helpers shared by the caches: a file's identity, atomic writes, and an inter-process lock.

A file's identity is (path, size, mtime_ns, inode): if none of them changed, its content is taken as
unchanged, so a server that starts again does not read every image to know what it holds. Replacing an
image by renaming a new file over it changes the inode; writing in place changes mtime_ns.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Files are read in chunks of this size: large enough that the per-call cost of hashing vanishes, small
# enough to stay in the CPU's caches.
READ_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class FileIdentity:
    """What is taken to identify a file's content without reading it."""

    path: str
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        """Identity of the file at `path` (following symbolic links); raises `OSError`."""
        return cls.of_stat(path, os.stat(path))

    @classmethod
    def of_stat(cls, path: Path, stat: os.stat_result) -> FileIdentity:
        return cls(path=str(path), size=stat.st_size, mtime_ns=stat.st_mtime_ns, inode=stat.st_ino)

    def same_content_as(self, stat: os.stat_result) -> bool:
        """Whether an open file's `fstat` still shows this identity (path aside)."""
        return (self.size, self.mtime_ns, self.inode) == (stat.st_size, stat.st_mtime_ns, stat.st_ino)


def read_in_chunks(path: Path, consume: Callable[[memoryview], None]) -> tuple[os.stat_result, os.stat_result]:
    """Feed the whole file to `consume` in order, through one reused buffer; return its `fstat` before and after.

    A caller compares the two (`FileIdentity.same_content_as`) to know the file did not change while read.

    Resource handling: `consume` gets a view of a buffer that is overwritten by the next read: it must use
    the bytes before returning (hashers do).
    """
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        before = os.fstat(file.fileno())
        with contextlib.suppress(OSError):  # only a hint to the kernel's read-ahead
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while count := file.readinto(buffer):
            consume(view[:count])
        after = os.fstat(file.fileno())
    return before, after


def write_atomically(path: Path, data: bytes) -> None:
    """Write `path` so that readers see either the old file or the whole new one, never a part."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive `flock` on `path` (created if needed); yields False if not blocking and it is taken.

    `flock` locks belong to an open file description, so this excludes other threads of this process as
    well as other processes (two `vmcast serve` sharing a cache directory).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock
