"""One receive, orchestrated with trio: lease, resume, target, socket, pump, repairs, fallback, state, signals.

One nursery owns every task:

* ``_watch_signals``: SIGINT/SIGTERM cancel the nursery, so every ``finally`` runs (the lease is released,
  the state saved).
* ``_hold_lease`` (server mode): takes the lease before its ``started()``, renews it every third of its
  TTL (taking it again, on the same stream, should it have ended), and releases it when cancelled
  (shielded, bounded by `RELEASE_TIMEOUT`), whatever ended the receive; and as soon as every block is
  verified (the pump's phase, `_StreamNeed`): the final SHA-1 and sync read the target only, and a stream
  whose last receiver this was stops sooner (taken again, on the same stream, should the SHA-1 send the
  pump back).
* ``_run_pump``: runs `Pump.run` in one worker thread; when it returns (verified, failed or stopped) it
  cancels the nursery. The socket is bound and the group joined before it starts, and before `receive`
  calls ``task_status.started()``: from then on datagrams queue in the socket buffer. In server mode the
  pump also follows the carousel and sends repair requests (`repair`).
* ``_stop_pump_when_cancelled``: turns a cancellation into `Pump.stop` (the pump's thread is not
  cancellable: it must flush and close what it owns).
* ``_watchdog``: stops the pump with `NoData` when nothing of the stream arrived, by multicast or by the
  HTTP fallback, for ``timeout`` seconds.
* `fallback.fetch_when_needed` (server mode): fetches blocks by HTTP when multicast brings nothing, and in
  the end game.
* ``_keep_state``: saves the state file (`state`) every `state.CHECKPOINT_INTERVAL`; `receive` saves it once
  more when every task has ended, whatever ended the receive.
* `progress.show_progress`, when asked for.

Before joining, the state file beside the output decides what is resumed (`resume`): the assembly starts
from its checkpoint, the output is written in place, and an output already verified is hashed again instead
of received (``task_status.started(None)`` then: nothing is joined).

In server mode the target is checked and opened as soon as the lease gives the image length, before the
group is joined; without a server, the target is checked before joining and opened when the first
metadata gives the length. Either way no byte is written before the target was accepted.

In server mode the lease also says what the stream's metadata will (SHA-1, length, frame and block size),
so the pump starts from that and keeps data from the first datagram, instead of dropping up to a metadata
interval's worth; the stream's own metadata must then agree (`Pump`).

Error handling: `receive` raises one `ReceiveError` (see `errors` for which means what); a bug surfaces as
an exception group from the nursery.
Resource handling: the HTTP client, the sockets and the target are closed before `receive` returns, the
target last (after the final state save, which fsyncs it).
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TextIO

import httpx
import trio
from vmcast.protocol import PROTOCOL_VERSION, Assembly, StreamMetadata, encode_metadata
from vmcast.protocol.repair import REREQUEST_AFTER

from .defaults import DEFAULT_FALLBACK_AFTER, DEFAULT_TIMEOUT
from .errors import Interrupted, JoinFailed, NoData, NoStream, ReceiveError, StreamBroken
from .fallback import FallbackSettings, FallbackStats, fetch_when_needed
from .lease import Lease, LeaseClient
from .multicast import (
    GroupSocket,
    buffer_capped,
    kernel_drops,
    open_group_socket,
    route_source_address,
)
from .progress import show_progress
from .pump import Phase, Pump, PumpResult
from .repair import Repairs, open_request_socket, resolve_repair_address
from .resume import ResumePlan, image_changed, plan_for_group, plan_for_lease
from .state import (
    CHECKPOINT_INTERVAL,
    ImageIdentity,
    ReceiverState,
    StateKeeper,
    StreamSource,
    read_state,
    state_path,
)
from .target import Target, check_target, open_target
from .verified import VerifiedImage, verify_file

log = logging.getLogger(__name__)

# Releasing a lease must not hang an exiting receiver: the server expires leases on its own anyway.
RELEASE_TIMEOUT = 5.0

# A lease with a TTL is renewed this many times per TTL: every third leaves room for two lost renewals.
RENEWALS_PER_TTL = 3

# The watchdog looks this often (at most) whether the stream moved.
WATCHDOG_INTERVAL = 0.25
# After a failed attempt to take the stream again (server unreachable), the next is this much later.
RETAKE_AFTER = 1.0

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
    min_receivers: int | None = None
    """If this receiver's lease starts the stream: it holds (metadata only) until this many receivers joined
    (None: it starts at once)."""
    max_wait: float | None = None
    """With `min_receivers`: the longest hold, in seconds (None: the server's default)."""
    wait_for_stream: float | None = None
    """Start no stream: wait up to this many seconds for someone else to start the image's stream, then join
    it (`NoStream` if none starts). None: start it if it does not run."""


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
    timeout: float = DEFAULT_TIMEOUT
    """Seconds in which nothing of the stream arrives (by multicast, or by the HTTP fallback) before giving
    up (`NoData`). With a server it should exceed `fallback_after`, or the receive gives up first."""
    force: bool = False
    """Write a block device that is in use, or overwrite a non-empty file."""
    rcvbuf: int | None = None
    """Receive buffer to ask the kernel for, in bytes; None: a share of the memory (`multicast.auto_receive_buffer`)."""
    repair: bool = True
    """Send repair requests for lost frames (server mode, when the server takes them)."""
    gro: bool = True
    """Ask the kernel for UDP GRO (several datagrams per receive); without it, or where the kernel refuses,
    one datagram per receive."""
    batch: bool = True
    """With GRO on, where the link coalesces few datagrams, take up to 64 per receive with recvmmsg."""
    keep_cache: bool = False
    """Leave the image's pages in the page cache; by default they are dropped once verified, hashed and
    written back (`vmcast.receiver.hashing`, "Writeback")."""
    fallback_after: float | None = DEFAULT_FALLBACK_AFTER
    """Server mode: seconds without anything of the stream by multicast before fetching the image by HTTP;
    None: never fetch by HTTP (not even the end game)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Joined:
    """What `receive` passes to ``task_status.started()``: the group is joined, datagrams are queueing."""

    group: str
    port: int
    interface: str
    rcvbuf: int
    """Receive buffer as the kernel reports it."""
    gro: bool = False
    """UDP GRO is on for the socket."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiveResult:
    """A verified receive: what was proved, how fast, and what was thrown away on the way."""

    sha1: str
    """SHA-1 of the image as written, equal to the announced one."""
    bytes: int
    """Image length."""
    seconds: float
    """From joining the group to the target synced (for a re-verification: the hashing)."""
    output: str
    """The file or device written."""
    group: str
    port: int
    interface: str | None
    """The local address joined on (None: nothing was joined, the output was verified already)."""
    rcvbuf: int
    """Receive buffer as the kernel reported it (0: nothing joined)."""
    datagrams: int
    """Datagrams read, ours or not."""
    duplicates: int
    """Data frames of bytes already held (a later loop, a late join, blocks verified before a resume)."""
    gro: bool = False
    """UDP GRO was on: a receive could return several datagrams."""
    coalesced: int = 0
    """Receives that returned several datagrams in one buffer (UDP GRO)."""
    batched: int = 0
    """recvmmsg receives that returned several datagrams (where the link did not coalesce)."""
    drops: dict[str, int] = field(default_factory=dict)
    """Datagrams dropped by reason (`vmcast.protocol.DropReason` values)."""
    corrupt_blocks: int = 0
    """Blocks that read back wrong and were taken again."""
    image_mismatches: int = 0
    """Times the whole image hashed wrong and was taken again."""
    kernel_drops: int | None = None
    """Packets the kernel dropped because the socket buffer was full (None: unknown). With GRO a packet may be
    a whole GSO batch (up to 45 datagrams at 1400 bytes): count lost frames by `duplicates` and repairs instead."""
    image: str | None = None
    """Image name, in server mode."""
    format: str | None = None
    """Format of the bytes received (raw, qcow2), as the lease or the stream said."""
    zero_blocks: int = 0
    """Blocks the stream announced as all zeros (never sent), zeroed on the target."""
    zero_frames: int = 0
    """All-zero frames of the other blocks the stream announced (never sent), zeroed on the target."""
    pump_cpu_seconds: float = 0.0
    """CPU time of the datagram loop's thread (hashing runs in another)."""
    sha1_cpu_seconds: float = 0.0
    """CPU time of the hashing thread (the whole image's SHA-1, computed while the blocks came in)."""
    hash_tail_seconds: float = 0.0
    """From the last block verified to the image's SHA-1 known: the hashing that was left for the end."""
    unhashed_at_end: int = 0
    """Bytes the SHA-1 had not covered yet when the last block was verified (hashed after it)."""
    sync_seconds: float = 0.0
    """The final sync of the target."""
    resumed_blocks: int = 0
    """Blocks verified by an interrupted receive and not received again."""
    bytes_received: int = 0
    """Image bytes received in this run, by multicast and by HTTP (less than `bytes` after a resume)."""
    repair_requests: int = 0
    """Repair requests sent to the server."""
    repair_frames_requested: int = 0
    """Frames those requests asked for."""
    repair_send_errors: int = 0
    """Repair requests that could not be sent."""
    carousel_steps_back: int = 0
    """Times the carousel's position went back from the middle of the image (a sender restart, or datagrams
    reordered on the way)."""
    carousel_rest_frames: int = 0
    """Rest frames heard: the carousel had finished a loop every receiver heard whole, and waited (no more
    data but the repairs asked for; docs/PROTOCOL.md section 7)."""
    repair_parity_requested: int = 0
    """Parity symbols those requests asked for (FEC)."""
    repair_round_trip_seconds: float | None = None
    """Smoothed time from a parity request to its first symbol (FEC; None: none was timed)."""
    repair_wait_seconds: float | None = None
    """The wait before asking again for what was asked, at the end (adapted to the round trips; None: no planner)."""
    parity_frames: int = 0
    """Parity frames received and kept (FEC)."""
    recovered_blocks: int = 0
    """Blocks completed by decoding parity (each then verified by its xxh3 like any block)."""
    recovered_frames: int = 0
    """Missing frames of those blocks, decoded from parity."""
    recovery_failures: int = 0
    """Decodes that needed more parity (not fatal: more is asked for)."""
    recovery_cpu_seconds: float = 0.0
    """CPU time of the datagram loop's thread spent decoding parity (part of `pump_cpu_seconds`)."""
    fallback_reason: str | None = None
    """Why blocks were fetched by HTTP (``no_multicast``, ``endgame``), None if none were."""
    fallback_blocks: int = 0
    """Blocks fetched by HTTP and accepted."""
    fallback_bytes: int = 0
    """Their bytes."""
    fallback_errors: int = 0
    """HTTP fallback requests that failed (and were retried)."""
    already_verified: bool = False
    """The output was verified by an earlier receive and only hashed again now."""
    state_file: str | None = None
    """The state file beside the output (``vmcast register`` reads it)."""
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
            "gro": self.gro,
            "coalesced": self.coalesced,
            "batched": self.batched,
            "duplicates": self.duplicates,
            "drops": dict(self.drops),
            "corrupt_blocks": self.corrupt_blocks,
            "image_mismatches": self.image_mismatches,
            "kernel_drops": self.kernel_drops,
            "zero_blocks": self.zero_blocks,
            "zero_frames": self.zero_frames,
            "pump_cpu_seconds": round(self.pump_cpu_seconds, 3),
            "sha1_cpu_seconds": round(self.sha1_cpu_seconds, 3),
            "hash_tail_seconds": round(self.hash_tail_seconds, 4),
            "unhashed_at_end": self.unhashed_at_end,
            "sync_seconds": round(self.sync_seconds, 4),
            "resumed_blocks": self.resumed_blocks,
            "bytes_received": self.bytes_received,
            "repair_requests": self.repair_requests,
            "repair_frames_requested": self.repair_frames_requested,
            "repair_send_errors": self.repair_send_errors,
            "carousel_steps_back": self.carousel_steps_back,
            "carousel_rest_frames": self.carousel_rest_frames,
            "repair_parity_requested": self.repair_parity_requested,
            "repair_round_trip_seconds": None if self.repair_round_trip_seconds is None else round(self.repair_round_trip_seconds, 3),
            "repair_wait_seconds": None if self.repair_wait_seconds is None else round(self.repair_wait_seconds, 3),
            "parity_frames": self.parity_frames,
            "recovered_blocks": self.recovered_blocks,
            "recovered_frames": self.recovered_frames,
            "recovery_failures": self.recovery_failures,
            "recovery_cpu_seconds": round(self.recovery_cpu_seconds, 3),
            "fallback_reason": self.fallback_reason,
            "fallback_blocks": self.fallback_blocks,
            "fallback_bytes": self.fallback_bytes,
            "fallback_errors": self.fallback_errors,
            "already_verified": self.already_verified,
            "state_file": self.state_file,
        }


