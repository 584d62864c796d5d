"""Streams and the leases that keep them running, with reference counting and expiry. Thread-safe.

Rules::

    acquire(image, format)  no running stream of that image content and format -> a new stream, 1 reference
                            one running                                          -> the same stream, +1 reference
                            every time                                           -> a new lease, alive for the TTL
    renew(lease)            active lease      -> alive for another TTL from now
                            expired lease     -> LeaseExpired (the holder starts the stream again)
                            any other         -> LeaseNotFound
    release(lease)          active lease      -> the lease ends, -1 reference; at 0 the sender stops
                            released/expired  -> nothing (said so); a lease never decrements twice
                            unknown lease     -> nothing (said so)
    reap()                  every lease not renewed within the TTL ends as if released
    joined(lease)           active lease      -> counted among the stream's receivers in the group; a stream
                                                 started with min_receivers N holds (metadata only) until
                                                 N active leases have said so, or max_wait has passed;
                                                 once every active lease has, the carousel rests after
                                                 the first loop they all heard whole (until a new lease)

* A stream is identified by (image name, format, SHA-1): if the image file is replaced while a stream of it
  runs, the next start gets a new stream of the new content and the old one runs on for its leases.
* Each stream gets its own group: the next free address of the range after the last one handed out, so a
  group that was just freed is not reused at once (a late receiver of the old stream hears nothing new).
  Every stream has a fresh random 8-byte cookie besides.
* A stopped stream stays visible (state ``stopped``, final counters) among the last `STOPPED_STREAMS_KEPT`;
  `list` shows running streams only.
* With a `StateStore`, every change is written through before it is answered, and `resume` starts the
  recorded streams again after a restart, on the same group, port and cookie, sending the same image (same
  name, format, SHA-1 and frame size, or the stream is dropped with a log line); their leases get a fresh
  TTL from the restart, so receivers that keep renewing never notice. A graceful stop (`close`) keeps the
  records: stopping the server is a restart that has not happened yet.
* Holding for receivers is for a stream's start only: joining a running stream never holds it, and a stream
  resumed after a restart streams at once (its receivers were there before).
* Lease deadlines use the monotonic clock (a wall-clock step neither expires nor prolongs leases); the
  ``expires_at`` shown to clients is the wall-clock equivalent at the time of the grant or renewal.
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
from collections.abc import Callable
from dataclasses import dataclass

from .defaults import DEFAULT_MAX_WAIT
from .errors import (
    GroupsExhausted,
    ImageChanged,
    LeaseExpired,
    LeaseNotFound,
    ServerError,
    StateUnwritable,
    StreamNotFound,
)
from .parity import ParityWorkers
from .preparation import PreparedImage
from .sender import Sender, SenderConfig, SenderStats
from .state import StateStore, StoredLease, StoredStream

log = logging.getLogger(__name__)

# Ended (released or expired) lease ids are remembered so that releasing one again says "already released"
# and renewing an expired one says "expired"; this many are kept (about 150 bytes each), the oldest forgotten
# first, after which the lease is "unknown".
ENDED_LEASES_KEPT = 10_000
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
    expires_at: float
    """Wall-clock time (seconds since the epoch) it ends unless renewed before."""
    ttl: float
    """Seconds each grant or renewal keeps it alive."""


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
    zero_bytes: int
    """Bytes of the image in all-zero blocks and frames: announced in metadata, never sent (docs/PROTOCOL.md 3-4)."""
    references: int
    rate_bps: int
    created_at: float
    repair_port: int
    """UDP port of the server's repair listener (on the API's host)."""
    waiting_for: int
    """Receivers the stream still holds for before its first loop (0: it streams)."""
    sender: SenderStats


class ReleaseOutcome(enum.Enum):
    RELEASED = "released"
    ALREADY_RELEASED = "already_released"
    EXPIRED = "expired"
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

    __slots__ = (
        "cookie", "created_at", "group", "image", "joined", "key", "last_joined_at", "min_receivers", "port",
        "references", "sender", "stream_id", "zero_bytes",
    )  # fmt: skip

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
        self.min_receivers = 0  # 0: the stream never held
        self.joined: dict[str, float] = {}
        """Active leases whose holders said they joined the group, and when (`time.monotonic()`, the sender's
        clock): counted while the sender holds, and the carousel rests once all have heard a whole loop."""
        self.last_joined_at = 0.0
        """The latest of those times, ever: a lease that ends does not move it back, so that no join or release
        scans thousands of leases; at worst the carousel loops once more before it rests."""
        self.created_at = time.time()
        # Bytes a loop never sends (zero blocks and zero frames): once, a status is asked at every metrics scrape.
        self.zero_bytes = image.manifest.unsent_bytes()

    def tell_listening(self) -> None:
        """Tell the sender when the last of its receivers began listening: None while any active lease has
        not said it joined (the carousel must not rest then: that receiver may need the next loop)."""
        everyone = self.references and len(self.joined) == self.references
        self.sender.listening_since(self.last_joined_at if everyone else None)

    def stored(self) -> StoredStream:
        return StoredStream(
            stream_id=self.stream_id, image=self.image.name, format=self.image.format, sha1=self.image.manifest.sha1,
            frame_size=self.image.manifest.layout.frame_size, group=self.group, port=self.port, cookie=self.cookie,
            created_at=self.created_at,
        )  # fmt: skip


class Registry:
    """Starts, shares, expires, persists and stops streams.

    Error handling: `GroupsExhausted` when every group of the range carries a stream; `StreamNotFound`;
    `LeaseExpired` and `LeaseNotFound` from `renew`; `StateUnwritable` from `acquire` when the state database
    refuses the write (nothing is started then: a stream the next restart would not know must not run).
    Errors from opening an image (`ImageChanged`, `OSError`) pass through `acquire` and nothing is registered.
    Releases and expiries go ahead when the database refuses them (the lease ends; the record is logged and
    left behind, and after a restart that lease, never renewed, expires again).

    Resource handling: `close()` stops every sender; call it when the server stops. The store is the
    caller's (it outlives `close`, which keeps the records for the next start).
    """

    def __init__(
        self,
        *,
        group_range: ipaddress.IPv4Network,
        port: int,
        sender_config: SenderConfig,
        lease_ttl: float = 30.0,
        store: StateStore | None = None,
        repair_port: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.group_range = group_range
        self.port = port
        self.sender_config = sender_config
        self.lease_ttl = lease_ttl
        self.repair_port = repair_port
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._running: dict[str, _Stream] = {}
        self._by_key: dict[tuple[str, str, str], _Stream] = {}
        # Read by the repair listener without the lock: replaced whole (copy on write), never mutated, so a
        # reader sees either the old dict or the new one.
        self._by_cookie: dict[bytes, Sender] = {}
        self._stopped: collections.OrderedDict[str, _Stream] = collections.OrderedDict()
        self._leases: dict[str, Lease] = {}
        self._deadlines: dict[str, float] = {}  # lease id -> monotonic deadline
        self._ended: collections.OrderedDict[str, tuple[str, ReleaseOutcome]] = collections.OrderedDict()
        self._groups_in_use: set[ipaddress.IPv4Address] = set()
        self._first_group, self._group_count = _usable_groups(group_range)
        self._next_group = 0
        self._closed = False
        self.leases_granted = 0
        self.leases_expired = 0
        self.parity_workers = ParityWorkers()
        """The processes that make RaptorQ parity for every stream (started when first asked; `close` ends them)."""
        self.on_stream_started: Callable[[], None] | None = None
        """Called, under the registry's lock, whenever a stream starts or resumes; must not block."""

    # -- leases ------------------------------------------------------------------------------------------------

    def acquire(
        self, image: PreparedImage, *, min_receivers: int | None = None, max_wait: float = DEFAULT_MAX_WAIT,
        listening: tuple[ipaddress.IPv4Address, int] | None = None,
    ) -> tuple[StreamStatus, Lease, bool]:
        """A lease on the stream of `image` (started now if not running), and whether it counts as joined. A
        stream started here with `min_receivers` holds until that many leases have `joined`, or for `max_wait`
        seconds. `listening`: the group and port the requester listens on already; when they are the
        stream's, the lease has joined as it is granted."""
        key = (image.name, image.format, image.manifest.sha1)
        with self._lock:
            if self._closed:
                raise RuntimeError("the registry is closed")
            stream = self._by_key.get(key)
            new_stream = None
            if stream is None:
                stream, next_group = self._new_stream(key, image)
                new_stream = stream
            lease = self._grant(stream.stream_id, created_at=time.time())
            if self._store is not None:
                try:
                    self._store.add_lease(
                        _stored_lease(lease),
                        new_stream=new_stream.stored() if new_stream is not None else None,
                        next_group=next_group if new_stream is not None else None,
                    )
                except StateUnwritable:
                    if new_stream is not None:
                        new_stream.sender.stop(0)  # never started: closes its file and sockets
                    raise
            if new_stream is not None:
                self._next_group = next_group
                self._register(new_stream)
                new_stream.min_receivers = min_receivers or 0
                new_stream.sender.start(hold=max_wait if min_receivers else None)
                log.info(
                    "stream %s: %s as %s to %s:%d, cookie %s", stream.stream_id, image.name, image.format,
                    stream.group, stream.port, stream.cookie.hex(),
                )  # fmt: skip
            self._activate(lease)
            stream.references += 1
            joined = listening == (stream.group, stream.port)
            log.info(
                "lease %s on stream %s (%s as %s): %d references%s",
                lease.lease_id, stream.stream_id, image.name, image.format, stream.references, ", joined" if joined else "",
            )  # fmt: skip
            if joined:
                self._note_joined(stream, lease.lease_id)
            else:
                stream.tell_listening()
            return self._status(stream), lease, joined

    def renew(self, lease_id: str) -> Lease:
        """Keep an active lease alive for another TTL from now.

        Error handling: `LeaseExpired` if it expired (and is still remembered), else `LeaseNotFound`.
        """
        with self._lock:
            lease = self._active_lease(lease_id)
            now = time.time()
            lease = Lease(
                lease_id=lease_id, stream_id=lease.stream_id, created_at=lease.created_at,
                expires_at=now + self.lease_ttl, ttl=self.lease_ttl,
            )  # fmt: skip
            self._leases[lease_id] = lease
            self._deadlines[lease_id] = self._clock() + self.lease_ttl
            if self._store is not None:
                try:
                    self._store.renew(lease_id, at=now)
                except StateUnwritable as error:
                    # Informational only: a restart gives every lease a fresh TTL anyway.
                    log.warning("lease %s renewed, but not recorded: %s", lease_id, error)
            return lease

    def joined(self, lease_id: str) -> StreamStatus:
        """The holder of an active lease has joined the group; opens a holding stream's gate once
        `min_receivers` of its active leases have. Returns the stream as it is now.

        Error handling: `LeaseExpired` if the lease expired (and is still remembered), else `LeaseNotFound`.
        """
        with self._lock:
            stream = self._running[self._active_lease(lease_id).stream_id]
            self._note_joined(stream, lease_id)
            return self._status(stream)

    def release(self, lease_id: str) -> Release:
        """End a lease; stops the stream's sender (waiting up to `STOP_WAIT`) when it was the last one."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                ended = self._ended.get(lease_id)
                if ended is None:
                    return Release(
                        lease_id=lease_id, outcome=ReleaseOutcome.UNKNOWN, stream_id=None, references=None,
                        stream_stopped=False,
                    )  # fmt: skip
                stream_id, outcome = ended
                stream = self._running.get(stream_id) or self._stopped.get(stream_id)
                references = stream.references if stream is not None else 0
                return Release(
                    lease_id=lease_id,
                    outcome=ReleaseOutcome.ALREADY_RELEASED if outcome is ReleaseOutcome.RELEASED else outcome,
                    stream_id=stream_id,
                    references=references,
                    stream_stopped=references == 0,
                )
            stream, to_stop = self._end_leases([lease], ReleaseOutcome.RELEASED)[0], None
            references = stream.references
            if references == 0:
                to_stop = stream.sender
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

    def reap(self) -> list[str]:
        """End every lease whose deadline has passed, as a release would; the ids of those ended.

        Streams left without a lease stop (this waits up to `STOP_WAIT` for their senders).
        """
        now = self._clock()
        with self._lock:
            expired = [self._leases[lease_id] for lease_id, deadline in self._deadlines.items() if deadline <= now]
            if not expired:
                return []
            streams = self._end_leases(expired, ReleaseOutcome.EXPIRED)
            self.leases_expired += len(expired)
            for lease, stream in zip(expired, streams, strict=True):
                log.info(
                    "lease %s on stream %s expired (not renewed within %g s): %d references",
                    lease.lease_id, stream.stream_id, self.lease_ttl, stream.references,
                )  # fmt: skip
            to_stop = {id(stream): stream for stream in streams if stream.references == 0}.values()
        for stream in to_stop:
            log.info("stream %s stopped: its last lease expired", stream.stream_id)
            if not stream.sender.stop(STOP_WAIT):
                log.warning("stream %s: sender still stopping after %g s", stream.stream_id, STOP_WAIT)
        return [lease.lease_id for lease in expired]

    def lease(self, lease_id: str) -> Lease | None:
        with self._lock:
            return self._leases.get(lease_id)

    # -- streams -----------------------------------------------------------------------------------------------

    def get(self, stream_id: str) -> StreamStatus:
        with self._lock:
            stream = self._running.get(stream_id) or self._stopped.get(stream_id)
            if stream is None:
                raise StreamNotFound(stream_id=stream_id)
            return self._status(stream)

    def image_of(self, stream_id: str) -> tuple[PreparedImage, bool]:
        """The image a stream sends, and whether the stream is running."""
        with self._lock:
            stream = self._running.get(stream_id)
            if stream is not None:
                return stream.image, True
            stream = self._stopped.get(stream_id)
            if stream is None:
                raise StreamNotFound(stream_id=stream_id)
            return stream.image, False

    def list(self) -> list[StreamStatus]:
        """The running streams, oldest first."""
        with self._lock:
            return [self._status(stream) for stream in self._running.values()]

    def sender_for_cookie(self, cookie: bytes) -> Sender | None:
        """The running stream's sender with this cookie. Lock-free: the repair listener calls it per datagram."""
        return self._by_cookie.get(cookie)

    @property
    def active_leases(self) -> int:
        return len(self._leases)

    def resume(self, prepare: Callable[[StoredStream], PreparedImage]) -> int:
        """Start again the streams the store recorded, each exactly as it was; the number resumed.

        `prepare` makes the image of a recorded stream ready (it may convert or hash, so this blocks). A
        stream is dropped, with a log line, when its image is gone or unreadable, when its content (SHA-1)
        or frame size changed, or when its sender cannot start; the others run on with fresh lease TTLs.
        """
        if self._store is None:
            return 0
        recorded = self._store.load()
        with self._lock:
            self._next_group = recorded.next_group % self._group_count
        resumed = 0
        for stored, leases in recorded.streams:
            problem = None
            try:
                image = prepare(stored)
            except (ServerError, OSError) as error:
                problem = str(error)
            else:
                if image.manifest.sha1 != stored.sha1:
                    problem = f"its image changed (SHA-1 {stored.sha1} is now {image.manifest.sha1})"
                elif image.manifest.layout.frame_size != stored.frame_size:
                    now = image.manifest.layout.frame_size
                    problem = f"the frame size changed ({stored.frame_size} bytes, now --payload {now})"
            if problem is None:
                problem = self._resume_one(stored, leases, image)
            if problem is not None:
                log.warning(
                    "stream %s (%s as %s on %s:%d) not resumed after the restart: %s; its %d lease(s) end",
                    stored.stream_id, stored.image, stored.format, stored.group, stored.port, problem, len(leases),
                )  # fmt: skip
                try:
                    self._store.remove(
                        lease_ids=tuple(lease.lease_id for lease in leases), stream_ids=(stored.stream_id,)
                    )
                except StateUnwritable as error:
                    log.error("%s", error)
                continue
            resumed += 1
        return resumed

    def close(self) -> None:
        """Stop every stream (their records stay in the store for the next start)."""
        with self._lock:
            self._closed = True
            senders = [self._retire(stream) for stream in list(self._running.values())]
            self._leases.clear()
            self._deadlines.clear()
        for sender in senders:
            sender.stop(0)
        for sender in senders:
            sender.stop(STOP_WAIT)
        self.parity_workers.close()

    # -- under the lock ----------------------------------------------------------------------------------------

    def _resume_one(self, stored: StoredStream, leases: tuple[StoredLease, ...], image: PreparedImage) -> str | None:
        key = (image.name, image.format, image.manifest.sha1)
        with self._lock:
            if self._closed:
                return "the server is stopping"
            if key in self._by_key or stored.group in self._groups_in_use or stored.cookie in self._by_cookie:
                return "another resumed stream has the same image, group or cookie"
            try:
                sender = Sender(
                    path=image.path, manifest=image.manifest, cookie=stored.cookie, group=stored.group,
                    port=stored.port, config=self.sender_config, expected=image.identity,
                    parity_workers=self.parity_workers,
                )  # fmt: skip
            except (ImageChanged, OSError, ServerError) as error:
                return f"its sender cannot start: {error}"
            stream = _Stream(
                stream_id=stored.stream_id, key=key, image=image, group=stored.group, port=stored.port,
                cookie=stored.cookie, sender=sender,
            )  # fmt: skip
            stream.created_at = stored.created_at
            self._register(stream)
            for stored_lease in leases:
                lease = self._grant(stored.stream_id, created_at=stored_lease.created_at, lease_id=stored_lease.lease_id)
                self._activate(lease)
                stream.references += 1
                # Their receivers were listening before the restart and still are (their sockets stayed).
                stream.joined[lease.lease_id] = stream.last_joined_at = time.monotonic()
            stream.tell_listening()
            sender.start()
        log.info(
            "stream %s resumed after the restart: %s as %s to %s:%d, cookie %s, %d lease(s) with a fresh %g s TTL",
            stored.stream_id, image.name, image.format, stored.group, stored.port, stored.cookie.hex(), len(leases),
            self.lease_ttl,
        )  # fmt: skip
        return None

    def _active_lease(self, lease_id: str) -> Lease:
        """The active lease `lease_id`; `LeaseExpired` if it expired (and is remembered), else `LeaseNotFound`."""
        lease = self._leases.get(lease_id)
        if lease is None:
            ended = self._ended.get(lease_id)
            if ended is not None and ended[1] is ReleaseOutcome.EXPIRED:
                raise LeaseExpired(lease_id=lease_id, ttl=self.lease_ttl)
            raise LeaseNotFound(lease_id=lease_id)
        return lease

    def _grant(self, stream_id: str, *, created_at: float, lease_id: str | None = None) -> Lease:
        return Lease(
            lease_id=lease_id or str(uuid.uuid4()), stream_id=stream_id, created_at=created_at,
            expires_at=time.time() + self.lease_ttl, ttl=self.lease_ttl,
        )  # fmt: skip

    def _activate(self, lease: Lease) -> None:
        self._leases[lease.lease_id] = lease
        self._deadlines[lease.lease_id] = self._clock() + self.lease_ttl
        self.leases_granted += 1

    def _end_leases(self, leases: list[Lease], outcome: ReleaseOutcome) -> list[_Stream]:
        """End active leases (released or expired): one reference each; streams at zero are retired.

        Returns each lease's stream. The store forgets the leases and the retired streams in one transaction.
        """
        streams, retired = [], []
        for lease in leases:
            del self._leases[lease.lease_id]
            del self._deadlines[lease.lease_id]
            self._ended[lease.lease_id] = (lease.stream_id, outcome)
            while len(self._ended) > ENDED_LEASES_KEPT:
                self._ended.popitem(last=False)
            stream = self._running[lease.stream_id]
            stream.references -= 1
            stream.joined.pop(lease.lease_id, None)
            if stream.references == 0:
                self._retire(stream)
                retired.append(stream.stream_id)
            else:
                stream.tell_listening()
            streams.append(stream)
        if self._store is not None:
            try:
                self._store.remove(lease_ids=tuple(lease.lease_id for lease in leases), stream_ids=tuple(retired))
            except StateUnwritable as error:
                log.error("%s; the lease(s) end anyway", error)
        return streams

    def _new_stream(self, key: tuple[str, str, str], image: PreparedImage) -> tuple[_Stream, int]:
        """A stream with its own group and a fresh cookie, its sender open but not started; and the group
        cursor to keep once it is registered."""
        group, next_group = self._allocate_group()
        cookie = secrets.token_bytes(8)
        while cookie in self._by_cookie:  # 2**-64 per running stream: never, but the lookup must stay unique
            cookie = secrets.token_bytes(8)
        sender = Sender(
            path=image.path,
            manifest=image.manifest,
            cookie=cookie,
            group=group,
            port=self.port,
            config=self.sender_config,
            expected=image.identity,
            parity_workers=self.parity_workers,
        )
        stream = _Stream(
            stream_id=str(uuid.uuid4()), key=key, image=image, group=group, port=self.port, cookie=cookie, sender=sender
        )
        return stream, next_group

    def _register(self, stream: _Stream) -> None:
        self._groups_in_use.add(stream.group)
        self._running[stream.stream_id] = stream
        self._by_key[stream.key] = stream
        self._by_cookie = {**self._by_cookie, stream.cookie: stream.sender}
        if self.on_stream_started is not None:
            self.on_stream_started()

    def _retire(self, stream: _Stream) -> Sender:
        del self._running[stream.stream_id]
        del self._by_key[stream.key]
        self._by_cookie = {cookie: sender for cookie, sender in self._by_cookie.items() if cookie != stream.cookie}
        self._groups_in_use.discard(stream.group)
        self._stopped[stream.stream_id] = stream
        while len(self._stopped) > STOPPED_STREAMS_KEPT:
            self._stopped.popitem(last=False)
        stream.sender.stop(0)  # only flags it: the caller waits outside the lock
        return stream.sender

    def _allocate_group(self) -> tuple[ipaddress.IPv4Address, int]:
        for step in range(self._group_count):
            index = (self._next_group + step) % self._group_count
            group = ipaddress.IPv4Address(self._first_group + index)
            if group not in self._groups_in_use:
                return group, (index + 1) % self._group_count
        raise GroupsExhausted(group_range=str(self.group_range), streams=len(self._running))

    def _note_joined(self, stream: _Stream, lease_id: str) -> None:
        """(Under the lock.) The holder of `lease_id` listens to the group: the sender learns when the last
        active lease joined, and a holding stream starts once `min_receivers` have."""
        if lease_id not in stream.joined:
            stream.joined[lease_id] = stream.last_joined_at = time.monotonic()
        stream.tell_listening()
        if stream.sender.holding and len(stream.joined) >= stream.min_receivers:
            stream.sender.open_gate()
            log.info("stream %s: %d receivers joined; starting", stream.stream_id, len(stream.joined))

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
            zero_bytes=stream.zero_bytes,
            references=stream.references,
            rate_bps=self.sender_config.rate_bps,
            created_at=stream.created_at,
            repair_port=self.repair_port,
            waiting_for=max(0, stream.min_receivers - len(stream.joined)) if stream.sender.holding else 0,
            sender=stream.sender.stats(),
        )


def _stored_lease(lease: Lease) -> StoredLease:
    return StoredLease(
        lease_id=lease.lease_id, stream_id=lease.stream_id, created_at=lease.created_at, renewed_at=lease.created_at
    )


def _usable_groups(network: ipaddress.IPv4Network) -> tuple[int, int]:
    """First address (as an integer) and count of the addresses streams may use: the network and
    broadcast addresses are skipped, except in a /31 or /32 where there are none."""
    if network.prefixlen >= 31:
        return int(network.network_address), network.num_addresses
    return int(network.network_address) + 1, network.num_addresses - 2
