"""WS /api/v2/connect through a real gateway process: the key, the init, then Piston's protocol."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.e2e.conftest import E2E_ADMIN_KEY
from tests.support import (
    RedisServer,
    Service,
    engine_jobs,
    mint_key,
    start_engine,
    start_gateway,
    ws_conversation,
)

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


class TestRefusedBeforeTheUpstream:
    async def test_no_key_is_1008(self, gateway: tuple[Service, str]) -> None:
        service, _ = gateway
        received, code = await ws_conversation(_ws(service), [INIT])
        assert code == 1008
        assert received == []

    async def test_unknown_key_is_1008(self, gateway: tuple[Service, str]) -> None:
        service, _ = gateway
        _, code = await ws_conversation(_ws(service, "?api_key=pgw_nope"), [INIT])
        assert code == 1008

    async def test_language_not_allowed(self, gateway: tuple[Service, str]) -> None:
        service, key = gateway
        init = {**INIT, "language": "bash", "files": [{"content": "echo hi"}]}
        received, code = await ws_conversation(_ws(service, f"?api_key={key}"), [init])
        assert code == 4002
        assert received == [
            {"type": "error", "message": "language 'bash' is not allowed for this key"}
        ]

    async def test_unknown_runtime(self, gateway: tuple[Service, str]) -> None:
        service, key = gateway
        init = {**INIT, "language": "cobol", "files": [{"content": "x"}]}
        received, code = await ws_conversation(
            _ws(service), [init], headers={"Authorization": f"Bearer {key}"}
        )
        assert code == 4002
        assert received == [{"type": "error", "message": "cobol-* runtime is unknown"}]

    async def test_limit_over_the_cap(self, gateway: tuple[Service, str]) -> None:
        service, key = gateway
        init = {**INIT, "files": [{"content": "x"}], "run_timeout": 10**6}
        received, code = await ws_conversation(_ws(service, f"?api_key={key}"), [init])
        assert code == 4002
        assert received[0]["message"] == "run_timeout cannot exceed the configured limit of 3000"

    async def test_no_init_in_time(self, gateway: tuple[Service, str]) -> None:
        service, key = gateway
        _, code = await ws_conversation(_ws(service, f"?api_key={key}"), [])
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


PRINT_ONE = {**INIT, "files": [{"content": "print(1)"}]}


def _stdout(received: list[dict[str, Any]]) -> str:
    return "".join(m["data"] for m in received if m["type"] == "data" and m["stream"] == "stdout")


def _rss_bytes(service: Service) -> int:
    assert service.proc is not None
    status = Path(f"/proc/{service.proc.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


class TestBinaryFrames:
    """Piston reads a binary frame as the same JSON text as a text frame."""

    async def test_a_binary_init_runs(self, gateway: tuple[Service, str]) -> None:
        service, key = gateway
        received, code = await ws_conversation(
            _ws(service, f"?api_key={key}"), [json.dumps(PRINT_ONE).encode()]
        )
        assert received[0]["type"] == "runtime"
        assert _stdout(received) == "1\n"
        assert code == 4999

    async def test_binary_stdin_after_init_reaches_the_job(
        self, gateway: tuple[Service, str]
    ) -> None:
        # Before: the binary frame closed the socket 1000 and the job died silently.
        service, key = gateway
        init = {**INIT, "files": [{"content": "print(input().upper())"}]}
        stdin = json.dumps({"type": "data", "stream": "stdin", "data": "hi\n"}).encode()
        received, code = await ws_conversation(_ws(service, f"?api_key={key}"), [init, stdin])
        assert _stdout(received) == "HI\n"
        assert code == 4999

    async def test_a_binary_init_that_is_not_utf8_is_told_why(
        self, gateway: tuple[Service, str]
    ) -> None:
        # Before: closed 4002 with no error message.
        service, key = gateway
        received, code = await ws_conversation(_ws(service, f"?api_key={key}"), [b"\xff\xfe{"])
        assert received == [
            {
                "type": "error",
                "message": "a binary message must hold the same UTF-8 JSON text as a text message",
            }
        ]
        assert code == 4002

    async def test_an_init_that_is_not_json_is_told_why(self, gateway: tuple[Service, str]) -> None:
        service, key = gateway
        received, code = await ws_conversation(_ws(service, f"?api_key={key}"), ["{nope"])
        assert received == [{"type": "error", "message": "the init message must be a JSON object"}]
        assert code == 4002


class TestMessageSize:
    """Every message, the init included, is held to GATEWAY_MAX_BODY_BYTES (64 KiB here)."""

    async def test_an_init_over_the_body_bound_never_runs(
        self, gateway: tuple[Service, str], engine: Service
    ) -> None:
        # Before: a 500 KB file that execute refuses with 413 ran through connect.
        service, key = gateway
        jobs = engine_jobs(engine)
        init = {**INIT, "files": [{"content": "#" + "x" * 500_000}]}
        received, code = await ws_conversation(_ws(service, f"?api_key={key}"), [init])
        assert received == []
        assert code == 1009
        assert engine_jobs(engine) == jobs

    async def test_a_message_over_the_bound_after_init_ends_the_job(
        self, gateway: tuple[Service, str]
    ) -> None:
        service, key = gateway
        init = {**INIT, "files": [{"content": "import time; time.sleep(2)"}]}
        data = {"type": "data", "stream": "stdin", "data": "x" * 100_000}
        received, code = await ws_conversation(_ws(service, f"?api_key={key}"), [init, data])
        assert code == 1009
        assert not [m for m in received if m["type"] == "exit"]

    async def test_a_20_mib_frame_is_closed_without_a_traceback(
        self, gateway: tuple[Service, str]
    ) -> None:
        # Before: `Unexpected ASGI message 'websocket.close', after sending 'websocket.close'`
        # with a traceback in the log (the route closed a socket already closed).
        service, key = gateway
        sleeper = {**INIT, "files": [{"content": "import time; time.sleep(2)"}]}
        batches: list[list[dict[str, Any] | str | bytes]] = [
            ["x" * (20 << 20)],
            [sleeper, b"x" * (20 << 20)],
        ]
        for messages in batches:
            _, code = await ws_conversation(_ws(service, f"?api_key={key}"), messages)
            assert code == 1009
        assert (await ws_conversation(_ws(service, f"?api_key={key}"), [PRINT_ONE]))[1] == 4999
        log = service.log()
        assert "Traceback" not in log
        assert "Unexpected ASGI message" not in log


@pytest.fixture
def one_slot_gateway(redis_server: RedisServer, engine: Service) -> Iterator[tuple[Service, str]]:
    """A gateway process that runs one execution at a time (others wait in its queue)."""
    redis.Redis.from_url(redis_server.url).flushall()
    service = start_gateway(
        redis_url=redis_server.url,
        piston_url=engine.url,
        admin_key=E2E_ADMIN_KEY,
        env={"GATEWAY_MAX_CONCURRENCY": "1"},
    )
    key = mint_key(service, E2E_ADMIN_KEY, "flood", rate_limit="1000/minute")
    yield service, key
    service.stop()


class TestPendingStdin:
    async def test_a_flood_while_waiting_for_a_slot_is_closed_1009(
        self, one_slot_gateway: tuple[Service, str]
    ) -> None:
        """Before: nothing bounded the wait (the 1 MB messages of one socket took the gateway
        to 282 MB); now past 1 MiB of pending stdin the socket is told why and closed 1009,
        and the gateway's memory is back near where it was."""
        service, key = one_slot_gateway
        url = _ws(service, f"?api_key={key}")
        sleeper = {**INIT, "files": [{"content": "import time; time.sleep(2.5)"}]}
        chunk = json.dumps({"type": "data", "stream": "stdin", "data": "x" * 60_000})
        rss_before = _rss_bytes(service)
        async with connect(url, proxy=None) as holder:
            await holder.send(json.dumps(sleeper))
            assert json.loads(await holder.recv())["type"] == "runtime"  # holds the one slot
            received: list[dict[str, Any]] = []
            sent = 0
            async with connect(url, proxy=None) as flooder:
                await flooder.send(json.dumps(sleeper))  # waits for the slot
                try:
                    async with asyncio.timeout(10):
                        while sent < 8 << 20:  # 8 MiB at most: the bound is 1 MiB
                            await flooder.send(chunk)
                            sent += len(chunk)
                        async for text in flooder:
                            received.append(json.loads(text))
                except ConnectionClosed:
                    pass
                close = flooder.protocol.close_rcvd
        assert close is not None
        assert close.code == 1009
        assert [m for m in received if m["type"] == "error"] == [
            {
                "type": "error",
                "message": "more than 1048576 bytes of stdin are waiting for the job "
                "(GATEWAY_WS_MAX_PENDING_STDIN_BYTES); send it as the program reads it",
            }
        ]
        assert _rss_bytes(service) - rss_before < 32 << 20


