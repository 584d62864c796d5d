"""Conversions with real qemu-img (qcow2 -> raw, raw -> qcow2, vmdk -> both): made once, cached by content and
target format, shared by concurrent requests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from vmcast.server.app import Services, create_app, start_services
from vmcast.server.catalog import CONVERTIBLE_FORMATS, formats_offered
from vmcast.server.conversion import Converter
from vmcast.server.errors import ConversionFailed, QemuImgMissing
from vmcast.server.qemu_img import QemuImg
from vmcast.server.settings import Settings
from vmcast.server.sources.formats import ACCEPTED_FORMATS

from .server_testing import Images, TestClient, sha1_of


def start(client: TestClient, image: str, format: str = "raw") -> dict:
    response = client.post("/v1/streams", json={"image": image, "format": format})
    assert response.status_code == 201, response.text
    return response.json()


def services_of(client: TestClient) -> Services:
    return client.app.state.services


def cached_raw_files(settings: Settings) -> list[Path]:
    return cached_files(settings, "raw")


def cached_files(settings: Settings, target_format: str) -> list[Path]:
    return sorted((settings.cache_dir / target_format).glob(f"*.{target_format}"))


def qemu_img_info(path: Path) -> dict:
    done = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout)


def to_raw(path: Path, source_format: str, target: Path) -> bytes:
    subprocess.run(
        ["qemu-img", "convert", "-f", source_format, "-O", "raw", str(path), str(target)], check=True, capture_output=True
    )
    return target.read_bytes()


def padded_to_sectors(data: bytes) -> bytes:
    """`data` as a disk: qemu rounds a raw file's size up to whole 512-byte sectors, the rest read as zeros."""
    return data + bytes(-len(data) % 512)


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
    asked = ((images.qcow2, "raw"), (images.qcow2, "qcow2"), (images.raw, "raw"), (images.raw, "qcow2"))
    with TestClient(create_app(settings)) as client:
        first = {(name, image_format): start(client, name, image_format) for name, image_format in asked}
    with TestClient(create_app(settings)) as client:
        again = {(name, image_format): start(client, name, image_format) for name, image_format in asked}
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