@dataclass(slots=True)
class _Outcome:
    """How the nursery's tasks tell `receive` how it ended (only the first ending counts)."""

    result: ReceiveResult | None = None
    error: ReceiveError | None = None

    def fail(self, error: ReceiveError) -> None:
        if self.result is None and self.error is None:
            self.error = error


class _StreamNeed:
    """Whether the receive still needs the stream: not once every block is verified (what remains, the SHA-1
    of the whole image and the sync, reads the target only), again if that SHA-1 sends the pump back."""

    def __init__(self) -> None:
        self.needed = True
        self._changed = trio.Event()

    def update(self, needed: bool) -> None:
        if needed != self.needed:
            self.needed = needed
            self._changed.set()
            self._changed = trio.Event()

    async def changed(self) -> None:
        await self._changed.wait()

    def follower(self) -> Callable[[Phase], None]:
        """What the pump's thread calls at each change of phase: hands the news to this trio run, in order."""
        token = trio.lowlevel.current_trio_token()

        def follow(phase: Phase) -> None:
            token.run_sync_soon(self.update, phase in (Phase.WAITING, Phase.RECEIVING))

        return follow


@dataclass(slots=True)
class _Run:
    """What the tasks of one receive share, and what `receive` needs once they have all ended."""

    request: ReceiveRequest
    pump: Pump | None = None
    keeper: StateKeeper | None = None
    target: Target | None = None
    """The target opened before the pump (server mode); without a server, the pump opens it."""
    repairs: Repairs | None = None
    fallback: FallbackStats = field(default_factory=FallbackStats)
    need: _StreamNeed = field(default_factory=_StreamNeed)

    def current_target(self) -> Target | None:
        if self.target is not None:
            return self.target
        return self.pump.target if self.pump is not None else None

    def close_target(self) -> None:
        target = self.current_target()
        if target is not None:
            target.close()


