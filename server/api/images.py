"""``/v1/images``: what the server can stream."""

from __future__ import annotations

from fastapi import APIRouter

from .deps import CatalogDep
from .schemas import Image

router = APIRouter(prefix="/v1/images", tags=["images"])


@router.get("", response_model=list[Image], summary="List the images and the formats each is offered in")
def list_images(catalog: CatalogDep) -> list[Image]:
    # A plain `def`: FastAPI runs it in a worker thread, and qemu-img may run for a new file.
    return [Image.of(image) for image in catalog.list()]
