"""The server's state on disk: running streams and their leases, so that a restart loses nothing.

An embedded SQLite database (stdlib `sqlite3`). Every change is written through, in one transaction, before
the API answers: starting a stream (stream and lease together), joining, releasing (lease, and the stream
with its last lease), a lease expiring, a renewal. On start, `StateStore.load` gives back what was running.

Why these settings:

* WAL journal, ``synchronous=NORMAL``: a commit is a write into the WAL file, with no ``fsync`` (that
  happens at checkpoints). A committed transaction survives the process being killed (SIGKILL, a crash,
  the OOM killer): it is in the kernel's page cache. A power cut may lose the last few commits, never
  corrupt the database; after it, receivers that still renew find 404 and start their stream again.
  A renewal then costs tens of microseconds (measured in tests/server/test_state.py), so renewals are
  written through rather than batched.
* One connection, one lock: writes come from the API's worker threads and the lease reaper; SQLite
  serializes writers anyway, and one connection guarded by a lock never sees ``database is locked``.
* ``user_version`` carries the schema version; `_migrate` takes a database of any older version to the
  current one at start, and refuses (fails closed) one made by a newer vmcast.
* A second server on the same database would resume the same streams on the same groups: an exclusive
  ``flock`` on ``<database>.lock``, held while the store is open, refuses it. (A separate file because
  closing any descriptor of the database file itself would drop SQLite's own POSIX locks.)

Error handling: `ConfigurationError` (naming ``--state-db``) when the database cannot be opened, is not a
vmcast state database, is newer than this vmcast, or is in use by another server. A write that fails raises
`StateUnwritable`; callers decide whether the change can go ahead without it.

Resource handling: `close()` releases the connection and the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigurationError, StateUnwritable

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# A writer waits this long for SQLite's own file lock (only another process could hold it, and the flock
# keeps other vmcast servers out), then fails rather than hanging an API request.
BUSY_TIMEOUT = 5.0

_SCHEMA_V1 = """
CREATE TABLE streams (
    stream_id  TEXT PRIMARY KEY,
    image      TEXT NOT NULL,     -- image name in the images directory
    format     TEXT NOT NULL,     -- format of the bytes sent
    sha1       TEXT NOT NULL,     -- SHA-1 of the bytes sent: a resumed stream must send the same image
    frame_size INTEGER NOT NULL,  -- and with the same frame size (receivers would see a contradiction)
    grp        TEXT NOT NULL,     -- multicast group, dotted quad
    port       INTEGER NOT NULL,
    cookie     BLOB NOT NULL,     -- 8 bytes
    created_at REAL NOT NULL      -- seconds since the epoch
);
CREATE TABLE leases (
    lease_id   TEXT PRIMARY KEY,
    stream_id  TEXT NOT NULL REFERENCES streams (stream_id) ON DELETE CASCADE,
    created_at REAL NOT NULL,     -- seconds since the epoch
    renewed_at REAL NOT NULL      -- last grant or renewal, seconds since the epoch (informational: a restart
                                  -- gives every lease a fresh TTL)
);
CREATE INDEX leases_by_stream ON leases (stream_id);
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""
_NEXT_GROUP = "next_group"


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredStream:
    """A running stream as recorded: enough to start its sender again exactly as it was."""

    stream_id: str
    image: str
    format: str
    sha1: str
    frame_size: int
    group: ipaddress.IPv4Address
    port: int
    cookie: bytes
    created_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredLease:
    lease_id: str
    stream_id: str
    created_at: float
    renewed_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredState:
    """What `StateStore.load` found: the streams that have leases, their leases, and the group cursor."""

    streams: tuple[tuple[StoredStream, tuple[StoredLease, ...]], ...]
    next_group: int
    """Index in the group range of the next group to try (so a restart does not reuse a freed group at once)."""


