"""How the pump takes datagrams from its socket (`vmcast.receiver.pump`). UDP GRO: a sender's GSO batches
arrive as one buffer per batch, and the receiver cuts them into their datagrams. Batches: where the datagrams
come one by one instead, the pump turns GRO off and takes what is queued with recvmmsg.

Real loopback multicast: batches are sent with ``sendmsg`` and a ``UDP_SEGMENT`` control message, as
`vmcast.server.sender` sends them; loopback hands a GRO socket each batch whole, and a socket without GRO its
datagrams one by one. Most tests send the image exactly once, so a datagram the receiver lost would be
missing for good: a verified receive with no duplicates proves every datagram of every batch was taken.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import trio
from vmcast.protocol import HEADER_SIZE, Assembly, DropReason, encode_data, manifest_of
from vmcast.protocol.carousel import Carousel, SendMetadata
from vmcast.receiver.agent import FromGroup, FromServer, ReceiveRequest, receive
from vmcast.receiver.multicast import UDP_GRO, enable_gro, open_group_socket
from vmcast.receiver.pump import BATCH_JUDGED_AFTER, Pump
from vmcast.receiver.target import open_target

from .receiver_testbed import (
    LOOPBACK,
    LeaseServer,
    free_group,
    gso_unavailable,
    multicast_sender_socket,
    send_batch,
    sha1_of,
)

pytestmark = pytest.mark.skipif(gso_unavailable() is not None, reason=gso_unavailable() or "")

FRAME = 1400
# As many frames as `vmcast.server.sender` puts in one batch of 1400-byte frames.
BATCH = 45
TIMEOUT = 10.0
GRO = pytest.mark.parametrize("gro", [True, False], ids=["gro", "no-gro"])


class OneShot:
    """Sends an image once: its metadata, then its data frames in GSO batches of `BATCH`, then the metadata
    again; garbage may be slipped into the batches. Sent from a trio worker thread, after the receiver joined."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.group, self.port = free_group()
        self.cookie = os.urandom(8)
        self.manifest = manifest_of(data, name="gro-test", frame_size=FRAME)
        action = Carousel(manifest=self.manifest, cookie=self.cookie, metadata_interval=1.0).next_send(0.0)
        assert isinstance(action, SendMetadata)
        self.metadata = list(action.datagrams)
        self.batches = 0
        self.short_tail_batches = 0

    @property
    def frames(self) -> list[bytes]:
        return [encode_data(self.cookie, offset, self.data[offset : offset + FRAME]) for offset in range(0, len(self.data), FRAME)]

    def send(self, batches: list[list[bytes]]) -> None:
        destination = (self.group, self.port)
        with multicast_sender_socket() as sock:
            for datagram in self.metadata:
                send_batch(sock, [datagram], destination)
            for batch in batches:
                send_batch(sock, batch, destination)
                if len(batch) > 1:
                    self.batches += 1
                    if len(batch[-1]) < len(batch[0]):
                        self.short_tail_batches += 1
            for datagram in self.metadata:
                send_batch(sock, [datagram], destination)

    def request(self, output, *, gro: bool, batch: bool = True) -> ReceiveRequest:
        source = FromGroup(group=self.group, port=self.port, cookie=self.cookie)
        # No HTTP, no second loop: what the batches carried is all the receiver gets.
        return ReceiveRequest(source=source, output=str(output), interface=LOOPBACK, timeout=TIMEOUT, gro=gro, batch=batch, fallback_after=None)


def batches_of(frames: list[bytes], size: int = BATCH) -> list[list[bytes]]:
    return [frames[start : start + size] for start in range(0, len(frames), size)]


async def receive_while_sending(sender: OneShot, request: ReceiveRequest, batches: list[list[bytes]]):
    async with trio.open_nursery() as nursery:
        outcome = []

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            outcome.append(await receive(request, task_status=task_status))

        await nursery.start(run)  # joined: nothing sent from now on can be missed
        await trio.to_thread.run_sync(sender.send, batches)
    return outcome[0]


def test_the_socket_asks_for_gro_and_can_go_without():
    group, port = free_group()
    with_gro = open_group_socket(group=group, port=port, interface=LOOPBACK)
    without = open_group_socket(group=group, port=port, interface=LOOPBACK, gro=False)
    try:
        assert with_gro.gro and with_gro.sock.getsockopt(socket.IPPROTO_UDP, UDP_GRO) == 1
        assert not without.gro and without.sock.getsockopt(socket.IPPROTO_UDP, UDP_GRO) == 0
    finally:
        with_gro.sock.close()
        without.sock.close()


