"""What every kind of source (Glance, S3, HTTP) gives the fetcher: a description, then a body of bytes.

A `Remote` is used in two steps, so that unchanged content is never downloaded twice: `describe` costs one
metadata request (Glance image record, S3 HEAD, HTTP HEAD) and says what the content is; `open` starts the
download and says what the bytes it returns are (for HTTP, the GET's own headers may name newer content
than the HEAD did).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from .verify import ExpectedContent

# Bytes asked of the network stack per read: large enough that per-call costs vanish, small enough that
# progress is reported often and memory stays flat (one chunk in flight per download).
CHUNK_SIZE = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteContent:
    """What a source says its content is, before or while it is downloaded."""

    identity: str | None
    """Text that names exactly this content (e.g. Glance image id + sha512), whose SHA-256 is the cache key;
    None when nothing short of the bytes themselves identifies it (a URL with no validator)."""
    name: str
    """The source's own name for it (Glance image name, last segment of the key or URL path)."""
    expected: ExpectedContent
    """Size and digests to check the bytes against."""
    declared_format: str | None = None
    """The qemu-img format the source declares for the data (Glance's disk_format), None if unchecked."""

    @property
    def key(self) -> str | None:
        return content_key(self.identity) if self.identity is not None else None


def content_key(identity: str) -> str:
    """The cache key of a content identity: 64 hex digits, whatever characters the identity holds."""
    return hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()


def identity_of(*parts: object) -> str:
    """One identity text from its parts, unambiguously (NUL-separated: no part of a URL or id holds NUL)."""
    return "\0".join("" if part is None else str(part) for part in parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class Body:
    """A download in progress."""

    content: RemoteContent
    """What the response that carries these bytes says they are."""
    chunks: Iterator[bytes]
    """The bytes, in order; SDK errors while reading are raised as `SourceError`s."""


class Remote(Protocol):
    """One source, with its client open until `close`."""

    origin: str
    """The source as it may be shown."""

    def describe(self) -> RemoteContent:
        """One metadata request: what the content is now. Raises `SourceError`s."""
        ...

    def open(self, described: RemoteContent) -> contextlib.AbstractContextManager[Body]:
        """Start downloading what `describe` found; leaving the context closes the response."""
        ...

    def close(self) -> None:
        """Release the client (connections, sessions)."""
        ...
