"""The FastAPI application: wires the routers and starts and stops the server's services in `lifespan`.

``uvicorn vmcast.server.app:app`` works with settings from ``VMCAST_*`` variables; `vmcast serve` and the
tests use `create_app(settings)`.

Lifecycle: `start_services` checks the settings and opens what the server holds exclusively (the state
database, the repair port) but starts no thread; `lifespan` then resumes the recorded streams, starts the
repair listener and the lease reaper, and on the way out stops them all and closes what was opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import anyio.to_thread
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from .api import health, images, leases, metrics, stream_data, streams
from .api.errors import install_error_handlers
from .api.stream_data import CHUNK, RangeCounters
from .api.stream_starts import StreamStarts
from .catalog import Catalog
from .conversion import Converter
from .errors import ConfigurationError
from .fingerprints import Fingerprints
from .manifests import ManifestStore
from .metrics import ServerCollector, metrics_registry
from .preparation import PreparedImage, Preparer
from .qemu_img import QemuImg
from .rates import format_rate
from .registry import Registry
from .repair_listener import RepairListener, bind_repair_socket
from .sender import SenderConfig, check_interface
from .settings import Settings, get_settings
from .state import StateStore, StoredStream
from .throttle import SharedRateLimit

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
    store: StateStore
    repair_listener: RepairListener
    range_limit: SharedRateLimit
    range_counters: RangeCounters
    metrics: CollectorRegistry

    def prepare_recorded(self, stored: StoredStream) -> PreparedImage:
        """The image of a stream recorded before a restart, made ready again (blocking)."""
        return self.preparer.prepare(self.catalog.get(stored.image), stored.format)

    def close(self) -> None:
        """Stop the streams and the listener; close the state database (its records stay for the next start)."""
        self.repair_listener.stop()
        self.registry.close()
        self.store.close()


# The lease reaper looks for expired leases this often (or four times per TTL, if that is shorter), so a
# lease ends at most this long after its deadline, and its stream stops within a second after that.
REAP_INTERVAL = 1.0


def check_settings(settings: Settings) -> QemuImg:
    """Check what can be checked without holding anything: qemu-img, the interface, the cache directory.

    Error handling: `QemuImgMissing`, `ConfigurationError`, each with a message that says what to do.
    """
    qemu = QemuImg(settings.qemu_img)
    check_interface(settings.interface)
    try:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigurationError(
            setting="--cache-dir", problem=f"cannot use {settings.cache_dir}: {error.strerror or error}"
        ) from None
    return qemu


def start_services(settings: Settings, *, repair_socket: socket.socket | None = None) -> Services:
    """Check the settings and make the services; open the state database and bind the repair port.

    Starts no thread (`lifespan` does). `repair_socket`: one bound already (`vmcast serve` binds it next to
    the HTTP socket); else one is bound on ``--host`` and ``settings.repair_port`` (None: the number of
    ``--port``).

    Error handling: `QemuImgMissing`, `ConfigurationError` (interface, cache directory, state database,
    repair port), each with a message that says what to do.
    Resource handling: the caller closes the services (`Services.close`).
    """
    qemu = check_settings(settings)
    try:
        fingerprints = Fingerprints(cache_dir=settings.cache_dir)
        converter = Converter(cache_dir=settings.cache_dir, qemu=qemu)
        manifests = ManifestStore(cache_dir=settings.cache_dir)
    except OSError as error:
        raise ConfigurationError(
            setting="--cache-dir", problem=f"cannot use {settings.cache_dir}: {error.strerror or error}"
        ) from None
    store = StateStore(settings.state_db_path)
    try:
        if repair_socket is None:
            repair_socket = bind_repair_socket(settings.host, settings.resolved_repair_port(settings.port))
    except BaseException:
        store.close()
        raise
    registry = Registry(
        group_range=settings.group_range,
        port=settings.mcast_port,
        sender_config=SenderConfig(
            interface=settings.interface, ttl=settings.ttl, rate_bps=settings.rate, gso=settings.gso, fec=settings.fec
        ),
        lease_ttl=settings.lease_ttl,
        store=store,
        repair_port=repair_socket.getsockname()[1],
    )
    listener = RepairListener(sock=repair_socket, lookup=registry.sender_for_cookie)
    range_limit = SharedRateLimit(rate_bps=settings.repair_rate, largest_chunk=CHUNK)
    range_counters = RangeCounters()
    return Services(
        settings=settings,
        catalog=Catalog(images_dir=settings.images_dir, qemu=qemu, cache_dir=settings.cache_dir),
        fingerprints=fingerprints,
        converter=converter,
        manifests=manifests,
        preparer=Preparer(
            fingerprints=fingerprints, converter=converter, manifests=manifests, frame_size=settings.payload
        ),
        registry=registry,
        store=store,
        repair_listener=listener,
        range_limit=range_limit,
        range_counters=range_counters,
        metrics=metrics_registry(
            ServerCollector(
                registry=registry, listener=listener, range_limit=range_limit, range_responses=range_counters.responses
            )
        ),
    )


async def _reap_leases(registry: Registry, interval: float) -> None:
    """End expired leases every `interval` seconds, until cancelled."""
    while True:
        await anyio.sleep(interval)
        try:
            await anyio.to_thread.run_sync(registry.reap)
        except Exception:  # a bug; the reaper must outlive it, or no lease would ever expire again
            log.exception("the lease reaper failed; it goes on")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The same override the routers see, so a test's settings reach the services too.
    settings = app.dependency_overrides.get(get_settings, get_settings)()
    services = getattr(app.state, "prepared_services", None)
    if services is not None:
        del app.state.prepared_services  # owned by this run of the application: closed when it stops
    else:
        services = await anyio.to_thread.run_sync(start_services, settings)
    app.state.services = services
    app.state.stream_starts = StreamStarts(asyncio.get_running_loop())
    services.registry.on_stream_started = app.state.stream_starts.notify
    try:
        resumed = await anyio.to_thread.run_sync(services.registry.resume, services.prepare_recorded)
        services.repair_listener.start()
        log.info(
            "serving images from %s; streams to %s port %d by %s at %s, %d-byte frames, TTL %d, UDP GSO %s; repair "
            "requests on UDP port %d; range downloads capped at %s; leases live %g s; state in %s (%d stream(s) "
            "resumed)",
            settings.images_dir, settings.group_range, settings.mcast_port, settings.interface,
            format_rate(settings.rate), settings.payload, settings.ttl, "on" if settings.gso else "off",
            services.repair_listener.port,
            format_rate(settings.repair_rate, zero="unlimited"), settings.lease_ttl, settings.state_db_path, resumed,
        )  # fmt: skip
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_reap_leases, services.registry, min(REAP_INTERVAL, settings.lease_ttl / 4))
            try:
                yield
            finally:
                tasks.cancel_scope.cancel()
    finally:
        await anyio.to_thread.run_sync(services.close)


def create_app(settings: Settings | None = None, *, services: Services | None = None) -> FastAPI:
    """The application; with `settings`, they override `get_settings` (else they come from the environment).

    `services`: made already by `start_services` (`vmcast serve` makes them before serving, to report a
    problem plainly); the application owns them from then on and closes them when it stops.
    """
    app = FastAPI(
        title="vmcast",
        summary="Streams disk images to many machines at once over UDP multicast.",
        description=(
            "Start a stream with `POST /v1/streams`, give its group, port and cookie to receivers "
            "(`vmcast receive`), renew the lease (`POST /v1/leases/{lease_id}/renew`) within `lease_ttl`, and "
            "release it with `DELETE /v1/leases/{lease_id}` when they are done. Streams of the same image and "
            "format are shared and reference counted, and survive a server restart. Lost frames can be asked "
            "for by UDP at `repair_port` (docs/PROTOCOL.md section 7) or fetched by HTTP Range from "
            "`GET /v1/streams/{stream_id}/data`."
        ),
        version="0.1.0",
        lifespan=lifespan,
    )
    if settings is not None:
        app.dependency_overrides[get_settings] = lambda: settings
    if services is not None:
        app.state.prepared_services = services
    install_error_handlers(app)
    for router in (images.router, streams.router, stream_data.router, leases.router, health.router, metrics.router):
        app.include_router(router)
    return app


app = create_app()
