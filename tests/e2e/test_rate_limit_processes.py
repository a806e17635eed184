"""Limits are exact when the gateway runs as several processes on one Redis."""

from __future__ import annotations

import asyncio

import httpx

from tests.e2e.conftest import E2E_ADMIN_KEY
from tests.support import Service

ADMIN = E2E_ADMIN_KEY


def test_sixty_requests_over_two_processes_admit_exactly_twenty(replicas: list[Service]) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    httpx.post(
        f"{replicas[0].url}/admin/tenants",
        headers=admin,
        timeout=10,
        json={"id": "exact", "rate_limit": "20/minute"},
    ).raise_for_status()
    key = httpx.post(
        f"{replicas[1].url}/admin/tenants/exact/keys", headers=admin, json={}, timeout=10
    ).json()["key"]
    body = {"language": "python", "version": "*", "files": [{"content": "print(1)"}]}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=60)) as client:
            return list(
                await asyncio.gather(
                    *(
                        client.post(
                            f"{replicas[i % 2].url}/api/v2/execute",
                            json=body,
                            headers={"Authorization": f"Bearer {key}"},
                        )
                        for i in range(60)
                    )
                )
            )

    answers = asyncio.run(burst())
    admitted = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert len(admitted) == 20
    assert len(refused) == 40
    remaining = sorted(int(a.headers["x-ratelimit-remaining"]) for a in admitted)
    assert remaining == list(range(20))  # each admission saw its own place in the count
    assert all(a.headers["x-ratelimit-remaining"] == "0" for a in refused)
    assert {a.headers["x-ratelimit-limit"] for a in answers} == {"20"}
