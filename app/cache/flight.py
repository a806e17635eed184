"""Single-flight: a miss reaches the upstream once however many identical requests arrive
together, in this process or in any other (`SingleFlight`).

Redis layout (prefixes from `app.redis`):
- `pgw:flight:<digest>`: the single-flight lock, an owner token with a short lease that the
  leader renews while it runs (so a dead leader is noticed in `lease_ms`, not after the whole
  `lock_ttl_ms`), never held past `lock_ttl_ms`.
- pub/sub channel `pgw:flight:<digest>` (channels and keys are separate namespaces in Redis): the
  leader's wake-up, published by the same script that releases the lock. Each process listens
  with one PSUBSCRIBE `pgw:flight:*` connection shared by all its waiters.

Two ways to lead. An execute's miss claims the lock in its admit script, with the cache read
(`app.limits.redis_gate`), and hands the claim in (`Claim`): the flight runs it without another
look at the cache, and lands it through `Claim.land`, which stores the answer, releases the lock
and wakes the waiters in the request's own finish script; two round trips before the answer in
all. A caller without a claim (batch cases, a request that lost the race for the lock) takes it
here (`SET NX PX`), looks at the cache once more, and stores and releases on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import orjson
import structlog
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.errors import GatewayError, GatewayTimeout
from app.metrics import Metrics
from app.redis import FLIGHT, FLIGHT_PATTERN, Subscription, flight_lock
from app.upstream.pool import UpstreamAnswer

__all__ = ["Claim", "FlightResult", "SingleFlight"]

log = structlog.get_logger(__name__)

# --------------------------------------------------------------------------- single-flight

FlightResult = UpstreamAnswer | bytes
"""What `SingleFlight.run` returns: an answer that ran upstream, or a stored body (bytes)."""

# Compare-and-delete, then the wake-up, in one round trip. The owner token makes sure a leader
# whose lease ran out never deletes the lock of the one that took over.
_RELEASE_SCRIPT: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return redis.call('PUBLISH', KEYS[1], ARGV[2])
"""
_RENEW_SCRIPT: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# A wake-up says why the lock went away. `w`: look in the cache (the answer was stored, or the
# leader failed in a way worth retrying). `a` and `e` carry an answer that was not stored (a
# timeout, an internal error) or a gateway error, so waiters elsewhere share it rather than
# run the same slow program again one after the other.
_WAKE: Final = b"w"
_ANSWER: Final = b"a"
_ERROR: Final = b"e"

_REDIS_FAULTS: Final = (RedisError, OSError)
_CLOSE_TIMEOUT_S: Final = 2.0
_START_WAIT_S: Final = 1.0
_LEASE_MS: Final = 3_000
_RESUBSCRIBE_MAX_S: Final = 5.0
_WAKE_UP_GRACE_S: Final = 0.1


def _encode_answer(answer: UpstreamAnswer) -> bytes:
    head = orjson.dumps(
        {
            "status_code": answer.status_code,
            "statuses": answer.statuses,
            "cpu_time_ms": answer.cpu_time_ms,
            "wall_time_ms": answer.wall_time_ms,
        }
    )
    return _ANSWER + head + b"\n" + answer.body


def _encode_error(exc: GatewayError) -> bytes:
    head = {"status_code": exc.status_code, "message": exc.message, "headers": exc.headers}
    return _ERROR + orjson.dumps(head)


def _decode_shared(message: bytes) -> UpstreamAnswer | GatewayError | None:
    """What another process's leader shared: an answer, an error, or None (go and look).

    A wake-up this version cannot read (another version mid-deploy) is only a wake-up.
    """
    kind, payload = message[:1], message[1:]
    try:
        if kind == _ANSWER:
            head, _, body = payload.partition(b"\n")
            meta = orjson.loads(head)
            return UpstreamAnswer(
                status_code=int(meta["status_code"]),
                body=body,
                statuses=tuple(meta["statuses"]),
                cpu_time_ms=float(meta["cpu_time_ms"]),
                wall_time_ms=float(meta["wall_time_ms"]),
            )
        if kind == _ERROR:
            meta = orjson.loads(payload)
            return GatewayError(
                str(meta["message"]),
                status_code=int(meta["status_code"]),
                headers={str(k): str(v) for k, v in meta["headers"].items()},
            )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        log.warning("single_flight_unreadable_wake_up", kind=kind.decode(errors="replace"))
    return None


