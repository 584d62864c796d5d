"""What ``vmcast receive`` imports: the receive's own machinery, not the server's nor the registration code.

Every receiver process pays its imports before it asks for its lease (and a stream held for it waits), so
what only ``vmcast serve``, ``vmcast stream`` or ``--register`` use is imported where they use it. Each test
runs the real command in a fresh interpreter and looks at `sys.modules` when it exits: a statement about what
is imported, not a timing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# `vmcast ARGS...` in a fresh interpreter that writes its `sys.modules` (sorted, JSON) to a file as it exits.
_RUN_AND_LIST_MODULES = """
import atexit, json, sys
listing = sys.argv.pop(1)
atexit.register(lambda: open(listing, "w").write(json.dumps(sorted(sys.modules))))
sys.argv[0] = "vmcast"
from vmcast.server.cli import main
main()
"""

# The server's side: its web framework, metrics, settings, state database, and its modules past the command.
SERVER_SIDE = (
    "fastapi",
    "starlette",
    "uvicorn",
    "prometheus_client",
    "pydantic_settings",
    "sqlite3",
    "vmcast.server.api",
    "vmcast.server.app",
    "vmcast.server.catalog",
    "vmcast.server.client",
    "vmcast.server.registry",
    "vmcast.server.sender",
    "vmcast.server.settings",
)

# Registering into a cloud (``vmcast register``, ``vmcast receive --register``) and the clouds' SDKs.
REGISTRATION = (
    "vmcast.receiver.registering",
    "vmcast.receiver.registration",
    "openstack",
    "keystoneauth1",
    "boto3",
    "botocore",
)

# What a receive runs on, which building the command line (and ``--help``) does not need. (Not pydantic:
# typer itself converts option values with it.)
RECEIVE_MACHINERY = ("vmcast.receiver.agent", "vmcast.receiver.lease", "vmcast.receiver.pump", "trio", "httpx")


def modules_loaded(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, set[str]]:
    """Run ``vmcast ARGS...``; its exit status and the modules it had imported by then."""
    listing = tmp_path / "modules.json"
    process = subprocess.run(
        [sys.executable, "-c", _RUN_AND_LIST_MODULES, str(listing), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert listing.exists(), f"the command did not list its modules: {process.stderr}"
    return process.returncode, set(json.loads(listing.read_text()))


def among(loaded: set[str], packages: tuple[str, ...]) -> list[str]:
    """The modules of `loaded` that are any of `packages` or inside one of them."""
    return sorted(name for name in loaded if any(name == p or name.startswith(f"{p}.") for p in packages))


@pytest.fixture
def refusing_server() -> Iterator[str]:
    """The URL of a TCP port bound but not listening: a connection is refused at once (exit 5, fast)."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{bound.getsockname()[1]}"


def test_importing_the_vmcast_command_imports_neither_the_receiver_nor_the_server():
    process = subprocess.run(
        [sys.executable, "-c", "import json, sys, vmcast.server.cli; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    loaded = set(json.loads(process.stdout))
    assert among(loaded, SERVER_SIDE + REGISTRATION + RECEIVE_MACHINERY) == []
    assert among(loaded, ("vmcast.receiver",)) == []


def test_receive_help_imports_only_what_builds_the_command(tmp_path):
    status, loaded = modules_loaded(tmp_path, "receive", "--help")
    assert status == 0
    assert "vmcast.receiver.cli" in loaded
    assert among(loaded, SERVER_SIDE + REGISTRATION + RECEIVE_MACHINERY) == []


def test_an_ordinary_receive_imports_neither_the_server_nor_the_registration_code(tmp_path, refusing_server):
    status, loaded = modules_loaded(tmp_path, "receive", "some-image", "--server", refusing_server, "--output", str(tmp_path / "copy.raw"))
    assert status == 5  # server unreachable: the receive got as far as asking for its lease
    assert {"vmcast.receiver.agent", "vmcast.receiver.lease", "trio", "httpx"} <= loaded
    assert among(loaded, SERVER_SIDE + REGISTRATION) == []


def test_a_receive_with_register_imports_the_registration_code(tmp_path, refusing_server):
    # The other side of the above, so that its absences mean something: --register loads the registration
    # code before receiving. Credentials made up (no request reaches AWS): the receive then fails on the
    # server, exit 5; without boto3 installed the registration fails first, exit 8.
    aws = {"AWS_ACCESS_KEY_ID": "made-up", "AWS_SECRET_ACCESS_KEY": "made-up", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    status, loaded = modules_loaded(
        tmp_path, "receive", "some-image", "--server", refusing_server, "--output", str(tmp_path / "copy.raw"),
        "--register", "ec2", "--region", "nowhere-1", env={**os.environ, **aws},
    )  # fmt: skip
    assert status in (5, 8)
    assert "vmcast.receiver.registering" in loaded
    assert among(loaded, SERVER_SIDE) == []


def test_vmcast_serve_help_does_not_import_the_receiver(tmp_path):
    status, loaded = modules_loaded(tmp_path, "serve", "--help")
    assert status == 0
    assert among(loaded, ("vmcast.receiver",) + RECEIVE_MACHINERY) == []
