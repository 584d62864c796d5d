"""Request and response bodies of the HTTP API, shared by the server and its clients (`vmcast.server.client`).

Everything that crosses HTTP is one of these models: parsed and checked on the way in, converted from the
internal dataclasses on the way out.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from vmcast.protocol import FEC_SCHEME

from ..catalog import CatalogImage
from ..defaults import DEFAULT_MAX_WAIT
from ..registry import Lease, Release, StreamStatus

_HEX_COOKIE = r"^[0-9a-f]{16}$"
_GROUP_AND_PORT = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}:[0-9]{1,5}$"
_SHA1 = r"^[0-9a-f]{40}$"
StreamState = Literal["running", "stopping", "stopped", "failed"]


class _Model(BaseModel):
    # Frozen, and fields may be given by name or by alias ("len"): clients parse what servers write.
    model_config = ConfigDict(frozen=True, populate_by_name=True)


class Image(_Model):
    """An image the server offers."""

    name: str = Field(description="The image's file name; what `POST /v1/streams` asks for.")
    formats: list[str] = Field(
        description="Formats it can be streamed in, its own first: raw and qcow2 for raw images; the source format, raw and qcow2 for vmdk, vhdx and the like (qcow2 and raw for qcow2)."
    )
    size: int = Field(description="Size of the file in bytes.")
    source_format: str = Field(description="Format of the file, as `qemu-img info` detected it.")
    virtual_size: int = Field(description="Size in bytes of the disk it describes (the size of its raw form).")

    @classmethod
    def of(cls, image: CatalogImage) -> Image:
        return cls(
            name=image.name,
            formats=list(image.formats),
            size=image.size,
            source_format=image.source_format,
            virtual_size=image.virtual_size,
        )


class StreamRequest(_Model):
    """Start (or join) the stream of an image."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", json_schema_extra={"examples": [{"image": "debian-12.qcow2", "format": "raw"}]}
    )

    image: str = Field(
        min_length=1,
        max_length=8192,
        description="Image name, as `GET /v1/images` lists it; or `glance:<id or name>`, `s3://bucket/key`, or an http(s) URL.",
    )
    format: str = Field(
        "raw",
        min_length=1,
        max_length=32,
        description="Format to stream the image in; one of the image's `formats`.",
    )
    min_receivers: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="When this request starts the stream: send only metadata until this many receivers have "
        "joined the group (`POST /v1/leases/{lease_id}/joined`), then start the first loop at the image's first "
        "frame, like udp-sender's --min-receivers. Null: start at once. Ignored when the stream runs already.",
    )
    max_wait: float = Field(
        DEFAULT_MAX_WAIT,
        gt=0,
        le=86_400,
        description="With `min_receivers`: start anyway after this many seconds, with the receivers there.",
    )
    listening: str | None = Field(
        None,
        max_length=21,
        pattern=_GROUP_AND_PORT,
        description="The multicast group and UDP port (`239.255.0.2:8471`) the requester listens on already, "
        "as `GET /v1/streams?wait=` showed them before it asked: when the lease is on a stream sent there, it "
        "counts as joined at once (the answer says `joined`: true) and `POST /v1/leases/{lease_id}/joined` is "
        "not needed. A receiver started before its stream saves one request this way, and a stream holding for "
        "receivers starts one round trip sooner.",
    )


