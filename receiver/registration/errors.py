"""Why a registration into Glance or EC2 did not happen, one class per way, and the exit code of each.

Every class derives from `RegistrationError`, itself a `vmcast.receiver.ReceiveError`, so ``vmcast receive
--register`` handles them with the receiver's other errors. Fields are keyword-only.

Credentials never appear in these messages: errors raised by openstacksdk, keystoneauth or botocore are
re-raised as the classes below, with the SDK's message passed through `redact` (which removes every secret of
the connection it is given, and anything shaped like ``password=...``), and without chaining the original
exception (``raise ... from None``), whose attributes may hold request bodies or headers.

====  ==========================================================================================
code  meaning
====  ==========================================================================================
0     registered, or an identical image was already registered (nothing uploaded)
1     unexpected error
2     usage error (options missing or contradictory)
4     the file is not the image it was announced as (`ChecksumMismatch`, `SizeMismatch`), or it
      changed after it was verified (`ContentChanged`); nothing is left in the cloud
7     the content's format is refused (`FormatRefused`): it differs from the declared one, the
      cloud does not take it, or it is unsafe (backing file...); checked before any cloud call
8     cloud credentials missing, rejected or insufficient (`CredentialsRejected`, `CloudNotConfigured`)
9     the cloud failed or timed out (`CloudRequestFailed`, `CloudUnreachable`, `CloudChecksumMismatch`,
      `RegistrationTimeout`); what this run created was deleted
10    as 9 (or 4, 8), but deleting what was created failed too (`LeftBehind`): the message lists it
130   interrupted; what this run created was deleted
====  ==========================================================================================
"""

from __future__ import annotations

from ..errors import EXIT_UNEXPECTED, EXIT_VERIFICATION_FAILED, ReceiveError

# `redact` lives there, so that a receive's log lines need not import this package.
from ..redaction import redact

EXIT_REGISTERED = 0
EXIT_USAGE = 2
EXIT_CONTENT_CHANGED = EXIT_VERIFICATION_FAILED
EXIT_FORMAT_REFUSED = 7
EXIT_CREDENTIALS = 8
EXIT_CLOUD = 9
EXIT_LEFT_BEHIND = 10
EXIT_INTERRUPTED = 130

__all__ = [
    "EXIT_CLOUD",
    "EXIT_CONTENT_CHANGED",
    "EXIT_CREDENTIALS",
    "EXIT_FORMAT_REFUSED",
    "EXIT_INTERRUPTED",
    "EXIT_LEFT_BEHIND",
    "EXIT_REGISTERED",
    "EXIT_UNEXPECTED",
    "EXIT_USAGE",
    "CloudChecksumMismatch",
    "CloudNotConfigured",
    "CloudRequestFailed",
    "CloudUnreachable",
    "ContentChanged",
    "CredentialsRejected",
    "FormatMismatch",
    "FormatRefused",
    "FormatUndetermined",
    "LeftBehind",
    "RegistrationError",
    "RegistrationTimeout",
    "UnsafeImage",
    "UnsupportedFormat",
    "redact",
]


class RegistrationError(ReceiveError):
    """Root of the errors of `vmcast.receiver.registration`; the image was not (fully) registered."""

    exit_code = EXIT_CLOUD


# --------------------------------------------------------------------------- before any cloud call


class FormatRefused(RegistrationError):
    """The image's content is not something this cloud should be given; nothing was sent anywhere."""

    exit_code = EXIT_FORMAT_REFUSED


class FormatMismatch(FormatRefused):
    """The content's format (as `qemu-img` detects it) is not the one the stream declared."""

    def __init__(self, *, path: str, declared: str, detected: str) -> None:
        super().__init__(
            f"{path} was declared {declared} but its content is {detected}: refusing to register it "
            f"(a file whose content contradicts its declared format is either mislabelled or an attack)"
        )
        self.path = path
        self.declared = declared
        self.detected = detected


class UnsupportedFormat(FormatRefused):
    """The format is known but this cloud (or vmcast's registration into it) does not take it."""

    def __init__(self, *, path: str, format: str, cloud: str, reason: str) -> None:
        super().__init__(f"cannot register {path} ({format}) in {cloud}: {reason}")
        self.path = path
        self.format = format
        self.cloud = cloud
        self.reason = reason


