"""The whole-image SHA-1, computed while the image arrives, in a thread of its own.

SHA-1 cannot be computed out of order, so a cursor hashes verified blocks in order as they become
contiguous. The datagram pump hands over each verified block together with the bytes it just read back to
check it; when that block is at (or just ahead of) the cursor, those bytes are hashed with no second read.
Blocks verified far ahead of the cursor (after a late join, say) are read back from the target when the
cursor reaches them. When the last block is verified little is left to hash, so `digest` returns quickly.

Why a thread: `hashlib` and `os.preadv` release the GIL on large buffers, so hashing runs on another core
while the pump keeps receiving; catching up after a late join (reading back everything received before the
cursor could move) would otherwise stall the pump for long enough to overflow the socket buffer.

Writeback: the bytes hashed are done with (verified, and read for the last time), so this thread also
starts their writeback (`Target.start_writeback`) in runs of `WRITEBACK_RUN`: the disk writes the image
while it arrives instead of in bursts at each fsync (the state checkpoints', the final one). Here, not in
the pump: the call can block while the device's queue is full. Blocks verified ahead of the cursor are left
dirty until hashed, so reading them back stays a page-cache copy. Bytes whose writeback was started at
least `DROP_LAG` ago are then dropped from the page cache (`Target.drop_cached`), unless the receiver keeps
it (``--keep-cache``): the image does not push out what the machine caches for others, and the pages freed
are the warm ones the kernel hands out for the next writes (several times cheaper to write into on a VM).

Memory: `BUFFER_COUNT` block-sized buffers circulate between the pump and this thread, plus one scratch
buffer here; the pump reads into a pooled buffer when one is free and into its own scratch buffer otherwise.

Error handling: an I/O error while reading back (or starting writeback) is kept and raised from `digest`.
Resource handling: `run` is the thread's body; it returns after `close`.
"""

from __future__ import annotations

import hashlib
import queue
import time
from collections.abc import Callable

from vmcast.protocol import Layout

from .target import Target

# Block buffers shared with the pump: enough that an in-order stream almost always finds one free while
# the cursor hashes the previous ones, few enough to bound memory (8 MiB at the default 1 MiB blocks)...
BUFFER_COUNT = 8
# ...and never more than this in all, whatever the block size (one buffer at least).
BUFFER_BUDGET = 64 << 20

# Hashed bytes are handed to writeback in runs of at least this much (the last run may be shorter): one
# system call per run, and long sequential writes for the disk, started well before the final fsync (4 MiB
# is ~0.1 s at 300 Mbit/s).
WRITEBACK_RUN = 4 << 20

# Bytes written back are dropped from the page cache this far behind the writeback started: by then the disk
# has mostly written them (32 MiB is 50-250 ms of a 1-5 Gbit/s disk), so `Target.drop_cached`, which waits
# for the rest, seldom waits; a disk slower than the stream makes this thread wait for it.
DROP_LAG = 32 << 20

# How long `digest` waits between looks at its caller's stop flag.
_POLL = 0.2

_RESET = "reset"
_CLOSE = "close"
_DIGEST = "digest"


