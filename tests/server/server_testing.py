"""Helpers of the server tests: free ports, test images, and a real multicast receiver on loopback."""

from __future__ import annotations

import hashlib
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from vmcast.protocol import HEADER_SIZE, METADATA_OFFSET
from vmcast.protocol.frames import HEADER

with warnings.catch_warnings():
    # Starlette suggests another HTTP library for its test client; the one installed works.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient

__all__ = [
    "Heard",
    "Images",
    "MulticastListener",
    "ServerProcess",
    "TestClient",
    "free_tcp_port",
    "free_udp_port",
    "samples",
    "sha1_of",
]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("0.0.0.0", 0))
        return probe.getsockname()[1]


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def samples(metrics_text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples named `name` in a Prometheus text exposition, by their sorted labels."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == name
    }


def sha1_of(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Images:
    """The test images: names in `directory`."""

    directory: Path
    raw: str = "disk.raw"
    qcow2: str = "disk.qcow2"
    empty: str = "empty.img"

    def path(self, name: str) -> Path:
        return self.directory / name


# -- a real multicast receiver -------------------------------------------------------------------------------------


# Linux's SO_TIMESTAMPNS (and SCM_TIMESTAMPNS), which Python's socket module does not name: the kernel stamps
# each datagram when it arrives. On loopback that is the moment the sender sent it, so timings measured with it
# are the sender's, free of this receiver's own scheduling delays.
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("qq")


@dataclass(frozen=True, slots=True)
class Heard:
    """One datagram as a receiver heard it."""

    at: float
    """When the kernel received it (CLOCK_REALTIME seconds; compare only with other `at`)."""
    offset: int
    """The frame's offset (`METADATA_OFFSET` for metadata)."""
    size: int
    """Whole datagram size in bytes."""
    payload: bytes
    source_port: int = 0
    """UDP source port it came from: the carousel's (and metadata's) socket, or the repair socket."""

    @property
    def is_metadata(self) -> bool:
        return self.offset == METADATA_OFFSET


class MulticastListener:
    """A UDP socket joined to a group on the loopback interface, keeping the datagrams of one cookie."""

    def __init__(self, group: str, port: int, cookie: str | bytes) -> None:
        self.cookie = bytes.fromhex(cookie) if isinstance(cookie, str) else cookie
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.socket.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.socket.bind((group, port))
        membership = socket.inet_aton(group) + socket.inet_aton("127.0.0.1")
        self.socket.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        self.socket.setblocking(False)

    def close(self) -> None:
        self.socket.close()

    def __enter__(self) -> MulticastListener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def listen(self, seconds: float, *, keep_payload: bool = False) -> list[Heard]:
        """Every datagram of our cookie heard within `seconds`; payloads kept for metadata (or all if asked)."""
        heard: list[Heard] = []
        deadline = time.monotonic() + seconds
        buffer = bytearray(65536)
        control_size = socket.CMSG_SPACE(_TIMESPEC.size)
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.socket], [], [], min(left, 0.05))
            if not readable:
                continue
            while True:
                try:
                    size, control, _, source = self.socket.recvmsg_into([buffer], control_size)
                except BlockingIOError:
                    break
                if size < HEADER_SIZE:
                    continue
                cookie, offset = HEADER.unpack_from(buffer)
                if cookie != self.cookie:
                    continue
                at = time.time()
                for level, kind, data in control:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        seconds_part, nanoseconds = _TIMESPEC.unpack_from(data)
                        at = seconds_part + nanoseconds / 1e9
                keep = keep_payload or offset == METADATA_OFFSET
                heard.append(Heard(at, offset, size, bytes(buffer[HEADER_SIZE:size]) if keep else b"", source[1]))
        return heard

    def drain(self) -> None:
        """Forget what is queued."""
        while True:
            try:
                self.socket.recv(65536)
            except BlockingIOError:
                return


# -- a real `vmcast serve` process ---------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    """`vmcast serve` run as a child process with `options`, on a free TCP port (and repair port 0 unless given).

    `start()` waits until /healthz answers; `kill()` is SIGKILL, `stop()` SIGTERM, both by this child's pid.
    """

    images_dir: Path
    cache_dir: Path
    options: tuple[str, ...] = ()
    port: int = field(default_factory=free_tcp_port)
    process: subprocess.Popen | None = None
    _output: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> ServerProcess:
        options = list(self.options)
        if "--repair-port" not in options:
            options += ["--repair-port", "0"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vmcast.server", "serve", "--images", str(self.images_dir),
             "--cache-dir", str(self.cache_dir), "--port", str(self.port), "--log-level", "warning", *options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"vmcast serve did not start: {self.output()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a crash."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not ended within 10 s."""
        self._end(signal.SIGTERM)

    def output(self) -> str:
        """Everything it printed, once it has ended ("" while it runs)."""
        if self.process is None or self.process.stdout is None or self.process.poll() is None:
            return self._output
        if not self.process.stdout.closed:
            self._output = self.process.stdout.read()
            self.process.stdout.close()
        return self._output

    def _end(self, how: signal.Signals) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(how)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_stream(client: TestClient, image: str, format: str = "raw", **fields: object) -> dict:
    """``POST /v1/streams`` that must answer 201; the answer."""
    response = client.post("/v1/streams", json={"image": image, "format": format, **fields})
    assert response.status_code == 201, response.text
    return response.json()
