"""``/v1/leases``: a client's claim on a stream; the stream runs while it has leases."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from .deps import RegistryDep
from .schemas import ErrorBody, LeaseInfo, LeaseReleased

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


@router.delete("/{lease_id}", response_model=LeaseReleased, summary="Release a lease (idempotent)")
def release_lease(lease_id: str, registry: RegistryDep) -> LeaseReleased:
    """Takes one reference off the lease's stream; the last release stops the sender (within a second).

    Always 200: releasing a lease again, or a lease the server does not know, changes nothing and says so
    in `outcome`, so a client may retry a release safely.
    """
    return LeaseReleased.of(registry.release(lease_id))