class Sha1Cursor:
    """Hashes an image's verified blocks in order, in a thread that runs `run`."""

    def __init__(self, *, target: Target, layout: Layout, buffer_count: int = BUFFER_COUNT, drop_cache: bool = True) -> None:
        self._target = target
        self._drop_cache = drop_cache
        self._layout = layout
        buffer_count = max(1, min(buffer_count, BUFFER_BUDGET // layout.block_size))
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(buffer_count):
            self._free.put(bytearray(layout.block_size))
        self._window = buffer_count
        self._scratch = bytearray(layout.block_size)
        self._digests: queue.SimpleQueue[str | BaseException] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._start()
        self.hashed_bytes = 0
        """Bytes hashed so far, for progress (written by the thread, read by anyone)."""
        self.cpu_seconds = 0.0
        """CPU time of the thread, once it has ended (`close`, then join it)."""
        self.unhashed_at_digest = 0
        """Bytes of the image not hashed yet when the digest was asked for: what was left for the end."""

    def _start(self) -> None:
        self._sha1 = hashlib.sha1()
        self._cursor = 0
        self._written_back = 0
        """Image offset up to which writeback was started (hashed bytes beyond it are still only dirty)."""
        self._dropped = 0
        """Image offset up to which the page cache was dropped (`DROP_LAG` behind `_written_back`)."""
        self._verified = bytearray(self._layout.block_count)
        self._pending: dict[int, bytearray] = {}
        self._digest_wanted = False
        self.hashed_bytes = 0

    # -- the pump's side ------------------------------------------------------------------------------------

    def take_buffer(self) -> bytearray | None:
        """A free block-sized buffer to read a block into, or None when all are in flight."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return None

    def give_back(self, buffer: bytearray) -> None:
        """Return a buffer from `take_buffer` that held nothing worth hashing."""
        self._free.put(buffer)

    def verified(self, block: int, buffer: bytearray | None) -> None:
        """Block `block` is verified; `buffer` (from `take_buffer`) holds its bytes, or None."""
        self._inbox.put((block, buffer))

    def reset(self) -> None:
        """The image was forgotten (whole-image SHA-1 mismatch): start hashing again from block 0."""
        self._inbox.put((_RESET,))

    def digest(self, *, stopped: Callable[[], bool]) -> str | None:
        """The SHA-1 (hex) of the whole image once every block was handed over; None if `stopped()` first."""
        self._inbox.put((_DIGEST,))
        while True:
            try:
                answer = self._digests.get(timeout=_POLL)
            except queue.Empty:
                if stopped():
                    return None
                continue
            if isinstance(answer, BaseException):
                raise answer
            return answer

    def close(self) -> None:
        self._inbox.put((_CLOSE,))

    # -- the thread ---------------------------------------------------------------------------------------------

    def run(self) -> None:
        started = time.thread_time()
        try:
            self._run()
        finally:
            self.cpu_seconds = time.thread_time() - started

    def _run(self) -> None:
        while True:
            if self._error is None and self._cursor < self._layout.block_count and self._verified[self._cursor]:
                # Read what came in first, so buffers the pump lent go back to it as soon as possible.
                while True:
                    try:
                        message = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if not self._handle(message):
                        return
                self._hash_cursor_block()
                continue
            if self._digest_wanted and (self._error is not None or self._cursor == self._layout.block_count):
                self._digest_wanted = False
                self._digests.put(self._error if self._error is not None else self._sha1.hexdigest())
                continue
            if not self._handle(self._inbox.get()):
                return

    def _handle(self, message: tuple) -> bool:
        kind = message[0]
        if kind == _CLOSE:
            return False
        if kind == _RESET:
            for buffer in self._pending.values():
                self._free.put(buffer)
            self._start()
        elif kind == _DIGEST:
            self._digest_wanted = True
            self.unhashed_at_digest = self._layout.length - self.hashed_bytes
        else:
            block, buffer = message
            self._verified[block] = 1
            if buffer is not None:
                if self._cursor <= block < self._cursor + self._window and block not in self._pending:
                    self._pending[block] = buffer
                else:
                    self._free.put(buffer)
        return True

    def _hash_cursor_block(self) -> None:
        block = self._cursor
        start, end = self._layout.block_span(block)
        buffer = self._pending.pop(block, None)
        try:
            if buffer is None:
                view = memoryview(self._scratch)[: end - start]
                self._target.pread_into(view, start)
                self._sha1.update(view)
            else:
                self._sha1.update(memoryview(buffer)[: end - start])
                self._free.put(buffer)
            if end - self._written_back >= WRITEBACK_RUN or block + 1 == self._layout.block_count:
                self._target.start_writeback(self._written_back, end - self._written_back)
                self._written_back = end
                if self._drop_cache and end - DROP_LAG > self._dropped:
                    self._target.drop_cached(self._dropped, end - DROP_LAG - self._dropped)
                    self._dropped = end - DROP_LAG
        except Exception as error:  # noqa: BLE001 - not lost: handed to whoever asks for the digest
            self._error = error
            return
        self._cursor += 1
        self.hashed_bytes += end - start
