"""register_in_ec2 against moto_server (tests/services): EBS direct APIs, then an AMI.

moto keeps only name and description of RegisterImage (its block device mapping is invented), ignores
TagSpecifications and does not check EBS checksums; so the snapshot is checked block by block here, with
the EBS direct read APIs, against the image's bytes.
"""

from __future__ import annotations

import base64
import hashlib

import boto3
import pytest
from vmcast.receiver.registration import register_in_ec2
from vmcast.receiver.registration.ec2 import EBS_BLOCK_SIZE, client_token
from vmcast.receiver.registration.errors import (
    EXIT_CREDENTIALS,
    ContentChanged,
    CredentialsRejected,
    FormatMismatch,
    UnsupportedFormat,
)
from vmcast.receiver.verified import verify_file

from .images import MIB, mostly_zero_raw, qcow2_of, random_raw

WRONG_SECRET = "wrong-Secret-Key-for-vmcast-tests/0123456789"

DATA_BLOCKS = (0, 1, 7, 20, 33)


def snapshot_blocks(ebs, snapshot_id: str) -> dict[int, str]:
    """Block index -> block token of every block written to the snapshot."""
    blocks: dict[int, str] = {}
    query = {"SnapshotId": snapshot_id}
    while True:
        page = ebs.list_snapshot_blocks(**query)
        blocks.update({block["BlockIndex"]: block["BlockToken"] for block in page["Blocks"]})
        if not page.get("NextToken"):
            return blocks
        query["NextToken"] = page["NextToken"]


