"""``glance:<id or name>``: an image of OpenStack Glance (image API v2), found through the Keystone catalog.

The connection is openstacksdk's standard one: ``openstack.connect(cloud=NAME)`` when a cloud is named,
else ``openstack.connect()``, which reads ``OS_CLOUD`` / ``OS_*`` and clouds.yaml (``OS_CLIENT_CONFIG_FILE``).

Finding the image: a reference shaped like a UUID is fetched as an id (``GET /v2/images/{id}``); if there is
none, or the reference is not a UUID, it is looked up as a name (``GET /v2/images?name=...``) among the
images the user sees, and must match exactly one *active* image.

Verification: Glance computes, when it stores an image, ``os_hash_algo`` / ``os_hash_value`` (sha512 by
default) and the md5 ``checksum``. The download (``GET /v2/images/{id}/file``) is checked against both in
the same pass as it is written (`verify.copy_verified`); a multihash algorithm this Python lacks leaves the
md5 alone to check. An image with neither is refused (`SourceUnverifiable`): its bytes could not be told
from corrupted ones, nor cached safely. Image data cannot change once an image is active (Glance refuses a
second upload), so id + hash name the content.

Error handling: every openstacksdk/keystoneauth exception is translated into a `SourceError` (401 →
`SourceCredentialsRejected` naming the auth URL and user, never the password; connection failures →
`SourceUnreachable`; configuration problems → `SourceNotConfigured`; others → `SourceRequestFailed`), its
message passed through `redact` with the connection's password, secrets and token, and not chained.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import (
    SourceAmbiguous,
    SourceCredentialsRejected,
    SourceError,
    SourceNotConfigured,
    SourceNotFound,
    SourceNotReady,
    SourceRequestFailed,
    SourceUnreachable,
    SourceUnverifiable,
    redact,
)
from .formats import GLANCE_DISK_FORMATS
from .remote import CHUNK_SIZE, Body, RemoteContent, identity_of
from .specs import GlanceSpec
from .translation import error_text, translated_call, translated_chunks
from .verify import ExpectedContent

if TYPE_CHECKING:
    import openstack.connection

log = logging.getLogger(__name__)

# Images listed per name lookup: two already prove ambiguity; a few more make the error message useful.
NAME_LOOKUP_LIMIT = 10

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, kw_only=True)
class GlanceImage:
    """The fields of a Glance image record this module uses."""

    id: str
    name: str | None
    status: str
    size: int | None
    disk_format: str | None
    checksum: str | None
    """md5 of the data (hex), computed by Glance."""
    hash_algo: str | None
    """``os_hash_algo``: the algorithm of `hash_value` (sha512 unless the operator changed it)."""
    hash_value: str | None
    """``os_hash_value``: the data's digest with `hash_algo` (hex)."""

    @classmethod
    def of(cls, raw: dict[str, Any]) -> GlanceImage:
        size = raw.get("size")
        return cls(
            id=str(raw["id"]),
            name=raw.get("name"),
            status=str(raw.get("status") or "unknown"),
            size=int(size) if size is not None else None,
            disk_format=raw.get("disk_format"),
            checksum=raw.get("checksum") or None,
            hash_algo=(raw.get("os_hash_algo") or "").lower() or None,
            hash_value=(raw.get("os_hash_value") or "").lower() or None,
        )


