"""http(s):// sources against a real HTTP server on 127.0.0.1 (tests/sources/conftest.py `origin`)."""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path

import pytest
from vmcast.server.sources import (
    SourceCredentialsRejected,
    SourceFormatRefused,
    SourceNotFound,
    SourceUnreachable,
    fetch_source,
)

from .conftest import MIB, cache_files, qcow2_bytes, random_bytes

LAST_MODIFIED = "Tue, 03 Mar 2026 10:00:00 GMT"


def test_a_url_is_fetched_byte_for_byte_with_progress_up_to_its_content_length(origin, cache_dir):
    data = random_bytes(3 * MIB + 7)
    url = origin.serve("/images/disk.img", data)
    seen: list[tuple[int, int | None]] = []

    fetched = fetch_source(url, cache_dir=cache_dir, progress=lambda done, total: seen.append((done, total)))

    assert fetched.path.read_bytes() == data
    assert (fetched.name, fetched.origin, fetched.source_format, fetched.size) == ("disk.img", url, "raw", len(data))
    assert fetched.virtual_size == len(data)
    assert fetched.downloaded is True
    assert fetched.path.parent == cache_dir / "sources"
    assert seen[0] == (0, len(data)) and seen[-1] == (len(data), len(data))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert (origin.count("HEAD", "/images/disk.img"), origin.count("GET", "/images/disk.img")) == (1, 1)


def test_a_url_with_a_strong_etag_is_not_downloaded_again_while_its_etag_is_unchanged(origin, cache_dir):
    url = origin.serve("/disk.raw", random_bytes())
    first = fetch_source(url, cache_dir=cache_dir)
    before = first.path.stat()

    again = fetch_source(url, cache_dir=cache_dir)

    assert again.downloaded is False
    assert again.path == first.path and again.content_key == first.content_key
    after = again.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert origin.count("GET", "/disk.raw") == 1  # the second call only asked HEAD
    assert origin.count("HEAD", "/disk.raw") == 2


def test_new_content_under_the_same_url_gets_a_new_etag_and_is_downloaded(origin, cache_dir):
    url = origin.serve("/disk.raw", random_bytes())
    first = fetch_source(url, cache_dir=cache_dir)
    replacement = random_bytes()
    origin.serve("/disk.raw", replacement)

    second = fetch_source(url, cache_dir=cache_dir)

    assert second.downloaded is True and second.content_key != first.content_key
    assert second.path.read_bytes() == replacement


def test_last_modified_identifies_the_content_when_there_is_no_etag(origin, cache_dir):
    url = origin.serve("/plain.img", random_bytes(), etag=None, last_modified=LAST_MODIFIED)
    fetch_source(url, cache_dir=cache_dir)
    assert fetch_source(url, cache_dir=cache_dir).downloaded is False
    assert origin.count("GET", "/plain.img") == 1


def test_a_weak_etag_does_not_identify_bytes_so_the_url_is_keyed_by_its_content(origin, cache_dir):
    data = random_bytes()
    url = origin.serve("/weak.img", data, etag='W/"v1"')

    first = fetch_source(url, cache_dir=cache_dir)
    second = fetch_source(url, cache_dir=cache_dir)

    # Nothing says before the download that the content is the same: downloaded each time, stored once.
    assert (first.downloaded, second.downloaded) == (True, True)
    assert origin.count("GET", "/weak.img") == 2
    assert second.content_key == first.content_key and second.path == first.path
    assert len([name for name in cache_files(cache_dir) if name.endswith(".image")]) == 1


@pytest.mark.parametrize("head_status", [405, 403])
def test_a_url_that_refuses_head_is_asked_with_get_and_its_body_is_not_read_when_cached(origin, cache_dir, head_status):
    # 405: a server without HEAD; 403: what S3 answers HEAD on a URL presigned for GET.
    data = random_bytes()
    url = origin.serve("/nohead.img", data, head_status=head_status)
    first = fetch_source(url, cache_dir=cache_dir)

    second = fetch_source(url, cache_dir=cache_dir)

    assert first.path.read_bytes() == data
    assert (first.downloaded, second.downloaded) == (True, False)
    assert origin.count("HEAD", "/nohead.img") == 2 and origin.count("GET", "/nohead.img") == 2


def test_concurrent_fetches_of_one_url_download_it_once(origin, cache_dir):
    data = random_bytes(2 * MIB)
    url = origin.serve("/shared.img", data, delay=0.3)
    results, errors = [], []
    start = threading.Barrier(4)

    def fetch() -> None:
        start.wait()
        try:
            results.append(fetch_source(url, cache_dir=cache_dir))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert sorted(result.downloaded for result in results) == [False, False, False, True]
    assert origin.count("GET", "/shared.img") == 1
    assert {result.path for result in results} == {results[0].path}
    assert results[0].path.read_bytes() == data


