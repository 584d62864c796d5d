"""`Sha1Cursor`: the whole-image SHA-1 from blocks verified in any order, with and without lent bytes."""

from __future__ import annotations

import hashlib
import os
import random
import threading

from vmcast.protocol import Layout
from vmcast.receiver.hashing import Sha1Cursor
from vmcast.receiver.target import open_target

BLOCK = 64 * 1024


def run_cursor(tmp_path, data: bytes, order: list[int], *, lend: bool, reset_first: bool = False) -> str:
    layout = Layout(length=len(data), frame_size=1024, block_size=BLOCK)
    with open_target(tmp_path / "image.raw", length=len(data), force=True) as target:
        target.pwrite(data, 0)
        cursor = Sha1Cursor(target=target, layout=layout)
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
