"""The paced multicast sender: one OS thread per stream, looping over an image as `Carousel` schedules it.

The image is `mmap`-ed and each data frame leaves with ``sendmsg([header, view])``, the payload a
`memoryview` slice of the map: the kernel copies the bytes straight from the page cache into the datagram,
and Python never copies them. A thread (not an event-loop task) because the loop is a tight sequence of
blocking system calls; `sendmsg` releases the GIL, so streams and the HTTP API run beside it.

Batching (UDP GSO, Linux 4.18+, ``udp(7)`` ``UDP_SEGMENT``): consecutive data frames of one kind (carousel
frames on the carousel socket, repair frames on the repair socket) leave in one ``sendmsg`` whose iovec is
``[header0, payload0, header1, payload1, ...]`` with a ``UDP_SEGMENT`` control message of the datagram size:
the kernel cuts the buffer into ordinary datagrams, one per frame, each with its own IP and UDP headers.
Receivers see exactly what one ``sendmsg`` per frame would have sent (a receiver that enables ``UDP_GRO``
may get them coalesced again, which it asked for). Every segment but the last has the same size, so a batch
holds full frames only, plus at most one short frame (the image's last) at its end. Metadata frames always
leave alone. A batch is paced as a whole: it takes its bytes plus 28 per datagram from the token bucket
at once, and is never larger than half the bucket (`batch_limit`), so pacing keeps its guarantees. A
kernel or route that refuses GSO (``ENOPROTOOPT`` when the socket is set up; ``EIO``/``EINVAL``/... on a
send, e.g. a frame larger than the interface MTU) turns it off for the stream, with one log line, and the
sender goes on one datagram per ``sendmsg``. ``SenderConfig.gso=False`` (``vmcast serve --no-gso``) never
tries.

Error handling: ``ENOBUFS``/``EAGAIN`` (the interface queue is full) mean "later": the sender waits a
millisecond and sends the same datagram again. Any other send error (interface down, route gone) is counted,
logged (not more than every `ERROR_LOG_INTERVAL`) and retried every `RETRY_AFTER_ERROR`, so a sender rides out
a network outage. Only a bug ends the thread early; the stream then shows state ``failed`` and the error.

Repairs (docs/PROTOCOL.md section 7): the repair listener hands decoded requests over through `submit_repair`,
a bounded `collections.deque` the thread drains before each send (an empty deque costs one truth test per
datagram). The `Carousel` merges them and interleaves repair frames one for one with carousel frames; repair
frames leave from a second socket, so their UDP source port differs from the carousel's and metadata's, and
both sockets are paced by the one token bucket: repairs never raise the stream above its rate.

Resource handling: the file, its map and the sockets are opened by the constructor (so a vanished file is an
error to the request that starts the stream, not a dead thread) and closed by the thread when it ends.
`stop()` returns within about `STOP_CHECK_INTERVAL`: every wait is cut in slices that long.
"""

from __future__ import annotations

import collections
import enum
import errno
import ipaddress
import logging
import mmap
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vmcast.protocol import HEADER_SIZE, Carousel, Idle, Manifest, RepairRequest, SendData, SendMetadata

from .errors import ConfigurationError, ImageChanged
from .files import FileIdentity
from .pacing import TokenBucket
from .settings import IP_UDP_HEADER_SIZE

log = logging.getLogger(__name__)

# A large send buffer lets the kernel keep the interface busy while this thread is descheduled: 4 MiB is
# 33 ms at 1 Gbit/s. Linux caps it at net.core.wmem_max.
SEND_BUFFER = 4 << 20
# A blocking send never holds the thread longer than this (SO_SNDTIMEO), so a stop request is seen in time.
SEND_TIMEOUT = 0.05
# The longest the thread goes without looking at its stop flag.
STOP_CHECK_INTERVAL = 0.05
# ENOBUFS/EAGAIN: the queue is full and drains within about a millisecond at any real link speed.
RETRY_AFTER_FULL_QUEUE = 0.001
# Other send errors (interface down, no route): keep trying, but gently.
RETRY_AFTER_ERROR = 0.5
ERROR_LOG_INTERVAL = 10.0
# measured_bps is the rate over the last second or so, from a sample taken every MEASURE_EVERY seconds.
MEASURE_EVERY = 0.25
MEASURE_WINDOW = 1.0

