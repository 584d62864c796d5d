"""One bandwidth cap shared by every HTTP range download (the unicast repair fallback), for the event loop.

Every response body chunk takes its bytes from one `pacing.TokenBucket` before it is sent, and waits with
``anyio.sleep`` when the bucket is dry: the event loop is never blocked, and all downloads together stay
under ``--repair-rate``, however many there are, so fetching what was missed never starves the multicast
streams it was missed from.

Fairness: the bucket is taken under an `anyio.Lock`, whose waiters are woken in arrival order: chunks are
admitted first come, first served, so one large download cannot keep taking the tokens a smaller one waits
for, and only the head of the queue ever sleeps on a timer (the others sleep on the lock, no polling).

Thread-safety: none needed. Every caller runs on the one event loop (Starlette iterates streaming bodies
there).
"""

from __future__ import annotations

import time

import anyio

from .pacing import TokenBucket


class SharedRateLimit:
    """At most `rate_bps` bits per second over all callers of `take`; 0 = unlimited."""

    def __init__(self, *, rate_bps: int, largest_chunk: int) -> None:
        """`largest_chunk`: the largest byte count one `take` asks for."""
        self.rate_bps = rate_bps
        self._bucket = (
            TokenBucket(rate_bps=rate_bps, largest_cost=largest_chunk, now=time.monotonic()) if rate_bps else None
        )
        self._lock: anyio.Lock | None = None  # made on first use, inside the event loop
        self.bytes_taken = 0
        """Bytes admitted so far (a metric)."""

    async def take(self, size: int) -> None:
        """Return when `size` more bytes may be sent."""
        if self._bucket is None:
            self.bytes_taken += size
            return
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            while (delay := self._bucket.take(size, time.monotonic())) > 0.0:
                await anyio.sleep(delay)
        self.bytes_taken += size
