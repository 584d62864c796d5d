"""A parity worker process: makes RaptorQ repair symbols for the server (`vmcast.server.parity`).

Run by `ParityWorkers` as ``python -m vmcast.server.parity_worker``; it imports only `vmcast.protocol` (~0.1 s),
not the server. It reads jobs from stdin and writes answers to stdout, in order, until stdin closes.

Wire (all integers big-endian), a job::

    job id u64 | block u32 | frame size u32 | first ESI u32 | count u32 | key length u16 | source u8
    | length u32 | offset u64 | path length u16 | key | what the source says follows

Sources: `KEPT`, nothing follows (use the encoder kept for (key, block)); `INLINE`, the block's `length` bytes
follow; `FILE`, a path follows, and the block is `length` bytes at `offset` of that file (the server names
the image it has open, ``/proc/<its pid>/fd/<n>``: a 1 MiB block is then read here from the page cache,
instead of copied into a pipe by the server and out of it here: 0.8 ms of the server's CPU a job); `FORGET`,
nothing follows and nothing is answered: the stream of `key` ended, drop its encoders and file. An answer::

    job id u64 | status u8 | CPU seconds f64 | symbol count u32 | symbols (count x frame size bytes)

Status `SYMBOLS`: the symbols; `MISSING`: no encoder kept for (key, block) and no block given (ask again with
it); `FAILED`: the job failed (its arguments; a bug of the caller), no symbols; `UNREADABLE`: the file could
not be opened or read whole (send the bytes instead).

The process keeps the encoders of the last `ENCODERS_KEPT` blocks it was given (most recently used last), and
the caller mirrors that list to know when it may leave the block out: jobs are done in order, so both sides
see the same sequence. It keeps the files of the last `FILES_KEPT` streams open, by key.

Error handling: a job that fails answers `FAILED` or `UNREADABLE` and the process goes on; a truncated job
(the server died) ends it.
"""

from __future__ import annotations

import collections
import os
import struct
import sys
import time

from vmcast.protocol import ParityEncoder

JOB = struct.Struct(">QIIIIHBIQH")
ANSWER = struct.Struct(">QBdI")
SYMBOLS, MISSING, FAILED, UNREADABLE = 0, 1, 2, 3
KEPT, INLINE, FILE, FORGET = 0, 1, 2, 3

# Encoders kept, most recently used last: the receivers of a block ask at different moments (each polls every
# 0.1-0.15 s), so its parity is asked for again and again while the carousel is near it. Made again, an
# encoder costs 2.6-6 ms; kept, a further job for the block ~0.5 ms. ~2.6 MiB each: 64 MiB.
ENCODERS_KEPT = 24
# Image files kept open, one per stream, most recently used last: a server runs a few streams at once.
FILES_KEPT = 8


def _read_exactly(stream, size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


class _Files:
    """The streams' image files, open by key (at most `FILES_KEPT`)."""

    def __init__(self) -> None:
        self._open: collections.OrderedDict[bytes, int] = collections.OrderedDict()

    def read(self, key: bytes, path: str, offset: int, length: int) -> bytes | None:
        """`length` bytes at `offset` of the stream's file (opened at `path` the first time); None if it
        cannot be opened or is shorter."""
        fd = self._open.pop(key, None)
        try:
            if fd is None:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._open[key] = fd
            data = os.pread(fd, length, offset)
        except OSError:
            self.forget(key)
            return None
        while len(self._open) > FILES_KEPT:
            os.close(self._open.popitem(last=False)[1])
        return data if len(data) == length else None

    def forget(self, key: bytes) -> None:
        fd = self._open.pop(key, None)
        if fd is not None:
            os.close(fd)


def serve(source, sink) -> None:
    """Do the jobs read from `source` (a binary stream) and write their answers to `sink`, until EOF."""
    encoders: collections.OrderedDict[tuple[bytes, int], ParityEncoder] = collections.OrderedDict()
    files = _Files()
    while True:
        header = _read_exactly(source, JOB.size)
        if header is None:
            return
        job_id, block, frame_size, first, count, key_length, kind, length, offset, path_length = JOB.unpack(header)
        key = _read_exactly(source, key_length)
        given = _read_exactly(source, length if kind == INLINE else path_length if kind == FILE else 0)
        if key is None or given is None:
            return
        if kind == FORGET:
            files.forget(key)
            for stale in [entry for entry in encoders if entry[0] == key]:
                del encoders[stale]
            continue
        started = time.process_time()
        encoder = encoders.pop((key, block), None)
        status, symbols = SYMBOLS, []
        try:
            block_bytes = files.read(key, given.decode(), offset, length) if kind == FILE else given
            if block_bytes is None:
                status = UNREADABLE
            elif block_bytes:
                encoder = ParityEncoder(block_bytes, frame_size=frame_size)
            if status == SYMBOLS and encoder is None:
                status = MISSING
            elif status == SYMBOLS:
                encoders[key, block] = encoder
                symbols = encoder.symbols(first, count)
        except (ValueError, UnicodeDecodeError):
            status, symbols = FAILED, []
        while len(encoders) > ENCODERS_KEPT:
            encoders.popitem(last=False)
        sink.write(ANSWER.pack(job_id, status, time.process_time() - started, len(symbols)))
        for symbol in symbols:
            sink.write(symbol)
        sink.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
