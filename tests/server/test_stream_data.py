"""The unicast fallback: GET/HEAD /v1/streams/{id}/data with HTTP Range, capped by --repair-rate for everyone."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from vmcast.server.settings import Settings

from .server_testing import Images, ServerProcess, TestClient, samples


def start(client: TestClient | httpx.Client, image: str) -> dict:
    response = client.post("/v1/streams", json={"image": image})
    assert response.status_code == 201, response.text
    return response.json()


def test_ranges_are_answered_206_with_the_bytes_of_the_file_and_their_content_range(
    client: TestClient, images: Images
) -> None:
    image = images.path(images.raw).read_bytes()
    length = len(image)
    started = start(client, images.raw)
    url = f"/v1/streams/{started['stream_id']}/data"
    for header, first, last in (
        ("bytes=0-99", 0, 99),
        (f"bytes={length - 1400}-", length - 1400, length - 1),
        ("bytes=-123", length - 123, length - 1),
        (f"bytes=1400-{10 * length}", 1400, length - 1),
        ("bytes=700000-700009, 0-9", 700000, 700009),  # several ranges: the first, alone
    ):
        response = client.get(url, headers={"Range": header})
        assert response.status_code == 206, header
        assert response.headers["content-range"] == f"bytes {first}-{last}/{length}"
        assert int(response.headers["content-length"]) == last - first + 1
        assert response.content == image[first : last + 1]
        assert response.headers["accept-ranges"] == "bytes"
        assert response.headers["etag"] == f'"{started["sha1"]}"'


def test_without_a_range_the_whole_image_is_200(client: TestClient, images: Images) -> None:
    started = start(client, images.raw)
    response = client.get(f"/v1/streams/{started['stream_id']}/data")
    assert response.status_code == 200
    assert response.content == images.path(images.raw).read_bytes()
    assert response.headers["content-type"] == "application/octet-stream"
    assert "content-range" not in response.headers


def test_a_range_past_the_end_is_416_with_the_length(client: TestClient, images: Images) -> None:
    length = images.path(images.raw).stat().st_size
    started = start(client, images.raw)
    for header in (f"bytes={length}-", f"bytes={length + 5}-{length + 10}", "bytes=-0"):
        response = client.get(f"/v1/streams/{started['stream_id']}/data", headers={"Range": header})
        assert response.status_code == 416, header
        assert response.headers["content-range"] == f"bytes */{length}"
    empty = start(client, images.empty)
    response = client.get(f"/v1/streams/{empty['stream_id']}/data", headers={"Range": "bytes=0-"})
    assert (response.status_code, response.headers["content-range"]) == (416, "bytes */0")


def test_if_range_with_another_etag_gets_the_whole_image(client: TestClient, images: Images) -> None:
    started = start(client, images.raw)
    url = f"/v1/streams/{started['stream_id']}/data"
    same = client.get(url, headers={"Range": "bytes=0-9", "If-Range": f'"{started["sha1"]}"'})
    other = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"0000"'})
    assert (same.status_code, len(same.content)) == (206, 10)
    assert (other.status_code, len(other.content)) == (200, started["len"])


def test_head_answers_the_headers_of_get_without_the_bytes(client: TestClient, images: Images) -> None:
    started = start(client, images.raw)
    url = f"/v1/streams/{started['stream_id']}/data"
    whole = client.head(url)
    assert (whole.status_code, whole.headers["content-length"], whole.content) == (200, str(started["len"]), b"")
    part = client.head(url, headers={"Range": "bytes=10-19"})
    assert (part.status_code, part.headers["content-range"], part.headers["content-length"]) == (
        206,
        f"bytes 10-19/{started['len']}",
        "10",
    )


def test_data_of_an_unknown_or_stopped_stream_is_404(client: TestClient, images: Images) -> None:
    assert client.get("/v1/streams/no-such-stream/data").status_code == 404
    started = start(client, images.raw)
    client.delete(f"/v1/leases/{started['lease_id']}")
    response = client.get(f"/v1/streams/{started['stream_id']}/data", headers={"Range": "bytes=0-9"})
    assert response.status_code == 404
    assert "has stopped" in response.json()["detail"]


def test_an_image_file_changed_in_place_is_never_served(client: TestClient, images: Images) -> None:
    started = start(client, images.raw)
    path = images.path(images.raw)
    with open(path, "r+b") as file:  # written in place, as one must not
        file.write(b"changed!")
    response = client.get(f"/v1/streams/{started['stream_id']}/data", headers={"Range": "bytes=0-9"})
    assert response.status_code == 409
    assert "changed" in response.json()["detail"]


def test_one_download_is_held_to_the_repair_rate(settings_for: Callable[..., Settings], images: Images) -> None:
    from vmcast.server.app import create_app

    # 8 Mbit/s is 1 MB/s: the 2.1 MB image takes 2.1 s (less the first 64 KiB chunk, which the bucket holds).
    with TestClient(create_app(settings_for(repair_rate="8mbit"))) as client:
        started = start(client, images.raw)
        began = time.monotonic()
        response = client.get(f"/v1/streams/{started['stream_id']}/data")
        elapsed = time.monotonic() - began
    assert response.content == images.path(images.raw).read_bytes()
    assert 1.8 <= elapsed < 4.0, f"{len(response.content)} bytes in {elapsed:.2f} s at 8 Mbit/s"


def test_concurrent_downloads_share_one_cap_and_never_block_the_api(
    server_process: Callable[..., ServerProcess], images: Images
) -> None:
    server = server_process("--repair-rate", "8mbit", "--rate", "20mbit").start()
    image = images.path(images.raw).read_bytes()
    half = len(image) // 2
    with httpx.Client(base_url=server.url, timeout=30) as http:
        started = start(http, images.raw)
    url = f"{server.url}/v1/streams/{started['stream_id']}/data"
    got: dict[str, bytes] = {}

    def fetch(header: str) -> None:
        with httpx.Client(timeout=30) as http:
            got[header] = http.get(url, headers={"Range": header}).content

    threads = [threading.Thread(target=fetch, args=(header,)) for header in (f"bytes=0-{half - 1}", f"bytes={half}-")]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    answered = time.monotonic()
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
    assert time.monotonic() - answered < 0.5, "the API answers while downloads wait for the cap"
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    assert got[f"bytes=0-{half - 1}"] + got[f"bytes={half}-"] == image
    # Together 2.1 MB under one 1 MB/s cap: about 2.1 s, not the 1.05 s two separate caps would allow.
    assert 1.8 <= elapsed < 5.0, f"{len(image)} bytes in two downloads took {elapsed:.2f} s at 8 Mbit/s"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert samples(metrics, "vmcast_range_responses_total")[(("status", "206"),)] == 2
    assert samples(metrics, "vmcast_range_bytes_sent_total") == {(): len(image)}


def test_a_download_the_client_abandons_leaves_no_file_open(
    server_process: Callable[..., ServerProcess], images: Images
) -> None:
    server = server_process("--repair-rate", "2mbit").start()
    assert server.process is not None
    image_path = str(images.path(images.raw))

    def open_images() -> int:
        fds = Path(f"/proc/{server.process.pid}/fd")
        return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == image_path)

    with httpx.Client(base_url=server.url, timeout=30) as http:
        started = start(http, images.raw)
        baseline = open_images()  # the sender's own map of the image
        with http.stream("GET", f"/v1/streams/{started['stream_id']}/data") as response:
            body = response.iter_bytes()  # kept: dropping the iterator would close the connection at once
            next(body)
            assert open_images() == baseline + 1, "the body holds the file while it runs"
        # Closed after a few bytes of 2.1 MB: at 2 Mbit/s the body had 8 s to go.
        deadline = time.monotonic() + 3
        while open_images() != baseline:
            assert time.monotonic() < deadline, "the abandoned body still holds the file"
            time.sleep(0.05)
