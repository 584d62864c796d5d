"""``/v1/leases``: a client's claim on a stream; the stream runs while it has leases.

A lease lives for the server's lease TTL (``lease_ttl`` in the answer of ``POST /v1/streams``) from its
grant or its last renewal; one that is not renewed in time ends as if released, and a stream whose last
lease ends stops within a second.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from .deps import RegistryDep
from .schemas import ErrorBody, LeaseInfo, LeaseJoined, LeaseReleased

router = APIRouter(prefix="/v1/leases", tags=["leases"])


@router.get(
    "/{lease_id}",
    response_model=LeaseInfo,
    summary="An active lease",
    responses={404: {"model": ErrorBody, "description": "No active lease with that id."}},
)
def get_lease(lease_id: str, registry: RegistryDep) -> LeaseInfo:
    lease = registry.lease(lease_id)
    if lease is None:
        raise HTTPException(status_code=404, detail=f"no active lease with id {lease_id!r}")
    return LeaseInfo.of(lease)


@router.post(
    "/{lease_id}/renew",
    response_model=LeaseInfo,
    summary="Keep a lease alive for another lease TTL",
    responses={
        404: {
            "model": ErrorBody,
            "description": "The lease expired, was released, or is unknown: start the stream again (POST /v1/streams).",
        }
    },
)
def renew_lease(lease_id: str, registry: RegistryDep) -> LeaseInfo:
    """Renew well within `lease_ttl` (every third of it leaves room for two lost renewals). The answer gives
    the new `expires_at`. A 404 means the lease has ended: the stream may have stopped, and the holder must
    start it again to get a new lease (same group, port and cookie if the stream still runs)."""
    return LeaseInfo.of(registry.renew(lease_id))


@router.post(
    "/{lease_id}/joined",
    response_model=LeaseJoined,
    summary="Say that the lease's holder has joined the stream's group",
    responses={404: {"model": ErrorBody, "description": "The lease expired, was released, or is unknown."}},
)
def lease_joined(lease_id: str, registry: RegistryDep) -> LeaseJoined:
    """A receiver says this once it listens to the group. A stream started with `min_receivers` = N (its
    start answer shows `waiting_for` > 0) sends only metadata until N of its active leases have said it (or
    its `max_wait` has passed), then starts its first loop at the image's first frame, so that receivers
    started together need one loop between them rather than one each plus the gaps between their starts.
    Once every active lease of a stream has said it, the carousel rests after the first loop that started
    later (every receiver heard it whole): it sends only the repairs asked for until a new lease comes, not
    another loop for receivers that are finishing (docs/PROTOCOL.md section 7). A lease that never says it
    keeps the carousel looping."""
    stream = registry.joined(lease_id)
    return LeaseJoined(stream_id=stream.stream_id, waiting_for=stream.waiting_for)


@router.delete("/{lease_id}", response_model=LeaseReleased, summary="Release a lease (idempotent)")
def release_lease(lease_id: str, registry: RegistryDep) -> LeaseReleased:
    """Takes one reference off the lease's stream; the last release stops the sender (within a second).

    Always 200: releasing a lease again, an expired lease, or a lease the server does not know, changes
    nothing and says so in `outcome`, so a client may retry a release safely.
    """
    return LeaseReleased.of(registry.release(lease_id))