# UDP GSO (udp(7)): the socket option and control message that name the segment size. Python's socket
# module does not name it; the value is Linux's (include/uapi/linux/udp.h).
UDP_SEGMENT = 103
# The kernel refuses a GSO send of more than 64 segments (UDP_MAX_SEGMENTS) or of more bytes than one IP
# datagram holds (65,507 of UDP payload); 65,000 keeps clear of that with room for IP options. So a batch is
# as large as one send may be: 45 frames of 1,400 bytes, 7 of 8,192. Smaller would cost CPU: sender CPU per
# 1,416-byte datagram on loopback was 8.5 us one per send, 7.0 in batches of 2, 3.6-4.3 of 8, 3.1-3.8 of 16,
# 2.7-3.1 of 32 to 45; per 8,208-byte datagram 9.1 us alone, 4.5 in batches of 7. Larger bursts cost
# nothing: 65 KB is 0.5 ms at 1 Gbit/s, far under the 4 ms burst the pacer allows anyway, and when paced
# a batch is also held to half the token bucket (`batch_limit`).
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65_000
# Send errors that mean "this kernel, interface or route does not do UDP GSO": fall back to one datagram per
# sendmsg for good. EINVAL also comes when a segment is larger than the route's MTU, which GSO does not
# fragment; EIO when the device cannot checksum it.
_GSO_REFUSED = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.ENOTSUP})

# Repair requests waiting for the sender thread. It drains them before every datagram, so the backlog only
# grows while the thread is stalled; past this many, requests are dropped (and counted): their receivers ask
# again after a second (REREQUEST_AFTER), and the carousel brings every frame anyway.
REPAIR_BACKLOG = 1024

_QUEUE_FULL = frozenset({errno.ENOBUFS, errno.EAGAIN, errno.EWOULDBLOCK})


@dataclass(frozen=True, slots=True, kw_only=True)
class SenderConfig:
    """How every stream of a server sends."""

    interface: str
    """IPv4 address of this machine, or an interface name, that multicast leaves by (IP_MULTICAST_IF)."""
    ttl: int
    """IP_MULTICAST_TTL: how many routers a datagram may cross (1: this network segment only)."""
    rate_bps: int
    """Bits per second on the wire, IP and UDP headers included; 0 for unpaced."""
    gso: bool = True
    """Batch data frames into one UDP GSO send when the kernel supports it (falls back by itself if not)."""


class SenderState(enum.Enum):
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class SenderStats:
    """A sender's counters at one moment."""

    state: SenderState
    loops_completed: int
    """Times the whole image was sent."""
    datagrams_sent: int
    """Data and metadata datagrams."""
    bytes_sent: int
    """UDP payload bytes (frame headers included; IP and UDP headers not)."""
    measured_bps: float
    """Bits per second over about the last second, IP and UDP headers included (comparable to the rate)."""
    send_errors: int
    """Sends that failed with something other than a full queue."""
    queue_full: int
    """Sends retried because the interface queue was full (ENOBUFS/EAGAIN)."""
    last_error: str | None
    """The most recent send error or failure, if any."""
    repair_requests: int
    """Repair requests accepted for this stream and merged into its work list."""
    repair_frames_sent: int
    """Data frames sent from the repair socket because a receiver asked for them."""
    repair_pending: int
    """Frames asked for and not sent yet."""
    repair_drops: int
    """Repair requests for this stream that were dropped (malformed, frames outside the image, backlog full)."""
    gso: bool
    """Data frames leave in UDP GSO batches (False: asked not to, refused by the kernel, or batches of one)."""
    carousel_port: int
    """Source port of the carousel's datagrams (repair frames come from another; docs/PROTOCOL.md section 7)."""


