"""End to end: `vmcast serve` streams images it fetches from Glance, S3 and a URL; `vmcast receive` verifies them.

Real servers throughout: Keystone and Glance, moto's S3, a local HTTP origin, `vmcast serve` and
`vmcast receive` as processes over loopback multicast.
"""

import hashlib

import httpx

from tests.e2e.processes import receiver_result, running_server, sha1_of, start_receiver

from .conftest import qcow2_bytes, random_bytes


def receive(url: str, image: str, tmp_path, *, format: str = "raw") -> tuple[int, dict]:
    output = tmp_path / "received.img"
    receiver = start_receiver(image, "--format", format, "--server", url, "--output", str(output), log=tmp_path / "receiver.log")
    code, summary = receiver_result(receiver, timeout=120)
    assert code == 0, (tmp_path / "receiver.log").read_text()[-2000:]
    assert summary["sha1"] == sha1_of(output)
    return code, summary


def test_a_qcow2_at_a_url_is_streamed_as_raw_and_verified(tmp_path, origin):
    raw = random_bytes(3 << 20)
    url = origin.serve("/images/vm.qcow2", qcow2_bytes(tmp_path, raw))
    (tmp_path / "images").mkdir()
    with running_server(tmp_path / "images", tmp_path, "--rate", "0") as server:
        _, summary = receive(server, url, tmp_path)
        assert summary["sha1"] == hashlib.sha1(raw).hexdigest()
        streams = httpx.get(f"{server}/v1/streams").json()
        assert all(stream["image"] == url for stream in streams)


def test_a_glance_image_is_streamed_and_verified(tmp_path, os_env, glance_images):
    data = random_bytes(2 << 20)
    uploaded = glance_images.upload(data)
    (tmp_path / "images").mkdir()
    with running_server(tmp_path / "images", tmp_path, "--rate", "0") as server:
        _, summary = receive(server, f"glance:{uploaded.id}", tmp_path)
    assert summary["sha1"] == hashlib.sha1(data).hexdigest()


def test_an_s3_object_is_streamed_and_verified(tmp_path, bucket):
    data = random_bytes(2 << 20)
    bucket.put("images/disk.raw", data)
    (tmp_path / "images").mkdir()
    with running_server(tmp_path / "images", tmp_path, "--rate", "0") as server:
        _, summary = receive(server, f"s3://{bucket.name}/images/disk.raw", tmp_path)
    assert summary["sha1"] == hashlib.sha1(data).hexdigest()


def test_an_unknown_glance_image_is_a_clear_404(tmp_path, os_env):
    (tmp_path / "images").mkdir()
    with running_server(tmp_path / "images", tmp_path) as server:
        answer = httpx.post(f"{server}/v1/streams", json={"image": "glance:no-such-image-anywhere", "format": "raw"}, timeout=60)
    assert answer.status_code == 404
    assert "no-such-image-anywhere" in answer.json()["detail"]