def test_a_mostly_zero_image_becomes_an_ami_whose_snapshot_holds_exactly_its_non_zero_blocks(aws, tmp_images):
    # 24 MiB + 1000 bytes: 49 blocks, the last one partial (and not zero: it must be padded, not dropped).
    raw = mostly_zero_raw(tmp_images / "disk.raw", size=24 * MIB + 1000, data_blocks=DATA_BLOCKS, tail=300)
    aws.track(raw.sha1)
    image = verify_file(raw.path, expected_sha1=raw.sha1)
    handled: list[int] = []

    result = register_in_ec2(image, name=f"vmcast-test-{raw.sha1[:12]}", parallelism=4, progress=handled.append, wait_delay=0.2)

    block_count = 49
    written = (*DATA_BLOCKS, block_count - 1)
    assert (result.cloud, result.created, result.sha1) == ("ec2", True, raw.sha1)
    assert result.id.startswith("ami-") and result.snapshot_id.startswith("snap-")
    assert (result.blocks_uploaded, result.zero_blocks_skipped) == (len(written), block_count - len(written))
    assert sum(handled) == raw.size
    content = raw.read() + bytes(block_count * EBS_BLOCK_SIZE - raw.size)
    blocks = snapshot_blocks(aws.ebs, result.snapshot_id)
    assert sorted(blocks) == sorted(written)  # every zero block was skipped
    for index, token in blocks.items():
        answer = aws.ebs.get_snapshot_block(SnapshotId=result.snapshot_id, BlockIndex=index, BlockToken=token)
        data = answer["BlockData"].read()
        assert data == content[index * EBS_BLOCK_SIZE : (index + 1) * EBS_BLOCK_SIZE], f"block {index}"
        assert answer["Checksum"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
    snapshot = aws.ec2.describe_snapshots(SnapshotIds=[result.snapshot_id])["Snapshots"][0]
    assert snapshot["State"] == "completed"
    assert {"Key": "vmcast_sha1", "Value": raw.sha1} in snapshot["Tags"]
    ami = aws.ec2.describe_images(ImageIds=[result.id])["Images"][0]
    assert (ami["Name"], ami["State"]) == (result.name, "available")
    assert {"Key": "vmcast_sha1", "Value": raw.sha1} in ami["Tags"]


def test_registering_the_same_image_again_returns_the_tagged_ami_and_uploads_nothing(aws, tmp_images):
    raw = mostly_zero_raw(tmp_images / "disk.raw", size=4 * MIB, data_blocks=(2,))
    aws.track(raw.sha1)
    first = register_in_ec2(verify_file(raw.path, expected_sha1=raw.sha1), name=f"vmcast-test-{raw.sha1[:12]}", wait_delay=0.2)
    snapshots = aws.snapshots_tagged(raw.sha1)

    again = register_in_ec2(verify_file(raw.path, expected_sha1=raw.sha1), name=f"vmcast-test-{raw.sha1[:12]}", wait_delay=0.2)

    # (moto invents the AMI's block device mapping, so again.snapshot_id is not compared with first's.)
    assert (again.id, again.created, again.blocks_uploaded, again.bytes_uploaded) == (first.id, False, 0, 0)
    assert [ami["ImageId"] for ami in aws.amis_tagged(raw.sha1)] == [first.id]
    assert aws.snapshots_tagged(raw.sha1) == snapshots


def test_non_raw_images_are_refused_before_any_request(aws, tmp_images):
    qcow2 = qcow2_of(random_raw(tmp_images / "disk.raw", 1 * MIB), tmp_images / "disk.qcow2")
    aws.track(qcow2.sha1)

    with pytest.raises(UnsupportedFormat, match="convert the image first"):
        register_in_ec2(verify_file(qcow2.path, expected_sha1=qcow2.sha1, format="qcow2"), name="never")
    with pytest.raises(FormatMismatch):
        register_in_ec2(verify_file(qcow2.path, expected_sha1=qcow2.sha1, format="raw"), name="never")

    assert aws.snapshots_tagged(qcow2.sha1) == [] and aws.amis_tagged(qcow2.sha1) == []


def test_a_file_changed_after_verification_leaves_no_snapshot_and_no_ami(aws, tmp_images):
    raw = mostly_zero_raw(tmp_images / "disk.raw", size=8 * MIB, data_blocks=(1, 9))
    aws.track(raw.sha1)
    image = verify_file(raw.path, expected_sha1=raw.sha1)
    with open(raw.path, "r+b") as file:  # a zero block gets a byte between verification and upload
        file.seek(5 * EBS_BLOCK_SIZE + 17)
        file.write(b"\x01")

    with pytest.raises(ContentChanged, match="another SHA-1"):
        register_in_ec2(image, name=f"vmcast-test-{raw.sha1[:12]}", wait_delay=0.2)

    assert aws.snapshots_tagged(raw.sha1) == []
    assert aws.amis_tagged(raw.sha1) == []


def test_a_retry_with_the_same_verified_image_reuses_the_client_token_a_new_verification_does_not(tmp_images):
    raw = random_raw(tmp_images / "disk.raw", 4096)
    image = verify_file(raw.path, expected_sha1=raw.sha1)

    token = client_token(image, name="n", volume_gib=1)

    assert token == client_token(image, name="n", volume_gib=1)
    assert token.startswith("vmcast-") and len(token) <= 64
    assert token != client_token(verify_file(raw.path, expected_sha1=raw.sha1), name="n", volume_gib=1)
    assert token != client_token(image, name="other", volume_gib=1)


def test_wrong_aws_credentials_are_a_clear_error_without_the_secret(moto_with_iam_auth, tmp_images):
    raw = mostly_zero_raw(tmp_images / "disk.raw", size=1 * MIB, data_blocks=(0,))
    session = boto3.Session(aws_access_key_id="AKIAWRONGKEY00000001", aws_secret_access_key=WRONG_SECRET, region_name="us-east-1")

    with pytest.raises(CredentialsRejected) as caught:
        register_in_ec2(verify_file(raw.path, expected_sha1=raw.sha1), name="never", session=session, endpoint_url=moto_with_iam_auth)

    message = str(caught.value)
    assert "AuthFailure" in message and moto_with_iam_auth in message
    assert "AKIA...0001" in message
    assert WRONG_SECRET not in message
    assert caught.value.__suppress_context__
    assert caught.value.exit_code == EXIT_CREDENTIALS


def test_an_image_on_a_block_device_registers_only_its_own_bytes(aws, tmp_images, attach_loop_device):
    raw = mostly_zero_raw(tmp_images / "disk.raw", size=2 * MIB + 4096, data_blocks=(1,), tail=100)
    aws.track(raw.sha1)
    backing = tmp_images / "device"
    backing.write_bytes(raw.read() + b"\xff" * (2 * MIB - 4096))  # device bytes past the image are not zeros
    image = verify_file(attach_loop_device(backing), expected_sha1=raw.sha1, expected_size=raw.size)

    result = register_in_ec2(image, name=f"vmcast-test-{raw.sha1[:12]}", wait_delay=0.2)

    blocks = snapshot_blocks(aws.ebs, result.snapshot_id)
    assert sorted(blocks) == [1, 4]
    last = aws.ebs.get_snapshot_block(SnapshotId=result.snapshot_id, BlockIndex=4, BlockToken=blocks[4])["BlockData"].read()
    assert last == raw.read()[4 * EBS_BLOCK_SIZE :] + bytes(5 * EBS_BLOCK_SIZE - raw.size)
