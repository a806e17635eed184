"""Single-flight against a real Redis: one upstream run for identical requests in flight.

Two SingleFlight instances on two Redis clients stand in for two gateway processes. No engine is
needed: `execute` is a counting fake upstream, and the cache is a real Redis GET/SET.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from app.cache.flight import Claim, FlightResult, SingleFlight
from app.cache.keys import cache_key
from app.errors import BadGateway, GatewayError, GatewayTimeout
from app.metrics import Metrics
from app.redis import FLIGHT
from app.upstream.pool import UpstreamAnswer
from tests.support import RedisServer, free_port

MakeProcess = Callable[..., SingleFlight]


def new_digest() -> str:
    return secrets.token_hex(32)


def body_of(result: FlightResult) -> bytes:
    return result if isinstance(result, bytes) else result.body


@dataclass
class Upstream:
    """A fake Piston that counts its runs; every run prints a new random number."""

    delay: float = 0.2
    statuses: tuple[str | None, ...] = (None,)
    error: Exception | None = None
    calls: int = 0
    answers: list[UpstreamAnswer] = field(default_factory=list)

    async def execute(self) -> UpstreamAnswer:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        run = {"stdout": secrets.token_hex(8), "status": self.statuses[-1]}
        answer = UpstreamAnswer(200, orjson.dumps({"run": run}), self.statuses, 1.5, 2.5)
        self.answers.append(answer)
        return answer


@dataclass
class Store:
    """The result cache as the limiter keeps it: the answer's bytes under cache_key(digest)."""

    redis: Redis
    digest: str
    writes: int = 0

    async def read(self) -> bytes | None:
        value = await self.redis.get(cache_key(self.digest))
        assert value is None or isinstance(value, bytes)
        return value

    async def write(self, answer: UpstreamAnswer) -> None:
        if answer.cacheable:
            self.writes += 1
            await self.redis.set(cache_key(self.digest), answer.body, px=60_000)


@pytest.fixture
async def make_process(redis_server: RedisServer) -> AsyncIterator[MakeProcess]:
    """A gateway process's share of single-flight: its own Redis pool, its own SingleFlight."""
    made: list[tuple[Redis, SingleFlight]] = []

    def make(*, client_name: str = "pgw-test-flight", **options: Any) -> SingleFlight:
        client = Redis.from_url(redis_server.url, client_name=client_name)
        flights = SingleFlight(client, **options)
        made.append((client, flights))
        return flights

    yield make
    for client, flights in made:
        await flights.close()
        await client.aclose()


async def call(
    flights: SingleFlight,
    digest: str,
    upstream: Upstream,
    store: Store | None = None,
    *,
    deadline_s: float = 5.0,
    lock_ttl_ms: int = 5_000,
) -> FlightResult:
    return await flights.run(
        digest,
        deadline_s=deadline_s,
        lock_ttl_ms=lock_ttl_ms,
        execute=upstream.execute,
        read_cached=store.read if store else None,
        on_result=store.write if store else None,
    )


