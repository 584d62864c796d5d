"""One receive, orchestrated with trio: lease, target, socket, pump, progress, watchdog, signals.

One nursery owns every task:

* ``_watch_signals``: SIGINT/SIGTERM cancel the nursery, so every ``finally`` runs (the lease is released).
* ``_hold_lease`` (server mode): takes the lease before its ``started()``, renews it every third of its
  TTL (taking it again, on the same stream, should it have ended), and releases it when cancelled
  (shielded, bounded by `RELEASE_TIMEOUT`), whatever ended the receive.
* ``_run_pump``: runs `Pump.run` in one worker thread; when it returns (verified, failed or stopped) it
  cancels the nursery. The socket is bound and the group joined before it starts, and before `receive`
  calls ``task_status.started()``: from then on datagrams queue in the socket buffer.
* ``_stop_pump_when_cancelled``: turns a cancellation into `Pump.stop` (the pump's thread is not
  cancellable: it must flush and close what it owns).
* ``_watchdog``: stops the pump with `NoData` when nothing of the stream arrived for ``timeout`` seconds.
* `progress.show_progress`, when asked for.

In server mode the target is checked and opened as soon as the lease gives the image length, before the
group is joined; without a server, the target is checked before joining and opened when the first
metadata gives the length. Either way no byte is written before the target was accepted.

In server mode the lease also says what the stream's metadata will (SHA-1, length, frame and block size),
so the pump starts from that and keeps data from the first datagram, instead of dropping up to a metadata
interval's worth; the stream's own metadata must then agree (`Pump`).

Error handling: `receive` raises one `ReceiveError` (see `errors` for which means what); a bug surfaces as
an exception group from the nursery.
Resource handling: the HTTP client, the socket and the target are closed before `receive` returns.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TextIO

import httpx
import trio
from vmcast.protocol import PROTOCOL_VERSION, Assembly, StreamMetadata, encode_metadata

from .errors import Interrupted, JoinFailed, NoData, ReceiveError, StreamBroken
from .lease import Lease, LeaseClient
from .multicast import (
    GroupSocket,
    kernel_drops,
    open_group_socket,
    route_source_address,
)
from .progress import show_progress
from .pump import Phase, Pump, PumpResult
from .target import Target, check_target, open_target
from .verified import VerifiedImage

log = logging.getLogger(__name__)

# Releasing a lease must not hang an exiting receiver: the server expires leases on its own anyway.
RELEASE_TIMEOUT = 5.0

# A lease with a TTL is renewed this many times per TTL: every third leaves room for two lost renewals.
RENEWALS_PER_TTL = 3

# The watchdog looks this often (at most) whether the stream moved.
WATCHDOG_INTERVAL = 0.25

# Joining on INADDR_ANY lets the kernel pick the interface from its routing table.
ANY_INTERFACE = "0.0.0.0"


@dataclass(frozen=True, slots=True, kw_only=True)
class FromServer:
    """Ask a vmcast server for a stream of an image (a lease), then join it."""

    server: str
    """Base URL, e.g. ``http://127.0.0.1:8470``."""
    image: str
    """Image name on the server."""
    format: str = "raw"
    """Format to stream the image in."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FromGroup:
    """Join a stream directly, no server involved (any sender following docs/PROTOCOL.md)."""

    group: str
    """IPv4 multicast group."""
    port: int
    """UDP port."""
    cookie: bytes
    """The stream's 8-byte cookie."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiveRequest:
    source: FromServer | FromGroup
    """Where the stream comes from."""
    output: str
    """Path of the regular file or block device to write."""
    interface: str | None = None
    """Local address to join on; None: the one the kernel routes to the server (or the group) through."""
    timeout: float = 30.0
    """Seconds without a datagram of the stream before giving up (`NoData`)."""
    force: bool = False
    """Write a block device that is in use, or overwrite a non-empty file."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Joined:
    """What `receive` passes to ``task_status.started()``: the group is joined, datagrams are queueing."""

    group: str
    port: int
    interface: str
    rcvbuf: int
    """Receive buffer as the kernel reports it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiveResult:
    """A verified receive: what was proved, how fast, and what was thrown away on the way."""

    sha1: str
    """SHA-1 of the image as written, equal to the announced one."""
    bytes: int
    """Image length."""
    seconds: float
    """From joining the group to the target synced."""
    output: str
    """The file or device written."""
    group: str
    port: int
    interface: str
    rcvbuf: int
    """Receive buffer as the kernel reported it."""
    datagrams: int
    """Datagrams read, ours or not."""
    duplicates: int
    """Data frames of bytes already held (a later loop, a late join)."""
    drops: dict[str, int] = field(default_factory=dict)
    """Datagrams dropped by reason (`vmcast.protocol.DropReason` values)."""
    corrupt_blocks: int = 0
    """Blocks that read back wrong and were taken again."""
    image_mismatches: int = 0
    """Times the whole image hashed wrong and was taken again."""
    kernel_drops: int | None = None
    """Datagrams the kernel dropped because the socket buffer was full (None: unknown)."""
    image: str | None = None
    """Image name, in server mode."""
    format: str | None = None
    """Format of the bytes received (raw, qcow2), as the lease or the stream said."""
    pump_cpu_seconds: float = 0.0
    """CPU time of the datagram loop's thread (hashing runs in another)."""
    proof: VerifiedImage | None = field(default=None, repr=False, compare=False)
    """The output as a `VerifiedImage`, what cloud registration accepts (made only on success)."""

    @property
    def rate(self) -> float:
        """Throughput in MB/s (10**6 bytes per second)."""
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "verified": True,
            "sha1": self.sha1,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "rate": round(self.rate, 2),
            "image": self.image,
            "format": self.format,
            "output": self.output,
            "group": self.group,
            "port": self.port,
            "interface": self.interface,
            "rcvbuf": self.rcvbuf,
            "datagrams": self.datagrams,
            "duplicates": self.duplicates,
            "drops": dict(self.drops),
            "corrupt_blocks": self.corrupt_blocks,
            "image_mismatches": self.image_mismatches,
            "kernel_drops": self.kernel_drops,
            "pump_cpu_seconds": round(self.pump_cpu_seconds, 3),
        }


