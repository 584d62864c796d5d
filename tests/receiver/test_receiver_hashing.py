"""`Sha1Cursor`: the whole-image SHA-1 from blocks verified in any order, with and without lent bytes; and the
writeback it starts, and the page cache it drops, behind itself."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time

import pytest

from vmcast.protocol import Layout
from vmcast.receiver.hashing import DROP_LAG, WRITEBACK_RUN, Sha1Cursor
from vmcast.receiver.target import Target, open_target

BLOCK = 64 * 1024


class RecordingTarget(Target):
    """A real target (sharing an open one's descriptor) that also notes each writeback it is asked to start,
    with the bytes the cursor had hashed by then."""

    __slots__ = ("cursor", "drops", "writebacks")

    def start_writeback(self, offset: int, length: int) -> None:
        self.writebacks.append((offset, length, self.cursor.hashed_bytes))
        super().start_writeback(offset, length)

    def drop_cached(self, offset: int, length: int) -> None:
        self.drops.append((offset, length, self.writebacks[-1][0] + self.writebacks[-1][1]))
        super().drop_cached(offset, length)


def run_cursor(tmp_path, data: bytes, order: list[int], *, lend: bool, reset_first: bool = False, writebacks: list | None = None,
               drops: list | None = None, drop_cache: bool = True) -> str:  # fmt: skip
    layout = Layout(length=len(data), frame_size=1024, block_size=BLOCK)
    with open_target(tmp_path / "image.raw", length=len(data), force=True) as opened:
        opened.pwrite(data, 0)
        target = RecordingTarget(path=opened.path, kind=opened.kind, length=opened.length, capacity=opened.capacity, fd=opened.fd)
        target.writebacks = writebacks if writebacks is not None else []
        target.drops = drops if drops is not None else []
        cursor = target.cursor = Sha1Cursor(target=target, layout=layout, drop_cache=drop_cache)
        thread = threading.Thread(target=cursor.run)
        thread.start()
        try:
            if reset_first:  # what an image mismatch does: everything handed over so far is forgotten
                for block in order[: len(order) // 2]:
                    cursor.verified(block, None)
                cursor.reset()
            for block in order:
                buffer = cursor.take_buffer() if lend else None
                if buffer is not None:
                    start, end = layout.block_span(block)
                    buffer[: end - start] = data[start:end]
                cursor.verified(block, buffer)
            return cursor.digest(stopped=lambda: False)
        finally:
            cursor.close()
            thread.join()


def test_blocks_verified_in_order_with_their_bytes_hash_to_the_image_sha1(tmp_path):
    data = os.urandom(20 * BLOCK + 123)
    assert run_cursor(tmp_path, data, list(range(21)), lend=True) == hashlib.sha1(data).hexdigest()


def test_blocks_verified_out_of_order_are_read_back_when_the_cursor_reaches_them(tmp_path):
    data = os.urandom(20 * BLOCK + 123)
    late_join = list(range(7, 21)) + list(range(7))
    assert run_cursor(tmp_path, data, late_join, lend=True) == hashlib.sha1(data).hexdigest()
    shuffled = list(range(21))
    random.Random(4).shuffle(shuffled)
    assert run_cursor(tmp_path, data, shuffled, lend=False) == hashlib.sha1(data).hexdigest()


def test_a_reset_starts_the_hash_again(tmp_path):
    data = os.urandom(8 * BLOCK)
    assert run_cursor(tmp_path, data, list(range(8)), lend=True, reset_first=True) == hashlib.sha1(data).hexdigest()


def test_an_empty_image_hashes_at_once(tmp_path):
    assert run_cursor(tmp_path, b"", [], lend=False) == hashlib.sha1(b"").hexdigest()


def test_writeback_is_started_in_order_for_hashed_bytes_only_in_runs_and_covers_the_image(tmp_path):
    data = os.urandom(200 * BLOCK + 123)  # 201 blocks: several runs and a short last one
    late_join = list(range(150, 201)) + list(range(150))  # blocks far ahead of the cursor come first
    writebacks: list[tuple[int, int, int]] = []
    assert run_cursor(tmp_path, data, late_join, lend=True, writebacks=writebacks) == hashlib.sha1(data).hexdigest()
    position = 0
    for offset, length, hashed_before in writebacks:
        assert offset == position  # in order, each run starting where the last ended
        assert offset + length <= hashed_before + BLOCK  # nothing past the block just hashed (still to be read)
        assert length >= WRITEBACK_RUN or offset + length == len(data)
        position = offset + length
    assert position == len(data)


@pytest.mark.parametrize("drop_cache", [True, False])
def test_pages_are_dropped_in_order_only_well_behind_the_writeback_started_unless_kept(tmp_path, drop_cache):
    data = os.urandom(DROP_LAG + 3 * WRITEBACK_RUN + 4567)  # drops for the runs past the lag, none for the rest
    drops: list[tuple[int, int, int]] = []
    in_order = list(range(-(-len(data) // BLOCK)))
    assert run_cursor(tmp_path, data, in_order, lend=True, drops=drops, drop_cache=drop_cache) == hashlib.sha1(data).hexdigest()
    if not drop_cache:
        assert drops == []
        return
    position = 0
    for offset, length, written_back in drops:
        assert offset == position and length > 0  # in order, each where the last ended
        assert offset + length == written_back - DROP_LAG  # a lag behind the writeback just started, never closer
        position = offset + length
    assert position == len(data) - DROP_LAG  # the last run, at the image's end, dropped up to a lag behind it


def test_after_a_reset_writeback_starts_again_from_the_beginning(tmp_path):
    per_run = WRITEBACK_RUN // BLOCK
    first, blocks = per_run + per_run // 4, 2 * per_run + per_run // 2  # one run before the reset; 2.5 in all
    data = os.urandom(blocks * BLOCK)
    layout = Layout(length=len(data), frame_size=1024, block_size=BLOCK)
    with open_target(tmp_path / "image.raw", length=len(data), force=True) as opened:
        opened.pwrite(data, 0)
        target = RecordingTarget(path=opened.path, kind=opened.kind, length=opened.length, capacity=opened.capacity, fd=opened.fd)
        target.writebacks, target.drops = [], []
        cursor = target.cursor = Sha1Cursor(target=target, layout=layout)
        thread = threading.Thread(target=cursor.run)
        thread.start()
        try:
            for block in range(first):
                cursor.verified(block, None)
            deadline = time.monotonic() + 10
            while cursor.hashed_bytes < first * BLOCK and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [(offset, length) for offset, length, _ in target.writebacks] == [(0, WRITEBACK_RUN)]
            cursor.reset()  # the image was forgotten: everything is written and hashed again
            for block in range(blocks):
                cursor.verified(block, None)
            assert cursor.digest(stopped=lambda: False) == hashlib.sha1(data).hexdigest()
        finally:
            cursor.close()
            thread.join()
    assert [(offset, length) for offset, length, _ in target.writebacks[1:]] == [(0, WRITEBACK_RUN), (WRITEBACK_RUN, WRITEBACK_RUN), (2 * WRITEBACK_RUN, len(data) - 2 * WRITEBACK_RUN)]
