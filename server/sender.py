"""The paced multicast sender: one OS thread per stream, looping over an image as `Carousel` schedules it.

The image is `mmap`-ed and each data frame leaves with ``sendmsg([header, view])``, the payload a `memoryview`
slice of the map: the kernel copies the bytes straight from the page cache into the datagram, and Python never
copies them. The kernel is asked to read the image `READ_AHEAD` ahead of the carousel, so that a page not in
memory is read before its turn rather than while the pacing waits. A thread (not an event-loop task) because
the loop is a tight sequence of blocking system calls; `sendmsg` releases the GIL, so streams and the HTTP API
run beside it.

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

Parity (FEC, docs/PROTOCOL.md section 8; when the manifest allows it and ``SenderConfig.fec``): a request may
ask for a number of RaptorQ parity symbols of a block instead of frames; the carousel then answers
`SendParity`. The symbols are made by `parity.ParitySource` in the server's parity worker processes (an
encoder costs 2.6-6 ms per block and holds the GIL throughout: made in this process, they cut the rate from
300 to 260 Mbit/s at 5% loss), started as soon as the request arrives; a `SendParity` whose symbol is not
made yet is kept (in order) and sent as soon as it is, while carousel frames go on. Parity frames are repair
frames: they leave from the repair socket, in the repair batch beside requested data frames. A symbol is
always a full frame's size, so GSO's rule (equal segments, only the last may be shorter) still holds: the one
short datagram, the image's last data frame, still ends its batch.

Holding for receivers (``min_receivers`` of a stream start, like udp-sender's ``--min-receivers``): a sender
started with `start(hold=...)` sends only metadata, every `METADATA_INTERVAL`, until `open_gate` (the
registry calls it when enough receivers have joined the group) or the hold's deadline, and then starts the
first loop at frame 0. Receivers that were all there at the start need exactly one loop; without the hold the
stream starts with the first receiver and every later one needs part of a second loop (four receivers
started together on the test bed join 1.3-1.5 s apart: 7 % more datagrams than frames). Waiting receivers
get the metadata meanwhile, so they know the image and see the stream alive.

Resource handling: the file, its map and the sockets are opened by the constructor (so a vanished file is an
error to the request that starts the stream, not a dead thread) and closed by the thread when it ends.
`stop()` returns within about `STOP_CHECK_INTERVAL`: every wait is cut in slices that long.
"""

from __future__ import annotations

import collections
import dataclasses
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

from vmcast.protocol import HEADER_SIZE, Carousel, Idle, Manifest, RepairRequest, SendData, SendMetadata, SendParity

from .errors import ConfigurationError, ImageChanged
from .files import FileIdentity
from .pacing import TokenBucket
from .parity import ParitySource, ParityWorkers
from .settings import IP_UDP_HEADER_SIZE

log = logging.getLogger(__name__)

# A large send buffer lets the kernel keep the interface busy while this thread is descheduled: 4 MiB is
# 33 ms at 1 Gbit/s. Linux caps it at net.core.wmem_max.
SEND_BUFFER = 4 << 20
# A blocking send never holds the thread longer than this (SO_SNDTIMEO), so a stop request is seen in time.
SEND_TIMEOUT = 0.05
# The image is read this far ahead of the carousel (madvise MADV_WILLNEED, asked again each half of it): the
# kernel reads it in the background, so that a page not in memory never stalls this thread in the middle of
# its pacing (a fault on a mapped page waits for the disk). Why: on the test bed, where pages idle for a minute
# are reclaimed, the sender lost 4-9 s of pacing in a 30 s run at 0% loss, and the run as much. 64 MiB is
# 0.1 s at 5 Gbit/s, 1.8 s at 300 Mbit/s; a disk slower than the stream still makes the pacing wait.
READ_AHEAD = 64 << 20
# ...asked for this much at a time: Linux reads at most the device's read-ahead size (read_ahead_kb, or its
# largest request) per call and ignores the rest, 8 MiB on the test bed, 128 KiB by default.
READ_AHEAD_CHUNK = 128 << 10
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
# nothing: 65 KB is 0.5 ms at 1 Gbit/s, far under the burst the pacer allows anyway, and when paced
# a batch is also held to what the bucket refills per wake-up (`batch_limit`).
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65_000
# Send errors that mean "this kernel, interface or route does not do UDP GSO": fall back to one datagram per
# sendmsg for good. EINVAL also comes when a segment is larger than the route's MTU, which GSO does not
# fragment; EIO when the device cannot checksum it.
_GSO_REFUSED = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.ENOTSUP})