@dataclass(slots=True)
class _Outcome:
    """How the nursery's tasks tell `receive` how it ended (only the first ending counts)."""

    result: ReceiveResult | None = None
    error: ReceiveError | None = None

    def fail(self, error: ReceiveError) -> None:
        if self.result is None and self.error is None:
            self.error = error


async def receive(
    request: ReceiveRequest,
    *,
    progress: TextIO | None = None,
    interactive: bool = False,
    task_status: trio.TaskStatus[Joined] = trio.TASK_STATUS_IGNORED,
) -> ReceiveResult:
    """Receive, verify and sync one image; progress on `progress` (a rich bar if `interactive`)."""
    outcome = _Outcome()
    async with AsyncExitStack() as resources, trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, outcome, nursery.cancel_scope)
        try:
            joined = await _start(request, nursery, resources, outcome, progress=progress, interactive=interactive)
        except ReceiveError as error:
            outcome.fail(error)
            nursery.cancel_scope.cancel()
        else:
            task_status.started(joined)
    if outcome.error is not None:
        raise outcome.error
    if outcome.result is None:
        raise ReceiveError("the receive ended without a result")  # a bug: every ending sets one
    return outcome.result


async def _start(request: ReceiveRequest, nursery: trio.Nursery, resources: AsyncExitStack, outcome: _Outcome, *, progress: TextIO | None, interactive: bool) -> Joined:
    source = request.source
    image_name = image_format = None
    if isinstance(source, FromServer):
        client = await resources.enter_async_context(httpx.AsyncClient())
        leases = LeaseClient(server=source.server, client=client)
        lease: Lease = await nursery.start(_hold_lease, leases, source.image, source.format, outcome, nursery.cancel_scope)
        log.info("lease %s: image %s (%d bytes) on %s:%d", lease.lease_id, lease.image, lease.length, lease.group, lease.port)
        image_name, image_format, group, port, cookie = lease.image, lease.format, lease.group, lease.port, lease.cookie_bytes
        target = await trio.to_thread.run_sync(functools.partial(open_target, request.output, length=lease.length, force=request.force))
        resources.callback(target.close)
        opener = functools.partial(_leased_target, lease=lease, target=target)
        expected = _expected_metadata(lease)
        interface = request.interface or await trio.to_thread.run_sync(route_source_address, httpx.URL(source.server).host) or ANY_INTERFACE
    else:
        group, port, cookie = source.group, source.port, source.cookie
        expected = None
        await trio.to_thread.run_sync(functools.partial(check_target, request.output, force=request.force))
        opener = functools.partial(_open_when_known, path=request.output, force=request.force)
        interface = request.interface or await trio.to_thread.run_sync(route_source_address, group) or ANY_INTERFACE
    try:
        group_socket = open_group_socket(group=group, port=port, interface=interface)
    except OSError as error:
        raise JoinFailed(group=group, port=port, interface=interface, error=error) from error
    resources.callback(group_socket.sock.close)
    log.info("joined %s:%d on %s, receive buffer %d bytes", group, port, interface, group_socket.rcvbuf)
    pump = Pump(sock=group_socket.sock, assembly=Assembly(cookie=cookie), open_target=opener, expected=expected)
    nursery.start_soon(_stop_pump_when_cancelled, pump)
    nursery.start_soon(_watchdog, pump, outcome, request.timeout, group_socket)
    if progress is not None:
        nursery.start_soon(functools.partial(show_progress, pump, file=progress, interactive=interactive))
    nursery.start_soon(_run_pump, pump, group_socket, outcome, nursery.cancel_scope, request.output, image_name, image_format)
    return Joined(group=group, port=port, interface=interface, rcvbuf=group_socket.rcvbuf)


