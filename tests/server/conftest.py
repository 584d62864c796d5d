"""Fixtures of the server tests: real image files, real qemu-img, real loopback multicast, the real app.

Every test gets its own images and cache directories and its own UDP port, so tests never hear each other's
streams (and never a stream of a concurrently running e2e test).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vmcast.server.app import Services, create_app, start_services
from vmcast.server.settings import Settings

from .server_testing import Images, MulticastListener, ServerProcess, TestClient, free_udp_port

# A raw image of a few frames more than 2 MiB: three checksum blocks, the last one short, and a short last frame.
RAW_IMAGE_SIZE = 2 * 1024 * 1024 + 5 * 1400 + 123
# Slow enough that two or three streams at once leave the two cores of CI machines mostly idle.
TEST_RATE = "30mbit"


@pytest.fixture
def images(tmp_path: Path) -> Images:
    """A raw image of random bytes, the same bytes as qcow2 (made by qemu-img), and an empty image."""
    directory = tmp_path / "images"
    directory.mkdir()
    made = Images(directory=directory)
    made.path(made.raw).write_bytes(os.urandom(RAW_IMAGE_SIZE))
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(made.path(made.raw)), str(made.path(made.qcow2))],
        check=True,
        capture_output=True,
    )
    made.path(made.empty).touch()
    return made


@pytest.fixture
def settings_for(images: Images, tmp_path: Path) -> Callable[..., Settings]:
    """Settings for `images` with a private cache and multicast port; keyword arguments override fields."""
    mcast_port = free_udp_port()

    def make(**overrides: object) -> Settings:
        fields: dict[str, object] = {
            "images_dir": images.directory,
            "cache_dir": tmp_path / "cache",
            "mcast_port": mcast_port,
            "rate": TEST_RATE,
            # A free UDP port for repair requests: never the default (the number of --port, 8470), which a
            # server running beside the tests may hold.
            "repair_port": 0,
        }
        fields.update(overrides)
        return Settings(**fields)

    return make


@pytest.fixture
def settings(settings_for: Callable[..., Settings]) -> Settings:
    return settings_for()


@pytest.fixture
def open_services() -> Iterator[Callable[[Settings], Services]]:
    """`start_services` for tests that use the services without the app; every one is closed after the test."""
    opened: list[Services] = []

    def open_(settings: Settings) -> Services:
        services = start_services(settings)
        opened.append(services)
        return services

    yield open_
    for services in opened:
        services.close()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The real application, lifespan and all, behind an in-process HTTP client."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def listen() -> Iterator[Callable[..., MulticastListener]]:
    """Make listeners for (group, port, cookie); all are closed after the test."""
    made: list[MulticastListener] = []

    def make(group: str, port: int, cookie: str | bytes) -> MulticastListener:
        listener = MulticastListener(group, port, cookie)
        made.append(listener)
        return listener

    yield make
    for listener in made:
        listener.close()


@pytest.fixture
def server_process(images: Images, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Make `vmcast serve` processes over `images` (not started); every one is ended, by pid, after the test."""
    made: list[ServerProcess] = []
    mcast_port = free_udp_port()

    def make(*options: str, cache_dir: Path | None = None, port: int | None = None) -> ServerProcess:
        extra = () if "--mcast-port" in options else ("--mcast-port", str(mcast_port))
        server = ServerProcess(
            images_dir=images.directory, cache_dir=cache_dir or tmp_path / "cache", options=(*options, *extra)
        )
        if port is not None:
            server.port = port
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()
        server.output()
