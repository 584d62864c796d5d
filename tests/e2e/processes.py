"""Helpers to run the real `vmcast` command as separate processes in end-to-end tests."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from benchmarks.vmcast_runner import (
    last_json_object,  # the harness reads receivers' summaries the same way
)

VMCAST = [sys.executable, "-m", "vmcast.server.cli"]


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sha1_of(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_random_image(path: Path, mib: int, *, seed: int | None = None) -> str:
    """A random image of `mib` MiB (the same bytes for the same `seed`; None: fresh ones); returns its SHA-1."""
    random_bytes = random.Random(seed).randbytes if seed is not None else os.urandom
    digest = hashlib.sha1()
    with path.open("wb") as handle:
        for _ in range(mib):
            chunk = random_bytes(1 << 20)
            digest.update(chunk)
            handle.write(chunk)
    return digest.hexdigest()



def random_image_dir(tmp: Path, mib: int, name: str = "disk.raw") -> tuple[Path, str]:
    """An images directory in `tmp` holding one random image of `mib` MiB; the directory and its SHA-1."""
    images = tmp / "images"
    images.mkdir()
    return images, write_random_image(images / name, mib)


def stop(process: subprocess.Popen, *, timeout: float = 10) -> None:
    """End a process we started, by its PID: SIGINT first (it cleans up), SIGKILL if it will not."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running_server(images: Path, tmp: Path, *extra: str) -> Iterator[str]:
    """`vmcast serve` on a free port on loopback; yields its URL."""
    port = free_tcp_port()
    log = (tmp / f"server-{port}.log").open("w")
    server = subprocess.Popen(
        [*VMCAST, "serve", "--images", str(images), "--port", str(port), "--mcast-port", str(free_udp_port()),
         "--cache-dir", str(tmp / "cache"), *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, (tmp / f"server-{port}.log").read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "vmcast serve did not come up"
            time.sleep(0.1)
        yield url
    finally:
        stop(server)


def start_receiver(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([*VMCAST, "receive", *args, "--json"], stdout=subprocess.PIPE, stderr=log.open("w"), text=True)


def receiver_result(process: subprocess.Popen, *, timeout: float) -> tuple[int, dict]:
    """Wait for a receiver; return its exit code and the JSON summary it printed last."""
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(process)
        out, _ = process.communicate()
    return process.returncode, last_json_object(out)