def _expected_metadata(lease: Lease) -> bytes | None:
    """The metadata frame the lease implies, so the pump keeps data from the first datagram (see `Pump`).

    Only when the lease gives the block size: a stream with block checksums whose first metadata lacked the
    block size would contradict it (docs/PROTOCOL.md), and the assembly would fail the stream.
    """
    if lease.block_size is None:
        return None
    fields = {
        "v": PROTOCOL_VERSION, "sha1": lease.sha1.lower(), "len": lease.length, "frame": lease.frame_size,
        "block": lease.block_size, "name": lease.image, "format": lease.format,
    }  # fmt: skip
    return encode_metadata(lease.cookie_bytes, fields)


def _leased_target(metadata: StreamMetadata, *, lease: Lease, target: Target) -> Target:
    """The target opened for the lease, once the stream proves to carry the image the lease promised."""
    if metadata.sha1 != lease.sha1.lower() or metadata.length != lease.length:
        raise StreamBroken(
            reason=f"the stream carries sha1 {metadata.sha1} ({metadata.length} bytes), "
            f"the lease promised sha1 {lease.sha1.lower()} ({lease.length} bytes): the image changed"
        )
    return target


def _open_when_known(metadata: StreamMetadata, *, path: str, force: bool) -> Target:
    """(In the pump's thread.) The target opened for the length the first metadata announced."""
    return open_target(path, length=metadata.length, force=force)


