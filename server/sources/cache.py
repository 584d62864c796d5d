"""The download cache: fetched images kept by the content identity of their source.

Layout, in the directory given (``<server cache>/sources``):

- ``<key>.image``: the fetched bytes, exactly as the source holds them;
- ``<key>.json``: what they are (size, SHA-256, format, virtual size, name), written before the image is
  renamed into place, so an image under its final name always has its record;
- ``<key>.lock``: the `flock` that makes concurrent fetches of one key (threads or processes) download once;
- ``.<lock>.<pid>.<random>.partial``: a download in progress, renamed to ``<key>.image`` only once verified
  and inspected, so a crash or a failure never leaves a partial file under a final name.

The key is the SHA-256 (hex) of the source's content identity (see `fetch`): two fetches with the same key
are the same bytes. Nothing is ever evicted here; the operator can delete entries (image and record) while
no fetch of them runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import exclusive_lock, fsync_directory, write_atomically

log = logging.getLogger(__name__)

_RECORD_VERSION = 1
_KEY = re.compile(r"[0-9a-f]{64}")
# Lock names of downloads whose key is only known once they end (a URL with no ETag nor Last-Modified).
_ANONYMOUS = "anonymous-"


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheEntry:
    """One fetched image in the cache."""

    key: str
    """The content key (hex SHA-256 of the source's content identity)."""
    path: Path
    """The image file."""
    size: int
    """Its size in bytes."""
    sha256: str
    """SHA-256 (hex) of its bytes."""
    source_format: str
    """Its format, as qemu-img detected it."""
    virtual_size: int
    """Size in bytes of the disk it describes."""
    name: str
    """The source's name for it when it was fetched."""
    origin: str
    """The source it was fetched from, as it may be shown."""


class SourceCache:
    """Fetched images in one directory. Thread- and process-safe (see the module docstring).

    Resource handling: leftovers of downloads that a crash interrupted are removed at construction (only
    those whose lock no live process holds).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()

    def image_path(self, key: str) -> Path:
        return self.directory / f"{_checked(key)}.image"

    def lookup(self, key: str) -> CacheEntry | None:
        """The entry of `key`, if complete (image and matching record), else None."""
        image = self.image_path(key)
        try:
            record = json.loads((self.directory / f"{key}.json").read_text())
            if record.pop("version") != _RECORD_VERSION:
                return None
            entry = CacheEntry(path=image, **record)
            if entry.key != key or image.stat().st_size != entry.size:
                raise ValueError(f"{image} is not the size its record says")
            return entry
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as error:
            log.warning("ignoring the damaged source cache entry %s: %s", key, error)
            return None

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold `key`'s lock: one download per key at a time, across threads and processes."""
        with exclusive_lock(self.directory / f"{_checked(key)}.lock"):
            yield

    @contextlib.contextmanager
    def partial_file(self, key: str | None) -> Iterator[Path]:
        """A new temporary path for a download of `key` (None: not known yet), deleted on leaving unless
        `commit` moved it into place. Hold `lock(key)` around it when `key` is known."""
        if key is None:
            lock_name = f"{_ANONYMOUS}{secrets.token_hex(8)}"
            lock_file = self.directory / f"{lock_name}.lock"
            held = exclusive_lock(lock_file)
        else:
            lock_name = _checked(key)
            lock_file = None
            held = contextlib.nullcontext()
        path = self.directory / f".{lock_name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
        try:
            with held:
                yield path
        finally:
            path.unlink(missing_ok=True)
            if lock_file is not None:
                lock_file.unlink(missing_ok=True)

    def commit(self, partial: Path, entry: CacheEntry) -> CacheEntry:
        """Move the verified, inspected download `partial` into place as `entry` (whose path is ignored)."""
        target = self.image_path(entry.key)
        with open(partial, "rb+") as file:
            os.fsync(file.fileno())
        fields = asdict(entry)
        del fields["path"]
        write_atomically(
            self.directory / f"{entry.key}.json", json.dumps({"version": _RECORD_VERSION, **fields}).encode()
        )
        # Another fetch may have stored the same key meanwhile (a key found only after the download): same
        # key, same bytes, so replacing it is harmless.
        os.replace(partial, target)
        fsync_directory(self.directory)
        stored = CacheEntry(**{**fields, "path": target})
        log.info("cached %s as %s (%d bytes, %s)", entry.origin, target.name, entry.size, entry.source_format)
        return stored

    def _remove_leftovers(self) -> None:
        for leftover in self.directory.glob(".*.partial"):
            lock_name = leftover.name[1:].split(".", 1)[0]
            lock_file = self.directory / f"{lock_name}.lock"
            with exclusive_lock(lock_file, blocking=False) as free:
                if free:
                    log.info("removing %s, left by an interrupted download", leftover)
                    leftover.unlink(missing_ok=True)
                    if lock_name.startswith(_ANONYMOUS):
                        lock_file.unlink(missing_ok=True)


def _checked(key: str) -> str:
    # Keys become file names: anything but 64 hex digits is a bug, never a path.
    if not _KEY.fullmatch(key):
        raise ValueError(f"not a content key: {key!r}")
    return key
