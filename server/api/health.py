"""``/healthz``: the server answers and its registry works."""

from __future__ import annotations

from fastapi import APIRouter

from .deps import RegistryDep
from .schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz(registry: RegistryDep) -> Health:
    return Health(streams=len(registry.list()))
