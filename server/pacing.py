"""Pacing: a token bucket that keeps a sender at its rate. Reads no clock: the caller passes `now`.

Cost is counted in bytes on the wire as IP sees them (datagram plus 28 bytes of IPv4 and UDP headers), so
``--rate 1gbit`` means what a switch port sees, not what the application handed over.

Why these numbers: the bucket holds `BURST_SECONDS` of rate, so in any window of T seconds at most
``rate * (T + BURST_SECONDS)`` is sent: 4 % over the rate in a 100 ms window, and a receiver's socket buffer
only ever absorbs 4 ms of burst. When the bucket runs dry the sender waits until it is half full again, so it
wakes about every 2 ms whatever the rate (never a busy loop) and an oversleep of up to 2 ms
(`OVERSLEEP_ALLOWANCE`) costs nothing. At low rates the bucket holds one datagram plus that allowance; below
about 1.5 Mbit/s a single 1444-byte datagram is more than 10 % of a 100 ms window, and there the rule is
simply one datagram per ``cost / rate`` seconds on average.
"""

from __future__ import annotations

BURST_SECONDS = 0.004
OVERSLEEP_ALLOWANCE = BURST_SECONDS / 2
# A millionth of a byte: waiting exactly the time `take` asked for must be enough, whatever floating-point
# rounding did to the refill.
_ROUNDING = 1e-6


class TokenBucket:
    """Admits datagrams at `rate_bps` bits per second with a burst of `BURST_SECONDS` (or one datagram)."""

    def __init__(self, *, rate_bps: int, largest_cost: int, now: float) -> None:
        """`largest_cost`: the largest datagram cost that will be asked for (bytes, IP headers included)."""
        if rate_bps <= 0:
            raise ValueError("a token bucket needs a positive rate (0, unpaced, needs no bucket)")
        self.rate = rate_bps / 8  # bytes per second
        # Room for one whole datagram plus OVERSLEEP_ALLOWANCE of refill, so that at low rates too an
        # oversleep does not throw away tokens.
        self.capacity = max(self.rate * BURST_SECONDS, largest_cost + self.rate * OVERSLEEP_ALLOWANCE)
        self.tokens = self.capacity
        self.wake_bytes = self.capacity / 2
        """What a dry bucket waits for before it admits again: a batch of datagrams should not need more."""
        self.updated = now

    def take(self, cost: int, now: float) -> float:
        """Take `cost` bytes and return 0.0 if the bucket holds them; else take nothing and return how long
        to wait before asking again."""
        tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if tokens + _ROUNDING >= cost:
            self.tokens = tokens - cost
            return 0.0
        self.tokens = tokens
        return (max(cost, self.capacity / 2) - tokens) / self.rate
