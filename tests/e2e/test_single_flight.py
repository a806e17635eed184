"""Single-flight across real gateway processes on one Redis, counted by the engine itself."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from tests.e2e.conftest import E2E_ADMIN_KEY
from tests.support import Service, engine_jobs, mint_key

ADMIN = E2E_ADMIN_KEY


def _key(gateway: Service, tenant: str) -> str:
    return mint_key(gateway, ADMIN, tenant, rate_limit="1000/minute")


def _program(seed: str, sleep: float) -> dict[str, object]:
    source = f"import random, time\n# {seed}\ntime.sleep({sleep})\nprint(random.random())\n"
    return {"language": "python", "version": "*", "files": [{"content": source}]}


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

    def test_waiters_survive_the_leaders_death(
        self, replicas: list[Service], engine: Service
    ) -> None:
        leader, survivor = replicas
        key = _key(leader, "takeover")
        body = _program("takeover", 2.0)

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                first = asyncio.create_task(
                    client.post(
                        f"{leader.url}/api/v2/execute",
                        json=body,
                        headers={"Authorization": f"Bearer {key}"},
                    )
                )
                await asyncio.sleep(0.5)  # the leader holds the flight lock and runs the job
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