class GlanceRemote:
    """An image of Glance, through one openstacksdk connection (closed by `close`)."""

    def __init__(self, spec: GlanceSpec, *, cloud: str | None = None) -> None:
        self.spec = spec
        self.origin = spec.origin
        try:
            import openstack
        except ImportError:
            raise SourceNotConfigured(
                origin=self.origin, reason="openstacksdk is not installed (pip install 'vmcast[clouds]')"
            ) from None
        self._auth_url: str | None = None
        self._user: str | None = None
        self._secrets: list[str] = []
        self._connection: openstack.connection.Connection | None = None
        self._found: GlanceImage | None = None
        self._connection = self._call("read the OpenStack configuration", lambda: openstack.connect(cloud=cloud))
        auth = dict(getattr(self._connection.config, "config", {}).get("auth") or {})
        self._auth_url = auth.get("auth_url")
        self._user = (
            auth.get("username") or auth.get("user_id") or auth.get("application_credential_name")
            or auth.get("application_credential_id")
        )  # fmt: skip
        self._secrets = [
            str(value) for key, value in auth.items()
            if value and any(word in key.lower() for word in ("password", "secret", "token"))
        ]  # fmt: skip

    # -- Remote

    def describe(self) -> RemoteContent:
        image = self._found = self._find()
        if image.status != "active":
            raise SourceNotReady(origin=self.origin, status=image.status)
        digests: dict[str, str] = {}
        if image.hash_algo and image.hash_value and image.hash_algo in hashlib.algorithms_available:
            digests[image.hash_algo] = image.hash_value
        if image.checksum:
            digests.setdefault("md5", image.checksum.lower())
        if not digests:
            raise SourceUnverifiable(
                origin=self.origin,
                reason=f"Glance reports no checksum for image {image.id}, so its data cannot be verified",
            )
        return RemoteContent(
            identity=identity_of("glance", image.id, image.hash_algo, image.hash_value, image.checksum, image.size),
            name=image.name or image.id,
            expected=ExpectedContent(size=image.size, digests=digests),
            declared_format=GLANCE_DISK_FORMATS.get(image.disk_format or ""),
        )

    @contextlib.contextmanager
    def open(self, described: RemoteContent) -> Iterator[Body]:
        from openstack import exceptions as sdk

        if self._found is None:
            raise RuntimeError("GlanceRemote.open() before describe()")
        image_id = self._found.id
        connection = self._connected()

        def get() -> Any:
            response = connection.image.get(f"/images/{image_id}/file", stream=True)
            try:
                sdk.raise_from_response(response)
            except BaseException:
                response.close()
                raise
            return response

        response = self._call("download the image data", get)
        try:
            if response.status_code == 204:  # Glance: the image has no data
                raise SourceNotReady(origin=self.origin, status="without data")
            yield Body(content=described, chunks=self._chunks(response))
        finally:
            response.close()

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None

    # -- finding the image

    def _find(self) -> GlanceImage:
        reference = self.spec.reference
        if self.spec.looks_like_id:
            found = self._by_id(reference)
            if found is not None:
                return found
        matches = [image for image in self._by_name(reference) if image.name == reference]
        active = [image for image in matches if image.status == "active"]
        if len(active) == 1:
            return active[0]
        if len(active) > 1:
            raise SourceAmbiguous(origin=self.origin, name=reference, candidates=[image.id for image in active])
        if matches:
            raise SourceNotReady(origin=self.origin, status=matches[0].status)
        what = "no image with that id or name" if self.spec.looks_like_id else "no image with that name"
        raise SourceNotFound(origin=self.origin, reason=f"{what} is visible to {self._where}")

    def _by_id(self, image_id: str) -> GlanceImage | None:
        from openstack import exceptions as sdk

        connection = self._connected()

        def get() -> GlanceImage | None:
            response = connection.image.get(f"/images/{image_id}")
            if response.status_code == 404:
                return None
            sdk.raise_from_response(response)
            return GlanceImage.of(response.json())

        return self._call("look up the image by id", get)

    def _by_name(self, name: str) -> list[GlanceImage]:
        from openstack import exceptions as sdk

        connection = self._connected()

        def get() -> list[GlanceImage]:
            response = connection.image.get("/images", params={"name": name, "limit": NAME_LOOKUP_LIMIT})
            sdk.raise_from_response(response)
            return [GlanceImage.of(raw) for raw in response.json().get("images") or []]

        return self._call("look up the image by name", get)

    # -- the download

    def _chunks(self, response: Any) -> Iterator[bytes]:
        # requests/urllib3 errors mid-body are translated like the SDK's.
        stream = response.iter_content(chunk_size=CHUNK_SIZE)
        yield from translated_chunks(stream, "download the image data", self._translate)

    # -- errors

    @property
    def _where(self) -> str:
        return f"user {self._user or '?'} at {self._auth_url or 'the configured cloud'}"

    def _connected(self) -> openstack.connection.Connection:
        if self._connection is None:
            raise RuntimeError("GlanceRemote used after close()")
        return self._connection

    def _call(self, operation: str, request: Callable[[], _T]) -> _T:
        """Run one SDK request, translating its exceptions into `SourceError`s."""
        return translated_call(operation, request, self._translate)

    def _redact(self, text: str) -> str:
        found = list(self._secrets)
        session = getattr(self._connection, "session", None)
        auth_ref = getattr(getattr(session, "auth", None), "auth_ref", None)
        token = getattr(auth_ref, "auth_token", None)
        if token:
            found.append(str(token))
        return redact(text, found)

    def _translate(self, operation: str, error: Exception) -> SourceError:
        from keystoneauth1 import exceptions as ksa
        from openstack import exceptions as sdk

        message = self._redact(error_text(error))
        status = getattr(error, "status_code", None) or getattr(error, "http_status", None)
        if status == 401 or isinstance(error, (ksa.Unauthorized, ksa.AuthorizationFailure)):
            return SourceCredentialsRejected(
                origin=self.origin, endpoint=self._auth_url, user=self._user,
                reason=f"Keystone refused the credentials (wrong user name, password, project or domain?): {message}",
            )  # fmt: skip
        if status == 403 or isinstance(error, ksa.Forbidden):
            return SourceCredentialsRejected(
                origin=self.origin,
                endpoint=self._auth_url,
                user=self._user,
                reason=f"not allowed to {operation}: {message}",
            )
        if status == 404:
            return SourceNotFound(origin=self.origin, reason=f"Glance answered 404 to {operation}: {message}")
        if isinstance(error, (ksa.ConnectionError, ksa.DiscoveryFailure, ksa.ConnectFailure)):
            return SourceUnreachable(origin=self.origin, endpoint=self._auth_url, reason=message)
        if isinstance(error, (ksa.EndpointNotFound, sdk.EndpointNotFound, sdk.ServiceDiscoveryException)):
            return SourceNotConfigured(
                origin=self.origin, reason=f"no image service in the catalog of {self._where}: {message}"
            )
        if isinstance(
            error, (sdk.ConfigException, ksa.AuthPluginException, ksa.OptionError, ksa.MissingRequiredOptions)
        ):
            return SourceNotConfigured(
                origin=self.origin,
                reason="the OpenStack configuration is incomplete (clouds.yaml, OS_CLOUD or OS_* variables): "
                + message,
            )
        if _is_connection_error(error):
            return SourceUnreachable(origin=self.origin, endpoint=self._auth_url, reason=message)
        return SourceRequestFailed(origin=self.origin, operation=operation, reason=message, status=status)


def _is_connection_error(error: BaseException) -> bool:
    # requests/urllib3 failures while streaming the body (connection reset, read timeout, truncated body).
    try:
        import requests
        import urllib3.exceptions
    except ImportError:  # pragma: no cover - both come with openstacksdk
        return False
    return isinstance(error, (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError))
