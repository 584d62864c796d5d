"""``vmcast register`` as a user runs it: a subprocess, configured by clouds.yaml or the AWS_* variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vmcast.receiver.registration.errors import EXIT_CREDENTIALS, EXIT_USAGE, EXIT_VERIFICATION_FAILED

from .images import MIB, mostly_zero_raw, random_raw

WRONG_PASSWORD = "wrong-Pa55word-for-the-cli-test"
WRONG_SECRET = "wrong-Secret-Key-for-the-cli-test/0123456789"


def vmcast_register(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # Only the variables given: no OS_* or AWS_* of the developer's shell leak into the run.
    base = {name: value for name, value in os.environ.items() if not name.startswith(("OS_", "AWS_"))}
    return subprocess.run(
        [sys.executable, "-m", "vmcast.receiver.registration.cli", *args],
        env={**base, **env}, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def write_state(image_path: Path, **fields: object) -> None:
    Path(f"{image_path}.vmcast.json").write_text(json.dumps(fields))


def test_register_reads_the_receivers_state_file_and_prints_the_glance_image_id(glance, glance_cloud, tmp_images):
    raw = random_raw(tmp_images / "disk.raw", 2 * MIB)
    glance.track(raw.sha1)
    write_state(raw.path, sha1=raw.sha1, len=raw.size, image="debian-12", format="raw")
    env = {"OS_CLIENT_CONFIG_FILE": str(glance_cloud.clouds_yaml)}

    done = vmcast_register(str(raw.path), "--glance", "--os-cloud", glance_cloud.cloud_name, "--json", env=env)

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["registered"], result["cloud"], result["created"], result["name"], result["sha1"]) == (True, "glance", True, "debian-12", raw.sha1)
    stored = glance.connection.image.get_image(result["id"])
    assert (stored.status, stored.properties["vmcast_source"]) == ("active", "debian-12")

    again = vmcast_register(str(raw.path), "--glance", "--os-cloud", glance_cloud.cloud_name, env=env)

    assert again.returncode == 0, again.stderr
    assert again.stdout == f"{result['id']}\n"
    assert "already registered" in again.stderr


def test_register_without_sha1_or_state_file_is_a_usage_error(tmp_images):
    raw = random_raw(tmp_images / "disk.raw", 4096)

    done = vmcast_register(str(raw.path), "--ec2", env={})

    assert done.returncode == EXIT_USAGE
    assert "--sha1" in done.stderr


def test_register_refuses_a_file_that_does_not_match_its_sha1(aws_endpoint, tmp_images):
    raw = random_raw(tmp_images / "disk.raw", 4096)

    done = vmcast_register(str(raw.path), "--ec2", "--sha1", "0" * 40, "--json", env=aws_endpoint)

    assert done.returncode == EXIT_VERIFICATION_FAILED
    answer = json.loads(done.stdout)
    assert (answer["registered"], answer["exit_code"]) == (False, EXIT_VERIFICATION_FAILED)
    assert raw.sha1 in answer["error"] and "expected " + "0" * 40 in answer["error"]


def test_register_into_ec2_prints_the_ami_id(aws, aws_endpoint, tmp_images):
    raw = mostly_zero_raw(tmp_images / "disk.raw", size=3 * MIB, data_blocks=(4,))
    aws.track(raw.sha1)

    done = vmcast_register(str(raw.path), "--ec2", "--sha1", raw.sha1, "--name", f"vmcast-cli-{raw.sha1[:12]}", env=aws_endpoint)

    assert done.returncode == 0, done.stderr
    ami_id = done.stdout.strip()
    assert [ami["ImageId"] for ami in aws.amis_tagged(raw.sha1)] == [ami_id]
    assert "5 zero blocks skipped" in done.stderr


def test_a_wrong_glance_password_exits_8_and_never_prints_the_password(glance, glance_cloud, tmp_images):
    raw = random_raw(tmp_images / "disk.raw", 4096)
    glance.track(raw.sha1)
    real_password = glance_cloud.env["OS_PASSWORD"]
    clouds_yaml = tmp_images / "clouds.yaml"
    clouds_yaml.write_text(glance_cloud.clouds_yaml.read_text().replace(real_password, WRONG_PASSWORD))
    env = {"OS_CLIENT_CONFIG_FILE": str(clouds_yaml)}

    for extra in ((), ("--json",)):
        done = vmcast_register(str(raw.path), "--glance", "--sha1", raw.sha1, "--os-cloud", glance_cloud.cloud_name, *extra, env=env)

        assert done.returncode == EXIT_CREDENTIALS, done.stderr
        output = done.stdout + done.stderr
        assert glance_cloud.env["OS_AUTH_URL"] in output and "'admin'" in output
        assert WRONG_PASSWORD not in output and real_password not in output
    assert json.loads(done.stdout)["exit_code"] == EXIT_CREDENTIALS
    assert glance.images_with_sha1(raw.sha1) == []


def test_wrong_aws_credentials_exit_8_and_never_print_the_secret_key(moto_with_iam_auth, tmp_images):
    raw = mostly_zero_raw(tmp_images / "disk.raw", size=1 * MIB, data_blocks=(1,))
    env = {
        "AWS_ENDPOINT_URL": moto_with_iam_auth, "AWS_ACCESS_KEY_ID": "AKIAWRONGKEY00000002",
        "AWS_SECRET_ACCESS_KEY": WRONG_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
    }  # fmt: skip

    done = vmcast_register(str(raw.path), "--ec2", "--sha1", raw.sha1, "--json", env=env)

    assert done.returncode == EXIT_CREDENTIALS, done.stderr
    assert "AuthFailure" in done.stdout
    assert WRONG_SECRET not in done.stdout + done.stderr
