"""Repair requests (docs/PROTOCOL.md section 7): follow the carousel, and ask the server for the frames we lost.

`Repairs` lives in the pump's thread (`vmcast.receiver.pump`): the pump tells it where the carousel is (data
frames that came from the source port of the stream's metadata frames; repair frames come from another
port and say nothing about the carousel's position) and calls `poll` a few times a second; `poll` asks the
`RepairPlanner` whether to ask, and if so sends one request datagram to the server's repair address.

The pump observes only a sample of the carousel's frames: the planner needs the carousel's position, not every
frame. With UDP GRO (the default) it observes the last carousel frame of every receive, whose source address
``recvmsg`` returns anyway: up to 64 frames apart (a coalesced buffer), never stale. Without GRO it observes
one datagram in `OBSERVE_EVERY`: knowing a datagram's source port costs ``recvfrom_into`` instead of
``recv_into`` (measured: +0.47 µs per datagram, a tenth of the pump's whole cost). Either way a sample lags the
position by at most 64 frames, the planner's reorder margin, so it only makes the planner wait a few frames
longer before it asks.

Without a repair address (`--no-repair`, or a server that takes no requests) the planner still follows the
carousel: the HTTP end game (`vmcast.receiver.fallback`) waits for a whole loop since the join.

FEC (docs/PROTOCOL.md section 8): on a stream whose metadata announces parity (`Assembly.fec`), the planner
asks per block for as many parity symbols as the block still lacks (its missing frames less the symbols held,
the assembly's `parity_held`) instead of naming the frames: one parity frame the sender multicasts repairs
any one missing frame of the block at every receiver.

Error handling: sending never raises. The socket is non-blocking; a send that fails (a full socket buffer,
an unreachable host) is counted in `send_errors`, logged once, and the frames are asked for again later by
the planner's own schedule.
Resource handling: the caller owns the socket (`open_request_socket`) and closes it.
"""

from __future__ import annotations

import logging
import random
import socket
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from bitarray import bitarray
from vmcast.protocol import Layout, RepairPlanner, encode_repair_requests

log = logging.getLogger(__name__)

# Without GRO, the pump learns the source port of one datagram in this many (a power of two: the test is a
# bit mask).
OBSERVE_EVERY = 8
# On a parity stream, a receiver whose socket keeps overflowing asks for the blocks it loses wholesale as
# frames, not parity, for this long after (`RepairPlanner.ask_frames_until`): one receiver on loopback,
# unpaced, at payload 1400, reached 0.34 Gbit/s asking for parity (decoding a block for every few it
# received) against ~2.4 Gbit/s asking for frames.
FRAMES_AFTER_OVERFLOW = 2.0
# ...once its socket has overflowed before this many requests in a row: a receiver that cannot keep up
# overflows all the time, one that was held up once (a stall on shared cores) overflows once, and asking
# for its losses as frames then sends them to every receiver: on the bed (4 receivers, 5% loss, 2 cores)
# reacting to single overflows turned stalls into 42-58 s runs, against 33-34 s.
SUSTAINED_OVERFLOW = 3
# While the pump is behind its socket, requests wait until it has caught up, but no longer than this (`poll`):
# on the test bed (4 receivers, 5% loss, 2 shared cores, receivers first) receivers asking while behind asked
# 22-40k parity symbols each and the sender sent 54-113k (one run in three 39.7 s); waiting, 15-18k and 48-49k,
# 33.0-33.3 s in three runs. A receiver that never catches up (a disk slower than the link) still asks this often.
STALE_POLL_INTERVAL = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class RepairAddress:
    """Where a server takes repair requests: the host of its HTTP API, on the UDP port its lease names."""

    host: str
    """An IPv4 address (resolved from the server URL's host)."""
    port: int


def open_request_socket() -> socket.socket:
    """A small non-blocking UDP socket to send requests from (any local port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    return sock


def resolve_repair_address(host: str, port: int) -> RepairAddress | None:
    """The server host's IPv4 address with the repair port; None (logged) when the name does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as error:
        log.warning("cannot resolve %s for repair requests (%s): lost frames come from the next loop", host, error)
        return None
    return RepairAddress(host=infos[0][4][0], port=port)


