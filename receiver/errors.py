"""The one root exception of vmcast.receiver, one subclass per way a receive can end badly.

Every exception takes keyword-only fields (no positional arguments to swap) and carries the process exit
code the CLI turns it into, so the mapping from failure to exit code lives in one place:

====  ==========================================================================================
code  meaning
====  ==========================================================================================
0     the image was received, verified (every block, then the whole-image SHA-1) and fsync'ed
1     an unexpected error, including an I/O error on the target while writing
2     usage error (options missing or mixed)
3     target refused before a byte was written (`TargetRefused`)
4     verification failed for good, or the stream failed (`StreamBroken`, e.g. the image changed)
5     server unreachable, or it answered with an error (`ServerError`)
6     nothing of the stream arrived (by multicast, or by the HTTP fallback) within ``--timeout`` seconds (`NoData`)
7-10  ``--register`` only: the image was verified and kept, but registering it failed
      (`vmcast.receiver.registration.errors`: 7 format refused, 8 credentials, 9 the cloud failed, 10 and
      its clean-up failed too); 4 also covers a file that changed between its verification and the upload
130   interrupted by SIGINT or SIGTERM (`Interrupted`); the lease is still released and the state saved
====  ==========================================================================================
"""

from __future__ import annotations

EXIT_VERIFIED = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_TARGET_REFUSED = 3
EXIT_VERIFICATION_FAILED = 4
EXIT_SERVER = 5
EXIT_NO_DATA = 6
EXIT_INTERRUPTED = 130


class ReceiveError(Exception):
    """Root of every exception vmcast.receiver raises on purpose."""

    exit_code = EXIT_UNEXPECTED


class TargetRefused(ReceiveError):
    """The output path is unsafe or unsuitable; nothing was written to it."""

    exit_code = EXIT_TARGET_REFUSED

    def __init__(self, *, path: str, reason: str) -> None:
        super().__init__(f"refusing to write {path}: {reason}")
        self.path = path
        self.reason = reason


class TargetIOError(ReceiveError):
    """Writing, reading back or syncing the target failed (a disk error, a full file system)."""

    def __init__(self, *, path: str, operation: str, error: OSError) -> None:
        super().__init__(f"{operation} {path} failed: {error.strerror or error}")
        self.path = path
        self.operation = operation
        self.error = error


class TargetBoundsError(ReceiveError):
    """A write would have gone past the image length: a bug, stopped at the write boundary."""

    def __init__(self, *, path: str, offset: int, length: int, limit: int) -> None:
        super().__init__(f"refusing a write of {length} bytes at {offset} to {path}: past its end {limit}")
        self.path = path
        self.offset = offset
        self.length = length
        self.limit = limit


class JoinFailed(ReceiveError):
    """The group could not be bound or joined (an --interface that is not a local address, say)."""

    def __init__(self, *, group: str, port: int, interface: str, error: OSError) -> None:
        super().__init__(f"cannot join {group}:{port} on interface {interface}: {error.strerror or error}")
        self.group = group
        self.port = port
        self.interface = interface
        self.error = error


class StreamBroken(ReceiveError):
    """The stream cannot deliver the image: it failed (the image changed under us) or it keeps arriving corrupt."""

    exit_code = EXIT_VERIFICATION_FAILED

    def __init__(self, *, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ServerError(ReceiveError):
    """The vmcast server could not be reached, or refused or garbled a request."""

    exit_code = EXIT_SERVER

    def __init__(self, *, url: str, reason: str, status: int | None = None) -> None:
        where = f"{url} answered {status}" if status is not None else url
        super().__init__(f"{where}: {reason}")
        self.url = url
        self.reason = reason
        self.status = status


class NoData(ReceiveError):
    """Nothing of the stream (no metadata, no data, nothing by the HTTP fallback) arrived for `timeout` seconds."""

    exit_code = EXIT_NO_DATA

    def __init__(self, *, timeout: float, group: str, port: int, interface: str, fallback: bool = False) -> None:
        also = " and nothing by the HTTP fallback" if fallback else ""
        super().__init__(f"no datagram of the stream on {group}:{port} (interface {interface}){also} within {timeout:g} s")
        self.timeout = timeout
        self.fallback = fallback
        self.group = group
        self.port = port
        self.interface = interface


class NoStream(ReceiveError):
    """No stream of the image started within the time the receiver was told to wait for one (--wait-for-stream)."""

    exit_code = EXIT_NO_DATA

    def __init__(self, *, server: str, image: str, format: str, waited: float) -> None:
        super().__init__(f"no stream of {image!r} as {format} started on {server} within {waited:g} s")
        self.server = server
        self.image = image
        self.format = format
        self.waited = waited


class Interrupted(ReceiveError):
    """A signal (Ctrl-C, SIGTERM) stopped the receive."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, *, signal_name: str) -> None:
        super().__init__(f"interrupted by {signal_name}")
        self.signal_name = signal_name
