"""A miss through the gateway: the admit script claims the flight lock, one script lands it.

What is counted is what Redis saw (MONITOR on the suite's real Redis) and what the gateway
wrote there (usage, leases, the lock, the entry); the engine runs the code, a fake Piston only
what a real one cannot do on demand (a 5xx, a run that takes its time).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from starlette.datastructures import Headers

from app.cache.flight import SingleFlight
from app.cache.keys import cache_key
from app.limits import Admission
from app.pipeline import admit, plan
from app.redis import FLIGHT, concurrency_leases
from app.tenancy.models import Tenant
from app.upstream.pool import UpstreamAnswer
from tests.conftest import Gateway, GatewayFactory
from tests.fakes import OK_ANSWER, FakePiston, serve_fake
from tests.support import RedisServer

PROGRAM: dict[str, Any] = {
    "language": "python",
    "version": "*",
    "files": [{"content": "print(6 * 7)"}],
}


def fresh() -> dict[str, Any]:
    """The program with a stdin never sent before: a miss."""
    return {**PROGRAM, "stdin": secrets.token_hex(8)}


async def commands_per_request(
    server: RedisServer, sends: list[Callable[[], Awaitable[httpx.Response]]]
) -> tuple[list[list[str]], list[httpx.Response]]:
    """The commands Redis received from clients while each request waited for its answer.

    Each request is bracketed by ECHO markers from a client of our own, so MONITOR's order says
    exactly what arrived in between. Not counted: what a script ran inside Redis (`lua`), and
    the pub/sub connections (their pings; a request sends nothing there).
    """
    watcher = Redis.from_url(server.url)
    marker = Redis.from_url(server.url)
    await marker.ping()  # its connection handshake must not land inside a window
    responses: list[httpx.Response] = []
    windows: list[list[str]] = []
    async with watcher.monitor() as monitor:
        for i, send in enumerate(sends):
            await marker.echo(f"pgw-window-start-{i}")
            responses.append(await send())
            await marker.echo(f"pgw-window-end-{i}")
        subscribers = {
            c["addr"] for c in await marker.client_list() if int(c["sub"]) + int(c["psub"]) > 0
        }
        await marker.echo("pgw-end-of-test")
        current: list[str] | None = None
        async for event in monitor.listen():
            command = str(event["command"])
            if command.startswith("ECHO") and "pgw-end-of-test" in command:
                break
            if command.startswith("ECHO") and "pgw-window-start-" in command:
                current = []
            elif command.startswith("ECHO") and "pgw-window-end-" in command:
                assert current is not None
                windows.append(current)
                current = None
            elif current is not None and event.get("client_type") != "lua":
                if f"{event['client_address']}:{event['client_port']}" not in subscribers:
                    current.append(command.split(" ", 1)[0].upper())
    await watcher.aclose()
    await marker.aclose()
    return windows, responses


@dataclass
class Finish:
    admission: Admission
    figures: dict[str, Any]
    lands: bool  # it also released a flight lock the admission had claimed


def count_finishes(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> list[Finish]:
    """Every call of the gate's finish, as it was made."""
    gate = gateway.state.gate
    original = gate.finish
    calls: list[Finish] = []

    async def finish(admission: Admission, **figures: Any) -> None:
        calls.append(Finish(admission, figures, admission.flight_lock is not None))
        await original(admission, **figures)

    monkeypatch.setattr(gate, "finish", finish)
    return calls


async def locks(redis: Redis) -> list[bytes]:
    return [key async for key in redis.scan_iter(match=FLIGHT + "*")]


