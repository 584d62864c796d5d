"""The vmcast server's stream API, as a receiver uses it: take a lease on an image's stream, keep it, release it.

``GET /v1/streams?image=&format=&wait=`` -> 200 with the running streams of that image, after waiting up to
``wait`` seconds for one to start (`LeaseClient.wait_for_stream`).
``POST /v1/streams {"image", "format"[, "min_receivers", "max_wait", "listening"]}`` -> 201 with the stream to
join (`Lease`); 404 unknown image, 422 unknown format, each with ``{"detail": ...}``. When the answer's
``waiting_for`` is above 0 the stream holds (metadata only) for receivers: ``POST /v1/leases/{lease_id}/joined``
once listening to the group, unless the answer says ``joined`` (the request's ``listening`` named the group and
port the receiver had joined already). A lease with a ``lease_ttl`` ends unless renewed within it:
``POST /v1/leases/{lease_id}/renew`` (404: it has ended already). ``DELETE /v1/leases/{lease_id}`` releases
(idempotent: a lease already gone is released).

Error handling: every failure, whether the server cannot be reached, answers an error status, or sends
an answer that does not parse, raises `ServerError` with the URL and the server's own ``detail``.
Resource handling: the caller owns the `httpx.AsyncClient`.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated

import httpx
import pydantic
import trio
from pydantic import BaseModel, ConfigDict, Field

from .errors import ServerError
from .multicast import is_multicast

log = logging.getLogger(__name__)

# The API answers at once; anything slower is a server in trouble, better reported than waited for.
REQUEST_TIMEOUT = 10.0
# One long poll for a stream to start: well under the idle timeouts of proxies (and the server's cap, 60 s).
LONG_POLL = 30.0
# Between two looks for a stream that has not started, at least this long: a server from before long polls
# answers at once, and must not be asked in a tight loop.
LOOK_INTERVAL = 1.0


class Lease(BaseModel):
    """A server's answer to "I want this image": the stream to join and what it will deliver."""

    model_config = ConfigDict(frozen=True, coerce_numbers_to_str=True, extra="ignore")

    stream_id: str
    """The server's stream identifier."""
    group: str
    """IPv4 multicast group the stream is sent to."""
    port: Annotated[int, Field(ge=1, le=65535)]
    """UDP port."""
    cookie: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{16}$")]
    """The stream's 8-byte cookie, hex."""
    lease_id: str
    """What to release when done."""
    length: Annotated[int, Field(ge=0, alias="len")]
    """Image size in bytes."""
    sha1: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{40}$")]
    """SHA-1 of the image, hex."""
    frame_size: Annotated[int, Field(gt=0)]
    """Data frame payload size."""
    block_size: Annotated[int | None, Field(gt=0)] = None
    """Checksum block size, when the server says (it lets the receiver start before the first metadata)."""
    lease_ttl: Annotated[float | None, Field(gt=0)] = None
    """Seconds the lease lives without a renewal; None: it lives until released."""
    joined: bool = False
    """The server counts this lease as joined already (`LeaseClient.acquire`'s `listening` was its group)."""
    repair_port: Annotated[int | None, Field(ge=1, le=65535)] = None
    """UDP port, on the server's host, that takes repair requests (docs/PROTOCOL.md section 7); None: none."""
    carousel_port: Annotated[int | None, Field(ge=1, le=65535)] = None
    """Source port of the carousel's datagrams; None: learned from the first metadata frame instead."""
    waiting_for: Annotated[int, Field(ge=0)] = 0
    """Receivers the stream still holds for before its first loop: say `LeaseClient.joined` once listening."""
    fec: Annotated[str | None, Field(max_length=32)] = None
    """The parity scheme the stream's metadata announces (``"raptorq"``, docs/PROTOCOL.md section 8), if any."""
    image: str
    """Image name."""
    format: str
    """Format of the bytes on the wire."""

    @pydantic.field_validator("group")
    @classmethod
    def _multicast_group(cls, value: str) -> str:
        if not is_multicast(value):
            raise ValueError(f"{value!r} is not an IPv4 multicast address")
        return value

    @pydantic.model_validator(mode="after")
    def _whole_frames_per_block(self) -> Lease:
        if self.block_size is not None and self.block_size % self.frame_size:
            raise ValueError(f"block_size {self.block_size} is not a multiple of frame_size {self.frame_size}")
        return self

    @property
    def cookie_bytes(self) -> bytes:
        return bytes.fromhex(self.cookie)

    def same_stream_as(self, other: Lease) -> bool:
        """Whether `other` (a lease taken again) leads to the very stream this one did."""
        identity = ("group", "port", "length", "frame_size", "block_size")
        return all(getattr(self, name) == getattr(other, name) for name in identity) and (
            self.cookie.lower(), self.sha1.lower()) == (other.cookie.lower(), other.sha1.lower())


