"""The one root exception of vmcast.server and its branches.

Policy: every failure a user or operator can cause (a name that is not in the catalog, a format the image is
not offered in, a tool that is not installed, a port that is taken) is one of these, with keyword-only fields
and a message that says what to do. The HTTP layer maps each class to a status code in one table
(`vmcast.server.api.errors`); the CLI prints the message. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class ServerError(Exception):
    """Root of every exception raised on purpose by vmcast.server."""


# -- configuration ---------------------------------------------------------------------------------------------


class ConfigurationError(ServerError):
    """A setting is unusable (images directory, interface, group range, port...)."""

    def __init__(self, *, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class QemuImgMissing(ServerError):
    """`qemu-img` cannot be run, so image formats cannot be detected nor converted."""

    def __init__(self, *, executable: str) -> None:
        super().__init__(
            f"{executable!r} was not found: vmcast needs qemu-img to detect and convert image formats "
            "(on Debian or Ubuntu: apt-get install qemu-utils)"
        )
        self.executable = executable


# -- images --------------------------------------------------------------------------------------------------


class ImageNotFound(ServerError):
    """No image of that name in the images directory."""

    def __init__(self, *, name: str, images_dir: Path) -> None:
        super().__init__(f"no image named {name!r} in {images_dir} (GET /v1/images lists them)")
        self.name = name
        self.images_dir = images_dir


class FormatNotOffered(ServerError):
    """The image exists but cannot be streamed in the format asked for."""

    def __init__(self, *, name: str, format: str, offered: Sequence[str]) -> None:
        super().__init__(f"image {name!r} is not offered in format {format!r}; formats offered: {', '.join(offered)}")
        self.name = name
        self.format = format
        self.offered = tuple(offered)


class ImageUnreadable(ServerError):
    """qemu-img (or the operating system) could not read an image file."""

    def __init__(self, *, path: Path, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = path
        self.reason = reason


class ImageChanged(ServerError):
    """An image file changed while it was being hashed, converted or opened; the request can be retried."""

    def __init__(self, *, path: Path) -> None:
        super().__init__(
            f"image {path} changed while it was being prepared; try again "
            "(replace images by renaming a new file over them, never by writing in place)"
        )
        self.path = path


class ConversionFailed(ServerError):
    """`qemu-img convert` failed."""

    def __init__(self, *, path: Path, target_format: str, reason: str) -> None:
        super().__init__(f"qemu-img could not convert {path} to {target_format}: {reason}")
        self.path = path
        self.target_format = target_format
        self.reason = reason


# -- streams -------------------------------------------------------------------------------------------------


class StreamNotFound(ServerError):
    """No stream with that id (never started, or stopped long ago)."""

    def __init__(self, *, stream_id: str) -> None:
        super().__init__(f"no stream with id {stream_id!r} (GET /v1/streams lists the running ones)")
        self.stream_id = stream_id


class GroupsExhausted(ServerError):
    """Every address of the group range already carries a stream."""

    def __init__(self, *, group_range: str, streams: int) -> None:
        super().__init__(
            f"all addresses of the group range {group_range} are in use by {streams} streams; "
            "stop a stream or serve with a larger --group-range"
        )
        self.group_range = group_range
        self.streams = streams


class StreamNotRunning(ServerError):
    """The stream exists but has stopped: its bytes are no longer served."""

    def __init__(self, *, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} has stopped; start it again (POST /v1/streams) to get its data")
        self.stream_id = stream_id


# -- leases --------------------------------------------------------------------------------------------------


class LeaseNotFound(ServerError):
    """No active lease with that id: never granted, released, or expired long enough ago to be forgotten."""

    def __init__(self, *, lease_id: str) -> None:
        super().__init__(
            f"no active lease with id {lease_id!r} (released, expired or never granted); start the stream again"
        )
        self.lease_id = lease_id


class LeaseExpired(LeaseNotFound):
    """The lease was not renewed within the lease TTL and has ended; its holder must start the stream again."""

    def __init__(self, *, lease_id: str, ttl: float) -> None:
        ServerError.__init__(
            self,
            f"lease expired; start the stream again (lease {lease_id!r} was not renewed within {ttl:g} s)",
        )
        self.lease_id = lease_id
        self.ttl = ttl


# -- state -----------------------------------------------------------------------------------------------------


class StateUnwritable(ServerError):
    """The state database refused a write: the change is not made, since a restart would lose it."""

    def __init__(self, *, path: Path, reason: str) -> None:
        super().__init__(f"cannot record the change in the state database {path}: {reason}")
        self.path = path
        self.reason = reason


# -- client --------------------------------------------------------------------------------------------------


class ClientError(ServerError):
    """Root of what `vmcast stream ...` reports about talking to a server."""


class ServerUnreachable(ClientError):
    """No HTTP answer at all (refused, timed out, name not resolved)."""

    def __init__(self, *, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the vmcast server at {url}: {reason} (is `vmcast serve` running there?)")
        self.url = url
        self.reason = reason


class ServerRefused(ClientError):
    """The server answered with an error status."""

    def __init__(self, *, status: int, detail: str) -> None:
        super().__init__(f"the server answered {status}: {detail}")
        self.status = status
        self.detail = detail