async def receive(
    request: ReceiveRequest,
    *,
    progress: TextIO | None = None,
    interactive: bool = False,
    task_status: trio.TaskStatus[Joined | None] = trio.TASK_STATUS_IGNORED,
) -> ReceiveResult:
    """Receive, verify and sync one image; progress on `progress` (a rich bar if `interactive`)."""
    outcome = _Outcome()
    run = _Run(request=request)
    async with AsyncExitStack() as resources:
        resources.callback(run.close_target)  # last: after the final state save below
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(_watch_signals, outcome, nursery.cancel_scope)
                try:
                    joined = await _start(run, nursery, resources, outcome, progress=progress, interactive=interactive)
                except ReceiveError as error:
                    outcome.fail(error)
                    nursery.cancel_scope.cancel()
                else:
                    task_status.started(joined)
        finally:
            with trio.CancelScope(shield=True):
                await _save_state_at_exit(run, outcome)
    if outcome.error is not None:
        raise outcome.error
    if outcome.result is None:
        raise ReceiveError("the receive ended without a result")  # a bug: every ending sets one
    return outcome.result


@dataclass(frozen=True, slots=True, kw_only=True)
class _Source:
    """What `_start` needs to join, from a lease or from the command line."""

    group: str
    port: int
    cookie: bytes
    interface: str
    plan: ResumePlan
    open_target: Callable[[StreamMetadata], Target]
    expected: bytes | None = None
    lease: Lease | None = None
    client: httpx.AsyncClient | None = None
    joined: GroupSocket | None = None
    """The lease's group, joined before the lease was taken (`FromServer.wait_for_stream`); None: join it now."""


