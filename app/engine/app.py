"""The engine's face: Piston's v2 API and its WebSocket, answered the way Piston answers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app.engine.config import EngineSettings
from app.engine.connect import connect
from app.engine.jobs import Engine
from app.errors import (
    BadRequest,
    NotImplementedByEngine,
    PayloadTooLarge,
    UnsupportedMediaType,
    install_error_handlers,
    message_responses,
)
from app.piston.schemas import parse_execute

__all__ = ["create_app"]


def _json(data: Any) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]


async def _json_body(request: Request) -> object:
    """Piston's rule for POST/DELETE bodies: JSON or 415, then parseable or 400."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise UnsupportedMediaType()
    limit = get_engine(request).settings.max_body_bytes
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # counted as it arrives: a body past the limit is never held whole
            raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None


async def list_runtimes(engine: EngineDep) -> Response:
    """The runtimes this host can run, in Piston's shape."""
    return _json([runtime.as_json() for runtime in engine.catalog])


async def list_packages(engine: EngineDep) -> Response:
    """Every host runtime as an installed package."""
    return _json(
        [
            {"language": rt.language, "language_version": rt.version, "installed": True}
            for rt in engine.catalog
        ]
    )


async def change_packages(request: Request) -> Response:
    """Not supported: the engine runs the host's runtimes and installs nothing."""
    await _json_body(request)
    raise NotImplementedByEngine(
        "the embedded engine does not install packages: it runs the runtimes installed on its host"
    )


async def execute(request: Request, engine: EngineDep) -> Response:
    """Run a job: compile if the language needs it, then run; Piston's answer."""
    body = await _json_body(request)
    job = parse_execute(body)
    return _json(await engine.execute(job))


async def metrics(engine: EngineDep) -> Response:
    """Prometheus text: jobs by status, executions, slots in use and waiting."""
    return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _route(
    app: FastAPI,
    path: str,
    endpoint: Callable[..., Awaitable[Response]],
    methods: list[str],
    errors: tuple[int, ...] = (),
) -> None:
    # Piston clients such as aiopyston call `execute/` and `runtimes/`: both spellings answer,
    # without a redirect.
    responses = message_responses(*errors) if errors else None
    app.add_api_route(path, endpoint, methods=methods, responses=responses)
    app.add_api_route(path + "/", endpoint, methods=methods, include_in_schema=False)


def create_app(settings: EngineSettings | None = None, engine: Engine | None = None) -> FastAPI:
    """The engine app; pass a prepared `engine` to skip discovery in the lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        current = engine or Engine(settings or EngineSettings())
        if engine is None:
            await current.prepare()
        current.pool.open()
        app.state.engine = current
        try:
            yield
        finally:
            current.close()

    app = FastAPI(
        title="piston-gateway engine",
        summary="Piston's v2 API over the host's interpreters, each job inside bubblewrap",
        lifespan=lifespan,
        redirect_slashes=False,
    )
    install_error_handlers(app)
    _route(app, "/api/v2/runtimes", list_runtimes, ["GET"])
    _route(app, "/api/v2/packages", list_packages, ["GET"])
    _route(app, "/api/v2/packages", change_packages, ["POST", "DELETE"], (415, 501))
    _route(app, "/api/v2/execute", execute, ["POST"], (400, 413, 415))
    _route(app, "/metrics", metrics, ["GET"])
    app.add_api_websocket_route("/api/v2/connect", connect)
    return app