class TestInProcess:
    @pytest.mark.parametrize("with_redis", [False, True])
    async def test_fifty_callers_one_run(
        self, with_redis: bool, redis: Redis, make_process: MakeProcess
    ) -> None:
        flights = make_process() if with_redis else SingleFlight(None)
        upstream = Upstream()
        digest = new_digest()
        store = Store(redis, digest) if with_redis else None
        results = await asyncio.gather(*(call(flights, digest, upstream, store) for _ in range(50)))
        assert upstream.calls == 1
        assert all(result is upstream.answers[0] for result in results)

    async def test_without_redis_on_result_runs(self) -> None:
        seen: list[UpstreamAnswer] = []

        async def on_result(answer: UpstreamAnswer) -> None:
            seen.append(answer)

        upstream = Upstream(delay=0.01)
        result = await SingleFlight(None).run(
            new_digest(),
            deadline_s=2,
            lock_ttl_ms=2_000,
            execute=upstream.execute,
            on_result=on_result,
        )
        assert seen == [result]

    @pytest.mark.parametrize("with_redis", [False, True])
    async def test_leader_error_shared(self, with_redis: bool, make_process: MakeProcess) -> None:
        flights = make_process() if with_redis else SingleFlight(None)
        upstream = Upstream(error=BadGateway("the upstream failed with status 500"))
        digest = new_digest()
        outcomes = await asyncio.gather(
            *(call(flights, digest, upstream) for _ in range(20)),
            return_exceptions=True,
        )
        assert upstream.calls == 1
        assert all(isinstance(o, BadGateway) for o in outcomes)
        assert all(o is outcomes[0] for o in outcomes)

    async def test_a_new_flight_after_the_last_one_landed(self) -> None:
        flights = SingleFlight(None)
        upstream = Upstream(delay=0.01)
        digest = new_digest()
        first = await call(flights, digest, upstream)
        second = await call(flights, digest, upstream)
        assert upstream.calls == 2
        assert body_of(first) != body_of(second)

    async def test_deadline(self) -> None:
        flights = SingleFlight(None)
        upstream = Upstream(delay=2.0)
        digest = new_digest()
        started = time.monotonic()
        with pytest.raises(GatewayTimeout):
            await call(flights, digest, upstream, deadline_s=0.2)
        assert time.monotonic() - started < 1.0
        await flights.close()

    async def test_each_caller_has_its_own_deadline(self) -> None:
        flights = SingleFlight(None)
        upstream = Upstream(delay=0.5)
        digest = new_digest()
        impatient = asyncio.create_task(call(flights, digest, upstream, deadline_s=0.1))
        patient = asyncio.create_task(call(flights, digest, upstream, deadline_s=3.0))
        with pytest.raises(GatewayTimeout):
            await impatient
        assert await patient is upstream.answers[0]
        assert upstream.calls == 1

    async def test_leaving_caller_does_not_cancel_the_run(self) -> None:
        flights = SingleFlight(None)
        upstream = Upstream(delay=0.3)
        digest = new_digest()
        first = asyncio.create_task(call(flights, digest, upstream))
        await asyncio.sleep(0.05)
        others = [asyncio.create_task(call(flights, digest, upstream)) for _ in range(5)]
        first.cancel()
        results = await asyncio.gather(*others)
        assert upstream.calls == 1
        assert all(result is upstream.answers[0] for result in results)


