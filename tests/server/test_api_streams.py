"""Streams and leases through the real HTTP API, with real senders heard on loopback multicast."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from vmcast.server.app import create_app
from vmcast.server.settings import Settings

from .server_testing import Images, MulticastListener, TestClient, sha1_of, start_stream


def release(client: TestClient, lease_id: str) -> dict:
    response = client.delete(f"/v1/leases/{lease_id}")
    assert response.status_code == 200, response.text
    return response.json()


def test_starting_a_stream_answers_everything_a_receiver_needs(
    client: TestClient, images: Images, settings: Settings
) -> None:
    started = start_stream(client, images.raw)
    assert set(started) >= {
        "stream_id",
        "group",
        "port",
        "cookie",
        "lease_id",
        "len",
        "sha1",
        "frame_size",
        "image",
        "format",
    }
    assert re.fullmatch(r"[0-9a-f]{16}", started["cookie"])
    assert started["group"] == "239.255.0.1"  # the first address of the range after the network address
    assert started["port"] == settings.mcast_port
    assert started["len"] == images.path(images.raw).stat().st_size
    assert started["sha1"] == sha1_of(images.path(images.raw))
    assert started["frame_size"] == settings.payload
    assert (started["image"], started["format"]) == (images.raw, "raw")


def test_starting_the_same_image_and_format_again_joins_the_stream_with_a_new_lease(
    client: TestClient, images: Images
) -> None:
    first = start_stream(client, images.raw)
    second = start_stream(client, images.raw)
    assert second["stream_id"] == first["stream_id"]
    assert (second["group"], second["port"], second["cookie"]) == (first["group"], first["port"], first["cookie"])
    assert second["lease_id"] != first["lease_id"]
    assert client.get(f"/v1/streams/{first['stream_id']}").json()["references"] == 2
    assert len(client.get("/v1/streams").json()) == 1


def test_each_stream_gets_its_own_group_and_cookie(client: TestClient, images: Images) -> None:
    raw = start_stream(client, images.raw)
    qcow2 = start_stream(client, images.qcow2, "qcow2")
    converted = start_stream(client, images.qcow2, "raw")
    assert len({raw["group"], qcow2["group"], converted["group"]}) == 3
    assert len({raw["cookie"], qcow2["cookie"], converted["cookie"]}) == 3
    assert len({raw["stream_id"], qcow2["stream_id"], converted["stream_id"]}) == 3


def test_two_starts_and_one_stop_keep_the_stream_sending(
    client: TestClient, images: Images, listen: Callable[..., MulticastListener]
) -> None:
    first = start_stream(client, images.raw)
    second = start_stream(client, images.raw)
    listener = listen(first["group"], first["port"], first["cookie"])
    assert listener.listen(0.3), "the stream sends"
    released = release(client, first["lease_id"])
    assert released["outcome"] == "released"
    assert (released["references"], released["stream_stopped"]) == (1, False)
    listener.drain()
    assert len(listener.listen(0.5)) > 100, "datagrams still arrive for the other lease"
    stream = client.get(f"/v1/streams/{second['stream_id']}").json()
    assert (stream["references"], stream["state"]) == (1, "running")


def test_the_last_stop_stops_the_sender_within_a_second(
    client: TestClient, images: Images, listen: Callable[..., MulticastListener]
) -> None:
    first = start_stream(client, images.raw)
    second = start_stream(client, images.raw)
    listener = listen(first["group"], first["port"], first["cookie"])
    assert listener.listen(0.2)
    release(client, first["lease_id"])
    stopped_at = time.monotonic()
    released = release(client, second["lease_id"])
    assert (released["references"], released["stream_stopped"]) == (0, True)
    listener.listen(max(0.0, stopped_at + 1.0 - time.monotonic()))  # what was in flight within the second
    assert listener.listen(0.5) == [], "no datagram after the second that follows the last stop"
    stream = client.get(f"/v1/streams/{first['stream_id']}").json()
    assert (stream["state"], stream["references"], stream["measured_bps"]) == ("stopped", 0, 0)
    assert client.get("/v1/streams").json() == []


def test_releasing_a_lease_twice_never_counts_twice(client: TestClient, images: Images) -> None:
    first = start_stream(client, images.raw)
    second = start_stream(client, images.raw)
    assert release(client, first["lease_id"])["outcome"] == "released"
    again = release(client, first["lease_id"])
    assert again["outcome"] == "already_released"
    assert "already released" in again["detail"]
    assert again["references"] == 1
    stream = client.get(f"/v1/streams/{second['stream_id']}").json()
    assert (stream["references"], stream["state"]) == (1, "running")


def test_releasing_an_unknown_lease_succeeds_and_says_so(client: TestClient) -> None:
    answer = release(client, "no-such-lease")
    assert answer["outcome"] == "unknown"
    assert answer["stream_id"] is None
    assert "no such lease" in answer["detail"]


def test_a_stopped_image_starts_again_as_a_new_stream_with_a_new_cookie(client: TestClient, images: Images) -> None:
    first = start_stream(client, images.raw)
    release(client, first["lease_id"])
    again = start_stream(client, images.raw)
    assert again["stream_id"] != first["stream_id"]
    assert again["cookie"] != first["cookie"]
    assert again["group"] != first["group"], "a just freed group is not reused at once"


def test_stream_counters_grow_while_it_sends(client: TestClient, images: Images, settings: Settings) -> None:
    started = start_stream(client, images.empty)
    big = start_stream(client, images.raw)
    time.sleep(1.2)
    stream = client.get(f"/v1/streams/{big['stream_id']}").json()
    assert stream["datagrams_sent"] > 1000
    assert stream["bytes_sent"] > 1000 * 1400
    assert stream["rate_bps"] == settings.rate
    assert 0.5 * settings.rate < stream["measured_bps"] < 1.1 * settings.rate
    assert stream["state"] == "running"
    assert stream["last_error"] is None
    empty = client.get(f"/v1/streams/{started['stream_id']}").json()
    assert empty["len"] == 0 and empty["datagrams_sent"] >= 1
    assert empty["loops_completed"] >= 1


def test_an_unknown_image_is_404_naming_it(client: TestClient) -> None:
    response = client.post("/v1/streams", json={"image": "missing.qcow2"})
    assert response.status_code == 404
    assert "no image named 'missing.qcow2'" in response.json()["detail"]


def test_a_path_is_not_an_image_name(client: TestClient, images: Images) -> None:
    for name in ("../images/disk.raw", f"{images.directory}/disk.raw", ".hidden", "."):
        assert client.post("/v1/streams", json={"image": name}).status_code == 404


def test_a_format_the_image_is_not_offered_in_is_422_listing_those_it_is(client: TestClient, images: Images) -> None:
    response = client.post("/v1/streams", json={"image": images.raw, "format": "vmdk"})
    assert response.status_code == 422
    assert response.json()["detail"] == "image 'disk.raw' is not offered in format 'vmdk'; formats offered: raw, qcow2"
    for unknown in ("vmdk", "RAW", "no such format!"):
        response = client.post("/v1/streams", json={"image": images.qcow2, "format": unknown})
        assert response.status_code == 422
        assert response.json()["detail"].endswith(f"in format {unknown!r}; formats offered: qcow2, raw")


def test_a_malformed_request_is_422(client: TestClient, images: Images) -> None:
    assert client.post("/v1/streams", json={"format": "raw"}).status_code == 422
    assert client.post("/v1/streams", json={"image": images.raw, "format": ""}).status_code == 422
    assert client.post("/v1/streams", json={"image": images.raw, "colour": "blue"}).status_code == 422


def test_an_unknown_stream_is_404(client: TestClient) -> None:
    response = client.get("/v1/streams/no-such-stream")
    assert response.status_code == 404
    assert "no-such-stream" in response.json()["detail"]


def test_when_every_group_of_the_range_is_taken_a_start_is_503(
    settings_for: Callable[..., Settings], images: Images
) -> None:
    with TestClient(create_app(settings_for(group_range="239.255.9.0/31"))) as client:
        assert start_stream(client, images.raw)["group"] == "239.255.9.0"  # a /31 has no network or broadcast address
        assert start_stream(client, images.empty)["group"] == "239.255.9.1"
        response = client.post("/v1/streams", json={"image": images.qcow2})
        assert response.status_code == 503
        assert "group range 239.255.9.0/31" in response.json()["detail"]


def test_stopping_the_server_stops_every_stream(
    settings: Settings, images: Images, listen: Callable[..., MulticastListener]
) -> None:
    with TestClient(create_app(settings)) as client:
        started = start_stream(client, images.raw)
        listener = listen(started["group"], started["port"], started["cookie"])
        assert listener.listen(0.2)
    listener.drain()
    assert listener.listen(0.3) == []


def test_an_active_lease_can_be_looked_up_and_a_released_one_cannot(client: TestClient, images: Images) -> None:
    started = start_stream(client, images.raw)
    lease = client.get(f"/v1/leases/{started['lease_id']}").json()
    assert lease["stream_id"] == started["stream_id"]
    release(client, started["lease_id"])
    assert client.get(f"/v1/leases/{started['lease_id']}").status_code == 404


def test_health_answers_ok_with_the_number_of_streams(client: TestClient, images: Images) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "streams": 0}
    start_stream(client, images.raw)
    assert client.get("/healthz").json() == {"status": "ok", "streams": 1}


def test_the_openapi_docs_describe_every_route(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/images", "/v1/streams", "/v1/streams/{stream_id}", "/v1/leases/{lease_id}", "/healthz"} <= set(paths)
