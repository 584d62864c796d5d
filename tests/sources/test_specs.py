"""Image source specs: parsed into types at the boundary, shown without their secrets."""

from __future__ import annotations

import pytest
from vmcast.server.sources import SpecInvalid, is_source_spec, parse_spec
from vmcast.server.sources.errors import redact
from vmcast.server.sources.specs import GlanceSpec, HttpSpec, S3Spec


def test_glance_specs_take_an_id_or_any_name_verbatim():
    assert parse_spec("glance:debian 12: genericcloud/amd64") == GlanceSpec(reference="debian 12: genericcloud/amd64")
    assert parse_spec("glance:7b0c5b7e-2f0d-4a53-9a7e-1f2d3c4b5a69").looks_like_id
    assert not parse_spec("glance:debian-12").looks_like_id


def test_s3_specs_keep_the_key_verbatim_as_the_aws_cli_does():
    assert parse_spec("s3://my-bucket/images/disk 1.qcow2?x") == S3Spec(bucket="my-bucket", key="images/disk 1.qcow2?x")


def test_a_url_is_shown_without_its_password_nor_its_query_values_but_fetched_with_them():
    spec = parse_spec("https://reader:pw-1234@Images.Example.com/a/disk.qcow2?X-Amz-Signature=abcdef&v=2#top")
    assert isinstance(spec, HttpSpec)
    assert spec.url == "https://reader:pw-1234@Images.Example.com/a/disk.qcow2?X-Amz-Signature=abcdef&v=2"
    assert spec.origin == "https://reader:***@Images.Example.com/a/disk.qcow2?X-Amz-Signature=***&v=***"
    assert spec.identity_url == "https://images.example.com/a/disk.qcow2?X-Amz-Signature=abcdef&v=2"
    assert spec.name == "disk.qcow2"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ftp://host/disk.img", "unknown kind of source"),
        ("debian-12.qcow2", "unknown kind of source"),
        ("glance:", "no image id or name"),
        ("glance://cloud/image", "reserved"),
        ("s3://bucket", "no object key"),
        ("s3://b/key", "not an S3 bucket name"),
        ("http:///disk.img", "no host"),
        ("http://host:99999/disk.img", "not a valid URL"),
        ("http://host/disk\n.img", "control characters"),
    ],
)
def test_what_is_not_a_source_is_refused_with_the_reason(text, problem):
    with pytest.raises(SpecInvalid, match=problem):
        parse_spec(text)


def test_an_invalid_url_is_refused_without_showing_its_password():
    with pytest.raises(SpecInvalid) as raised:
        parse_spec("http://user:Secret-Pw@host:99999/x")
    assert "Secret-Pw" not in str(raised.value)


def test_only_the_schemes_of_remote_sources_are_source_specs():
    assert all(map(is_source_spec, ["glance:x", "s3://b/k", "http://h/x", "HTTPS://h/x"]))
    assert not any(map(is_source_spec, ["debian-12.qcow2", "glance", "s3:/b/k", "file:///etc/passwd"]))


def test_redact_removes_known_secrets_url_passwords_and_credential_assignments_but_not_prose():
    text = redact(
        'auth failed for https://u:pw-9876@h/x; {"password": "hunter22"} X-Auth-Token: gAAAAB12 '
        "tokens: HTTPConnectionPool(host=h) key=AKIAEXAMPLE",
        secrets=["AKIAEXAMPLE"],
    )
    assert text == (
        'auth failed for https://u:***@h/x; {"password": "***"} X-Auth-Token: *** '
        "tokens: HTTPConnectionPool(host=h) key=***"
    )
