"""The FastAPI application: wires the routers and starts and stops the server's services in `lifespan`.

``uvicorn vmcast.server.app:app`` works with settings from ``VMCAST_*`` variables; `vmcast serve` and the
tests use `create_app(settings)`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio.to_thread
from fastapi import FastAPI

from .api import health, images, leases, streams
from .api.errors import install_error_handlers
from .catalog import Catalog
from .conversion import Converter
from .errors import ConfigurationError
from .fingerprints import Fingerprints
from .manifests import ManifestStore
from .preparation import Preparer
from .qemu_img import QemuImg
from .rates import format_rate
from .registry import Registry
from .sender import SenderConfig, check_interface
from .settings import Settings, get_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Services:
    """What the routers use; made by `start_services`, kept in ``app.state.services``."""

    settings: Settings
    catalog: Catalog
    fingerprints: Fingerprints
    converter: Converter
    manifests: ManifestStore
    preparer: Preparer
    registry: Registry


def start_services(settings: Settings) -> Services:
    """Check what can be checked before serving, and make the services.

    Error handling: `QemuImgMissing`, `ConfigurationError` (interface, cache directory), each with a message
    that says what to do.
    """
    qemu = QemuImg(settings.qemu_img)
    check_interface(settings.interface)
    try:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        fingerprints = Fingerprints(cache_dir=settings.cache_dir)
        converter = Converter(cache_dir=settings.cache_dir, qemu=qemu)
        manifests = ManifestStore(cache_dir=settings.cache_dir)
    except OSError as error:
        raise ConfigurationError(
            setting="--cache-dir", problem=f"cannot use {settings.cache_dir}: {error.strerror or error}"
        ) from None
    return Services(
        settings=settings,
        catalog=Catalog(images_dir=settings.images_dir, qemu=qemu),
        fingerprints=fingerprints,
        converter=converter,
        manifests=manifests,
        preparer=Preparer(
            fingerprints=fingerprints, converter=converter, manifests=manifests, frame_size=settings.payload
        ),
        registry=Registry(
            group_range=settings.group_range,
            port=settings.mcast_port,
            sender_config=SenderConfig(interface=settings.interface, ttl=settings.ttl, rate_bps=settings.rate),
        ),
    )


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The same override the routers see, so a test's settings reach the services too.
    settings = app.dependency_overrides.get(get_settings, get_settings)()
    services = await anyio.to_thread.run_sync(start_services, settings)
    app.state.services = services
    log.info(
        "serving images from %s; streams to %s port %d by %s at %s, %d-byte frames, TTL %d",
        settings.images_dir, settings.group_range, settings.mcast_port, settings.interface,
        format_rate(settings.rate), settings.payload, settings.ttl,
    )  # fmt: skip
    try:
        yield
    finally:
        await anyio.to_thread.run_sync(services.registry.close)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application; with `settings`, they override `get_settings` (else they come from the environment)."""
    app = FastAPI(
        title="vmcast",
        summary="Streams disk images to many machines at once over UDP multicast.",
        description=(
            "Start a stream with `POST /v1/streams`, give its group, port and cookie to receivers "
            "(`vmcast receive`), and release the lease with `DELETE /v1/leases/{lease_id}` when they are done. "
            "Streams of the same image and format are shared and reference counted."
        ),
        version="0.1.0",
        lifespan=lifespan,
    )
    if settings is not None:
        app.dependency_overrides[get_settings] = lambda: settings
    install_error_handlers(app)
    for router in (images.router, streams.router, leases.router, health.router):
        app.include_router(router)
    return app


app = create_app()