async def _start(run: _Run, nursery: trio.Nursery, resources: AsyncExitStack, outcome: _Outcome, *, progress: TextIO | None, interactive: bool) -> Joined | None:
    """Everything up to the join, then the tasks; None when the output was verified already (nothing joined)."""
    request = run.request
    if isinstance(request.source, FromServer):
        source = await _from_lease(run, request.source, nursery, resources, outcome)
    else:
        source = await _from_group(run, request.source, outcome, nursery)
    if source is None:
        return None
    group, port, interface = source.group, source.port, source.interface
    group_socket = source.joined or _join(request, group=group, port=port, interface=interface, resources=resources)
    gro = "on" if group_socket.gro else "off (not asked for)" if not request.gro else "off (the kernel refused it)"
    log.info("joined %s:%d on %s, receive buffer %d bytes, UDP GRO %s", group, port, interface, group_socket.rcvbuf, gro)
    if buffer_capped(group_socket):
        # A receiver without CAP_NET_ADMIN on a stock kernel gets ~200 KiB whatever it asks: a sender ahead of
        # it by a few milliseconds then costs it datagrams, repaired later. Said once, here, with the fix.
        log.warning(
            "the kernel granted a receive buffer of %d bytes, not the %d asked: without CAP_NET_ADMIN it is capped at "
            "net.core.rmem_max; raise that (sysctl -w net.core.rmem_max=%d) or run as root, or datagrams are lost "
            "whenever the sender gets ahead", group_socket.rcvbuf // 2, group_socket.asked, group_socket.asked,
        )
    assembly = Assembly(cookie=source.cookie, checkpoint=source.plan.checkpoint)
    pump = Pump(sock=group_socket.sock, assembly=assembly, open_target=source.open_target, expected=source.expected, repairs=run.repairs, gro=group_socket.gro,
                carousel_port=source.lease.carousel_port if source.lease is not None else None, on_phase=run.need.follower(), batch=request.batch,
                keep_cache=request.keep_cache)
    run.pump = pump
    lease = source.lease
    fallback = lease is not None and request.fallback_after is not None
    if lease is not None and lease.joined and source.joined is not None:
        if lease.waiting_for:  # counted as it was granted (see `_from_lease`)
            log.info("joined a stream that holds for receivers: %d more to come", lease.waiting_for)
    elif lease is not None:
        nursery.start_soon(_say_joined, LeaseClient(server=request.source.server, client=source.client), lease)
    nursery.start_soon(_stop_pump_when_cancelled, pump)
    nursery.start_soon(_watchdog, pump, outcome, request.timeout, group_socket, fallback)
    nursery.start_soon(_keep_state, run)
    if fallback:
        settings = FallbackSettings(
            data_url=f"{request.source.server}/v1/streams/{lease.stream_id}/data", after=request.fallback_after,
            endgame_grace=REREQUEST_AFTER if run.repairs is not None and run.repairs.asks else 0.0,
        )  # fmt: skip
        nursery.start_soon(fetch_when_needed, pump, source.client, settings, run.fallback)
    if progress is not None:
        nursery.start_soon(functools.partial(show_progress, pump, file=progress, interactive=interactive))
    image, image_format = (lease.image, lease.format) if lease is not None else (None, None)
    nursery.start_soon(_run_pump, run, group_socket, outcome, nursery.cancel_scope, image, image_format)
    return Joined(group=group, port=port, interface=interface, rcvbuf=group_socket.rcvbuf, gro=group_socket.gro)


