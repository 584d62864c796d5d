"""Why an image source could not be fetched: one class per way, all under `SourceError` (a `ServerError`).

Policy, as for the rest of vmcast.server: keyword-only fields and a message that says what to do. On top of
that, credentials never appear in these messages: a source is shown by its *origin* (the spec with any URL
password and every query value replaced by ``***``, see `specs`), and messages that come from openstacksdk,
keystoneauth, botocore or httpx pass through `redact` with the secrets of the client that raised them. The
SDK's exception is never chained (``raise ... from None``): its attributes may hold request headers or bodies.

`STATUS_OF` suggests the HTTP status of each class, most specific first, for `vmcast.server.api.errors`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from ..errors import ServerError

REDACTED = "***"

# Secrets shorter than this are not searched for: replacing every "a" of a message helps nobody, and real
# passwords and keys are longer.
_MIN_SECRET_LENGTH = 4

# Anything shaped like a credential assignment in free text (a request body, a URL query, a config dump),
# whatever its value: `password=...`, `"secret_access_key": "..."`, `X-Auth-Token: ...`, `Signature=...`. The
# name must end with the keyword, so that prose ("tokens: ...") is left alone.
_ASSIGNMENT = re.compile(
    r"""(?P<key>["']?[\w-]*(?:password|passwd|secret|token|signature|credential|api[_-]?key|access[_-]?key)"""
    r"""["']?\s*[:=]\s*["']?)(?P<value>[^\s"'&,;}]+)""",
    re.IGNORECASE,
)
# user:password@ in any URL inside a message.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)(?P<password>[^/\s@]+)(?P<at>@)")


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with each of `secrets`, URL passwords and every ``password=value``-like value replaced by ``***``."""
    for secret in sorted({s for s in secrets if s and len(s) >= _MIN_SECRET_LENGTH}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _URL_PASSWORD.sub(lambda match: match["head"] + REDACTED + match["at"], text)
    return _ASSIGNMENT.sub(lambda match: match["key"] + REDACTED, text)


class SourceError(ServerError):
    """Root of the errors of `vmcast.server.sources`: the image was not fetched, and nothing was cached."""

    origin: str
    """The source, as it may be shown (no secrets)."""


class SpecInvalid(SourceError):
    """The text is not an image source this server understands."""

    def __init__(self, *, spec: str, problem: str) -> None:
        super().__init__(
            f"{spec!r} is not a usable image source: {problem} "
            "(use glance:<image id or name>, s3://<bucket>/<key>, or an http:// or https:// URL)"
        )
        self.origin = spec
        self.problem = problem


class SourceNotConfigured(SourceError):
    """The server lacks what it needs to reach that kind of source (configuration, credentials, a library)."""

    def __init__(self, *, origin: str, reason: str) -> None:
        super().__init__(f"cannot fetch {origin}: {reason}")
        self.origin = origin
        self.reason = reason


class SourceUnreachable(SourceError):
    """No answer from the endpoint (refused, timed out, name not resolved, connection dropped)."""

    def __init__(self, *, origin: str, endpoint: str | None, reason: str) -> None:
        where = f" at {endpoint}" if endpoint else ""
        super().__init__(f"cannot reach the server of {origin}{where}: {reason}")
        self.origin = origin
        self.endpoint = endpoint
        self.reason = reason


class SourceCredentialsRejected(SourceError):
    """The endpoint refused the server's credentials, or they do not allow this request."""

    def __init__(self, *, origin: str, endpoint: str | None, user: str | None, reason: str) -> None:
        who = f" as user {user}" if user else ""
        where = f" at {endpoint}" if endpoint else ""
        super().__init__(f"access to {origin} was refused{where}{who}: {reason}")
        self.origin = origin
        self.endpoint = endpoint
        self.user = user
        self.reason = reason


class SourceNotFound(SourceError):
    """No such image, object or URL (or the credentials do not let the server see it)."""

    def __init__(self, *, origin: str, reason: str) -> None:
        super().__init__(f"image source {origin} not found: {reason}")
        self.origin = origin
        self.reason = reason


class SourceAmbiguous(SourceError):
    """A Glance image name matches several images: ask for one by id."""

    def __init__(self, *, origin: str, name: str, candidates: Sequence[str]) -> None:
        super().__init__(
            f"{len(candidates)} active Glance images are named {name!r} ({', '.join(candidates)}); "
            f"ask for one by id, e.g. glance:{candidates[0]}"
        )
        self.origin = origin
        self.name = name
        self.candidates = tuple(candidates)


class SourceNotReady(SourceError):
    """The image exists but its data cannot be downloaded (yet): queued, saving, deactivated..."""

    def __init__(self, *, origin: str, status: str) -> None:
        super().__init__(f"image source {origin} is {status!r}, not active: its data cannot be downloaded now")
        self.origin = origin
        self.status = status


class SourceUnverifiable(SourceError):
    """The source gives no checksum this server can verify its bytes against, so they are refused."""

    def __init__(self, *, origin: str, reason: str) -> None:
        super().__init__(f"refusing {origin}: {reason}")
        self.origin = origin
        self.reason = reason


class SourceRequestFailed(SourceError):
    """The endpoint answered a request with an error not covered by the classes above."""

    def __init__(self, *, origin: str, operation: str, reason: str, status: int | None = None) -> None:
        code = f" (HTTP {status})" if status else ""
        super().__init__(f"could not {operation} for {origin}{code}: {reason}")
        self.origin = origin
        self.operation = operation
        self.reason = reason
        self.status = status


class SourceChecksumMismatch(SourceError):
    """The bytes received do not have the checksum the source announced: they were thrown away."""

    def __init__(self, *, origin: str, algorithm: str, expected: str, actual: str) -> None:
        super().__init__(
            f"the data of {origin} has {algorithm} {actual}, but the source announced {expected}: "
            "download discarded (corrupted in storage or in transit; try again, or check the source)"
        )
        self.origin = origin
        self.algorithm = algorithm
        self.expected = expected
        self.actual = actual


class SourceSizeMismatch(SourceError):
    """The bytes received are not as many as the source announced: they were thrown away."""

    def __init__(self, *, origin: str, expected: int, actual: int, truncated: bool) -> None:
        got = f"{actual}" if truncated else f"more than {expected}"
        super().__init__(f"{origin} announced {expected} bytes but {got} arrived: download discarded (try again)")
        self.origin = origin
        self.expected = expected
        self.actual = actual
        self.truncated = truncated


class SourceChanged(SourceError):
    """The source changed between the look at its metadata and the download; retrying is safe."""

    def __init__(self, *, origin: str) -> None:
        super().__init__(f"{origin} changed while it was being fetched; try again")
        self.origin = origin


class SourceFormatRefused(SourceError):
    """The fetched file is not an image the server will convert or stream (unsafe, unknown, mislabelled)."""

    def __init__(self, *, origin: str, format: str | None, reason: str) -> None:
        super().__init__(f"refusing {origin}: {reason}")
        self.origin = origin
        self.format = format
        self.reason = reason


class NotEnoughSpace(SourceError):
    """The cache's file system has not room for the download."""

    def __init__(self, *, origin: str, needed: int, available: int, directory: str) -> None:
        super().__init__(f"{origin} is {needed} bytes but only {available} are free in {directory}: free some space")
        self.origin = origin
        self.needed = needed
        self.available = available
        self.directory = directory


# Suggested HTTP statuses, most specific first (the caller's credentials are not involved: a refusal of the
# server's own cloud credentials, or a failing cloud, is a 502 Bad Gateway, not a 401/403).
STATUS_OF: tuple[tuple[type[SourceError], int], ...] = (
    (SpecInvalid, 422),
    (SourceNotFound, 404),
    (SourceAmbiguous, 409),
    (SourceNotReady, 409),
    (SourceChanged, 409),
    (SourceFormatRefused, 422),
    (SourceUnverifiable, 422),
    (SourceNotConfigured, 503),
    (NotEnoughSpace, 507),
    (SourceUnreachable, 502),
    (SourceCredentialsRejected, 502),
    (SourceChecksumMismatch, 502),
    (SourceSizeMismatch, 502),
    (SourceRequestFailed, 502),
    (SourceError, 502),
)
