"""Progress on stderr while a receive runs: a rich progress bar on a terminal, else a plain line every ~2 s.

The progress task only reads the pump's plain attributes (each a single int or enum, written by the pump
thread): nothing here can slow the datagram loop down.

Error handling: none needed; a progress task that fails would be a bug, and it propagates.
Resource handling: the rich display is started and stopped inside `show_progress`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TextIO

import trio

from .pump import Phase, Pump

# A plain line every this many seconds: often enough to see a receive move in a CI log, rarely enough not
# to flood it.
PLAIN_INTERVAL = 2.0

# The rich bar is redrawn this often.
RICH_INTERVAL = 0.1


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """One look at a running receive."""

    phase: Phase
    received: int
    """Image bytes held."""
    length: int | None
    """Image bytes in all, once metadata told us."""
    hashed: int
    """Bytes of the image SHA-1 computed so far."""
    dropped: int
    """Datagrams dropped by the assembly (foreign, malformed, ...)."""
    recovered_blocks: int = 0
    """Blocks completed by decoding parity (FEC)."""
    elapsed: float
    """Seconds since the group was joined."""

    @property
    def rate(self) -> float:
        """Average bytes per second since the join."""
        return self.received / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the average rate, None while unknown."""
        if self.length is None or self.rate <= 0:
            return None
        return max(0.0, self.length - self.received) / self.rate


def snapshot(pump: Pump) -> Snapshot:
    assembly = pump.assembly
    started = pump.started_at
    return Snapshot(
        phase=pump.phase,
        received=assembly.received_bytes,
        length=assembly.length,
        hashed=pump.hashed_bytes,
        dropped=sum(dict(assembly.drops).values()),
        recovered_blocks=pump.recovered_blocks,
        elapsed=time.monotonic() - started if started is not None else 0.0,
    )


def format_line(view: Snapshot) -> str:
    """The plain progress line, e.g. ``receiving 12.0/256.0 MiB (4.7%) 95.2 MB/s ETA 2.6 s, 0 dropped``, and
    ``, 3 blocks recovered by parity`` once parity completed any."""
    mib = 1 << 20
    if view.length is None:
        return f"{view.phase.value}: {view.elapsed:.0f} s, {view.dropped} dropped"
    percent = 100.0 * view.received / view.length if view.length else 100.0
    eta = f"ETA {view.eta:.1f} s" if view.eta is not None else "ETA ?"
    return (
        f"{view.phase.value} {view.received / mib:.1f}/{view.length / mib:.1f} MiB ({percent:.1f}%) "
        f"{view.rate / 1e6:.1f} MB/s {eta}, {view.dropped} dropped"
        + (f", {view.recovered_blocks} blocks recovered by parity" if view.recovered_blocks else "")
    )


async def show_progress(pump: Pump, *, file: TextIO, interactive: bool) -> None:
    """Report `pump`'s progress on `file` until cancelled."""
    if interactive:
        await _show_rich(pump, file)
    else:
        await _show_plain(pump, file)


async def _show_plain(pump: Pump, file: TextIO) -> None:
    while True:
        await trio.sleep(PLAIN_INTERVAL)
        print(format_line(snapshot(pump)), file=file, flush=True)


async def _show_rich(pump: Pump, file: TextIO) -> None:
    # rich is imported here, on a terminal only: a receiver started by a script or a service (no terminal, the
    # plain lines) need not load it before its lease (~45 ms; nothing where httpx's CLI extras load it anyway).
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(file=file),
        auto_refresh=False,
    )
    with progress:
        task = progress.add_task(Phase.WAITING.value, total=None)

        def draw() -> None:
            view = snapshot(pump)
            recovered = f" ({view.recovered_blocks} blocks by parity)" if view.recovered_blocks else ""
            progress.update(task, description=view.phase.value + recovered, total=view.length, completed=view.received)
            progress.refresh()

        try:
            while True:
                draw()
                await trio.sleep(RICH_INTERVAL)
        finally:
            draw()  # the last state (verified, or where it stopped) stays on the screen
