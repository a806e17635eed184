"""Logs of a real `piston-gateway serve`: uvicorn's own lines are JSON like ours, carry the
request id, and never a key, even one sent as a WebSocket's `?api_key=` (browsers must).

The autouse `log_scan` (tests/e2e/conftest.py) checks every line for keys after each test; these
tests make sure the lines that used to leak are there to be checked.
"""

from __future__ import annotations

import asyncio
import json
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
