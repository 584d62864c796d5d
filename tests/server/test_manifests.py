"""Manifests and content keys: computed in one read, cached on disk, trusted only while the file is unchanged."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from vmcast.protocol import default_block_size, manifest_of
from vmcast.server.app import Services
from vmcast.server.fingerprints import Fingerprints
from vmcast.server.manifests import ManifestStore
from vmcast.server.settings import Settings

from .server_testing import Images


def test_a_manifest_is_the_protocol_manifest_of_the_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 777)
    path = tmp_path / "image"
    path.write_bytes(data)
    built = ManifestStore(cache_dir=tmp_path / "cache").build(path, name="image", format="raw", frame_size=1400)
    assert built == manifest_of(data, name="image", format="raw", frame_size=1400)
    assert built.sha1 == hashlib.sha1(data).hexdigest()


def test_a_cached_manifest_is_loaded_under_the_name_asked_for_without_reading_the_image(tmp_path: Path) -> None:
    data = os.urandom(2_000_000)
    path = tmp_path / "image"
    path.write_bytes(data)
    key = "1" * 64
    ManifestStore(cache_dir=tmp_path / "cache").get(path, key=key, name="first-name", format="raw", frame_size=1400)
    store = ManifestStore(cache_dir=tmp_path / "cache")
    loaded = store.get(path, key=key, name="second-name", format="raw", frame_size=1400)
    assert store.builds == 0
    assert loaded == manifest_of(data, name="second-name", format="raw", frame_size=1400)


def test_a_damaged_or_mismatched_manifest_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(os.urandom(50_000))
    ManifestStore(cache_dir=tmp_path / "cache").get(path, key="2" * 64, name="image", format="raw", frame_size=1400)
    [entry] = (tmp_path / "cache" / "manifests").iterdir()
    entry.write_text("{not json")
    store = ManifestStore(cache_dir=tmp_path / "cache")
    store.get(path, key="2" * 64, name="image", format="raw", frame_size=1400)
    assert store.builds == 1
    path.write_bytes(os.urandom(60_000))  # another length under the same key: the entry does not describe it
    rebuilt = store.get(path, key="2" * 64, name="image", format="raw", frame_size=1400)
    assert (store.builds, rebuilt.layout.length) == (2, 60_000)


def test_a_manifest_used_lately_is_served_from_memory_under_any_name(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(os.urandom(50_000))
    store = ManifestStore(cache_dir=tmp_path / "cache")
    first = store.get(path, key="3" * 64, name="one", format="raw", frame_size=1400)
    for entry in (tmp_path / "cache" / "manifests").iterdir():
        entry.unlink()
    second = store.get(path, key="3" * 64, name="two", format="raw", frame_size=1400)
    assert store.builds == 1
    assert (first.name, second.name, second.sha1) == ("one", "two", first.sha1)


def test_the_content_hash_is_remembered_per_path_size_mtime_and_inode(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(os.urandom(100_000))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert Fingerprints(cache_dir=tmp_path / "cache").sha256(path) == expected
    restarted = Fingerprints(cache_dir=tmp_path / "cache")
    assert restarted.sha256(path) == expected
    assert restarted.passes == 0
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # same bytes, but who knows: hash again
    assert restarted.sha256(path) == expected
    assert restarted.passes == 1
    path.write_bytes(os.urandom(100_000))
    assert restarted.sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert restarted.passes == 2


def test_the_first_start_of_a_raw_image_reads_it_once_for_both_its_key_and_its_manifest(
    settings: Settings, images: Images, open_services: Callable[[Settings], Services]
) -> None:
    services = open_services(settings)
    prepared = services.preparer.prepare(services.catalog.get(images.raw), "raw")
    assert services.fingerprints.passes == 1
    assert services.manifests.builds == 0
    assert prepared.manifest == manifest_of(
        images.path(images.raw).read_bytes(), name=images.raw, format="raw", frame_size=settings.payload
    )
    assert prepared.path == images.path(images.raw)


def image_with_zero_blocks(block_size: int) -> bytes:
    """Blocks: zeros, random, zeros, zeros but for the last byte, random, and a short block of zeros."""
    zeros = bytes(block_size)
    return (
        zeros
        + os.urandom(block_size)
        + zeros
        + zeros[:-1]
        + b"\x01"
        + os.urandom(block_size)
        + bytes(block_size // 3)
    )


def test_a_cached_manifest_keeps_its_zero_blocks(tmp_path: Path) -> None:
    data = image_with_zero_blocks(default_block_size(1400))
    path = tmp_path / "image"
    path.write_bytes(data)
    built = ManifestStore(cache_dir=tmp_path / "cache").get(path, key="4" * 64, name="z", format="raw", frame_size=1400)
    assert built.zero_blocks == ((0, 1), (2, 1), (5, 1))
    restarted = ManifestStore(cache_dir=tmp_path / "cache")
    loaded = restarted.get(path, key="4" * 64, name="z", format="raw", frame_size=1400)
    assert restarted.builds == 0
    assert loaded == built == manifest_of(data, name="z", frame_size=1400)


def test_a_cache_entry_from_before_zero_blocks_is_computed_again_not_loaded_without_them(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(image_with_zero_blocks(default_block_size(1400)))
    ManifestStore(cache_dir=tmp_path / "cache").get(path, key="5" * 64, name="z", format="raw", frame_size=1400)
    [entry] = (tmp_path / "cache" / "manifests").iterdir()
    fields = json.loads(entry.read_text())
    del fields["zero_blocks"]
    entry.write_text(json.dumps(dict(fields, version=1)))  # what a server before zero blocks wrote
    store = ManifestStore(cache_dir=tmp_path / "cache")
    manifest = store.get(path, key="5" * 64, name="z", format="raw", frame_size=1400)
    assert store.builds == 1
    assert manifest.zero_blocks == ((0, 1), (2, 1), (5, 1))
    assert json.loads(entry.read_text())["zero_blocks"] == [[0, 1], [2, 1], [5, 1]], "the entry is written anew"


@pytest.mark.parametrize(
    "zero_blocks",
    [None, "0-1", [[0, 7]], [[2, 1], [0, 1]], [[0, 2], [1, 1]], [[0, 0]], [[-1, 1]], [[0, 1.0]], [[0, True]]],
)
def test_a_cache_entry_with_doubtful_zero_blocks_is_computed_again(tmp_path: Path, zero_blocks: object) -> None:
    # A wrong run would make the sender skip blocks that hold data: nothing doubtful is loaded.
    path = tmp_path / "image"
    path.write_bytes(image_with_zero_blocks(default_block_size(1400)))
    ManifestStore(cache_dir=tmp_path / "cache").get(path, key="6" * 64, name="z", format="raw", frame_size=1400)
    [entry] = (tmp_path / "cache" / "manifests").iterdir()
    entry.write_text(json.dumps(dict(json.loads(entry.read_text()), zero_blocks=zero_blocks)))
    store = ManifestStore(cache_dir=tmp_path / "cache")
    manifest = store.get(path, key="6" * 64, name="z", format="raw", frame_size=1400)
    assert store.builds == 1
    assert manifest.zero_blocks == ((0, 1), (2, 1), (5, 1))
