"""``/v1/streams/{stream_id}/data``: the unicast fallback, a running stream's image bytes by HTTP ``Range``.

A receiver that cannot get some frames by multicast (or prefers not to wait for the next loop) fetches them
here. Range rules: `vmcast.server.byte_ranges` (one range per response; several ranges -> the first
satisfiable one, told by ``Content-Range``). The ``ETag`` is the image's SHA-1 in quotes, so ``If-Range``
with it makes a range request safe against the image having changed (it cannot within one stream).

Every body, whatever the number of concurrent downloads, takes its bytes from the one server-wide
`SharedRateLimit` (``--repair-rate``), chunk by chunk, and is read from the file chunk by chunk in a worker
thread: nothing is buffered beyond one chunk, and the event loop never blocks.

Error handling: 404 for an unknown stream or one that stopped; 409 if the file no longer has the identity
the stream's manifest was made for (bytes that are not the announced image are never served).
Resource handling: the file is opened, and its identity checked, once before answering (so a changed file
is a 409, not a broken body) and again by the body when it starts, which holds it only while it runs: a body
never started holds nothing, and one abandoned by a client that went away is closed with its generator.
Should the file be replaced between the two, the body ends short (the client sees fewer bytes than
Content-Length said), never with other bytes.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response, StreamingResponse

from ..byte_ranges import ByteRange, Unsatisfiable, parse_range
from ..errors import ImageChanged, StreamNotRunning
from ..preparation import PreparedImage
from ..registry import Registry
from ..throttle import SharedRateLimit
from .deps import RegistryDep
from .schemas import ErrorBody

router = APIRouter(prefix="/v1/streams", tags=["streams"])

# Bytes read and admitted at a time: 64 KiB is 2.6 ms at 200 Mbit/s, so the cap is smooth; and large enough
# that the thread hand-off per chunk costs nothing next to the copy.
CHUNK = 64 * 1024


def get_range_limit(request: Request) -> SharedRateLimit:
    return request.app.state.services.range_limit


RangeLimitDep = Annotated[SharedRateLimit, Depends(get_range_limit)]


class RangeCounters:
    """What the fallback served (metrics), per status code."""

    def __init__(self) -> None:
        self.responses: dict[int, int] = {200: 0, 206: 0, 416: 0}


def get_range_counters(request: Request) -> RangeCounters:
    return request.app.state.services.range_counters


RangeCountersDep = Annotated[RangeCounters, Depends(get_range_counters)]


def _open_checked(image: PreparedImage) -> int:
    """A descriptor of the stream's file, if it still is the file the manifest describes."""
    fd = os.open(image.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not image.identity.same_content_as(os.fstat(fd)):
            raise ImageChanged(path=image.path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_image(registry: Registry, stream_id: str) -> PreparedImage:
    """The running stream's image, its file checked; in a worker thread."""
    image, running = registry.image_of(stream_id)
    if not running:
        raise StreamNotRunning(stream_id=stream_id)
    os.close(_open_checked(image))
    return image


async def _read_file(image: PreparedImage, first: int, size: int, limit: SharedRateLimit) -> AsyncIterator[bytes]:
    try:
        fd = await anyio.to_thread.run_sync(_open_checked, image)
    except (ImageChanged, OSError):
        return  # replaced since the check: end short rather than send other bytes
    try:
        position, end = first, first + size
        while position < end:
            count = min(CHUNK, end - position)
            await limit.take(count)
            data = await anyio.to_thread.run_sync(os.pread, fd, count, position)
            if not data:  # the file shrank under us: end the body short; the client sees a short read
                return
            position += len(data)
            yield data
    finally:
        os.close(fd)


_DATA_RESPONSES: dict[int | str, dict] = {
    200: {"content": {"application/octet-stream": {}}, "description": "The whole image (no or ignored Range)."},
    206: {"content": {"application/octet-stream": {}}, "description": "One range; Content-Range says which."},
    404: {"model": ErrorBody, "description": "No running stream with that id."},
    409: {"model": ErrorBody, "description": "The image file changed; start the stream again."},
    416: {"description": "No requested range is inside the image; Content-Range: bytes */length."},
}


@router.get(
    "/{stream_id}/data",
    summary="The stream's image bytes, whole or by Range (the unicast repair fallback)",
    response_class=Response,
    responses=_DATA_RESPONSES,
    operation_id="get_stream_data",
)
@router.head(
    "/{stream_id}/data",
    summary="The headers GET would answer (length, ETag, Content-Range), without the bytes",
    response_class=Response,
    responses=_DATA_RESPONSES,
    operation_id="head_stream_data",
)
async def stream_data(
    stream_id: str,
    request: Request,
    registry: RegistryDep,
    limit: RangeLimitDep,
    counters: RangeCountersDep,
    range_header: Annotated[str | None, Header(alias="range")] = None,
    if_range: Annotated[str | None, Header(alias="if-range")] = None,
) -> Response:
    """Standard HTTP ranges: ``bytes=a-b``, ``bytes=a-``, ``bytes=-n`` -> 206 with ``Content-Range``; a range
    outside the image -> 416; no Range -> 200 with the whole image. Several ranges are answered with the
    first satisfiable one alone (read ``Content-Range``). All downloads share ``--repair-rate``."""
    image = await anyio.to_thread.run_sync(_check_image, registry, stream_id)
    length = image.manifest.layout.length
    etag = f'"{image.manifest.sha1}"'
    headers = {"accept-ranges": "bytes", "etag": etag}
    wanted = parse_range(range_header, length)
    if wanted is not None and if_range is not None and if_range.strip() != etag:
        wanted = None  # RFC 9110 13.1.5: the client's copy is another one; send the whole representation
    if isinstance(wanted, Unsatisfiable):
        counters.responses[416] += 1
        headers["content-range"] = wanted.content_range
        return Response(status_code=416, headers=headers)
    if isinstance(wanted, ByteRange):
        status, first, size = 206, wanted.first, wanted.size
        headers["content-range"] = wanted.content_range
    else:
        status, first, size = 200, 0, length
    headers["content-length"] = str(size)
    counters.responses[status] += 1
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type="application/octet-stream")
    return StreamingResponse(
        _read_file(image, first, size, limit),
        status_code=status,
        headers=headers,
        media_type="application/octet-stream",
    )
