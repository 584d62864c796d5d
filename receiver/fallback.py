"""The unicast fallback: fetch blocks by HTTP ``Range`` from the server when multicast does not bring them.

``GET {server}/v1/streams/{stream_id}/data`` with ``Range: bytes=a-b`` (server/api/stream_data.py). Every
block fetched goes to the pump (`Pump.deliver_block`), which writes it at its offset, reads it back and has
the assembly judge it, exactly like a block that came by multicast: a bad answer is a corrupt block, taken
again, never a wrong image. Server mode only: without a server there is no one to ask.

When (looked at every `CHECK_INTERVAL`):

* **No multicast**: nothing of the stream (metadata, data, duplicates) arrived within ``after`` seconds
  (``--fallback-after``) of the join: the group is unreachable from here (no multicast routing, a firewall,
  the wrong interface). Every missing block is fetched, until none is missing.
* **End game**: the carousel went a whole loop since the join, so every block was passed at least once,
  and at most `ENDGAME_FRACTION` of the blocks (or `ENDGAME_MIN_BLOCKS`, whichever is more) are still
  missing, and have been for ``grace`` seconds (the time repair requests get to work: the planner's
  re-request interval, 1 s; none without repair requests). Those blocks are fetched: the next loop would
  bring them only after up to a whole loop's time, while a few MiB by unicast cost the server little
  (``vmcast serve --repair-rate`` caps every fallback download together).

Ranges of consecutive missing blocks, `RANGE_BLOCKS` blocks at most, one request each, one at a time; no
more than `pump.MAX_QUEUED_BLOCKS` fetched blocks wait for the pump (the fetch waits meanwhile).

Error handling: an HTTP failure (unreachable, an error status, an answer that is not the range asked for, a
short body) is logged (once per kind of failure), counted in `FallbackStats.errors`, and retried after
`RETRY_AFTER`; multicast keeps going meanwhile, and ``--timeout`` ends a receive where neither brings
anything. The task runs until cancelled (the receive ends).
Resource handling: the caller's `httpx.AsyncClient`; at most one block buffered here besides the queue.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import trio
from vmcast.protocol import Layout

from .lease import response_detail
from .pump import MAX_QUEUED_BLOCKS, Phase, Pump

log = logging.getLogger(__name__)

# How often the conditions are looked at.
CHECK_INTERVAL = 0.25

# The end game starts when at most this fraction of the blocks is missing after a whole loop...
ENDGAME_FRACTION = 0.01
# ...or this many blocks (16 MiB at the usual 1 MiB blocks), whichever is more: a small image is cheap to
# complete by unicast whatever the fraction.
ENDGAME_MIN_BLOCKS = 16

# Blocks per HTTP request: 8 MiB at the usual block size, long enough that a request costs little per byte,
# short enough that blocks verified by multicast meanwhile are skipped soon.
RANGE_BLOCKS = 8

# After a failed request, the next try waits this long.
RETRY_AFTER = 1.0

# One range takes a fraction of a second at the server's default cap (200 Mbit/s); a server that sends
# nothing for this long is treated as failed, and asked again later.
READ_TIMEOUT = 30.0

NO_MULTICAST = "no_multicast"
ENDGAME = "endgame"


@dataclass(frozen=True, slots=True, kw_only=True)
class FallbackSettings:
    data_url: str
    """``{server}/v1/streams/{stream_id}/data``."""
    after: float
    """Seconds without anything of the stream by multicast before fetching everything by HTTP."""
    endgame_grace: float
    """Seconds the end-game condition must hold before fetching (time for repair requests to work)."""


@dataclass(slots=True)
class FallbackStats:
    """What the fallback did (written by its task, read at the end)."""

    reason: str | None = None
    """Why it first fetched: `NO_MULTICAST` or `ENDGAME`; None if it never did."""
    requests: int = 0
    """HTTP range requests made."""
    errors: int = 0
    """Requests that failed."""
    _warned: set[str] = field(default_factory=set)


class _BadAnswer(Exception):
    """The server answered, but not with the bytes asked for."""

    def __init__(self, *, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


async def fetch_when_needed(pump: Pump, client: httpx.AsyncClient, settings: FallbackSettings, stats: FallbackStats) -> None:
    """Watch the receive and fetch what multicast does not bring, until cancelled."""
    joined_at = trio.current_time()
    endgame_since: float | None = None
    while True:
        await trio.sleep(CHECK_INTERVAL)
        layout = pump.assembly.layout
        if layout is None or pump.phase not in (Phase.WAITING, Phase.RECEIVING) or pump.queued_blocks:
            continue
        missing = list(pump.assembly.missing_blocks())
        if not missing:
            continue
        now = trio.current_time()
        if not pump.heard_the_stream():
            if now - joined_at < settings.after:
                continue
            reason = NO_MULTICAST
            if stats.reason is None:
                log.warning("nothing of the stream arrived by multicast within %g s: fetching the %d missing blocks by HTTP", settings.after, len(missing))
        else:
            few = len(missing) <= max(ENDGAME_MIN_BLOCKS, ENDGAME_FRACTION * layout.block_count)
            if not (few and pump.repairs is not None and pump.repairs.passed_everything):
                endgame_since = None
                continue
            if endgame_since is None:
                endgame_since = now
            if now - endgame_since < settings.endgame_grace:
                continue
            reason = ENDGAME
            log.info("end game: %d block(s) still missing after a whole loop; fetching them by HTTP", len(missing))
        if stats.reason is None:
            stats.reason = reason
        endgame_since = None
        if not await _fetch(pump, client, settings.data_url, layout, missing, stats):
            await trio.sleep(RETRY_AFTER)
        while pump.queued_blocks:  # judged before the next look, or they would look missing still
            await trio.sleep(CHECK_INTERVAL / 10)


async def _fetch(pump: Pump, client: httpx.AsyncClient, url: str, layout: Layout, blocks: list[int], stats: FallbackStats) -> bool:
    """Fetch `blocks` (ascending) into the pump; False at the first failure."""
    for first, last in _runs(blocks, RANGE_BLOCKS):
        while first <= last and pump.assembly.is_verified(first):
            first += 1  # multicast brought it meanwhile
        if first > last:
            continue
        start, end = layout.block_span(first)[0], layout.block_span(last)[1]
        try:
            await _fetch_range(pump, client, url, layout, first, last, start, end, stats)
        except (httpx.HTTPError, _BadAnswer) as error:
            stats.errors += 1
            kind = error.kind if isinstance(error, _BadAnswer) else type(error).__name__
            if kind not in stats._warned:  # once per kind: a server that keeps failing does not flood the log
                stats._warned.add(kind)
                log.warning("HTTP fallback: GET %s bytes %d-%d failed: %s (trying again every %g s)", url, start, end - 1, str(error) or kind, RETRY_AFTER)
            return False
    return True


async def _fetch_range(pump: Pump, client: httpx.AsyncClient, url: str, layout: Layout, first: int, last: int, start: int, end: int, stats: FallbackStats) -> None:
    headers = {"Range": f"bytes={start}-{end - 1}"}
    timeout = httpx.Timeout(10.0, read=READ_TIMEOUT)
    async with client.stream("GET", url, headers=headers, timeout=timeout) as response:
        stats.requests += 1
        if response.status_code not in (200, 206):
            await response.aread()
            raise _BadAnswer(kind=f"status {response.status_code}", detail=f"answered {response.status_code}: {response_detail(response)}")
        _check_answer(response, start=start, end=end, length=layout.length)
        block = first
        block_start, block_end = layout.block_span(block)
        pending = bytearray()
        async for chunk in response.aiter_bytes():
            pending += chunk
            while block <= last and len(pending) >= block_end - block_start:
                size = block_end - block_start
                while pump.queued_blocks >= MAX_QUEUED_BLOCKS:
                    await trio.sleep(0.005)
                pump.deliver_block(block, bytes(pending[:size]))
                del pending[:size]
                block += 1
                if block <= last:
                    block_start, block_end = layout.block_span(block)
        if block <= last or pending:
            raise _BadAnswer(kind="body", detail=f"the body ended early or ran long: blocks {block}-{last} not received, {len(pending)} bytes left over")


def _check_answer(response: httpx.Response, *, start: int, end: int, length: int) -> None:
    """A 206 for exactly the range asked, or a 200 when the range asked was the whole image."""
    if response.status_code == 206:
        expected = f"bytes {start}-{end - 1}/{length}"
        if response.headers.get("content-range", "").strip() != expected:
            raise _BadAnswer(kind="range", detail=f"answered Content-Range {response.headers.get('content-range')!r}, not {expected!r}")
        return
    if not (start == 0 and end == length):
        raise _BadAnswer(kind="range", detail=f"answered 200 (the whole image) to a request for bytes {start}-{end - 1}")


def _runs(blocks: list[int], longest: int) -> Iterator[tuple[int, int]]:
    """Ascending `blocks` as (first, last) runs of consecutive blocks, at most `longest` long."""
    first = last = None
    for block in blocks:
        if first is not None and block == last + 1 and block - first < longest:
            last = block
            continue
        if first is not None:
            yield first, last
        first = last = block
    if first is not None:
        yield first, last
