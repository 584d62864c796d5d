"""pytest plugin: real OpenStack (Keystone + Glance) and AWS (moto_server) endpoints for tests.

Register it from tests/conftest.py with ``pytest_plugins = ["tests.services.cloud_fixtures"]``.

Fixtures (session-scoped):

* ``glance_cloud`` -> :class:`GlanceCloud`: the ``OS_*`` environment, the ``clouds.yaml`` path and
  a ``connect()`` factory for ``openstack.connection.Connection`` objects. Glance is reached through
  the Keystone catalog, exactly as a user's openstacksdk would find it.
* ``aws_endpoint`` -> ``dict`` of ``AWS_*`` environment variables pointing boto3 at moto_server.

The servers come from ``tests/services/clouds.sh``. If they already answer (a developer ran
``clouds.sh start``), they are used as they are and left running. Otherwise the fixtures install
(once, into their own virtualenv) and start only what is missing, and stop exactly that at the
end of the session. Tests that use these fixtures get the ``clouds`` marker, so
``pytest -m "not clouds"`` leaves them out.

If the services cannot be brought up, the tests are skipped with the reason; set
``VMCAST_REQUIRE_CLOUDS=1`` (e.g. in CI) to make that a failure instead, or
``VMCAST_SKIP_CLOUDS=1`` to skip without trying.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # openstacksdk is imported lazily so this plugin loads without it
    import openstack.connection

CLOUDS_SH = Path(__file__).resolve().with_name("clouds.sh")
CLOUD_NAME = "vmcast-test"

# Generous: a first install downloads keystone, glance, moto and their dependencies.
INSTALL_TIMEOUT_S = 900
START_TIMEOUT_S = 300

OPENSTACK_SERVICES = ("keystone", "glance")
AWS_SERVICES = ("moto",)
AWS_ENV_NAMES = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
)


@dataclass(frozen=True)
class GlanceCloud:
    """A running Keystone + Glance, described the way a user of vmcast would configure it."""

    env: Mapping[str, str]
    """``OS_*`` variables (OS_AUTH_URL, OS_USERNAME, ..., OS_CLIENT_CONFIG_FILE), read-only."""
    clouds_yaml: Path
    cloud_name: str = CLOUD_NAME

    def connect(self) -> openstack.connection.Connection:
        """A new openstacksdk connection for cloud ``vmcast-test`` from ``clouds.yaml``.

        Stray ``OS_*`` variables in the test process are ignored, so results do not depend on
        the developer's shell.
        """
        import openstack.config
        import openstack.connection

        config = openstack.config.OpenStackConfig(
            config_files=[str(self.clouds_yaml)], vendor_files=[], load_envvars=False
        )
        return openstack.connection.Connection(config=config.get_one(cloud=self.cloud_name))


def _run_clouds_sh(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CLOUDS_SH), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _tail(proc: subprocess.CompletedProcess[str], lines: int = 25) -> str:
    text = (proc.stdout or "") + (proc.stderr or "")
    return "\n".join(text.strip().splitlines()[-lines:])


def _answers(service: str) -> bool:
    try:
        return _run_clouds_sh("status", service, timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


class _CloudServices:
    """Brings services up on demand and remembers which ones this session started."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self._failures: dict[tuple[str, ...], str] = {}

    def ensure(self, services: tuple[str, ...]) -> str | None:
        """Make ``services`` answer; return None on success, else why they are unavailable."""
        if services in self._failures:  # don't pay for a failing install/start twice
            return self._failures[services]
        reason = self._bring_up(services)
        if reason is not None:
            self._failures[services] = reason
        return reason

    def _bring_up(self, services: tuple[str, ...]) -> str | None:
        if os.environ.get("VMCAST_SKIP_CLOUDS"):
            return "VMCAST_SKIP_CLOUDS is set"
        if not CLOUDS_SH.is_file():
            return f"{CLOUDS_SH} is missing"
        already_up = {s for s in services if _answers(s)}
        if already_up == set(services):
            return None
        try:
            install = _run_clouds_sh("install", timeout=INSTALL_TIMEOUT_S)
            if install.returncode != 0:
                return f"`clouds.sh install` failed:\n{_tail(install)}"
            start = _run_clouds_sh("start", *services, timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            return f"`{' '.join(map(str, exc.cmd))}` timed out after {exc.timeout:.0f}s"
        # clouds.sh prints "spawned NAME" for each server it started (`start glance` starts
        # keystone too). Record them before judging success, so a half-started stack is stopped
        # too, and a server someone else started meanwhile is not.
        for line in start.stdout.splitlines():
            kind, _, service = line.partition(" ")
            if kind == "spawned" and service not in self.started:
                self.started.append(service)
        if start.returncode != 0:
            return f"`clouds.sh start {' '.join(services)}` failed:\n{_tail(start)}"
        return None

    def stop_started(self) -> None:
        if self.started:
            _run_clouds_sh("stop", *self.started, timeout=120)
            self.started.clear()


def _unavailable(reason: str) -> None:
    message = f"cloud services unavailable: {reason}"
    if os.environ.get("VMCAST_REQUIRE_CLOUDS"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _service_env() -> dict[str, str]:
    """Parse the ``export NAME=value`` lines of ``clouds.sh env`` (also writes clouds.yaml)."""
    proc = _run_clouds_sh("env", timeout=60)
    if proc.returncode != 0:
        _unavailable(f"`clouds.sh env` failed:\n{_tail(proc)}")
    env: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            env[name] = value
    return env


@pytest.fixture(scope="session")
def _cloud_services() -> Iterator[_CloudServices]:
    services = _CloudServices()
    yield services
    services.stop_started()


@pytest.fixture(scope="session")
def glance_cloud(_cloud_services: _CloudServices) -> GlanceCloud:
    """Keystone + Glance on loopback; see :class:`GlanceCloud`."""
    try:
        import openstack  # noqa: F401
    except ImportError:
        pytest.skip("openstacksdk is not installed (pip install -e '.[test]')")
    reason = _cloud_services.ensure(OPENSTACK_SERVICES)
    if reason is not None:
        _unavailable(reason)
    env = _service_env()
    os_env = {name: value for name, value in env.items() if name.startswith("OS_")}
    return GlanceCloud(
        env=types.MappingProxyType(os_env),
        clouds_yaml=Path(os_env["OS_CLIENT_CONFIG_FILE"]),
    )


@pytest.fixture(scope="session")
def aws_endpoint(_cloud_services: _CloudServices) -> dict[str, str]:
    """``AWS_*`` variables for boto3 (>= 1.28 honours AWS_ENDPOINT_URL) against moto_server.

    moto keeps its state for the whole session and shares it between tests: use unique names.
    """
    reason = _cloud_services.ensure(AWS_SERVICES)
    if reason is not None:
        _unavailable(reason)
    env = _service_env()
    return {name: env[name] for name in AWS_ENV_NAMES}


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so the plugin works under --strict-markers anywhere.
    config.addinivalue_line(
        "markers",
        "clouds: needs the Keystone, Glance and moto servers from tests/services/clouds.sh",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tag every test that needs the servers, so `-m "not clouds"` deselects them.
    for item in items:
        if {"glance_cloud", "aws_endpoint"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.clouds)
