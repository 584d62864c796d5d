"""The receiver's state file, ``<output>.vmcast.json``: what a receive had verified when it stopped, or that it finished.

A re-run of the same ``vmcast receive`` reads it to resume (`vmcast.receiver.resume`); ``vmcast register``
reads ``sha1``, ``len``, ``image`` and ``format`` from it (`vmcast.receiver.registration.cli`). One JSON
object, keys sorted:

==========================  ===================================================================================
key                         meaning
==========================  ===================================================================================
``version``                 format version, `STATE_VERSION`; a file of another version is not used
``output``                  absolute path of the output the state is about
``server``, ``stream_id``   the vmcast server and its stream (null without a server)
``image``, ``format``       the image's name and format (from the lease, else from the stream's metadata)
``group``, ``port``,        the multicast stream (cookie: 16 hex digits)
``cookie``
``sha1``, ``len``           the image's identity: SHA-1 (40 lowercase hex digits) and length in bytes
``frame_size``,             the stream's layout (null until known)
``block_size``
``verified_blocks``         base64 of one bit per block, most significant bit first (`Checkpoint.verified_blocks`):
                            the blocks that were verified *and* on disk (the target was fsynced before the
                            state was written)
``verified_block_count``,   how many of how many blocks that is (for people; the bits are what counts)
``block_count``
``verified``                true once the whole image was verified and fsynced: ``vmcast register`` can use it
``updated_at``              when it was written, ISO 8601, UTC
==========================  ===================================================================================

Writes are atomic: a temporary file beside it, fsynced, renamed over the old one, and the directory fsynced;
a crash leaves the old state or the new one, never half of one.

Error handling: `read_state` never raises; a file that cannot be read or parsed is reported by a warning and
treated as absent (so an existing output is not overwritten without ``--force``: fail closed). `StateKeeper.save`
never raises either: a state that cannot be written costs the ability to resume, not the receive (warned).
Resource handling: every file opened here is closed before the function returns.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import pydantic
from bitarray import bitarray
from pydantic import BaseModel, ConfigDict, Field
from vmcast.protocol import Assembly, Checkpoint

# STATE_SUFFIX is defined there, for the command's help (without importing this module).
from .defaults import STATE_SUFFIX
from .errors import TargetIOError
from .target import Target

log = logging.getLogger(__name__)

STATE_VERSION = 1

# A receive saves its state this often (when something changed): a crash costs at most this much receiving.
# Each save fsyncs the target, so not much more often than this.
CHECKPOINT_INTERVAL = 2.0

# The state file is small; anything larger is not ours.
MAX_STATE_BYTES = 16 << 20


def state_path(output: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(output)}{STATE_SUFFIX}")


class ReceiverState(BaseModel):
    """The state file's content (see the module docstring for each key)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    version: Literal[1]
    output: str
    server: str | None = None
    stream_id: str | None = None
    image: str | None = None
    format: str | None = None
    group: str
    port: Annotated[int, Field(ge=1, le=65535)]
    cookie: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    sha1: Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")]
    length: Annotated[int, Field(alias="len", ge=0)]
    frame_size: Annotated[int | None, Field(gt=0)] = None
    block_size: Annotated[int | None, Field(gt=0)] = None
    verified_blocks: str = ""
    verified_block_count: Annotated[int, Field(ge=0)] = 0
    block_count: Annotated[int | None, Field(ge=0)] = None
    verified: bool = False
    updated_at: str

    @pydantic.field_validator("verified_blocks")
    @classmethod
    def _base64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except binascii.Error as error:
            raise ValueError(f"not base64: {error}") from None
        return value

    def checkpoint(self) -> Checkpoint | None:
        """What `Assembly(checkpoint=...)` resumes from; None when the layout was never known."""
        if self.frame_size is None or self.block_size is None:
            return None
        return Checkpoint(
            sha1=self.sha1, length=self.length, frame_size=self.frame_size, block_size=self.block_size,
            verified_blocks=base64.b64decode(self.verified_blocks),
        )  # fmt: skip


