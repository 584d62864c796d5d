"""`GET /v1/streams?image=&format=&wait=`: a receiver started before its stream waits on the real API (a long
poll) and is answered the moment someone starts the stream, not a poll interval later."""

from __future__ import annotations

import threading
import time

from .server_testing import Images, TestClient, start_stream


def start_later(client: TestClient, image: str, format: str, delay: float) -> threading.Thread:
    """Start the stream of `image` from another thread after `delay` seconds, as an operator would."""

    def start() -> None:
        time.sleep(delay)
        start_stream(client, image, format)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    return thread


def wait_for(client: TestClient, image: str, format: str, wait: float) -> tuple[list[dict], float]:
    began = time.monotonic()
    response = client.get("/v1/streams", params={"image": image, "format": format, "wait": wait})
    assert response.status_code == 200, response.text
    return response.json(), time.monotonic() - began


def test_a_waiting_request_is_answered_as_soon_as_the_stream_starts(client: TestClient, images: Images) -> None:
    starter = start_later(client, images.raw, "raw", delay=0.5)
    streams, waited = wait_for(client, images.raw, "raw", wait=20)
    starter.join()
    assert [(s["image"], s["format"], s["state"]) for s in streams] == [(images.raw, "raw", "running")]
    assert 0.4 < waited < 5, f"answered after {waited:.2f} s: it should wake at the start (0.5 s), not at the wait's end"


def test_a_wait_ends_empty_when_no_stream_of_that_image_and_format_starts(client: TestClient, images: Images) -> None:
    starter = start_later(client, images.raw, "qcow2", delay=0.2)  # another format: wakes the wait, which goes on
    streams, waited = wait_for(client, images.raw, "raw", wait=1.5)
    starter.join()
    assert streams == []
    assert waited >= 1.5
    assert [s["format"] for s in client.get("/v1/streams").json()] == ["qcow2"]


def test_a_running_stream_is_listed_at_once_and_filters_apply_without_waiting(client: TestClient, images: Images) -> None:
    started = start_stream(client, images.raw)
    streams, waited = wait_for(client, images.raw, "raw", wait=30)
    assert [s["stream_id"] for s in streams] == [started["stream_id"]] and waited < 5
    assert client.get("/v1/streams", params={"image": "other.raw"}).json() == []
    assert len(client.get("/v1/streams").json()) == 1


def test_bad_waits_are_refused_clearly(client: TestClient) -> None:
    for wait in ("-1", "61", "soon"):
        response = client.get("/v1/streams", params={"wait": wait})
        assert response.status_code == 422, (wait, response.text)