async def _run_pump(pump: Pump, group_socket: GroupSocket, outcome: _Outcome, cancel_scope: trio.CancelScope, output: str, image: str | None, image_format: str | None) -> None:
    try:
        result: PumpResult | None = await trio.to_thread.run_sync(pump.run)
    except ReceiveError as error:
        outcome.fail(error)
    else:
        if result is not None and outcome.error is None:
            image_format = image_format or result.format
            # The pump compared the SHA-1 of the bytes as written and read back with the announced one, and
            # synced the target: the condition `_from_receiver` states.
            proof = VerifiedImage._from_receiver(path=output, sha1=result.sha1, size=result.length, format=image_format, source=image)
            outcome.result = ReceiveResult(
                sha1=result.sha1,
                bytes=result.length,
                seconds=result.finished_at - result.started_at,
                output=output,
                group=group_socket.group,
                port=group_socket.port,
                interface=group_socket.interface,
                rcvbuf=group_socket.rcvbuf,
                datagrams=result.datagrams,
                duplicates=result.duplicates,
                drops=result.drops,
                corrupt_blocks=result.corrupt_blocks,
                image_mismatches=result.image_mismatches,
                kernel_drops=kernel_drops(group_socket.sock),
                image=image,
                format=image_format,
                pump_cpu_seconds=result.cpu_seconds,
                proof=proof,
            )
    finally:
        if pump.target is not None:
            pump.target.close()
        cancel_scope.cancel()


async def _stop_pump_when_cancelled(pump: Pump) -> None:
    try:
        await trio.sleep_forever()
    finally:
        pump.stop()


async def _watchdog(pump: Pump, outcome: _Outcome, timeout: float, group_socket: GroupSocket) -> None:
    """Stop the pump when the stream shows no sign of life (no metadata, no data, not even duplicates)."""

    def signs() -> tuple[int, int, int]:
        return pump.metadata_frames, pump.assembly.received_bytes, pump.assembly.duplicates

    last, since = signs(), trio.current_time()
    while True:
        await trio.sleep(min(WATCHDOG_INTERVAL, timeout / 4))
        now, seen = trio.current_time(), signs()
        if seen != last or pump.phase not in (Phase.WAITING, Phase.RECEIVING):
            last, since = seen, now  # hashing and syncing read no datagrams: not a silence
        elif now - since >= timeout:
            outcome.fail(NoData(timeout=timeout, group=group_socket.group, port=group_socket.port, interface=group_socket.interface))
            pump.stop()
            return


async def _hold_lease(leases: LeaseClient, image: str, format: str, outcome: _Outcome, cancel_scope: trio.CancelScope, *, task_status: trio.TaskStatus[Lease]) -> None:
    lease = await leases.acquire(image=image, format=format)
    try:
        task_status.started(lease)
        if lease.lease_ttl is None:
            await trio.sleep_forever()  # a server without lease expiry: hold it until released
        while True:
            await trio.sleep(lease.lease_ttl / RENEWALS_PER_TTL)
            try:
                if await leases.renew(lease.lease_id):
                    continue
                log.warning("lease %s ended before its renewal; taking the stream again", lease.lease_id)
                again = await leases.acquire(image=image, format=format)
            except ReceiveError as error:  # the next renewal may well get through: the TTL allows for it
                log.warning("could not renew lease %s: %s", lease.lease_id, error)
                continue
            if not again.same_stream_as(lease):
                lease = again  # released below
                outcome.fail(StreamBroken(reason=f"the lease on {image} ended, and the stream that replaced it is another (group {again.group}:{again.port}, sha1 {again.sha1})"))
                cancel_scope.cancel()
                return
            lease = again
    finally:
        with trio.move_on_after(RELEASE_TIMEOUT, shield=True) as scope:
            try:
                await leases.release(lease.lease_id)
            except ReceiveError as error:
                log.warning("could not release lease %s: %s", lease.lease_id, error)
            else:
                log.info("released lease %s", lease.lease_id)
        if scope.cancelled_caught:
            log.warning("could not release lease %s within %g s", lease.lease_id, RELEASE_TIMEOUT)


async def _watch_signals(outcome: _Outcome, cancel_scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]) -> None:
    """SIGINT and SIGTERM end the receive through cancellation, so every cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        task_status.started()  # signals are only delivered to the main thread: nothing to watch
        return
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for number in signals:
            outcome.fail(Interrupted(signal_name=signal.Signals(number).name))
            cancel_scope.cancel()
            return
