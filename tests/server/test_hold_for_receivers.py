"""A stream started with min_receivers holds (metadata only) until that many receivers said they joined:
through the real API, with the sender heard on a real loopback group."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .server_testing import Images, MulticastListener, TestClient, samples, start_stream


def joined(client: TestClient, lease_id: str) -> dict:
    response = client.post(f"/v1/leases/{lease_id}/joined")
    assert response.status_code == 200, response.text
    return response.json()


def test_the_stream_holds_until_enough_receivers_joined_then_starts_at_the_first_frame(
    client: TestClient, images: Images, listen: Callable[..., MulticastListener]
) -> None:
    first = start_stream(client, images.raw, min_receivers=2, max_wait=60)
    assert first["waiting_for"] == 2
    listener = listen(first["group"], first["port"], first["cookie"])
    second = start_stream(client, images.raw)  # joins the holding stream: same stream, still two to come
    assert (second["stream_id"], second["waiting_for"]) == (first["stream_id"], 2)

    assert joined(client, first["lease_id"]) == {"stream_id": first["stream_id"], "waiting_for": 1}
    assert joined(client, first["lease_id"])["waiting_for"] == 1, "saying it twice counts once"
    held = listener.listen(1.2)
    assert held and all(item.is_metadata for item in held), "metadata only while holding"
    status = client.get(f"/v1/streams/{first['stream_id']}").json()
    assert (status["waiting_for"], status["state"], status["references"]) == (1, "running", 2)
    labels = (("format", "raw"), ("group", first["group"]), ("image", images.raw), ("stream_id", first["stream_id"]))
    assert samples(client.get("/metrics").text, "vmcast_stream_waiting_for_receivers")[labels] == 1

    assert joined(client, second["lease_id"])["waiting_for"] == 0
    data_frames = [item for item in listener.listen(0.5) if not item.is_metadata]
    assert data_frames and data_frames[0].offset == 0, "the first loop starts at the image's first frame"
    assert client.get(f"/v1/streams/{first['stream_id']}").json()["waiting_for"] == 0


def test_a_released_lease_no_longer_counts_as_joined(client: TestClient, images: Images) -> None:
    first = start_stream(client, images.raw, min_receivers=2)
    start_stream(client, images.raw)  # a second lease keeps the stream running, still holding
    joined(client, first["lease_id"])
    client.delete(f"/v1/leases/{first['lease_id']}")
    assert client.get(f"/v1/streams/{first['stream_id']}").json()["waiting_for"] == 2


def test_the_hold_ends_after_max_wait_with_whoever_is_there(
    client: TestClient, images: Images, listen: Callable[..., MulticastListener]
) -> None:
    started = start_stream(client, images.raw, min_receivers=5, max_wait=0.5)
    listener = listen(started["group"], started["port"], started["cookie"])
    heard = listener.listen(1.5)
    assert any(not item.is_metadata for item in heard), "the stream started when its hold ran out"
    assert client.get(f"/v1/streams/{started['stream_id']}").json()["waiting_for"] == 0


def test_joining_a_running_stream_never_holds_it(client: TestClient, images: Images) -> None:
    first = start_stream(client, images.raw)
    second = start_stream(client, images.raw, min_receivers=10)
    assert (second["stream_id"], second["waiting_for"]) == (first["stream_id"], 0)


def test_bad_hold_requests_are_refused_clearly(client: TestClient, images: Images) -> None:
    for body in ({"min_receivers": 0}, {"min_receivers": "many"}, {"max_wait": 0}, {"max_wait": -1}):
        response = client.post("/v1/streams", json={"image": images.raw, **body})
        assert response.status_code == 422, (body, response.text)
    unknown = client.post("/v1/leases/no-such-lease/joined")
    assert unknown.status_code == 404
    assert "no-such-lease" in unknown.json()["detail"]


def test_min_receivers_1_holds_until_the_starting_receiver_itself_joined(
    client: TestClient, images: Images, listen: Callable[..., MulticastListener]
) -> None:
    # So a single receiver misses nothing of the first loop between its lease and its join.
    started = start_stream(client, images.raw, min_receivers=1)
    assert started["waiting_for"] == 1
    listener = listen(started["group"], started["port"], started["cookie"])
    assert all(item.is_metadata for item in listener.listen(0.5))
    assert joined(client, started["lease_id"])["waiting_for"] == 0
    data_frames = [item for item in listener.listen(0.5) if not item.is_metadata]
    assert data_frames and data_frames[0].offset == 0


def test_without_min_receivers_a_stream_starts_at_once(client: TestClient, images: Images) -> None:
    started = start_stream(client, images.raw)
    assert started["waiting_for"] == 0
    assert client.get(f"/v1/streams/{started['stream_id']}").json()["waiting_for"] == 0


def test_a_lease_asked_for_while_listening_on_the_stream_counts_as_joined_at_once(
    client: TestClient, images: Images, listen: Callable[..., MulticastListener]
) -> None:
    # A receiver started before its stream learns the group from the long poll, joins it, then takes its
    # lease: no POST .../joined needed.
    first = start_stream(client, images.raw, min_receivers=2, max_wait=60)
    listener = listen(first["group"], first["port"], first["cookie"])
    at = f"{first['group']}:{first['port']}"
    elsewhere = start_stream(client, images.raw, listening=f"{first['group']}:{first['port'] + 1}")
    assert (elsewhere["joined"], elsewhere["waiting_for"]) == (False, 2), "another port: not joined"
    second = start_stream(client, images.raw, listening=at)
    assert (second["stream_id"], second["joined"], second["waiting_for"]) == (first["stream_id"], True, 1)
    assert all(item.is_metadata for item in listener.listen(0.5)), "one of two joined: still holding"

    third = start_stream(client, images.raw, listening=at)
    assert (third["joined"], third["waiting_for"]) == (True, 0)
    data_frames = [item for item in listener.listen(0.5) if not item.is_metadata]
    assert data_frames and data_frames[0].offset == 0, "the second lease joined as granted started the first loop"
    assert joined(client, third["lease_id"])["waiting_for"] == 0, "saying it again changes nothing"


@pytest.mark.parametrize("listening", ["239.255.0.2", "239.255.0.2:", "nowhere:8471", "239.255.0.999:8471", "239.255.0.2:8471 "])
def test_a_malformed_listening_group_is_refused_clearly(client: TestClient, images: Images, listening: str) -> None:
    response = client.post("/v1/streams", json={"image": images.raw, "listening": listening})
    assert response.status_code == 422, response.text
    assert "listening" in response.text
    assert client.get("/v1/streams").json() == [], "nothing started"
