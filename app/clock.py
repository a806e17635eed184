"""Where the gateway's Python code reads the time from for windows, TTLs and graces.

A component that times something a test must be able to see pass (the key cache's freshness and
outage grace, the in-process gate's windows and leases, the in-process cache's TTL, a blocked
address's wait) takes a `Clock`, the real one by default. It binds the method it needs once
(`self._now = clock.wall`), so the hot path pays one call, as it did calling `time.time`
itself; with `SYSTEM_CLOCK` the bound attribute *is* `time.time`. The tests pass a clock they
move (`tests.support.MovableClock`) instead of sleeping until a window has passed.

Time that lives in Redis (key TTLs, the admit script's `TIME`) is Redis's own, shared by every
replica; only tests ever pass the Redis gate a clock (`RedisGate(clock=...)`).
"""

from __future__ import annotations

import time
from typing import Final, Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds from an arbitrary start, never going back: for durations and TTLs."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch (UTC): for what is shown or shared (resets, days, expiry)."""
        ...


class SystemClock:
    """The real clock: `time.monotonic` and `time.time` themselves, with no layer between."""

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)


SYSTEM_CLOCK: Final[Clock] = SystemClock()