def _join(request: ReceiveRequest, *, group: str, port: int, interface: str, resources: AsyncExitStack) -> GroupSocket:
    """The group's socket, joined, closed with `resources`; `JoinFailed` if the kernel refuses."""
    try:
        group_socket = open_group_socket(group=group, port=port, interface=interface, receive_buffer=request.rcvbuf, gro=request.gro)
    except OSError as error:
        raise JoinFailed(group=group, port=port, interface=interface, error=error) from error
    resources.callback(group_socket.sock.close)
    return group_socket


async def _from_lease(run: _Run, source: FromServer, nursery: trio.Nursery, resources: AsyncExitStack, outcome: _Outcome) -> _Source | None:
    """Server mode: the lease, the resume plan, the target opened, the repairs; None if already verified."""
    request = run.request
    # Plain HTTP has no TLS: loading the certificate store anyway costs ~100 ms of every receiver's start.
    verify = httpx.URL(source.server).scheme == "https"
    client = await resources.enter_async_context(httpx.AsyncClient(verify=verify))
    leases = LeaseClient(server=source.server, client=client)
    interface: str | None = None
    early: GroupSocket | None = None
    if source.wait_for_stream is not None:
        # The long poll names the stream's group: joined before the lease, the lease counts as joined as it is
        # granted, one request less per receiver. A stream holding for its receivers starts that much sooner:
        # on the test bed the last of 4 had joined 13-17 ms after the stream's start, against 46-60 ms.
        group, port = await _wait_for_stream(leases, source)
        interface = await _interface(request, source.server)
        early = _join(request, group=group, port=port, interface=interface, resources=resources)
    listening = (early.group, early.port) if early is not None else None
    lease: Lease = await nursery.start(_hold_lease, leases, source, run.need, outcome, nursery.cancel_scope, listening)
    if early is not None and (early.group, early.port) != (lease.group, lease.port):
        early.sock.close()  # the stream that started is not the one leased (it stopped and another began)
        early = None
    log.info("lease %s: image %s (%d bytes) on %s:%d", lease.lease_id, lease.image, lease.length, lease.group, lease.port)
    state = await trio.to_thread.run_sync(read_state, request.output)
    plan = plan_for_lease(
        state, image=lease.image, format=lease.format, sha1=lease.sha1, length=lease.length,
        frame_size=lease.frame_size, block_size=lease.block_size, path=request.output,
    )  # fmt: skip
    if plan.note:
        log.info("%s", plan.note)
    if plan.reverify:
        result = await _reverify(request, plan.previous, group=lease.group, port=lease.port, image=lease.image, format=lease.format)
        if result is not None:
            outcome.result = result
            nursery.cancel_scope.cancel()  # releases the lease
            return None
        plan = plan.starting_over()
    target = await trio.to_thread.run_sync(functools.partial(open_target, request.output, length=lease.length, force=request.force, reuse=plan.reuse_file))
    run.target = target
    run.keeper = StateKeeper(
        output=request.output, carried=plan.checkpoint,
        source=StreamSource(server=source.server, stream_id=lease.stream_id, image=lease.image, format=lease.format, group=lease.group, port=lease.port, cookie=lease.cookie),
    )  # fmt: skip
    run.keeper.identify(ImageIdentity(sha1=lease.sha1, length=lease.length, frame_size=lease.frame_size, block_size=lease.block_size))
    await trio.to_thread.run_sync(functools.partial(run.keeper.save, assembly=None, target=None))  # a re-run knows the file is ours
    interface = interface or await _interface(request, source.server)
    run.repairs = await _repairs(request, lease, source.server, resources)
    return _Source(
        group=lease.group, port=lease.port, cookie=lease.cookie_bytes, interface=interface, plan=plan,
        open_target=functools.partial(_leased_target, lease=lease, target=target), expected=_expected_metadata(lease),
        lease=lease, client=client, joined=early,
    )  # fmt: skip


