"""`fetch_source`: from an image source spec to a verified, inspected local file in the cache.

In order, and why:

1. The spec is parsed (`specs.parse_spec`) and a client for its kind opened: openstacksdk, boto3, httpx.
2. One metadata request (`Remote.describe`) says what the content is now. If its content key is cached, that
   file is the answer (``downloaded=False``): nothing is downloaded.
3. Else the key's lock is taken (an `flock`, like the converter's), so that concurrent fetches of one key,
   in threads or processes, download once: who waited finds the entry made meanwhile.
4. The download (`Remote.open`) streams into a temporary file in the cache directory, hashed and counted in
   the same pass (`verify.copy_verified`) against what the source announced. Any failure deletes it.
5. qemu-img says what the file is; unsafe or unaccepted images are refused (`formats.inspect_fetched`).
6. The record, then the file, are renamed into place under the content key (`cache.SourceCache.commit`).

Error handling: `SourceError` subclasses (see `errors`), whose messages never hold credentials;
`QemuImgMissing` when qemu-img cannot be found; `OSError` when the cache cannot be written (disk full...).
Nothing partial is left in the cache in any case.

Resource handling: blocking (network, disk, hashing, qemu-img): call it from a worker thread
(``trio.to_thread.run_sync``, or FastAPI's thread pool for a plain ``def`` endpoint), never on an event
loop. Memory is one chunk (`remote.CHUNK_SIZE`) per download; the SDK clients are closed before returning.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..qemu_img import QemuImg
from .cache import CacheEntry, SourceCache
from .errors import NotEnoughSpace
from .formats import inspect_fetched
from .remote import Remote, RemoteContent, content_key, identity_of
from .specs import GlanceSpec, HttpSpec, S3Spec, Spec, parse_spec
from .verify import Progress, copy_verified

log = logging.getLogger(__name__)

CACHE_SUBDIRECTORY = "sources"
"""`fetch_source` keeps its files in ``<cache_dir>/sources``, apart from the server's other caches."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchedSource:
    """An image fetched from a remote source: a verified local file, and what it is."""

    path: Path
    """The file in the cache (``<cache_dir>/sources/<content_key>.image``); read it, never write it."""
    name: str
    """The source's own name for the image: Glance image name, last segment of the S3 key or URL path."""
    origin: str
    """The spec as it may be shown: a URL's password and query values replaced by ``***``."""
    source_format: str
    """Format of the file, as qemu-img detected it (raw, qcow2, vmdk, vpc, vhdx...)."""
    virtual_size: int
    """Size in bytes of the disk it describes (the file size for raw)."""
    size: int
    """Size of the file in bytes."""
    content_key: str
    """Hex SHA-256 of the source's content identity (e.g. Glance id + os_hash_value): the cache key."""
    sha256: str
    """Hex SHA-256 of the file's bytes (computed during the download): the server's content key."""
    downloaded: bool
    """True if this call downloaded the bytes, False if they came from the cache."""


def fetch_source(
    spec: str,
    *,
    cache_dir: Path,
    progress: Progress | None = None,
    cloud: str | None = None,
    qemu: QemuImg | None = None,
) -> FetchedSource:
    """Fetch the image `spec` names into ``cache_dir/sources``, or find it there; see the module docstring.

    `spec`: ``glance:<image id or name>``, ``s3://<bucket>/<key>``, or an ``http(s)://`` URL (`specs`).
    `progress`: called as ``progress(bytes_done, bytes_total)`` during a download (total None if unknown).
    `cloud`: the clouds.yaml cloud for ``glance:`` specs (default: ``OS_CLOUD`` / ``OS_*`` variables).
    `qemu`: the server's `QemuImg` (default: ``qemu-img`` from PATH).
    """
    source = parse_spec(spec)
    qemu = qemu if qemu is not None else QemuImg()
    cache = SourceCache(cache_dir / CACHE_SUBDIRECTORY)
    remote = _remote_for(source, cloud=cloud)
    try:
        described = remote.describe()
        key = described.key
        if key is None:
            return _download(remote, described, cache=cache, qemu=qemu, progress=progress, locked_key=None)
        found = cache.lookup(key)
        if found is None:
            with cache.lock(key):
                found = cache.lookup(key)  # fetched by another thread or process while we waited
                if found is None:
                    return _download(remote, described, cache=cache, qemu=qemu, progress=progress, locked_key=key)
        log.info("%s is cached (%s); not downloading it", remote.origin, found.path.name)
        return _result(found, name=described.name, origin=remote.origin, downloaded=False)
    finally:
        remote.close()


