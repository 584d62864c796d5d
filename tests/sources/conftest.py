"""Fixtures for the source tests: a real HTTP server of our own on 127.0.0.1, image bytes, and clients of the
real Glance (through Keystone) and moto S3 servers from tests/services, configured the way an operator
configures vmcast (OS_* / AWS_* variables), with clean-up of what each test creates."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MIB = 1024 * 1024

# openstacksdk 4.x warns about its own internals on image calls; not ours to fix (as in tests/services).
SDK_WARNINGS = [
    pytest.mark.filterwarnings("ignore:The _compute_attributes method is deprecated"),
    pytest.mark.filterwarnings("ignore:The 'service_type' parameter is unnecesary"),
    pytest.mark.filterwarnings("ignore:Support for InfluxDB requires"),
]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def random_bytes(size: int = MIB + 4321) -> bytes:
    """New bytes each run (1 MiB plus an odd tail, so nothing is aligned to a chunk size by accident)."""
    return os.urandom(size)


def qcow2_bytes(tmp_path: Path, raw: bytes, *, options: str | None = None) -> bytes:
    """A real qcow2 made by qemu-img, holding `raw`."""
    source, target = tmp_path / f"{uuid.uuid4().hex}.raw", tmp_path / f"{uuid.uuid4().hex}.qcow2"
    source.write_bytes(raw)
    command = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(source), str(target)]
    if options:
        command[6:6] = ["-o", options]
    subprocess.run(command, check=True, capture_output=True)
    data = target.read_bytes()
    source.unlink()
    target.unlink()
    return data


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def cache_files(cache_dir: Path) -> list[str]:
    """Names of the files the fetcher keeps (lock files aside)."""
    directory = cache_dir / "sources"
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock")) if directory.exists() else []


# ------------------------------------------------------------------------------------------- HTTP


@dataclass
class Served:
    """One file of the origin server and how it is served."""

    body: bytes
    etag: str | None = None
    """Sent as the ETag header as it is (quotes and ``W/`` included); None: no ETag."""
    last_modified: str | None = None
    head_status: int = 200
    """Status HEAD answers (405: no HEAD; 403: a presigned URL signed for GET only)."""
    truncate_to: int | None = None
    """Send the full Content-Length but only this many bytes, then close (a dropped connection)."""
    delay: float = 0.0
    """Seconds to wait before sending a GET's body (to make concurrent fetches overlap)."""
    status: int = 200
    """Answer this status (with an empty body) instead, when it is not 200."""


@dataclass
class Origin:
    """A real HTTP/1.1 server on 127.0.0.1, with a log of the requests it answered."""

    base_url: str
    files: dict[str, Served] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self, path: str, body: bytes, *, etag: str | None = "strong", **options) -> str:
        """Serve `body` at `path`; etag "strong" (default) means a quoted hash of the body. Returns the URL."""
        if etag == "strong":
            etag = f'"{hashlib.sha256(body).hexdigest()[:20]}"'
        self.files[path] = Served(body=body, etag=etag, **options)
        return self.base_url + path

    def count(self, method: str, path: str) -> int:
        with self.lock:
            return sum(1 for entry in self.requests if entry == (method, path))


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    origin: Origin  # set on the subclass made per server

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _answer(self, *, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        with self.origin.lock:
            self.origin.requests.append((self.command, path))
        served = self.origin.files.get(path)
        if served is None:
            self._empty(404)
            return
        if not send_body and served.head_status != 200:
            self._empty(served.head_status)
            return
        if served.status != 200:
            self._empty(served.status)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(served.body)))
        if served.etag:
            self.send_header("ETag", served.etag)
        if served.last_modified:
            self.send_header("Last-Modified", served.last_modified)
        if served.truncate_to is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        if not send_body:
            return
        time.sleep(served.delay)
        body = served.body if served.truncate_to is None else served.body[: served.truncate_to]
        self.wfile.write(body)
        if served.truncate_to is not None:
            self.wfile.flush()
            self.close_connection = True

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client that closes a response without reading its body (the fetcher does, for cached content)
        # is normal here, not worth a traceback on stderr.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def origin() -> Iterator[Origin]:
    """A threaded HTTP server on an ephemeral port of 127.0.0.1, shut down (and its port closed) at the end."""
    state = Origin(base_url="")
    handler = type("Handler", (_Handler,), {"origin": state})
    server = _Server(("127.0.0.1", 0), handler)
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="test-origin", daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# ------------------------------------------------------------------------------------------ Glance


@pytest.fixture
def os_env(glance_cloud, monkeypatch) -> dict[str, str]:
    """The process environment of a server operator who ran `eval "$(clouds.sh env)"`: OS_* only."""
    for name in [n for n in os.environ if n.startswith("OS_")]:
        monkeypatch.delenv(name)
    for name, value in glance_cloud.env.items():
        monkeypatch.setenv(name, value)
    return dict(glance_cloud.env)


@dataclass(frozen=True)
class GlanceImageData:
    id: str
    name: str
    data: bytes


@dataclass
class GlanceImages:
    """Images uploaded to the real Glance for a module's tests, deleted at its end."""

    connection: object
    created: list[str] = field(default_factory=list)

    def upload(self, data: bytes, *, name: str | None = None, disk_format: str = "raw") -> GlanceImageData:
        name = name or unique("vmcast-sources-test")
        image = self.connection.image.create_image(
            name=name, disk_format=disk_format, container_format="bare", data=io.BytesIO(data),
            validate_checksum=False, allow_duplicates=True,
        )  # fmt: skip
        self.created.append(image.id)
        self.connection.image.wait_for_status(image, "active", failures=["killed"], wait=120, interval=0.5)
        return GlanceImageData(id=image.id, name=name, data=data)


@pytest.fixture(scope="module")
def glance_images(glance_cloud) -> Iterator[GlanceImages]:
    images = GlanceImages(connection=glance_cloud.connect())
    yield images
    for image_id in images.created:
        images.connection.image.delete_image(image_id, ignore_missing=True)
    images.connection.close()


# --------------------------------------------------------------------------------------------- S3


@dataclass
class Bucket:
    client: object
    name: str

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=body)


@pytest.fixture
def aws_env(aws_endpoint, monkeypatch) -> dict[str, str]:
    """AWS_* variables pointing boto3 at moto, as an operator would set them (no profile, no token)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in aws_endpoint.items():
        monkeypatch.setenv(name, value)
    return dict(aws_endpoint)


@pytest.fixture
def bucket(aws_env) -> Iterator[Bucket]:
    """A new bucket in moto (which keeps state for the whole session), emptied and deleted at the end."""
    import boto3

    client = boto3.session.Session().client("s3")
    made = Bucket(client=client, name=unique("vmcast-sources"))
    client.create_bucket(Bucket=made.name)
    yield made
    for listed in client.list_objects_v2(Bucket=made.name).get("Contents", []):
        client.delete_object(Bucket=made.name, Key=listed["Key"])
    client.delete_bucket(Bucket=made.name)
    client.close()
