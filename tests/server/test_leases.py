"""Leases expire unless renewed: a 1-second TTL through the real API, with the sender heard on the group."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from vmcast.server.app import create_app
from vmcast.server.settings import Settings

from .server_testing import Images, MulticastListener, TestClient, samples, start_stream

TTL = 1.0
# The reaper looks every TTL / 4; the sender stops within a second of its last lease ending.
STOPPED_WITHIN = TTL + TTL / 4 + 1.0


@pytest.fixture
def short_client(settings_for: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(lease_ttl=TTL))) as client:
        yield client


def test_a_start_says_how_long_the_lease_lives(short_client: TestClient, images: Images) -> None:
    started = start_stream(short_client, images.raw)
    assert started["lease_ttl"] == TTL
    assert abs(started["expires_at"] - (time.time() + TTL)) < 0.5
    lease = short_client.get(f"/v1/leases/{started['lease_id']}").json()
    assert (lease["lease_ttl"], lease["stream_id"]) == (TTL, started["stream_id"])


def test_a_lease_that_is_not_renewed_expires_and_its_stream_stops(
    short_client: TestClient, images: Images, listen: Callable[..., MulticastListener]
) -> None:
    started = start_stream(short_client, images.raw)
    listener = listen(started["group"], started["port"], started["cookie"])
    assert listener.listen(0.2)
    began = time.monotonic()
    while short_client.get(f"/v1/streams/{started['stream_id']}").json()["state"] != "stopped":
        assert time.monotonic() - began < STOPPED_WITHIN, "the stream stops once its only lease expired"
        time.sleep(0.05)
    listener.listen(0.1)  # what was in flight
    assert listener.listen(0.4) == [], "nothing is sent after the stream stopped"

    renewed = short_client.post(f"/v1/leases/{started['lease_id']}/renew")
    assert renewed.status_code == 404
    assert renewed.json()["detail"].startswith("lease expired; start the stream again")
    assert short_client.get(f"/v1/leases/{started['lease_id']}").status_code == 404
    released = short_client.delete(f"/v1/leases/{started['lease_id']}").json()
    assert (released["outcome"], released["stream_stopped"]) == ("expired", True)
    assert samples(short_client.get("/metrics").text, "vmcast_leases_expired_total") == {(): 1}

    again = start_stream(short_client, images.raw)
    assert again["stream_id"] != started["stream_id"], "starting again makes a new stream with a new lease"


def test_renewing_keeps_a_lease_and_its_stream_alive(
    short_client: TestClient, images: Images, listen: Callable[..., MulticastListener]
) -> None:
    started = start_stream(short_client, images.raw)
    forgotten = start_stream(short_client, images.raw)  # a second holder that never renews
    expires_at = started["expires_at"]
    deadline = time.monotonic() + 3 * TTL
    while time.monotonic() < deadline:
        time.sleep(TTL / 3)
        renewed = short_client.post(f"/v1/leases/{started['lease_id']}/renew")
        assert renewed.status_code == 200, renewed.text
        assert renewed.json()["expires_at"] > expires_at
        expires_at = renewed.json()["expires_at"]
    stream = short_client.get(f"/v1/streams/{started['stream_id']}").json()
    assert (stream["state"], stream["references"]) == ("running", 1), "only the forgotten lease expired"
    assert short_client.post(f"/v1/leases/{forgotten['lease_id']}/renew").status_code == 404
    listener = listen(started["group"], started["port"], started["cookie"])
    assert listener.listen(0.2), "the stream still sends"


def test_renewing_an_unknown_or_released_lease_is_404(short_client: TestClient, images: Images) -> None:
    response = short_client.post("/v1/leases/no-such-lease/renew")
    assert response.status_code == 404
    assert "start the stream again" in response.json()["detail"]
    started = start_stream(short_client, images.raw)
    short_client.delete(f"/v1/leases/{started['lease_id']}")
    response = short_client.post(f"/v1/leases/{started['lease_id']}/renew")
    assert response.status_code == 404
