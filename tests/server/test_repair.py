"""Repair over multicast: real repair-request datagrams to the server's UDP repair port, answers heard on the group.

docs/PROTOCOL.md section 7: requested frames go out ahead of the carousel, from a source port other than the
one metadata and carousel frames come from, and garbage on the repair port is counted, never fatal.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from vmcast.protocol import METADATA_OFFSET, PARITY_FLAG, RepairRequest, encode_repair_request, parity_fields
from vmcast.protocol.frames import HEADER
from vmcast.protocol.repair import REPAIR_REQUEST_OFFSET
from vmcast.server.app import create_app
from vmcast.server.settings import Settings

from .server_testing import Images, MulticastListener, TestClient, samples

# At 2 Mbit/s a 1444-byte datagram leaves every 5.8 ms: the 1,504 frames of the test image take 8.7 s a loop,
# so frames near the end are seconds away from the carousel when the test asks for them.
SLOW_RATE = "2mbit"
FRAME = 1400


@pytest.fixture
def slow_client(settings_for: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(rate=SLOW_RATE))) as client:
        yield client


@pytest.fixture
def slow_parity_client(settings_for: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(rate=SLOW_RATE, fec=True))) as client:
        yield client


def start(client: TestClient, image: str) -> dict:
    response = client.post("/v1/streams", json={"image": image})
    assert response.status_code == 201, response.text
    return response.json()


def send_to_repair_port(port: int, *datagrams: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in datagrams:
            sock.sendto(datagram, ("127.0.0.1", port))


def wait_for(condition: Callable[[], bool], seconds: float = 3.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_requested_frames_arrive_at_once_from_another_source_port_than_the_carousel(
    slow_client: TestClient, images: Images, listen: Callable[..., MulticastListener]
) -> None:
    started = start(slow_client, images.raw)
    assert started["repair_port"] > 0
    listener = listen(started["group"], started["port"], started["cookie"])
    before = listener.listen(0.3)
    [carousel_port] = {item.source_port for item in before}  # nothing asked yet: every frame is the carousel's
    position = max(item.offset // FRAME for item in before if not item.is_metadata)
    assert position < 200, "the carousel is near the start of the image"

    wanted = {*range(1400, 1410), *range(1450, 1455)}
    request = RepairRequest(ranges=((1400, 10), (1450, 5)))
    asked_at = time.time()
    send_to_repair_port(started["repair_port"], encode_repair_request(bytes.fromhex(started["cookie"]), request))
    heard = listener.listen(1.2, keep_payload=True)  # metadata comes once a second: some is heard

    image = images.path(images.raw).read_bytes()
    metadata_ports = {item.source_port for item in heard if item.is_metadata}
    assert metadata_ports == {carousel_port}, "metadata and carousel frames share their source port"
    repairs = [item for item in heard if item.source_port != carousel_port]
    carousel = [item for item in heard if item.source_port == carousel_port]
    assert {item.offset // FRAME for item in repairs} == wanted
    assert len(repairs) == len(wanted), "each requested frame is sent once"
    for item in repairs:
        assert item.payload == image[item.offset : item.offset + FRAME]
    # The carousel would bring frame 1400 seven seconds from now; the repairs came within a fraction of one.
    assert max(item.at for item in repairs) - asked_at < 0.5
    assert all(item.offset // FRAME < 1400 for item in carousel if not item.is_metadata)
    # One for one with carousel frames: late joiners keep progressing while repairs are sent.
    first, last = min(item.at for item in repairs), max(item.at for item in repairs)
    assert sum(1 for item in carousel if first < item.at < last) >= len(wanted) - 2

    stream = slow_client.get(f"/v1/streams/{started['stream_id']}").json()
    assert stream["repair_port"] == started["repair_port"]
    assert (stream["repair_requests"], stream["repair_frames_sent"], stream["repair_pending"]) == (1, len(wanted), 0)
    assert stream["repair_drops"] == 0


def test_a_frame_asked_for_by_many_receivers_is_sent_once(
    slow_client: TestClient, images: Images, listen: Callable[..., MulticastListener]
) -> None:
    started = start(slow_client, images.raw)
    listener = listen(started["group"], started["port"], started["cookie"])
    [carousel_port] = {item.source_port for item in listener.listen(0.2)}
    request = encode_repair_request(bytes.fromhex(started["cookie"]), RepairRequest(ranges=((1300, 4),)))
    send_to_repair_port(started["repair_port"], *[request] * 20)
    heard = listener.listen(0.6)
    repairs = [item.offset // FRAME for item in heard if item.source_port != carousel_port]
    # Merged: about once each for the 20 requests (not 20 times). A request the sender takes after it has
    # resent a frame asks for that frame again, so on a busy machine one may go out twice (seen in CI).
    assert set(repairs) == {1300, 1301, 1302, 1303} and len(repairs) <= 8, sorted(repairs)
    stream = slow_client.get(f"/v1/streams/{started['stream_id']}").json()
    assert stream["repair_requests"] == 20 and 4 <= stream["repair_frames_sent"] <= 8


def test_garbage_on_the_repair_port_is_counted_by_reason_and_never_stops_repairs(
    slow_client: TestClient, images: Images, listen: Callable[..., MulticastListener]
) -> None:
    started = start(slow_client, images.raw)
    cookie = bytes.fromhex(started["cookie"])
    port = started["repair_port"]
    garbage = [
        b"",  # too short
        b"vmcast",  # too short
        os.urandom(64),  # another cookie
        encode_repair_request(b"\x00" * 8, RepairRequest(ranges=((0, 1),))),  # a stream that does not exist
        HEADER.pack(cookie, METADATA_OFFSET) + b'{"v":1,"frames":[[0,1]]}',  # not the repair marker
        HEADER.pack(cookie, REPAIR_REQUEST_OFFSET) + b"\xff\xfe not json",
        HEADER.pack(cookie, REPAIR_REQUEST_OFFSET) + b'{"v":1,"frames":"all"}',
        HEADER.pack(cookie, REPAIR_REQUEST_OFFSET) + b'{"v":1,"frames":[[1500,100]]}',  # past the last frame
        HEADER.pack(cookie, REPAIR_REQUEST_OFFSET) + b'{"v":1,"frames":[[-1,2]]}',
        HEADER.pack(cookie, REPAIR_REQUEST_OFFSET) + b"[" * 100_00,  # too long to be a request
        HEADER.pack(cookie, REPAIR_REQUEST_OFFSET) + b"[" * 1000 + b"]" * 1000,  # too deep... and too long
        HEADER.pack(cookie, REPAIR_REQUEST_OFFSET) + b"[" * 500 + b"]" * 500,  # deep nesting, under the limit
    ]
    send_to_repair_port(port, *garbage)

    def drops() -> dict[str, float]:
        found = samples(slow_client.get("/metrics").text, "vmcast_repair_requests_dropped_total")
        return {dict(labels)["reason"]: value for labels, value in found.items()}

    wait_for(lambda: sum(drops().values()) == len(garbage))
    assert drops() == {
        "too_short": 2,
        "too_long": 2,
        "unknown_stream": 2,
        "malformed_request": 6,
        "backlog_full": 0,
    }
    stream = slow_client.get(f"/v1/streams/{started['stream_id']}").json()
    assert stream["repair_drops"] == 6, "drops that carry this stream's cookie are the stream's too"
    assert stream["repair_requests"] == 0

    # The listener and the sender go on: a valid request is still served.
    listener = listen(started["group"], started["port"], started["cookie"])
    [carousel_port] = {item.source_port for item in listener.listen(0.2)}
    send_to_repair_port(port, encode_repair_request(cookie, RepairRequest(ranges=((1503, 1),))))
    heard = listener.listen(0.5)
    assert [item.offset for item in heard if item.source_port != carousel_port] == [1503 * FRAME]


def test_parity_asked_for_on_the_repair_port_is_multicast_from_the_repair_socket_and_bad_parity_entries_are_dropped(
    slow_parity_client: TestClient, images: Images, listen: Callable[..., MulticastListener]
) -> None:
    slow_client = slow_parity_client
    # docs/PROTOCOL.md section 8: the test image's 1,504 frames make blocks of 749, 749 and 6 frames.
    started = start(slow_client, images.raw)
    assert started["fec"] == "raptorq", "payload 1400 is a multiple of 8: the stream announces parity"
    cookie = bytes.fromhex(started["cookie"])
    listener = listen(started["group"], started["port"], started["cookie"])
    [carousel_port] = {item.source_port for item in listener.listen(0.2)}
    send_to_repair_port(
        started["repair_port"],
        HEADER.pack(cookie, REPAIR_REQUEST_OFFSET) + b'{"v":1,"frames":[],"parity":[[3,1]]}',  # no block 3
        HEADER.pack(cookie, REPAIR_REQUEST_OFFSET) + b'{"v":1,"frames":[],"parity":[[1,0]]}',  # no symbol asked
        encode_repair_request(cookie, RepairRequest(parity=((1, 8),))),
    )
    heard = listener.listen(0.6, keep_payload=True)
    parity = [item for item in heard if item.offset & PARITY_FLAG and not item.is_metadata]
    assert {item.source_port for item in parity} - {carousel_port} == {item.source_port for item in parity}
    assert sorted(parity_fields(item.offset) for item in parity) == [(1, 749 + i) for i in range(8)]
    assert all(len(item.payload) == FRAME for item in parity)
    stream = slow_client.get(f"/v1/streams/{started['stream_id']}").json()
    assert (stream["repair_requests"], stream["parity_frames_sent"], stream["repair_frames_sent"]) == (1, 8, 0)
    assert stream["repair_drops"] == 2 and stream["fec"] == "raptorq"


def test_requests_for_a_stopped_stream_are_dropped_as_unknown(slow_client: TestClient, images: Images) -> None:
    started = start(slow_client, images.raw)
    assert slow_client.delete(f"/v1/leases/{started['lease_id']}").json()["stream_stopped"]
    send_to_repair_port(
        started["repair_port"],
        encode_repair_request(bytes.fromhex(started["cookie"]), RepairRequest(ranges=((0, 1),))),
    )
    wait_for(
        lambda: (
            samples(slow_client.get("/metrics").text, "vmcast_repair_requests_dropped_total")[
                (("reason", "unknown_stream"),)
            ]
            == 1
        )
    )


def test_the_repair_port_defaults_to_the_number_of_the_http_port(
    settings_for: Callable[..., Settings], images: Images
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    settings = settings_for(port=free, repair_port=None)
    assert settings.resolved_repair_port(settings.port) == free
    with TestClient(create_app(settings)) as client:
        assert start(client, images.empty)["repair_port"] == free
