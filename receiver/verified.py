"""`VerifiedImage`: proof, as a type, that a file's bytes hash to the SHA-1 they were announced with.

Registration into a cloud (`vmcast.receiver.registration`) accepts nothing else (CONVENTIONS.md point 7), so
an image can reach Glance or EC2 only after one of the two ways of verifying it:

* `verify_file`: stream an existing file (or block device) through SHA-1 in one pass and compare;
* `VerifiedImage._from_receiver`: the receiver agent, which has already hashed the image while receiving it
  (`vmcast.receiver.hashing.Sha1Cursor`) and compared the digest with the stream's, states so without a
  second read. It is private to vmcast: nothing outside the receiver should call it.

Calling the class directly raises `TypeError`, and so does `dataclasses.replace` (which would otherwise
forge a "verified" image with another digest): construction is allowed only while one of the two factories
above is running, which a context variable records. Python cannot stop a determined caller (they can reach
the private factory, or `object.__new__`), the point is that no honest code path makes one by mistake.

A `VerifiedImage` states what the file held *when it was verified*. Registration hashes the bytes again as it
uploads them and refuses (and cleans up) if they changed since; see `ContentChanged`.

Error handling: `ChecksumMismatch` and `SizeMismatch` (both `VerificationError`, a `ReceiveError` with exit
code 4) when the file is not what was announced; `VerificationIOError` (exit 1) when it cannot be read.
Resource handling: `verify_file` opens the file once and closes it before returning.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .errors import EXIT_VERIFICATION_FAILED, ReceiveError

# One read per 4 MiB: large enough that the per-call overhead vanishes next to hashing (SHA-1 releases the
# GIL on buffers this size), small enough to stay in cache-friendly, bounded memory (one buffer, reused).
CHUNK_SIZE = 4 * 1024 * 1024

DEFAULT_FORMAT = "raw"
"""Format assumed when the stream did not say (the protocol's metadata makes it optional)."""

_SHA1_HEX = re.compile(r"[0-9a-f]{40}")

# True only while `_mint` runs: `VerifiedImage.__post_init__` refuses to build one otherwise.
_MINTING: contextvars.ContextVar[bool] = contextvars.ContextVar("vmcast_verified_minting", default=False)


class VerificationError(ReceiveError):
    """The file is not the image it was announced as."""

    exit_code = EXIT_VERIFICATION_FAILED


class ChecksumMismatch(VerificationError):
    """The file's SHA-1 is not the expected one."""

    def __init__(self, *, expected: str, actual: str, path: str) -> None:
        super().__init__(f"{path}: SHA-1 is {actual}, expected {expected}")
        self.expected = expected
        self.actual = actual
        self.path = path


class SizeMismatch(VerificationError):
    """The file's length is not the expected one (checked before hashing: it costs nothing)."""

    def __init__(self, *, expected: int, actual: int, path: str) -> None:
        super().__init__(f"{path}: {actual} bytes, expected {expected}")
        self.expected = expected
        self.actual = actual
        self.path = path


class VerificationIOError(ReceiveError):
    """The file could not be opened or read."""

    def __init__(self, *, path: str, error: OSError) -> None:
        super().__init__(f"cannot read {path}: {error.strerror or error}")
        self.path = path
        self.error = error


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedImage:
    """An image file whose whole content was hashed and matched its announced SHA-1.

    Made only by `verify_file` or by the receiver (`VerifiedImage._from_receiver`); see the module docstring.
    """

    path: Path
    """Absolute path of the regular file or block device holding the image."""
    sha1: str
    """SHA-1 of the content, 40 lowercase hex digits."""
    size: int
    """Length of the content in bytes (for a block device: the image's length, not the device's)."""
    format: str
    """Format the stream announced the image in (``raw``, ``qcow2``, ...); registration checks the content
    against it with ``qemu-img`` and refuses a mismatch."""
    verified_at: datetime
    """When the verification finished (UTC)."""
    source: str | None = None
    """Name of the image on the vmcast server it came from, if known (Glance property ``vmcast_source``)."""

    def __post_init__(self) -> None:
        if not _MINTING.get():
            raise TypeError(
                "a VerifiedImage is made only by verification: call vmcast.receiver.verified.verify_file()"
            )

    @classmethod
    def _from_receiver(
        cls, *, path: str | os.PathLike[str], sha1: str, size: int, format: str | None, source: str | None = None
    ) -> VerifiedImage:
        """For the receiver agent only: the image at `path` was hashed while it was received and matched.

        Call it only after the whole-image SHA-1 computed over the bytes *as written and read back* equalled
        the stream's announced SHA-1 and the target was synced; that is what makes the claim true. Anything
        else must call `verify_file`.
        """
        return _mint(path=Path(os.path.abspath(path)), sha1=_normalized_sha1(sha1), size=size, format=format, source=source)

    # Immutable, so a copy is the object itself; and a proof made in this process does not travel to another
    # one through pickle (unpickling would skip `__post_init__`): verify again there.
    def __copy__(self) -> VerifiedImage:
        return self

    def __deepcopy__(self, memo: dict) -> VerifiedImage:
        return self

    def __reduce__(self) -> None:  # type: ignore[override]
        raise TypeError("a VerifiedImage cannot be pickled: verify the file again where it is needed")


def verify_file(
    path: str | os.PathLike[str],
    *,
    expected_sha1: str,
    expected_size: int | None = None,
    format: str | None = None,
    source: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifiedImage:
    """Hash `path` in one pass of `CHUNK_SIZE` reads and return a `VerifiedImage` if it matches.

    `format` is the format the stream announced (default ``raw``); `source` the image's name on its server.
    A regular file must be exactly `expected_size` long (if given); on a block device the image fills the
    first `expected_size` bytes (default: the whole device). `progress`, if given, is called with the number
    of bytes hashed after each chunk.

    Error handling: `ValueError` if `expected_sha1` is not 40 hex digits; `SizeMismatch` before reading if the
    file's length differs from `expected_size` (a device's is smaller), or after reading if the file changed
    length meanwhile; `ChecksumMismatch` if the digest differs; `VerificationIOError` if the file cannot be
    read.
    """
    expected = _normalized_sha1(expected_sha1)
    absolute = Path(os.path.abspath(path))
    shown = str(absolute)
    try:
        with open(absolute, "rb", buffering=0) as file:
            available, is_device = _length(file)
            if expected_size is None:
                length = available
            elif available == expected_size or (is_device and available > expected_size):
                length = expected_size  # an image on a device fills its first bytes, the rest is not ours
            else:
                raise SizeMismatch(expected=expected_size, actual=available, path=shown)
            sha1 = hashlib.sha1()
            buffer = bytearray(CHUNK_SIZE)
            view = memoryview(buffer)
            hashed = 0
            while hashed < length and (count := file.readinto(view[: min(CHUNK_SIZE, length - hashed)])):
                sha1.update(view[:count])
                hashed += count
                if progress is not None:
                    progress(count)
            now = hashed if is_device else os.fstat(file.fileno()).st_size
    except OSError as error:
        raise VerificationIOError(path=shown, error=error) from None
    if hashed != length or now != length:  # the file shrank or grew while it was read
        raise SizeMismatch(expected=length, actual=hashed if hashed != length else now, path=shown)
    actual = sha1.hexdigest()
    if actual != expected:
        raise ChecksumMismatch(expected=expected, actual=actual, path=shown)
    return _mint(path=absolute, sha1=actual, size=hashed, format=format, source=source)


def _mint(*, path: Path, sha1: str, size: int, format: str | None, source: str | None) -> VerifiedImage:
    token = _MINTING.set(True)
    try:
        return VerifiedImage(
            path=path,
            sha1=sha1,
            size=size,
            format=(format or DEFAULT_FORMAT).lower(),
            verified_at=datetime.now(UTC),
            source=source,
        )
    finally:
        _MINTING.reset(token)


def _normalized_sha1(value: str) -> str:
    normalized = value.strip().lower()
    if not _SHA1_HEX.fullmatch(normalized):
        raise ValueError(f"not a SHA-1 (40 hex digits): {value!r}")
    return normalized


def _length(file) -> tuple[int, bool]:
    """Length of an open regular file or block device (whose st_size is 0: ask the end instead), and
    whether it is a device."""
    info = os.fstat(file.fileno())
    if stat.S_ISREG(info.st_mode):
        return info.st_size, False
    if stat.S_ISBLK(info.st_mode):
        end = file.seek(0, os.SEEK_END)
        file.seek(0)
        return end, True
    raise OSError(0, "neither a regular file nor a block device")