_OFFERED: Final = 0
_TAKEN: Final = 1
_WITHDRAWN: Final = 2


@dataclass(eq=False)
class Claim:
    """A flight lock already held with `token` (the admit script claimed it), handed to `run`.

    The flight that leads with it (`take`) runs without another look at the cache and lands
    through `land(answer, wake_up)`: store `answer` when it is cacheable (None: the run
    failed), release the lock if still `token`'s, publish `wake_up`, in one round trip.
    `land` returns False when it did none of that (its request had finished already, gone
    before the run ended): the flight then stores and releases on its own. A claim no flight
    took (`withdraw` is True) is still its owner's to release.
    """

    token: str
    land: Callable[[UpstreamAnswer | None, bytes], Awaitable[bool]]
    _state: int = _OFFERED

    def take(self) -> bool:
        """Lead with it, unless its owner withdrew it; True when the lock is now the flight's."""
        if self._state == _OFFERED:
            self._state = _TAKEN
        return self._state == _TAKEN

    def withdraw(self) -> bool:
        """No flight may take it from now on; True when none did (the owner releases it)."""
        if self._state == _OFFERED:
            self._state = _WITHDRAWN
        return self._state == _WITHDRAWN

    @property
    def open(self) -> bool:
        return self._state == _OFFERED


@dataclass(eq=False)
class _Flight:
    """One digest's run in this process, shared by every local caller."""

    digest: str
    deadline: float  # loop time by which the last local caller gives up
    task: asyncio.Task[FlightResult] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    message: bytes | None = None  # the latest wake-up from another process's leader
    claim: Claim | None = None  # a lock this process's admit claimed, for this flight to lead
    leading: bool = False  # this flight holds the lock (or runs without Redis)

    @property
    def lock(self) -> str:
        return flight_lock(self.digest)


