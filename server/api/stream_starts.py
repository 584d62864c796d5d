"""Wake the HTTP requests that wait for a stream to start (``GET /v1/streams?wait=``).

Streams start in worker threads (`Registry.acquire` runs in FastAPI's thread pool) while the waiting requests
are coroutines on the event loop, so the registry's callback crosses over with ``call_soon_threadsafe``. Each
start sets the current event and puts a fresh one in its place: a waiter costs nothing until a stream starts,
however many receivers wait, and then looks at the running streams once.
"""

from __future__ import annotations

import asyncio
import contextlib


class StreamStarts:
    """Tells coroutines on one event loop that some stream has started."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()

    def notify(self) -> None:
        """A stream has started. Thread-safe; does nothing once the loop has closed (the server stops)."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._wake)

    def next_start(self) -> asyncio.Event:
        """The event the next start sets. Take it before looking at the streams, then `wait_for` it: a start
        between the look and the wait is not missed, because it sets the event already taken."""
        return self._event

    @staticmethod
    async def wait_for(event: asyncio.Event, timeout: float) -> None:
        """Until `event` is set or `timeout` seconds pass, whichever is first; never raises on timeout."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def _wake(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()