class StateStore:
    """Streams and leases in SQLite. Thread-safe (one lock around one connection)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise ConfigurationError(
                setting="--state-db", problem=f"cannot use {path}: {error.strerror or error}"
            ) from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ConfigurationError(
                setting="--state-db",
                problem=f"{path} is in use by another vmcast serve; give each server its own --state-db (or --cache-dir)",
            ) from None
        try:
            self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("PRAGMA foreign_keys=ON")
                self._migrate()
            except BaseException:
                self._db.close()
                raise
        except sqlite3.DatabaseError as error:
            os.close(self._lock_fd)
            raise ConfigurationError(
                setting="--state-db", problem=f"{path} is not a usable vmcast state database: {error}"
            ) from None
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._closed = False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()
            os.close(self._lock_fd)  # releases the flock

    # -- reading -------------------------------------------------------------------------------------------------

    def load(self) -> StoredState:
        """Every recorded stream with its leases; streams without a lease are removed (they had stopped)."""
        with self._transaction() as db:
            db.execute("DELETE FROM streams WHERE stream_id NOT IN (SELECT stream_id FROM leases)")
            leases: dict[str, list[StoredLease]] = {}
            for lease_id, stream_id, created_at, renewed_at in db.execute(
                "SELECT lease_id, stream_id, created_at, renewed_at FROM leases ORDER BY created_at"
            ):
                leases.setdefault(stream_id, []).append(
                    StoredLease(lease_id=lease_id, stream_id=stream_id, created_at=created_at, renewed_at=renewed_at)
                )
            streams = []
            for row in db.execute(
                "SELECT stream_id, image, format, sha1, frame_size, grp, port, cookie, created_at FROM streams "
                "ORDER BY created_at"
            ):
                stream = _stream_of(row)
                if stream is None:
                    log.warning("state database %s: dropping unreadable stream record %r", self.path, row[0])
                    db.execute("DELETE FROM streams WHERE stream_id = ?", (row[0],))
                    continue
                streams.append((stream, tuple(leases.get(stream.stream_id, ()))))
            cursor = db.execute("SELECT value FROM settings WHERE key = ?", (_NEXT_GROUP,)).fetchone()
        return StoredState(streams=tuple(streams), next_group=cursor[0] if cursor else 0)

    # -- writing (each one transaction; StateUnwritable when it fails) -------------------------------------------

    def add_lease(
        self, lease: StoredLease, *, new_stream: StoredStream | None = None, next_group: int | None = None
    ) -> None:
        """Record a lease, and the stream it starts if it starts one (with the group cursor after it)."""
        with self._transaction() as db:
            if new_stream is not None:
                db.execute(
                    "INSERT INTO streams (stream_id, image, format, sha1, frame_size, grp, port, cookie, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        new_stream.stream_id, new_stream.image, new_stream.format, new_stream.sha1,
                        new_stream.frame_size, str(new_stream.group), new_stream.port, new_stream.cookie,
                        new_stream.created_at,
                    ),
                )  # fmt: skip
            if next_group is not None:
                db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (_NEXT_GROUP, next_group))
            db.execute(
                "INSERT INTO leases (lease_id, stream_id, created_at, renewed_at) VALUES (?, ?, ?, ?)",
                (lease.lease_id, lease.stream_id, lease.created_at, lease.renewed_at),
            )

    def remove(self, *, lease_ids: tuple[str, ...] = (), stream_ids: tuple[str, ...] = ()) -> None:
        """Forget leases (released or expired) and streams (stopped, or dropped at resume), together."""
        with self._transaction() as db:
            db.executemany("DELETE FROM leases WHERE lease_id = ?", [(lease_id,) for lease_id in lease_ids])
            db.executemany("DELETE FROM streams WHERE stream_id = ?", [(stream_id,) for stream_id in stream_ids])

    def renew(self, lease_id: str, *, at: float) -> None:
        with self._transaction() as db:
            db.execute("UPDATE leases SET renewed_at = ? WHERE lease_id = ?", (at, lease_id))

    # -- internals -----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise StateUnwritable(path=self.path, reason="the state database is closed (server stopping)")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise StateUnwritable(path=self.path, reason=str(error)) from error

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigurationError(
                setting="--state-db",
                problem=f"{self.path} has schema version {version}, made by a newer vmcast (this one knows up to "
                f"{SCHEMA_VERSION}); upgrade vmcast or use another --state-db",
            )
        if version == SCHEMA_VERSION:
            return
        # executescript() would commit on its own; statement by statement keeps the migration one transaction.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if version < 1:
                for statement in _SCHEMA_V1.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
            # Later versions: `if version < 2: ALTER TABLE ...` here, each step in this same transaction.
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        log.info("state database %s: schema version %d -> %d", self.path, version, SCHEMA_VERSION)


def _stream_of(row: tuple) -> StoredStream | None:
    stream_id, image, format, sha1, frame_size, group, port, cookie, created_at = row
    try:
        address = ipaddress.IPv4Address(group)
    except ValueError:
        return None
    if not isinstance(cookie, bytes) or len(cookie) != 8 or not 1 <= port <= 65535 or frame_size < 1:
        return None
    return StoredStream(
        stream_id=stream_id, image=image, format=format, sha1=sha1, frame_size=frame_size, group=address, port=port,
        cookie=cookie, created_at=created_at,
    )  # fmt: skip
