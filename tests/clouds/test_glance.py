"""register_in_glance against a real Keystone + Glance (tests/services), reached through the catalog."""

from __future__ import annotations

import hashlib

import openstack
import pytest
from vmcast.receiver.registration import RegisteredImage, register_in_glance
from vmcast.receiver.registration.errors import (
    EXIT_CREDENTIALS,
    ContentChanged,
    CredentialsRejected,
    FormatMismatch,
)
from vmcast.receiver.verified import verify_file

from .images import MIB, qcow2_of, random_raw

WRONG_PASSWORD = "wrong-Pa55word-for-vmcast-tests"


def test_an_image_registered_in_glance_downloads_back_byte_for_byte_with_its_properties(glance, tmp_images):
    raw = random_raw(tmp_images / "disk.raw", 8 * MIB)
    glance.track(raw.sha1)
    image = verify_file(raw.path, expected_sha1=raw.sha1, source="debian-12-genericcloud")
    sent: list[int] = []

    result = register_in_glance(image, connection=glance.connection, name=f"vmcast-test-{raw.sha1[:8]}", progress=sent.append)

    assert result == RegisteredImage(
        cloud="glance", id=result.id, name=f"vmcast-test-{raw.sha1[:8]}", sha1=raw.sha1, created=True,
        disk_format="raw", bytes_uploaded=raw.size, seconds=result.seconds,
    )  # fmt: skip
    assert sum(sent) == raw.size
    stored = glance.connection.image.get_image(result.id)
    assert (stored.status, stored.disk_format, stored.container_format, stored.visibility) == ("active", "raw", "bare", "private")
    assert stored.properties["vmcast_sha1"] == raw.sha1
    assert stored.properties["vmcast_source"] == "debian-12-genericcloud"
    assert stored.properties["vmcast_size"] == str(raw.size)
    assert (stored.size, stored.hash_algo) == (raw.size, "sha512")
    assert stored.hash_value == hashlib.sha512(raw.read()).hexdigest()
    downloaded = tmp_images / "downloaded"
    glance.connection.image.download_image(result.id, output=str(downloaded))
    assert downloaded.read_bytes() == raw.read()


def test_registering_the_same_image_again_returns_it_and_uploads_nothing(glance, tmp_images):
    raw = random_raw(tmp_images / "disk.raw", 1 * MIB)
    glance.track(raw.sha1)
    image = verify_file(raw.path, expected_sha1=raw.sha1)
    first = register_in_glance(image, connection=glance.connection, name=f"vmcast-test-{raw.sha1[:8]}")
    sent: list[int] = []

    again = register_in_glance(verify_file(raw.path, expected_sha1=raw.sha1), connection=glance.connection, name="another-name", progress=sent.append)

    assert (again.id, again.created, again.bytes_uploaded, again.name) == (first.id, False, 0, first.name)
    assert sent == []
    assert [i["id"] for i in glance.images_with_sha1(raw.sha1)] == [first.id]


def test_an_image_whose_property_claims_the_sha1_but_whose_content_differs_is_not_reused(glance, tmp_images):
    raw = random_raw(tmp_images / "disk.raw", 1 * MIB)
    impostor = random_raw(tmp_images / "impostor.raw", 1 * MIB)
    glance.track(raw.sha1)
    # Someone registers other bytes under our SHA-1's property (a property is just a string).
    from openstack.image.v2.image import Image

    fake = Image.new(name="impostor", disk_format="raw", container_format="bare", vmcast_sha1=raw.sha1).create(glance.connection.image)
    fake.upload(glance.connection.image, data=impostor.read(), size=impostor.size)

    result = register_in_glance(verify_file(raw.path, expected_sha1=raw.sha1), connection=glance.connection, name="genuine")

    assert result.created and result.id != fake.id


def test_qcow2_content_declared_qcow2_registers_with_disk_format_qcow2(glance, tmp_images):
    qcow2 = qcow2_of(random_raw(tmp_images / "disk.raw", 2 * MIB), tmp_images / "disk.qcow2")
    glance.track(qcow2.sha1)
    image = verify_file(qcow2.path, expected_sha1=qcow2.sha1, format="qcow2")

    result = register_in_glance(image, connection=glance.connection, name=f"vmcast-test-{qcow2.sha1[:8]}")

    stored = glance.connection.image.get_image(result.id)
    assert (result.disk_format, stored.disk_format, stored.size) == ("qcow2", "qcow2", qcow2.size)


def test_qcow2_content_declared_raw_is_refused_and_nothing_is_created(glance, tmp_images):
    qcow2 = qcow2_of(random_raw(tmp_images / "disk.raw", 2 * MIB), tmp_images / "disk.qcow2")
    glance.track(qcow2.sha1)
    image = verify_file(qcow2.path, expected_sha1=qcow2.sha1, format="raw")
    name = f"vmcast-test-{qcow2.sha1[:8]}"

    with pytest.raises(FormatMismatch, match="declared raw but its content is qcow2"):
        register_in_glance(image, connection=glance.connection, name=name)

    assert glance.images_with_sha1(qcow2.sha1) == []
    assert glance.images_named(name) == []


def test_a_wrong_password_is_a_clear_error_without_the_password_and_nothing_is_created(glance, glance_cloud, tmp_images):
    raw = random_raw(tmp_images / "disk.raw", 1 * MIB)
    glance.track(raw.sha1)
    env = glance_cloud.env
    connection = openstack.connect(
        auth_url=env["OS_AUTH_URL"], username=env["OS_USERNAME"], password=WRONG_PASSWORD,
        project_name=env["OS_PROJECT_NAME"], user_domain_name=env["OS_USER_DOMAIN_NAME"],
        project_domain_name=env["OS_PROJECT_DOMAIN_NAME"], region_name=env["OS_REGION_NAME"],
        load_yaml_config=False, load_envvars=False,
    )  # fmt: skip

    with pytest.raises(CredentialsRejected) as caught:
        register_in_glance(verify_file(raw.path, expected_sha1=raw.sha1), connection=connection, name="never")

    message = str(caught.value)
    assert env["OS_AUTH_URL"] in message and repr(env["OS_USERNAME"]) in message
    assert "authentication failed" in message
    assert WRONG_PASSWORD not in message and env["OS_PASSWORD"] not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert caught.value.exit_code == EXIT_CREDENTIALS
    assert glance.images_with_sha1(raw.sha1) == []


def test_a_file_changed_after_verification_is_refused_and_its_image_deleted(glance, tmp_images):
    raw = random_raw(tmp_images / "disk.raw", 2 * MIB)
    glance.track(raw.sha1)
    image = verify_file(raw.path, expected_sha1=raw.sha1)
    with open(raw.path, "r+b") as file:  # one byte flips between verification and upload
        file.seek(MIB)
        byte = file.read(1)
        file.seek(MIB)
        file.write(bytes([byte[0] ^ 0xFF]))
    name = f"vmcast-test-{raw.sha1[:8]}"

    with pytest.raises(ContentChanged, match="changed after it was verified"):
        register_in_glance(image, connection=glance.connection, name=name)

    assert glance.images_named(name) == []
    assert glance.images_with_sha1(raw.sha1) == []
