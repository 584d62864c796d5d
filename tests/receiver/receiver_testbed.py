"""Test beds for the receiver (fixtures re-exported by conftest.py): a real multicast sender on 127.0.0.1, a minimal lease server, loop devices.

Everything here uses real sockets, real files and real block devices; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from vmcast.protocol import (
    Carousel,
    Idle,
    ParityEncoder,
    SendMetadata,
    encode_data,
    encode_metadata,
    encode_parity_header,
    manifest_of,
)

LOOPBACK = "127.0.0.1"


# udp(7): the control message that makes one sendmsg a batch of datagrams of this size (UDP GSO, Linux 4.18+).
UDP_SEGMENT = 103


def free_group() -> tuple[str, int]:
    """A multicast group and port no other test (or concurrent test run) is likely to use."""
    rng = random.SystemRandom()
    return f"239.255.{rng.randrange(1, 255)}.{rng.randrange(1, 255)}", rng.randrange(20000, 60000)


def gso_unavailable() -> str | None:
    """None when this kernel sends UDP GSO batches and receives with UDP GRO, else why not (a skip reason)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, 0)
        except OSError as error:
            return f"no UDP GSO here: {error}"
        try:
            probe.setsockopt(socket.IPPROTO_UDP, 104, 1)  # UDP_GRO
        except OSError as error:
            return f"no UDP GRO here: {error}"
    return None


def send_batch(sock: socket.socket, datagrams: list[bytes], destination: tuple[str, int]) -> None:
    """Send `datagrams` with one sendmsg, as a UDP GSO batch when there are several: every one but the last
    must be as long as the first, the last no longer (the kernel cuts the buffer at that size)."""
    control = [(socket.IPPROTO_UDP, UDP_SEGMENT, struct.pack("=H", len(datagrams[0])))] if len(datagrams) > 1 else []
    while True:
        try:
            sock.sendmsg(datagrams, control, 0, destination)
            return
        except BlockingIOError:
            time.sleep(0.0005)
        except OSError as error:
            if error.errno == 105:  # ENOBUFS: the loopback queue is full; wait like a paced sender would
                time.sleep(0.0005)
            else:
                raise


def multicast_sender_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LOOPBACK))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)  # never leaves the host
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    return sock


