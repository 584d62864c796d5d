"""The paced multicast sender: one OS thread per stream, looping over an image as `Carousel` schedules it.

The image is `mmap`-ed and each data frame leaves with ``sendmsg([header, view])``, the payload a
`memoryview` slice of the map: the kernel copies the bytes straight from the page cache into the datagram,
and Python never copies them. A thread (not an event-loop task) because the loop is a tight sequence of
blocking system calls; `sendmsg` releases the GIL, so streams and the HTTP API run beside it.

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

from vmcast.protocol import HEADER_SIZE, Carousel, Idle, Manifest, RepairRequest, SendData

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
        except BaseException:
            self._close()
            raise
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
        clock = time.monotonic
        while not stop.is_set():
            while inbox:  # the whole per-datagram cost of serving repairs when none are asked for
                carousel.request_repair(inbox.popleft())
            action = carousel.next_send(clock())
            kind = type(action)
            if kind is SendData:
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

    def _send(
        self,
        buffers: list[bytes | memoryview] | tuple[bytes, ...],
        size: int,
        bucket: TokenBucket | None,
        sock: socket.socket | None,
    ) -> bool:
        """Send one datagram of `size` bytes by `sock`, paced; False if a stop was requested meanwhile."""
        stop, cost = self._stop, size + IP_UDP_HEADER_SIZE
        if bucket is not None:
            while (delay := bucket.take(cost, time.monotonic())) > 0.0:
                if stop.wait(min(delay, STOP_CHECK_INTERVAL)):
                    return False
        assert sock is not None
        while True:
            try:
                sock.sendmsg(buffers)
                break
            except OSError as error:
                if error.errno in _QUEUE_FULL:
                    self.queue_full += 1
                    pause = RETRY_AFTER_FULL_QUEUE
                else:
                    self._send_failed(error)
                    pause = RETRY_AFTER_ERROR
                if stop.wait(pause):
                    return False
        self.datagrams_sent += 1
        self.bytes_sent += size
        self.wire_bytes += cost
        now = time.monotonic()
        if now >= self._next_sample:
            self._samples.append((now, self.wire_bytes))
            self._next_sample = now + MEASURE_EVERY
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
