"""Write a download to a file while checking, in the same pass, that it is what the source announced.

As ironic-python-agent does, the bytes are hashed as they arrive, so verifying needs no second read: each
algorithm the source gave a digest for (Glance's ``os_hash_algo``, its md5 ``checksum``, an S3 single-part
ETag...) plus SHA-256, which the server keys its conversions and manifests by. A download longer than
announced is stopped as soon as it overflows, not after filling the disk.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from .errors import SourceChecksumMismatch, SourceSizeMismatch, SourceUnverifiable

Progress = Callable[[int, int | None], None]
"""Called as ``progress(bytes_done, bytes_total)`` (total None when unknown), in the fetching thread."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpectedContent:
    """What a source says its bytes are."""

    size: int | None
    """Their number, if announced."""
    digests: Mapping[str, str] = field(default_factory=dict)
    """hashlib algorithm name (``sha512``, ``md5``...) -> lower-case hex digest of the bytes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedContent:
    """What the bytes written turned out to be, once every announced property was checked."""

    size: int
    """Number of bytes written."""
    sha256: str
    """Their SHA-256 (hex)."""
    verified: tuple[str, ...]
    """The algorithms whose announced digest matched (empty when the source announced none)."""


def new_hasher(algorithm: str) -> hashlib._Hash:
    """A hashlib object for `algorithm`; raises `ValueError` for one this Python does not have."""
    if algorithm == "md5":
        return hashlib.md5(usedforsecurity=False)  # Glance's and S3's legacy checksum, for integrity only
    return hashlib.new(algorithm)


def copy_verified(
    chunks: Iterable[bytes],
    file: BinaryIO,
    *,
    expected: ExpectedContent,
    origin: str,
    progress: Progress | None = None,
) -> ReceivedContent:
    """Write `chunks` to `file`, then check their size and digests against `expected`.

    Error handling: `SourceSizeMismatch` as soon as more bytes arrive than announced, or at the end if fewer
    did; `SourceChecksumMismatch` for the first announced digest that differs; `SourceUnverifiable` for a
    digest algorithm this Python lacks (checked before anything is read). On error the file holds a partial
    or wrong copy: the caller deletes it. Whatever `chunks` raises passes through.
    """
    hashers = {}
    for algorithm in expected.digests:
        try:
            hashers[algorithm] = new_hasher(algorithm)
        except ValueError:
            raise SourceUnverifiable(
                origin=origin, reason=f"its checksum uses {algorithm!r}, which this server's Python lacks"
            ) from None
    sha256 = hashers.get("sha256") or hashlib.sha256()
    all_hashers = [*hashers.values(), *([] if "sha256" in hashers else [sha256])]
    done = 0
    if progress is not None:
        progress(0, expected.size)
    for chunk in chunks:
        if not chunk:
            continue
        done += len(chunk)
        if expected.size is not None and done > expected.size:
            raise SourceSizeMismatch(origin=origin, expected=expected.size, actual=done, truncated=False)
        file.write(chunk)
        for hasher in all_hashers:
            hasher.update(chunk)
        if progress is not None:
            progress(done, expected.size)
    if expected.size is not None and done != expected.size:
        raise SourceSizeMismatch(origin=origin, expected=expected.size, actual=done, truncated=True)
    for algorithm, hasher in hashers.items():
        actual = hasher.hexdigest()
        wanted = expected.digests[algorithm].strip().lower()
        if not hmac.compare_digest(actual, wanted):
            raise SourceChecksumMismatch(origin=origin, algorithm=algorithm, expected=wanted, actual=actual)
    return ReceivedContent(size=done, sha256=sha256.hexdigest(), verified=tuple(hashers))