async def _interface(request: ReceiveRequest, server: str) -> str:
    """The local address to join on: as asked, else the one that routes to the server."""
    return request.interface or await trio.to_thread.run_sync(route_source_address, httpx.URL(server).host) or ANY_INTERFACE


async def _wait_for_stream(leases: LeaseClient, source: FromServer) -> tuple[str, int]:
    """The group and port of the stream of `source.image` once one runs; `NoStream` if none starts in time."""
    assert source.wait_for_stream is not None
    log.info("waiting up to %g s for a stream of %s as %s to start on %s", source.wait_for_stream, source.image, source.format, source.server)
    started = await leases.wait_for_stream(image=source.image, format=source.format, timeout=source.wait_for_stream)
    if started is None:
        raise NoStream(server=source.server, image=source.image, format=source.format, waited=source.wait_for_stream)
    return started


async def _from_group(run: _Run, source: FromGroup, outcome: _Outcome, nursery: trio.Nursery) -> _Source | None:
    """Without a server: the resume plan and the target checked (opened at the first metadata); None if already verified."""
    request = run.request
    state = await trio.to_thread.run_sync(read_state, request.output)
    plan = plan_for_group(state, group=source.group, port=source.port, cookie=source.cookie.hex(), path=request.output)
    if plan.note:
        log.info("%s", plan.note)
    if plan.reverify:
        result = await _reverify(request, plan.previous, group=source.group, port=source.port, image=None, format=None)
        if result is not None:
            outcome.result = result
            nursery.cancel_scope.cancel()
            return None
        plan = plan.starting_over()
    await trio.to_thread.run_sync(functools.partial(check_target, request.output, force=request.force, reuse=plan.reuse_file))
    run.keeper = StateKeeper(
        output=request.output, carried=plan.checkpoint,
        source=StreamSource(server=None, stream_id=None, image=None, format=None, group=source.group, port=source.port, cookie=source.cookie.hex()),
    )  # fmt: skip
    interface = request.interface or await trio.to_thread.run_sync(route_source_address, source.group) or ANY_INTERFACE
    return _Source(
        group=source.group, port=source.port, cookie=source.cookie, interface=interface, plan=plan,
        open_target=functools.partial(_open_when_known, path=request.output, force=request.force, plan=plan, keeper=run.keeper),
    )  # fmt: skip


async def _repairs(request: ReceiveRequest, lease: Lease, server: str, resources: AsyncExitStack) -> Repairs:
    """Server mode: the carousel is always followed (the end game needs it); requests only if asked for and possible."""
    address = None
    if request.repair and lease.repair_port is not None:
        address = await trio.to_thread.run_sync(resolve_repair_address, httpx.URL(server).host, lease.repair_port)
    sock = None
    if address is not None:
        sock = open_request_socket()
        resources.callback(sock.close)
        log.info("repair requests go to %s:%d", address.host, address.port)
    return Repairs(cookie=lease.cookie_bytes, address=address, sock=sock)


async def _reverify(request: ReceiveRequest, previous: ReceiverState, *, group: str, port: int, image: str | None, format: str | None) -> ReceiveResult | None:
    """Hash an output an earlier receive verified; its result, or None (logged) when it no longer matches."""
    started = time.monotonic()
    try:
        proof = await trio.to_thread.run_sync(functools.partial(
            verify_file, request.output, expected_sha1=previous.sha1, expected_size=previous.length,
            format=format or previous.format, source=image or previous.image,
        ))  # fmt: skip
    except ReceiveError as error:
        log.warning("%s no longer holds the image it was verified as (%s): receiving it again", request.output, error)
        return None
    log.info("%s is verified (sha1 %s); nothing to receive", request.output, proof.sha1)
    return ReceiveResult(
        sha1=proof.sha1, bytes=proof.size, seconds=time.monotonic() - started, output=request.output,
        group=group, port=port, interface=None, rcvbuf=0, datagrams=0, duplicates=0,
        image=image or previous.image, format=proof.format, resumed_blocks=previous.block_count or 0,
        already_verified=True, state_file=str(state_path(request.output)), proof=proof,
    )  # fmt: skip


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
    if lease.fec is not None:
        fields["fec"] = lease.fec  # so the repair planner asks for parity from the start
    return encode_metadata(lease.cookie_bytes, fields)


def _leased_target(metadata: StreamMetadata, *, lease: Lease, target: Target) -> Target:
    """The target opened for the lease, once the stream proves to carry the image the lease promised."""
    if metadata.sha1 != lease.sha1.lower() or metadata.length != lease.length:
        raise StreamBroken(
            reason=f"the stream carries sha1 {metadata.sha1} ({metadata.length} bytes), "
            f"the lease promised sha1 {lease.sha1.lower()} ({lease.length} bytes): the image changed"
        )
    return target


