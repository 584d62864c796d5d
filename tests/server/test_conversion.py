"""qcow2 -> raw conversion with real qemu-img: made once, cached by content, shared by concurrent requests."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from vmcast.server.app import Services, create_app, start_services
from vmcast.server.conversion import Converter
from vmcast.server.errors import ConversionFailed, QemuImgMissing
from vmcast.server.qemu_img import QemuImg
from vmcast.server.settings import Settings

from .server_testing import Images, TestClient, sha1_of


def start(client: TestClient, image: str, format: str = "raw") -> dict:
    response = client.post("/v1/streams", json={"image": image, "format": format})
    assert response.status_code == 201, response.text
    return response.json()


def services_of(client: TestClient) -> Services:
    return client.app.state.services


def cached_raw_files(settings: Settings) -> list[Path]:
    return sorted((settings.cache_dir / "raw").glob("*.raw"))


def test_a_qcow2_image_streamed_as_raw_is_what_qemu_img_convert_makes(
    client: TestClient, images: Images, tmp_path: Path
) -> None:
    started = start(client, images.qcow2, "raw")
    reference = tmp_path / "reference.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(images.path(images.qcow2)), str(reference)], check=True
    )
    assert started["sha1"] == sha1_of(reference)
    assert started["len"] == reference.stat().st_size
    # ...and the same bytes as the raw image the qcow2 was made from, up to qemu's 512-byte rounding.
    original = images.path(images.raw).read_bytes()
    assert reference.read_bytes()[: len(original)] == original


def test_a_qcow2_image_is_converted_once_and_later_starts_reuse_the_cached_raw(
    client: TestClient, images: Images, settings: Settings
) -> None:
    first = start(client, images.qcow2, "raw")
    client.delete(f"/v1/leases/{first['lease_id']}")
    [cached] = cached_raw_files(settings)
    before = cached.stat()
    second = start(client, images.qcow2, "raw")
    assert second["stream_id"] != first["stream_id"]  # a new stream...
    assert second["sha1"] == first["sha1"]  # ...of the same bytes...
    assert services_of(client).converter.conversions == 1  # ...converted once
    after = cached.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert cached.name == f"{hashlib.sha256(images.path(images.qcow2).read_bytes()).hexdigest()}.raw"


def test_a_server_that_starts_again_neither_converts_nor_reads_its_images_again(
    settings: Settings, images: Images
) -> None:
    with TestClient(create_app(settings)) as client:
        first = {
            image_format: start(client, name, image_format)
            for name, image_format in ((images.qcow2, "raw"), (images.qcow2, "qcow2"), (images.raw, "raw"))
        }
    with TestClient(create_app(settings)) as client:
        again = {
            image_format: start(client, name, image_format)
            for name, image_format in ((images.qcow2, "raw"), (images.qcow2, "qcow2"), (images.raw, "raw"))
        }
        services = services_of(client)
        assert services.converter.conversions == 0
        assert services.fingerprints.passes == 0, "content hashes are remembered per path, size, mtime and inode"
        assert services.manifests.builds == 0, "manifests are cached by content"
    assert {key: value["sha1"] for key, value in again.items()} == {key: value["sha1"] for key, value in first.items()}


def test_concurrent_first_starts_of_a_qcow2_image_convert_it_once(
    settings: Settings, images: Images, open_services: Callable[[Settings], Services]
) -> None:
    services = open_services(settings)
    image = services.catalog.get(images.qcow2)
    results, errors = [], []

    def prepare() -> None:
        try:
            results.append(services.preparer.prepare(image, "raw"))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=prepare) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert services.converter.conversions == 1
    assert services.fingerprints.passes == 1
    assert len({(result.path, result.manifest.sha1) for result in results}) == 1


def test_two_servers_sharing_a_cache_directory_convert_an_image_once(
    settings_for: Callable[..., Settings], images: Images, open_services: Callable[[Settings], Services], tmp_path: Path
) -> None:
    # Each server keeps its own streams and leases (--state-db); only the cache is shared.
    first = open_services(settings_for(state_db=tmp_path / "first.sqlite3"))
    second = open_services(settings_for(state_db=tmp_path / "second.sqlite3"))
    image = first.catalog.get(images.qcow2)
    key = first.fingerprints.sha256(image.path)
    threads = [
        threading.Thread(target=services.converter.raw_of, args=(image,), kwargs={"key": key})
        for services in (first, second)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert first.converter.conversions + second.converter.conversions == 1


def test_a_changed_image_is_hashed_and_converted_again(client: TestClient, images: Images, tmp_path: Path) -> None:
    first = start(client, images.qcow2, "raw")
    replacement_raw = tmp_path / "other.raw"
    replacement_raw.write_bytes(os.urandom(300_000))
    staged = images.directory / ".staged.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(replacement_raw), str(staged)], check=True)
    staged.rename(images.path(images.qcow2))  # replaced the recommended way: a new file renamed over the old
    second = start(client, images.qcow2, "raw")
    assert second["sha1"] != first["sha1"]
    assert second["stream_id"] != first["stream_id"], "a new stream for the new content; the old one runs on"
    assert services_of(client).converter.conversions == 2
    assert client.get(f"/v1/streams/{first['stream_id']}").json()["state"] == "running"


def test_a_failed_conversion_answers_why_and_leaves_nothing_in_the_cache(
    client: TestClient, images: Images, settings: Settings, tmp_path: Path
) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(65536))
    overlay = images.path("layered.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay)],
        check=True,
        capture_output=True,
    )
    base.unlink()  # the backing file is gone: the header still reads, converting cannot
    response = client.post("/v1/streams", json={"image": "layered.qcow2", "format": "raw"})
    assert response.status_code == 500
    assert "qemu-img could not convert" in response.json()["detail"]
    assert str(base) in response.json()["detail"]
    assert cached_raw_files(settings) == []
    assert list((settings.cache_dir / "raw").glob(".*.partial")) == []


def test_leftovers_of_an_interrupted_conversion_are_removed_at_start(
    settings: Settings, open_services: Callable[[Settings], Services]
) -> None:
    leftover = settings.cache_dir / "raw" / f".{'ab' * 32}.1234.cafe0000.partial"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half an image")
    open_services(settings)
    assert not leftover.exists()


def test_a_missing_qemu_img_is_named_with_the_package_to_install(settings_for: Callable[..., Settings]) -> None:
    with pytest.raises(QemuImgMissing, match=r"apt-get install qemu-utils"):
        start_services(settings_for(qemu_img="/nonexistent/qemu-img"))


def test_the_converter_reports_qemu_img_errors_as_conversion_failures(
    tmp_path: Path, images: Images, settings: Settings, open_services: Callable[[Settings], Services]
) -> None:
    converter = Converter(cache_dir=tmp_path / "cache", qemu=QemuImg())
    services = open_services(settings)
    image = services.catalog.get(images.qcow2)
    images.path(images.qcow2).write_bytes(b"QFI\xfb" + bytes(100))  # a qcow2 magic with nothing valid after it
    with pytest.raises(ConversionFailed):
        converter.raw_of(image, key="0" * 64)
