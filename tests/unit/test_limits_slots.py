"""UpstreamSlots: the per-process cap, its bounded queue, its timeout, its metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from app.errors import ServiceUnavailable
from app.limits import UpstreamSlots
from app.limits.slots import Reservation
from app.metrics import Metrics


def _gauge(metrics: Metrics) -> float:
    return float(metrics.in_flight._value.get())


def _overloads(metrics: Metrics) -> float:
    return float(metrics.rejected.labels(reason="overload")._value.get())


async def _until(condition: Callable[[], bool]) -> None:
    """Until the tasks started have got where `condition` says (one loop turn at a time)."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110  # the slots' state: no event to await
            await asyncio.sleep(0)


def _waiting(slots: UpstreamSlots, count: int) -> Callable[[], bool]:
    return lambda: slots.waiting == count


async def _hold(slots: UpstreamSlots, release: asyncio.Event, entered: list[int], n: int) -> None:
    async with slots.acquire():
        entered.append(n)
        await release.wait()


async def test_waits_in_queue_then_runs() -> None:
    metrics = Metrics()
    slots = UpstreamSlots(2, max_queue=1, queue_timeout_ms=5_000, metrics=metrics)
    release = asyncio.Event()
    entered: list[int] = []
    holders = [asyncio.create_task(_hold(slots, release, entered, n)) for n in range(3)]
    await _until(lambda: slots.in_flight + slots.waiting == 3)
    assert entered == [0, 1]  # the third waits
    assert (slots.in_flight, slots.waiting) == (2, 1)
    assert _gauge(metrics) == 2

    # Queue full: the fourth is refused at once, not queued.
    with pytest.raises(ServiceUnavailable) as info:
        async with slots.acquire():
            pass
    assert info.value.message == "the gateway is at capacity; retry shortly"
    assert info.value.headers == {"Retry-After": "1"}
    assert _overloads(metrics) == 1

    release.set()
    await asyncio.gather(*holders)
    assert sorted(entered) == [0, 1, 2]
    assert (slots.in_flight, slots.waiting) == (0, 0)
    assert _gauge(metrics) == 0


async def test_queue_timeout() -> None:
    metrics = Metrics()
    slots = UpstreamSlots(1, max_queue=5, queue_timeout_ms=50, metrics=metrics)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(slots, release, [], 0))
    await _until(lambda: slots.in_flight == 1)
    with pytest.raises(ServiceUnavailable):
        async with slots.acquire():
            pass
    assert _overloads(metrics) == 1
    assert slots.waiting == 0
    release.set()
    await holder
    async with slots.acquire():  # the slot came back
        assert slots.in_flight == 1


async def test_no_queue_refuses_at_once() -> None:
    slots = UpstreamSlots(1, max_queue=0, queue_timeout_ms=10_000)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(slots, release, [], 0))
    await _until(lambda: slots.in_flight == 1)
    with pytest.raises(ServiceUnavailable):
        async with slots.acquire():
            pass
    release.set()
    await holder


async def test_cancelled_waiter_and_failing_body_leak_nothing() -> None:
    slots = UpstreamSlots(1, max_queue=2, queue_timeout_ms=5_000)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(slots, release, [], 0))
    await _until(lambda: slots.in_flight == 1)
    waiter = asyncio.create_task(_hold(slots, asyncio.Event(), [], 1))
    await _until(lambda: slots.waiting == 1)
    waiter.cancel()  # a client that went away while queued
    await asyncio.gather(waiter, return_exceptions=True)
    release.set()
    await holder
    with pytest.raises(RuntimeError):
        async with slots.acquire():
            raise RuntimeError("upstream blew up")
    assert (slots.in_flight, slots.waiting) == (0, 0)
    async with slots.acquire():
        assert slots.in_flight == 1


async def test_first_come_first_served() -> None:
    slots = UpstreamSlots(1, max_queue=10, queue_timeout_ms=5_000)
    release = asyncio.Event()
    order: list[int] = []
    holder = asyncio.create_task(_hold(slots, release, order, 0))
    await _until(lambda: slots.in_flight == 1)

    async def quick(n: int) -> None:
        async with slots.acquire():
            order.append(n)

    waiters = []
    for n in range(1, 6):
        waiters.append(asyncio.create_task(quick(n)))
        await _until(_waiting(slots, n))  # each one queued before the next
    release.set()
    await asyncio.gather(holder, *waiters)
    assert order == [0, 1, 2, 3, 4, 5]


def test_needs_at_least_one_slot() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        UpstreamSlots(0, max_queue=1, queue_timeout_ms=1)


async def test_reserve_counts_places_from_entry() -> None:
    metrics = Metrics()
    slots = UpstreamSlots(1, max_queue=1, queue_timeout_ms=5_000, metrics=metrics)
    first, second = slots.reserve(), slots.reserve()  # a slot and the queue, taken at entry
    assert slots.reserved == 2
    # Nobody holds a slot yet, but both places are spoken for: the third is refused at once.
    with pytest.raises(ServiceUnavailable) as info:
        slots.reserve()
    assert info.value.headers == {"Retry-After": "1"}
    assert _overloads(metrics) == 1

    release = asyncio.Event()
    entered: list[int] = []

    async def run(reservation: Reservation, n: int) -> None:
        async with slots.acquire(reservation):
            entered.append(n)
            await release.wait()

    holders = [asyncio.create_task(run(first, 0)), asyncio.create_task(run(second, 1))]
    await _until(lambda: slots.in_flight + slots.waiting == 2)
    assert (slots.in_flight, slots.waiting, slots.reserved) == (1, 1, 0)
    with pytest.raises(ServiceUnavailable):
        slots.reserve()
    release.set()
    await asyncio.gather(*holders)
    assert entered == [0, 1]
    assert (slots.in_flight, slots.waiting, slots.reserved) == (0, 0, 0)


async def test_a_released_reservation_gives_its_place_back() -> None:
    slots = UpstreamSlots(1, max_queue=0, queue_timeout_ms=5_000)
    hit = slots.reserve()
    with pytest.raises(ServiceUnavailable):
        slots.reserve()
    hit.release()
    hit.release()  # idempotent: a request releases in its finally whatever happened before
    assert slots.reserved == 0
    slots.reserve()
