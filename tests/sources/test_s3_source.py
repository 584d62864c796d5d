"""s3:// sources against moto's real S3 server (tests/services), boto3 configured by AWS_* variables only."""

from __future__ import annotations

import pytest
from vmcast.server.sources import SourceNotFound, fetch_source

from .conftest import MIB, cache_files, random_bytes


def test_an_s3_object_is_fetched_byte_for_byte_and_its_md5_etag_checked(bucket, cache_dir, caplog):
    caplog.set_level("INFO", logger="vmcast.server.sources")
    data = random_bytes(2 * MIB + 99)
    bucket.put("images/debian-12.raw", data)
    seen: list[tuple[int, int | None]] = []

    fetched = fetch_source(
        f"s3://{bucket.name}/images/debian-12.raw", cache_dir=cache_dir, progress=lambda *p: seen.append(p)
    )

    assert fetched.path.read_bytes() == data
    assert (fetched.name, fetched.source_format, fetched.size, fetched.downloaded) == (
        "debian-12.raw",
        "raw",
        len(data),
        True,
    )
    assert seen[-1] == (len(data), len(data))
    assert "verified (md5)" in caplog.text  # a single-part ETag is the object's MD5


def test_an_unchanged_s3_object_is_not_downloaded_again(bucket, cache_dir):
    bucket.put("disk.raw", random_bytes())
    spec = f"s3://{bucket.name}/disk.raw"
    first = fetch_source(spec, cache_dir=cache_dir)
    before = first.path.stat()

    again = fetch_source(spec, cache_dir=cache_dir)

    assert again.downloaded is False and again.content_key == first.content_key
    assert (again.path.stat().st_ino, again.path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_an_s3_object_overwritten_with_new_bytes_is_downloaded_again(bucket, cache_dir):
    spec = f"s3://{bucket.name}/disk.raw"
    bucket.put("disk.raw", random_bytes())
    first = fetch_source(spec, cache_dir=cache_dir)
    replacement = random_bytes()
    bucket.put("disk.raw", replacement)

    second = fetch_source(spec, cache_dir=cache_dir)

    assert second.downloaded is True and second.content_key != first.content_key
    assert second.path.read_bytes() == replacement


def test_a_missing_s3_object_is_a_clear_not_found_naming_the_key(bucket, cache_dir):
    with pytest.raises(SourceNotFound, match=rf"no object 'no/such.raw' in bucket '{bucket.name}'"):
        fetch_source(f"s3://{bucket.name}/no/such.raw", cache_dir=cache_dir)
    assert cache_files(cache_dir) == []


def test_a_missing_bucket_is_a_clear_not_found_naming_the_bucket(aws_env, cache_dir, caplog, monkeypatch):
    # moto accepts any access key and secret (it checks no signature unless told to), so "wrong credentials"
    # cannot be produced on the shared moto server: a missing bucket is tested instead, with a recognisable
    # secret that must show neither in the error nor in the logs.
    secret = "Wr0ngButAcceptedByMotoSecretKey"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    caplog.set_level("DEBUG")
    with pytest.raises(
        SourceNotFound, match=r"bucket 'vmcast-sources-no-such-bucket' does not exist at http://127\.0\.0\.1:\d+"
    ) as raised:
        fetch_source("s3://vmcast-sources-no-such-bucket/disk.raw", cache_dir=cache_dir)
    assert secret not in str(raised.value) and secret not in caplog.text
    assert raised.value.__cause__ is None
