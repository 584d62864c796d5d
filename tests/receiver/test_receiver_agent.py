"""Receiving over real multicast on 127.0.0.1: a `vmcast.protocol.Carousel` sender in a thread, the receiver
driven through `vmcast.receiver.agent.receive` under trio. No mocks: real sockets, files and loop devices.

The lease server used here is a stand-in with the real API's two endpoints (see conftest); the real server
and receiver are tested together in tests/e2e.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time

import pytest
import trio
from vmcast.protocol import DropReason, encode_data, encode_metadata
from vmcast.protocol.assembly import Assembly
from vmcast.receiver.agent import FromGroup, FromServer, ReceiveRequest, receive
from vmcast.receiver.errors import NoData, ServerError, StreamBroken, TargetRefused

from .receiver_testbed import LOOPBACK, minimal_metadata, sha1_of

MiB = 1 << 20

# Every receive here finishes in well under a second; the timeout only bounds a broken test.
TIMEOUT = 10.0


def read_device(device: str, size: int) -> bytes:
    with open(device, "rb") as disk:
        return disk.read(size)


def write_device(device: str, data: bytes, *, at: int) -> None:
    with open(device, "r+b") as disk:
        disk.seek(at)
        disk.write(data)


def direct(sender, output, **options) -> ReceiveRequest:
    source = FromGroup(group=sender.group, port=sender.port, cookie=sender.cookie)
    return ReceiveRequest(source=source, output=str(output), interface=LOOPBACK, timeout=options.pop("timeout", TIMEOUT), **options)


async def test_a_stream_is_received_without_a_server_verified_and_byte_identical(image, make_sender, tmp_path):
    sender = make_sender(image).start()
    result = await receive(direct(sender, tmp_path / "out.raw"))
    assert result.sha1 == sha1_of(image)
    assert result.bytes == len(image)
    assert (tmp_path / "out.raw").read_bytes() == image
    assert result.interface == LOOPBACK and result.group == sender.group and result.port == sender.port
    assert result.seconds > 0 and result.rate > 0
    assert result.rcvbuf > 0


async def test_a_receiver_joining_mid_loop_takes_the_rest_from_the_next_loop(image, make_sender, tmp_path):
    sender = make_sender(image, rate=20e6).start()
    frames_per_loop = sender.manifest.layout.frame_count
    sender.wait_for_frames(frames_per_loop + frames_per_loop // 2)  # well into the second loop
    async with trio.open_nursery() as nursery:
        outcome = []

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            outcome.append(await receive(direct(sender, tmp_path / "out.raw"), task_status=task_status))

        await nursery.start(run)
        joined_at = sender.position % frames_per_loop
    assert frames_per_loop // 4 < joined_at < frames_per_loop, "the receiver did not join mid-loop"
    assert outcome[0].sha1 == sha1_of(image)
    assert (tmp_path / "out.raw").read_bytes() == image


async def test_a_sender_announcing_only_sha1_and_len_is_received(image, make_sender, tmp_path):
    sender = make_sender(image, metadata=minimal_metadata(image)).start()
    result = await receive(direct(sender, tmp_path / "out.raw"))
    assert result.sha1 == sha1_of(image)
    assert (tmp_path / "out.raw").read_bytes() == image


async def test_foreign_and_garbage_datagrams_are_counted_and_dropped(image, make_sender, tmp_path):
    sender = make_sender(image, rate=20e6).start()
    strangers = [
        b"",  # empty
        b"short",  # shorter than a header
        encode_data(b"other!!!", 0, b"x" * 1400),  # another stream's data
        encode_metadata(b"other!!!", {"sha1": "0" * 40, "len": 5}),  # another stream's metadata
        encode_metadata(sender.cookie, {"sha1": "nope"}),  # our cookie, nonsense metadata
        sender.cookie + b"\xff" * 8 + b"{not json",  # our cookie, metadata that is not JSON
        os.urandom(1500),
    ]

    async def inject_while_receiving():
        for _ in range(20):
            for datagram in strangers:
                sender.inject(datagram)
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        outcome = []

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            outcome.append(await receive(direct(sender, tmp_path / "out.raw"), task_status=task_status))

        await nursery.start(run)
        nursery.start_soon(inject_while_receiving)
    result = outcome[0]
    assert result.sha1 == sha1_of(image)
    assert (tmp_path / "out.raw").read_bytes() == image
    assert result.drops.get(DropReason.TOO_SHORT.value, 0) >= 2
    assert result.drops.get(DropReason.FOREIGN_COOKIE.value, 0) >= 2
    assert result.drops.get(DropReason.MALFORMED_METADATA.value, 0) >= 2


async def test_a_corrupted_frame_fails_its_block_which_is_taken_again(image, make_sender, tmp_path):
    frame = 1400
    sender = make_sender(image, corrupt_offsets=frozenset({frame * 10, frame * 800}))
    async with trio.open_nursery() as nursery:
        outcome = []

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            outcome.append(await receive(direct(sender, tmp_path / "out.raw"), task_status=task_status))

        await nursery.start(run)
        sender.start()  # after the join, so the receiver sees the corrupted first loop
    result = outcome[0]
    assert result.corrupt_blocks == 2
    assert result.sha1 == sha1_of(image)
    assert (tmp_path / "out.raw").read_bytes() == image


async def test_an_image_changing_under_the_stream_fails_it(image, make_sender, tmp_path):
    changed = [{"sha1": hashlib.sha1(b"another image").hexdigest(), "len": len(image)}]
    sender = make_sender(image, rate=5e6, metadata=minimal_metadata(image), metadata_after=(0.3, changed)).start()
    with pytest.raises(StreamBroken, match="changed"):
        await receive(direct(sender, tmp_path / "out.raw"))


async def test_silence_for_the_timeout_ends_the_receive(make_sender, tmp_path):
    sender = make_sender(b"never sent")  # not started: nothing on the group
    with trio.fail_after(5):
        with pytest.raises(NoData, match="within 0.5 s"):
            await receive(direct(sender, tmp_path / "out.raw", timeout=0.5))


async def test_an_empty_image_is_verified_from_its_metadata(make_sender, tmp_path):
    sender = make_sender(b"").start()
    result = await receive(direct(sender, tmp_path / "out.raw"))
    assert result.sha1 == sha1_of(b"") and result.bytes == 0
    assert (tmp_path / "out.raw").read_bytes() == b""


async def test_a_block_device_receives_the_image_and_keeps_the_rest(image, make_sender, loop_device):
    device = loop_device(4 * MiB)
    write_device(device, b"tail" * 1000, at=len(image))
    sender = make_sender(image).start()
    result = await receive(direct(sender, device))
    assert result.sha1 == sha1_of(image)
    assert read_device(device, len(image) + 4000) == image + b"tail" * 1000  # never written past the image


async def test_an_image_larger_than_the_device_is_refused_before_a_byte_is_written(make_sender, loop_device):
    device = loop_device(MiB)
    big = os.urandom(MiB + 4096)
    sender = make_sender(big).start()
    with pytest.raises(TargetRefused, match="the device only"):
        await receive(direct(sender, device))
    assert read_device(device, MiB) == bytes(MiB)


# -- with a lease server ----------------------------------------------------------------------------------------


def leased(server, output, image="test-image", **options) -> ReceiveRequest:
    return ReceiveRequest(source=FromServer(server=server.url, image=image), output=str(output), timeout=TIMEOUT, **options)


async def test_a_leased_stream_is_received_from_its_first_datagram_and_the_lease_released(image, lease_server, tmp_path):
    result = await receive(leased(lease_server, tmp_path / "out.raw"))
    assert result.sha1 == sha1_of(image)
    assert result.image == "test-image" and result.format == "raw"
    assert result.interface == LOOPBACK  # the address the kernel uses to reach the server
    assert DropReason.BEFORE_METADATA.value not in result.drops  # the lease told us what metadata would
    assert (tmp_path / "out.raw").read_bytes() == image
    assert lease_server.released == list(lease_server.leases)
    proof = result.proof
    assert proof is not None and proof.sha1 == sha1_of(image) and proof.size == len(image)
    assert str(proof.path) == str(tmp_path / "out.raw") and proof.source == "test-image"


async def test_a_lease_without_the_block_size_waits_for_the_streams_metadata(image, lease_server, tmp_path):
    lease_server.announce_block_size = False
    result = await receive(leased(lease_server, tmp_path / "out.raw"))
    assert result.sha1 == sha1_of(image)
    assert (tmp_path / "out.raw").read_bytes() == image


async def test_a_stream_without_the_block_checksums_its_lease_announced_fails_rather_than_waits(image, lease_server, tmp_path):
    lease_server.sender_options = {"metadata": minimal_metadata(image)}
    with pytest.raises(StreamBroken, match="sends no block checksums"):
        await receive(leased(lease_server, tmp_path / "out.raw"))


async def test_a_stream_contradicting_its_lease_fails(image, lease_server, tmp_path):
    lease_server.sender_options = {"metadata": [{"sha1": "e" * 40, "len": len(image)}], "rate": 5e6}
    with pytest.raises(StreamBroken, match="sha1"):
        await receive(leased(lease_server, tmp_path / "out.raw"))
    assert lease_server.released == list(lease_server.leases) and lease_server.released


async def test_a_lease_is_renewed_while_the_receive_lasts(image, lease_server, tmp_path):
    lease_server.lease_ttl = 0.3
    lease_server.sender_options = {"rate": 4e6}  # about 0.8 s for the image
    result = await receive(leased(lease_server, tmp_path / "out.raw"))
    assert result.sha1 == sha1_of(image)
    assert len(lease_server.renewed) >= 2 and set(lease_server.renewed) == {"lease-1"}
    assert lease_server.released == ["lease-1"]


async def test_a_lease_that_ended_is_taken_again_on_the_same_stream(image, lease_server, tmp_path):
    lease_server.lease_ttl = 0.3
    lease_server.end_leases_on_renewal = 1
    lease_server.sender_options = {"rate": 4e6}
    result = await receive(leased(lease_server, tmp_path / "out.raw"))
    assert result.sha1 == sha1_of(image)
    assert lease_server.ended == ["lease-1"] and "lease-2" in lease_server.renewed
    assert lease_server.released == ["lease-2"]


async def test_an_unknown_image_is_a_server_error(lease_server, tmp_path):
    with pytest.raises(ServerError, match="no image 'nope'") as caught:
        await receive(leased(lease_server, tmp_path / "out.raw", image="nope"))
    assert caught.value.status == 404
    assert not (tmp_path / "out.raw").exists()


async def test_an_unreachable_server_is_a_server_error(tmp_path):
    with trio.socket.socket() as probe:  # a port nothing listens on
        await probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    request = ReceiveRequest(source=FromServer(server=f"http://{LOOPBACK}:{port}", image="x"), output=str(tmp_path / "out.raw"))
    with pytest.raises(ServerError, match="unreachable"):
        await receive(request)


async def test_the_lease_is_released_when_the_target_is_refused(lease_server, tmp_path):
    (tmp_path / "out.raw").write_bytes(b"keep me")
    with pytest.raises(TargetRefused):
        await receive(leased(lease_server, tmp_path / "out.raw"))
    assert lease_server.released == list(lease_server.leases) and lease_server.released
    assert (tmp_path / "out.raw").read_bytes() == b"keep me"


async def test_the_lease_is_released_when_the_receive_is_cancelled(lease_server, tmp_path):
    lease_server.sender_options = {"rate": 1e6}  # slow enough to cancel midway
    with trio.move_on_after(0.5):
        await receive(leased(lease_server, tmp_path / "out.raw"))
    assert lease_server.released == list(lease_server.leases) and lease_server.released


async def test_the_lease_is_released_once_every_block_is_verified_and_taken_again_if_the_sha1_sends_the_pump_back(image, lease_server, make_sender, tmp_path, monkeypatch):
    # Every block matches its xxh3, but the stream (and its lease) announce a wrong SHA-1 for the whole: the
    # lease goes as soon as the blocks are verified, the SHA-1 then fails, the pump takes the image again and
    # needs the stream again, so the same stream is leased again; in the end the receive fails, never verified.
    # The hashing thread keeps up with the blocks, so the pump may judge the whole SHA-1 microseconds after
    # the last block: both news ("not needed", "needed again") can then reach the lease task in one trio batch,
    # and it rightly keeps its lease. The first judgement here waits (in the pump's thread) for the release,
    # so the test sees the release and the second lease every time, on a machine of any speed.
    judge = Assembly.check_image

    def check_image_once_released(assembly, sha1_hex):
        deadline = time.monotonic() + TIMEOUT
        while not lease_server.released and time.monotonic() < deadline:
            time.sleep(0.005)
        return judge(assembly, sha1_hex)

    monkeypatch.setattr(Assembly, "check_image", check_image_once_released)
    sender = make_sender(image, rate=20e6)
    sender.manifest = dataclasses.replace(sender.manifest, sha1="e" * 40)  # what the lease answer announces
    sender.carousel.metadata_datagrams = tuple(
        encode_metadata(sender.cookie, fields) for fields in sender.manifest.metadata_frames()
    )
    lease_server.streams["test-image"] = sender.start()
    with pytest.raises(StreamBroken, match="sha1"):
        await receive(leased(lease_server, tmp_path / "out.raw"))
    assert list(lease_server.leases)[:2] == ["lease-1", "lease-2"], "taken again after the first SHA-1 failed"
    assert lease_server.released[:2] == ["lease-1", "lease-2"]
    assert set(lease_server.released) == set(lease_server.leases), "every lease released in the end"


async def test_the_sha1_is_computed_while_the_blocks_arrive_so_little_is_left_for_the_end(make_sender, tmp_path):
    # 8 MiB at 5 MB/s, the receiver joined before the first frame: the blocks come in order over ~1.7 s, and
    # the hashing thread follows them (a receiver that joins mid-loop waits for the wrap to hash block 0 on).
    image = os.urandom(8 << 20)
    sender = make_sender(image, rate=5e6)
    outcome = []
    async with trio.open_nursery() as nursery:

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            outcome.append(await receive(direct(sender, tmp_path / "out.raw"), task_status=task_status))

        await nursery.start(run)  # joined
        sender.start()
    [result] = outcome
    assert result.sha1 == sha1_of(image)
    summary = result.as_dict()
    assert summary["sha1_cpu_seconds"] > 0
    assert summary["unhashed_at_end"] <= len(image) // 2, "most of the image was hashed before its last block came"
    assert summary["hash_tail_seconds"] >= 0 and summary["sync_seconds"] >= 0


async def test_a_server_from_before_holding_is_asked_again_without_it(image, lease_server, tmp_path):
    # Receivers and servers are upgraded apart: a receiver that asks for a hold still gets its stream from a
    # server whose API refuses the fields it does not know.
    lease_server.without_hold = True
    request = ReceiveRequest(source=FromServer(server=lease_server.url, image="test-image", min_receivers=1), output=str(tmp_path / "out.raw"), timeout=TIMEOUT)
    result = await receive(request)
    assert result.sha1 == sha1_of(image)
    assert [("min_receivers" in start) for start in lease_server.starts] == [True, False]


async def test_a_422_that_is_not_about_the_hold_is_still_a_clear_format_error(lease_server, tmp_path):
    request = ReceiveRequest(source=FromServer(server=lease_server.url, image="test-image", format="vhdx", min_receivers=1), output=str(tmp_path / "out.raw"), timeout=TIMEOUT)
    with pytest.raises(ServerError, match="refused format 'vhdx'"):
        await receive(request)
    assert len(lease_server.starts) == 1, "asked once: the refusal was not about the hold"


# A receiver started before its stream (--wait-for-stream) joins the group the long poll names, then asks for
# its lease with "listening": the lease counts as joined and no separate POST .../joined is made.


def waiting(server, output) -> ReceiveRequest:
    return ReceiveRequest(source=FromServer(server=server.url, image="test-image", wait_for_stream=5.0), output=str(output), timeout=TIMEOUT)


def stream_running(server, image: bytes) -> None:
    server.streams["test-image"] = server.make_sender(image, rate=20e6).start()


async def test_a_waiting_receiver_joins_first_and_its_lease_counts_as_joined(image, lease_server, tmp_path):
    stream_running(lease_server, image)
    sender = lease_server.streams["test-image"]
    result = await receive(waiting(lease_server, tmp_path / "out.raw"))
    assert result.sha1 == sha1_of(image)
    assert [start.get("listening") for start in lease_server.starts] == [f"{sender.group}:{sender.port}"]
    assert lease_server.joined == [], "joined as granted: nothing more to say"


async def test_a_stream_that_moved_between_the_poll_and_the_lease_is_joined_where_the_lease_says(image, lease_server, tmp_path):
    stream_running(lease_server, image)
    lease_server.polled_group = ("239.255.77.1", 9)  # where the long poll saw it; the lease names the real one
    result = await receive(waiting(lease_server, tmp_path / "out.raw"))
    assert result.sha1 == sha1_of(image)
    assert (result.group, result.port) == (lease_server.streams["test-image"].group, lease_server.streams["test-image"].port)
    assert lease_server.starts[0]["listening"] == "239.255.77.1:9"
    assert lease_server.joined == ["lease-1"], "not joined as granted: said once the right group was joined"


async def test_a_server_from_before_listening_is_asked_again_without_it(image, lease_server, tmp_path):
    stream_running(lease_server, image)
    lease_server.without_listening = True
    result = await receive(waiting(lease_server, tmp_path / "out.raw"))
    assert result.sha1 == sha1_of(image)
    assert [("listening" in start) for start in lease_server.starts] == [True, False]
    assert lease_server.joined == ["lease-1"]