class UnsafeImage(FormatRefused):
    """The image refers to other files or is damaged (backing file, external data file, flat VMDK...)."""

    def __init__(self, *, path: str, format: str, reason: str) -> None:
        super().__init__(f"refusing to register {path} ({format}): {reason}")
        self.path = path
        self.format = format
        self.reason = reason


class FormatUndetermined(FormatRefused):
    """`qemu-img info` could not say what the content is; refused rather than guessed (fail closed)."""

    def __init__(self, *, path: str, reason: str) -> None:
        super().__init__(f"cannot determine the format of {path}: {reason}")
        self.path = path
        self.reason = reason


class ContentChanged(RegistrationError):
    """The bytes read for the upload are not the bytes that were verified: the file changed since."""

    exit_code = EXIT_CONTENT_CHANGED

    def __init__(self, *, path: str, expected_sha1: str, actual_sha1: str | None, reason: str) -> None:
        super().__init__(f"{path} changed after it was verified ({reason}); verify it again")
        self.path = path
        self.expected_sha1 = expected_sha1
        self.actual_sha1 = actual_sha1
        self.reason = reason


# ------------------------------------------------------------------------------------- credentials


class CloudNotConfigured(RegistrationError):
    """No usable cloud configuration: no such cloud in clouds.yaml, no credentials, no region..."""

    exit_code = EXIT_CREDENTIALS

    def __init__(self, *, cloud: str, reason: str) -> None:
        super().__init__(f"{cloud} is not configured: {reason}")
        self.cloud = cloud
        self.reason = reason


class CredentialsRejected(RegistrationError):
    """The cloud refused the credentials (wrong password or key) or what they are allowed to do."""

    exit_code = EXIT_CREDENTIALS

    def __init__(self, *, cloud: str, endpoint: str | None, user: str | None, reason: str) -> None:
        who = f"user {user!r}" if user else "the configured credentials"
        where = f" at {endpoint}" if endpoint else ""
        super().__init__(f"{cloud}{where} rejected {who}: {reason}")
        self.cloud = cloud
        self.endpoint = endpoint
        self.user = user
        self.reason = reason


# ------------------------------------------------------------------------------------- the cloud


class CloudUnreachable(RegistrationError):
    """No connection to the cloud's endpoint (refused, DNS, TLS, timeout)."""

    def __init__(self, *, cloud: str, endpoint: str | None, reason: str) -> None:
        super().__init__(f"cannot reach {cloud}" + (f" at {endpoint}" if endpoint else "") + f": {reason}")
        self.cloud = cloud
        self.endpoint = endpoint
        self.reason = reason


class CloudRequestFailed(RegistrationError):
    """The cloud answered a request with an error, or the SDK failed in a way not classified above."""

    def __init__(self, *, cloud: str, operation: str, reason: str, status: int | None = None) -> None:
        code = f" (HTTP {status})" if status is not None else ""
        super().__init__(f"{cloud} {operation} failed{code}: {reason}")
        self.cloud = cloud
        self.operation = operation
        self.reason = reason
        self.status = status


class CloudChecksumMismatch(RegistrationError):
    """What the cloud says it stored does not hash to what was sent."""

    def __init__(self, *, cloud: str, resource: str, what: str, expected: str, actual: str | None) -> None:
        super().__init__(f"{cloud} {resource}: {what} is {actual}, the bytes sent give {expected}")
        self.cloud = cloud
        self.resource = resource
        self.what = what
        self.expected = expected
        self.actual = actual


class RegistrationTimeout(RegistrationError):
    """The cloud did not finish (image active, snapshot completed) within the allowed time."""

    def __init__(self, *, cloud: str, resource: str, waiting_for: str, timeout: float) -> None:
        super().__init__(f"{cloud} {resource} was not {waiting_for} within {timeout:g} s")
        self.cloud = cloud
        self.resource = resource
        self.waiting_for = waiting_for
        self.timeout = timeout


class LeftBehind(RegistrationError):
    """The registration failed, and deleting what it had created failed too: delete these by hand."""

    exit_code = EXIT_LEFT_BEHIND

    def __init__(self, *, cloud: str, resources: tuple[str, ...], error: BaseException, cleanup_reason: str) -> None:
        super().__init__(
            f"{str(error) or type(error).__name__}; in addition, {cloud} resources {', '.join(resources)} could not be deleted "
            f"({cleanup_reason}): delete them by hand"
        )
        self.cloud = cloud
        self.resources = resources
        self.error = error
        self.cleanup_reason = cleanup_reason
