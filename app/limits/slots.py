"""The per-process cap on executions in flight to the upstreams, with a bounded wait.

Pure asyncio: the cap protects this process and the upstreams behind it, so it needs no Redis.
Past the cap a request waits (first come, first served) in a queue of at most `max_queue`; a
full queue or a wait longer than `queue_timeout_ms` is a 503 with Retry-After, so an overload is
answered at once instead of piling up sockets and memory. A request takes its place at entry
(`reserve`), so the refusal comes before its own work, not after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final, NoReturn

from app.errors import ServiceUnavailable
from app.metrics import Metrics

__all__ = ["Reservation", "UpstreamSlots"]

_AT_CAPACITY: Final = "the gateway is at capacity; retry shortly"
_RETRY_AFTER: Final = "1"


class UpstreamSlots:
    """`async with slots.acquire(): ...` around each execution sent upstream."""

    def __init__(
        self,
        max_concurrency: int,
        *,
        max_queue: int,
        queue_timeout_ms: int,
        metrics: Metrics | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._timeout_s = queue_timeout_ms / 1000
        self._metrics = metrics
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._in_flight = 0
        self._waiting = 0
        self._reserved = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def reserved(self) -> int:
        return self._reserved

    def reserve(self) -> Reservation:
        """Take a place at the request's entry, or 503 at once when none is left.

        The places are the slots plus the queue, and a request holds one from its entry, before
        its own work (body, admission, single-flight, several Redis round trips), until it holds
        a slot (`acquire(reservation)`) or knows it needs none (`release()`: a cache hit, an
        error, an answer shared by another run). Checked only at the slot, a burst past the
        queue paid for that work first, each refusal behind everyone's round trips (a burst of
        50: 73-160 ms each in-process; 200 at a process: 1.8-5.8 s).
        """
        if (
            self._in_flight + self._waiting + self._reserved
            >= self.max_concurrency + self.max_queue
        ):
            self._reject()
        self._reserved += 1
        return Reservation(self)

    @asynccontextmanager
    async def acquire(self, reservation: Reservation | None = None) -> AsyncIterator[None]:
        """Hold one slot for the body of the `async with`, or raise 503.

        With the request's reservation, its place turns into this wait or this slot."""
        if reservation is not None:
            reservation.release()
        if self._semaphore.locked():
            # No free slot (or others already queued ahead of us): wait, if the queue has room.
            if self._waiting >= self.max_queue:
                self._reject()
            self._waiting += 1
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._semaphore.acquire()
            except TimeoutError:
                self._reject()
            finally:
                self._waiting -= 1
        else:
            await self._semaphore.acquire()  # a free slot: returns without suspending
        self._in_flight += 1
        if self._metrics is not None:
            self._metrics.in_flight.inc()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._metrics is not None:
                self._metrics.in_flight.dec()
            self._semaphore.release()

    def _reject(self) -> NoReturn:
        if self._metrics is not None:
            self._metrics.rejected.labels(reason="overload").inc()
        raise ServiceUnavailable(_AT_CAPACITY, headers={"Retry-After": _RETRY_AFTER})


class Reservation:
    """A request's place among the slots and the queue, from its entry; `release` is idempotent."""

    __slots__ = ("_slots",)

    def __init__(self, slots: UpstreamSlots) -> None:
        self._slots: UpstreamSlots | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots._reserved -= 1
            self._slots = None

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()  # unless a slot or a hit took it already