def multicast_interface_option(interface: str) -> bytes:
    """The IP_MULTICAST_IF option value for an IPv4 address (struct in_addr) or an interface name (ip_mreqn)."""
    try:
        return ipaddress.IPv4Address(interface).packed
    except ValueError:
        pass
    try:
        index = socket.if_nametoindex(interface)
    except OSError:
        raise ConfigurationError(
            setting="--interface",
            problem=f"{interface!r} is neither an IPv4 address nor a network interface of this machine",
        ) from None
    return struct.pack("=4s4si", bytes(4), bytes(4), index)


def open_multicast_socket(config: SenderConfig) -> socket.socket:
    """A UDP socket that sends multicast by `config.interface` with `config.ttl`, looped back to this machine.

    Error handling: `ConfigurationError` if the interface is not one of this machine's.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, multicast_interface_option(config.interface))
        except OSError as error:
            raise ConfigurationError(
                setting="--interface",
                problem=f"cannot send multicast by {config.interface}: {error.strerror} (is it an address of this machine?)",
            ) from None
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, config.ttl)
        # Loop back to this machine, so receivers here (and the tests) hear the stream.
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        seconds, fraction = divmod(SEND_TIMEOUT, 1)
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(seconds), int(fraction * 1_000_000))
        )
    except BaseException:
        sock.close()
        raise
    return sock


def gso_supported(sock: socket.socket) -> bool:
    """Whether this kernel offers UDP GSO on `sock` (Linux 4.18+). Sends nothing: setting a segment size of 0
    (no segmentation) is refused with ``ENOPROTOOPT`` exactly where the option does not exist."""
    try:
        sock.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, 0)
    except OSError:
        return False
    return True


def batch_limit(*, datagram_size: int, bucket: TokenBucket | None) -> int:
    """How many data frames of `datagram_size` bytes (frame header included) one GSO send may carry.

    At most `GSO_MAX_SEGMENTS` and `GSO_MAX_BYTES`; when paced, at most half the bucket's capacity in wire
    bytes, so that a dry bucket (which waits until it is half full again) admits a whole batch each time it
    wakes, and the burst the bucket bounds is unchanged. 1 means: no batching.
    """
    limit = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // datagram_size)
    if bucket is not None:
        limit = min(limit, int(bucket.capacity / 2) // (datagram_size + IP_UDP_HEADER_SIZE))
    return max(1, limit)


def check_interface(interface: str) -> None:
    """Fail now, with a clear message, if multicast cannot be sent by `interface`."""
    open_multicast_socket(SenderConfig(interface=interface, ttl=1, rate_bps=0)).close()


class Sender:
    """Sends one image to one group and port forever, until stopped.

    Counters are plain attributes written by the sender thread only and read by anyone (`stats()`).
    """

    def __init__(
        self,
        *,
        path: Path,
        manifest: Manifest,
        cookie: bytes,
        group: ipaddress.IPv4Address,
        port: int,
        config: SenderConfig,
        expected: FileIdentity | None = None,
    ) -> None:
        """Open everything the thread needs; `start()` starts it.

        Error handling: `ImageChanged` if the file is not the one the manifest describes (its size differs,
        or it no longer has the `expected` identity); `OSError` if it cannot be opened.
        """
        self.group, self.port, self.config = group, port, config
        self._carousel = Carousel(manifest=manifest, cookie=cookie)
        self._largest_cost = (
            max([manifest.layout.frame_size + HEADER_SIZE, *map(len, self._carousel.metadata_datagrams)])
            + IP_UDP_HEADER_SIZE
        )
        self._file = open(path, "rb")  # noqa: SIM115 - closed by the thread when it ends
        self._map: mmap.mmap | None = None
        self._socket: socket.socket | None = None
        self._repair_socket: socket.socket | None = None
        try:
            stat = os.fstat(self._file.fileno())
            if stat.st_size != manifest.layout.length or (expected is not None and not expected.same_content_as(stat)):
                raise ImageChanged(path=path)
            if manifest.layout.length:
                self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._view = memoryview(self._map) if self._map is not None else memoryview(b"")
            self._socket = open_multicast_socket(config)
            self._socket.connect((str(group), port))
            # Connecting binds each socket to its own ephemeral port: repair frames come from another source
            # port than the carousel's (docs/PROTOCOL.md section 7).
            self._repair_socket = open_multicast_socket(config)
            self._repair_socket.connect((str(group), port))
            self.carousel_port: int = self._socket.getsockname()[1]
            """The carousel's source port: the start answer names it, so that a receiver follows the carousel's
            position from its first datagram instead of from the first metadata frame (up to a second later)."""
        except BaseException:
            self._close()
            raise
        self._datagram_size = HEADER_SIZE + manifest.layout.frame_size
        self._gso_control = [(socket.IPPROTO_UDP, UDP_SEGMENT, struct.pack("=H", self._datagram_size))]
        self.gso = config.gso and gso_supported(self._socket) and gso_supported(self._repair_socket)
        """True while data frames go out in GSO batches; turned off for good when the kernel refuses one."""
        if config.gso and not self.gso:
            log.info("stream to %s:%s: this kernel has no UDP GSO; one datagram per send", group, port)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"vmcast-sender-{group}:{port}", daemon=True)
        self._state_lock = threading.Lock()
        self.state = SenderState.RUNNING
        self.loops_completed = 0
        self.datagrams_sent = 0
        self.bytes_sent = 0
        self.wire_bytes = 0
        self.send_errors = 0
        self.queue_full = 0
        self.last_error: str | None = None
        self.repair_frames_sent = 0
        self.repair_drops = 0  # written by the repair listener thread only
        self._repair_inbox: collections.deque[RepairRequest] = collections.deque()
        self._samples: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=int(MEASURE_WINDOW / MEASURE_EVERY) + 2
        )
        self._next_sample = 0.0
        self._last_error_logged = -ERROR_LOG_INTERVAL

    # -- control (any thread) ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> bool:
        """Ask the thread to end and wait up to `timeout` seconds; True if it has ended."""
        with self._state_lock:
            if self.state is SenderState.RUNNING:
                self.state = SenderState.STOPPING
            self._stop.set()
            if self._thread.ident is None:  # never started
                self._close()
                self.state = SenderState.STOPPED
                return True
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def frame_count(self) -> int:
        """Frames of the image: repair requests name frames below it (the listener checks)."""
        return self._carousel.layout.frame_count

    def submit_repair(self, request: RepairRequest) -> bool:
        """Hand a decoded repair request to the sender thread (from any one thread); False if dropped.

        A request to a stream that is stopping is dropped too: nobody will serve it.
        """
        if self.state is not SenderState.RUNNING or len(self._repair_inbox) >= REPAIR_BACKLOG:
            self.repair_drops += 1
            return False
        self._repair_inbox.append(request)
        return True

    def stats(self) -> SenderStats:
        repairs = self._carousel.repairs
        return SenderStats(
            state=self.state,
            loops_completed=self.loops_completed,
            datagrams_sent=self.datagrams_sent,
            bytes_sent=self.bytes_sent,
            measured_bps=self._measured_bps(),
            send_errors=self.send_errors,
            queue_full=self.queue_full,
            last_error=self.last_error,
            repair_requests=repairs.requests_received,
            repair_frames_sent=self.repair_frames_sent,
            repair_pending=repairs.pending,
            repair_drops=self.repair_drops,
            gso=self.gso,
            carousel_port=self.carousel_port,
        )

    def _measured_bps(self) -> float:
        if self.state is not SenderState.RUNNING:
            return 0.0
        now, wire_bytes = time.monotonic(), self.wire_bytes
        for sampled_at, sampled_bytes in list(self._samples):
            if now - sampled_at <= MEASURE_WINDOW + MEASURE_EVERY and now > sampled_at:
                return (wire_bytes - sampled_bytes) * 8 / (now - sampled_at)
        return 0.0

    # -- the thread --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as error:  # a bug: say so on the stream rather than die silently
            log.exception("sender for %s:%s failed", self.group, self.port)
            self.last_error = f"{type(error).__name__}: {error}"
            with self._state_lock:
                self.state = SenderState.FAILED
        finally:
            self._close()
            with self._state_lock:
                if self.state is not SenderState.FAILED:
                    self.state = SenderState.STOPPED

    def _loop(self) -> None:
        carousel, view, stop, inbox = self._carousel, self._view, self._stop, self._repair_inbox
        carousel_socket, repair_socket = self._socket, self._repair_socket
        rate = self.config.rate_bps
        bucket = TokenBucket(rate_bps=rate, largest_cost=self._largest_cost, now=time.monotonic()) if rate else None
        limit = batch_limit(datagram_size=self._datagram_size, bucket=bucket)
        if limit == 1:
            self.gso = False
        clock = time.monotonic
        pending: SendData | SendMetadata | Idle | None = None  # an action taken while filling a batch, sent next
        while not stop.is_set():
            while inbox:  # the whole per-datagram cost of serving repairs when none are asked for
                carousel.request_repair(inbox.popleft())
            if pending is None:
                action = carousel.next_send(clock())
            else:
                action, pending = pending, None
            kind = type(action)
            if kind is SendData:
                if self.gso:
                    sent, pending = self._send_batches(action, limit, bucket)
                    if not sent:
                        return
                else:
                    offset = action.offset
                    repair = action.repair
                    if not self._send(
                        [action.header, view[offset : offset + action.length]],
                        HEADER_SIZE + action.length,
                        bucket,
                        repair_socket if repair else carousel_socket,
                    ):
                        return
                    if repair:
                        self.repair_frames_sent += 1
            elif kind is Idle:
                # An empty image: metadata once per interval, nothing in between.
                if stop.wait(max(0.0, action.until - clock())):
                    return
            else:
                for datagram in action.datagrams:
                    if not self._send((datagram,), len(datagram), bucket, carousel_socket):
                        return
            self.loops_completed = carousel.loops_completed

    def _send_batches(
        self, first: SendData, limit: int, bucket: TokenBucket | None
    ) -> tuple[bool, SendData | SendMetadata | Idle | None]:
        """Take data frames from the carousel, starting with `first`, into a carousel batch and a repair batch,
        and send both (repairs first: they go ahead of the carousel). Returns whether no stop came meanwhile,
        and the action that ended the batches if the carousel gave one that does not belong in them.

        A batch ends when it holds `limit` frames or a short frame (the image's last, which must be a batch's
        last segment); both are sent then, so the 1:1 interleaving of repairs stays within one batch.
        """
        carousel, view, now = self._carousel, self._view, time.monotonic()
        full_length = self._datagram_size - HEADER_SIZE
        buffers_limit = 2 * limit  # a header and a payload per frame
        carousel_buffers: list[bytes | memoryview] = []
        repair_buffers: list[bytes | memoryview] = []
        carousel_size = repair_size = 0
        action: SendData | SendMetadata | Idle = first
        following: SendData | SendMetadata | Idle | None = None
        while True:
            offset, length = action.offset, action.length
            if action.repair:
                repair_buffers += (action.header, view[offset : offset + length])
                repair_size += HEADER_SIZE + length
                if len(repair_buffers) == buffers_limit:
                    break
            else:
                carousel_buffers += (action.header, view[offset : offset + length])
                carousel_size += HEADER_SIZE + length
                if len(carousel_buffers) == buffers_limit:
                    break
            if length != full_length:
                break
            action = carousel.next_send(now)
            if type(action) is not SendData:
                following = action
                break
        if repair_buffers:
            frames = len(repair_buffers) // 2
            if not self._send(repair_buffers, repair_size, bucket, self._repair_socket, segments=frames):
                return False, None
            self.repair_frames_sent += frames
        if carousel_buffers and not self._send(
            carousel_buffers, carousel_size, bucket, self._socket, segments=len(carousel_buffers) // 2
        ):
            return False, None
        return True, following

    def _send(
        self,
        buffers: list[bytes | memoryview] | tuple[bytes, ...],
        size: int,
        bucket: TokenBucket | None,
        sock: socket.socket | None,
        *,
        segments: int = 1,
    ) -> bool:
        """Send `segments` datagrams of `size` bytes in all by `sock`, paced; False if a stop was requested
        meanwhile. More than one segment: `buffers` is ``[header, payload, ...]`` per datagram, sent as one
        GSO batch (or one by one if the kernel refuses it)."""
        stop, cost = self._stop, size + IP_UDP_HEADER_SIZE * segments
        if bucket is not None:
            while (delay := bucket.take(cost, time.monotonic())) > 0.0:
                if stop.wait(min(delay, STOP_CHECK_INTERVAL)):
                    return False
        assert sock is not None
        if segments > 1 and not self.gso:  # refused a moment ago, by the other socket's batch
            return self._send_one_by_one(buffers, sock)
        control = self._gso_control if segments > 1 else ()
        while True:
            try:
                sock.sendmsg(buffers, control)
                break
            except OSError as error:
                if segments > 1 and error.errno in _GSO_REFUSED:
                    self.gso = False
                    log.warning(
                        "stream to %s:%s: UDP GSO refused (%s); sending one datagram per send from now on",
                        self.group, self.port, error.strerror or error,
                    )  # fmt: skip
                    return self._send_one_by_one(buffers, sock)
                if error.errno in _QUEUE_FULL:
                    self.queue_full += 1
                    pause = RETRY_AFTER_FULL_QUEUE
                else:
                    self._send_failed(error)
                    pause = RETRY_AFTER_ERROR
                if stop.wait(pause):
                    return False
        self.datagrams_sent += segments
        self.bytes_sent += size
        self.wire_bytes += cost
        now = time.monotonic()
        if now >= self._next_sample:
            self._samples.append((now, self.wire_bytes))
            self._next_sample = now + MEASURE_EVERY
        return True

    def _send_one_by_one(self, buffers: list[bytes | memoryview], sock: socket.socket) -> bool:
        """Send a batch's datagrams one per `sendmsg` (the batch is paced as a whole already)."""
        for index in range(0, len(buffers), 2):
            header, payload = buffers[index], buffers[index + 1]
            if not self._send([header, payload], len(header) + len(payload), None, sock):
                return False
        return True

    def _send_failed(self, error: OSError) -> None:
        self.send_errors += 1
        self.last_error = f"send to {self.group}:{self.port} failed: {error.strerror or error}"
        now = time.monotonic()
        if now - self._last_error_logged >= ERROR_LOG_INTERVAL:
            self._last_error_logged = now
            log.warning(
                "%s (%d errors so far; retrying every %g s)", self.last_error, self.send_errors, RETRY_AFTER_ERROR
            )

    def _close(self) -> None:
        view = getattr(self, "_view", None)
        if view is not None:
            view.release()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a slice still referenced somewhere: the garbage collector will unmap it
                log.debug("mmap of %s:%s still exported at close", self.group, self.port)
        self._file.close()
        for sock in (self._socket, self._repair_socket):
            if sock is not None:
                sock.close()
