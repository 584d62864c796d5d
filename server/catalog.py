"""The images a server offers: the files of one directory, their formats detected by `qemu-img info`.

An image's name is its file name. Hidden files (a leading dot) and anything that is not a regular file
(after following symbolic links) are not images. Which formats an image is offered in follows from its
source format: the bytes as they are, plus raw and qcow2 when qemu-img can convert it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import ImageNotFound, ImageUnreadable
from .files import FileIdentity
from .qemu_img import ImageInfo, QemuImg
from .sources import fetch_source, is_source_spec

log = logging.getLogger(__name__)

# Formats qemu-img converts without anything more than the file (an encrypted LUKS image, say, would need a
# secret): these are offered as themselves and converted to each of `CONVERSION_TARGETS`. Any other format is
# offered as it is.
CONVERTIBLE_FORMATS = frozenset({"raw", "qcow2", "qcow", "qed", "vmdk", "vdi", "vhdx", "vpc"})
# What the server converts to, in the order offered: raw (what dd, EC2 snapshots and every hypervisor take)
# and qcow2 (what OpenStack and libvirt prefer; zeros take no room, so it often crosses the network faster).
CONVERSION_TARGETS = ("raw", "qcow2")


def formats_offered(source_format: str) -> tuple[str, ...]:
    """The formats an image of `source_format` can be streamed in, the source's own first.

    raw -> (raw, qcow2); qcow2 -> (qcow2, raw); vmdk, vhdx, vpc... -> (itself, raw, qcow2); anything else
    -> (itself).
    """
    if source_format not in CONVERTIBLE_FORMATS:
        return (source_format,)
    return (source_format, *(target for target in CONVERSION_TARGETS if target != source_format))


@dataclass(frozen=True, slots=True, kw_only=True)
class CatalogImage:
    """One image file and what it can be streamed as."""

    name: str
    """The file name, which is also what clients ask for."""
    path: Path
    """Absolute path of the file."""
    source_format: str
    """Format of the file as qemu-img detected it."""
    formats: tuple[str, ...]
    """Formats it can be streamed in."""
    size: int
    """Size of the file in bytes."""
    virtual_size: int
    """Size in bytes of the raw disk it describes."""
    backing_file: str | None = None
    """The file a layered image is layered on, if any."""


class Catalog:
    """Lists and looks up the images of a directory. Thread-safe.

    `qemu-img info` runs once per file identity (path, size, mtime_ns, inode), so listing is cheap and a
    replaced file is looked at again.

    Error handling: `ImageNotFound` for a name that is not an image of the directory; `ImageUnreadable` when
    qemu-img cannot read it. `list` leaves unreadable files out (and logs why) rather than failing.
    """

    def __init__(self, *, images_dir: Path, qemu: QemuImg, cache_dir: Path | None = None) -> None:
        self.images_dir = images_dir
        self._cache_dir = cache_dir
        self._qemu = qemu
        self._infos: dict[str, tuple[FileIdentity, ImageInfo]] = {}
        self._lock = threading.Lock()

    def list(self) -> list[CatalogImage]:
        images = []
        for entry in sorted(os.scandir(self.images_dir), key=lambda entry: entry.name):
            if entry.name.startswith("."):
                continue
            try:
                images.append(self.get(entry.name))
            except ImageNotFound:
                continue  # a directory, a socket, a dangling link, or it vanished meanwhile
            except ImageUnreadable as error:
                log.warning("leaving out %s: %s", entry.name, error)
        return images

    def get(self, name: str) -> CatalogImage:
        if self._cache_dir is not None and is_source_spec(name):
            return self._remote(name)
        if not name or name.startswith(".") or "/" in name or "\0" in name:
            raise ImageNotFound(name=name, images_dir=self.images_dir)
        path = self.images_dir / name
        try:
            stat = path.stat()
        except OSError:
            raise ImageNotFound(name=name, images_dir=self.images_dir) from None
        if not path.is_file():
            raise ImageNotFound(name=name, images_dir=self.images_dir)
        identity = FileIdentity.of_stat(path, stat)
        info = self._info(path, identity)
        return CatalogImage(
            name=name,
            path=path,
            source_format=info.format,
            formats=formats_offered(info.format),
            size=stat.st_size,
            # qemu-img rounds a raw file's virtual size up to whole 512-byte sectors; what is sent is the file.
            virtual_size=stat.st_size if info.format == "raw" else info.virtual_size,
            backing_file=info.backing_file,
        )

    def _remote(self, spec: str) -> CatalogImage:
        """An image from Glance (``glance:ID-or-name``), S3 (``s3://bucket/key``) or a URL, fetched into the cache.

        Fetched once per content (the source's own checksum or ETag says whether it changed) and verified while
        downloading; blocks for the download, so the API calls it from its thread pool. Its name is the spec
        with any credential in it replaced by ``***``, and never the raw spec.
        """
        fetched = fetch_source(spec, cache_dir=self._cache_dir, qemu=self._qemu)
        return CatalogImage(
            name=fetched.origin,
            path=fetched.path,
            source_format=fetched.source_format,
            formats=formats_offered(fetched.source_format),
            size=fetched.size,
            virtual_size=fetched.virtual_size,
        )

    def _info(self, path: Path, identity: FileIdentity) -> ImageInfo:
        with self._lock:
            known = self._infos.get(identity.path)
        if known is not None and known[0] == identity:
            return known[1]
        info = self._qemu.info(path)  # outside the lock: another image need not wait for this one
        with self._lock:
            self._infos[identity.path] = (identity, info)
        return info