# Parity actions kept until their symbols are made (`parity.ParitySource`): a header each. Past this many the
# worker is far behind (at 1 Gbit/s one encoder's 4 ms is ~170 parity actions); the thread then waits for it.
MAX_DEFERRED_PARITY = 4096

# While receivers ask for parity (a request came within this many seconds), the workers make each block's
# parity as soon as the carousel has passed it, before any receiver asks: their requests come 0.1-0.3 s later
# (reorder margin, poll interval), and a symbol not made by then is late, and asked for again after
# `REREQUEST_AFTER` (measured on the test bed at 1% loss: p90 163 ms, p99 416 ms from request to symbol
# without this). A block is asked for whenever any receiver lost any of its ~750 frames: at the loss rates
# where parity is asked at all, nearly every block, so little is made for nothing.
SPECULATE_FOR = 1.0
# The symbols made ahead for a block: what requests asked per block lately (an average with this weight for
# each new request), plus `parity.SYMBOLS_AHEAD`.
TYPICAL_COUNT_WEIGHT = 0.1

# A resting sender with parity actions kept for symbols not made yet looks for them this often.
PARITY_POLL = 0.002

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
    fec: bool = True
    """Announce RaptorQ parity and answer parity requests with it, for streams whose layout allows it (the
    manifest's `fec`); False: repairs are always the lost frames themselves."""


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
    fec: bool
    """The stream announces FEC (``"fec": "raptorq"``) and answers parity requests with parity frames."""
    parity_frames_sent: int
    """Parity frames sent from the repair socket (not counted in `repair_frames_sent`)."""
    parity_jobs: int
    """Parity jobs the workers did for the stream: one when a block's parity is first asked for, and one each
    time its symbols made ahead ran out."""
    parity_cpu_seconds: float
    """CPU time the server's parity worker processes spent on this stream's parity (encoders and symbols)."""
    parity_deferred: int
    """Parity frames whose turn came before the workers had made their symbols: kept and sent when made."""
    pacing_missed_seconds: float
    """Sending time lost at the rate: the sender woke later than its pacing could make up (a busy machine),
    or had nothing to send. 0 for an unpaced sender."""
    gso: bool
    """Data frames leave in UDP GSO batches (False: asked not to, refused by the kernel, or batches of one)."""
    carousel_port: int
    """Source port of the carousel's datagrams (repair frames come from another; docs/PROTOCOL.md section 7)."""
    holding: bool = False
    """The sender holds for receivers: only metadata is sent until enough have joined (`Sender.start`)."""
    resting: bool = False
    """The carousel rests: every receiver heard a whole loop; only the repairs asked for are sent, until a new
    receiver comes (docs/PROTOCOL.md section 7)."""
    rests: int = 0
    """Times the carousel came to rest."""


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

    At most `GSO_MAX_SEGMENTS` and `GSO_MAX_BYTES`; when paced, at most what the bucket refills per wake-up
    (`TokenBucket.wake_bytes`) in wire bytes, so that a dry bucket admits a whole batch each time it wakes.
    1 means: no batching.
    """
    limit = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // datagram_size)
    if bucket is not None:
        limit = min(limit, int(bucket.wake_bytes) // (datagram_size + IP_UDP_HEADER_SIZE))
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
        parity_workers: ParityWorkers | None = None,
    ) -> None:
        """Open everything the thread needs; `start()` starts it. `parity_workers`: the server's (shared by its
        streams); None: the sender starts its own when first asked for parity, and ends them when it ends.

        Error handling: `ImageChanged` if the file is not the one the manifest describes (its size differs,
        or it no longer has the `expected` identity); `OSError` if it cannot be opened.
        """
        self.group, self.port, self.config = group, port, config
        if manifest.fec and not config.fec:
            manifest = dataclasses.replace(manifest, fec=False)  # not announced, so never asked for
        self.fec: bool = bool(manifest.fec)
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
            self._own_workers = ParityWorkers() if parity_workers is None else None
            self._parity = ParitySource(
                view=self._view, layout=manifest.layout, workers=parity_workers or self._own_workers,
                key=cookie + bytes.fromhex(manifest.sha1), path=f"/proc/{os.getpid()}/fd/{self._file.fileno()}",
            )  # fmt: skip
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
        self._wake = threading.Event()
        """Set when a resting (or idle) thread has work: a repair request, a new receiver, a stop."""
        self._gate = threading.Event()
        """Set: the carousel runs. Cleared by `start(hold=...)` until `open_gate` or the hold's deadline."""
        self._gate.set()
        self._hold_seconds = 0.0
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
        self.parity_frames_sent = 0
        self.parity_deferred = 0
        """Parity actions whose symbol was not made yet when the carousel gave them (sent a little later)."""
        self._deferred: dict[int, collections.deque[SendParity]] = {}
        """Per block, parity actions kept (in order) until the block's symbols are made."""
        self._deferred_count = 0
        self._bucket: TokenBucket | None = None  # the thread's, once it runs
        self._parity_asked_at = -SPECULATE_FOR  # when the last parity request came (thread clock)
        self._typical_count = 0.0  # symbols a parity request asks per block, lately (TYPICAL_COUNT_WEIGHT)
        self._carousel_block = -1  # the block the carousel was sending at the last look
        self._batch_offset = 0  # offset of the last carousel frame of the last batch
        self._read_ahead_from = self._read_ahead_to = 0  # the image range asked to be read ahead (`_read_ahead`)
        self.read_ahead_requests = 0
        self.repair_drops = 0  # written by the repair listener thread only
        self._repair_inbox: collections.deque[RepairRequest] = collections.deque()
        self._samples: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=int(MEASURE_WINDOW / MEASURE_EVERY) + 2
        )
        self._next_sample = 0.0
        self._last_error_logged = -ERROR_LOG_INTERVAL

    # -- control (any thread) ----------------------------------------------------------------------------------

    def start(self, *, hold: float | None = None) -> None:
        """Start the thread; with `hold`, send only metadata until `open_gate` or for `hold` seconds at most."""
        if self.fec:
            self._parity.warm_up()  # the parity workers start now, not at the first request (a busy moment)
        if hold is not None:
            self._hold_seconds = hold
            self._gate.clear()
        self._thread.start()

    def open_gate(self) -> None:
        """Start the first loop now, if the sender is holding (any thread; idempotent)."""
        self._gate.set()

    @property
    def holding(self) -> bool:
        """True while the sender holds for receivers, sending only metadata."""
        return not self._gate.is_set()

    def stop(self, timeout: float = 1.0) -> bool:
        """Ask the thread to end and wait up to `timeout` seconds; True if it has ended."""
        with self._state_lock:
            if self.state is SenderState.RUNNING:
                self.state = SenderState.STOPPING
            self._stop.set()
            self._wake.set()
            self._gate.set()  # a holding thread wakes at once
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

    @property
    def block_count(self) -> int | None:
        """Blocks of the image, which parity requests name (the listener checks); None without FEC: the
        parity entries of a request are then ignored (docs/PROTOCOL.md section 8)."""
        return self._carousel.layout.block_count if self.fec else None

    def submit_repair(self, request: RepairRequest) -> bool:
        """Hand a decoded repair request to the sender thread (from any one thread); False if dropped.

        A request to a stream that is stopping is dropped too: nobody will serve it.
        """
        if self.state is not SenderState.RUNNING or len(self._repair_inbox) >= REPAIR_BACKLOG:
            self.repair_drops += 1
            return False
        self._repair_inbox.append(request)
        self._wake.set()
        return True

    def listening_since(self, since: float | None) -> None:
        """When the last of the stream's receivers began listening (`time.monotonic()`), or None when one has
        not yet (or the caller cannot know): after a loop that started later the carousel rests, and a
        receiver that comes (None, or a later time) ends the rest (`Carousel.listening_since`). Any thread."""
        self._carousel.listening_since = since
        self._wake.set()

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
            fec=self.fec,
            parity_frames_sent=self.parity_frames_sent,
            parity_jobs=self._parity.jobs,
            parity_cpu_seconds=self._parity.cpu_seconds,
            parity_deferred=self.parity_deferred,
            pacing_missed_seconds=self._bucket.missed / self._bucket.rate if self._bucket is not None else 0.0,
            gso=self.gso,
            carousel_port=self.carousel_port,
            holding=self.holding,
            resting=self._carousel.resting,
            rests=self._carousel.rests,
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
        if not self._gate.is_set() and not self._hold_for_receivers():
            return
        rate = self.config.rate_bps  # the bucket starts after the hold: no burst of what it saved meanwhile
        bucket = TokenBucket(rate_bps=rate, largest_cost=self._largest_cost, now=time.monotonic()) if rate else None
        self._bucket = bucket
        limit = batch_limit(datagram_size=self._datagram_size, bucket=bucket)
        if limit == 1:
            self.gso = False
        clock = time.monotonic
        pending: SendData | SendParity | SendMetadata | Idle | None = None  # taken while filling a batch, sent next
        parity, deferred, fec = self._parity, self._deferred, self.fec
        while not stop.is_set():
            while inbox:  # the whole per-datagram cost of serving repairs when none are asked for
                request = inbox.popleft()
                carousel.request_repair(request, clock())
                if fec and request.parity:
                    self._parity_asked(request.parity)
            if deferred and not self._send_deferred(parity.poll(), limit, bucket):
                return
            if pending is None:
                action = carousel.next_send(clock())
            else:
                action, pending = pending, None
            kind = type(action)
            if kind is SendData or kind is SendParity:
                if self.gso:
                    sent, pending = self._send_batches(action, limit, bucket)
                    if not sent:
                        return
                    if self._speculating(clock()):
                        self._carousel_at(self._batch_offset)
                elif kind is SendParity:
                    payload = self._parity_payload(action)
                    if payload is not None:
                        if not self._send([action.header, payload], HEADER_SIZE + len(payload), bucket, repair_socket):
                            return
                        self.parity_frames_sent += 1
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
                    elif self._speculating(clock()):
                        self._carousel_at(offset)
            elif kind is Idle:
                # An empty image between metadata rounds, or a resting carousel: nothing until `until`, unless
                # work comes first (`_wake`: a repair request, a new receiver, a stop). Kept parity is looked
                # for every `PARITY_POLL`: its worker does not wake this thread.
                timeout = max(0.0, action.until - clock())
                self._wake.wait(min(timeout, PARITY_POLL) if deferred else timeout)
                self._wake.clear()
                if stop.is_set():
                    return
                if bucket is not None:
                    bucket.idled(clock())
            else:
                for datagram in action.datagrams:
                    if not self._send((datagram,), len(datagram), bucket, carousel_socket):
                        return
            self.loops_completed = carousel.loops_completed

    def _parity_asked(self, entries: tuple[tuple[int, ...], ...]) -> None:
        """A request asked for parity: the workers start on it now, before the carousel's turn for it."""
        self._parity_asked_at = time.monotonic()
        typical, parity = self._typical_count, self._parity
        for entry in entries:
            block, count = entry[0], entry[1]  # then what the receiver has seen (the carousel's queue uses it)
            parity.prefetch(block, count)
            typical += TYPICAL_COUNT_WEIGHT * (count - typical)
        self._typical_count = typical

    def _speculating(self, now: float) -> bool:
        return now - self._parity_asked_at < SPECULATE_FOR

    def _carousel_at(self, offset: int) -> None:
        """The carousel just sent the frame at `offset`: when it moved on from a block, that block's parity
        is made now (see `SPECULATE_FOR`)."""
        block = offset // self._carousel.layout.block_size
        passed, self._carousel_block = self._carousel_block, block
        if block != passed and passed >= 0:
            self._parity.prefetch(passed, round(self._typical_count))

    def _parity_payload(self, action: SendParity) -> bytes | None:
        """The symbol `action` names; None when it is not made yet: the action is kept and sent later (after
        any kept before it, so a block's symbols leave in order)."""
        block = action.block
        kept = self._deferred.get(block)
        if kept is None:
            payload = self._parity.symbol(block, action.esi, still_needed=self._carousel.repairs.parity_need(block))
            if payload is not None:
                return payload
            kept = self._deferred[block] = collections.deque()
        kept.append(action)  # behind the block's others: its symbols leave in order
        self._deferred_count += 1
        self.parity_deferred += 1
        while self._deferred_count > MAX_DEFERRED_PARITY and not self._stop.is_set():
            # The workers are far behind: wait for them rather than keep more.
            self._parity.wait(STOP_CHECK_INTERVAL)
            if not self._send_deferred(self._parity.poll(), 1, self._bucket):
                break
        return None

    def _send_deferred(self, blocks: list[int], limit: int, bucket: TokenBucket | None) -> bool:
        """Send the kept parity actions of `blocks` (whose jobs just finished) whose symbols are made, in
        order, in GSO batches of up to `limit`; the rest stay kept. False if a stop came meanwhile."""
        deferred, parity, repairs = self._deferred, self._parity, self._carousel.repairs
        buffers: list[bytes] = []
        sent_blocks: list[int] = []
        for block in blocks:
            kept = deferred.get(block)
            taken = len(buffers)
            while kept:
                action = kept[0]
                payload = parity.symbol(block, action.esi, still_needed=repairs.parity_need(block))
                if payload is None:
                    break  # not made by that job (more was asked since): symbol() queued the next one
                kept.popleft()
                self._deferred_count -= 1
                buffers += (action.header, payload)
            if len(buffers) > taken:
                sent_blocks.append(block)
            if kept is not None and not kept:
                del deferred[block]
        step = 2 * limit if self.gso else 2
        for start in range(0, len(buffers), step):
            batch = buffers[start : start + step]
            segments = len(batch) // 2
            if not self._send(batch, segments * self._datagram_size, bucket, self._repair_socket, segments=segments):
                return False
            self.parity_frames_sent += segments
        now = time.monotonic()
        for block in sent_blocks:
            repairs.parity_left(block, now)  # in flight from now, not from when the carousel handed them out
        return True

    def _send_batches(
        self, first: SendData | SendParity, limit: int, bucket: TokenBucket | None
    ) -> tuple[bool, SendData | SendParity | SendMetadata | Idle | None]:
        """Take data and parity frames from the carousel, starting with `first`, into a carousel batch and a
        repair batch (requested data frames and parity frames), and send both (repairs first: they go ahead
        of the carousel). Returns whether no stop came meanwhile, and the action that ended the batches if the
        carousel gave one that does not belong in them.

        A batch ends when it holds `limit` frames or a short frame (the image's last, which must be a batch's
        last segment; parity symbols are always full-size); both are sent then, so the 1:1 interleaving of
        repairs stays within one batch.
        """
        carousel, view, now = self._carousel, self._view, time.monotonic()
        full_length = self._datagram_size - HEADER_SIZE
        buffers_limit = 2 * limit  # a header and a payload per frame
        carousel_buffers: list[bytes | memoryview] = []
        repair_buffers: list[bytes | memoryview] = []
        carousel_size = repair_size = parity_frames = 0
        action: SendData | SendParity | SendMetadata | Idle = first
        following: SendData | SendParity | SendMetadata | Idle | None = None
        while True:
            if type(action) is SendParity:
                payload = self._parity_payload(action)
                if payload is not None:
                    repair_buffers += (action.header, payload)
                    repair_size += self._datagram_size  # a symbol is exactly a full frame (ParitySource checks)
                    parity_frames += 1
                    if len(repair_buffers) == buffers_limit:
                        break
            else:
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
            kind = type(action)
            if kind is not SendData and kind is not SendParity:
                following = action
                break
        if repair_buffers:
            frames = len(repair_buffers) // 2
            if not self._send(repair_buffers, repair_size, bucket, self._repair_socket, segments=frames):
                return False, None
            self.repair_frames_sent += frames - parity_frames
            self.parity_frames_sent += parity_frames
        if carousel_buffers:
            if not self._send(carousel_buffers, carousel_size, bucket, self._socket, segments=len(carousel_buffers) // 2):
                return False, None
            self._batch_offset = position = int.from_bytes(carousel_buffers[-2][8:16], "big")  # the last carousel frame's
            if position + READ_AHEAD // 2 >= self._read_ahead_to or position < self._read_ahead_from:
                self._read_ahead(position)  # half of what was asked is behind (or the loop began again)
        return True, following

    def _read_ahead(self, position: int) -> None:
        """Ask the kernel to read `READ_AHEAD` bytes of the image from `position` on (past the end, the next
        loop's first ones), without waiting for them: what was not asked for already, in `READ_AHEAD_CHUNK`s."""
        length = len(self._map)
        start = position if position < self._read_ahead_from else max(position, self._read_ahead_to)
        end = position + READ_AHEAD
        self._read_ahead_from, self._read_ahead_to = position, end
        try:
            while start < end:  # [start, end) in loop-unrolled offsets: one span per loop it touches
                offset = start % length
                stop = offset + min(end - start, length - offset)
                for chunk in range(offset - offset % mmap.PAGESIZE, stop, READ_AHEAD_CHUNK):
                    self._map.madvise(mmap.MADV_WILLNEED, chunk, min(READ_AHEAD_CHUNK, stop - chunk))
                start += stop - offset
        except (OSError, ValueError):
            return  # a hint: pages not read ahead are read when sent, as without it
        self.read_ahead_requests += 1

    def _hold_for_receivers(self) -> bool:
        """Send metadata rounds, `METADATA_INTERVAL` apart, until the gate opens or the hold ends (then open it
        ourselves); False if a stop was asked for meanwhile. Unpaced: a round is a few datagrams a second."""
        deadline = time.monotonic() + self._hold_seconds
        while not self._gate.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.info("stream to %s:%s: held %g s for receivers; starting with those there", self.group, self.port, self._hold_seconds)
                self._gate.set()
                break
            for datagram in self._carousel.metadata_datagrams:
                if not self._send((datagram,), len(datagram), None, self._socket):
                    return False
            self._gate.wait(min(remaining, self._carousel.metadata_interval))
        return not self._stop.is_set()

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
            # Resting, repairs alone go at half the rate, as they do beside the carousel's frames (one for one):
            # a rest must not raise the receivers' load (parity to decode) above what the loop had them take.
            # (Never more than the bucket holds, or a very slow stream would wait forever.)
            charge = min(2 * cost, int(bucket.capacity)) if self._carousel.resting else cost
            while (delay := bucket.take(charge, time.monotonic())) > 0.0:
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
        parity = getattr(self, "_parity", None)
        if parity is not None:
            parity.close()
        workers = getattr(self, "_own_workers", None)
        if workers is not None:
            workers.close()
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
