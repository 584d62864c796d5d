"""``/v1/streams``: start or join the stream of an image, and watch the streams."""

from __future__ import annotations

import ipaddress
import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status

from .deps import CatalogDep, PreparerDep, RegistryDep, StreamStartsDep
from .schemas import ErrorBody, Stream, StreamRequest, StreamStarted

router = APIRouter(prefix="/v1/streams", tags=["streams"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=StreamStarted,
    summary="Start the stream of an image, or join it if it runs, and get a lease",
    responses={
        404: {"model": ErrorBody, "description": "No image of that name."},
        409: {"model": ErrorBody, "description": "The image changed while it was prepared; try again."},
        422: {
            "model": ErrorBody,
            "description": "The image is not offered in that format (the message lists those it is).",
        },
        503: {"model": ErrorBody, "description": "Every group of the range carries a stream."},
    },
)
def start_stream(
    body: StreamRequest, catalog: CatalogDep, preparer: PreparerDep, registry: RegistryDep
) -> StreamStarted:
    """The first start of an image in a format may take a while: an image asked for in another format than its
    own (a qcow2 as raw, a raw as qcow2) is converted once, and what is sent is read once to compute its
    manifest. Both are cached, so later starts answer at once.

    Starting an image and format that already stream joins that stream: same group, port and cookie, one
    more reference, a new lease. Release the lease with `DELETE /v1/leases/{lease_id}`.
    """
    # A plain `def`: conversion and hashing block, so FastAPI runs this in a worker thread.
    image = catalog.get(body.image)
    prepared = preparer.prepare(image, body.format)
    listening = _group_and_port(body.listening) if body.listening is not None else None
    stream, lease, joined = registry.acquire(prepared, min_receivers=body.min_receivers, max_wait=body.max_wait, listening=listening)
    return StreamStarted.of(stream, lease, joined=joined)


def _group_and_port(text: str) -> tuple[ipaddress.IPv4Address, int]:
    """``"239.255.0.2:8471"`` as a group and port; 422 for a malformed one (the schema checked its shape)."""
    address, _, port = text.rpartition(":")
    try:
        return ipaddress.IPv4Address(address), int(port)
    except ValueError as error:
        raise HTTPException(status_code=422, detail=f"listening: {text!r} is not an IPv4 group and port ({error})") from error


# A long poll longer than this risks the idle timeouts of proxies between receivers and the server.
MAX_LIST_WAIT = 60.0


@router.get("", response_model=list[Stream], summary="List the running streams, or wait for one to start")
async def list_streams(
    registry: RegistryDep,
    stream_starts: StreamStartsDep,
    image: Annotated[str | None, Query(max_length=8192, description="Only the streams of this image (its name as streams show it).")] = None,
    format: Annotated[str | None, Query(max_length=32, description="Only the streams in this format.")] = None,
    wait: Annotated[float, Query(ge=0, le=MAX_LIST_WAIT, description="When no stream matches: wait up to this many seconds for one to start, then answer (an empty list if none did).")] = 0,
) -> list[Stream]:
    """With `image` and `wait`, a receiver started before its stream waits here for an operator (or another
    receiver) to start it, then joins it with `POST /v1/streams`, like udp-receiver waiting for udp-sender.
    Every waiting request is woken when any stream starts; none costs anything while nothing does."""
    deadline = time.monotonic() + wait
    while True:
        next_start = stream_starts.next_start()  # taken before looking, so a start in between is not missed
        matching = [
            Stream.of(stream) for stream in registry.list()
            if (image is None or stream.image == image) and (format is None or stream.format == format)
        ]  # fmt: skip
        remaining = deadline - time.monotonic()
        if matching or remaining <= 0:
            return matching
        await stream_starts.wait_for(next_start, remaining)


@router.get(
    "/{stream_id}",
    response_model=Stream,
    summary="One stream, running or recently stopped",
    responses={404: {"model": ErrorBody, "description": "No stream with that id."}},
)
def get_stream(stream_id: str, registry: RegistryDep) -> Stream:
    return Stream.of(registry.get(stream_id))
