"""vmcast.receiver.verified: a VerifiedImage exists only for bytes that hashed to their announced SHA-1."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import pickle
from datetime import UTC, datetime

import pytest
from vmcast.receiver.errors import EXIT_VERIFICATION_FAILED, ReceiveError
from vmcast.receiver.verified import (
    CHUNK_SIZE,
    ChecksumMismatch,
    SizeMismatch,
    VerificationIOError,
    VerifiedImage,
    verify_file,
)

from .images import random_raw


def test_verify_file_returns_a_verified_image_for_matching_content(tmp_images):
    image = random_raw(tmp_images / "disk.raw", 2 * CHUNK_SIZE + 12345)  # several chunks and a partial one

    verified = verify_file(image.path, expected_sha1=image.sha1.upper(), expected_size=image.size, format="RAW", source="debian-12")

    assert verified.path == image.path.absolute()
    assert verified.sha1 == image.sha1
    assert verified.size == image.size
    assert verified.format == "raw"
    assert verified.source == "debian-12"
    assert verified.verified_at.tzinfo is UTC


def test_verify_file_defaults_to_the_raw_format_and_reports_progress(tmp_images):
    image = random_raw(tmp_images / "disk.raw", CHUNK_SIZE + 1)
    seen: list[int] = []

    verified = verify_file(image.path, expected_sha1=image.sha1, progress=seen.append)

    assert verified.format == "raw"
    assert seen == [CHUNK_SIZE, 1]


def test_verify_file_rejects_content_with_another_sha1(tmp_images):
    image = random_raw(tmp_images / "disk.raw", 100_000)
    wrong = hashlib.sha1(b"something else").hexdigest()

    with pytest.raises(ChecksumMismatch) as caught:
        verify_file(image.path, expected_sha1=wrong)

    assert (caught.value.expected, caught.value.actual, caught.value.path) == (wrong, image.sha1, str(image.path))
    assert isinstance(caught.value, ReceiveError)
    assert caught.value.exit_code == EXIT_VERIFICATION_FAILED


def test_verify_file_rejects_a_length_other_than_the_expected_before_hashing(tmp_images):
    image = random_raw(tmp_images / "disk.raw", 100_000)

    with pytest.raises(SizeMismatch) as caught:
        verify_file(image.path, expected_sha1=image.sha1, expected_size=image.size + 1)

    assert (caught.value.expected, caught.value.actual) == (image.size + 1, image.size)


def test_verify_file_refuses_a_malformed_sha1_and_reports_an_unreadable_file(tmp_images):
    with pytest.raises(ValueError, match="40 hex digits"):
        verify_file(tmp_images / "missing", expected_sha1="abc")
    with pytest.raises(VerificationIOError):
        verify_file(tmp_images / "missing", expected_sha1="0" * 40)


def test_a_verified_image_cannot_be_constructed_directly():
    with pytest.raises(TypeError, match="only by verification"):
        VerifiedImage(path="/tmp/x", sha1="0" * 40, size=1, format="raw", verified_at=datetime.now(UTC))


def test_a_verified_image_cannot_be_forged_by_replacing_its_fields(tmp_images):
    image = random_raw(tmp_images / "disk.raw", 1000)
    verified = verify_file(image.path, expected_sha1=image.sha1)

    with pytest.raises(TypeError, match="only by verification"):
        dataclasses.replace(verified, sha1="0" * 40)
    with pytest.raises(dataclasses.FrozenInstanceError):
        verified.sha1 = "0" * 40  # type: ignore[misc]


def test_a_verified_image_copies_as_itself_and_does_not_pickle(tmp_images):
    image = random_raw(tmp_images / "disk.raw", 1000)
    verified = verify_file(image.path, expected_sha1=image.sha1)

    assert copy.copy(verified) is verified
    assert copy.deepcopy(verified) is verified
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(verified)


def test_the_receiver_factory_states_a_verification_done_while_receiving(tmp_images):
    image = random_raw(tmp_images / "disk.raw", 1000)

    verified = VerifiedImage._from_receiver(path=image.path, sha1=image.sha1.upper(), size=image.size, format=None, source="img")

    assert (verified.sha1, verified.size, verified.format, verified.source) == (image.sha1, image.size, "raw", "img")


def test_on_a_block_device_the_image_is_its_first_expected_size_bytes(tmp_images, attach_loop_device):
    image = random_raw(tmp_images / "disk.raw", 3 * 1024 * 1024 + 512)
    backing = tmp_images / "device"
    backing.write_bytes(image.read() + b"\xff" * (1024 * 1024 - 512))  # the device is larger than the image
    device = attach_loop_device(backing)

    verified = verify_file(device, expected_sha1=image.sha1, expected_size=image.size)

    assert (verified.path, verified.size) == (device, image.size)
    with pytest.raises(ChecksumMismatch):  # without a size, the whole device is the image
        verify_file(device, expected_sha1=image.sha1)
    with pytest.raises(SizeMismatch):  # a device smaller than the image cannot hold it
        verify_file(device, expected_sha1=image.sha1, expected_size=backing.stat().st_size + 512)