@dataclass
class Sender:
    """A vmcast sender in a thread: `vmcast.protocol.Carousel` over a real multicast socket.

    * ``rate``: bytes per second of data (None: as fast as it can).
    * ``corrupt_offsets``: data frames at these offsets go out with flipped bytes on the first loop only.
    * ``metadata``: metadata objects to send instead of the manifest's (a minimal third-party sender).
    * ``metadata_after``: from this many seconds on, send these metadata objects instead (an image changing).
    * ``batch``: data frames per sendmsg, as one UDP GSO batch (like `vmcast.server.sender`); a batch ends early
      at a short frame (the image's last) and before metadata. ``batches`` counts the batches sent, and
      ``short_tail_batches`` those of several frames that ended with a short one.
    * ``lost_offsets``: data frames at these offsets are not sent in the first loop (lost on the way).
    * ``parity``: ``{block: count}``: in the first loop, right after the block's last frame, `count` RaptorQ
      parity frames of it (docs/PROTOCOL.md section 8) go out from a second socket, as a server's repairs do;
      with ``corrupt_parity`` each has a byte flipped. ``parity_sent`` counts them.
    """

    data: bytes
    group: str
    port: int
    cookie: bytes = field(default_factory=lambda: os.urandom(8))
    frame_size: int = 1400
    rate: float | None = 50e6
    corrupt_offsets: frozenset[int] = frozenset()
    metadata: list[dict] | None = None
    metadata_after: tuple[float, list[dict]] | None = None
    batch: int = 1
    lost_offsets: frozenset[int] = frozenset()
    parity: dict[int, int] = field(default_factory=dict)
    corrupt_parity: bool = False

    def __post_init__(self) -> None:
        self.manifest = manifest_of(self.data, name="test-image", frame_size=self.frame_size)
        self.carousel = Carousel(manifest=self.manifest, cookie=self.cookie, metadata_interval=0.25)
        if self.metadata is not None:
            self.carousel.metadata_datagrams = tuple(encode_metadata(self.cookie, fields) for fields in self.metadata)
        self.sock = multicast_sender_socket()
        self.repair_sock = multicast_sender_socket()
        self.parity_sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-sender", daemon=True)
        self.error: BaseException | None = None
        self.batches = 0
        self.short_tail_batches = 0

    @property
    def sha1(self) -> str:
        return self.manifest.sha1

    @property
    def position(self) -> int:
        """Data frames sent so far (all loops)."""
        return self.carousel.data_frames_sent

    def start(self) -> Sender:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.sock.close()
        self.repair_sock.close()

    def inject(self, datagram: bytes) -> None:
        """Put any bytes on the group (from another socket, like a stranger would)."""
        with multicast_sender_socket() as stranger:
            stranger.sendto(datagram, (self.group, self.port))

    def wait_for_frames(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.carousel.data_frames_sent < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sender stuck at {self.carousel.data_frames_sent} frames")
            time.sleep(0.001)

    def _send_parity_after(self, end: int, destination: tuple[str, int], flush: Callable[[], None] | None) -> None:
        """After the first loop's last frame of a block named in `parity`, that block's parity frames."""
        layout = self.manifest.layout
        block = (end - 1) // layout.block_size
        if self.parity.get(block) and end == layout.block_span(block)[1]:
            if flush is not None:
                flush()
            start = layout.block_span(block)[0]
            encoder = ParityEncoder(self.data[start:end], frame_size=self.frame_size)
            k = encoder.source_symbols
            for esi, symbol in enumerate(encoder.symbols(k, self.parity[block]), start=k):
                if self.corrupt_parity:
                    symbol = bytes([symbol[0] ^ 0x55]) + symbol[1:]
                send_batch(self.repair_sock, [encode_parity_header(self.cookie, block=block, esi=esi) + symbol], destination)
                self.parity_sent += 1

    def _run(self) -> None:
        try:
            self._send_loop()
        except Exception as error:  # noqa: BLE001 - shown by the fixture that stops the sender
            self.error = error

    def _send_loop(self) -> None:
        view = memoryview(self.data)
        destination = (self.group, self.port)
        started = time.monotonic()
        sent_bytes = 0
        switched = False
        pending: list[bytes] = []  # the data frames of the GSO batch being filled

        def send_pending() -> None:
            if len(pending) > 1:
                self.batches += 1
                if len(pending[-1]) < len(pending[0]):
                    self.short_tail_batches += 1
            send_batch(self.sock, pending, destination)
            pending.clear()

        while not self._stop.is_set():
            now = time.monotonic()
            if self.metadata_after and not switched and now - started >= self.metadata_after[0]:
                self.carousel.metadata_datagrams = tuple(encode_metadata(self.cookie, fields) for fields in self.metadata_after[1])
                switched = True
            action = self.carousel.next_send(now)
            if isinstance(action, SendMetadata):
                if pending:
                    send_pending()
                for datagram in action.datagrams:
                    send_batch(self.sock, [datagram], destination)
                continue
            if isinstance(action, Idle):
                self._stop.wait(max(0.0, min(action.until - now, 0.05)))
                continue
            payload = view[action.offset : action.offset + action.length]
            if action.offset in self.corrupt_offsets and self.carousel.loops_completed == 0:
                payload = bytes(b ^ 0xFF for b in payload[:8]) + bytes(payload[8:])
            first_loop = self.carousel.data_frames_sent <= self.manifest.layout.frame_count
            if not (first_loop and action.offset in self.lost_offsets):
                pending.append(action.header + bytes(payload))
            if pending and (len(pending) == self.batch or action.length < self.frame_size):
                send_pending()
            if first_loop and self.parity:
                self._send_parity_after(action.offset + action.length, destination, send_pending if pending else None)
            sent_bytes += action.length
            if self.rate is not None:
                ahead = sent_bytes / self.rate - (time.monotonic() - started)
                if ahead > 0.002:
                    if pending:
                        send_pending()
                    time.sleep(ahead)


@pytest.fixture
def image() -> bytes:
    """A few MiB of random bytes, not a multiple of the frame or block size."""
    return os.urandom(3 * (1 << 20) + 12_345)


@pytest.fixture
def make_sender() -> Iterator[Callable[..., Sender]]:
    senders: list[Sender] = []

    def make(data: bytes, **options) -> Sender:
        group, port = free_group()
        sender = Sender(data=data, group=group, port=port, **options)
        senders.append(sender)
        return sender

    yield make
    for sender in senders:
        sender.stop()
        assert sender.error is None, sender.error


# -- a minimal lease server -----------------------------------------------------------------------------------


@dataclass
class LeaseServer:
    """The endpoints of the server's API a receiver uses, over real HTTP, each image's stream a `Sender`.

    It stands in for the real server (server/), which is tested end to end with the receiver in tests/e2e;
    here a test can shape what the server answers. Like the real one, it shares one stream per image
    between leases, and with ``lease_ttl`` set it asks for renewals; ``end_leases_on_renewal`` makes the
    next renewals answer 404, as for a lease that expired; ``without_hold`` answers a start that asks for
    ``min_receivers`` or ``max_wait`` as a server from before holding did (FastAPI's 422, extra fields forbidden),
    ``without_listening`` one that asks with ``listening`` likewise. ``GET /v1/streams`` lists the streams
    started (``polled_group`` makes it name another group and port: a stream that restarted elsewhere between
    a receiver's long poll and its lease, a race no real server can be made to lose on cue).
    """

    images: dict[str, bytes]
    make_sender: Callable[..., Sender]
    sender_options: dict = field(default_factory=dict)
    announce_block_size: bool = True  # the real server does; the API as first specified did not
    lease_ttl: float | None = None
    end_leases_on_renewal: int = 0
    without_hold: bool = False
    without_listening: bool = False
    polled_group: tuple[str, int] | None = None
    starts: list[dict] = field(default_factory=list)
    joined: list[str] = field(default_factory=list)
    """Leases whose holders said ``POST /v1/leases/{id}/joined``."""
    streams: dict[str, Sender] = field(default_factory=dict)
    leases: dict[str, Sender] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)
    renewed: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)

    def start(self) -> LeaseServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, body: dict | list) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                if not self.path.startswith("/v1/streams?"):
                    return self._answer(404, {"detail": "Not Found"})
                listed = []
                for name, sender in server.streams.items():
                    group, port = server.polled_group or (sender.group, sender.port)
                    listed.append({"stream_id": f"stream-{name}", "image": name, "format": "raw", "state": "running", "group": group, "port": port})
                self._answer(200, listed)

            def do_POST(self) -> None:
                if self.path.startswith("/v1/leases/") and self.path.endswith("/renew"):
                    return self._renew(self.path.split("/")[3])
                if self.path.startswith("/v1/leases/") and self.path.endswith("/joined"):
                    server.joined.append(self.path.split("/")[3])
                    return self._answer(200, {"stream_id": "stream", "waiting_for": 0})
                if self.path != "/v1/streams":
                    return self._answer(404, {"detail": "Not Found"})
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.starts.append(request)
                refused = (("min_receivers", "max_wait") if server.without_hold else ()) + (("listening",) if server.without_listening else ())
                extra = [key for key in refused if key in request]
                if extra:
                    return self._answer(422, {"detail": [
                        {"type": "extra_forbidden", "loc": ["body", key], "msg": "Extra inputs are not permitted", "input": request[key]}
                        for key in extra
                    ]})  # fmt: skip
                name = request.get("image")
                if name not in server.images:
                    return self._answer(404, {"detail": f"no image {name!r}"})
                if request.get("format") != "raw":
                    return self._answer(422, {"detail": f"unknown format {request.get('format')!r}"})
                if name not in server.streams:
                    server.streams[name] = server.make_sender(server.images[name], **server.sender_options).start()
                sender = server.streams[name]
                lease_id = f"lease-{len(server.leases) + 1}"
                server.leases[lease_id] = sender
                answer = {
                    "stream_id": f"stream-{name}", "group": sender.group, "port": sender.port,
                    "cookie": sender.cookie.hex(), "lease_id": lease_id, "len": len(sender.data),
                    "sha1": sender.sha1, "frame_size": sender.frame_size, "image": name, "format": "raw",
                }
                if server.announce_block_size:
                    answer["block_size"] = sender.manifest.layout.block_size
                if server.lease_ttl is not None:
                    answer["lease_ttl"] = server.lease_ttl
                if "listening" in request:
                    answer["joined"] = request["listening"] == f"{sender.group}:{sender.port}"
                self._answer(201, answer)

            def _renew(self, lease_id: str) -> None:
                if server.end_leases_on_renewal and lease_id not in server.ended:
                    server.end_leases_on_renewal -= 1
                    server.ended.append(lease_id)
                if lease_id not in server.leases or lease_id in server.ended or lease_id in server.released:
                    return self._answer(404, {"detail": f"no active lease with id {lease_id!r}"})
                server.renewed.append(lease_id)
                self._answer(200, {"lease_id": lease_id, "lease_ttl": server.lease_ttl})

            def do_DELETE(self) -> None:
                lease_id = self.path.rsplit("/", 1)[-1]
                server.released.append(lease_id)
                self.send_response(204)
                self.end_headers()

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def lease_server(image: bytes, make_sender) -> Iterator[LeaseServer]:
    server = LeaseServer(images={"test-image": image}, make_sender=make_sender).start()
    yield server
    server.stop()


