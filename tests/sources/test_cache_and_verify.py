"""Hash-while-writing verification and the download cache's files, on real bytes and real flocks."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from vmcast.server.files import exclusive_lock
from vmcast.server.sources import SourceChecksumMismatch, SourceSizeMismatch, SourceUnverifiable
from vmcast.server.sources.cache import CacheEntry, SourceCache
from vmcast.server.sources.remote import content_key
from vmcast.server.sources.verify import ExpectedContent, copy_verified

from .conftest import random_bytes

KEY = content_key("test\0identity")


def chunks_of(data: bytes, size: int = 1000):
    return (data[i : i + size] for i in range(0, len(data), size))


def test_matching_bytes_are_written_with_every_announced_digest_checked_in_one_pass(tmp_path):
    data = random_bytes(50_000)
    target = tmp_path / "out"
    expected = ExpectedContent(
        size=len(data),
        digests={"sha512": hashlib.sha512(data).hexdigest(), "md5": hashlib.md5(data).hexdigest().upper()},
    )

    with open(target, "wb") as file:
        received = copy_verified(chunks_of(data), file, expected=expected, origin="test")

    assert target.read_bytes() == data
    assert (received.size, received.sha256, received.verified) == (
        len(data),
        hashlib.sha256(data).hexdigest(),
        ("sha512", "md5"),
    )


def test_a_stream_longer_than_announced_is_stopped_as_soon_as_it_overflows(tmp_path):
    pulled = []

    def endless():
        while True:
            pulled.append(1)
            yield b"x" * 1000

    with (
        open(tmp_path / "out", "wb") as file,
        pytest.raises(SourceSizeMismatch, match="more than 5000 arrived") as raised,
    ):
        copy_verified(endless(), file, expected=ExpectedContent(size=5000), origin="test")
    assert len(pulled) == 6 and not raised.value.truncated


def test_a_stream_shorter_than_announced_is_refused(tmp_path):
    with (
        open(tmp_path / "out", "wb") as file,
        pytest.raises(SourceSizeMismatch, match="announced 5000 bytes but 4000 arrived"),
    ):
        copy_verified(chunks_of(b"y" * 4000), file, expected=ExpectedContent(size=5000), origin="test")


def test_a_digest_algorithm_this_python_lacks_is_refused_before_reading(tmp_path):
    with open(tmp_path / "out", "wb") as file, pytest.raises(SourceUnverifiable, match="'whirlpool-9000'"):
        copy_verified(iter(()), file, expected=ExpectedContent(size=0, digests={"whirlpool-9000": "00"}), origin="test")


def test_a_download_that_fails_verification_leaves_no_file_in_the_cache(tmp_path):
    cache = SourceCache(tmp_path / "sources")
    data = random_bytes(10_000)

    wrong = ExpectedContent(size=len(data), digests={"sha256": "0" * 64})
    with (
        pytest.raises(SourceChecksumMismatch),
        cache.lock(KEY),
        cache.partial_file(KEY) as partial,
        open(partial, "xb") as file,
    ):
        copy_verified(chunks_of(data), file, expected=wrong, origin="test")

    assert [p.name for p in cache.directory.iterdir() if not p.name.endswith(".lock")] == []
    assert cache.lookup(KEY) is None


def test_a_committed_download_is_found_by_its_key_with_its_record(tmp_path):
    cache = SourceCache(tmp_path / "sources")
    with cache.partial_file(KEY) as partial:
        partial.write_bytes(b"z" * 123)
        entry = CacheEntry(
            key=KEY,
            path=partial,
            size=123,
            sha256="ab" * 32,
            source_format="raw",
            virtual_size=123,
            name="n",
            origin="o",
        )
        stored = cache.commit(partial, entry)

    assert stored.path == tmp_path / "sources" / f"{KEY}.image" and stored.path.read_bytes() == b"z" * 123
    assert cache.lookup(KEY) == stored
    assert json.loads((tmp_path / "sources" / f"{KEY}.json").read_text())["sha256"] == "ab" * 32


def test_an_image_whose_size_differs_from_its_record_is_not_a_cache_hit(tmp_path):
    cache = SourceCache(tmp_path / "sources")
    with cache.partial_file(KEY) as partial:
        partial.write_bytes(b"z" * 10)
        cache.commit(
            partial,
            CacheEntry(
                key=KEY,
                path=partial,
                size=10,
                sha256="00" * 32,
                source_format="raw",
                virtual_size=10,
                name="n",
                origin="o",
            ),
        )
    (tmp_path / "sources" / f"{KEY}.image").write_bytes(b"truncated")

    assert cache.lookup(KEY) is None


def test_leftovers_of_interrupted_downloads_are_removed_unless_a_live_download_holds_their_lock(tmp_path: Path):
    directory = tmp_path / "sources"
    directory.mkdir()
    crashed = directory / f".{KEY}.4242.0badf00d.partial"
    crashed.write_bytes(b"half")
    live_key = content_key("another")
    live = directory / f".{live_key}.{os.getpid()}.cafe0000.partial"
    live.write_bytes(b"in progress")

    with exclusive_lock(directory / f"{live_key}.lock"):  # a download in progress elsewhere
        SourceCache(directory)

    assert not crashed.exists() and live.exists()


def test_keys_that_are_not_64_hex_digits_never_become_paths(tmp_path):
    cache = SourceCache(tmp_path / "sources")
    with pytest.raises(ValueError, match="not a content key"):
        cache.image_path("../../etc/passwd")
