"""A server restart loses nothing: streams resume on the same group, port and cookie, and leases stay valid.

Real `vmcast serve` processes killed with SIGKILL (no clean-up at all), started again on the same state
database, heard on the real multicast group.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import httpx
from vmcast.server.app import create_app
from vmcast.server.settings import Settings

from .server_testing import Images, MulticastListener, ServerProcess, TestClient

LEASE_TTL = "20"


def start(url: str, image: str, format: str = "raw") -> dict:
    response = httpx.post(f"{url}/v1/streams", json={"image": image, "format": format}, timeout=30)
    assert response.status_code == 201, response.text
    return response.json()


def metadata_sha1(listener: MulticastListener, seconds: float = 1.2) -> str:
    heard = [item for item in listener.listen(seconds) if item.is_metadata]
    assert heard, "metadata is heard at least once a second"
    return json.loads(heard[0].payload)["sha1"]


def test_after_kill_9_and_a_restart_the_same_streams_send_again_and_their_leases_are_valid(
    server_process: Callable[..., ServerProcess], images: Images
) -> None:
    first = server_process("--rate", "20mbit", "--lease-ttl", LEASE_TTL).start()
    raw = start(first.url, images.raw)
    raw_again = start(first.url, images.raw)
    converted = start(first.url, images.qcow2, "raw")
    listeners = {
        stream["stream_id"]: MulticastListener(stream["group"], stream["port"], stream["cookie"])
        for stream in (raw, converted)
    }
    try:
        assert all(listener.listen(0.2) for listener in listeners.values())
        first.kill()
        for listener in listeners.values():
            listener.drain()
            assert listener.listen(0.3) == [], "a killed server sends nothing"

        second = server_process("--rate", "20mbit", "--lease-ttl", LEASE_TTL, port=first.port).start()
        streams = {stream["stream_id"]: stream for stream in httpx.get(f"{second.url}/v1/streams").json()}
        assert set(streams) == {raw["stream_id"], converted["stream_id"]}
        for before in (raw, converted):
            after = streams[before["stream_id"]]
            assert (after["group"], after["port"], after["cookie"]) == (
                before["group"],
                before["port"],
                before["cookie"],
            )
            assert (after["image"], after["format"], after["sha1"]) == (
                before["image"],
                before["format"],
                before["sha1"],
            )
            assert metadata_sha1(listeners[before["stream_id"]]) == before["sha1"], "the same image is on the wire"
        assert streams[raw["stream_id"]]["references"] == 2

        for lease in (raw, raw_again, converted):
            renewed = httpx.post(f"{second.url}/v1/leases/{lease['lease_id']}/renew")
            assert renewed.status_code == 200, renewed.text
            assert renewed.json()["stream_id"] == lease["stream_id"]

        fresh = start(second.url, images.empty)
        assert fresh["group"] not in {raw["group"], converted["group"]}, "a resumed stream's group is not reused"
        joined = start(second.url, images.raw)
        assert (joined["stream_id"], joined["cookie"]) == (raw["stream_id"], raw["cookie"])
        released = httpx.delete(f"{second.url}/v1/leases/{raw['lease_id']}").json()
        assert (released["outcome"], released["references"]) == ("released", 2)
    finally:
        for listener in listeners.values():
            listener.close()


def test_a_stream_whose_image_changed_while_the_server_was_down_is_dropped_with_a_log_line(
    server_process: Callable[..., ServerProcess], images: Images
) -> None:
    first = server_process("--lease-ttl", LEASE_TTL).start()
    raw = start(first.url, images.raw)
    kept = start(first.url, images.qcow2, "qcow2")
    first.kill()
    staged = images.directory / ".staged"
    staged.write_bytes(os.urandom(images.path(images.raw).stat().st_size))
    staged.rename(images.path(images.raw))

    second = server_process("--lease-ttl", LEASE_TTL, port=first.port).start()
    assert [stream["stream_id"] for stream in httpx.get(f"{second.url}/v1/streams").json()] == [kept["stream_id"]]
    assert httpx.post(f"{second.url}/v1/leases/{raw['lease_id']}/renew").status_code == 404
    assert httpx.post(f"{second.url}/v1/leases/{kept['lease_id']}/renew").status_code == 200
    second.stop()
    log = second.output()
    assert f"stream {raw['stream_id']}" in log and "not resumed" in log and "its image changed" in log


def test_a_graceful_stop_is_a_restart_too(settings: Settings, images: Images) -> None:
    with TestClient(create_app(settings)) as client:
        started = client.post("/v1/streams", json={"image": images.raw}).json()
    with TestClient(create_app(settings)) as client:
        stream = client.get(f"/v1/streams/{started['stream_id']}").json()
        assert (stream["state"], stream["cookie"], stream["group"]) == ("running", started["cookie"], started["group"])
        assert client.post(f"/v1/leases/{started['lease_id']}/renew").status_code == 200
        client.delete(f"/v1/leases/{started['lease_id']}")
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/streams").json() == [], "a released stream is not resumed"


def test_a_resumed_lease_that_nobody_renews_expires_after_a_fresh_ttl(
    settings_for: Callable[..., Settings], images: Images
) -> None:
    import time

    with TestClient(create_app(settings_for(lease_ttl=30))) as client:
        started = client.post("/v1/streams", json={"image": images.raw}).json()
    with TestClient(create_app(settings_for(lease_ttl=0.5))) as client:
        assert client.get(f"/v1/streams/{started['stream_id']}").json()["state"] == "running"
        time.sleep(1.2)
        assert client.get(f"/v1/streams/{started['stream_id']}").json()["state"] in {"stopping", "stopped"}
        assert client.post(f"/v1/leases/{started['lease_id']}/renew").status_code == 404
