"""Streams and the leases that keep them running, with reference counting. Thread-safe.

Rules::

    acquire(image, format)  no running stream of that image content and format -> a new stream, 1 reference
                            one running                                          -> the same stream, +1 reference
                            every time                                           -> a new lease
    release(lease)          active lease      -> the lease ends, -1 reference; at 0 the sender stops
                            released lease    -> nothing (said so); a lease never decrements twice
                            unknown lease     -> nothing (said so)

* A stream is identified by (image name, format, SHA-1): if the image file is replaced while a stream of it
  runs, the next start gets a new stream of the new content and the old one runs on for its leases.
* Each stream gets its own group: the next free address of the range after the last one handed out, so a
  group that was just freed is not reused at once (a late receiver of the old stream hears nothing new).
  Every stream has a fresh random 8-byte cookie besides.
* A stopped stream stays visible (state ``stopped``, final counters) among the last `STOPPED_STREAMS_KEPT`;
  `list` shows running streams only.
"""

from __future__ import annotations

import collections
import enum
import ipaddress
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass

from .errors import GroupsExhausted, StreamNotFound
from .preparation import PreparedImage
from .sender import Sender, SenderConfig, SenderStats

log = logging.getLogger(__name__)

# Released lease ids are remembered so that releasing one again says "already released"; this many are
# kept (about 100 bytes each), the oldest forgotten first, after which a release says "unknown lease".
RELEASED_LEASES_KEPT = 10_000
STOPPED_STREAMS_KEPT = 100
# How long `release` waits for a stopping sender to end before answering anyway (it keeps stopping).
STOP_WAIT = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    """One client's claim on a stream."""

    lease_id: str
    stream_id: str
    created_at: float
    """Wall-clock time (seconds since the epoch) it was granted."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamStatus:
    """A stream as the API shows it, at one moment."""

    stream_id: str
    image: str
    format: str
    group: ipaddress.IPv4Address
    port: int
    cookie: bytes
    length: int
    sha1: str
    frame_size: int
    block_size: int
    references: int
    rate_bps: int
    created_at: float
    sender: SenderStats


class ReleaseOutcome(enum.Enum):
    RELEASED = "released"
    ALREADY_RELEASED = "already_released"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    """What releasing a lease did."""

    lease_id: str
    outcome: ReleaseOutcome
    stream_id: str | None
    """The lease's stream (None for an unknown lease)."""
    references: int | None
    """The stream's references after this release (None for an unknown lease)."""
    stream_stopped: bool
    """True when this release (or an earlier one) brought the stream to zero references."""


class _Stream:
    """Registry-internal: mutable, guarded by the registry's lock."""

    __slots__ = ("cookie", "created_at", "group", "image", "key", "port", "references", "sender", "stream_id")

    def __init__(
        self,
        *,
        stream_id: str,
        key: tuple[str, str, str],
        image: PreparedImage,
        group: ipaddress.IPv4Address,
        port: int,
        cookie: bytes,
        sender: Sender,
    ) -> None:
        self.stream_id, self.key, self.image = stream_id, key, image
        self.group, self.port, self.cookie, self.sender = group, port, cookie, sender
        self.references = 0
        self.created_at = time.time()


