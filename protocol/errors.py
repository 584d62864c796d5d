"""The one root exception of vmcast.protocol and its two branches, after h11.

Policy (docs/PROTOCOL.md, "Error handling"):

* A datagram that cannot be parsed, or that belongs to another stream, is *never* an exception: UDP is
  unauthenticated, so anything on the wire may be garbage. It becomes a counted drop with a `DropReason`.
* A violation inside a stream we already accepted (metadata that contradicts what the same cookie said
  before) is a `RemoteProtocolError`: the assembly moves to the FAILED state and says why.
* Calling the state machine wrongly (checking a block that is not complete, say) is a `LocalProtocolError`:
  a bug in the caller, not in the peer.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of every exception raised by vmcast.protocol."""


class LocalProtocolError(ProtocolError):
    """The caller used the state machine in a way its rules forbid."""


class RemoteProtocolError(ProtocolError):
    """The sender broke the protocol inside a stream that was already accepted."""


class MetadataConflict(RemoteProtocolError):
    """A metadata frame contradicts an earlier one of the same cookie: the image changed under us."""

    def __init__(self, *, field: str, first: object, now: object) -> None:
        super().__init__(f"metadata field {field!r} changed from {first!r} to {now!r} within one stream")
        self.field = field
        self.first = first
        self.now = now