class TestUsage:
    async def test_an_upstream_that_dies_mid_run_counts_as_an_error(
        self, redis_server: RedisServer
    ) -> None:
        """Before: the 1011 of an upstream gone mid-way was counted as a successful run."""
        own_engine = start_engine()
        service = start_gateway(
            redis_url=redis_server.url, piston_url=own_engine.url, admin_key=E2E_ADMIN_KEY
        )
        try:
            key = mint_key(service, E2E_ADMIN_KEY, "dies", rate_limit="1000/minute")
            init = {**INIT, "files": [{"content": "import time; time.sleep(2.5)"}]}
            async with connect(_ws(service, f"?api_key={key}"), proxy=None) as socket:
                await socket.send(json.dumps(init))
                async with asyncio.timeout(20):
                    while json.loads(await socket.recv()).get("type") != "stage":
                        pass
                    assert own_engine.proc is not None
                    os.kill(own_engine.proc.pid, signal.SIGKILL)
                    with contextlib.suppress(ConnectionClosed):
                        async for _ in socket:
                            pass
                close = socket.protocol.close_rcvd
            assert close is not None
            assert close.code == 1011
            async with httpx.AsyncClient(timeout=10) as client:
                answer = await client.get(
                    f"{service.url}/admin/tenants/dies/usage",
                    headers={"Authorization": f"Bearer {E2E_ADMIN_KEY}"},
                )
            usage = answer.json()
            today = usage["days"][0]
            assert (today["executions"], today["errors"]) == (1, 1)
        finally:
            service.stop()
            own_engine.stop()