class Registry:
    """Starts, shares and stops streams.

    Error handling: `GroupsExhausted` when every group of the range carries a stream; `StreamNotFound`;
    errors from opening an image (`ImageChanged`, `OSError`) pass through `acquire` and nothing is registered.

    Resource handling: `close()` stops every sender; call it when the server stops.
    """

    def __init__(self, *, group_range: ipaddress.IPv4Network, port: int, sender_config: SenderConfig) -> None:
        self.group_range = group_range
        self.port = port
        self.sender_config = sender_config
        self._lock = threading.Lock()
        self._running: dict[str, _Stream] = {}
        self._by_key: dict[tuple[str, str, str], _Stream] = {}
        self._stopped: collections.OrderedDict[str, _Stream] = collections.OrderedDict()
        self._leases: dict[str, Lease] = {}
        self._released: collections.OrderedDict[str, str] = collections.OrderedDict()  # lease id -> stream id
        self._groups_in_use: set[ipaddress.IPv4Address] = set()
        self._first_group, self._group_count = _usable_groups(group_range)
        self._next_group = 0
        self._closed = False

    def acquire(self, image: PreparedImage) -> tuple[StreamStatus, Lease]:
        """A lease on the stream of `image` (started now if not running)."""
        key = (image.name, image.format, image.manifest.sha1)
        with self._lock:
            if self._closed:
                raise RuntimeError("the registry is closed")
            stream = self._by_key.get(key)
            if stream is None:
                stream = self._start(key, image)
            stream.references += 1
            lease = Lease(lease_id=str(uuid.uuid4()), stream_id=stream.stream_id, created_at=time.time())
            self._leases[lease.lease_id] = lease
            log.info(
                "lease %s on stream %s (%s as %s): %d references",
                lease.lease_id,
                stream.stream_id,
                image.name,
                image.format,
                stream.references,
            )
            return self._status(stream), lease

    def release(self, lease_id: str) -> Release:
        """End a lease; stops the stream's sender (waiting up to `STOP_WAIT`) when it was the last one."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                stream_id = self._released.get(lease_id)
                if stream_id is None:
                    return Release(
                        lease_id=lease_id,
                        outcome=ReleaseOutcome.UNKNOWN,
                        stream_id=None,
                        references=None,
                        stream_stopped=False,
                    )
                stream = self._running.get(stream_id) or self._stopped.get(stream_id)
                references = stream.references if stream is not None else 0
                return Release(
                    lease_id=lease_id,
                    outcome=ReleaseOutcome.ALREADY_RELEASED,
                    stream_id=stream_id,
                    references=references,
                    stream_stopped=references == 0,
                )
            self._remember_released(lease)
            stream = self._running[lease.stream_id]
            stream.references -= 1
            references = stream.references
            to_stop = self._retire(stream) if references == 0 else None
        log.info("lease %s released: stream %s has %d references", lease_id, lease.stream_id, references)
        if to_stop is not None and not to_stop.stop(STOP_WAIT):
            log.warning("stream %s: sender still stopping after %g s", lease.stream_id, STOP_WAIT)
        return Release(
            lease_id=lease_id,
            outcome=ReleaseOutcome.RELEASED,
            stream_id=lease.stream_id,
            references=references,
            stream_stopped=references == 0,
        )

    def get(self, stream_id: str) -> StreamStatus:
        with self._lock:
            stream = self._running.get(stream_id) or self._stopped.get(stream_id)
            if stream is None:
                raise StreamNotFound(stream_id=stream_id)
            return self._status(stream)

    def list(self) -> list[StreamStatus]:
        """The running streams, oldest first."""
        with self._lock:
            return [self._status(stream) for stream in self._running.values()]

    def lease(self, lease_id: str) -> Lease | None:
        with self._lock:
            return self._leases.get(lease_id)

    def close(self) -> None:
        """Stop every stream (leases end with them)."""
        with self._lock:
            self._closed = True
            senders = [self._retire(stream) for stream in list(self._running.values())]
            self._leases.clear()
        for sender in senders:
            sender.stop(0)
        for sender in senders:
            sender.stop(STOP_WAIT)

    # -- under the lock ----------------------------------------------------------------------------------------

    def _start(self, key: tuple[str, str, str], image: PreparedImage) -> _Stream:
        group = self._allocate_group()
        cookie = secrets.token_bytes(8)
        sender = Sender(
            path=image.path,
            manifest=image.manifest,
            cookie=cookie,
            group=group,
            port=self.port,
            config=self.sender_config,
            expected=image.identity,
        )
        stream = _Stream(
            stream_id=str(uuid.uuid4()), key=key, image=image, group=group, port=self.port, cookie=cookie, sender=sender
        )
        sender.start()
        self._groups_in_use.add(group)
        self._running[stream.stream_id] = stream
        self._by_key[key] = stream
        log.info(
            "stream %s: %s as %s to %s:%d, cookie %s",
            stream.stream_id,
            image.name,
            image.format,
            group,
            self.port,
            cookie.hex(),
        )
        return stream

    def _retire(self, stream: _Stream) -> Sender:
        del self._running[stream.stream_id]
        del self._by_key[stream.key]
        self._groups_in_use.discard(stream.group)
        self._stopped[stream.stream_id] = stream
        while len(self._stopped) > STOPPED_STREAMS_KEPT:
            self._stopped.popitem(last=False)
        stream.sender.stop(0)  # only flags it: the caller waits outside the lock
        return stream.sender

    def _allocate_group(self) -> ipaddress.IPv4Address:
        for step in range(self._group_count):
            index = (self._next_group + step) % self._group_count
            group = ipaddress.IPv4Address(self._first_group + index)
            if group not in self._groups_in_use:
                self._next_group = (index + 1) % self._group_count
                return group
        raise GroupsExhausted(group_range=str(self.group_range), streams=len(self._running))

    def _remember_released(self, lease: Lease) -> None:
        self._released[lease.lease_id] = lease.stream_id
        while len(self._released) > RELEASED_LEASES_KEPT:
            self._released.popitem(last=False)

    def _status(self, stream: _Stream) -> StreamStatus:
        manifest = stream.image.manifest
        return StreamStatus(
            stream_id=stream.stream_id,
            image=stream.image.name,
            format=stream.image.format,
            group=stream.group,
            port=stream.port,
            cookie=stream.cookie,
            length=manifest.layout.length,
            sha1=manifest.sha1,
            frame_size=manifest.layout.frame_size,
            block_size=manifest.layout.block_size,
            references=stream.references,
            rate_bps=self.sender_config.rate_bps,
            created_at=stream.created_at,
            sender=stream.sender.stats(),
        )


def _usable_groups(network: ipaddress.IPv4Network) -> tuple[int, int]:
    """First address (as an integer) and count of the addresses streams may use: the network and
    broadcast addresses are skipped, except in a /31 or /32 where there are none."""
    if network.prefixlen >= 31:
        return int(network.network_address), network.num_addresses
    return int(network.network_address) + 1, network.num_addresses - 2