class Repairs:
    """Follows the carousel and asks for lost frames; used from the pump's thread only (not thread-safe).

    `cookie`: the stream's. `address` and `sock`: where and with what to send requests; None for neither
    (follow the carousel only).
    """

    def __init__(self, *, cookie: bytes, address: RepairAddress | None, sock: socket.socket | None) -> None:
        self._cookie = cookie
        self._destination = (address.host, address.port) if address is not None and sock is not None else None
        self._sock = sock
        self.planner: RepairPlanner | None = None
        self.requests_sent = 0
        """Requests sent (a failed send is not counted here but in `send_errors`)."""
        self.frames_requested = 0
        """Frames named by the requests sent."""
        self.parity_requested = 0
        """Parity symbols asked for by the requests sent (FEC)."""
        self.send_errors = 0
        self._warned = False
        self._overflows: Callable[[], int | None] | None = None
        self._overflowed = 0
        self._overflow_streak = 0
        self._cannot_keep_up = False
        self._step_back_logged = False
        self._polled_at = -STALE_POLL_INTERVAL

    @property
    def asks(self) -> bool:
        """Whether requests are sent at all (else the carousel is only followed)."""
        return self._destination is not None

    def start(self, *, layout: Layout, held: bitarray, parity_held: array | None = None, fec: bool = False, parity_refused: bitarray | None = None,
              parity_seen: array | None = None, overflows: Callable[[], int | None] | None = None, parity_room: Callable[[], int] | None = None) -> None:
        """The layout is known: plan from now on. `held`: the assembly's held frames; `parity_held`: its parity
        symbols held per block; `parity_refused`: its blocks that take no parity for now; `parity_seen`: per
        block, one past the highest ESI that arrived (all read, never written). `fec`: the stream takes
        parity: ask for it, except, for `FRAMES_AFTER_OVERFLOW` seconds, for blocks lost wholesale once
        `overflows` (the receive socket's drops for a full buffer) has grown at `SUSTAINED_OVERFLOW` requests
        in a row. `parity_room`: the parity symbols the assembly still has room for (`RepairPlanner`)."""
        if self.planner is None:
            self.planner = RepairPlanner(layout=layout, received=held, parity_held=parity_held, fec=fec, parity_refused=parity_refused,
                                         parity_seen=parity_seen, parity_room=parity_room)
            self._overflows = overflows if fec else None  # drops before this count too: they are what it lost

    @property
    def passed_everything(self) -> bool:
        """The carousel went a whole loop since the first frame observed (any thread may ask)."""
        planner = self.planner
        return planner is not None and planner.passed_everything

    def poll(self, now: float, *, behind: bool = False) -> None:
        """Send a request if the planner says it is time (`now`: `time.monotonic()`).

        `behind`: the caller knows more datagrams are queued than it has taken (a batch receive filled every
        slot). What it lacks may then be among them, the parity its last request brought above all, and a
        request now would have the sender send that again; so while behind, it asks at most every
        `STALE_POLL_INTERVAL`, and as usual once caught up.
        """
        planner = self.planner
        if planner is None or self._destination is None:
            return
        if behind and now - self._polled_at < STALE_POLL_INTERVAL:
            return
        self._polled_at = now
        if self._overflows is not None and planner.due(now):  # just before a request: what it asks depends on it
            overflowed = self._overflows()
            if overflowed is not None and overflowed > self._overflowed:
                self._overflowed = overflowed
                self._overflow_streak += 1
            else:
                self._overflow_streak = 0
            if self._overflow_streak >= SUSTAINED_OVERFLOW:
                if not self._cannot_keep_up:
                    self._cannot_keep_up = True
                    log.info("the receive socket keeps overflowing (this receiver cannot keep up): blocks it loses wholesale are asked for as frames, not parity, while it does")
                planner.ask_frames_until(now + FRAMES_AFTER_OVERFLOW)
        if planner.steps_back and not self._step_back_logged:
            self._step_back_logged = True  # once: reordering may do it again and again
            old, new = planner.last_step_back or (-1, -1)
            log.info("the carousel's position went back from frame %d to %d (a sender restart, or datagrams reordered "
                     "on the way): what it passed before is still asked for (counted in carousel_steps_back)", old, new)
        request = planner.poll(now, jitter=random.random())
        if request is None:
            return
        for datagram in encode_repair_requests(self._cookie, request):
            try:
                self._sock.sendto(datagram, self._destination)
            except OSError as error:
                self.send_errors += 1
                if not self._warned:
                    self._warned = True
                    log.warning("could not send a repair request to %s:%d: %s (counted; lost frames come again later)", *self._destination, error)
                return
            self.requests_sent += 1
        self.frames_requested += request.frame_count
        self.parity_requested += request.parity_count