class TestAcrossProcesses:
    async def test_fifty_calls_over_two_processes_one_run(
        self, redis: Redis, make_process: MakeProcess
    ) -> None:
        metrics = [Metrics(), Metrics()]
        one, two = make_process(metrics=metrics[0]), make_process(metrics=metrics[1])
        await one.start()
        await two.start()
        upstream = Upstream(delay=0.3)
        digest = new_digest()
        store = Store(redis, digest)
        calls = [call(p, digest, upstream, store) for _ in range(25) for p in (one, two)]
        results = await asyncio.gather(*calls)

        assert upstream.calls == 1
        assert store.writes == 1
        stored = await store.read()
        assert stored == upstream.answers[0].body
        assert {body_of(result) for result in results} == {stored}
        # The leader's process got the answer itself; the other one read the stored bytes.
        answered = sum(isinstance(result, UpstreamAnswer) for result in results)
        assert answered == 25
        assert sum(isinstance(result, bytes) for result in results) == 25
        roles = [
            {
                sample.labels["role"]: sample.value
                for family in m.registry.collect()
                for sample in family.samples
                if sample.name == "pgw_single_flight_total"
            }
            for m in metrics
        ]
        assert sorted(r.get("leader", 0) for r in roles) == [0, 1]
        assert sorted(r.get("shared", 0) for r in roles) == [0, 1]
        assert [r.get("joined", 0) for r in roles] == [24, 24]
        assert await redis.exists(FLIGHT + digest) == 0

    async def test_waiters_woken_by_pubsub_not_the_poll(
        self, redis: Redis, make_process: MakeProcess
    ) -> None:
        one, two = make_process(), make_process(poll_interval=10.0)
        await two.start()
        await asyncio.sleep(0.2)  # let the subscription be confirmed
        digest = new_digest()
        store = Store(redis, digest)
        upstream = Upstream(delay=0.3)
        leader = asyncio.create_task(call(one, digest, upstream, store))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        result = await call(two, digest, upstream, store)
        assert time.monotonic() - started < 2.0  # the 10 s poll never came round
        assert result == body_of(await leader)
        assert upstream.calls == 1

    async def test_on_result_runs_while_the_lock_is_held(
        self, redis: Redis, make_process: MakeProcess
    ) -> None:
        flights = make_process()
        digest = new_digest()
        held: list[bool] = []

        async def on_result(answer: UpstreamAnswer) -> None:
            held.append(bool(await redis.exists(FLIGHT + digest)))

        upstream = Upstream(delay=0.01)
        await flights.run(
            digest,
            deadline_s=2,
            lock_ttl_ms=2_000,
            execute=upstream.execute,
            on_result=on_result,
        )
        assert held == [True]
        assert await redis.exists(FLIGHT + digest) == 0

    async def test_answer_stored_meanwhile_is_not_run_again(
        self, redis: Redis, make_process: MakeProcess
    ) -> None:
        # Another process stored it after this request's lookup missed, and unlocked.
        flights = make_process()
        digest = new_digest()
        store = Store(redis, digest)
        await redis.set(cache_key(digest), b'{"run":{"stdout":"stored"}}', px=60_000)
        upstream = Upstream()
        result = await call(flights, digest, upstream, store)
        assert result == b'{"run":{"stdout":"stored"}}'
        assert upstream.calls == 0

    async def test_uncacheable_answer_shared(self, redis: Redis, make_process: MakeProcess) -> None:
        # A timed-out run is not stored, but waiters elsewhere get it instead of running it again.
        one, two = make_process(), make_process()
        await two.start()
        upstream = Upstream(delay=0.3, statuses=("TO",))
        digest = new_digest()
        store = Store(redis, digest)
        leader = asyncio.create_task(call(one, digest, upstream, store))
        await asyncio.sleep(0.05)
        waiters = await asyncio.gather(*(call(two, digest, upstream, store) for _ in range(10)))
        answer = await leader
        assert isinstance(answer, UpstreamAnswer)
        assert upstream.calls == 1
        assert store.writes == 0
        assert await store.read() is None
        for result in waiters:
            assert isinstance(result, UpstreamAnswer)
            assert result.body == answer.body
            assert result.statuses == ("TO",)
            assert not result.cacheable

    async def test_leader_error_shared(self, redis: Redis, make_process: MakeProcess) -> None:
        one, two = make_process(), make_process()
        await two.start()
        error = GatewayTimeout("the upstream did not answer within 3000 ms")
        error.headers["Retry-After"] = "1"
        upstream = Upstream(delay=0.3, error=error)
        digest = new_digest()
        store = Store(redis, digest)
        leader = asyncio.create_task(call(one, digest, upstream, store))
        await asyncio.sleep(0.05)
        waiters = await asyncio.gather(
            *(call(two, digest, upstream, store) for _ in range(10)), return_exceptions=True
        )
        with pytest.raises(GatewayTimeout):
            await leader
        assert upstream.calls == 1
        for outcome in waiters:
            assert isinstance(outcome, GatewayError)
            assert outcome.status_code == 504
            assert outcome.message == error.message
            assert outcome.headers == {"Retry-After": "1"}

    async def test_takeover_after_the_leader_died(
        self, redis: Redis, make_process: MakeProcess
    ) -> None:
        # A dead process's lock: never released, never renewed, gone when its lease runs out.
        flights = make_process()
        digest = new_digest()
        await redis.set(FLIGHT + digest, "dead-process", px=300)
        upstream = Upstream(delay=0.05)
        store = Store(redis, digest)
        started = time.monotonic()
        results = await asyncio.gather(
            *(call(flights, digest, upstream, store, deadline_s=3) for _ in range(10))
        )
        assert time.monotonic() - started >= 0.25
        assert upstream.calls == 1
        assert all(result is upstream.answers[0] for result in results)

    async def test_takeover_after_the_leader_was_cancelled(
        self, redis: Redis, make_process: MakeProcess
    ) -> None:
        one, two = make_process(), make_process()
        digest = new_digest()
        store = Store(redis, digest)
        stuck = Upstream(delay=30)
        leader = asyncio.create_task(call(one, digest, stuck, store, deadline_s=30))
        await asyncio.sleep(0.1)
        upstream = Upstream(delay=0.05)
        waiter = asyncio.create_task(call(two, digest, upstream, store, deadline_s=3))
        await asyncio.sleep(0.1)
        await one.close()  # the process shuts down mid-run: its lock is released on the way out
        assert isinstance(await waiter, UpstreamAnswer)
        assert (stuck.calls, upstream.calls) == (1, 1)
        leader.cancel()

    async def test_lease_renewed_while_the_leader_runs(
        self, redis: Redis, make_process: MakeProcess
    ) -> None:
        # A run longer than the lease: the live leader keeps the lock, so nobody takes over.
        one, two = make_process(lease_ms=300), make_process(lease_ms=300)
        digest = new_digest()
        store = Store(redis, digest)
        upstream = Upstream(delay=1.2)
        leader = asyncio.create_task(call(one, digest, upstream, store))
        await asyncio.sleep(0.05)
        waiters = await asyncio.gather(*(call(two, digest, upstream, store) for _ in range(5)))
        await leader
        assert upstream.calls == 1
        assert {body_of(w) for w in waiters} == {upstream.answers[0].body}

    async def test_lock_never_held_past_lock_ttl(
        self, redis: Redis, make_process: MakeProcess
    ) -> None:
        one, two = make_process(lease_ms=300), make_process(lease_ms=300)
        digest = new_digest()
        wedged = Upstream(delay=30)
        leader = asyncio.create_task(call(one, digest, wedged, lock_ttl_ms=400, deadline_s=30))
        await asyncio.sleep(0.05)
        upstream = Upstream(delay=0.05)
        result = await call(two, digest, upstream, deadline_s=3)
        assert result is upstream.answers[0]
        leader.cancel()

    async def test_deadline_while_another_process_runs(
        self, redis: Redis, make_process: MakeProcess
    ) -> None:
        flights = make_process()
        digest = new_digest()
        await redis.set(FLIGHT + digest, "busy-elsewhere", px=10_000)
        upstream = Upstream()
        started = time.monotonic()
        with pytest.raises(GatewayTimeout):
            await call(flights, digest, upstream, Store(redis, digest), deadline_s=0.3)
        assert 0.25 <= time.monotonic() - started < 1.5
        assert upstream.calls == 0
        await redis.delete(FLIGHT + digest)

    async def test_waiters_share_one_pubsub_connection(
        self, redis: Redis, make_process: MakeProcess
    ) -> None:
        name = f"pgw-test-pubsub-{secrets.token_hex(4)}"
        flights = make_process(client_name=name)
        digests = [new_digest() for _ in range(50)]
        for digest in digests:
            await redis.set(FLIGHT + digest, "busy-elsewhere", px=10_000)
        upstream = Upstream(delay=0.01)
        tasks = [asyncio.create_task(call(flights, d, upstream, Store(redis, d))) for d in digests]
        subscribers: list[dict[str, Any]] = []
        for _ in range(40):  # the subscription is confirmed asynchronously
            await asyncio.sleep(0.05)
            clients = await redis.client_list()
            mine = [c for c in clients if c.get("name") == name]
            subscribers = [c for c in mine if int(c["psub"]) + int(c["sub"]) > 0]
            if subscribers:
                break
        # One PSUBSCRIBE connection for the process; the polls go through the ordinary pool.
        assert len(subscribers) == 1
        assert subscribers[0]["psub"] == "1"
        await redis.delete(*(FLIGHT + d for d in digests))
        results = await asyncio.gather(*tasks)
        assert upstream.calls == 50
        assert len(results) == 50


