"""Logs of a real `piston-gateway serve`: uvicorn's own lines are JSON like ours, carry the
request id, and never a key, even one sent as a WebSocket's `?api_key=` (browsers must).

The autouse `log_scan` (tests/e2e/conftest.py) checks every line for keys after each test; these
tests make sure the lines that used to leak are there to be checked.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.e2e.conftest import E2E_ADMIN_KEY
from tests.support import LOG_SCAN, RedisServer, Service, mint_key, run_cli, start_gateway

_DB = 5
NOT_A_PGW_KEY = "hunter2-not-a-gateway-key-but-still-a-secret"


@pytest.fixture(scope="module")
def redis_url(redis_server: RedisServer) -> str:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{_DB}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def gateway(redis_url: str, engine: Service) -> Iterator[tuple[Service, str]]:
    service = start_gateway(redis_url=redis_url, piston_url=engine.url, admin_key=E2E_ADMIN_KEY)
    key = mint_key(service, E2E_ADMIN_KEY, "logs", rate_limit="1000/minute")
    yield service, key
    service.stop()


def lines(service: Service) -> list[dict[str, Any]]:
    return [json.loads(line) for line in service.log().splitlines() if line.strip()]


def wait_for_line(service: Service, text: str, timeout: float = 5) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in lines(service) if text in json.dumps(line)]
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no log line with {text!r} within {timeout} s:\n{service.log()}")


async def _open_and_leave(url: str, request_id: str) -> None:
    async with connect(url, proxy=None, additional_headers={"X-Request-ID": request_id}) as ws:
        await ws.send(json.dumps({"type": "init", "language": "python", "version": "*"}))
        try:
            async with asyncio.timeout(10):
                async for _ in ws:
                    pass
        except ConnectionClosed:
            pass


class TestUvicornLines:
    def test_startup_lines_are_json(self, gateway: tuple[Service, str]) -> None:
        service, _ = gateway
        started = wait_for_line(service, "Application startup complete")
        assert started[0]["logger"] == "uvicorn.error"

    @pytest.mark.parametrize("which", ["minted", "unknown pgw", "not pgw"])
    async def test_websocket_query_key_is_redacted_with_the_request_id(
        self, gateway: tuple[Service, str], which: str
    ) -> None:
        service, key = gateway
        LOG_SCAN.secret(NOT_A_PGW_KEY)
        secret = {
            "minted": key,
            "unknown pgw": "pgw_" + "Z" * 43,
            "not pgw": NOT_A_PGW_KEY,
        }[which]
        request_id = f"ws-{which.replace(' ', '-')}"
        url = service.url.replace("http://", "ws://") + f"/api/v2/connect?api_key={secret}"
        await _open_and_leave(url, request_id)
        # uvicorn's own "WebSocket /path?query" line, through our JSON logging.
        found = [
            line
            for line in wait_for_line(service, request_id)
            if "WebSocket /api/v2/connect" in line["event"]
        ]
        assert found, lines(service)[-5:]
        assert all("api_key=[redacted]" in line["event"] for line in found)
        assert all(line["request_id"] == request_id for line in found)
        assert secret not in service.log()


class TestAccessLines:
    """One line per request (written in batches, one write per loop iteration: none may be lost
    or torn), with its fields, and none at all above the info level."""

    async def test_one_whole_line_per_request_with_its_fields(
        self, gateway: tuple[Service, str]
    ) -> None:
        service, key = gateway
        body = {"language": "python", "version": "*", "files": [{"content": "print('log')"}]}
        auth = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
            await client.post("/api/v2/execute", json=body, headers=auth)  # the run: now hits
            answers = await asyncio.gather(
                *(
                    client.post(
                        "/api/v2/execute", json=body, headers={**auth, "X-Request-ID": f"acc-{i}"}
                    )
                    for i in range(200)
                ),
                client.get("/api/v2/runtimes", headers={"X-Request-ID": "acc-no-key"}),
            )
        assert [a.status_code for a in answers] == [200] * 200 + [401]
        wait_for_line(service, "acc-no-key")
        wait_for_line(service, "acc-199")
        access = {
            line["request_id"]: line
            for line in lines(service)  # every line parses as JSON: none torn
            if line.get("logger") == "app.access" and line["request_id"].startswith("acc-")
        }
        assert len(access) == 201
        hit = access["acc-7"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", hit.pop("timestamp"))
        assert isinstance(hit.pop("ms"), float)
        assert hit == {
            "event": "request",
            "level": "info",
            "logger": "app.access",
            "request_id": "acc-7",
            "method": "POST",
            "path": "/api/v2/execute",
            "route": "/api/v2/execute",
            "status": 200,
            "key_prefix": key[:12],
        }
        refused = access["acc-no-key"]
        assert (refused["status"], refused["key_prefix"]) == (401, None)

    def test_no_access_lines_above_info(self, redis_url: str, engine: Service) -> None:
        service = start_gateway(
            redis_url=redis_url,
            piston_url=engine.url,
            admin_key=E2E_ADMIN_KEY,
            env={"GATEWAY_LOG_LEVEL": "warning"},
        )
        try:
            for _ in range(5):
                httpx.get(f"{service.url}/healthz", timeout=10)
            httpx.get(f"{service.url}/healthz", headers={"X-Request-ID": "quiet"}, timeout=10)
        finally:
            service.stop()  # what is still held is written at exit: nothing can come later
        assert not [line for line in lines(service) if line.get("logger") == "app.access"]


class TestCliStderr:
    def test_a_key_minted_by_the_cli_is_in_no_log(
        self, gateway: tuple[Service, str], redis_url: str
    ) -> None:
        service, _ = gateway
        env = {"GATEWAY_REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"}
        created = run_cli("tenants", "create", "logs-cli", env=env)
        assert created.returncode == 0, created.stderr
        minted = run_cli("keys", "create", "logs-cli", env=env)
        assert minted.returncode == 0, minted.stderr
        key = next(word for word in minted.stdout.split() if word.startswith("pgw_"))
        # The key works (so the scan has something real to look for) ...
        answer = run_cli("keys", "list", "logs-cli", env=env)
        assert key[:12] in answer.stdout
        seen = httpx.get(f"{service.url}/api/v2/runtimes", headers={"X-API-Key": key}, timeout=10)
        assert seen.status_code == 200
        # ... and the scan after this test holds it among the secrets.
        assert key in LOG_SCAN.secrets
