"""glance: sources against the real Keystone + Glance (tests/services), openstacksdk configured as an operator
configures it (OS_* variables, or a cloud of clouds.yaml)."""

from __future__ import annotations

import hashlib
import os

import pytest
from vmcast.server.sources import (
    SourceAmbiguous,
    SourceChecksumMismatch,
    SourceCredentialsRejected,
    SourceFormatRefused,
    SourceNotFound,
    fetch_source,
)
from vmcast.server.sources.verify import ExpectedContent, copy_verified

from .conftest import MIB, SDK_WARNINGS, cache_files, qcow2_bytes, random_bytes, unique

pytestmark = SDK_WARNINGS

WRONG_PASSWORD = "wrong-Pa55word-for-vmcast-sources"


@pytest.fixture(scope="module")
def raw_image(glance_images):
    return glance_images.upload(random_bytes(2 * MIB + 321))


def test_a_glance_image_is_fetched_by_id_byte_for_byte_and_verified_against_glance_hashes(
    os_env, raw_image, cache_dir, caplog
):
    caplog.set_level("INFO", logger="vmcast.server.sources")
    seen: list[tuple[int, int | None]] = []

    fetched = fetch_source(f"glance:{raw_image.id}", cache_dir=cache_dir, progress=lambda *p: seen.append(p))

    assert fetched.path.read_bytes() == raw_image.data
    assert (fetched.name, fetched.origin) == (raw_image.name, f"glance:{raw_image.id}")
    assert (fetched.source_format, fetched.size, fetched.downloaded) == ("raw", len(raw_image.data), True)
    assert fetched.sha256 == hashlib.sha256(raw_image.data).hexdigest()
    assert seen[-1] == (len(raw_image.data), len(raw_image.data))
    assert "verified (sha512, md5)" in caplog.text  # Glance's os_hash_value and checksum, one pass


def test_a_glance_image_fetched_by_name_is_the_same_cache_entry_and_not_downloaded_again(os_env, raw_image, cache_dir):
    by_id = fetch_source(f"glance:{raw_image.id}", cache_dir=cache_dir)
    before = by_id.path.stat()

    by_name = fetch_source(f"glance:{raw_image.name}", cache_dir=cache_dir)
    again = fetch_source(f"glance:{raw_image.id}", cache_dir=cache_dir)

    assert (by_id.downloaded, by_name.downloaded, again.downloaded) == (True, False, False)
    assert by_name.path == by_id.path and by_name.content_key == by_id.content_key
    assert by_name.path.read_bytes() == raw_image.data
    after = by_name.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_named_cloud_of_clouds_yaml_is_used_when_given(glance_cloud, raw_image, cache_dir, monkeypatch):
    for name in [n for n in os.environ if n.startswith("OS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(glance_cloud.clouds_yaml))

    fetched = fetch_source(f"glance:{raw_image.name}", cache_dir=cache_dir, cloud=glance_cloud.cloud_name)

    assert fetched.path.read_bytes() == raw_image.data


def test_a_qcow2_uploaded_to_glance_is_detected_as_qcow2(os_env, glance_images, cache_dir, tmp_path):
    raw = random_bytes(3 * MIB)
    image = glance_images.upload(qcow2_bytes(tmp_path, raw), disk_format="qcow2")

    fetched = fetch_source(f"glance:{image.id}", cache_dir=cache_dir)

    assert (fetched.source_format, fetched.virtual_size) == ("qcow2", len(raw))
    assert fetched.path.read_bytes() == image.data


def test_an_image_whose_content_contradicts_its_glance_disk_format_is_refused(
    os_env, glance_images, cache_dir, tmp_path
):
    mislabelled = glance_images.upload(qcow2_bytes(tmp_path, random_bytes(MIB)), disk_format="raw")

    with pytest.raises(SourceFormatRefused, match="declares it raw but its content is qcow2"):
        fetch_source(f"glance:{mislabelled.id}", cache_dir=cache_dir)

    assert cache_files(cache_dir) == []


def test_a_name_shared_by_two_active_images_is_ambiguous_and_the_error_lists_their_ids(
    os_env, glance_images, cache_dir
):
    name = unique("vmcast-sources-twin")
    first = glance_images.upload(random_bytes(4096), name=name)
    second = glance_images.upload(random_bytes(4096), name=name)

    with pytest.raises(SourceAmbiguous) as raised:
        fetch_source(f"glance:{name}", cache_dir=cache_dir)

    assert set(raised.value.candidates) == {first.id, second.id}
    assert "ask for one by id" in str(raised.value)


@pytest.mark.parametrize("reference", ["vmcast-sources-no-such-image", "00000000-0000-4000-8000-000000000000"])
def test_an_unknown_image_name_or_id_is_a_clear_not_found(os_env, cache_dir, reference):
    with pytest.raises(
        SourceNotFound,
        match=rf"glance:{reference} not found: no image with that (id or )?name is visible to user admin",
    ):
        fetch_source(f"glance:{reference}", cache_dir=cache_dir)


def test_a_wrong_password_is_rejected_by_keystone_and_shows_nowhere(os_env, cache_dir, monkeypatch, caplog):
    monkeypatch.setenv("OS_PASSWORD", WRONG_PASSWORD)
    caplog.set_level("DEBUG")  # every logger: ours, openstacksdk's and keystoneauth's

    with pytest.raises(
        SourceCredentialsRejected, match=r"refused at http://127\.0\.0\.1:\d+/v3 as user admin"
    ) as raised:
        fetch_source("glance:anything", cache_dir=cache_dir)

    assert WRONG_PASSWORD not in str(raised.value)
    assert WRONG_PASSWORD not in repr(raised.value.__dict__)
    assert WRONG_PASSWORD not in caplog.text
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # the SDK's exception is not chained


def test_bytes_that_differ_from_the_announced_checksum_are_refused_and_not_kept(tmp_path):
    # Real Glance will not serve data that differs from its own os_hash_value (it computes the hash as it
    # stores the data, and its file store is outside this test's reach), so the check the Glance source runs
    # on every download (`copy_verified`, the same function, the same pass) is tested on a stream here.
    data = random_bytes(MIB)
    wrong = hashlib.sha512(data + b"!").hexdigest()
    target = tmp_path / "partial"

    with open(target, "wb") as file, pytest.raises(SourceChecksumMismatch) as raised:
        copy_verified(
            iter([data[:1000], data[1000:]]), file,
            expected=ExpectedContent(size=len(data), digests={"sha512": wrong, "md5": hashlib.md5(data).hexdigest()}),
            origin="glance:test",
        )  # fmt: skip

    assert (raised.value.algorithm, raised.value.expected, raised.value.actual) == (
        "sha512",
        wrong,
        hashlib.sha512(data).hexdigest(),
    )