@pytest.mark.parametrize(("source", "target_format"), [("qcow2", "raw"), ("raw", "qcow2")])
def test_two_servers_sharing_a_cache_directory_convert_an_image_once(
    settings_for: Callable[..., Settings],
    images: Images,
    open_services: Callable[[Settings], Services],
    tmp_path: Path,
    source: str,
    target_format: str,
) -> None:
    # Each server keeps its own streams and leases (--state-db); only the cache is shared.
    first = open_services(settings_for(state_db=tmp_path / "first.sqlite3"))
    second = open_services(settings_for(state_db=tmp_path / "second.sqlite3"))
    image = first.catalog.get(getattr(images, source))
    key = first.fingerprints.sha256(image.path)
    threads = [
        threading.Thread(
            target=services.converter.convert, args=(image,), kwargs={"key": key, "target_format": target_format}
        )
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


@pytest.mark.parametrize("target_format", ["raw", "qcow2"])
def test_leftovers_of_an_interrupted_conversion_are_removed_at_start(
    settings: Settings, open_services: Callable[[Settings], Services], target_format: str
) -> None:
    leftover = settings.cache_dir / target_format / f".{'ab' * 32}.1234.cafe0000.partial"
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
        converter.convert(image, key="0" * 64, target_format="raw")


# -- raw -> qcow2 (and any convertible format -> qcow2) ----------------------------------------------------------


def test_formats_offered_are_the_source_format_first_then_raw_and_qcow2_when_qemu_img_can_convert_it() -> None:
    assert formats_offered("raw") == ("raw", "qcow2")
    assert formats_offered("qcow2") == ("qcow2", "raw")
    for source_format in ("vmdk", "vpc", "vhdx", "vdi", "qed", "qcow"):
        assert formats_offered(source_format) == (source_format, "raw", "qcow2")
    assert formats_offered("luks") == ("luks",)  # converting it would need its secret
    assert ACCEPTED_FORMATS == CONVERTIBLE_FORMATS, "a fetched image is accepted only if it can be converted"


def test_a_raw_image_streamed_as_qcow2_is_a_valid_qcow2_that_converts_back_to_the_raw_bytes(
    client: TestClient, images: Images, settings: Settings, tmp_path: Path
) -> None:
    started = start(client, images.raw, "qcow2")
    assert started["format"] == "qcow2"
    original = images.path(images.raw).read_bytes()
    [cached] = cached_files(settings, "qcow2")
    assert cached.name == f"{hashlib.sha256(original).hexdigest()}.qcow2"
    # What the stream announces is the qcow2 file's bytes, which the fallback serves too.
    assert (started["sha1"], started["len"]) == (sha1_of(cached), cached.stat().st_size)
    data = client.get(f"/v1/streams/{started['stream_id']}/data")
    assert data.status_code == 200 and data.content == cached.read_bytes()
    info = qemu_img_info(cached)
    assert (info["format"], info["virtual-size"]) == ("qcow2", len(padded_to_sectors(original)))
    assert info.get("backing-filename") is None
    assert to_raw(cached, "qcow2", tmp_path / "back.raw") == padded_to_sectors(original)
    assert cached_raw_files(settings) == [], "raw -> qcow2 is one conversion, not through a raw copy"


def test_a_raw_image_is_converted_to_qcow2_once_and_later_starts_reuse_it(
    client: TestClient, images: Images, settings: Settings
) -> None:
    first = start(client, images.raw, "qcow2")
    client.delete(f"/v1/leases/{first['lease_id']}")
    [cached] = cached_files(settings, "qcow2")
    before = cached.stat()
    second = start(client, images.raw, "qcow2")
    assert second["stream_id"] != first["stream_id"]
    assert second["sha1"] == first["sha1"]
    services = services_of(client)
    assert services.converter.conversions == 1
    assert services.fingerprints.passes == 1
    after = cached.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_raw_image_streams_as_raw_and_as_qcow2_at_once_each_from_its_own_file(
    client: TestClient, images: Images, settings: Settings
) -> None:
    as_raw = start(client, images.raw, "raw")
    as_qcow2 = start(client, images.raw, "qcow2")
    assert as_raw["stream_id"] != as_qcow2["stream_id"]
    assert as_raw["sha1"] == sha1_of(images.path(images.raw))
    [cached] = cached_files(settings, "qcow2")
    assert as_qcow2["sha1"] == sha1_of(cached)
    assert services_of(client).fingerprints.passes == 1, "one content key for both"


def test_a_vmdk_image_is_offered_and_streamed_as_itself_raw_and_qcow2(
    client: TestClient, images: Images, settings: Settings, tmp_path: Path
) -> None:
    vmdk = images.path("disk.vmdk")
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(images.path(images.raw)), str(vmdk)],
        check=True,
        capture_output=True,
    )
    listed = {image["name"]: image["formats"] for image in client.get("/v1/images").json()}
    assert listed["disk.vmdk"] == ["vmdk", "raw", "qcow2"]
    original = padded_to_sectors(images.path(images.raw).read_bytes())
    as_raw = start(client, "disk.vmdk", "raw")
    [raw] = cached_files(settings, "raw")
    assert as_raw["sha1"] == hashlib.sha1(original).hexdigest() == sha1_of(raw)
    as_qcow2 = start(client, "disk.vmdk", "qcow2")
    [qcow2] = cached_files(settings, "qcow2")
    assert as_qcow2["sha1"] == sha1_of(qcow2)
    assert to_raw(qcow2, "qcow2", tmp_path / "back.raw") == original
    assert services_of(client).converter.conversions == 2


def test_a_conversion_made_again_is_announced_with_its_own_manifest_never_that_of_the_earlier_one(
    client: TestClient, images: Images, settings: Settings
) -> None:
    first = start(client, images.raw, "qcow2")
    client.delete(f"/v1/leases/{first['lease_id']}")
    [cached] = cached_files(settings, "qcow2")
    # As if the cache file were deleted and made again by another qemu-img: valid, same length, other bytes.
    remade = bytearray(cached.read_bytes())
    remade[-1] ^= 0xFF  # the last data cluster (random image data)
    staged = cached.with_name(".staged")
    staged.write_bytes(remade)
    staged.rename(cached)
    second = start(client, images.raw, "qcow2")
    assert second["sha1"] == hashlib.sha1(remade).hexdigest() != first["sha1"]


def test_the_converter_refuses_a_target_format_it_does_not_convert_to(
    tmp_path: Path, images: Images, settings: Settings, open_services: Callable[[Settings], Services]
) -> None:
    image = open_services(settings).catalog.get(images.raw)
    converter = Converter(cache_dir=tmp_path / "converter-only", qemu=QemuImg())
    for target_format in ("vmdk", "../raw", ""):
        with pytest.raises(ValueError, match="no conversion to"):
            converter.convert(image, key="0" * 64, target_format=target_format)
    assert sorted(path.name for path in (tmp_path / "converter-only").iterdir()) == ["qcow2", "raw"]