def test_a_socket_that_refuses_gro_is_reported_without_it_and_no_exception():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert enable_gro(sock) is False  # a TCP socket has no UDP_GRO: ENOPROTOOPT


@GRO
async def test_gso_batches_are_received_verified_and_byte_identical(gro, tmp_path):
    data = os.urandom(3 << 20)  # a multiple of no frame: the last frame is short
    sender = OneShot(data)
    frames = sender.frames
    result = await receive_while_sending(sender, sender.request(tmp_path / "out.raw", gro=gro), batches_of(frames))
    assert result.sha1 == sha1_of(data) == sender.manifest.sha1
    assert (tmp_path / "out.raw").read_bytes() == data
    assert result.gro is gro
    if gro:
        # One receive per batch, each with all the batch's datagrams.
        assert result.coalesced == sender.batches == len(batches_of(frames))
    else:
        assert result.coalesced == 0
    assert result.duplicates == 0 and result.drops == {}
    assert result.datagrams >= len(frames) + len(sender.metadata)  # the closing metadata may come too late to count
    assert result.bytes_received == len(data)


@GRO
async def test_a_batch_ending_with_the_short_last_frame_of_the_image(gro, tmp_path):
    data = os.urandom(BATCH * FRAME * 3 + 5 * FRAME + 77)  # the last batch: 5 whole frames and one of 77 bytes
    sender = OneShot(data)
    frames = sender.frames
    batches = batches_of(frames)
    assert len(batches[-1]) == 6 and len(batches[-1][-1]) == HEADER_SIZE + 77
    result = await receive_while_sending(sender, sender.request(tmp_path / "out.raw", gro=gro), batches)
    assert sender.short_tail_batches == 1
    assert result.sha1 == sha1_of(data)
    assert (tmp_path / "out.raw").read_bytes() == data
    assert result.duplicates == 0 and result.drops == {}
    if gro:
        assert result.coalesced == len(batches)


