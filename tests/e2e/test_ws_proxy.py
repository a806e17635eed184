"""WS /api/v2/connect through a real gateway process: the key, the init, then Piston's protocol."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.e2e.conftest import E2E_ADMIN_KEY
from tests.support import RedisServer, Service, mint_key, start_gateway

INIT = {"type": "init", "language": "python", "version": "*"}


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, engine: Service) -> Iterator[tuple[Service, str]]:
    redis.Redis.from_url(redis_server.url).flushall()
    service = start_gateway(
        redis_url=redis_server.url, piston_url=engine.url, admin_key=E2E_ADMIN_KEY
    )
    key = mint_key(
        service, E2E_ADMIN_KEY, "ws", allowed_languages=["python", "c"], rate_limit="1000/minute"
    )
    yield service, key
    service.stop()


def _ws(service: Service, query: str = "") -> str:
    return service.url.replace("http://", "ws://") + "/api/v2/connect" + query


async def _conversation(
    url: str, messages: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], int | None]:
    """Send the messages one by one, then read until the server closes; (received, close code)."""
    received: list[dict[str, Any]] = []
    async with connect(url, additional_headers=headers or {}, proxy=None) as socket:
        for message in messages:
            await socket.send(json.dumps(message))
        try:
            async with asyncio.timeout(20):
                async for text in socket:
                    received.append(json.loads(text))
        except ConnectionClosed:
            pass
        return received, socket.protocol.close_rcvd.code if socket.protocol.close_rcvd else None


class TestRefusedBeforeTheUpstream:
    async def test_no_key_is_1008(self, gateway: tuple[Service, str]) -> None:
        service, _ = gateway
        received, code = await _conversation(_ws(service), [INIT])
        assert code == 1008
        assert received == []

    async def test_unknown_key_is_1008(self, gateway: tuple[Service, str]) -> None:
        service, _ = gateway
        _, code = await _conversation(_ws(service, "?api_key=pgw_nope"), [INIT])
        assert code == 1008

    async def test_language_not_allowed(self, gateway: tuple[Service, str]) -> None:
        service, key = gateway
        init = {**INIT, "language": "bash", "files": [{"content": "echo hi"}]}
        received, code = await _conversation(_ws(service, f"?api_key={key}"), [init])
        assert code == 4002
        assert received == [
            {"type": "error", "message": "language 'bash' is not allowed for this key"}
        ]

    async def test_unknown_runtime(self, gateway: tuple[Service, str]) -> None:
        service, key = gateway
        init = {**INIT, "language": "cobol", "files": [{"content": "x"}]}
        received, code = await _conversation(
            _ws(service), [init], headers={"Authorization": f"Bearer {key}"}
        )
        assert code == 4002
        assert received == [{"type": "error", "message": "cobol-* runtime is unknown"}]

    async def test_limit_over_the_cap(self, gateway: tuple[Service, str]) -> None:
        service, key = gateway
        init = {**INIT, "files": [{"content": "x"}], "run_timeout": 10**6}
        received, code = await _conversation(_ws(service, f"?api_key={key}"), [init])
        assert code == 4002
        assert received[0]["message"] == "run_timeout cannot exceed the configured limit of 3000"

    async def test_no_init_in_time(self, gateway: tuple[Service, str]) -> None:
        service, key = gateway
        _, code = await _conversation(_ws(service, f"?api_key={key}"), [])
        assert code == 4001


class TestRelayedToTheEngine:
    async def test_an_interactive_run(self, gateway: tuple[Service, str]) -> None:
        service, key = gateway
        init = {**INIT, "language": "py", "files": [{"content": "print(input().upper())"}]}
        received: list[dict[str, Any]] = []
        async with connect(_ws(service, f"?api_key={key}"), proxy=None) as socket:
            await socket.send(json.dumps(init))
            async with asyncio.timeout(20):
                received.append(json.loads(await socket.recv()))  # runtime
                received.append(json.loads(await socket.recv()))  # stage run
                await socket.send(json.dumps({"type": "data", "stream": "stdin", "data": "hi\n"}))
                try:
                    async for text in socket:
                        received.append(json.loads(text))
                except ConnectionClosed:
                    pass
            close = socket.protocol.close_rcvd
        assert received[0] == {
            "type": "runtime",
            "language": "python",
            "version": received[0]["version"],
        }
        assert received[1] == {"type": "stage", "stage": "run"}
        stdout = "".join(
            m["data"] for m in received if m["type"] == "data" and m["stream"] == "stdout"
        )
        assert stdout == "HI\n"
        exits = [m for m in received if m["type"] == "exit"]
        assert exits[0]["stage"] == "run"
        assert exits[0]["code"] == 0
        assert close is not None
        assert close.code == 4999  # Piston's "Job Completed", passed through

    async def test_a_signal_reaches_the_job(self, gateway: tuple[Service, str]) -> None:
        service, key = gateway
        init = {**INIT, "files": [{"content": "while True: pass"}]}
        received: list[dict[str, Any]] = []
        async with connect(_ws(service, f"?api_key={key}"), proxy=None) as socket:
            await socket.send(json.dumps(init))
            async with asyncio.timeout(20):
                while not received or received[-1].get("type") != "stage":
                    received.append(json.loads(await socket.recv()))
                await socket.send(json.dumps({"type": "signal", "signal": "SIGKILL"}))
                try:
                    async for text in socket:
                        received.append(json.loads(text))
                except ConnectionClosed:
                    pass
        exits = [m for m in received if m["type"] == "exit"]
        assert exits[0]["signal"] == "SIGKILL"
