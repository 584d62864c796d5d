"""From "image X as format F" to a file to send and its manifest: the work done before a stream can start.

Serving an image's own format sends its file; serving another format (raw of a qcow2, qcow2 of a raw...)
sends the cached conversion. The first time, an image sent as it is is read once (its SHA-256 content key and
its manifest from the same pass); an image sent converted is read once for its key, converted once, and its
conversion read once for the manifest. Every later time costs a few `stat` calls and reading two small JSON
files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmcast.protocol import Manifest, ManifestBuilder

from .catalog import CatalogImage
from .conversion import Converter
from .errors import FormatNotOffered, ImageChanged
from .files import FileIdentity
from .fingerprints import Fingerprints
from .manifests import ManifestStore


@dataclass(frozen=True, slots=True, kw_only=True)
class PreparedImage:
    """An image ready to stream: the file whose bytes go on the wire and what they are."""

    name: str
    """Image name (its file name in the images directory)."""
    format: str
    """Format of the bytes sent."""
    path: Path
    """The file sent: the image itself, or its cached conversion."""
    identity: FileIdentity
    """`path`'s identity when the manifest was made for it; the sender refuses a file that no longer has it."""
    manifest: Manifest
    """SHA-1, layout and block checksums of `path`."""
    source_sha256: str
    """SHA-256 of the image file's content, the key of every cache entry made from it (with, for the manifest
    of a conversion, the converted file's identity)."""


class Preparer:
    """Prepares images for streaming. Thread-safe; blocking (run it in a worker thread, never on an event loop).

    Error handling: `FormatNotOffered`; `ImageChanged` when the file changes under it (retrying is safe);
    `ConversionFailed`; `OSError` when a file cannot be read.
    """

    def __init__(
        self, *, fingerprints: Fingerprints, converter: Converter, manifests: ManifestStore, frame_size: int
    ) -> None:
        self._fingerprints = fingerprints
        self._converter = converter
        self._manifests = manifests
        self._frame_size = frame_size

    def prepare(self, image: CatalogImage, format: str) -> PreparedImage:
        if format not in image.formats:
            raise FormatNotOffered(name=image.name, format=format, offered=image.formats)
        sent_as_is = format == image.source_format
        source_before = FileIdentity.of(image.path)
        key = self._content_key(image, format=format, sent_as_is=sent_as_is)
        path = image.path if sent_as_is else self._converter.convert(image, key=key, target_format=format)
        identity = FileIdentity.of(path)
        manifest = self._manifests.get(
            path, key=_manifest_key(key, sent_as_is=sent_as_is, sent=identity), name=image.name, format=format,
            frame_size=self._frame_size,
        )  # fmt: skip
        if FileIdentity.of(image.path) != source_before or FileIdentity.of(path) != identity:
            raise ImageChanged(path=image.path)
        return PreparedImage(
            name=image.name, format=format, path=path, identity=identity, manifest=manifest, source_sha256=key
        )

    def _content_key(self, image: CatalogImage, *, format: str, sent_as_is: bool) -> str:
        with self._fingerprints.lock(image.path):
            key = self._fingerprints.remembered(image.path)
            if key is not None:
                return key
            if not sent_as_is:
                return self._fingerprints.compute(image.path)
            # The file itself is sent: compute its manifest from the same read as its key.
            builder = ManifestBuilder(name=image.name, format=format, frame_size=self._frame_size)
            key = self._fingerprints.compute(image.path, also=builder.update)
            self._manifests.save(builder.finish(), key=key)
            return key


def _manifest_key(source_key: str, *, sent_as_is: bool, sent: FileIdentity) -> str:
    """The key of the manifest of what is sent: the source's content key, and for a conversion its identity too.

    The bytes of a conversion are qemu-img's. Made again (its cache file deleted, qemu-img upgraded or its
    defaults changed), a qcow2 may be laid out differently, or a raw read differently after a qemu-img fix,
    even with the same length; keyed by the source alone, a cached manifest would then announce a SHA-1 that
    no receiver could ever verify. The converted file's inode and mtime change whenever it is made again, and
    never otherwise (the cache is written only by renaming whole files into place).
    """
    if sent_as_is:
        return source_key
    return f"{source_key}.{sent.inode}.{sent.mtime_ns}"
