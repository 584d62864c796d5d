"""Fixtures for the registration tests: a directory for image files, clients on the real servers
(`glance_cloud`, `aws_endpoint` from tests/services), clean-up of what each test registers, and a second
moto server that enforces IAM authentication, to get a real "wrong credentials" answer from it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@pytest.fixture
def tmp_images(tmp_path: Path) -> Path:
    directory = tmp_path / "images"
    directory.mkdir()
    return directory


# ------------------------------------------------------------------------------------------- Glance


@pytest.fixture
def glance(glance_cloud) -> Iterator[GlanceClient]:
    """An openstacksdk connection (through Keystone, from clouds.yaml) that deletes, at the end of the test,
    every image carrying a vmcast_sha1 the test noted with ``glance.track(sha1)``."""
    client = GlanceClient(connection=glance_cloud.connect(), tracked=set())
    yield client
    for sha1 in client.tracked:
        for image in client.images_with_sha1(sha1):
            client.connection.image.delete_image(image["id"], ignore_missing=True)
    client.connection.close()


@dataclass
class GlanceClient:
    connection: object
    tracked: set[str]

    def track(self, sha1: str) -> None:
        self.tracked.add(sha1)

    def images_with_sha1(self, sha1: str) -> list[dict]:
        """Every image (any status) the user sees with property vmcast_sha1 = `sha1`, filtered here too."""
        return [image for image in self._list(vmcast_sha1=sha1) if image.get("vmcast_sha1") == sha1]

    def images_named(self, name: str) -> list[dict]:
        return [image for image in self._list(name=name) if image.get("name") == name]

    def _list(self, **query: str) -> list[dict]:
        response = self.connection.image.get("/images", params={**query, "limit": 1000})
        response.raise_for_status()
        return response.json()["images"]


# ---------------------------------------------------------------------------------------------- AWS


@pytest.fixture
def aws(aws_endpoint, monkeypatch):
    """boto3 pointed at moto through the AWS_* variables (as a user would), plus clean-up of the AMIs and
    snapshots tagged with the SHA-1s the test noted with ``aws.track(sha1)``."""
    import boto3

    for key, value in aws_endpoint.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    session = boto3.Session()
    clients = AwsClients(session=session, ec2=session.client("ec2"), ebs=session.client("ebs"), tracked=set())
    yield clients
    for sha1 in clients.tracked:
        for ami in clients.amis_tagged(sha1):
            clients.ec2.deregister_image(ImageId=ami["ImageId"])
        for snapshot in clients.snapshots_tagged(sha1):
            clients.ec2.delete_snapshot(SnapshotId=snapshot["SnapshotId"])


@dataclass
class AwsClients:
    session: object
    ec2: object
    ebs: object
    tracked: set[str]

    def track(self, sha1: str) -> None:
        self.tracked.add(sha1)

    def amis_tagged(self, sha1: str) -> list[dict]:
        return self.ec2.describe_images(Owners=["self"], Filters=[{"Name": "tag:vmcast_sha1", "Values": [sha1]}])["Images"]

    def snapshots_tagged(self, sha1: str) -> list[dict]:
        return self.ec2.describe_snapshots(OwnerIds=["self"], Filters=[{"Name": "tag:vmcast_sha1", "Values": [sha1]}])["Snapshots"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def moto_with_iam_auth(aws_endpoint) -> Iterator[str]:
    """URL of a moto server of our own that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0).

    The shared moto (`aws_endpoint`) accepts any key, as moto does by default, so it cannot say "wrong
    credentials"; this one answers AuthFailure / InvalidClientTokenId like AWS. Started from this Python
    (moto[server] is in the test extra), stopped by its pid.
    """
    try:
        import moto.server  # noqa: F401
    except ImportError:
        pytest.skip("moto[server] is not installed in this Python (pip install -e '.[test]')")
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0", "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.skip("could not start a moto server with IAM authentication")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def attach_loop_device():
    """attach(file) -> the path of a loop block device showing `file` (root only; detached at the end)."""
    devices: list[str] = []

    def attach(backing: Path) -> Path:
        done = subprocess.run(["losetup", "--find", "--show", "--read-only", str(backing)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot attach a loop device: {done.stderr.strip() or done.returncode}")
        devices.append(done.stdout.strip())
        return Path(devices[-1])

    yield attach
    for device in devices:
        subprocess.run(["losetup", "--detach", device], check=False)