class SingleFlight:
    """Identical executions in flight at once run upstream once: in this process and across all.

    In a process, the first caller starts a task and every caller with the same digest awaits
    it, each under its own deadline; the task is shielded, so one client leaving (or timing out)
    never cancels the run the others wait for. Across processes, the task takes a Redis lock:
    the holder executes, stores (`on_result`) and only then releases and wakes the others;
    a waiter that finds the lock gone without anything to share tries to take it (takeover).

    The lock is a lease of `lease_ms`, renewed by the live leader and never past `lock_ttl_ms`:
    a leader whose process died is taken over within `lease_ms`, not after the longest run.
    Redis faults never fail a request: the task executes directly, and the fault is logged.
    One SingleFlight per process and per Metrics (it registers `pgw_single_flight_total`).
    """

    def __init__(
        self,
        redis: Redis | None,
        *,
        metrics: Metrics | None = None,
        poll_interval: float = 0.05,
        lease_ms: int = _LEASE_MS,
    ) -> None:
        self._redis = redis
        self._poll_interval = poll_interval
        self.lease_ms = lease_ms
        self._flights: dict[str, _Flight] = {}
        # One PSUBSCRIBE connection for the whole process, re-made after an outage.
        self._wakeups = (
            Subscription(
                redis,
                pattern=FLIGHT_PATTERN,
                name="single-flight-listener",
                on_message=self._dispatch,
                retry_s=0.1,
                retry_max_s=_RESUBSCRIBE_MAX_S,
                lost_event="single_flight_pubsub_lost",
                restored_event="single_flight_pubsub_recovered",
            )
            if redis is not None
            else None
        )
        self._closed = False
        self._release = redis.register_script(_RELEASE_SCRIPT) if redis is not None else None
        self._renew = redis.register_script(_RENEW_SCRIPT) if redis is not None else None
        self._roles = (
            Counter(
                "pgw_single_flight_total",
                "Single-flight roles: leader, takeover, joined (same process), shared (another"
                " process ran it), redis_error (ran without the lock)",
                ["role"],
                registry=metrics.registry,
            )
            if metrics is not None
            else None
        )

    @property
    def shared(self) -> bool:
        """Whether flights span processes (a Redis lock), so an admit may claim one for `run`."""
        return self._redis is not None

    # -- lifecycle

    async def start(self) -> None:
        """Subscribe to wake-ups now rather than at the first wait (an outage is only logged)."""
        self._ensure_listener()
        # Return once subscribed (or after a bound, if Redis is down): a cancel that lands while
        # redis-py is still connecting can be lost on Python 3.11, hanging shutdown.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_WAIT_S
        while self._wakeups is not None and not self._listening and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        """Stop listening and end the flights still running (their locks are released)."""
        self._closed = True
        tasks: list[asyncio.Task[Any]] = [
            f.task for f in self._flights.values() if f.task is not None
        ]
        if self._wakeups is not None and not await self._wakeups.close(_CLOSE_TIMEOUT_S):
            log.warning("single_flight_task_did_not_stop", task="single-flight-listener")
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: redis-py can swallow a cancel that lands while a connection is being
            # made (asyncio's wait_for race on 3.11), and shutdown must not hang on it.
            _, pending = await asyncio.wait(tasks, timeout=_CLOSE_TIMEOUT_S)
            for task in pending:
                task.cancel()
                log.warning("single_flight_task_did_not_stop", task=task.get_name())

    # -- the API

    async def run(
        self,
        digest: str,
        *,
        deadline_s: float,
        lock_ttl_ms: int,
        execute: Callable[[], Awaitable[UpstreamAnswer]],
        read_cached: Callable[[], Awaitable[bytes | None]] | None = None,
        on_result: Callable[[UpstreamAnswer], Awaitable[None]] | None = None,
        claim: Claim | None = None,
    ) -> FlightResult:
        """Run `execute` once for every identical caller; raise GatewayTimeout at `deadline_s`.

        Returns the UpstreamAnswer to the caller that ran it and to those in this process that
        joined it (the same object, or the same exception), and also when another process ran
        it and shared an answer that was not stored. Returns `bytes`, the stored body, when
        another process ran it and stored it. `on_result` gets every answer this process runs,
        before the lock is released (store it there when `.cacheable`); it runs in the shared
        task, so it may run after the first caller has given up. Without `read_cached`, waiters
        in other processes cannot see a stored answer and run it again once the lock is gone.
        `lock_ttl_ms` bounds how long the lock can be held: cover the queue wait, the stage
        timeouts and the grace.

        With a `claim` (the lock, taken already), the flight leads with it: this call's own, or
        one of this process that waits for the lock (the claim won the race for it). Joining a
        flight that leads already, the claim is not taken: `claim.withdraw()` says so.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        flight = self._flights.get(digest)
        if flight is None or flight.task is None or flight.task.done():
            flight = _Flight(digest, deadline, claim=claim)
            flight.task = loop.create_task(
                self._fly(flight, lock_ttl_ms, execute, read_cached, on_result),
                name=f"single-flight:{digest[:12]}",
            )
            flight.task.add_done_callback(partial(self._landed, flight))
            self._flights[digest] = flight
        else:
            flight.deadline = max(flight.deadline, deadline)
            if claim is not None and not flight.leading:
                self._hand_over(flight, claim)
            self._count("joined")
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(flight.task)
        except TimeoutError:
            raise GatewayTimeout(
                "the execution did not finish in time; try again with the same request"
            ) from None

    # -- internals

    def _count(self, role: str) -> None:
        if self._roles is not None:
            self._roles.labels(role=role).inc()

    @staticmethod
    def _hand_over(flight: _Flight, claim: Claim) -> None:
        """A flight waiting for the lock that `claim` holds: wake it up to lead with it."""
        if flight.claim is None or not flight.claim.open:
            flight.claim = claim
            flight.wake.set()

    def _landed(self, flight: _Flight, task: asyncio.Task[FlightResult]) -> None:
        if self._flights.get(flight.digest) is flight:
            del self._flights[flight.digest]
        # Retrieve the outcome so that a run nobody waits for any more is not reported as an
        # "exception never retrieved"; the callers that did wait have it already.
        if not task.cancelled():
            task.exception()

    async def _fly(
        self,
        flight: _Flight,
        lock_ttl_ms: int,
        execute: Callable[[], Awaitable[UpstreamAnswer]],
        read_cached: Callable[[], Awaitable[bytes | None]] | None,
        on_result: Callable[[UpstreamAnswer], Awaitable[None]] | None,
    ) -> FlightResult:
        if self._redis is None:
            flight.leading = True
            self._count("leader")
            return await self._execute(execute, on_result)
        took_over = False
        while True:
            claim, flight.claim = flight.claim, None
            if claim is not None and claim.take():
                flight.leading = True
                self._count("leader")
                return await self._lead(
                    flight, claim.token, lock_ttl_ms, execute, read_cached, on_result, claim
                )
            token = secrets.token_hex(16)
            try:
                acquired = await self._redis.set(
                    flight.lock, token, nx=True, px=max(1, min(self.lease_ms, lock_ttl_ms))
                )
            except _REDIS_FAULTS as exc:
                return await self._without_redis(flight, exc, execute, on_result)
            if acquired:
                flight.leading = True
                self._count("takeover" if took_over else "leader")
                return await self._lead(flight, token, lock_ttl_ms, execute, read_cached, on_result)
            try:
                shared = await self._await_leader(flight, read_cached)
            except _REDIS_FAULTS as exc:
                return await self._without_redis(flight, exc, execute, on_result)
            if shared is not None:
                self._count("shared")
                return shared
            took_over = True

    async def _without_redis(
        self,
        flight: _Flight,
        exc: BaseException,
        execute: Callable[[], Awaitable[UpstreamAnswer]],
        on_result: Callable[[UpstreamAnswer], Awaitable[None]] | None,
    ) -> UpstreamAnswer:
        log.warning("single_flight_redis_error", digest=flight.digest[:16], error=repr(exc))
        flight.leading = True
        self._count("redis_error")
        return await self._execute(execute, on_result)

    async def _execute(
        self,
        execute: Callable[[], Awaitable[UpstreamAnswer]],
        on_result: Callable[[UpstreamAnswer], Awaitable[None]] | None,
    ) -> UpstreamAnswer:
        answer = await execute()
        await self._deliver(answer, on_result)
        return answer

    async def _deliver(
        self, answer: UpstreamAnswer, on_result: Callable[[UpstreamAnswer], Awaitable[None]] | None
    ) -> bool:
        """Hand the answer to `on_result`; False when there is none or storing failed."""
        if on_result is None:
            return False
        try:
            await on_result(answer)
        except _REDIS_FAULTS as exc:
            # The answer is good; only the cache missed it.
            log.warning("single_flight_store_failed", error=repr(exc))
            return False
        return True

    async def _lead(
        self,
        flight: _Flight,
        token: str,
        lock_ttl_ms: int,
        execute: Callable[[], Awaitable[UpstreamAnswer]],
        read_cached: Callable[[], Awaitable[bytes | None]] | None,
        on_result: Callable[[UpstreamAnswer], Awaitable[None]] | None,
        claim: Claim | None = None,
    ) -> FlightResult:
        renewer = asyncio.create_task(self._keep_lock(flight, token, lock_ttl_ms))
        wake_up = _WAKE
        answer: UpstreamAnswer | None = None
        try:
            # A claim was made with the cache read, atomically: nothing to look at again.
            if claim is None and read_cached is not None:
                # A leader elsewhere may have stored the answer and released the lock between
                # this request's cache lookup and our SET NX: don't run it a second time.
                try:
                    cached = await read_cached()
                except _REDIS_FAULTS as exc:
                    log.warning("single_flight_read_failed", error=repr(exc))
                    cached = None
                if cached is not None:
                    return cached
            try:
                answer = await execute()
            except GatewayError as exc:
                wake_up = _encode_error(exc)
                raise
            if claim is None:
                wake_up = await self._store(answer, on_result)
            elif not answer.cacheable:
                wake_up = _encode_answer(answer)  # the claim's landing stores what is cacheable
            return answer
        finally:
            renewer.cancel()
            if claim is None or not await self._land(claim, answer, wake_up):
                if claim is not None and answer is not None:
                    # Landing alone: the claim's request is gone, its finish done already.
                    wake_up = await self._store(answer, on_result)
                await self._unlock(flight, token, wake_up)

    async def _store(
        self, answer: UpstreamAnswer, on_result: Callable[[UpstreamAnswer], Awaitable[None]] | None
    ) -> bytes:
        """Hand `answer` to `on_result`; the wake-up to publish: the answer itself unless stored."""
        stored = await self._deliver(answer, on_result)
        return _WAKE if stored and answer.cacheable else _encode_answer(answer)

    @staticmethod
    async def _land(claim: Claim, answer: UpstreamAnswer | None, wake_up: bytes) -> bool:
        """The claim's landing (store, release, wake-up); False when the flight must do it."""
        try:
            return await claim.land(answer, wake_up)
        except _REDIS_FAULTS as exc:
            # The lease runs out by itself; waiters poll, so they are only slower to notice.
            log.warning("single_flight_release_failed", error=repr(exc))
            return True

    async def _keep_lock(self, flight: _Flight, token: str, lock_ttl_ms: int) -> None:
        """Renew the lease while the leader lives, and never past `lock_ttl_ms` in all."""
        assert self._renew is not None
        loop = asyncio.get_running_loop()
        hard_end = loop.time() + lock_ttl_ms / 1000
        lease_ms = min(self.lease_ms, lock_ttl_ms)
        while True:
            await asyncio.sleep(lease_ms / 3000)
            left_ms = int((hard_end - loop.time()) * 1000)
            if left_ms <= 0:
                return  # a run this long is wedged: let the lock expire and others take over
            try:
                held = await self._renew(keys=[flight.lock], args=[token, min(lease_ms, left_ms)])
            except _REDIS_FAULTS as exc:
                log.warning("single_flight_renew_failed", error=repr(exc))
                continue
            if not held:
                log.warning("single_flight_lock_lost", digest=flight.digest[:16])
                return

    async def _unlock(self, flight: _Flight, token: str, wake_up: bytes) -> None:
        assert self._release is not None
        try:
            await self._release(keys=[flight.lock], args=[token, wake_up])
        except _REDIS_FAULTS as exc:
            # The lease runs out by itself; waiters poll, so they are only slower to notice.
            log.warning("single_flight_release_failed", error=repr(exc))

    async def _await_leader(
        self, flight: _Flight, read_cached: Callable[[], Awaitable[bytes | None]] | None
    ) -> FlightResult | None:
        """Wait for another process's leader: its answer, or None once the lock is free."""
        assert self._redis is not None
        self._ensure_listener()
        loop = asyncio.get_running_loop()
        while True:
            # Clear before looking, so a wake-up that lands while we look is not lost.
            flight.wake.clear()
            if flight.claim is not None and flight.claim.open:
                return None  # this process claimed the lock meanwhile: lead with the claim
            shared = self._take_shared(flight)
            if shared is not None:
                return shared
            if read_cached is not None:
                cached = await read_cached()
                if cached is not None:
                    return cached
            if not await self._redis.exists(flight.lock):
                if flight.message is None and self._listening:
                    # The release and its wake-up are one script, but they reach us on two
                    # connections: give the wake-up a moment to land, so that an answer the
                    # leader shared is not run a second time here.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_WAKE_UP_GRACE_S):
                            await flight.wake.wait()
                # None: take the lock. A leader that stored its answer in the meantime is
                # caught by the read right after taking it.
                return self._take_shared(flight)
            remaining = flight.deadline - loop.time()
            if remaining <= 0:
                raise GatewayTimeout("an identical execution in flight did not finish in time")
            with contextlib.suppress(TimeoutError):
                # The poll is the fallback for a wake-up that never comes (a subscription not
                # yet confirmed, a pub/sub connection lost) and for a leader that died.
                async with asyncio.timeout(min(self._poll_interval, remaining)):
                    await flight.wake.wait()

    @staticmethod
    def _take_shared(flight: _Flight) -> UpstreamAnswer | None:
        """Consume the latest wake-up: the answer it shares, or raise the error it shares."""
        message, flight.message = flight.message, None
        if message is None:
            return None
        shared = _decode_shared(message)
        if isinstance(shared, GatewayError):
            raise shared
        return shared

    @property
    def _listening(self) -> bool:
        """Whether the wake-up subscription is confirmed and alive."""
        return self._wakeups is not None and self._wakeups.subscribed

    def _ensure_listener(self) -> None:
        if self._wakeups is not None and not self._closed:
            self._wakeups.start()

    def _dispatch(self, channel: bytes | str, data: bytes | str) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        flight = self._flights.get(name.removeprefix(FLIGHT))
        if flight is not None:
            flight.message = data.encode() if isinstance(data, str) else data
            flight.wake.set()