@dataclass
class Landing:
    """A claim's landing as the admission's finish script does it: store, release, wake-up."""

    redis: Redis
    digest: str
    token: str
    finished: bool = False  # its request left already: the flight must land on its own
    calls: list[tuple[UpstreamAnswer | None, bytes]] = field(default_factory=list)

    def claim(self) -> Claim:
        return Claim(self.token, self.land)

    async def land(self, answer: UpstreamAnswer | None, wake_up: bytes) -> bool:
        self.calls.append((answer, wake_up))
        if self.finished:
            return False
        if answer is not None and answer.cacheable:
            await self.redis.set(cache_key(self.digest), answer.body, px=60_000)
        if await self.redis.get(FLIGHT + self.digest) == self.token.encode():
            await self.redis.delete(FLIGHT + self.digest)
        await self.redis.publish(FLIGHT + self.digest, wake_up)
        return True


async def claimed(redis: Redis, digest: str, **options: Any) -> Landing:
    """The lock taken as the admit script takes it, and the landing that releases it."""
    landing = Landing(redis, digest, secrets.token_hex(16), **options)
    assert await redis.set(FLIGHT + digest, landing.token, nx=True, px=3_000)
    return landing


class TestClaims:
    async def test_a_claim_leads_without_another_look_and_lands_once(
        self, redis: Redis, make_process: MakeProcess
    ) -> None:
        flights = make_process()
        digest = new_digest()
        landing = await claimed(redis, digest)
        store = Store(redis, digest)
        looked: list[bool] = []

        async def read_cached() -> bytes | None:
            looked.append(True)
            return await store.read()

        upstream = Upstream(delay=0.01)
        claim = landing.claim()
        result = await flights.run(
            digest,
            deadline_s=5,
            lock_ttl_ms=5_000,
            execute=upstream.execute,
            read_cached=read_cached,
            on_result=store.write,
            claim=claim,
        )
        assert result is upstream.answers[0]
        assert looked == []  # the admit's read and claim were one step
        assert store.writes == 0  # stored by the landing, not by on_result
        assert landing.calls == [(result, b"w")]
        assert await store.read() == result.body
        assert await redis.exists(FLIGHT + digest) == 0
        assert not claim.withdraw()  # the flight took it

    async def test_an_uncacheable_answer_lands_shared(
        self, redis: Redis, make_process: MakeProcess
    ) -> None:
        one, two = make_process(), make_process()
        await two.start()
        digest = new_digest()
        landing = await claimed(redis, digest)
        store = Store(redis, digest)
        upstream = Upstream(delay=0.3, statuses=("TO",))
        leader = asyncio.create_task(
            one.run(
                digest,
                deadline_s=5,
                lock_ttl_ms=5_000,
                execute=upstream.execute,
                on_result=store.write,
                claim=landing.claim(),
            )
        )
        waiter = await call(two, digest, upstream, store)
        answer = await leader
        assert upstream.calls == 1
        [(landed, wake_up)] = landing.calls
        assert landed is answer
        assert wake_up.startswith(b"a")  # not stored: the answer itself, for the waiters
        assert isinstance(waiter, UpstreamAnswer)
        assert (waiter.body, waiter.statuses) == (answer.body, ("TO",))
        assert await store.read() is None

    async def test_a_failed_run_lands_its_error(
        self, redis: Redis, make_process: MakeProcess
    ) -> None:
        flights = make_process()
        digest = new_digest()
        landing = await claimed(redis, digest)
        upstream = Upstream(delay=0.01, error=BadGateway("the upstream failed with status 500"))
        with pytest.raises(BadGateway):
            await flights.run(
                digest,
                deadline_s=5,
                lock_ttl_ms=5_000,
                execute=upstream.execute,
                claim=landing.claim(),
            )
        [(answer, wake_up)] = landing.calls
        assert answer is None
        assert wake_up.startswith(b"e")
        assert await redis.exists(FLIGHT + digest) == 0

    async def test_a_claim_whose_request_left_lands_with_the_flight(
        self, redis: Redis, make_process: MakeProcess
    ) -> None:
        flights = make_process()
        digest = new_digest()
        landing = await claimed(redis, digest, finished=True)
        store = Store(redis, digest)
        upstream = Upstream(delay=0.01)
        result = await flights.run(
            digest,
            deadline_s=5,
            lock_ttl_ms=5_000,
            execute=upstream.execute,
            on_result=store.write,
            claim=landing.claim(),
        )
        assert len(landing.calls) == 1
        assert store.writes == 1  # stored by the flight itself, then released
        assert await store.read() == body_of(result)
        assert await redis.exists(FLIGHT + digest) == 0

    async def test_a_claim_is_handed_to_the_flight_waiting_for_it(
        self, redis: Redis, make_process: MakeProcess
    ) -> None:
        # A request of this process lost the race for the lock to one whose admit claimed it,
        # and reached `run` first: its flight waits for that lock, so the claim goes to it.
        flights = make_process(poll_interval=10.0)
        await flights.start()
        digest = new_digest()
        landing = await claimed(redis, digest)
        store = Store(redis, digest)
        upstream = Upstream(delay=0.05)
        first = asyncio.create_task(call(flights, digest, upstream, store))
        async with asyncio.timeout(5):
            while await redis.pubsub_numpat() == 0 or not flights._flights:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        claim = landing.claim()
        async with asyncio.timeout(5):  # the claim wakes it: not the 10 s poll, nor the lease
            second = await flights.run(
                digest,
                deadline_s=5,
                lock_ttl_ms=5_000,
                execute=upstream.execute,
                read_cached=store.read,
                on_result=store.write,
                claim=claim,
            )
            assert await first is second
        assert upstream.calls == 1
        assert not claim.withdraw()
        assert landing.calls == [(second, b"w")]
        assert await redis.exists(FLIGHT + digest) == 0

    async def test_a_claim_joining_a_flight_that_leads_is_not_taken(
        self, redis: Redis, make_process: MakeProcess
    ) -> None:
        flights = make_process()
        digest = new_digest()
        upstream = Upstream(delay=0.3)
        store = Store(redis, digest)
        leader = asyncio.create_task(call(flights, digest, upstream, store))
        async with asyncio.timeout(5):
            while not await redis.exists(FLIGHT + digest):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        claim = Landing(redis, digest, "a-lock-it-no-longer-holds").claim()
        joined = await flights.run(
            digest, deadline_s=5, lock_ttl_ms=5_000, execute=upstream.execute, claim=claim
        )
        assert joined is await leader
        assert upstream.calls == 1
        assert claim.withdraw()  # not taken: its owner releases what it holds


