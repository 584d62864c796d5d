"""Dependencies of the routers: the services the application started in its lifespan.

Each is a function tests can override (``app.dependency_overrides[get_catalog] = ...``); the settings come
from `vmcast.server.settings.get_settings`, overridden the same way.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..catalog import Catalog
from ..preparation import Preparer
from ..registry import Registry
from .stream_starts import StreamStarts


def get_catalog(request: Request) -> Catalog:
    return request.app.state.services.catalog


def get_preparer(request: Request) -> Preparer:
    return request.app.state.services.preparer


def get_registry(request: Request) -> Registry:
    return request.app.state.services.registry


def get_stream_starts(request: Request) -> StreamStarts:
    return request.app.state.stream_starts


CatalogDep = Annotated[Catalog, Depends(get_catalog)]
PreparerDep = Annotated[Preparer, Depends(get_preparer)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
StreamStartsDep = Annotated[StreamStarts, Depends(get_stream_starts)]
