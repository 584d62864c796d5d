"""The raw form of images that are not raw (qcow2...), made once with `qemu-img convert` and cached.

A converted image is kept as ``<cache>/raw/<sha256 of the source>.raw``: keyed by content, so renaming or
copying the source reuses it and changing the source never does. qemu-img writes to a temporary name that is
renamed into place only once complete, so a crash or a failure never leaves a partial file under the final
name. One conversion per key runs at a time, across threads and processes (an `flock` per key): a second
request for the same image waits for the first and then uses its result.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from pathlib import Path

from .catalog import CatalogImage
from .errors import ImageChanged
from .files import FileIdentity, exclusive_lock, fsync_directory
from .qemu_img import QemuImg

log = logging.getLogger(__name__)


class Converter:
    """Converts images to raw into the cache directory. Thread-safe.

    Error handling: `ConversionFailed` with qemu-img's message; `ImageChanged` if the source changed while it
    was converted (the result is thrown away). A failed conversion leaves nothing behind.

    Resource handling: leftovers of conversions that a crash interrupted are removed at construction (only
    those whose lock no live process holds).
    """

    def __init__(self, *, cache_dir: Path, qemu: QemuImg) -> None:
        self._dir = cache_dir / "raw"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._qemu = qemu
        self._count_lock = threading.Lock()
        self.conversions = 0
        """How many times qemu-img convert ran (what the cache saves)."""
        self._remove_leftovers()

    def cached(self, key: str) -> Path | None:
        """The converted file for a source content key, if it was made before."""
        target = self._target(key)
        return target if target.is_file() else None

    def raw_of(self, image: CatalogImage, *, key: str) -> Path:
        """The raw form of `image`, whose content's SHA-256 is `key`: from the cache, or converted now."""
        target = self._target(key)
        if target.is_file():
            return target
        with exclusive_lock(self._dir / f"{key}.lock"):
            if target.is_file():  # made while we waited for the lock
                return target
            before = FileIdentity.of(image.path)
            temporary = self._dir / f".{key}.{os.getpid()}.{secrets.token_hex(4)}.partial"
            log.info("converting %s (%s) to raw", image.path, image.source_format)
            try:
                self._qemu.convert_to_raw(source=image.path, source_format=image.source_format, target=temporary)
                if FileIdentity.of(image.path) != before:
                    raise ImageChanged(path=image.path)
                with open(temporary, "rb+") as file:
                    os.fsync(file.fileno())
                os.replace(temporary, target)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
            fsync_directory(self._dir)
            with self._count_lock:
                self.conversions += 1
            log.info("converted %s to %s", image.path, target)
        return target

    def _target(self, key: str) -> Path:
        return self._dir / f"{key}.raw"

    def _remove_leftovers(self) -> None:
        for leftover in self._dir.glob(".*.partial"):
            key = leftover.name[1:].split(".", 1)[0]
            with exclusive_lock(self._dir / f"{key}.lock", blocking=False) as free:
                if free:
                    log.info("removing %s, left by an interrupted conversion", leftover)
                    leftover.unlink(missing_ok=True)
