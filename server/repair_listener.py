"""The repair listener: receives receivers' repair requests (NACKs) by UDP and hands them to the streams' senders.

docs/PROTOCOL.md section 7. One blocking OS thread for the whole server, on one UDP socket bound to the API's
host and the repair port. Per datagram: find the running stream by the cookie (the first 8 bytes, a dict
lookup), decode the request against that stream's frame count, and for a stream with FEC its block count
(`decode_repair_request`: JSON parsing and validation happen here, not in the sender thread; a request names
lost frames and, for parity, how many symbols of which blocks), and hand the request to the sender
(`Sender.submit_repair`, a deque append). The sender merges it into its carousel's work list.

Error handling: UDP is unauthenticated and anyone may send anything: every datagram that is not a valid
request for a running stream is a counted drop with a reason (`drops`; the stream's own `repair_drops` too
when the cookie is one of ours), never an exception. A receive error other than a timeout is logged (at most
every `ERROR_LOG_INTERVAL`) and the thread goes on.

Resource handling: the socket is bound by `bind_repair_socket` (so a taken port is the caller's error at
start) and owned by the listener from then on; `stop()` ends the thread within `STOP_CHECK_INTERVAL` and
closes the socket.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from collections.abc import Callable

from vmcast.protocol import COOKIE_SIZE, HEADER_SIZE, Dropped, DropReason, decode_repair_request
from vmcast.protocol.metadata import METADATA_PAYLOAD_LIMIT

from .errors import ConfigurationError
from .sender import Sender

log = logging.getLogger(__name__)

# The receive call returns at least this often, so a stop request is seen in time.
STOP_CHECK_INTERVAL = 0.2
# A request is a 16-byte header and at most METADATA_PAYLOAD_LIMIT bytes of JSON (PROTOCOL.md section 7):
# anything longer is not a request, and is not parsed. The buffer holds the largest UDP datagram, so the
# real length of an oversized one is known and it is counted as too long, not parsed truncated.
LARGEST_REQUEST = HEADER_SIZE + METADATA_PAYLOAD_LIMIT
_BUFFER_SIZE = 65536
# Many receivers may ask at the same moment after a shared loss burst: a 4 MiB receive buffer holds about
# 3,000 maximal requests while the thread is descheduled (Linux caps it at net.core.rmem_max).
RECEIVE_BUFFER = 4 << 20
ERROR_LOG_INTERVAL = 10.0


class RepairDrop:
    """Reasons a repair datagram was dropped (metric label values; stable)."""

    TOO_SHORT = DropReason.TOO_SHORT.value
    """Fewer than the 16 header bytes."""
    TOO_LONG = "too_long"
    """Longer than any request may be."""
    UNKNOWN_STREAM = "unknown_stream"
    """No running stream has that cookie (stopped, never ours, or garbage)."""
    MALFORMED = "malformed_request"
    """Not a repair request: wrong marker, not JSON, no frame list, or frames or parity blocks outside the image."""
    BACKLOG_FULL = "backlog_full"
    """The stream's sender has too many requests waiting, or is stopping."""

    ALL = (TOO_SHORT, TOO_LONG, UNKNOWN_STREAM, MALFORMED, BACKLOG_FULL)


def bind_repair_socket(host: str, port: int) -> socket.socket:
    """The listener's UDP socket on (`host`, `port`); 0 picks a free port.

    Error handling: `ConfigurationError` naming ``--repair-port`` when the port is taken or the host unusable.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise ConfigurationError(setting="--host", problem=f"cannot resolve {host!r}: {error.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.bind(address)
        sock.settimeout(STOP_CHECK_INTERVAL)
    except OSError as error:
        sock.close()
        if error.errno == 98:  # EADDRINUSE
            raise ConfigurationError(
                setting="--repair-port",
                problem=f"UDP port {port} on {host} is already in use (another vmcast serve?); choose another with --repair-port",
            ) from None
        raise ConfigurationError(
            setting="--repair-port", problem=f"cannot listen on UDP {host}:{port}: {error.strerror or error}"
        ) from None
    return sock


class RepairListener:
    """Receives repair requests on `sock` and gives each to the sender `lookup(cookie)` returns.

    Counters are written by the listener thread only and read by anyone.
    """

    def __init__(self, *, sock: socket.socket, lookup: Callable[[bytes], Sender | None]) -> None:
        self._socket = sock
        self._lookup = lookup
        self.port: int = sock.getsockname()[1]
        self.datagrams = 0
        """Datagrams received."""
        self.accepted = 0
        """Requests handed to a stream's sender."""
        self.drops: collections.Counter[str] = collections.Counter({reason: 0 for reason in RepairDrop.ALL})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"vmcast-repair-listener:{self.port}", daemon=True)
        self._last_error_logged = -ERROR_LOG_INTERVAL

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> bool:
        """End the thread (waiting up to `timeout`) and close the socket; True if it has ended."""
        self._stop.set()
        if self._thread.ident is None:
            self._socket.close()
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._socket.close()

    def _loop(self) -> None:
        sock, stop, lookup, drops = self._socket, self._stop, self._lookup, self.drops
        buffer = bytearray(_BUFFER_SIZE)
        view = memoryview(buffer)
        while not stop.is_set():
            try:
                size = sock.recv_into(buffer)
            except TimeoutError:
                continue
            except OSError as error:
                self._receive_failed(error)
                continue
            self.datagrams += 1
            if size < HEADER_SIZE:
                drops[RepairDrop.TOO_SHORT] += 1
                continue
            if size > LARGEST_REQUEST:
                drops[RepairDrop.TOO_LONG] += 1
                continue
            cookie = bytes(view[:COOKIE_SIZE])
            sender = lookup(cookie)
            if sender is None:
                drops[RepairDrop.UNKNOWN_STREAM] += 1
                continue
            request = decode_repair_request(
                view[:size], cookie=cookie, frame_count=sender.frame_count, block_count=sender.block_count
            )
            if isinstance(request, Dropped):
                drops[RepairDrop.MALFORMED] += 1
                sender.repair_drops += 1
                continue
            if sender.submit_repair(request):
                self.accepted += 1
            else:
                drops[RepairDrop.BACKLOG_FULL] += 1

    def _receive_failed(self, error: OSError) -> None:
        now = time.monotonic()
        if now - self._last_error_logged >= ERROR_LOG_INTERVAL:
            self._last_error_logged = now
            log.warning("repair listener on UDP port %d: receive failed: %s", self.port, error.strerror or error)
        if self._stop.wait(0.01):  # an error that repeats at once must not spin the thread
            return
