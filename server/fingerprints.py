"""Content keys: the SHA-256 of a file's bytes, remembered on disk per file identity.

Converted images and manifests are cached under the SHA-256 of the source's content, so two names for the
same bytes share one cache entry and a changed file never reuses a stale one. Hashing a large image takes
a while, so the hash is remembered per (path, size, mtime_ns, inode) (`FileIdentity`) in a small JSON file
in the cache directory: a server that starts again does not read its images again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import ImageChanged
from .files import FileIdentity, read_in_chunks, write_atomically

log = logging.getLogger(__name__)

_RECORD_VERSION = 1


class Fingerprints:
    """SHA-256 of files, computed once per file identity. Thread-safe.

    Error handling: `ImageChanged` if a file changes while it is read; `OSError` if it cannot be read.
    A damaged record is ignored (the file is hashed again).
    """

    def __init__(self, *, cache_dir: Path) -> None:
        self._records = cache_dir / "fingerprints"
        self._records.mkdir(parents=True, exist_ok=True)
        self.passes = 0
        """How many times a file's content was read to hash it (what remembering saves)."""
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def lock(self, path: Path) -> Iterator[None]:
        """Hold the lock of one path, so that concurrent requests for the same file hash it once."""
        with self._guard:
            lock = self._locks.setdefault(str(path), threading.Lock())
        with lock:
            yield

    def sha256(self, path: Path) -> str:
        """The SHA-256 (hex) of the file's content, remembered or computed now."""
        with self.lock(path):
            return self.remembered(path) or self.compute(path)

    def remembered(self, path: Path) -> str | None:
        """The remembered SHA-256 if the file's identity has not changed since it was hashed, else None."""
        identity = FileIdentity.of(path)
        try:
            record = json.loads(self._record_path(path).read_text())
            if record.get("version") == _RECORD_VERSION and FileIdentity(**record["identity"]) == identity:
                return str(record["sha256"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError) as error:
            log.warning("ignoring a damaged fingerprint record for %s: %s", path, error)
        return None

    def compute(self, path: Path, *, also: Callable[[memoryview], None] | None = None) -> str:
        """Hash the file now and remember the result; `also` gets every chunk too (one read, two uses)."""
        digest = hashlib.sha256()
        if also is None:
            consume = digest.update
        else:

            def consume(chunk: memoryview) -> None:
                digest.update(chunk)
                also(chunk)

        before, after = read_in_chunks(path, consume)
        with self._guard:
            self.passes += 1
        identity = FileIdentity.of_stat(path, before)
        if not identity.same_content_as(after):
            raise ImageChanged(path=path)
        sha256 = digest.hexdigest()
        record = {"version": _RECORD_VERSION, "identity": _as_dict(identity), "sha256": sha256}
        write_atomically(self._record_path(path), json.dumps(record).encode())
        return sha256

    def _record_path(self, path: Path) -> Path:
        # One record per path, overwritten when the file changes: the records never pile up.
        return self._records / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"


def _as_dict(identity: FileIdentity) -> dict[str, object]:
    return {"path": identity.path, "size": identity.size, "mtime_ns": identity.mtime_ns, "inode": identity.inode}