def read_state(output: str | os.PathLike[str]) -> ReceiverState | None:
    """The state beside `output`, or None if there is none or it cannot be used (then a warning says why)."""
    path = state_path(output)
    try:
        with open(path, "rb") as file:
            content = file.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        log.warning("ignoring %s: %s", path, error.strerror or error)
        return None
    if len(content) > MAX_STATE_BYTES:
        log.warning("ignoring %s: larger than %d bytes, not a receiver state", path, MAX_STATE_BYTES)
        return None
    try:
        return ReceiverState.model_validate_json(content)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        log.warning("ignoring %s: %s: %s", path, where, first["msg"])
        return None


def write_state(state: ReceiverState, path: Path) -> None:
    """Replace `path` with `state`, atomically and durably. Error handling: raises `OSError`."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = (state.model_dump_json(by_alias=True) + "\n").encode()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temporary)
        raise
    os.close(fd)
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamSource:
    """Where a receive's stream comes from (the state's ``server`` ... ``cookie`` keys)."""

    server: str | None
    stream_id: str | None
    image: str | None
    format: str | None
    group: str
    port: int
    cookie: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageIdentity:
    """What the stream delivers, as far as known before its first checkpoint."""

    sha1: str
    length: int
    frame_size: int | None
    block_size: int | None
    image: str | None = None
    format: str | None = None


class StateKeeper:
    """Saves one receive's state: now and then while it runs, and once when it ends. Thread-safe (one save at a time).

    `carried`: the checkpoint this receive resumed from; saved as it is until the assembly has one of its own,
    so a resume that stops early loses nothing.
    """

    def __init__(self, *, output: str, source: StreamSource, carried: Checkpoint | None = None) -> None:
        self.path = state_path(output)
        self._output = os.path.abspath(output)
        self._source = source
        self._carried = carried
        self._identity: ImageIdentity | None = None
        self._lock = threading.Lock()
        self._last: tuple | None = None
        self._warned: set[str] = set()

    def identify(self, identity: ImageIdentity) -> None:
        """The image is known (from the lease, or the stream's first metadata): saves can begin."""
        self._identity = identity

    def save(self, *, assembly: Assembly | None, target: Target | None, verified: bool = False) -> bool:
        """Save the blocks `assembly` has verified (after fsyncing `target`); False if nothing was written."""
        with self._lock:
            identity = self._identity
            if identity is None:
                return False
            # The blocks to claim are read first, then made durable, then claimed: a block verified after the
            # snapshot is not in it, and one in it had been written (and read back) before it was verified.
            checkpoint = assembly.checkpoint() if assembly is not None else None
            if checkpoint is None:
                checkpoint = self._carried
            if checkpoint is not None and (checkpoint.sha1, checkpoint.length) != (identity.sha1, identity.length):
                checkpoint = None
            blocks = bitarray()
            if checkpoint is not None:
                blocks.frombytes(checkpoint.verified_blocks)
            key = (identity, checkpoint.verified_blocks if checkpoint is not None else None, verified)
            if key == self._last:
                return False
            try:
                if target is not None:
                    target.sync()
                state = self._state(identity, checkpoint, blocks, verified=verified)
                write_state(state, self.path)
            except (OSError, TargetIOError) as error:
                message = str(error)
                if message not in self._warned:
                    self._warned.add(message)
                    log.warning("could not save the receive's state in %s: %s (a re-run will not resume from here)", self.path, message)
                return False
            self._last = key
            return True

    def _state(self, identity: ImageIdentity, checkpoint: Checkpoint | None, blocks: bitarray, *, verified: bool) -> ReceiverState:
        source = self._source
        frame_size = checkpoint.frame_size if checkpoint is not None else identity.frame_size
        block_size = checkpoint.block_size if checkpoint is not None else identity.block_size
        block_count = -(-identity.length // block_size) if block_size else None
        if block_count is not None:
            del blocks[block_count:]
        return ReceiverState(
            version=STATE_VERSION,
            output=self._output,
            server=source.server,
            stream_id=source.stream_id,
            image=source.image or identity.image,
            format=source.format or identity.format,
            group=source.group,
            port=source.port,
            cookie=source.cookie.lower(),
            sha1=identity.sha1.lower(),
            length=identity.length,
            frame_size=frame_size,
            block_size=block_size,
            verified_blocks=base64.b64encode(checkpoint.verified_blocks).decode() if checkpoint is not None else "",
            verified_block_count=blocks.count(1),
            block_count=block_count,
            verified=verified,
            updated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