# -- loop devices -------------------------------------------------------------------------------------------------


def losetup_available() -> str | None:
    """None when loop devices can be attached here, else why not (a skip reason)."""
    if os.geteuid() != 0:
        return "loop devices need root"
    if shutil.which("losetup") is None:
        return "losetup is not installed"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (no loop driver in this kernel or container)"
    return None


@pytest.fixture
def loop_device(tmp_path) -> Iterator[Callable[[int], str]]:
    """Attach a loop device over a sparse file of the given size; detached after the test."""
    reason = losetup_available()
    if reason:
        pytest.skip(reason)
    attached: list[str] = []

    def attach(size: int) -> str:
        backing = tmp_path / f"disk{len(attached)}.img"
        with open(backing, "wb") as file:
            file.truncate(size)
        result = subprocess.run(["losetup", "--find", "--show", str(backing)], check=False, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"losetup cannot attach a loop device here: {result.stderr.strip()}")
        device = result.stdout.strip()
        attached.append(device)
        return device

    yield attach
    for device in attached:
        subprocess.run(["losetup", "--detach", device], check=False, capture_output=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{device}.vmcast.json")  # the receiver's state file, beside the device (in /dev)


def write_device(device: str, data: bytes) -> None:
    """Write `data` at the start of a block device, in place ("r+b": the path is opened, never created or truncated)."""
    with open(device, "r+b") as disk:
        disk.write(data)


def read_device(device: str, size: int) -> bytes:
    """The first `size` bytes of a block device: loop devices here are larger than the image written to them."""
    with open(device, "rb") as disk:
        return disk.read(size)


def sha1_of(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def minimal_metadata(data: bytes) -> list[dict]:
    """What a minimal third-party sender announces: only the image's SHA-1 and length."""
    return [{"sha1": sha1_of(data), "len": len(data)}]


def data_frame(cookie: bytes, offset: int, payload: bytes) -> bytes:
    return encode_data(cookie, offset, payload)