class StreamStarted(_Model):
    """A lease on a running stream, and everything a receiver needs to join it."""

    stream_id: str = Field(description="The stream (shared by every lease on the same image and format).")
    lease_id: str = Field(description="This client's lease: `DELETE /v1/leases/{lease_id}` when done.")
    image: str
    format: str
    group: str = Field(description="IPv4 multicast group the stream is sent to.")
    port: int = Field(description="UDP destination port.")
    cookie: str = Field(
        pattern=_HEX_COOKIE,
        description="The stream's 8-byte cookie, 16 lowercase hex digits; receivers drop other cookies.",
    )
    length: int = Field(alias="len", description="Image size in bytes.")
    sha1: str = Field(pattern=_SHA1, description="SHA-1 of the image as sent.")
    frame_size: int = Field(description="Image bytes per data datagram.")
    block_size: int = Field(description="Bytes per checksum block.")
    zero_bytes: int = Field(
        0,
        description="Bytes of the image in all-zero blocks and all-zero frames: metadata names them and they are never sent, so a loop carries `len - zero_bytes` bytes of data.",
    )
    fec: str | None = Field(
        None,
        description='The parity scheme the stream\'s metadata announces ("raptorq"): receivers may ask for parity of a block instead of its lost frames (docs/PROTOCOL.md section 8); null: none.',
    )
    repair_port: int = Field(
        description="UDP port, on the API's host, that takes repair requests (docs/PROTOCOL.md section 7)."
    )
    carousel_port: int = Field(
        description="Source UDP port of the carousel's datagrams (repair frames come from another): a receiver "
        "follows the carousel's position from its first datagram (docs/PROTOCOL.md section 7)."
    )
    waiting_for: int = Field(
        0,
        description="Receivers the stream still holds for (sending only metadata) before its first loop: when "
        "above 0, say `POST /v1/leases/{lease_id}/joined` once listening to the group (unless `joined`).",
    )
    joined: bool = Field(
        False,
        description="This lease counts as joined already: the request's `listening` named the stream's group and port.",
    )
    lease_ttl: float = Field(
        description="Seconds the lease lives without renewal: renew it (POST /v1/leases/{lease_id}/renew) well within that, e.g. every third of it."
    )
    expires_at: float = Field(description="When the lease ends unless renewed, in seconds since the epoch.")

    @classmethod
    def of(cls, stream: StreamStatus, lease: Lease, *, joined: bool = False) -> StreamStarted:
        return cls(
            **_identity_of(stream),
            lease_id=lease.lease_id,
            repair_port=stream.repair_port,
            carousel_port=stream.sender.carousel_port,
            waiting_for=stream.waiting_for,
            joined=joined,
            lease_ttl=lease.ttl,
            expires_at=lease.expires_at,
        )


def _identity_of(stream) -> dict[str, object]:
    """The fields that say which stream and image this is, shared by the start answer and the stream status."""
    return {
        "stream_id": stream.stream_id,
        "image": stream.image,
        "format": stream.format,
        "group": str(stream.group),
        "port": stream.port,
        "cookie": stream.cookie.hex(),
        "length": stream.length,
        "sha1": stream.sha1,
        "frame_size": stream.frame_size,
        "block_size": stream.block_size,
        "zero_bytes": stream.zero_bytes,
        "fec": FEC_SCHEME if stream.sender.fec else None,
    }


class Stream(_Model):
    """A stream and its sender's counters."""

    stream_id: str
    image: str
    format: str
    group: str
    port: int
    cookie: str = Field(pattern=_HEX_COOKIE)
    length: int = Field(alias="len", description="Image size in bytes.")
    sha1: str = Field(pattern=_SHA1)
    frame_size: int
    block_size: int
    zero_bytes: int = Field(0, description="Bytes of the image in all-zero blocks and frames, which are never sent.")
    fec: str | None = Field(None, description='The parity scheme the stream announces ("raptorq"), null: none.')
    references: int = Field(description="Leases holding the stream; it stops when the last is released.")
    waiting_for: int = Field(0, description="Receivers the stream still holds for before its first loop (0: it streams).")
    loops_completed: int = Field(description="Times the whole image was sent.")
    resting: bool = Field(
        False, description="The carousel rests: every lease holder heard a whole loop; it sends only the repairs asked for until a new lease comes."
    )
    rests: int = Field(0, description="Times the carousel came to rest.")
    bytes_sent: int = Field(description="UDP payload bytes sent (vmcast frame headers included, IP/UDP headers not).")
    datagrams_sent: int = Field(description="Datagrams sent, data and metadata.")
    rate_bps: int = Field(description="Configured send rate in bits/s, IP and UDP headers included; 0 = unpaced.")
    measured_bps: float = Field(description="Measured send rate over about the last second, counted like rate_bps.")
    gso: bool = Field(
        False, description="Data frames leave in UDP GSO batches (many datagrams per system call); the wire is the same."
    )
    send_errors: int = Field(description="Sends that failed (other than a full queue) and were retried.")
    last_error: str | None = Field(description="The most recent send error, if any.")
    state: StreamState
    repair_port: int = Field(description="UDP port, on the API's host, that takes repair requests.")
    carousel_port: int = Field(description="Source UDP port of the carousel's datagrams (repair frames come from another).")
    repair_requests: int = Field(description="Repair requests accepted for this stream.")
    repair_frames_sent: int = Field(description="Frames resent (from the repair source port) because receivers asked.")
    parity_frames_sent: int = Field(
        0, description="RaptorQ parity frames sent (from the repair source port) because receivers asked (not in repair_frames_sent)."
    )
    parity_jobs: int = Field(0, description="Parity jobs done by the server's workers for this stream (one or more per block asked for).")
    parity_cpu_seconds: float = Field(0.0, description="CPU time of the server's parity workers for this stream's parity.")
    parity_deferred: int = Field(0, description="Parity frames whose turn came before the workers had made them: kept, and sent once made.")
    pacing_missed_seconds: float = Field(
        0.0, description="Sending time lost at the rate: the sender woke later than its pacing could make up (a busy machine)."
    )
    repair_pending: int = Field(description="Frames asked for and not resent yet.")
    repair_drops: int = Field(
        description="Repair requests for this stream that were dropped: malformed, frames outside the image, or backlog full."
    )

    @classmethod
    def of(cls, stream: StreamStatus) -> Stream:
        sender = stream.sender
        return cls(
            **_identity_of(stream),
            references=stream.references,
            waiting_for=stream.waiting_for,
            loops_completed=sender.loops_completed,
            resting=sender.resting,
            rests=sender.rests,
            bytes_sent=sender.bytes_sent,
            datagrams_sent=sender.datagrams_sent,
            rate_bps=stream.rate_bps,
            measured_bps=round(sender.measured_bps, 1),
            gso=sender.gso,
            send_errors=sender.send_errors,
            last_error=sender.last_error,
            state=sender.state.value,
            repair_port=stream.repair_port,
            carousel_port=sender.carousel_port,
            repair_requests=sender.repair_requests,
            repair_frames_sent=sender.repair_frames_sent,
            parity_frames_sent=sender.parity_frames_sent,
            parity_jobs=sender.parity_jobs,
            parity_cpu_seconds=round(sender.parity_cpu_seconds, 3),
            parity_deferred=sender.parity_deferred,
            pacing_missed_seconds=round(sender.pacing_missed_seconds, 3),
            repair_pending=sender.repair_pending,
            repair_drops=sender.repair_drops,
        )


