"""Helpers for receiver tests against the real server: `vmcast serve` and `vmcast receive` as processes.

Loss is real: a receiver with a small socket buffer (``--rcvbuf``) is paused with SIGSTOP, so the kernel
drops what arrives meanwhile, exactly as it would for a receiver descheduled on a busy machine.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ..e2e.processes import (  # noqa: F401 (re-exported)
    receiver_result,
    running_server,
    sha1_of,
    start_receiver,
    stop,
    write_random_image,
)

FRAME = 1400
# Bytes a data frame takes on the wire (payload, vmcast header, UDP and IPv4 headers): what --rate counts.
WIRE_FRAME = FRAME + 16 + 28


# The shared server's rate: a 16 MiB image loops in about 3 s, long enough to pause a receiver mid-loop
# after it learned the carousel's source port (the metadata comes once a second).
RATE = "48mbit"
RATE_BPS = 48e6
# Leases of receivers killed by a test end this soon, and their streams with them.
LEASE_TTL = "3"

# name -> MiB: one image (hence one stream) per test.
IMAGES = {"repair.raw": 16, "endgame.raw": 16, "unreachable.raw": 8, "resume.raw": 16, "changing.raw": 16, "register.raw": 4}


@dataclass(frozen=True)
class RealServer:
    url: str
    images: Path
    sha1: dict[str, str]
    """SHA-1 of each image as written at the start."""


@pytest.fixture(scope="session")
def real_server(tmp_path_factory) -> Iterator[RealServer]:
    """One `vmcast serve` for the session, at `RATE`, serving `IMAGES` (random bytes)."""
    root = tmp_path_factory.mktemp("real-server")
    images = root / "images"
    images.mkdir()
    sha1 = {name: write_random_image(images / name, mib) for name, mib in IMAGES.items()}
    with running_server(images, root, "--rate", RATE, "--lease-ttl", LEASE_TTL) as url:
        yield RealServer(url=url, images=images, sha1=sha1)


def loop_seconds(image_bytes: int, rate_bps: float) -> float:
    """How long the server takes to send the image once at `rate_bps` (metadata frames aside)."""
    frames = -(-image_bytes // FRAME)
    return frames * WIRE_FRAME * 8 / rate_bps


def the_stream(url: str, image: str, *, timeout: float = 20.0) -> dict:
    """The server's running stream of `image` (waits for it to appear)."""
    deadline = time.monotonic() + timeout
    while True:
        streams = [s for s in httpx.get(f"{url}/v1/streams", timeout=5).json() if s["image"] == image and s["state"] == "running"]
        if streams:
            return streams[0]
        assert time.monotonic() < deadline, f"no stream of {image} on {url}"
        time.sleep(0.02)


def stream_status(url: str, stream_id: str) -> dict:
    return httpx.get(f"{url}/v1/streams/{stream_id}", timeout=5).json()


def wait_until_sent(url: str, image: str, fraction: float, image_bytes: int, *, timeout: float = 30.0) -> dict:
    """Wait until the stream of `image` has sent `fraction` of one loop's bytes; return its status."""
    stream = the_stream(url, image)
    deadline = time.monotonic() + timeout
    while True:
        status = stream_status(url, stream["stream_id"])
        if status["bytes_sent"] >= fraction * image_bytes:
            return status
        assert time.monotonic() < deadline, f"the stream is stuck at {status['bytes_sent']} bytes"
        time.sleep(0.01)


def wait_for_line(log: Path, text: str, *, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not (log.exists() and text in log.read_text()):
        assert time.monotonic() < deadline, f"{text!r} never appeared: {log_tail(log)}"
        time.sleep(0.02)


def pause(process: subprocess.Popen, seconds: float) -> None:
    """SIGSTOP the process for `seconds`: its socket buffer overflows and the kernel drops datagrams."""
    process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        process.send_signal(signal.SIGCONT)


def state_of(output: Path) -> dict | None:
    path = Path(f"{output}.vmcast.json")
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None  # not there yet (it is replaced atomically, so never half-written)


def log_tail(log: Path, chars: int = 3000) -> str:
    return log.read_text()[-chars:] if log.exists() else "(no log)"
