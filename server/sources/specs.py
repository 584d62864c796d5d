"""Image source specs: the text a client names a remote image by, parsed into a type at the boundary.

Grammar (the scheme decides; everything after it belongs to the source, verbatim):

- ``glance:<image id or name>``: an image of the OpenStack cloud the server is configured for. A UUID is
  looked up as an id first, then as a name; anything else is a name, which must be unique among the active
  images the server's user sees. ``glance://...`` is reserved (for naming a cloud) and refused today.
- ``s3://<bucket>/<key>``: an S3 object. The key is taken as it is written (no percent-decoding, no query):
  ``s3://b/a?b`` is the key ``a?b``, as the AWS CLI reads it.
- ``http://...`` / ``https://...``: a URL, fetched with GET. It may carry ``user:password@`` (HTTP basic
  authentication) or a presigned query: neither ever appears in the *origin*, the spec as it may be shown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from .errors import REDACTED, SpecInvalid

GLANCE_PREFIX = "glance:"
S3_PREFIX = "s3://"
HTTP_SCHEMES = ("http", "https")

# Bucket names as AWS allows them today (3-63 of lower-case letters, digits, dots and hyphens) plus the
# upper case and underscores of legacy us-east-1 buckets, which other S3 implementations accept too.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")

# Specs longer than this are refused: they end up in log lines and error messages (URLs rarely exceed 2 KiB).
MAX_SPEC_LENGTH = 8192


@dataclass(frozen=True, slots=True, kw_only=True)
class GlanceSpec:
    """An image in Glance."""

    reference: str
    """Image id or name, as written after ``glance:``."""

    @property
    def looks_like_id(self) -> bool:
        """Whether `reference` is shaped like a Glance image id (a UUID), so is tried as one first."""
        return _UUID.fullmatch(self.reference) is not None

    @property
    def origin(self) -> str:
        return f"{GLANCE_PREFIX}{self.reference}"


@dataclass(frozen=True, slots=True, kw_only=True)
class S3Spec:
    """An object in S3 (or any S3 API: the endpoint is boto3's, e.g. from AWS_ENDPOINT_URL)."""

    bucket: str
    """Bucket name."""
    key: str
    """Object key, verbatim."""

    @property
    def origin(self) -> str:
        return f"{S3_PREFIX}{self.bucket}/{self.key}"


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpSpec:
    """A URL fetched with GET."""

    url: str
    """The URL, with any credentials it carries (only ever given to the HTTP client)."""
    origin: str
    """The URL as it may be shown: password and query values replaced by ``***``."""
    identity_url: str
    """The URL that names the content in the cache key: without user information (the same file whoever
    fetches it), with its query (which may select the content)."""

    @property
    def name(self) -> str:
        """The last segment of the URL's path (the file name, usually), else its host."""
        parts = urlsplit(self.url)
        segment = unquote(parts.path.rstrip("/").rsplit("/", 1)[-1])
        return segment or (parts.hostname or "download")


Spec = GlanceSpec | S3Spec | HttpSpec


def is_source_spec(text: str) -> bool:
    """Whether `text` names a remote source (by its scheme) rather than an image of the local directory."""
    lowered = text[:8].lower()
    return lowered.startswith((GLANCE_PREFIX, S3_PREFIX, "http://", "https://"))


def parse_spec(text: str) -> Spec:
    """The source `text` names; raises `SpecInvalid` (whose message never holds the URL's secrets)."""
    if len(text) > MAX_SPEC_LENGTH:
        raise SpecInvalid(spec=text[:40] + "...", problem=f"longer than {MAX_SPEC_LENGTH} characters")
    if any(ord(character) < 0x20 or ord(character) == 0x7F for character in text):
        raise SpecInvalid(spec=safe_origin(text), problem="it contains control characters")
    lowered = text.lower()
    if lowered.startswith(GLANCE_PREFIX):
        reference = text[len(GLANCE_PREFIX) :]
        if reference.startswith("//"):
            raise SpecInvalid(spec=text, problem="glance://... is reserved; write glance:<image id or name>")
        if not reference.strip():
            raise SpecInvalid(spec=text, problem="no image id or name after glance:")
        return GlanceSpec(reference=reference)
    if lowered.startswith(S3_PREFIX):
        bucket, slash, key = text[len(S3_PREFIX) :].partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise SpecInvalid(spec=text, problem=f"{bucket!r} is not an S3 bucket name")
        if not slash or not key:
            raise SpecInvalid(spec=text, problem="no object key after the bucket (s3://<bucket>/<key>)")
        return S3Spec(bucket=bucket, key=key)
    scheme = lowered.partition(":")[0]
    if scheme in HTTP_SCHEMES:
        return _parse_url(text)
    raise SpecInvalid(spec=safe_origin(text), problem="unknown kind of source")


def safe_origin(text: str) -> str:
    """`text` as it may be shown: for a URL, its password and query values replaced by ``***``."""
    try:
        parts = urlsplit(text)
    except ValueError:
        return REDACTED
    if not parts.scheme or not parts.netloc:
        return text
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{REDACTED}@{hostport}" if ":" in userinfo else f"{user}@{hostport}"
    query = "&".join(f"{quote(name, safe='')}={REDACTED}" for name, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _parse_url(text: str) -> HttpSpec:
    origin = safe_origin(text)
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as error:
        raise SpecInvalid(spec=origin, problem=f"not a valid URL ({error})") from None
    if not parts.hostname:
        raise SpecInvalid(spec=origin, problem="the URL has no host")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host if port is None else f"{host}:{port}"
    # The fragment never reaches the server: it names nothing.
    identity_url = urlunsplit((parts.scheme.lower(), netloc, parts.path or "/", parts.query, ""))
    return HttpSpec(url=urlunsplit(parts._replace(fragment="")), origin=origin, identity_url=identity_url)
