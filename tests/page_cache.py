"""What the page cache holds of a file, from the kernel itself (cachestat(2)): for tests of code that reads
ahead or drops pages, without mocking anything."""

from __future__ import annotations

import ctypes
import os
import struct

import pytest

# cachestat(2) (Linux 6.5, the same number on every architecture): how many of a file's pages are in the page
# cache and how many of those are dirty.
SYS_CACHESTAT = 451
_libc = ctypes.CDLL(None, use_errno=True)


def page_cache(fd: int, offset: int = 0, length: int = 0) -> tuple[int, int]:
    """(cached, dirty) pages of `length` bytes at `offset` of the file behind `fd` (length 0: to its end);
    skips the test where cachestat is missing."""
    byte_range = struct.pack("QQ", offset, length)
    counts = ctypes.create_string_buffer(5 * 8)
    if _libc.syscall(SYS_CACHESTAT, ctypes.c_uint(fd), ctypes.c_char_p(byte_range), counts, ctypes.c_uint(0)) != 0:
        pytest.skip(f"cachestat(2) is not available here: {os.strerror(ctypes.get_errno())}")
    cached, dirty, _writeback, _evicted, _recently_evicted = struct.unpack("5Q", counts.raw)
    return cached, dirty
