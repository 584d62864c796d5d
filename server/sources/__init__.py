"""Images from elsewhere: Glance, S3 and HTTP(S) sources fetched into a local cache, verified, by content.

The catalog calls `fetch_source` for an image name that `is_source_spec`, and serves the returned file like
an image of its directory (its `source_format` decides the formats offered, conversions included):

    fetched = fetch_source("glance:debian-12", cache_dir=settings.cache_dir, qemu=qemu)
    fetched.path, fetched.source_format, fetched.downloaded  # .../sources/<key>.image, "qcow2", True

Modules: `specs` (parse ``glance:`` / ``s3://`` / ``http(s)://``), `glance`, `s3`, `http` (one per kind, each
a `remote.Remote`), `verify` (hash while writing), `formats` (qemu-img; refuse unsafe images), `cache`
(files by content key, flock per key), `fetch` (the whole sequence), `errors` (one root: `SourceError`),
`translation` (SDK exceptions become `SourceError`s, unchained).
"""

from .errors import (
    STATUS_OF,
    NotEnoughSpace,
    SourceAmbiguous,
    SourceChanged,
    SourceChecksumMismatch,
    SourceCredentialsRejected,
    SourceError,
    SourceFormatRefused,
    SourceNotConfigured,
    SourceNotFound,
    SourceNotReady,
    SourceRequestFailed,
    SourceSizeMismatch,
    SourceUnreachable,
    SourceUnverifiable,
    SpecInvalid,
)
from .fetch import CACHE_SUBDIRECTORY, FetchedSource, fetch_source
from .specs import is_source_spec, parse_spec
from .verify import Progress

__all__ = [
    "CACHE_SUBDIRECTORY",
    "STATUS_OF",
    "FetchedSource",
    "NotEnoughSpace",
    "Progress",
    "SourceAmbiguous",
    "SourceChanged",
    "SourceChecksumMismatch",
    "SourceCredentialsRejected",
    "SourceError",
    "SourceFormatRefused",
    "SourceNotConfigured",
    "SourceNotFound",
    "SourceNotReady",
    "SourceRequestFailed",
    "SourceSizeMismatch",
    "SourceUnreachable",
    "SourceUnverifiable",
    "SpecInvalid",
    "fetch_source",
    "is_source_spec",
    "parse_spec",
]
