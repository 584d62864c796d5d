"""``http://`` and ``https://`` URLs, fetched with httpx (redirects followed, proxies from the environment).

Content identity (RFC 9110 §8.8): the URL (without user information) plus a *strong* ``ETag``, or else the
``Last-Modified`` date, plus ``Content-Length``. A weak ETag (``W/"..."``) only promises equivalent content,
not the same bytes, so it is not used. A URL with neither validator is identified by the SHA-256 of its
bytes, known only after downloading them: such a URL is downloaded every time, and stored once.

``HEAD`` says whether the content is cached already. When HEAD fails with anything but 404/410 (405 or 501
from a server without HEAD, 403 from a presigned S3 URL, which is signed for GET only...), the URL is asked
with GET, whose headers are read before its body, and the body is not read when the content is cached; an
error the GET answers too is reported from the GET. The
GET's own headers name what is downloaded (the content may have changed since the HEAD). ``Content-Length``
is checked against the bytes received. ``Accept-Encoding: identity`` asks for the bytes as they are; a
server that compresses anyway is decoded and the length is then not checked (it counts compressed bytes).

Error handling: 404 and 410 → `SourceNotFound`; 401, 403 and 407 → `SourceCredentialsRejected`; other error
statuses → `SourceRequestFailed`; connection failures and timeouts → `SourceUnreachable`. The URL's password
and query values never appear in messages (they may be credentials: basic authentication, a presigned URL).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlsplit

import httpx

from .errors import (
    SourceCredentialsRejected,
    SourceError,
    SourceNotFound,
    SourceRequestFailed,
    SourceUnreachable,
    redact,
)
from .remote import CHUNK_SIZE, Body, RemoteContent, identity_of
from .specs import HttpSpec
from .translation import error_text
from .verify import ExpectedContent

# Seconds to open a connection; and at most between two reads of a response (not for the whole download).
CONNECT_TIMEOUT = 15.0
READ_TIMEOUT = 60.0
MAX_REDIRECTS = 10
USER_AGENT = "vmcast-server"

_NOT_FOUND = frozenset({404, 410})
_DENIED = frozenset({401, 403, 407})


class HttpRemote:
    """One URL, through one httpx client (closed by `close`)."""

    def __init__(self, spec: HttpSpec) -> None:
        self.spec = spec
        self.origin = spec.origin
        parts = urlsplit(spec.url)
        self.endpoint = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        self._secrets = [parts.password, *(value for _, value in parse_qsl(parts.query))]
        self._client = httpx.Client(
            follow_redirects=True,
            max_redirects=MAX_REDIRECTS,
            timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
            headers={"Accept-Encoding": "identity", "User-Agent": USER_AGENT},
        )

    def describe(self) -> RemoteContent:
        try:
            response = self._client.head(self.spec.url)
        except httpx.HTTPError as error:
            raise self._translate("ask for the URL's headers (HEAD)", error) from None
        if response.status_code in _NOT_FOUND:
            self._check_status(response, operation="ask for the URL's headers (HEAD)")
        if response.status_code >= 400:  # no usable HEAD: the GET's headers will tell
            return RemoteContent(identity=None, name=self.spec.name, expected=ExpectedContent(size=None))
        return self._content_of(response)

    @contextlib.contextmanager
    def open(self, described: RemoteContent) -> Iterator[Body]:
        operation = "download the URL (GET)"
        try:
            with self._client.stream("GET", self.spec.url) as response:
                self._check_status(response, operation=operation)
                yield Body(content=self._content_of(response), chunks=self._chunks(response))
        except httpx.HTTPError as error:
            raise self._translate(operation, error) from None

    def close(self) -> None:
        self._client.close()

    # -- responses

    def _content_of(self, response: httpx.Response) -> RemoteContent:
        headers = response.headers
        encoded = headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
        length = _length(headers.get("Content-Length")) if not encoded else None
        etag = headers.get("ETag")
        last_modified = headers.get("Last-Modified")
        if etag and not etag.startswith("W/"):
            identity = identity_of("http", self.spec.identity_url, "etag", etag, length)
        elif last_modified:
            identity = identity_of("http", self.spec.identity_url, "last-modified", last_modified, length)
        else:
            identity = None
        return RemoteContent(identity=identity, name=self.spec.name, expected=ExpectedContent(size=length))

    def _check_status(self, response: httpx.Response, *, operation: str) -> None:
        status = response.status_code
        if status < 400:
            return
        reason = f"the server answered {status} {response.reason_phrase}".rstrip()
        if status in _NOT_FOUND:
            raise SourceNotFound(origin=self.origin, reason=reason)
        if status in _DENIED:
            raise SourceCredentialsRejected(
                origin=self.origin,
                endpoint=self.endpoint,
                user=urlsplit(self.spec.url).username,
                reason=f"{reason} (give credentials in the URL, user:password@host, or a presigned URL)",
            )
        raise SourceRequestFailed(origin=self.origin, operation=operation, reason=reason, status=status)

    def _chunks(self, response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes(chunk_size=CHUNK_SIZE)
        except httpx.HTTPError as error:
            raise self._translate("download the URL (GET)", error) from None

    def _translate(self, operation: str, error: httpx.HTTPError) -> SourceError:
        message = redact(error_text(error).replace(self.spec.url, self.origin), self._secrets)
        if isinstance(error, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError)):
            return SourceUnreachable(origin=self.origin, endpoint=self.endpoint, reason=message)
        return SourceRequestFailed(origin=self.origin, operation=operation, reason=message)


def _length(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value)
