"""``vmcast receive --register``: the verified image lands in a real Glance (tests/services), the lease released first."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest
from typer.testing import CliRunner
from vmcast.receiver.__main__ import app

from ..e2e.processes import VMCAST
from .real_server import log_tail, sha1_of, state_of
from .receiver_testbed import sha1_of as sha1_of_bytes

runner = CliRunner()


def without_cloud_settings() -> dict[str, str]:
    """This process's environment without any OS_* or AWS_* variable (so only what a test gives counts)."""
    return {name: value for name, value in os.environ.items() if not name.startswith(("OS_", "AWS_"))}


@pytest.mark.clouds
def test_register_glance_uploads_the_verified_image_after_the_lease_is_released(tmp_path, glance_cloud, real_server):
    expected = real_server.sha1["register.raw"]
    output, log = tmp_path / "out.raw", tmp_path / "receiver.log"
    name = f"vmcast-test-{uuid.uuid4().hex[:12]}"
    connection = glance_cloud.connect()
    image_id = None
    try:
        process = subprocess.run(
            [*VMCAST, "receive", "register.raw", "--server", real_server.url, "--output", str(output), "--register", "glance", "--name", name, "--json"],
            env={**without_cloud_settings(), **glance_cloud.env}, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, timeout=180, check=False,
        )  # fmt: skip
        assert process.returncode == 0, log_tail(log)
        summary = json.loads(process.stdout.strip().splitlines()[-1])
        registered = summary["registered"]
        image_id = registered["id"]
        assert summary["verified"] is True and summary["sha1"] == expected == sha1_of(output)
        assert registered["cloud"] == "glance" and registered["created"] is True and registered["name"] == name
        stored = connection.image.get_image(image_id)
        assert stored.status == "active" and stored.name == name
        assert stored.properties["vmcast_sha1"] == expected and stored.properties["vmcast_source"] == "register.raw"
        text = log.read_text()
        assert text.index("released lease") < text.index("registering"), "the lease was held during the registration"
        assert state_of(output)["verified"] is True  # what `vmcast register` would retry from
    finally:
        if image_id is not None:
            connection.image.delete_image(image_id, ignore_missing=True)
        connection.close()


@pytest.mark.clouds
def test_a_registration_refused_after_a_verified_receive_exits_8_and_keeps_the_verified_file(tmp_path, glance_cloud, image, lease_server, monkeypatch):
    for name in [name for name in os.environ if name.startswith(("OS_", "AWS_"))]:
        monkeypatch.delenv(name)
    for name, value in glance_cloud.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OS_PASSWORD", "not-the-password")
    output = tmp_path / "out.raw"
    result = runner.invoke(app, ["test-image", "--server", lease_server.url, "--output", str(output), "--register", "glance", "--json"])
    assert result.exit_code == 8, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["verified"] is True and summary["registered"] is None and summary["exit_code"] == 8
    assert "not-the-password" not in result.output
    assert "rejected" in summary["registration_error"]
    assert output.read_bytes() == image and summary["sha1"] == sha1_of_bytes(image)
    assert state_of(output)["verified"] is True
    assert f"vmcast register {output} --glance" in result.stderr
    assert lease_server.released == list(lease_server.leases)


def test_a_cloud_that_is_not_configured_exits_8_before_anything_is_received(tmp_path, lease_server, monkeypatch):
    pytest.importorskip("openstack")
    for name in [name for name in os.environ if name.startswith("OS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(tmp_path / "clouds.yaml"))  # none there
    result = runner.invoke(app, ["test-image", "--server", lease_server.url, "--output", str(tmp_path / "out.raw"), "--register", "glance", "--os-cloud", "nowhere"])
    assert result.exit_code == 8, result.output
    assert "nowhere" in result.stderr
    assert not lease_server.leases and not (tmp_path / "out.raw").exists()
