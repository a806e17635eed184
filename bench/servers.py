"""The servers the benchmark measures against: the floor and an instant upstream.

Both are plain ASGI apps run by the same uvicorn settings as the gateway, so the only difference
between a figure and its floor is the code under test.
"""

from __future__ import annotations

import asyncio
import os

import orjson
from fastapi import FastAPI
from starlette.responses import Response

# A fixed Piston answer: what the instant upstream returns and what the floor serves.
ANSWER = orjson.dumps(
    {
        "language": "python",
        "version": "3.11.2",
        "run": {
            "stdout": "42\n",
            "stderr": "",
            "output": "42\n",
            "code": 0,
            "signal": None,
            "message": None,
            "status": None,
            "cpu_time": 9,
            "wall_time": 21,
            "memory": 8_192_000,
        },
    }
)
RUNTIMES = orjson.dumps(
    [{"language": "python", "version": "3.11.2", "aliases": ["py", "py3", "python3"]}]
)


def floor_app() -> FastAPI:
    """A bare FastAPI endpoint returning the same bytes: the least any Python server can do."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/api/v2/execute")
    async def execute() -> Response:
        return Response(ANSWER, media_type="application/json")

    return app


def instant_upstream_app() -> FastAPI:
    """A Piston that answers at once (or after BENCH_UPSTREAM_DELAY_MS) and counts executions."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    delay = float(os.environ.get("BENCH_UPSTREAM_DELAY_MS", "0")) / 1000
    executions = 0

    @app.get("/api/v2/runtimes")
    async def runtimes() -> Response:
        return Response(RUNTIMES, media_type="application/json")

    @app.post("/api/v2/execute")
    async def execute() -> Response:
        nonlocal executions
        executions += 1
        if delay:
            await asyncio.sleep(delay)
        return Response(ANSWER, media_type="application/json")

    @app.get("/count")
    async def count() -> Response:
        return Response(str(executions))

    return app


def naive_floor_app() -> FastAPI:
    """The naive one-round-trip service: FastAPI and one redis-py EVALSHA of `return 1` per
    request (the issue's second floor: a gateway with a Redis call per hit cannot do better
    with the stock client, so the hit path is measured against it too)."""
    from contextlib import asynccontextmanager
    from typing import Any

    from redis.asyncio import Redis

    clients: list[Any] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        client = Redis.from_url(os.environ["BENCH_REDIS_URL"])
        clients.append(client.register_script("return 1"))
        await clients[0]()
        yield
        await client.aclose()

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.post("/api/v2/execute")
    async def execute() -> Response:
        await clients[0]()
        return Response(ANSWER, media_type="application/json")

    @app.get("/ready")
    async def ready() -> Response:
        return Response(b"ok")

    return app
