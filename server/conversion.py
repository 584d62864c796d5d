"""Images converted to another format (qcow2 -> raw, raw -> qcow2...), made once with `qemu-img convert` and cached.

A conversion is kept as ``<cache>/<target format>/<sha256 of the source>.<target format>`` (say
``<cache>/qcow2/<key>.qcow2``): keyed by content and target format, so renaming or copying the source reuses
it and changing the source never does. qemu-img writes to a temporary name that is renamed into place only
once complete, so a crash or a failure never leaves a partial file under the final name. One conversion per
key and target format runs at a time, across threads and processes (an `flock` per key): a second request for
the same conversion waits for the first and then uses its result.

Whether converting the same source again gives the same bytes does not matter for correctness: a conversion is
made once and then served from the cache, and what a stream announces (SHA-1, block checksums) is computed from
the converted file itself, never from the source, and keyed by that file's identity (`vmcast.server.preparation`),
so a conversion made again (its cache file deleted, qemu-img upgraded) is never announced with the manifest
of an earlier one. For the record, raw output is the disk's content, and qcow2 output is the same bytes for
the same input and qemu-img version (writes in order, no compression; checked with qemu-img 7.2).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Iterable
from pathlib import Path

from .catalog import CONVERSION_TARGETS, CatalogImage
from .errors import ImageChanged
from .files import FileIdentity, exclusive_lock, fsync_directory
from .qemu_img import QemuImg

log = logging.getLogger(__name__)


class Converter:
    """Converts images into the cache directory, one subdirectory per target format. Thread-safe.

    Error handling: `ConversionFailed` with qemu-img's message; `ImageChanged` if the source changed while it
    was converted (the result is thrown away). A failed conversion leaves nothing behind. `ValueError` for a
    target format not in `target_formats` (the caller checks the formats an image is offered in first).

    Resource handling: leftovers of conversions that a crash interrupted are removed at construction (only
    those whose lock no live process holds).
    """

    def __init__(self, *, cache_dir: Path, qemu: QemuImg, target_formats: Iterable[str] = CONVERSION_TARGETS) -> None:
        # The directory of each target format is named after it: only formats known here ever become a path.
        self._dirs = {target_format: cache_dir / target_format for target_format in target_formats}
        for directory in self._dirs.values():
            directory.mkdir(parents=True, exist_ok=True)
        self._qemu = qemu
        self._count_lock = threading.Lock()
        self.conversions = 0
        """How many times qemu-img convert ran, all target formats together (what the cache saves)."""
        for directory in self._dirs.values():
            self._remove_leftovers(directory)

    def cached(self, key: str, *, target_format: str) -> Path | None:
        """The conversion to `target_format` of a source whose content key is `key`, if it was made before."""
        target = self._target(key, target_format)
        return target if target.is_file() else None

    def convert(self, image: CatalogImage, *, key: str, target_format: str) -> Path:
        """`image`, whose content's SHA-256 is `key`, in `target_format`: from the cache, or converted now."""
        target = self._target(key, target_format)
        if target.is_file():
            return target
        directory = target.parent
        with exclusive_lock(directory / f"{key}.lock"):
            if target.is_file():  # made while we waited for the lock
                return target
            before = FileIdentity.of(image.path)
            temporary = directory / f".{key}.{os.getpid()}.{secrets.token_hex(4)}.partial"
            log.info("converting %s (%s) to %s", image.path, image.source_format, target_format)
            try:
                self._qemu.convert(
                    source=image.path, source_format=image.source_format, target=temporary, target_format=target_format
                )
                if FileIdentity.of(image.path) != before:
                    raise ImageChanged(path=image.path)
                with open(temporary, "rb+") as file:
                    os.fsync(file.fileno())
                os.replace(temporary, target)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
            fsync_directory(directory)
            with self._count_lock:
                self.conversions += 1
            log.info("converted %s to %s", image.path, target)
        return target

    def _target(self, key: str, target_format: str) -> Path:
        directory = self._dirs.get(target_format)
        if directory is None:
            raise ValueError(f"no conversion to {target_format!r}; converts to {', '.join(self._dirs)}")
        return directory / f"{key}.{target_format}"

    @staticmethod
    def _remove_leftovers(directory: Path) -> None:
        for leftover in directory.glob(".*.partial"):
            key = leftover.name[1:].split(".", 1)[0]
            with exclusive_lock(directory / f"{key}.lock", blocking=False) as free:
                if free:
                    log.info("removing %s, left by an interrupted conversion", leftover)
                    leftover.unlink(missing_ok=True)
