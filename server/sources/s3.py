"""``s3://<bucket>/<key>``: an object of S3 or of any S3 API, through boto3's standard configuration.

Credentials, region and endpoint come from where boto3 always finds them (``AWS_*`` variables including
``AWS_ENDPOINT_URL``, ``~/.aws/config`` and ``credentials``, an instance profile...): nothing here is
S3-vendor specific.

Content identity: endpoint, bucket, key, the object's version id (on a versioned bucket), ETag and size, all
from ``HeadObject``. The download is ``GetObject`` with ``If-Match: <that ETag>`` (and the version id), so the
bytes are those the key names, or the object changed in between (`SourceChanged`). The size is checked; a
single-part ETag (32 hex digits, no ``-N`` suffix) is the MD5 of the object unless it is encrypted with
SSE-KMS or SSE-C, and is then checked too.

Error handling: botocore exceptions become `SourceError`s whose messages pass through `redact` with the
session's secret key and token, not chained: missing object or bucket → `SourceNotFound` (telling which);
403 → `SourceCredentialsRejected`; no credentials → `SourceNotConfigured`; connection failures →
`SourceUnreachable`; others → `SourceRequestFailed`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .errors import (
    SourceChanged,
    SourceCredentialsRejected,
    SourceError,
    SourceNotConfigured,
    SourceNotFound,
    SourceRequestFailed,
    SourceUnreachable,
    redact,
)
from .remote import CHUNK_SIZE, Body, RemoteContent, identity_of
from .specs import S3Spec
from .translation import error_text, translated_call, translated_chunks
from .verify import ExpectedContent

_SINGLE_PART_ETAG = re.compile(r'"?([0-9a-fA-F]{32})"?')
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NoSuchVersion", "NotFound"})
_DENIED_CODES = frozenset({
    "403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "AllAccessDisabled", "AccountProblem",
})  # fmt: skip

_T = TypeVar("_T")


class S3Remote:
    """One S3 object, through one boto3 client (closed by `close`)."""

    def __init__(self, spec: S3Spec) -> None:
        self.spec = spec
        self.origin = spec.origin
        try:
            import boto3.session
        except ImportError:
            raise SourceNotConfigured(
                origin=self.origin, reason="boto3 is not installed (pip install 'vmcast[clouds]')"
            ) from None
        self._secrets: list[str] = []
        self.endpoint: str | None = None
        session = boto3.session.Session()
        self._client = self._call("configure the S3 client", lambda: session.client("s3"))
        self.endpoint = self._client.meta.endpoint_url
        credentials = self._call("read the AWS credentials", session.get_credentials)
        if credentials is not None:
            self._secrets = [value for value in (credentials.secret_key, credentials.token) if value]
        self._version_id: str | None = None
        self._etag: str | None = None

    def describe(self) -> RemoteContent:
        spec = self.spec
        head = self._call("look at the object", lambda: self._client.head_object(Bucket=spec.bucket, Key=spec.key))
        etag = str(head.get("ETag") or "")
        self._etag = etag or None
        size = int(head["ContentLength"])
        version = head.get("VersionId")
        self._version_id = version if version and version != "null" else None
        digests = {}
        single_part = _SINGLE_PART_ETAG.fullmatch(etag)
        encrypted = head.get("ServerSideEncryption") == "aws:kms" or head.get("SSECustomerAlgorithm")
        if single_part and not encrypted:
            digests["md5"] = single_part[1].lower()
        return RemoteContent(
            identity=identity_of("s3", self.endpoint, spec.bucket, spec.key, self._version_id, etag, size),
            name=spec.key.rstrip("/").rsplit("/", 1)[-1] or spec.key,
            expected=ExpectedContent(size=size, digests=digests),
        )

    @contextlib.contextmanager
    def open(self, described: RemoteContent) -> Iterator[Body]:
        spec = self.spec
        arguments: dict[str, Any] = {"Bucket": spec.bucket, "Key": spec.key}
        if self._etag:
            arguments["IfMatch"] = self._etag
        if self._version_id:
            arguments["VersionId"] = self._version_id
        response = self._call("download the object", lambda: self._client.get_object(**arguments))
        body = response["Body"]
        try:
            yield Body(content=described, chunks=self._chunks(body))
        finally:
            body.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()

    def _chunks(self, body: Any) -> Iterator[bytes]:
        # botocore/urllib3 errors mid-body are translated like those of the requests.
        stream = body.iter_chunks(chunk_size=CHUNK_SIZE)
        yield from translated_chunks(stream, "download the object", self._translate)

    # -- errors

    def _call(self, operation: str, request: Callable[[], _T]) -> _T:
        return translated_call(operation, request, self._translate)

    def _translate(self, operation: str, error: Exception) -> SourceError:
        from botocore import exceptions as boto

        message = redact(error_text(error), self._secrets)
        if isinstance(error, boto.ClientError):
            code = str(error.response.get("Error", {}).get("Code") or "")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "412") or status == 412:
                return SourceChanged(origin=self.origin)
            if code in _NOT_FOUND_CODES or status == 404:
                return SourceNotFound(origin=self.origin, reason=self._what_is_missing(code))
            if code in _DENIED_CODES or status == 403:
                return SourceCredentialsRejected(
                    origin=self.origin,
                    endpoint=self.endpoint,
                    user=None,
                    reason=f"S3 refused to {operation}: {message} "
                    "(check the server's AWS credentials and the bucket's policy)",
                )
            return SourceRequestFailed(origin=self.origin, operation=operation, reason=message, status=status)
        if isinstance(error, (boto.NoCredentialsError, boto.PartialCredentialsError, boto.NoRegionError)):
            return SourceNotConfigured(
                origin=self.origin, reason=f"the AWS configuration is incomplete (AWS_* variables, ~/.aws): {message}"
            )
        if isinstance(error, _connection_errors(boto)):
            return SourceUnreachable(origin=self.origin, endpoint=self.endpoint, reason=message)
        if isinstance(error, boto.ParamValidationError):
            return SourceNotFound(origin=self.origin, reason=f"S3 cannot name this object: {message}")
        return SourceRequestFailed(origin=self.origin, operation=operation, reason=message)

    def _what_is_missing(self, code: str) -> str:
        spec = self.spec
        if code == "NoSuchBucket":
            return f"bucket {spec.bucket!r} does not exist at {self.endpoint}"
        if code in ("NoSuchKey", "NoSuchVersion"):
            return f"no object {spec.key!r} in bucket {spec.bucket!r}"
        # HEAD answers carry no body, so no code: ask the bucket whether it is the bucket that is missing.
        try:
            self._client.head_bucket(Bucket=spec.bucket)
        except Exception as error:  # noqa: BLE001 - only to word the message
            status = getattr(error, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                return f"bucket {spec.bucket!r} does not exist at {self.endpoint}"
        return f"no object {spec.key!r} in bucket {spec.bucket!r}"


def _connection_errors(boto: Any) -> tuple[type[Exception], ...]:
    """botocore's exceptions for a connection that failed, timed out or broke mid-body."""
    return (
        boto.EndpointConnectionError, boto.ConnectTimeoutError, boto.ReadTimeoutError, boto.ConnectionClosedError,
        boto.ResponseStreamingError, boto.IncompleteReadError,
    )  # fmt: skip
