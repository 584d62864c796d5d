"""`Assembly.receive_run`, the fast path for one coalesced receive, ends exactly where feeding each datagram to
`receive_datagram` ends: the same frames held, blocks completed in the same order, bytes written to the same
places, whatever the buffers hold (duplicates, gaps, reordering, another stream's datagrams, parity)."""

from __future__ import annotations

import os

from hypothesis import example, given, settings
from hypothesis import strategies as st
from vmcast.protocol import (
    HEADER_SIZE,
    Assembly,
    BlockVerified,
    DataReceived,
    ParityEncoder,
    RunReceived,
    encode_header,
    encode_metadata,
    encode_parity_header,
    manifest_of,
)

COOKIE = b"runrunru"
FRAME = 104  # a multiple of 8: RaptorQ symbols are
BLOCK = 8 * FRAME  # runs of up to 12 datagrams cross block boundaries
IMAGE = os.urandom(64 * FRAME)  # 64 frames, 8 blocks


class Receiver:
    """An assembly and its disk, fed datagram by datagram (`fast=False`) or run first (`fast=True`)."""

    def __init__(self, *, fast: bool) -> None:
        self.fast = fast
        self.assembly = Assembly(cookie=COOKIE)
        self.disk = bytearray(len(IMAGE))
        self.checked: list[int] = []
        self.decodable: list[int] = []
        self.runs = 0
        manifest = manifest_of(IMAGE, frame_size=FRAME, block_size=BLOCK, fec=True)
        for fields in manifest.metadata_frames():
            self.assembly.receive_datagram(encode_metadata(COOKIE, fields))

    def feed(self, buffer: bytes, segment: int) -> None:
        if self.fast:
            run = self.assembly.receive_run(buffer, segment)
            if run is not None:
                assert isinstance(run, RunReceived)
                self.runs += 1
                for i in range(run.count):
                    start = i * segment + HEADER_SIZE
                    self.disk[run.offset + i * FRAME : run.offset + (i + 1) * FRAME] = buffer[start : start + FRAME]
                for block in run.completed_blocks:
                    self.check(block)
                return
        for start in range(0, len(buffer), segment):
            event = self.assembly.receive_datagram(buffer[start : start + segment])
            if isinstance(event, DataReceived):
                self.disk[event.offset : event.offset + len(event.payload)] = event.payload
                if event.completed_block is not None:
                    self.check(event.completed_block)
                elif event.decodable_block is not None:
                    self.decodable.append(event.decodable_block)

    def check(self, block: int) -> None:
        self.checked.append(block)
        verdict = self.assembly.check_block(block, bytes(self.disk[block * BLOCK : (block + 1) * BLOCK]))
        assert isinstance(verdict, BlockVerified)

    def state(self) -> tuple:
        assembly = self.assembly
        return (assembly.held_frames.tobytes(), list(assembly._block_frames), assembly.received_bytes, assembly.duplicates,
                dict(assembly.drops), assembly.verified_blocks, self.checked, self.decodable, bytes(self.disk))


def data(frame: int, cookie: bytes = COOKIE) -> bytes:
    return encode_header(cookie, frame * FRAME) + IMAGE[frame * FRAME : (frame + 1) * FRAME]


def parity(block: int) -> bytes:
    symbol = ParityEncoder(IMAGE[block * BLOCK : (block + 1) * BLOCK], frame_size=FRAME).symbols(8, 1)[0]
    return encode_parity_header(COOKIE, block=block, esi=8) + symbol


datagram = st.one_of(
    st.integers(0, 63).map(data),  # most: frames of the image
    st.integers(0, 63).map(data),
    st.integers(0, 63).map(lambda frame: data(frame, cookie=b"another!")),
    st.integers(0, 7).map(parity),
)
# A receive: a run of consecutive frames (the common case), or any mix of datagrams.
run = st.tuples(st.integers(0, 63), st.integers(2, 12)).map(lambda r: [data(f) for f in range(r[0], min(64, r[0] + r[1]))])
receive = st.one_of(run, run, st.lists(datagram, min_size=1, max_size=12))


@settings(max_examples=300, deadline=None)
@example([[parity(1)], [data(frame) for frame in range(8, 15)]])  # the run's last frame makes block 1 decodable
@given(st.lists(receive, min_size=1, max_size=30))
def test_the_fast_path_ends_where_the_per_datagram_path_ends(receives: list[list[bytes]]) -> None:
    plain, fast = Receiver(fast=False), Receiver(fast=True)
    for datagrams in receives:
        buffer = b"".join(datagrams)
        for receiver in (plain, fast):
            receiver.feed(buffer, HEADER_SIZE + FRAME)
        assert fast.state() == plain.state()


def test_a_run_of_new_consecutive_frames_is_taken_whole_and_completes_its_blocks():
    receiver = Receiver(fast=True)
    receiver.feed(b"".join(data(frame) for frame in range(4, 18)), HEADER_SIZE + FRAME)  # frames 4-17
    assert receiver.runs == 1 and receiver.checked == [1], "block 1 (frames 8-15) is whole; 0 and 2 are not"
    assert receiver.assembly.received_bytes == 14 * FRAME


def test_anything_unusual_is_left_to_the_per_datagram_path():
    receiver = Receiver(fast=True)
    assembly, segment = receiver.assembly, HEADER_SIZE + FRAME
    receiver.feed(data(5), segment)
    assert assembly.receive_run(b"".join(data(f) for f in (4, 5, 6)), segment) is None, "a duplicate among them"
    assert assembly.receive_run(b"".join(data(f) for f in (10, 12)), segment) is None, "not consecutive"
    assert assembly.receive_run(b"".join(data(f) for f in (11, 10)), segment) is None, "not in order"
    assert assembly.receive_run(data(20) + data(21, cookie=b"another!"), segment) is None, "another stream's"
    assert assembly.receive_run(data(30), segment) is None, "a single datagram"
    assert assembly.receive_run(data(30) + data(31)[:-1], segment) is None, "not whole segments"
    assert assembly.receive_run(parity(3) + parity(4), segment) is None, "parity frames"
    assert assembly.held_frames.count() == 1 and assembly.duplicates == 0, "nothing changed"
