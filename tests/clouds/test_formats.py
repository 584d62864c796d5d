"""vmcast.receiver.registration.formats (real qemu-img, no cloud) and errors.redact."""

from __future__ import annotations

import subprocess

import pytest
from vmcast.receiver.registration.errors import (
    EXIT_FORMAT_REFUSED,
    FormatMismatch,
    FormatUndetermined,
    UnsafeImage,
    UnsupportedFormat,
    redact,
)
from vmcast.receiver.registration.formats import checked_format, lookup
from vmcast.receiver.verified import verify_file

from .images import qcow2_of, random_raw, write_image


def verified(image, format):
    return verify_file(image.path, expected_sha1=image.sha1, format=format)


def test_raw_content_declared_raw_is_accepted(tmp_images):
    raw = random_raw(tmp_images / "disk.raw", 1 << 20)

    detected = checked_format(verified(raw, "raw"), cloud="glance")

    assert (detected.format.name, detected.format.glance, detected.virtual_size) == ("raw", "raw", 1 << 20)


def test_qcow2_content_declared_qcow2_is_accepted_with_its_glance_name(tmp_images):
    qcow2 = qcow2_of(random_raw(tmp_images / "disk.raw", 1 << 20), tmp_images / "disk.qcow2")

    detected = checked_format(verified(qcow2, "qcow2"), cloud="glance")

    assert (detected.format.glance, detected.virtual_size) == ("qcow2", 1 << 20)


def test_qcow2_content_declared_raw_is_refused_as_a_mismatch(tmp_images):
    qcow2 = qcow2_of(random_raw(tmp_images / "disk.raw", 1 << 20), tmp_images / "disk.qcow2")

    with pytest.raises(FormatMismatch) as caught:
        checked_format(verified(qcow2, "raw"), cloud="glance")

    assert (caught.value.declared, caught.value.detected) == ("raw", "qcow2")
    assert caught.value.exit_code == EXIT_FORMAT_REFUSED


def test_a_qcow2_with_a_backing_file_is_refused(tmp_images):
    base = qcow2_of(random_raw(tmp_images / "base.raw", 1 << 20), tmp_images / "base.qcow2")
    overlay_path = tmp_images / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base.path), "-F", "qcow2", str(overlay_path)], check=True)
    overlay = write_image(overlay_path, overlay_path.read_bytes())

    with pytest.raises(UnsafeImage, match="backing file"):
        checked_format(verified(overlay, "qcow2"), cloud="glance")


def test_a_vmdk_descriptor_naming_other_files_is_refused(tmp_images):
    descriptor_path = tmp_images / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(descriptor_path), "1M"], check=True)
    descriptor = write_image(descriptor_path, descriptor_path.read_bytes())

    with pytest.raises(UnsafeImage, match="monolithicFlat"):
        checked_format(verified(descriptor, "vmdk"), cloud="glance")


def test_formats_vmcast_does_not_register_are_refused(tmp_images):
    raw = random_raw(tmp_images / "disk.raw", 4096)
    with pytest.raises(UnsupportedFormat, match="vmcast registers only"):
        checked_format(verified(raw, "iso"), cloud="glance")
    empty = write_image(tmp_images / "empty.raw", b"")
    with pytest.raises(UnsupportedFormat, match="empty"):
        checked_format(verified(empty, "raw"), cloud="glance")


def test_when_qemu_img_cannot_tell_the_image_is_refused(tmp_images):
    raw = random_raw(tmp_images / "disk.raw", 4096)

    with pytest.raises(FormatUndetermined, match="not found"):
        checked_format(verified(raw, "raw"), cloud="glance", qemu_img="no-such-qemu-img")


def test_format_names_are_looked_up_in_any_spelling():
    assert lookup("VPC") is lookup("vhd") is not None
    assert lookup("vhd").glance == "vhd"
    assert lookup("floppy") is None


def test_redact_removes_known_secrets_and_credential_assignments():
    text = 'auth failed for admin with hunter2-secret; body {"password": "other-pass", "user": "admin"} token=abc123'

    cleaned = redact(text, ["hunter2-secret", None, "ab"])

    assert "hunter2-secret" not in cleaned
    assert "other-pass" not in cleaned
    assert "abc123" not in cleaned
    assert "admin" in cleaned