async def locks_gone(redis: Redis) -> bool:
    return await locks(redis) == []


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait for an event that shows in Redis (a lock released, an entry stored), bounded."""
    async with asyncio.timeout(10):
        while not await check():  # noqa: ASYNC110  # Redis offers no event for these
            await asyncio.sleep(0.01)


async def today(gateway: Gateway, tenant: str = "acme") -> dict[str, Any]:
    rows: list[dict[str, Any]] = await gateway.state.gate.usage(tenant, days=1)
    return rows[0]


class TestRoundTrips:
    async def test_a_miss_makes_two_round_trips_before_its_answer(
        self, gateway: Gateway, redis: Redis, redis_server: RedisServer
    ) -> None:
        key = await gateway.tenant(rate_limit="1000/minute", max_concurrency=2)
        await gateway.execute(key, fresh())  # the key's lookup, the scripts loaded: not counted
        misses = [fresh() for _ in range(3)]
        sends: list[Callable[[], Awaitable[httpx.Response]]] = [
            partial(gateway.execute, key, body) for body in [*misses, misses[0]]
        ]
        windows, responses = await commands_per_request(redis_server, sends)

        assert [r.headers["x-cache"] for r in responses] == ["MISS", "MISS", "MISS", "HIT"]
        assert {r.json()["run"]["stdout"] for r in responses} == {"42\n"}
        # A miss: the admit script (limits, lease, cache read, lock claim) and the landing
        # script (store, release, wake-up, usage, lease); a hit: the admit script alone.
        assert windows == [["EVALSHA", "EVALSHA"]] * 3 + [["EVALSHA"]]
        assert await locks(redis) == []
        assert await redis.zcard(concurrency_leases("acme")) == 0
        usage = await today(gateway)
        assert (usage["executions"], usage["cache_hits"], usage["errors"]) == (5, 1, 0)

    async def test_the_landing_stores_what_the_engine_answered(
        self, gateway: Gateway, redis: Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        finishes = count_finishes(gateway, monkeypatch)
        key = await gateway.tenant()
        body = fresh()
        first = await gateway.execute(key, body)
        assert first.headers["x-cache"] == "MISS"
        [finish] = finishes
        assert finish.lands
        assert finish.admission.store is not None
        stored_key, stored_body, ttl = finish.admission.store
        assert await redis.get(stored_key) == first.content == stored_body
        assert 0 < await redis.ttl(stored_key) <= ttl == gateway.state.settings.cache_ttl_seconds
        hit = await gateway.execute(key, body)
        assert (hit.headers["x-cache"], hit.content) == ("HIT", first.content)
        # The hit's finish has nothing to send (no lease, no figures, no lock).
        assert [f.lands for f in finishes] == [True, False]


class TestInProcess:
    async def test_two_hundred_identical_misses_run_once(
        self, make_gateway: GatewayFactory, redis: Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        async with serve_fake(FakePiston(delay=0.3)) as fake:
            gateway = await make_gateway(piston_urls=[fake.url], max_concurrency=256)
            finishes = count_finishes(gateway, monkeypatch)
            key = await gateway.tenant(rate_limit="1000/minute")
            body = fresh()
            answers = await asyncio.gather(*(gateway.execute(key, body) for _ in range(200)))
        assert {a.status_code for a in answers} == {200}
        assert {a.headers["x-cache"] for a in answers} == {"MISS"}
        assert fake.executions == 1
        # One admit claimed the lock and landed the run; the 199 others joined it in-process.
        assert len(finishes) == 200
        assert sum(f.lands for f in finishes) == 1
        assert await locks(redis) == []


class TestExactlyOnce:
    async def test_an_answer_is_finished_once_with_its_figures(
        self, make_gateway: GatewayFactory, redis: Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        async with serve_fake(FakePiston()) as fake:
            gateway = await make_gateway(piston_urls=[fake.url])
            finishes = count_finishes(gateway, monkeypatch)
            key = await gateway.tenant(max_concurrency=1)
            response = await gateway.execute(key, fresh())
            assert response.status_code == 200
        [finish] = finishes
        assert finish.lands
        assert finish.figures == {
            "error": False,
            "cpu_time_ms": OK_ANSWER["run"]["cpu_time"],
            "wall_time_ms": OK_ANSWER["run"]["wall_time"],
            "cache_hits": 0,
        }
        usage = await today(gateway)
        assert (usage["executions"], usage["errors"], usage["cpu_time_ms"]) == (1, 0, 8)
        assert await redis.zcard(concurrency_leases("acme")) == 0
        assert await locks(redis) == []

    async def test_an_upstream_5xx_is_finished_once_as_an_error(
        self, make_gateway: GatewayFactory, redis: Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        async with serve_fake(FakePiston(mode="500")) as fake:
            gateway = await make_gateway(piston_urls=[fake.url])
            finishes = count_finishes(gateway, monkeypatch)
            key = await gateway.tenant(max_concurrency=1)
            body = fresh()
            response = await gateway.execute(key, body)
            assert response.status_code == 502
            assert response.headers["x-ratelimit-limit"]  # an admitted request's error
            # Released with the answer, not by expiry: the tenant's one lease is free again.
            assert await locks(redis) == []
            assert await redis.zcard(concurrency_leases("acme")) == 0
            assert (await gateway.execute(key, body)).status_code == 502  # not stored
            assert fake.executions == 2
        assert [(f.lands, f.figures["error"]) for f in finishes] == [(True, True), (True, True)]
        assert finishes[0].admission.store is None
        assert finishes[0].admission.wake_up.startswith(b"e")  # the error, for waiters elsewhere
        usage = await today(gateway)
        assert (usage["executions"], usage["errors"]) == (2, 2)

    async def test_a_slot_refusal_is_finished_once_as_an_error(
        self, make_gateway: GatewayFactory, redis: Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        async with serve_fake(FakePiston(delay=5.0)) as fake:
            gateway = await make_gateway(
                piston_urls=[fake.url], max_concurrency=1, max_queue=1, queue_timeout_ms=100
            )
            key = await gateway.tenant(max_concurrency=5)
            holder = asyncio.create_task(gateway.execute(key, fresh()))
            async with asyncio.timeout(10):
                while gateway.state.slots.in_flight != 1:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            finishes = count_finishes(gateway, monkeypatch)
            refused = await gateway.execute(key, fresh())
            assert refused.status_code == 503
            assert refused.json() == {"message": "the gateway is at capacity; retry shortly"}
            [finish] = finishes
            assert (finish.lands, finish.figures["error"]) == (True, True)
            # Only the holder's lock and lease are left.
            assert len(await locks(redis)) == 1
            assert await redis.zcard(concurrency_leases("acme")) == 1
            holder.cancel()
            await asyncio.gather(holder, return_exceptions=True)
        assert fake.executions == 1

    async def test_a_bug_mid_run_is_finished_once_as_an_error(
        self, gateway: Gateway, redis: Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        finishes = count_finishes(gateway, monkeypatch)
        key = await gateway.tenant(max_concurrency=1)

        async def broken(*args: Any, **kwargs: Any) -> UpstreamAnswer:
            raise RuntimeError("a bug in the upstream call")

        monkeypatch.setattr(gateway.state.pool, "execute", broken)
        response = await gateway.execute(key, fresh())
        assert response.status_code == 500
        assert response.json() == {"message": "internal error"}
        [finish] = finishes
        assert (finish.lands, finish.figures["error"]) == (True, True)
        assert finish.admission.wake_up == b"w"  # waiters look, find nothing, take over
        assert await locks(redis) == []
        assert await redis.zcard(concurrency_leases("acme")) == 0

    async def test_a_client_gone_mid_run_is_finished_once_and_the_run_lands(
        self, make_gateway: GatewayFactory, redis: Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        async with serve_fake(FakePiston(delay=1.0)) as fake:
            gateway = await make_gateway(piston_urls=[fake.url])
            finishes = count_finishes(gateway, monkeypatch)
            key = await gateway.tenant(max_concurrency=1)
            body = fresh()
            request = asyncio.create_task(gateway.execute(key, body))
            async with asyncio.timeout(10):
                while fake.executions == 0:  # noqa: ASYNC110  # the upstream holds the run
                    await asyncio.sleep(0.01)
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
            # Finished at once, as an error: the lease is free while the run goes on.
            [finish] = finishes
            assert (finish.lands, finish.figures["error"]) == (False, True)
            assert await redis.zcard(concurrency_leases("acme")) == 0
            assert len(await locks(redis)) == 1  # the flight holds it until it lands
            # The run lands on its own: stored, then released.
            await until(lambda: locks_gone(redis))
            assert (await redis.keys("pgw:cache:*")) != []
            again = await gateway.execute(key, body)
            assert again.headers["x-cache"] == "HIT"
        assert fake.executions == 1
        # One finish for the request that left (the flight landed without one), one for the hit.
        assert [f.admission is finish.admission for f in finishes] == [True, False]
        usage = await today(gateway)
        assert (usage["executions"], usage["cache_hits"], usage["errors"]) == (2, 1, 1)


class TestRedisFaults:
    async def test_redis_gone_before_the_landing_still_answers(
        self, make_gateway: GatewayFactory
    ) -> None:
        own = RedisServer()  # stopped mid-run: a server of this test's own
        own.start()
        try:
            async with serve_fake(FakePiston(delay=0.5)) as fake:
                gateway = await make_gateway(piston_urls=[fake.url], redis_url=own.url)
                key = await gateway.tenant(max_concurrency=1)
                request = asyncio.create_task(gateway.execute(key, fresh()))
                async with asyncio.timeout(10):
                    while fake.executions == 0:  # noqa: ASYNC110  # admitted, claimed, running
                        await asyncio.sleep(0.01)
                own.stop()
                response = await request
        finally:
            own.stop()
        # The landing script failed (logged); the answer is the run's all the same.
        assert response.status_code == 200
        assert response.headers["x-cache"] == "MISS"
        assert response.json()["run"]["stdout"] == OK_ANSWER["run"]["stdout"]


class TestClaimWithoutRun:
    @pytest.fixture
    async def other_process(self, redis_server: RedisServer) -> AsyncIterator[SingleFlight]:
        """Another gateway process's single-flight, which polls only every 10 s."""
        client = Redis.from_url(redis_server.url)
        flights = SingleFlight(client, poll_interval=10.0)
        await flights.start()
        yield flights
        await flights.close()
        await client.aclose()

    async def test_a_claim_whose_request_fails_before_running_is_released(
        self, gateway: Gateway, redis: Redis, other_process: SingleFlight
    ) -> None:
        state = gateway.state
        tenant = Tenant(id="acme", max_concurrency=1)
        planned = plan(tenant, fresh(), Headers(), settings=state.settings, catalog=state.catalog)
        assert planned.cache.digest is not None
        digest = planned.cache.digest
        ran: list[UpstreamAnswer] = []

        async def execute() -> UpstreamAnswer:
            answer = UpstreamAnswer(200, b'{"run":{"stdout":"elsewhere"}}', (None,), 1.0, 1.0)
            ran.append(answer)
            return answer

        waiting = asyncio.Event()

        async def read_cached() -> bytes | None:
            waiting.set()  # first called once its SET NX failed: it waits for the lock
            value = await redis.get(cache_key(digest))
            assert value is None or isinstance(value, bytes)
            return value

        waiter: asyncio.Task[Any] | None = None

        async def claim_then_fail() -> None:
            nonlocal waiter
            async with admit(state, tenant, planned) as admission:
                assert admission.flight_lock == FLIGHT + digest
                assert await redis.get(FLIGHT + digest) == admission.token.encode()
                waiter = asyncio.create_task(
                    other_process.run(
                        digest,
                        deadline_s=30,
                        lock_ttl_ms=30_000,
                        execute=execute,
                        read_cached=read_cached,
                    )
                )
                async with asyncio.timeout(10):  # the other process waits for our lock
                    await waiting.wait()
                raise RuntimeError("a bug before the run")

        with pytest.raises(RuntimeError, match="a bug before the run"):
            await claim_then_fail()
        # Released on the way out (not left for its lease to run out), and the waiter told.
        assert await redis.exists(FLIGHT + digest) == 0
        assert await redis.zcard(concurrency_leases("acme")) == 0
        assert waiter is not None
        async with asyncio.timeout(5):  # the wake-up, not its 10 s poll nor the 3 s lease
            result = await waiter
        assert ran == [result]