class TestRedisDown:
    async def test_run_executes_without_redis(self) -> None:
        client = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
        flights = SingleFlight(client)
        try:
            await flights.start()
            upstream = Upstream(delay=0.05)
            stored: list[UpstreamAnswer] = []

            async def on_result(answer: UpstreamAnswer) -> None:
                stored.append(answer)

            digest = new_digest()
            results = await asyncio.gather(
                *(
                    flights.run(
                        digest,
                        deadline_s=3,
                        lock_ttl_ms=3_000,
                        execute=upstream.execute,
                        read_cached=Store(client, digest).read,
                        on_result=on_result,
                    )
                    for _ in range(5)
                )
            )
            assert upstream.calls == 1
            assert all(result is upstream.answers[0] for result in results)
            assert stored == upstream.answers
        finally:
            await flights.close()
            await client.aclose()

    async def test_store_failure_does_not_fail_the_request(
        self, redis: Redis, make_process: MakeProcess
    ) -> None:
        flights = make_process()

        async def broken_store(answer: UpstreamAnswer) -> None:
            down = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
            try:
                await down.set(cache_key("x"), answer.body)
            finally:
                await down.aclose()

        upstream = Upstream(delay=0.01)
        result = await flights.run(
            new_digest(),
            deadline_s=2,
            lock_ttl_ms=2_000,
            execute=upstream.execute,
            on_result=broken_store,
        )
        assert result is upstream.answers[0]
