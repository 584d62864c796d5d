"""Register a verified raw image as an EC2 AMI through the EBS direct APIs, idempotently and all-or-nothing.

`register_in_ec2` is self-contained: give it a `VerifiedImage` of raw content, an AMI name and (optionally) a
boto3 session or a region; credentials and endpoint come from the usual boto3 chain (``AWS_*`` variables,
``~/.aws``, instance profile; ``AWS_ENDPOINT_URL`` points it at another endpoint such as moto). It blocks
(network, a read of the file, a thread pool), so from trio call it through ``trio.to_thread.run_sync``.

What it does, in order, and why:

1. The content must be raw, declared and detected (`formats.checked_format`): an EBS snapshot holds the
   disk's bytes as they are, there is no conversion on the way. Refused before any request.
2. Idempotence: an AMI of this account tagged ``vmcast_sha1`` = the SHA-1 that is ``available`` (or
   ``pending``: then it is waited for) is returned as it is (``created=False``); nothing is uploaded.
3. ``StartSnapshot`` of ``ceil(size / GiB)`` GiB, tagged ``vmcast_sha1`` and ``Name``, with a ClientToken
   derived from the SHA-1 (see `client_token`): a retried request gets the same snapshot, not a second one.
4. One thread reads the file in order, 512 KiB block by block, hashing the SHA-1 of the whole as it goes, and
   skips blocks that are all zeros (EBS reads a block never written as zeros); the others go to `parallelism`
   threads that send them with ``PutSnapshotBlock`` and their base64 SHA-256. At most
   ``parallelism * IN_FLIGHT_PER_WORKER`` blocks are in memory at once. The block size is the constant
   `EBS_BLOCK_SIZE`, not the ``BlockSize`` StartSnapshot returns (moto says 512 there).
5. If the SHA-1 of what was read is not the verified one, the file changed: `ContentChanged`, before the
   snapshot is completed. Otherwise ``CompleteSnapshot`` with the count of blocks sent and the LINEAR
   aggregate checksum (base64 SHA-256 of the concatenated binary SHA-256 of each block sent, in block order),
   which AWS checks; then the ``snapshot_completed`` waiter.
6. ``RegisterImage`` (x86_64, hvm, ENA, root ``/dev/xvda`` on that snapshot, gp3, deleted on termination),
   tagged ``vmcast_sha1`` and ``Name`` (at creation and again with ``CreateTags``); the ``image_available`` waiter.
7. Any failure (or Ctrl-C) after step 3 deregisters the AMI if there is one and deletes the snapshot: nothing
   half-registered. If that fails too, `LeftBehind` names what remains.

Error handling: botocore exceptions are translated (see `errors`): missing credentials or region
`CloudNotConfigured`; HTTP 401/403 and AWS's credential error codes `CredentialsRejected` (naming the endpoint
and the access key id, shortened; never the secret key); connection failures `CloudUnreachable`; other API
errors `CloudRequestFailed`; waiter time-outs `RegistrationTimeout`. Messages pass through `errors.redact`
with the session's secret key and token, and are not chained to the originals.
Resource handling: the file is opened once and closed before returning; the thread pool is joined before
returning, also on failure (requests in flight finish; queued ones are cancelled).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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
    UnsupportedFormat,
    redact,
)
from .formats import FORMATS, QEMU_IMG, checked_format, lookup
from .registered import RegisteredImage
from .translation import error_text, translated_call

if TYPE_CHECKING:
    import boto3

log = logging.getLogger("vmcast.receiver.registration")

CLOUD = "ec2"

EBS_BLOCK_SIZE = 524288
"""The EBS direct APIs' block: 512 KiB, fixed by AWS (moto's StartSnapshot wrongly answers 512)."""

GIB = 1024**3

DEFAULT_PARALLELISM = 8
"""Concurrent PutSnapshotBlock requests (AWS allows many more per snapshot; 8 saturate a 1-2 core host)."""

IN_FLIGHT_PER_WORKER = 2
"""Blocks read ahead per worker: enough to keep each busy, and memory stays at parallelism x 1 MiB."""

SNAPSHOT_TIMEOUT_MINUTES = 60
"""StartSnapshot Timeout: AWS cancels the snapshot if no block arrives, or it is not completed, for this long."""

DEFAULT_WAIT_TIMEOUT = 1800.0
"""Seconds for AWS to report the snapshot completed, and again the AMI available."""

DEFAULT_WAIT_DELAY = 5.0
"""Seconds between two looks of a waiter (botocore's default of 15 s wastes most of a small image's time)."""

TAG_SHA1 = "vmcast_sha1"

ROOT_DEVICE = "/dev/xvda"

# Codes with which AWS says "who are you?" rather than "no".
_CREDENTIAL_CODES = frozenset({
    "AuthFailure", "UnrecognizedClientException", "InvalidClientTokenId", "SignatureDoesNotMatch",
    "IncompleteSignature", "InvalidAccessKeyId", "ExpiredToken", "ExpiredTokenException",
    "AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "OptInRequired",
})  # fmt: skip

_ZERO_BLOCK = bytes(EBS_BLOCK_SIZE)

# ClientTokens whose snapshot this process deleted after a failure: reusing one would make AWS answer with
# the deleted snapshot, so the next attempt appends a counter.
_spent_tokens: set[str] = set()
_spent_lock = threading.Lock()

_T = TypeVar("_T")


def register_in_ec2(
    image: VerifiedImage,
    *,
    name: str,
    session: boto3.Session | None = None,
    region: str | None = None,
    endpoint_url: str | None = None,
    parallelism: int = DEFAULT_PARALLELISM,
    description: str | None = None,
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    wait_delay: float = DEFAULT_WAIT_DELAY,
    progress: Callable[[int], None] | None = None,
    qemu_img: str = QEMU_IMG,
) -> RegisteredImage:
    """Register `image` (raw) as the AMI `name`, or return the AMI of this account already holding it.

    `session`: a boto3 session (default: a new one, i.e. the standard credential chain); `region` overrides
    the session's; `endpoint_url` the endpoint (default: ``AWS_ENDPOINT_URL`` or AWS's). `parallelism`:
    concurrent block uploads. `progress`, if given, is called (in this thread) with each number of image bytes
    handled, sent or skipped as zeros.

    Returns a `RegisteredImage` (``cloud="ec2"``, ``id`` the AMI id, ``snapshot_id``, ``blocks_uploaded``,
    ``zero_blocks_skipped``; ``created=False`` when the AMI existed). Raises a `RegistrationError` subclass
    (see the module docstring), `TypeError` if `image` is not a `VerifiedImage`, `ValueError` if
    `parallelism` < 1.
    """
    started = time.monotonic()
    if not isinstance(image, VerifiedImage):
        raise TypeError("register_in_ec2 takes a VerifiedImage (from vmcast.receiver.verified.verify_file)")
    if parallelism < 1:
        raise ValueError(f"parallelism must be at least 1, not {parallelism}")
    if lookup(image.format) != FORMATS["raw"]:
        raise UnsupportedFormat(
            path=str(image.path), format=image.format, cloud=CLOUD,
            reason="an EBS snapshot holds raw disk bytes; convert the image first (qemu-img convert -O raw)",
        )  # fmt: skip
    checked_format(image, cloud=CLOUD, qemu_img=qemu_img)  # the content must be raw too

    aws = _Aws(session=session, region=region, endpoint_url=endpoint_url, parallelism=parallelism)

    existing = _find_registered(aws, image)
    if existing is not None:
        log.info("ec2: %s already holds this image as %s (%s); nothing uploaded", aws.where, existing["ImageId"], existing.get("Name"))
        return RegisteredImage(
            cloud=CLOUD, id=existing["ImageId"], name=existing.get("Name") or "", sha1=image.sha1, created=False,
            snapshot_id=_root_snapshot(existing), seconds=time.monotonic() - started,
        )  # fmt: skip

    volume_gib = max(1, math.ceil(image.size / GIB))
    token = client_token(image, name=name, volume_gib=volume_gib)
    tags = [{"Key": TAG_SHA1, "Value": image.sha1}, {"Key": "Name", "Value": name}]
    snapshot = aws.call("StartSnapshot", lambda: aws.ebs.start_snapshot(
        VolumeSize=volume_gib, Tags=tags, ClientToken=token, Timeout=SNAPSHOT_TIMEOUT_MINUTES,
        Description=(description or f"vmcast {image.source or name} sha1 {image.sha1}")[:255],
    ))  # fmt: skip
    snapshot_id = snapshot["SnapshotId"]
    log.info("ec2: started snapshot %s (%d GiB) in %s; uploading %d bytes", snapshot_id, volume_gib, aws.where, image.size)
    ami_id: str | None = None
    try:
        if snapshot.get("Status") not in (None, "pending"):
            raise CloudRequestFailed(cloud=CLOUD, operation="StartSnapshot", reason=f"snapshot {snapshot_id} is {snapshot['Status']}, not pending")
        sent = _upload_blocks(aws, snapshot_id, image, parallelism=parallelism, progress=progress)
        aws.call("CompleteSnapshot", lambda: aws.ebs.complete_snapshot(
            SnapshotId=snapshot_id, ChangedBlocksCount=sent.blocks_uploaded, Checksum=sent.aggregate_checksum,
            ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR",
        ))  # fmt: skip
        aws.wait("snapshot_completed", f"snapshot {snapshot_id}", "completed", timeout=wait_timeout, delay=wait_delay, SnapshotIds=[snapshot_id])
        ami_id = aws.call("RegisterImage", lambda: aws.ec2.register_image(
            Name=name, Description=(description or f"vmcast sha1 {image.sha1}")[:255],
            Architecture="x86_64", RootDeviceName=ROOT_DEVICE, VirtualizationType="hvm", EnaSupport=True,
            BlockDeviceMappings=[{"DeviceName": ROOT_DEVICE, "Ebs": {"SnapshotId": snapshot_id, "DeleteOnTermination": True, "VolumeType": "gp3"}}],
            TagSpecifications=[{"ResourceType": "image", "Tags": tags}],
        ))["ImageId"]  # fmt: skip
        # Again, for endpoints that ignore TagSpecifications on RegisterImage (moto): idempotence rests on it.
        aws.call("CreateTags", lambda: aws.ec2.create_tags(Resources=[ami_id], Tags=tags))
        aws.wait("image_available", f"AMI {ami_id}", "available", timeout=wait_timeout, delay=wait_delay, ImageIds=[ami_id])
    except BaseException as error:
        _delete_created(aws, snapshot_id=snapshot_id, ami_id=ami_id, token=token, error=error)
        raise
    seconds = time.monotonic() - started
    log.info(
        "ec2: AMI %s on snapshot %s: %d blocks sent, %d zero blocks skipped, %.1f s",
        ami_id, snapshot_id, sent.blocks_uploaded, sent.zero_blocks, seconds,
    )  # fmt: skip
    return RegisteredImage(
        cloud=CLOUD, id=ami_id, name=name, sha1=image.sha1, created=True, snapshot_id=snapshot_id,
        blocks_uploaded=sent.blocks_uploaded, zero_blocks_skipped=sent.zero_blocks,
        bytes_uploaded=sent.blocks_uploaded * EBS_BLOCK_SIZE, seconds=seconds,
    )  # fmt: skip


def client_token(image: VerifiedImage, *, name: str, volume_gib: int) -> str:
    """The StartSnapshot ClientToken for this registration of `image` (at most 64 characters).

    Derived from the SHA-1 and everything else the request carries (name, size), so a request botocore retries
    (or a caller's retry with the same `VerifiedImage`) returns the snapshot already started rather than a
    second one; and from the moment of verification, so a later ``vmcast register`` (which verifies again)
    does not collide with a snapshot an earlier, failed run deleted. A token whose snapshot this process
    deleted gets a counter appended.
    """
    seed = f"{image.sha1}/{image.size}/{volume_gib}/{name}/{image.verified_at.isoformat()}"
    base = "vmcast-" + hashlib.sha256(seed.encode()).hexdigest()[:40]
    with _spent_lock:
        token, attempt = base, 1
        while token in _spent_tokens:
            attempt += 1
            token = f"{base}-{attempt}"
    return token


# ------------------------------------------------------------------------------------------ the API


class _Aws:
    """The two clients, plus what error messages may say (endpoint, region, key id) and may not (secrets)."""

    def __init__(self, *, session: boto3.Session | None, region: str | None, endpoint_url: str | None, parallelism: int) -> None:
        import boto3
        import botocore.config
        import botocore.exceptions

        self._secrets: list[str] = []
        self.key_id: str | None = None
        self.endpoint: str | None = endpoint_url
        try:
            session = session if session is not None else boto3.Session()
            self.region = region or session.region_name
            if not self.region:
                raise CloudNotConfigured(cloud=CLOUD, reason="no AWS region: pass --region or set AWS_DEFAULT_REGION")
            credentials = session.get_credentials()
            if credentials is None:
                raise CloudNotConfigured(
                    cloud=CLOUD,
                    reason="no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, or an instance profile)",
                )  # fmt: skip
            frozen = credentials.get_frozen_credentials()
            self.key_id = frozen.access_key
            self._secrets = [s for s in (frozen.secret_key, frozen.token) if s]
            config = botocore.config.Config(
                max_pool_connections=parallelism + 2,
                retries={"mode": "standard", "max_attempts": 5},
                connect_timeout=10,
                read_timeout=120,
                user_agent_extra="vmcast",
            )
            self.ebs = session.client("ebs", region_name=self.region, endpoint_url=endpoint_url, config=config)
            self.ec2 = session.client("ec2", region_name=self.region, endpoint_url=endpoint_url, config=config)
        except RegistrationError:
            raise
        except (botocore.exceptions.BotoCoreError, ValueError) as error:
            raise self.translate("set up the AWS clients", error) from None
        self.endpoint = self.ec2.meta.endpoint_url

    @property
    def where(self) -> str:
        return f"{self.endpoint} ({self.region}, key {self.shown_key_id})"

    @property
    def shown_key_id(self) -> str | None:
        """The access key id, shortened: it names the credentials without spelling them out."""
        if not self.key_id:
            return None
        return self.key_id if len(self.key_id) <= 8 else f"{self.key_id[:4]}...{self.key_id[-4:]}"

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def call(self, operation: str, request: Callable[[], _T]) -> _T:
        """Run one request, translating botocore's exceptions into ours (see the module docstring)."""
        return translated_call(operation, request, self.translate)

    def wait(self, waiter_name: str, resource: str, state: str, *, timeout: float, delay: float, **query: Any) -> None:
        import botocore.exceptions

        attempts = max(1, math.ceil(timeout / delay))
        try:
            self.ec2.get_waiter(waiter_name).wait(**query, WaiterConfig={"Delay": delay, "MaxAttempts": attempts})
        except botocore.exceptions.WaiterError as error:
            reason = str(getattr(error, "last_response", {}).get("Error", {}).get("Code") or "")
            if "Max attempts exceeded" in str(error):
                raise RegistrationTimeout(cloud=CLOUD, resource=resource, waiting_for=state, timeout=timeout) from None
            raise CloudRequestFailed(cloud=CLOUD, operation=f"wait for {resource}", reason=self.redact(reason or str(error))) from None
        except Exception as error:  # noqa: BLE001
            raise self.translate(f"wait for {resource}", error) from None

    def translate(self, operation: str, error: Exception) -> RegistrationError:
        import botocore.exceptions as bce

        if isinstance(error, (bce.NoCredentialsError, bce.PartialCredentialsError, bce.ProfileNotFound, bce.NoRegionError)):
            return CloudNotConfigured(cloud=CLOUD, reason=self.redact(error_text(error)))
        if isinstance(error, (bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ConnectionClosedError, bce.SSLError)):
            return CloudUnreachable(cloud=CLOUD, endpoint=self.endpoint, reason=self.redact(error_text(error)))
        if isinstance(error, bce.ClientError):
            code, message = _client_error_fields(error)
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            reason = self.redact(f"{code}: {message}" if message else code)
            if code in _CREDENTIAL_CODES or status in (401, 403):
                return CredentialsRejected(cloud=f"AWS {operation}", endpoint=self.endpoint, user=self.shown_key_id and f"access key {self.shown_key_id}", reason=reason)
            return CloudRequestFailed(cloud=CLOUD, operation=operation, reason=reason, status=status)
        return CloudRequestFailed(cloud=CLOUD, operation=operation, reason=self.redact(error_text(error)))


def _client_error_fields(error: Any) -> tuple[str, str]:
    """(code, message) of a ClientError, also when the service answered XML botocore did not parse (moto's EBS)."""
    details = error.response.get("Error", {})
    code, message = str(details.get("Code") or ""), str(details.get("Message") or "")
    inner = re.search(r"<Code>([^<]+)</Code>", message)
    if inner:
        code = inner.group(1)
        found = re.search(r"<Message>([^<]*)</Message>", message)
        message = found.group(1) if found else ""
    return code or "error", message


# --------------------------------------------------------------------------------- idempotence


def _find_registered(aws: _Aws, image: VerifiedImage) -> dict | None:
    """An AMI of this account tagged with the SHA-1, available (waited for if pending), or None."""
    answer = aws.call("DescribeImages", lambda: aws.ec2.describe_images(
        Owners=["self"], Filters=[{"Name": f"tag:{TAG_SHA1}", "Values": [image.sha1]}],
    ))  # fmt: skip
    found = [ami for ami in answer.get("Images", []) if ami.get("State") in ("available", "pending")]
    found.sort(key=lambda ami: (ami.get("State") != "available", ami.get("CreationDate", "")))
    for ami in found:
        if ami["State"] == "pending":
            log.info("ec2: AMI %s with this image is pending; waiting for it", ami["ImageId"])
            aws.wait("image_available", f"AMI {ami['ImageId']}", "available", timeout=DEFAULT_WAIT_TIMEOUT, delay=DEFAULT_WAIT_DELAY, ImageIds=[ami["ImageId"]])
        return ami
    return None


def _root_snapshot(ami: dict) -> str | None:
    root = ami.get("RootDeviceName")
    for mapping in ami.get("BlockDeviceMappings", []):
        if mapping.get("DeviceName") == root:
            return mapping.get("Ebs", {}).get("SnapshotId")
    return None


# ---------------------------------------------------------------------------------------- upload


@dataclass(frozen=True, slots=True, kw_only=True)
class _Sent:
    blocks_uploaded: int
    zero_blocks: int
    aggregate_checksum: str
    """base64 SHA-256 of the concatenated binary SHA-256 of the blocks sent, in block order (LINEAR)."""


def _upload_blocks(aws: _Aws, snapshot_id: str, image: VerifiedImage, *, parallelism: int, progress: Callable[[int], None] | None) -> _Sent:
    """Send every non-zero block of the file to the snapshot; check the file is still the verified one."""
    path = str(image.path)
    block_count = math.ceil(image.size / EBS_BLOCK_SIZE)
    digests: list[bytes | None] = [None] * block_count
    slots = threading.BoundedSemaphore(parallelism * IN_FLIGHT_PER_WORKER)
    failed = threading.Event()
    futures: list[Future[None]] = []
    sha1 = hashlib.sha1()
    zero_blocks = 0

    def put(index: int, block: bytes) -> None:
        try:
            digest = hashlib.sha256(block).digest()  # here, not in the reader: hashlib releases the GIL
            checksum = base64.b64encode(digest).decode("ascii")
            answer = aws.call("PutSnapshotBlock", lambda: aws.ebs.put_snapshot_block(
                SnapshotId=snapshot_id, BlockIndex=index, BlockData=block, DataLength=EBS_BLOCK_SIZE,
                Checksum=checksum, ChecksumAlgorithm="SHA256",
            ))  # fmt: skip
            if answer.get("Checksum") not in (None, checksum):
                raise CloudChecksumMismatch(cloud=CLOUD, resource=f"snapshot {snapshot_id} block {index}", what="SHA-256", expected=checksum, actual=answer.get("Checksum"))
            digests[index] = digest
        except BaseException:
            failed.set()
            raise
        finally:
            slots.release()

    try:
        file = open(image.path, "rb", buffering=0)  # noqa: SIM115 - closed by the `with` below; open errors translated here
    except OSError as error:
        raise ContentChanged(path=path, expected_sha1=image.sha1, actual_sha1=None, reason=f"cannot open it: {error.strerror or error}") from None
    with file, ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="vmcast-ebs") as pool:
        try:
            for index in range(block_count):
                if failed.is_set():
                    break
                expected = min(EBS_BLOCK_SIZE, image.size - index * EBS_BLOCK_SIZE)
                block = _read_block(file, expected)
                if len(block) != expected:
                    raise ContentChanged(path=path, expected_sha1=image.sha1, actual_sha1=None, reason=f"it ended at {index * EBS_BLOCK_SIZE + len(block)} bytes, {image.size} were verified")
                sha1.update(block)
                if expected < EBS_BLOCK_SIZE:  # the last block, padded: the volume reads zeros past the image
                    block += bytes(EBS_BLOCK_SIZE - expected)
                if block == _ZERO_BLOCK:
                    zero_blocks += 1
                else:
                    slots.acquire()
                    futures.append(pool.submit(put, index, block))
                if progress is not None:
                    progress(expected)
            else:
                # A regular file must not have grown; on a block device the image is only the first bytes.
                if stat.S_ISREG(os.fstat(file.fileno()).st_mode) and file.read(1):
                    raise ContentChanged(path=path, expected_sha1=image.sha1, actual_sha1=None, reason=f"it is longer than the {image.size} bytes verified")
        except OSError as error:
            failed.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise ContentChanged(path=path, expected_sha1=image.sha1, actual_sha1=None, reason=f"reading it failed: {error.strerror or error}") from None
        except BaseException:
            failed.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    for future in futures:  # the pool is joined: every future is done or cancelled
        if not future.cancelled() and future.exception() is not None:
            raise future.exception()  # type: ignore[misc]
    actual = sha1.hexdigest()
    if actual != image.sha1:
        raise ContentChanged(path=path, expected_sha1=image.sha1, actual_sha1=actual, reason="the bytes read for the upload have another SHA-1")
    sent = [digest for digest in digests if digest is not None]
    aggregate = base64.b64encode(hashlib.sha256(b"".join(sent)).digest()).decode("ascii")
    return _Sent(blocks_uploaded=len(sent), zero_blocks=zero_blocks, aggregate_checksum=aggregate)


