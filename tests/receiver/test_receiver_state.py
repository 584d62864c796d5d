"""The state file beside the output: its format, what a re-run does with it, and that `vmcast register` reads it.

Receives here run in-process (`vmcast.receiver.agent.receive`) from a `Carousel` sender on real loopback
multicast; the real server's resume is tested in test_receiver_resume.py.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
import trio
from bitarray import bitarray
from vmcast.protocol import Assembly, manifest_of
from vmcast.receiver.agent import FromGroup, ReceiveRequest, receive
from vmcast.receiver.errors import TargetRefused
from vmcast.receiver.registration.cli import STATE_SUFFIX as REGISTER_STATE_SUFFIX
from vmcast.receiver.registration.cli import _read_state as read_state_as_register_does
from vmcast.receiver.resume import plan_for_lease
from vmcast.receiver.state import (
    STATE_SUFFIX,
    ImageIdentity,
    ReceiverState,
    StateKeeper,
    StreamSource,
    read_state,
    state_path,
    write_state,
)

from .receiver_testbed import LOOPBACK, read_device, sha1_of, write_device

TIMEOUT = 10.0
MiB = 1 << 20


def direct(sender, output) -> ReceiveRequest:
    source = FromGroup(group=sender.group, port=sender.port, cookie=sender.cookie)
    return ReceiveRequest(source=source, output=str(output), interface=LOOPBACK, timeout=TIMEOUT)


async def receive_for(seconds: float, request: ReceiveRequest, sender) -> None:
    """Start receiving, start the sender once joined (so the receiver sees the loop from its start), cancel."""
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            await nursery.start(receive, request)
            sender.start()


def verified_bits(state: ReceiverState) -> bitarray:
    bits = bitarray()
    bits.frombytes(base64.b64decode(state.verified_blocks))
    return bits[: state.block_count]


# -- the file -----------------------------------------------------------------------------------------------


def state(**changes) -> ReceiverState:
    fields = {
        "version": 1, "output": "/tmp/out.raw", "server": "http://127.0.0.1:8470", "stream_id": "s1", "image": "disk.raw",
        "format": "raw", "group": "239.255.0.1", "port": 8471, "cookie": "00112233445566ff", "sha1": "a" * 40, "len": 3 * MiB,
        "frame_size": 1400, "block_size": 1400 * 749, "verified_blocks": base64.b64encode(b"\x80").decode(),
        "verified_block_count": 1, "block_count": 3, "verified": False, "updated_at": "2026-01-01T00:00:00+00:00",
    }  # fmt: skip
    fields.update(changes)
    return ReceiverState.model_validate(fields)


def test_the_state_file_is_the_output_path_plus_the_suffix_vmcast_register_looks_for():
    assert STATE_SUFFIX == REGISTER_STATE_SUFFIX == ".vmcast.json"
    assert state_path("/data/disk.raw") == Path("/data/disk.raw.vmcast.json")


def test_a_state_is_written_atomically_and_read_back_the_same(tmp_path):
    path = tmp_path / "out.raw.vmcast.json"
    write_state(state(), path)
    assert read_state(tmp_path / "out.raw") == state()
    assert json.loads(path.read_text())["len"] == 3 * MiB  # the name `vmcast register` reads
    assert os.listdir(tmp_path) == ["out.raw.vmcast.json"]  # no temporary file left behind


@pytest.mark.parametrize("content", [b"not json", b'{"version": 2}', b"{}", json.dumps({**json.loads(state().model_dump_json(by_alias=True)), "sha1": "nope"}).encode()])
def test_a_state_file_that_cannot_be_used_is_ignored(tmp_path, content, caplog):
    (tmp_path / "out.raw.vmcast.json").write_bytes(content)
    assert read_state(tmp_path / "out.raw") is None
    assert "ignoring" in caplog.text


def test_the_keeper_claims_no_block_before_the_assembly_has_one_except_those_it_resumed_from(tmp_path):
    output = tmp_path / "out.raw"
    source = StreamSource(server=None, stream_id=None, image=None, format=None, group="239.255.0.1", port=8471, cookie="00112233445566ff")
    carried = state().checkpoint()
    keeper = StateKeeper(output=str(output), source=source, carried=carried)
    assert keeper.save(assembly=None, target=None) is False  # the image is not known yet: nothing to say
    keeper.identify(ImageIdentity(sha1="a" * 40, length=3 * MiB, frame_size=1400, block_size=1400 * 749, image="disk.raw", format="raw"))
    assert keeper.save(assembly=Assembly(cookie=b"\x00\x11\x22\x33\x44\x55\x66\xff"), target=None) is True
    saved = read_state(output)
    assert saved.verified_block_count == 1 and list(verified_bits(saved)) == [1, 0, 0]  # carried, not lost
    assert keeper.save(assembly=None, target=None) is False  # nothing changed: not written again


# -- what a re-run does with it (server mode) ---------------------------------------------------------------


def lease_plan(previous: ReceiverState | None, **lease):
    fields = {"image": "disk.raw", "format": "raw", "sha1": "a" * 40, "length": 3 * MiB, "frame_size": 1400, "block_size": 1400 * 749, "path": "out.raw"}
    fields.update(lease)
    return plan_for_lease(previous, **fields)


def test_a_rerun_resumes_the_same_image_from_its_verified_blocks():
    plan = lease_plan(state())
    assert plan.checkpoint == state().checkpoint() and plan.reuse_file and not plan.reverify


def test_a_rerun_of_a_verified_receive_checks_the_file_again_instead():
    plan = lease_plan(state(verified=True))
    assert plan.reverify and plan.reuse_file


def test_a_rerun_after_the_image_changed_starts_over_in_place_and_says_why():
    plan = lease_plan(state(), sha1="b" * 40)
    assert plan.checkpoint is None and plan.reuse_file and not plan.reverify
    assert plan.note == f"image disk.raw changed since the interrupted receive (sha1 {'a' * 40} → {'b' * 40}); starting over"


def test_the_state_of_another_image_is_not_a_licence_to_overwrite():
    plan = lease_plan(state(image="other.raw"))
    assert plan.checkpoint is None and not plan.reuse_file and "not resuming" in plan.note


# -- receives (no server) ------------------------------------------------------------------------------------


async def test_a_cancelled_receive_saves_its_verified_blocks_and_the_next_one_resumes_from_them(make_sender, tmp_path):
    image = os.urandom(6 * MiB)
    sender = make_sender(image, rate=4e6)  # about 1.6 s for the image
    output = tmp_path / "out.raw"
    await receive_for(1.2, direct(sender, output), sender)
    saved = read_state(output)
    assert saved is not None and not saved.verified and 0 < saved.verified_block_count < saved.block_count
    assert saved.sha1 == sha1_of(image) and saved.cookie == sender.cookie.hex()

    result = await receive(direct(sender, output))  # no --force: the state says the file is ours
    assert result.sha1 == sha1_of(image) and output.read_bytes() == image
    assert result.resumed_blocks >= saved.verified_block_count
    assert result.bytes_received < len(image)
    assert read_state(output).verified


async def test_a_verified_output_is_hashed_again_without_joining_the_stream(image, make_sender, tmp_path):
    sender = make_sender(image).start()
    output = tmp_path / "out.raw"
    await receive(direct(sender, output))
    sender.stop()  # nothing on the group any more
    again = await receive(direct(sender, output))
    assert again.already_verified and again.sha1 == sha1_of(image) and again.datagrams == 0 and again.interface is None


async def test_an_output_whose_state_is_about_another_stream_is_refused_without_force(image, make_sender, tmp_path):
    first = make_sender(image).start()
    output = tmp_path / "out.raw"
    await receive(direct(first, output))
    second = make_sender(os.urandom(MiB)).start()
    with pytest.raises(TargetRefused, match="not empty"):
        await receive(direct(second, output))
    assert output.read_bytes() == image


async def test_vmcast_register_reads_the_image_it_needs_from_the_state_a_receive_left(image, make_sender, tmp_path):
    sender = make_sender(image).start()
    output = tmp_path / "out.raw"
    await receive(direct(sender, output))
    registrable = read_state_as_register_does(output)
    assert registrable.sha1 == sha1_of(image) and registrable.length == len(image)
    assert registrable.image == "test-image" and registrable.format == "raw"  # from the stream's metadata


# -- zero blocks ----------------------------------------------------------------------------------------------


def image_with_zero_blocks() -> bytes:
    block = manifest_of(b"x" * 10, frame_size=1400).layout.block_size  # the default block size for 1400-byte frames
    data = os.urandom(block) + bytes(2 * block) + os.urandom(block // 2)
    assert len(manifest_of(data, frame_size=1400).zero_blocks) == 1  # blocks 1 and 2: one run
    return data


async def test_zero_blocks_which_are_never_sent_read_as_zeros_even_over_old_bytes(make_sender, tmp_path):
    image = image_with_zero_blocks()
    output = tmp_path / "out.raw"
    output.write_bytes(b"\xff" * len(image))  # an old image where the zeros go
    sender = make_sender(image).start()
    result = await receive(ReceiveRequest(source=FromGroup(group=sender.group, port=sender.port, cookie=sender.cookie), output=str(output), interface=LOOPBACK, timeout=TIMEOUT, force=True))
    assert result.sha1 == sha1_of(image) and output.read_bytes() == image
    assert result.bytes_received < len(image)  # the zero blocks never came


async def test_zero_blocks_read_as_zeros_on_a_block_device_that_held_other_bytes(make_sender, loop_device):
    image = image_with_zero_blocks()
    device = loop_device(4 * MiB)
    write_device(device, b"\xff" * (4 * MiB))
    sender = make_sender(image).start()
    result = await receive(ReceiveRequest(source=FromGroup(group=sender.group, port=sender.port, cookie=sender.cookie), output=device, interface=LOOPBACK, timeout=TIMEOUT))
    assert result.sha1 == sha1_of(image)
    assert read_device(device, len(image) + 4) == image + b"\xff" * 4