def _open_when_known(metadata: StreamMetadata, *, path: str, force: bool, plan: ResumePlan, keeper: StateKeeper) -> Target:
    """(In the pump's thread.) The target opened for the length the first metadata announced."""
    changed = image_changed(plan, sha1=metadata.sha1, length=metadata.length)
    if changed:
        log.info("%s", changed)
    target = open_target(path, length=metadata.length, force=force, reuse=plan.reuse_file)
    keeper.identify(ImageIdentity(
        sha1=metadata.sha1, length=metadata.length, frame_size=metadata.frame_size, block_size=metadata.block_size,
        image=metadata.name, format=metadata.format,
    ))  # fmt: skip
    keeper.save(assembly=None, target=None)  # a re-run knows the file is ours
    return target


async def _run_pump(run: _Run, group_socket: GroupSocket, outcome: _Outcome, cancel_scope: trio.CancelScope, image: str | None, image_format: str | None) -> None:
    pump = run.pump
    try:
        result: PumpResult | None = await trio.to_thread.run_sync(pump.run)
    except ReceiveError as error:
        outcome.fail(error)
    else:
        if result is not None and outcome.error is None:
            image_format = image_format or result.format
            output = run.request.output
            # The pump compared the SHA-1 of the bytes as written and read back with the announced one, and
            # synced the target: the condition `_from_receiver` states.
            proof = VerifiedImage._from_receiver(path=output, sha1=result.sha1, size=result.length, format=image_format, source=image)
            repairs = run.repairs
            planner = repairs.planner if repairs is not None else None
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
                gro=group_socket.gro,
                coalesced=result.coalesced,
                batched=result.batched,
                duplicates=result.duplicates,
                drops=result.drops,
                corrupt_blocks=result.corrupt_blocks,
                image_mismatches=result.image_mismatches,
                kernel_drops=kernel_drops(group_socket.sock),
                image=image,
                format=image_format,
                zero_blocks=result.zero_blocks,
                zero_frames=result.zero_frames,
                pump_cpu_seconds=result.cpu_seconds,
                sha1_cpu_seconds=result.sha1_cpu_seconds,
                hash_tail_seconds=result.hash_tail_seconds,
                unhashed_at_end=result.unhashed_at_end,
                sync_seconds=result.sync_seconds,
                resumed_blocks=result.resumed_blocks,
                bytes_received=result.multicast_bytes + result.fetched_bytes,
                repair_requests=repairs.requests_sent if repairs is not None else 0,
                repair_frames_requested=repairs.frames_requested if repairs is not None else 0,
                repair_send_errors=repairs.send_errors if repairs is not None else 0,
                carousel_steps_back=planner.steps_back if planner is not None else 0,
                carousel_rest_frames=result.rest_frames,
                repair_parity_requested=repairs.parity_requested if repairs is not None else 0,
                repair_round_trip_seconds=planner.round_trip if planner is not None else None,
                repair_wait_seconds=planner.rerequest_after if planner is not None else None,
                parity_frames=result.parity_frames,
                recovered_blocks=result.recovered_blocks,
                recovered_frames=result.recovered_frames,
                recovery_failures=result.recovery_failures,
                recovery_cpu_seconds=result.recovery_cpu_seconds,
                fallback_reason=run.fallback.reason if result.fetched_blocks else None,
                fallback_blocks=result.fetched_blocks,
                fallback_bytes=result.fetched_bytes,
                fallback_errors=run.fallback.errors,
                state_file=str(state_path(output)),
                proof=proof,
            )
    finally:
        cancel_scope.cancel()


async def _keep_state(run: _Run) -> None:
    """Save the state every `CHECKPOINT_INTERVAL` while receiving (the keeper skips saves that change nothing)."""
    while True:
        await trio.sleep(CHECKPOINT_INTERVAL)
        pump, keeper = run.pump, run.keeper
        if pump is None or keeper is None or pump.phase is Phase.VERIFIED:
            continue
        await trio.to_thread.run_sync(functools.partial(keeper.save, assembly=pump.assembly, target=run.current_target()))


async def _save_state_at_exit(run: _Run, outcome: _Outcome) -> None:
    """Every task has ended (the pump's thread too): save where the receive got, whatever ended it."""
    keeper = run.keeper
    if keeper is None or (outcome.result is not None and outcome.result.already_verified):
        return
    verified = outcome.result is not None and outcome.error is None
    assembly = run.pump.assembly if run.pump is not None else None
    await trio.to_thread.run_sync(functools.partial(keeper.save, assembly=assembly, target=run.current_target(), verified=verified))


async def _stop_pump_when_cancelled(pump: Pump) -> None:
    try:
        await trio.sleep_forever()
    finally:
        pump.stop()