def _read_block(file: BinaryIO, size: int) -> bytes:
    """`size` bytes, or fewer only at the end of the file (a raw read may return short)."""
    block = file.read(size)
    while block is not None and len(block) < size:
        more = file.read(size - len(block))
        if not more:
            break
        block += more
    return block or b""


# --------------------------------------------------------------------------------------- cleanup


def _delete_created(aws: _Aws, *, snapshot_id: str, ami_id: str | None, token: str, error: BaseException) -> None:
    """Deregister the AMI and delete the snapshot this call created; `LeftBehind` if that fails."""
    left: list[str] = []
    reasons: list[str] = []
    if ami_id is not None:
        try:
            aws.call("DeregisterImage", lambda: aws.ec2.deregister_image(ImageId=ami_id))
        except RegistrationError as cleanup:
            left.append(f"AMI {ami_id}")
            reasons.append(str(cleanup))
    try:
        aws.call("DeleteSnapshot", lambda: aws.ec2.delete_snapshot(SnapshotId=snapshot_id))
    except RegistrationError as cleanup:
        left.append(f"snapshot {snapshot_id}")
        reasons.append(str(cleanup))
    with _spent_lock:
        _spent_tokens.add(token)
    if left:
        raise LeftBehind(cloud=CLOUD, resources=tuple(left), error=error, cleanup_reason="; ".join(reasons)) from None
    log.info("ec2: deleted snapshot %s%s after the failure", snapshot_id, f" and AMI {ami_id}" if ami_id else "")