class TestInitTimeout:
    async def test_sockets_that_never_init_are_closed_at_one_second(
        self, gateway: tuple[Service, str]
    ) -> None:
        """Piston's timer runs from the connection. Before: it started after the key check, so
        under load silent sockets were closed after 2.4-3 s instead of 1 s."""
        service, key = gateway
        url = _ws(service, f"?api_key={key}")

        async def silent() -> tuple[int | None, float]:
            loop = asyncio.get_running_loop()
            async with connect(url, proxy=None) as socket:
                opened = loop.time()
                with contextlib.suppress(ConnectionClosed):
                    async with asyncio.timeout(10):
                        await socket.recv()
                close = socket.protocol.close_rcvd
                return (close.code if close else None), loop.time() - opened

        closes = await asyncio.gather(*(silent() for _ in range(40)))
        assert [code for code, _ in closes] == [4001] * 40
        slowest = max(took for _, took in closes)
        assert slowest < 1.5, f"the slowest silent socket was closed after {slowest:.2f} s"


class TestClientLeaves:
    async def test_a_client_gone_mid_output_leaves_no_traceback(
        self, gateway: tuple[Service, str]
    ) -> None:
        service, key = gateway
        url = _ws(service, f"?api_key={key}")
        chatty = {**INIT, "files": [{"content": "while True: print('x' * 1000, flush=True)"}]}
        for _ in range(3):
            socket = await connect(url, proxy=None)
            await socket.send(json.dumps(chatty))
            async with asyncio.timeout(20):
                while json.loads(await socket.recv()).get("type") != "data":
                    pass
            socket.transport.abort()  # gone without a close handshake, output still coming
        assert (await ws_conversation(url, [PRINT_ONE]))[1] == 4999
        assert "Traceback" not in service.log()