class LeaseClient:
    """Takes and releases leases on one server."""

    def __init__(self, *, server: str, client: httpx.AsyncClient) -> None:
        self.server = server.rstrip("/")
        self._client = client

    async def acquire(
        self, *, image: str, format: str, min_receivers: int | None = None, max_wait: float | None = None,
        listening: tuple[str, int] | None = None,
    ) -> Lease:
        """A lease on the stream of `image`; a stream this starts holds for `min_receivers` (see the module).
        `listening`: the group and port this receiver has joined already; the lease then says `joined` when
        they are its stream's (and needs no `joined` call)."""
        url = f"{self.server}/v1/streams"
        body: dict[str, object] = {"image": image, "format": format}
        if min_receivers is not None:
            body |= {"min_receivers": min_receivers} | ({"max_wait": max_wait} if max_wait is not None else {})
        if listening is not None:
            body["listening"] = f"{listening[0]}:{listening[1]}"
        response = await self._request("POST", url, json=body)
        if response.status_code == 422 and "listening" in body and _refuses_fields(response, {"listening"}):
            # A server older than this field: the lease is taken without it, and `joined` said after.
            del body["listening"]
            response = await self._request("POST", url, json=body)
        if response.status_code == 422 and len(body) > 2 and _refuses_fields(response, {"min_receivers", "max_wait"}):
            # A server older than holding (its API forbids fields it does not know): ask as it understands.
            log.warning("the server at %s does not hold streams for receivers; the stream starts at once", self.server)
            body = {"image": image, "format": format}
            response = await self._request("POST", url, json=body)
        if response.status_code == 404:
            raise ServerError(url=url, status=404, reason=f"no image {image!r} ({response_detail(response)})")
        if response.status_code == 422:
            raise ServerError(url=url, status=422, reason=f"refused format {format!r} for {image!r} ({response_detail(response)})")
        if response.status_code != 201:
            raise ServerError(url=url, status=response.status_code, reason=response_detail(response))
        try:
            return Lease.model_validate_json(response.content)
        except pydantic.ValidationError as error:
            raise ServerError(url=url, status=response.status_code, reason=f"the answer does not describe a stream: {_first_error(error)}") from error

    async def wait_for_stream(self, *, image: str, format: str, timeout: float) -> tuple[str, int] | None:
        """Wait up to `timeout` seconds until a stream of `image` in `format` runs (started by an operator or
        another receiver); its group and port as soon as one does (a receiver may join them before it takes its
        lease: `acquire`'s `listening`), None if none started in time. The server answers each long poll the
        moment any stream starts, so this returns within a round trip of the start."""
        url = f"{self.server}/v1/streams"
        deadline = trio.current_time() + timeout
        while True:
            asked_at = trio.current_time()
            wait = max(0.0, min(LONG_POLL, deadline - asked_at))
            params = {"image": image, "format": format, "wait": f"{wait:.3f}"}
            response = await self._request("GET", url, params=params, timeout=REQUEST_TIMEOUT + wait)
            if response.status_code != 200:
                raise ServerError(url=url, status=response.status_code, reason=response_detail(response))
            try:
                streams = response.json()
                for stream in streams:
                    if stream["image"] == image and stream["format"] == format and stream["state"] == "running":
                        return str(stream["group"]), int(stream["port"])
            except (ValueError, KeyError, TypeError) as error:
                raise ServerError(url=url, status=200, reason="the answer is not a list of streams") from error
            now = trio.current_time()
            if now >= deadline:
                return None
            await trio.sleep(min(deadline - now, max(0.0, LOOK_INTERVAL - (now - asked_at))))

    async def renew(self, lease_id: str) -> bool:
        """Keep a lease alive for another TTL; False when it has ended already (expired, or unknown)."""
        url = f"{self.server}/v1/leases/{lease_id}/renew"
        response = await self._request("POST", url)
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise ServerError(url=url, status=response.status_code, reason=response_detail(response))
        return True

    async def joined(self, lease_id: str) -> int:
        """Say that this lease's holder listens to the group; the receivers the stream still holds for."""
        url = f"{self.server}/v1/leases/{lease_id}/joined"
        response = await self._request("POST", url)
        if response.status_code != 200:
            raise ServerError(url=url, status=response.status_code, reason=response_detail(response))
        try:
            return int(response.json()["waiting_for"])
        except (ValueError, KeyError, TypeError) as error:
            raise ServerError(url=url, status=200, reason="the answer has no waiting_for") from error

    async def release(self, lease_id: str) -> None:
        url = f"{self.server}/v1/leases/{lease_id}"
        response = await self._request("DELETE", url)
        if response.status_code not in (200, 202, 204, 404):
            raise ServerError(url=url, status=response.status_code, reason=response_detail(response))

    async def _request(self, method: str, url: str, *, timeout: float = REQUEST_TIMEOUT, **kwargs: object) -> httpx.Response:
        try:
            return await self._client.request(method, url, timeout=timeout, **kwargs)
        except httpx.HTTPError as error:
            raise ServerError(url=url, reason=f"unreachable: {error or type(error).__name__}") from error


def response_detail(response: httpx.Response) -> str:
    """The server's ``detail`` (FastAPI's error body), else the start of the body, else the reason phrase."""
    try:
        detail = response.json()["detail"]
    except (ValueError, KeyError, TypeError):
        text = re.sub(r"\s+", " ", response.text).strip()
        return text[:200] or response.reason_phrase
    return detail if isinstance(detail, str) else str(detail)[:200]


def _refuses_fields(response: httpx.Response, fields: set[str]) -> bool:
    """Whether a 422 answer (FastAPI's validation detail) refuses some of `fields` as unknown ("extra_forbidden")."""
    try:
        detail = response.json()["detail"]
        return any(item["type"] == "extra_forbidden" and item["loc"][-1] in fields for item in detail)
    except (ValueError, KeyError, TypeError, IndexError):
        return False


def _first_error(error: pydantic.ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"{where}: {first['msg']}"
