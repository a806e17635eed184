"""A fake Piston for the faults a real one can't produce on demand: 5xx, garbage, a hang.

It is a real HTTP server (uvicorn on a free loopback port), so timeouts and refused connections
behave as they do in production; only its answers are scripted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support import free_port

OK_ANSWER: dict[str, Any] = {
    "language": "python",
    "version": "3.12.0",
    "run": {
        "stdout": "hi\n",
        "stderr": "",
        "output": "hi\n",
        "code": 0,
        "signal": None,
        "message": None,
        "status": None,
        "cpu_time": 8,
        "wall_time": 20,
        "memory": 1000,
    },
}


@dataclass
class FakePiston:
    mode: str = "ok"
    delay: float = 0.0
    port: int = field(default_factory=free_port)
    executions: int = 0
    bodies: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _runtimes(self, request: Request) -> Response:
        data = [{"language": "python", "version": "3.12.0", "aliases": ["py", "python3"]}]
        return Response(orjson.dumps(data), media_type="application/json")

    async def _execute(self, request: Request) -> Response:
        self.executions += 1
        self.bodies.append(orjson.loads(await request.body()))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "500":
            return Response(b"Internal Server Error", status_code=500)
        if self.mode == "garbage":
            return Response(b"<html>oops", status_code=200, media_type="text/html")
        if self.mode == "no-run":
            return Response(b'{"language": "python"}', media_type="application/json")
        if self.mode == "400-message":
            return Response(
                b'{"message": "run_timeout cannot exceed the configured limit of 3000"}',
                status_code=400,
                media_type="application/json",
            )
        if self.mode == "413-trace":
            return Response(
                b"PayloadTooLargeError: request entity too large\n    at readStream "
                b"(/piston_api/node_modules/raw-body/index.js:155:17)",
                status_code=413,
                media_type="text/html",
            )
        return Response(orjson.dumps(OK_ANSWER), media_type="application/json")

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/api/v2/runtimes", self._runtimes),
                Route("/api/v2/execute", self._execute, methods=["POST"]),
            ]
        )


@contextlib.asynccontextmanager
async def serve_fake(fake: FakePiston) -> AsyncIterator[FakePiston]:
    config = uvicorn.Config(
        fake.app(),
        host="127.0.0.1",
        port=fake.port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110  # uvicorn offers no event for this
        await asyncio.sleep(0.01)
    try:
        yield fake
    finally:
        server.should_exit = True
        server.force_exit = True  # a hung handler must not hold the test's teardown
        await task