async def _watchdog(pump: Pump, outcome: _Outcome, timeout: float, group_socket: GroupSocket, fallback: bool) -> None:
    """Stop the pump when the stream shows no sign of life: no metadata, no data, not even duplicates, and no
    block from the HTTP fallback either."""

    def signs() -> tuple[int, ...]:
        return pump.metadata_frames, pump.assembly.received_bytes, pump.assembly.duplicates, pump.fetched_bytes, pump.queued_blocks

    last, since = signs(), trio.current_time()
    while True:
        await trio.sleep(min(WATCHDOG_INTERVAL, timeout / 4))
        now, seen = trio.current_time(), signs()
        if seen != last or pump.phase not in (Phase.WAITING, Phase.RECEIVING):
            last, since = seen, now  # hashing and syncing read no datagrams: not a silence
        elif now - since >= timeout:
            outcome.fail(NoData(timeout=timeout, group=group_socket.group, port=group_socket.port, interface=group_socket.interface, fallback=fallback))
            pump.stop()
            return


async def _hold_lease(
    leases: LeaseClient, source: FromServer, need: _StreamNeed, outcome: _Outcome, cancel_scope: trio.CancelScope,
    listening: tuple[str, int] | None, *, task_status: trio.TaskStatus[Lease],
) -> None:
    first = await leases.acquire(image=source.image, format=source.format, min_receivers=source.min_receivers, max_wait=source.max_wait, listening=listening)
    lease: Lease | None = first
    try:
        task_status.started(first)
        while True:
            if not need.needed:
                await _release(leases, lease)
                lease = None
                while not need.needed:
                    await need.changed()
                log.info("the pump needs the stream again; taking a lease")
                while lease is None:
                    try:
                        lease = await _take_again(leases, source, first, outcome, cancel_scope)
                    except ReceiveError as error:
                        log.warning("could not take the stream again (retrying): %s", error)
                        await trio.sleep(RETAKE_AFTER)
                        continue
                    if lease is None:
                        return
                await _say_joined(leases, lease)  # still listening: the socket stayed joined
            with trio.move_on_after(lease.lease_ttl / RENEWALS_PER_TTL if lease.lease_ttl else math.inf):
                await need.changed()
                continue
            try:
                if await leases.renew(lease.lease_id):
                    continue
            except ReceiveError as error:  # the next renewal may well get through: the TTL allows for it
                log.warning("could not renew lease %s: %s", lease.lease_id, error)
                continue
            log.warning("lease %s ended before its renewal; taking the stream again", lease.lease_id)
            try:
                again = await _take_again(leases, source, first, outcome, cancel_scope)
            except ReceiveError as error:  # the ended lease is kept: its next renewal fails and retries this
                log.warning("could not take the stream again: %s", error)
                continue
            if again is None:
                return
            lease = again
            await _say_joined(leases, lease)
    finally:
        if lease is not None:
            await _release(leases, lease)


async def _take_again(leases: LeaseClient, source: FromServer, first: Lease, outcome: _Outcome, cancel_scope: trio.CancelScope) -> Lease | None:
    """A new lease on the stream of `first`; None (the receive failed, and the new lease was released) if the
    stream that answers is another one. `ReceiveError` when the server cannot be asked."""
    again = await leases.acquire(image=source.image, format=source.format)
    if again.same_stream_as(first):
        return again
    await _release(leases, again)
    outcome.fail(StreamBroken(reason=f"the lease on {source.image} ended, and the stream that replaced it is another (group {again.group}:{again.port}, sha1 {again.sha1})"))
    cancel_scope.cancel()
    return None


async def _release(leases: LeaseClient, lease: Lease) -> None:
    with trio.move_on_after(RELEASE_TIMEOUT, shield=True) as scope:
        try:
            await leases.release(lease.lease_id)
        except ReceiveError as error:
            log.warning("could not release lease %s: %s", lease.lease_id, error)
        else:
            log.info("released lease %s", lease.lease_id)
    if scope.cancelled_caught:
        log.warning("could not release lease %s within %g s", lease.lease_id, RELEASE_TIMEOUT)


async def _say_joined(leases: LeaseClient, lease: Lease) -> None:
    """Tell the stream that this receiver listens now (the group is joined): a stream that holds for receivers
    counts it, and a carousel rests only once every lease holder has said it. If the server cannot be told,
    a holding stream starts at its hold's end and the carousel loops on: a warning, not a failure."""
    try:
        waiting_for = await leases.joined(lease.lease_id)
    except ReceiveError as error:
        log.warning("could not tell the server this receiver joined (a holding stream starts at its hold's end anyway): %s", error)
        return
    if lease.waiting_for:
        log.info("joined a stream that holds for receivers: %s", f"{waiting_for} more to come" if waiting_for else "it starts now")


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
