"""`DatagramBatch`: recvmmsg into slots laid end to end, on real UDP sockets over loopback.

Datagrams sent to a loopback socket are queued before ``sendto`` returns, so what a test sent is exactly what
one receive can take.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest
from vmcast.receiver.batch_receive import MAX_DATAGRAM, DatagramBatch

from .receiver_testbed import LOOPBACK

SLOT = 1416


@pytest.fixture
def pair():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((LOOPBACK, 0))
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 50_000))  # 50 ms
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind((LOOPBACK, 0))
    yield sender, receiver
    sender.close()
    receiver.close()


def send_all(sender: socket.socket, receiver: socket.socket, datagrams: list[bytes]) -> None:
    for datagram in datagrams:
        sender.sendto(datagram, receiver.getsockname())


def test_one_receive_takes_every_queued_datagram_whole_with_its_source_port(pair):
    sender, receiver = pair
    full = [os.urandom(SLOT) for _ in range(5)]
    odd = [os.urandom(3000), b"x", os.urandom(MAX_DATAGRAM)]  # into the overflow, tiny, the largest there is
    sent = full + odd
    send_all(sender, receiver, sent)
    batch = DatagramBatch(receiver, slot_size=SLOT, slots=16)
    count = batch.receive()
    assert count == len(sent)
    assert batch.lengths(count) == [len(datagram) for datagram in sent]
    assert batch.ports(count) == [sender.getsockname()[1]] * count
    assert [bytes(batch.datagram(index)) for index in range(count)] == sent
    # Whole-frame slots lie end to end, as a coalesced buffer of the same datagrams would.
    assert bytes(batch.view[: 5 * SLOT]) == b"".join(full)


def test_more_than_the_slots_are_left_for_the_next_receive(pair):
    sender, receiver = pair
    sent = [index.to_bytes(2, "big") * (SLOT // 2) for index in range(10)]
    send_all(sender, receiver, sent)
    batch = DatagramBatch(receiver, slot_size=SLOT, slots=4)
    taken = []
    while len(taken) < len(sent):
        count = batch.receive()
        assert 1 <= count <= 4
        taken += [bytes(batch.datagram(index)) for index in range(count)]
    assert taken == sent


def test_nothing_within_the_socket_timeout_is_blocking_io_error(pair):
    _, receiver = pair
    batch = DatagramBatch(receiver, slot_size=SLOT)
    with pytest.raises(BlockingIOError):
        batch.receive()


def test_a_closed_socket_is_an_os_error(pair):
    _, receiver = pair
    batch = DatagramBatch(receiver, slot_size=SLOT)
    receiver.close()
    with pytest.raises(OSError) as raised:
        batch.receive()
    assert not isinstance(raised.value, BlockingIOError)


@pytest.mark.parametrize(("slot_size", "slots"), [(0, 4), (MAX_DATAGRAM + 1, 4), (SLOT, 0)])
def test_impossible_slots_are_refused(pair, slot_size, slots):
    _, receiver = pair
    with pytest.raises(ValueError, match="slots of"):
        DatagramBatch(receiver, slot_size=slot_size, slots=slots)