def _remote_for(source: Spec, *, cloud: str | None) -> Remote:
    # Imported here: openstacksdk and boto3 are optional ("vmcast[clouds]") and slow to import.
    if isinstance(source, GlanceSpec):
        from .glance import GlanceRemote

        return GlanceRemote(source, cloud=cloud)
    if isinstance(source, S3Spec):
        from .s3 import S3Remote

        return S3Remote(source)
    if isinstance(source, HttpSpec):
        from .http import HttpRemote

        return HttpRemote(source)
    raise TypeError(f"not a source spec: {source!r}")


def _download(
    remote: Remote,
    described: RemoteContent,
    *,
    cache: SourceCache,
    qemu: QemuImg,
    progress: Progress | None,
    locked_key: str | None,
) -> FetchedSource:
    started = time.monotonic()
    origin = remote.origin
    with cache.partial_file(locked_key) as partial:
        with remote.open(described) as body:
            content = body.content
            key = content.key
            if key is not None and key != locked_key and (found := cache.lookup(key)) is not None:
                # The GET named content that is cached (a server without HEAD): its body is not read.
                log.info("%s is cached (%s); not downloading it", origin, found.path.name)
                return _result(found, name=content.name, origin=origin, downloaded=False)
            _check_space(cache.directory, content.expected.size, origin=origin)
            size = content.expected.size
            log.info("downloading %s (%s)", origin, f"{size} bytes" if size is not None else "size unknown")
            with open(partial, "xb") as file:
                received = copy_verified(body.chunks, file, expected=content.expected, origin=origin, progress=progress)
        if key is None:  # nothing but the bytes identifies this content
            key = content_key(identity_of("sha256", received.sha256))
            if (found := cache.lookup(key)) is not None:
                log.info("%s: same bytes as the cached %s", origin, found.path.name)
                return _result(found, name=content.name, origin=origin, downloaded=True)
        inspected = inspect_fetched(partial, qemu=qemu, origin=origin, declared_format=content.declared_format)
        entry = cache.commit(
            partial,
            CacheEntry(
                key=key, path=partial, size=received.size, sha256=received.sha256, source_format=inspected.format,
                virtual_size=inspected.virtual_size, name=content.name, origin=origin,
            ),
        )  # fmt: skip
    seconds = time.monotonic() - started
    log.info("fetched %s: %d bytes in %.1f s, verified (%s), %s", origin, received.size, seconds,
             ", ".join(received.verified) or "size only", inspected.format)  # fmt: skip
    return _result(entry, name=content.name, origin=origin, downloaded=True)


def _check_space(directory: Path, size: int | None, *, origin: str) -> None:
    if size is None:
        return
    available = shutil.disk_usage(directory).free
    if size > available:
        raise NotEnoughSpace(origin=origin, needed=size, available=available, directory=str(directory))


def _result(entry: CacheEntry, *, name: str, origin: str, downloaded: bool) -> FetchedSource:
    return FetchedSource(
        path=entry.path,
        name=name,
        origin=origin,
        source_format=entry.source_format,
        virtual_size=entry.virtual_size,
        size=entry.size,
        content_key=entry.key,
        sha256=entry.sha256,
        downloaded=downloaded,
    )