def test_a_missing_url_is_a_clear_not_found(origin, cache_dir):
    with pytest.raises(SourceNotFound, match=r"not found: the server answered 404"):
        fetch_source(f"{origin.base_url}/no/such.img", cache_dir=cache_dir)
    assert cache_files(cache_dir) == []


def test_a_refused_connection_is_reported_as_unreachable(cache_dir):
    with socket.socket() as probe:  # a port nobody listens on: bound, then closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(SourceUnreachable, match=rf"cannot reach the server of http://127.0.0.1:{port}/x.img"):
        fetch_source(f"http://127.0.0.1:{port}/x.img", cache_dir=cache_dir)


def test_url_passwords_and_presigned_query_values_never_appear_in_errors_or_logs(origin, cache_dir, caplog):
    caplog.set_level("DEBUG", logger="vmcast")
    port = origin.base_url.rsplit(":", 1)[1]
    url = f"http://reader:Sup3rSecretPw@127.0.0.1:{port}/gone.img?X-Amz-Signature=SignatureValue123"

    with pytest.raises(SourceNotFound) as raised:
        fetch_source(url, cache_dir=cache_dir)

    message = str(raised.value)
    assert "reader:***@" in message and "X-Amz-Signature=***" in message
    for secret in ("Sup3rSecretPw", "SignatureValue123"):
        assert secret not in message
        assert secret not in repr(raised.value.__dict__)
        assert secret not in caplog.text
    assert raised.value.__cause__ is None


def test_an_origin_that_asks_for_credentials_is_a_credentials_error(origin, cache_dir):
    url = origin.serve("/private.img", b"", status=401)

    with pytest.raises(SourceCredentialsRejected, match=r"refused at http://127\.0\.0\.1:\d+: the server answered 401"):
        fetch_source(url, cache_dir=cache_dir)


def test_a_connection_dropped_mid_body_leaves_nothing_in_the_cache(origin, cache_dir):
    data = random_bytes(2 * MIB)
    url = origin.serve("/dropped.img", data, truncate_to=MIB)

    with pytest.raises(SourceUnreachable):
        fetch_source(url, cache_dir=cache_dir)

    assert cache_files(cache_dir) == []


def test_a_qcow2_url_is_detected_as_qcow2_with_its_virtual_size(origin, cache_dir, tmp_path):
    raw = random_bytes(2 * MIB)
    url = origin.serve("/disk.qcow2", qcow2_bytes(tmp_path, raw))

    fetched = fetch_source(url, cache_dir=cache_dir)

    assert (fetched.source_format, fetched.virtual_size) == ("qcow2", len(raw))


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ("backing_file=/etc/hostname,backing_fmt=raw", "backing file"),
        ("data_file=/etc/hostname", "external data file"),
    ],
)
def test_a_qcow2_that_names_a_local_file_is_refused_and_not_cached(origin, cache_dir, tmp_path, options, why):
    # Converting such an image would copy a file of the server (here /etc/hostname) into the stream.
    image = tmp_path / "evil.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-o", options, str(image), "1M"], check=True, capture_output=True
    )
    url = origin.serve("/evil.qcow2", image.read_bytes())

    with pytest.raises(SourceFormatRefused, match=why):
        fetch_source(url, cache_dir=cache_dir)

    assert cache_files(cache_dir) == []


def test_a_vmdk_descriptor_naming_another_file_is_refused(origin, cache_dir, tmp_path: Path):
    descriptor = (
        '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
        'RW 2048 FLAT "/etc/hostname" 0\n'
        'ddb.virtualHWVersion = "4"\nddb.geometry.cylinders = "2"\nddb.geometry.heads = "16"\n'
        'ddb.geometry.sectors = "63"\nddb.adapterType = "ide"\n'
    )
    url = origin.serve("/evil.vmdk", descriptor.encode())

    with pytest.raises(SourceFormatRefused, match="monolithicFlat vmdk"):
        fetch_source(url, cache_dir=cache_dir)


def test_a_self_contained_vmdk_is_accepted(origin, cache_dir, tmp_path: Path):
    source, target = tmp_path / "d.raw", tmp_path / "d.vmdk"
    source.write_bytes(random_bytes(MIB))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    str(source), str(target)], check=True, capture_output=True)  # fmt: skip
    url = origin.serve("/ok.vmdk", target.read_bytes())

    assert fetch_source(url, cache_dir=cache_dir).source_format == "vmdk"