class LeaseJoined(_Model):
    """The answer to a receiver saying it joined the group."""

    stream_id: str
    waiting_for: int = Field(description="Receivers the stream still holds for (0: it streams).")


class LeaseInfo(_Model):
    """An active lease (also the answer of a renewal)."""

    lease_id: str
    stream_id: str
    created_at: float = Field(description="When it was granted, in seconds since the epoch.")
    expires_at: float = Field(description="When it ends unless renewed, in seconds since the epoch.")
    lease_ttl: float = Field(description="Seconds each renewal keeps it alive.")

    @classmethod
    def of(cls, lease: Lease) -> LeaseInfo:
        return cls(
            lease_id=lease.lease_id,
            stream_id=lease.stream_id,
            created_at=lease.created_at,
            expires_at=lease.expires_at,
            lease_ttl=lease.ttl,
        )


class LeaseReleased(_Model):
    """What `DELETE /v1/leases/{lease_id}` did. Releasing is idempotent: a lease never counts twice."""

    lease_id: str
    outcome: Literal["released", "already_released", "expired", "unknown"] = Field(
        description=(
            "released: this call ended the lease; already_released: an earlier call did; expired: it ended "
            "because it was not renewed in time; unknown: no such lease."
        )
    )
    stream_id: str | None = Field(description="The lease's stream, if known.")
    references: int | None = Field(description="The stream's references now, if known.")
    stream_stopped: bool = Field(description="The stream has no references left and its sender has stopped.")
    detail: str = Field(description="The outcome in words.")

    @classmethod
    def of(cls, release: Release) -> LeaseReleased:
        match release.outcome.value:
            case "released" if release.stream_stopped:
                detail = f"lease released; it was the last one, so stream {release.stream_id} stopped"
            case "released":
                detail = (
                    f"lease released; stream {release.stream_id} keeps running for {release.references} other lease(s)"
                )
            case "already_released":
                detail = "lease was already released; nothing changed"
            case "expired":
                detail = "lease had expired (it was not renewed in time); nothing changed"
            case _:
                detail = "no such lease (never granted, or released long ago); nothing changed"
        return cls(
            lease_id=release.lease_id,
            outcome=release.outcome.value,
            stream_id=release.stream_id,
            references=release.references,
            stream_stopped=release.stream_stopped,
            detail=detail,
        )


class Health(_Model):
    status: Literal["ok"] = "ok"
    streams: int = Field(description="Running streams.")


class ErrorBody(_Model):
    """Every error answer: what went wrong and what to do, in one sentence."""

    detail: str
