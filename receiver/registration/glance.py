"""Register a verified image in OpenStack Glance (image API v2), idempotently and all-or-nothing.

`register_in_glance` is self-contained: give it a `VerifiedImage` and an openstacksdk connection; build the
connection the standard way (``openstack.connect(cloud=NAME)`` for ``--os-cloud NAME``, or
``openstack.connect()`` to read ``OS_CLOUD`` / ``OS_*`` and clouds.yaml; Keystone v3). It blocks (network and
a hashing pass), so from trio call it through ``trio.to_thread.run_sync``.

What it does, in order, and why:

1. ``qemu-img`` says what the content is; it must be the declared format and self-contained
   (`formats.checked_format`). This happens before any request, so a refused image leaves no trace.
2. Idempotence: an *active* image visible to the user with property ``vmcast_sha1`` equal to the image's
   SHA-1 is returned as it is (``created=False``), nothing uploaded, but only after Glance's own
   ``os_hash_value`` of its stored bytes (a strong hash: sha512 by default) and its size were found equal to
   those of the local file: a property is just a string anybody with an image can set, a hash of the stored
   bytes is not. Images of the user's own project are preferred.
3. The image record is created (``container_format=bare``, ``disk_format`` from step 1, properties
   ``vmcast_sha1``, ``vmcast_source``, ``vmcast_size``), then the file is streamed to it through a reader that
   computes SHA-1, SHA-512 and MD5 of exactly the bytes sent, in the same single read.
4. The SHA-1 of the bytes sent must still be the verified one (else the file changed: `ContentChanged`);
   Glance must report the image ``active`` within `timeout`; its ``os_hash_value`` (and md5 ``checksum``) and
   ``size`` must equal those of the bytes sent (`CloudChecksumMismatch`).
5. Any failure (or Ctrl-C) after step 3 began deletes the image record: nothing half-registered remains. If
   that delete fails too, `LeftBehind` names the image id.

Error handling: every openstacksdk/keystoneauth exception is translated (see `errors`): a 401 becomes
`CredentialsRejected` naming the auth URL and the user (never the password), connection failures
`CloudUnreachable`, configuration problems `CloudNotConfigured`, other API errors `CloudRequestFailed`. Their
messages pass through `errors.redact` with the connection's secrets, and are not chained to the originals.
Resource handling: the file is opened once for the upload (and once more only for a hash Glance computes with
an algorithm other than sha512) and closed before returning; the connection is the caller's and stays open.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from ..verified import VerifiedImage
from .errors import (
    CloudChecksumMismatch,
    CloudNotConfigured,
    CloudRequestFailed,
    CloudUnreachable,
    ContentChanged,
    CredentialsRejected,
    LeftBehind,
    RegistrationError,
    RegistrationTimeout,
    redact,
)
from .formats import QEMU_IMG, checked_format
from .registered import RegisteredImage
from .translation import error_text, translated_call

if TYPE_CHECKING:
    import openstack.connection

log = logging.getLogger("vmcast.receiver.registration")

CLOUD = "glance"

DEFAULT_TIMEOUT = 600.0
"""Seconds Glance may take, after the upload ends, to report the image ``active``."""

# How often to look at the image's status while waiting for it.
POLL_INTERVAL = 1.0

# Read size for the upload and for hashing: the HTTP stack asks for less (16 KiB); this bounds a read when
# it asks for "everything".
CHUNK_SIZE = 4 * 1024 * 1024

# Images per page when looking for an existing registration (Glance's default page is 25, its cap 1000).
PAGE_SIZE = 100

VISIBILITIES = ("private", "shared", "community", "public")

PROPERTY_SHA1 = "vmcast_sha1"
PROPERTY_SOURCE = "vmcast_source"
PROPERTY_SIZE = "vmcast_size"

# Glance's hashing algorithms that prove content (md5 and sha1 collide on purpose for a few dollars).
STRONG_HASHES = frozenset({"sha256", "sha384", "sha512", "sha3_256", "sha3_384", "sha3_512", "blake2b", "blake2s"})

# Image attributes Glance owns or that this function sets: extra properties may not use these names.
_RESERVED = frozenset({
    "id", "name", "status", "visibility", "protected", "os_hidden", "disk_format", "container_format",
    "checksum", "os_hash_algo", "os_hash_value", "size", "virtual_size", "owner", "min_disk", "min_ram",
    "tags", "locations", "direct_url", "created_at", "updated_at", "self", "file", "schema", "stores",
})  # fmt: skip

_T = TypeVar("_T")


def register_in_glance(
    image: VerifiedImage,
    *,
    connection: openstack.connection.Connection,
    name: str,
    visibility: str = "private",
    properties: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[int], None] | None = None,
    qemu_img: str = QEMU_IMG,
) -> RegisteredImage:
    """Register `image` in Glance as `name`, or return the identical image already there.

    `visibility`: one of `VISIBILITIES`. `properties`: extra image properties (strings; names starting with
    ``vmcast_`` and Glance's own attributes are refused). `timeout`: seconds for Glance to report the image
    active once uploaded. `progress`, if given, is called (in this thread) with each number of bytes sent.

    Returns a `RegisteredImage` (``cloud="glance"``; ``created=False`` when an identical image existed).
    Raises a `RegistrationError` subclass (see the module docstring), `TypeError` if `image` is not a
    `VerifiedImage`, `ValueError` for a bad `visibility` or property name.
    """
    started = time.monotonic()
    if not isinstance(image, VerifiedImage):
        raise TypeError("register_in_glance takes a VerifiedImage (from vmcast.receiver.verified.verify_file)")
    if visibility not in VISIBILITIES:
        raise ValueError(f"visibility must be one of {', '.join(VISIBILITIES)}, not {visibility!r}")
    extra = _checked_properties(properties)

    detected = checked_format(image, cloud=CLOUD, qemu_img=qemu_img)
    disk_format = detected.format.glance
    api = _Api(connection)

    existing = _find_registered(api, image, disk_format=disk_format)
    if existing is not None:
        log.info("glance: %s already holds this image as %s (%s); nothing uploaded", api.where, existing["id"], existing.get("name"))
        return RegisteredImage(
            cloud=CLOUD, id=existing["id"], name=existing.get("name") or "", sha1=image.sha1, created=False,
            disk_format=existing.get("disk_format"), seconds=time.monotonic() - started,
        )  # fmt: skip

    attributes: dict[str, Any] = {
        **extra,
        "name": name,
        "disk_format": disk_format,
        "container_format": "bare",
        "visibility": visibility,
        PROPERTY_SHA1: image.sha1,
        PROPERTY_SIZE: str(image.size),
    }
    if image.source:
        attributes[PROPERTY_SOURCE] = image.source

    from openstack.image.v2.image import Image

    record = api.call("create image", lambda: Image.new(**attributes).create(connection.image))
    log.info("glance: created image %s (%s, %s) in %s; uploading %d bytes", record.id, name, disk_format, api.where, image.size)
    try:
        sent = _upload(api, record, image, progress=progress)
        active = _wait_active(api, record.id, timeout=timeout)
        _check_stored(api, active, image, sent)
    except BaseException as error:
        _delete_created(api, record.id, error)
        raise
    seconds = time.monotonic() - started
    log.info("glance: image %s active, hashes match; %d bytes in %.1f s", record.id, image.size, seconds)
    return RegisteredImage(
        cloud=CLOUD, id=record.id, name=name, sha1=image.sha1, created=True, disk_format=disk_format,
        bytes_uploaded=sent.bytes, seconds=seconds,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ the API


class _Api:
    """The connection, plus what an error message may say about it (auth URL, user) and may not (secrets)."""

    def __init__(self, connection: openstack.connection.Connection) -> None:
        self.connection = connection
        try:
            auth = dict(connection.config.config.get("auth") or {})
        except AttributeError:
            auth = {}
        self.auth_url: str | None = auth.get("auth_url")
        self.user: str | None = (
            auth.get("username") or auth.get("user_id") or auth.get("application_credential_name")
            or auth.get("application_credential_id")
        )  # fmt: skip
        self._secrets = [
            str(value) for key, value in auth.items()
            if value and any(word in key.lower() for word in ("password", "secret", "token"))
        ]  # fmt: skip

    @property
    def where(self) -> str:
        return f"{self.auth_url or 'the configured cloud'} (user {self.user or '?'})"

    def secrets(self) -> list[str]:
        found = list(self._secrets)
        auth_ref = getattr(getattr(self.connection.session, "auth", None), "auth_ref", None)
        token = getattr(auth_ref, "auth_token", None)
        if token:
            found.append(str(token))
        return found

    def redact(self, text: str) -> str:
        return redact(text, self.secrets())

    def call(self, operation: str, request: Callable[[], _T]) -> _T:
        """Run one SDK request, translating its exceptions into ours (see the module docstring)."""
        return translated_call(operation, request, self.translate)

    def translate(self, operation: str, error: Exception) -> RegistrationError:
        from keystoneauth1 import exceptions as ksa
        from openstack import exceptions as sdk

        message = self.redact(error_text(error))
        status = getattr(error, "status_code", None) or getattr(error, "http_status", None)
        if status == 401 or isinstance(error, (ksa.Unauthorized, ksa.AuthorizationFailure)):
            return CredentialsRejected(
                cloud="OpenStack Keystone", endpoint=self.auth_url, user=self.user,
                reason=f"authentication failed (wrong user name, password, project or domain?): {message}",
            )  # fmt: skip
        if status == 403 or isinstance(error, ksa.Forbidden):
            return CredentialsRejected(
                cloud=CLOUD, endpoint=self.auth_url, user=self.user, reason=f"not allowed to {operation}: {message}"
            )
        if isinstance(error, (ksa.ConnectionError, ksa.DiscoveryFailure)):
            return CloudUnreachable(cloud=CLOUD, endpoint=self.auth_url, reason=message)
        if isinstance(error, (ksa.EndpointNotFound, sdk.EndpointNotFound, sdk.ServiceDiscoveryException)):
            return CloudNotConfigured(cloud=CLOUD, reason=f"no image service in the catalog of {self.where}: {message}")
        if isinstance(error, (sdk.ConfigException, ksa.AuthPluginException, ksa.OptionError)):
            return CloudNotConfigured(cloud=CLOUD, reason=message)
        return CloudRequestFailed(cloud=CLOUD, operation=operation, reason=message, status=status)


def _checked_properties(properties: Mapping[str, str] | None) -> dict[str, str]:
    extra = {}
    for key, value in (properties or {}).items():
        if key.startswith("vmcast_") or key in _RESERVED:
            raise ValueError(f"property {key!r} is set by vmcast or by Glance itself")
        extra[str(key)] = str(value)
    return extra


# --------------------------------------------------------------------------------- idempotence


def _find_registered(api: _Api, image: VerifiedImage, *, disk_format: str) -> dict | None:
    """An active image visible to the user whose stored bytes are provably `image`'s, or None."""
    candidates = [
        raw for raw in _images_with_sha1(api, image.sha1)
        if raw.get("status") == "active" and raw.get(PROPERTY_SHA1) == image.sha1
    ]  # fmt: skip
    if not candidates:
        return None
    project = api.call("look up the project", lambda: api.connection.current_project_id)
    candidates.sort(key=lambda raw: raw.get("owner") != project)  # own project first
    local_hashes: dict[str, str] = {}
    for raw in candidates:
        algorithm = str(raw.get("os_hash_algo") or "").lower()
        why_not = None
        if raw.get("size") != image.size:
            why_not = f"its size is {raw.get('size')}"
        elif raw.get("disk_format") != disk_format:
            why_not = f"its disk_format is {raw.get('disk_format')}"
        elif algorithm not in STRONG_HASHES or algorithm not in hashlib.algorithms_available or not raw.get("os_hash_value"):
            why_not = f"Glance reports no strong hash of its content (os_hash_algo {algorithm or 'unset'})"
        else:
            if algorithm not in local_hashes:
                local_hashes[algorithm] = _hash_file(image, algorithm)
            if raw["os_hash_value"] != local_hashes[algorithm]:
                why_not = f"its {algorithm} differs from the file's"
        if why_not is None:
            return raw
        log.warning("glance: image %s claims %s=%s but %s: not reusing it", raw.get("id"), PROPERTY_SHA1, image.sha1, why_not)
    return None


def _images_with_sha1(api: _Api, sha1: str) -> Iterator[dict]:
    """Images visible to the user with the property, filtered by Glance (and again by the caller)."""
    from openstack import exceptions as sdk

    params: dict[str, Any] = {PROPERTY_SHA1: sha1, "status": "active", "limit": PAGE_SIZE}
    while True:
        def fetch() -> dict:
            response = api.connection.image.get("/images", params=params)
            sdk.raise_from_response(response)
            return response.json()

        page = api.call("list images", fetch)
        images = page.get("images") or []
        yield from images
        if not page.get("next") or not images:
            return
        params["marker"] = images[-1]["id"]


def _hash_file(image: VerifiedImage, algorithm: str) -> str:
    """`algorithm` of the file, read once, with its SHA-1 checked in the same pass."""
    digest, sha1 = hashlib.new(algorithm), hashlib.sha1()
    try:
        with open(image.path, "rb", buffering=0) as file:
            remaining = image.size
            while remaining > 0 and (chunk := file.read(min(CHUNK_SIZE, remaining))):
                digest.update(chunk)
                sha1.update(chunk)
                remaining -= len(chunk)
    except OSError as error:
        raise ContentChanged(path=str(image.path), expected_sha1=image.sha1, actual_sha1=None, reason=f"cannot read it: {error.strerror or error}") from None
    if sha1.hexdigest() != image.sha1:
        raise ContentChanged(path=str(image.path), expected_sha1=image.sha1, actual_sha1=sha1.hexdigest(), reason="its SHA-1 differs")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- upload


@dataclass(frozen=True, slots=True, kw_only=True)
class _Sent:
    """Hashes of exactly the bytes the upload read."""

    bytes: int
    sha1: str
    sha512: str
    md5: str


class _HashingReader:
    """A file object for the HTTP stack that hashes what it hands over: one read serves upload and proof.

    ``__len__`` lets requests send a Content-Length (rather than chunked encoding); ``__bool__`` keeps the
    object truthy whatever its length.
    """

    def __init__(self, file: BinaryIO, *, size: int, progress: Callable[[int], None] | None) -> None:
        self._file = file
        self._size = size
        self._progress = progress
        self.sha1 = hashlib.sha1()
        self.sha512 = hashlib.sha512()
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        # Never past the image: on a block device the image is only the first `size` bytes.
        wanted = min(size if size is not None and size > 0 else CHUNK_SIZE, self._size - self.bytes)
        if wanted <= 0:
            return b""
        data = self._file.read(wanted)
        if data:
            self.sha1.update(data)
            self.sha512.update(data)
            self.md5.update(data)
            self.bytes += len(data)
            if self._progress is not None:
                self._progress(len(data))
        return data

    def __len__(self) -> int:
        return max(self._size - self.bytes, 0)

    def __bool__(self) -> bool:
        return True

    def sent(self) -> _Sent:
        return _Sent(bytes=self.bytes, sha1=self.sha1.hexdigest(), sha512=self.sha512.hexdigest(), md5=self.md5.hexdigest())


def _upload(api: _Api, record: Any, image: VerifiedImage, *, progress: Callable[[int], None] | None) -> _Sent:
    from openstack import exceptions as sdk

    path = str(image.path)
    try:
        file = open(image.path, "rb", buffering=0)  # noqa: SIM115 - closed by the `with` below; open errors translated here
    except OSError as error:
        raise ContentChanged(path=path, expected_sha1=image.sha1, actual_sha1=None, reason=f"cannot open it: {error.strerror or error}") from None
    with file:
        reader = _HashingReader(file, size=image.size, progress=progress)

        def put() -> None:
            response = record.upload(api.connection.image, data=reader, size=image.size)
            sdk.raise_from_response(response)

        api.call("upload image data", put)
        sent = reader.sent()
        length = _regular_file_length(file)
    if sent.bytes != image.size or length not in (None, image.size):
        found = sent.bytes if sent.bytes != image.size else length
        raise ContentChanged(path=path, expected_sha1=image.sha1, actual_sha1=None, reason=f"it is {found} bytes long, {image.size} were verified")
    if sent.sha1 != image.sha1:
        raise ContentChanged(path=path, expected_sha1=image.sha1, actual_sha1=sent.sha1, reason="the bytes uploaded have another SHA-1")
    return sent


def _regular_file_length(file: BinaryIO) -> int | None:
    """The length of a regular file now; None for a block device (the image is a prefix of it)."""
    info = os.fstat(file.fileno())
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _wait_active(api: _Api, image_id: str, *, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        current = api.call("get image", lambda: api.connection.image.get_image(image_id))
        if current.status == "active":
            return current
        if current.status in ("killed", "deleted", "pending_delete", "deactivated"):
            raise CloudRequestFailed(cloud=CLOUD, operation="upload image data", reason=f"image {image_id} went {current.status}")
        if time.monotonic() >= deadline:
            raise RegistrationTimeout(cloud=CLOUD, resource=f"image {image_id}", waiting_for="active", timeout=timeout)
        time.sleep(POLL_INTERVAL)


def _check_stored(api: _Api, stored: Any, image: VerifiedImage, sent: _Sent) -> None:
    """Glance's size and hashes of what it stored must be those of the bytes sent."""
    resource = f"image {stored.id}"
    if stored.size != sent.bytes:
        raise CloudChecksumMismatch(cloud=CLOUD, resource=resource, what="size", expected=str(sent.bytes), actual=str(stored.size))
    checked = []
    algorithm = str(stored.hash_algo or "").lower()
    if stored.hash_value:
        if algorithm == "sha512":
            ours = sent.sha512
        elif algorithm in hashlib.algorithms_available:
            ours = _hash_file(image, algorithm)  # not computed while uploading: a second read
        else:
            ours = None
        if ours is not None:
            if stored.hash_value != ours:
                raise CloudChecksumMismatch(cloud=CLOUD, resource=resource, what=f"os_hash_value ({algorithm})", expected=ours, actual=stored.hash_value)
            checked.append(algorithm)
    if stored.checksum:
        if stored.checksum != sent.md5:
            raise CloudChecksumMismatch(cloud=CLOUD, resource=resource, what="checksum (md5)", expected=sent.md5, actual=stored.checksum)
        checked.append("md5")
    if not checked:  # fail closed: nothing proves the stored bytes
        raise CloudChecksumMismatch(cloud=CLOUD, resource=resource, what="hash of the stored data", expected=sent.sha512, actual=None)
    log.info("glance: image %s stores %d bytes, %s match the bytes sent", stored.id, sent.bytes, " and ".join(checked))


def _delete_created(api: _Api, image_id: str, error: BaseException) -> None:
    """Delete the image this call created; if that fails, raise `LeftBehind` (from the original error)."""
    try:
        api.call("delete image", lambda: api.connection.image.delete_image(image_id, ignore_missing=True))
    except RegistrationError as cleanup:
        raise LeftBehind(cloud=CLOUD, resources=(f"image {image_id}",), error=error, cleanup_reason=str(cleanup)) from None
    log.info("glance: deleted image %s after the failure", image_id)
