"""The carousel rests once every lease holder has heard a whole loop (docs/PROTOCOL.md section 7): through the
real API, with the sender heard on a real loopback group and repair requests sent to the real repair port."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

from vmcast.protocol import RepairRequest, encode_repair_request

from .server_testing import Heard, Images, MulticastListener, TestClient, samples, start_stream

FRAME = 1400
# The test image (tests/server/conftest.py) is 2 MiB and a few frames: ~0.6 s a loop at the tests' 30 Mbit/s.
LOOP_SECONDS = 0.6


def joined(client: TestClient, lease_id: str) -> None:
    response = client.post(f"/v1/leases/{lease_id}/joined")
    assert response.status_code == 200, response.text


def status(client: TestClient, stream_id: str) -> dict:
    return client.get(f"/v1/streams/{stream_id}").json()


def wait_for(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def is_rest_frame(item: Heard) -> bool:
    return item.is_metadata and json.loads(item.payload).get("rest") is True


def carousel_frames(heard: list[Heard], carousel_port: int) -> list[Heard]:
    return [item for item in heard if not item.is_metadata and item.source_port == carousel_port]


def test_once_every_lease_holder_joined_the_carousel_rests_after_a_whole_loop_until_a_new_lease(
    client: TestClient, images: Images, listen: Callable[..., MulticastListener]
) -> None:
    first = start_stream(client, images.raw)
    stream_id = first["stream_id"]
    listener = listen(first["group"], first["port"], first["cookie"])
    joined(client, first["lease_id"])
    wait_for(lambda: status(client, stream_id)["resting"], 4 * LOOP_SECONDS)
    resting = status(client, stream_id)
    assert resting["rests"] == 1 and resting["loops_completed"] in (1, 2), "the loop under way at the join, then one whole"
    labels = (("format", "raw"), ("group", first["group"]), ("image", images.raw), ("stream_id", stream_id))
    assert samples(client.get("/metrics").text, "vmcast_stream_resting")[labels] == 1

    quiet = listener.listen(0.6)
    carousel_port = first["carousel_port"]
    after_rest = quiet[next(i for i, item in enumerate(quiet) if is_rest_frame(item)) :] if any(map(is_rest_frame, quiet)) else quiet
    assert sum(map(is_rest_frame, quiet)) >= 4, "a rest frame every tenth of a second"
    assert not carousel_frames(after_rest, carousel_port), "no carousel frame while resting"
    assert status(client, stream_id)["loops_completed"] == resting["loops_completed"]

    second = start_stream(client, images.raw)  # a new receiver: the rest ends, a loop starts at the first frame
    assert second["stream_id"] == stream_id
    frames = carousel_frames(listener.listen(0.3), carousel_port)
    assert frames and frames[0].offset == 0
    assert not status(client, stream_id)["resting"]


def test_a_lease_that_never_says_it_joined_keeps_the_carousel_looping_until_it_is_released(
    client: TestClient, images: Images
) -> None:
    listening = start_stream(client, images.raw)
    silent = start_stream(client, images.raw)  # an API client, or a receiver whose "joined" was lost
    stream_id = listening["stream_id"]
    joined(client, listening["lease_id"])
    wait_for(lambda: status(client, stream_id)["loops_completed"] >= 3, 6 * LOOP_SECONDS)
    assert status(client, stream_id)["rests"] == 0

    client.delete(f"/v1/leases/{silent['lease_id']}")  # now every lease left has joined
    wait_for(lambda: status(client, stream_id)["resting"], 4 * LOOP_SECONDS)


def resting_stream(client: TestClient, images: Images) -> dict:
    """A stream started, its one lease joined, and resting after its first whole loop."""
    started = start_stream(client, images.raw)
    joined(client, started["lease_id"])
    wait_for(lambda: status(client, started["stream_id"])["resting"], 4 * LOOP_SECONDS)
    return started


def ask_for_repairs(started: dict, first: int, count: int) -> None:
    request = encode_repair_request(bytes.fromhex(started["cookie"]), RepairRequest(ranges=((first, count),)))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(request, ("127.0.0.1", started["repair_port"]))


def repairs_heard(listener: MulticastListener, started: dict, seconds: float) -> tuple[list[Heard], int]:
    """Repair frames heard (by their source port), and how many carousel frames came besides: the loop's
    last batch may still be on its way when the listener joins."""
    data = [item for item in listener.listen(seconds) if not item.is_metadata]
    repairs = [item for item in data if item.source_port != started["carousel_port"]]
    return repairs, len(data) - len(repairs)


def test_a_resting_carousel_still_serves_repairs(
    client: TestClient, images: Images, listen: Callable[..., MulticastListener]
) -> None:
    started = resting_stream(client, images)
    listener = listen(started["group"], started["port"], started["cookie"])
    ask_for_repairs(started, 10, 3)
    repairs, carousel_frames_heard = repairs_heard(listener, started, 0.3)
    assert [item.offset for item in repairs] == [10 * FRAME, 11 * FRAME, 12 * FRAME], "from the repair port"
    assert carousel_frames_heard <= 8, "and no carousel frame but the loop's last few"
    assert status(client, started["stream_id"])["resting"], "a repair does not end the rest"


def test_a_resting_carousel_sends_repairs_at_half_the_rate_as_beside_the_loop(
    client: TestClient, images: Images, listen: Callable[..., MulticastListener]
) -> None:
    # Beside the carousel, repairs take every other datagram; alone, they must not come faster, or a rest
    # would give receivers more parity to decode per second than the loop did. A lower bound on the time
    # (a slow machine only makes it longer).
    started = resting_stream(client, images)
    listener = listen(started["group"], started["port"], started["cookie"])
    frames = 150  # under the rest's repair budget (an eighth of the ~1,500-frame loop): the rest goes on
    ask_for_repairs(started, 100, frames)
    repairs, _ = repairs_heard(listener, started, 1.0)
    assert len(repairs) == frames
    rate_bps = status(client, started["stream_id"])["rate_bps"]
    half_rate_seconds = frames * (FRAME + 16 + 28) * 8 / (rate_bps / 2)
    assert repairs[-1].at - repairs[0].at >= 0.75 * half_rate_seconds, "repairs alone came faster than half the rate"