@GRO
async def test_garbage_inside_a_batch_is_counted_and_dropped_and_its_neighbours_kept(gro, tmp_path):
    data = os.urandom(2 << 20)
    sender = OneShot(data)
    frames = sender.frames
    batches = batches_of(frames, BATCH - 3)  # room for what is slipped in (a batch holds at most 64 KiB)
    foreign = encode_data(b"other!!!", 0, os.urandom(FRAME))  # another stream's frame, as long as ours
    assert len(foreign) == len(frames[0])
    for batch in batches[::4]:
        batch.insert(len(batch) // 2, foreign)  # in the middle of the batch
        batch.insert(0, foreign)  # and first
    # Shorter datagrams may only end a batch: a too-short one, and one of our metadata frames (which counts).
    batches[1].append(b"short")
    metadata = min(sender.metadata, key=len)
    assert len(metadata) < len(frames[0])
    batches[2].append(metadata)
    assert all(len(datagram) == len(batch[0]) for batch in batches[:-1] for datagram in batch[:-1])
    foreign_sent = 2 * len(batches[::4])
    result = await receive_while_sending(sender, sender.request(tmp_path / "out.raw", gro=gro), batches)
    assert result.sha1 == sha1_of(data)
    assert (tmp_path / "out.raw").read_bytes() == data
    assert result.drops == {DropReason.FOREIGN_COOKIE.value: foreign_sent, DropReason.TOO_SHORT.value: 1}
    assert result.duplicates == 0  # every one of our frames came once, and was kept
    if gro:
        assert result.coalesced == len(batches)


async def test_a_stream_from_a_server_in_gso_batches_is_followed_for_repairs(image, make_sender, tmp_path, caplog):
    """Server mode: the pump learns the carousel's source port from a coalesced receive (every receive
    carries it with GRO) and follows the carousel, which the repair planner and the HTTP end game need."""
    server = LeaseServer(images={"test-image": image}, make_sender=make_sender, sender_options={"batch": BATCH, "rate": 30e6}).start()
    try:
        request = ReceiveRequest(source=FromServer(server=server.url, image="test-image"), output=str(tmp_path / "out.raw"), interface=LOOPBACK, timeout=TIMEOUT)
        with caplog.at_level("INFO", logger="vmcast.receiver"):
            result = await receive(request)
    finally:
        server.stop()
    sender = server.streams["test-image"]
    assert result.sha1 == sha1_of(image)
    assert (tmp_path / "out.raw").read_bytes() == image
    assert result.gro and result.coalesced > 0 and sender.batches > 0
    assert any("carousel frames come from port" in record.getMessage() for record in caplog.records)


def test_a_receive_too_large_for_the_buffer_keeps_its_whole_datagrams_and_drops_the_rest(tmp_path):
    """Cannot happen with the pump's 64 KiB buffer (a coalesced buffer stands for one IP packet), so a pump
    with a smaller one shows it: the kernel cuts the batch (MSG_TRUNC), and the whole datagrams before the cut
    are kept; the cut one and those after it are counted and dropped, as if lost."""
    data = os.urandom(40 * FRAME)
    sender = OneShot(data)
    frames = sender.frames
    group_socket = open_group_socket(group=sender.group, port=sender.port, interface=LOOPBACK)
    assert group_socket.gro
    output = tmp_path / "out.raw"
    pump = Pump(
        sock=group_socket.sock, assembly=Assembly(cookie=sender.cookie), gro=True, buffer_size=10_000,
        open_target=lambda metadata: open_target(output, length=metadata.length, force=True),
    )  # fmt: skip
    thread = threading.Thread(target=pump.run)
    thread.start()
    try:
        sender.send(batches_of(frames, 10))  # 10 datagrams of 1416 bytes: 7 fit in 10,000 bytes
        kept = [offset for batch in range(4) for offset in range(batch * 10 * FRAME, (batch * 10 + 7) * FRAME, FRAME)]
        deadline = time.monotonic() + TIMEOUT
        while pump.assembly.received_bytes < len(kept) * FRAME and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        pump.stop()
        thread.join()
        group_socket.sock.close()
    assert pump.truncated == 4
    assert pump.assembly.received_bytes == len(kept) * FRAME
    assert pump.assembly.drops == {}  # nothing half-cut reached the assembly
    written = output.read_bytes()
    assert all(written[offset : offset + FRAME] == data[offset : offset + FRAME] for offset in kept)
    pump.target.close()


TURNED_TO_BATCHES = "GRO off, up to"


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "no-batch"])
async def test_datagrams_that_come_one_by_one_turn_the_receiver_to_batches_and_arrive_whole(batch, tmp_path, caplog):
    """GRO on, but the sender sends each frame alone (as a rate-limited link hands them over): after
    `BATCH_JUDGED_AFTER` whole frames the pump takes them with recvmmsg. Sent unpaced, they queue faster than
    the pump takes them one by one, so receives of several come. Foreign and odd datagrams among them are
    dropped and counted, their neighbours kept; every frame of ours was sent once, so the copy is whole only
    if the batches lost none."""
    data = os.urandom(4 << 20)
    sender = OneShot(data)
    frames = sender.frames
    assert len(frames) > 2 * BATCH_JUDGED_AFTER
    foreign = encode_data(b"other!!!", 0, os.urandom(FRAME))  # as long as our frames: inside a run
    long_foreign = encode_data(b"other!!!", 0, os.urandom(3000))  # longer than a slot: into its overflow
    singles = batches_of(frames, 1)
    odd = [foreign, b"short", long_foreign]
    slipped = 0
    for position in range(len(singles) - 1, BATCH_JUDGED_AFTER + 100, -97):  # after the turn, from the end
        singles.insert(position, [odd[slipped % 3]])
        slipped += 1
    with caplog.at_level("INFO", logger="vmcast.receiver"):
        result = await receive_while_sending(sender, sender.request(tmp_path / "out.raw", gro=True, batch=batch), singles)
    assert result.sha1 == sha1_of(data)
    assert (tmp_path / "out.raw").read_bytes() == data
    assert result.duplicates == 0
    foreign_count = sum(1 for index in range(slipped) if index % 3 != 1)
    assert result.drops == {DropReason.FOREIGN_COOKIE.value: foreign_count, DropReason.TOO_SHORT.value: slipped - foreign_count}
    assert result.coalesced == 0
    turned = any(TURNED_TO_BATCHES in record.getMessage() for record in caplog.records)
    if batch:
        assert turned and result.batched > 0
    else:
        assert not turned and result.batched == 0


async def test_a_link_that_coalesces_keeps_gro(tmp_path, caplog):
    data = os.urandom(8 << 20)  # ~6,000 frames in GSO batches: well past the judgement
    sender = OneShot(data)
    batches = batches_of(sender.frames)
    with caplog.at_level("INFO", logger="vmcast.receiver"):
        result = await receive_while_sending(sender, sender.request(tmp_path / "out.raw", gro=True), batches)
    assert result.sha1 == sha1_of(data)
    assert result.coalesced == len(batches) and result.batched == 0
    assert not any(TURNED_TO_BATCHES in record.getMessage() for record in caplog.records)
