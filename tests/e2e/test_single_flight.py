"""Single-flight across real gateway processes on one Redis, counted by the engine itself."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest
from redis.asyncio import Redis

from tests.e2e.conftest import E2E_ADMIN_KEY
from tests.support import RedisServer, Service, engine_jobs, mint_key

ADMIN = E2E_ADMIN_KEY


def _key(gateway: Service, tenant: str) -> str:
    return mint_key(gateway, ADMIN, tenant, rate_limit="1000/minute")


def _program(seed: str, sleep: float) -> dict[str, object]:
    source = f"import random, time\n# {seed}\ntime.sleep({sleep})\nprint(random.random())\n"
    return {"language": "python", "version": "*", "files": [{"content": source}]}


def _roles(gateway: Service) -> dict[str, float]:
    """pgw_single_flight_total by role, from the process's own /metrics."""
    roles: dict[str, float] = {}
    for line in httpx.get(f"{gateway.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("pgw_single_flight_total{"):
            labels, value = line.rsplit(" ", 1)
            roles[labels.split('role="', 1)[1].split('"', 1)[0]] = float(value)
    return roles


async def _fire(
    urls: list[str], key: str, body: dict[str, object], count: int
) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count)) as client:
        return list(
            await asyncio.gather(
                *(
                    client.post(
                        f"{urls[i % len(urls)]}/api/v2/execute",
                        json=body,
                        headers={"Authorization": f"Bearer {key}"},
                    )
                    for i in range(count)
                )
            )
        )


async def _leading(
    client: httpx.AsyncClient, url: str, key: str, body: dict[str, object], redis_url: str
) -> asyncio.Task[httpx.Response]:
    """The first request, once it leads: its admit script claimed the flight lock."""
    first = asyncio.create_task(
        client.post(f"{url}/api/v2/execute", json=body, headers={"Authorization": f"Bearer {key}"})
    )
    redis = Redis.from_url(redis_url)
    try:
        async with asyncio.timeout(10):
            while not [k async for k in redis.scan_iter(match="pgw:flight:*")]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    finally:
        await redis.aclose()
    return first


class TestAcrossProcesses:
    def test_fifty_identical_requests_run_once(
        self, replicas: list[Service], engine: Service
    ) -> None:
        key = _key(replicas[0], "flight")
        before = engine_jobs(engine)
        answers = asyncio.run(_fire([g.url for g in replicas], key, _program("once", 1.0), 50))
        assert {a.status_code for a in answers} == {200}
        assert len({a.json()["run"]["stdout"] for a in answers}) == 1  # one random number for all
        assert engine_jobs(engine) - before == 1

    def test_a_replica_waits_for_the_lock_another_claimed_in_its_admit(
        self, replicas: list[Service], engine: Service, redis_server: RedisServer
    ) -> None:
        leader, other = replicas
        key = _key(leader, "claimed")
        body = _program("claimed", 1.0)
        before = engine_jobs(engine)

        async def scenario() -> tuple[httpx.Response, list[httpx.Response]]:
            async with httpx.AsyncClient(timeout=60) as client:
                # The leader's admit script claimed the flight lock with its cache read.
                first = await _leading(client, leader.url, key, body, redis_server.url)
                waiters = await _fire([other.url], key, body, 5)
                return await first, waiters

        first, waiters = asyncio.run(scenario())
        assert [a.status_code for a in [first, *waiters]] == [200] * 6
        assert {a.json()["run"]["stdout"] for a in [first, *waiters]} == {
            first.json()["run"]["stdout"]
        }
        assert {a.headers["x-cache"] for a in [first, *waiters]} == {"MISS"}
        assert engine_jobs(engine) - before == 1
        # The other process neither led nor took over: it waited for the claimed lock and read
        # what the leader stored (one flight, the four other requests joined in-process).
        assert _roles(leader).get("leader") == 1
        roles = _roles(other)
        assert (roles.get("leader", 0), roles.get("takeover", 0)) == (0, 0)
        assert (roles.get("shared"), roles.get("joined")) == (1, 4)

    def test_waiters_survive_the_leaders_death(
        self, replicas: list[Service], engine: Service, redis_server: RedisServer
    ) -> None:
        leader, survivor = replicas
        key = _key(leader, "takeover")
        body = _program("takeover", 2.0)

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                # The leader holds the flight lock and runs the job.
                first = await _leading(client, leader.url, key, body, redis_server.url)
                waiters = asyncio.create_task(_fire([survivor.url], key, body, 5))
                await asyncio.sleep(0.3)
                assert leader.proc is not None
                os.kill(leader.proc.pid, signal.SIGKILL)
                with pytest.raises(httpx.HTTPError):
                    await first
                return await waiters

        started = time.monotonic()
        answers = asyncio.run(scenario())
        assert {a.status_code for a in answers} == {200}
        assert len({a.json()["run"]["stdout"] for a in answers}) == 1
        assert time.monotonic() - started < 30  # answered, not hung until a far deadline
