"""create_app(settings): the gateway app, and the lifespan that opens and closes every client."""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp

from app import __version__
from app.api import ROUTERS
from app.api.deps import authorize, is_served_directly
from app.cache.flight import SingleFlight
from app.cache.store import create_cache_store
from app.clock import SYSTEM_CLOCK, Clock
from app.errors import install_error_handlers
from app.limits import AuthFailureLimiter, UpstreamSlots, create_gate
from app.logging import configure_logging
from app.metrics import Metrics
from app.middleware import (
    DirectRoutes,
    LiveOriginsCORSMiddleware,
    RequestContextMiddleware,
    UnexpectedErrorMiddleware,
    direct_route_app,
)
from app.pipeline import Plans
from app.redis import open_redis
from app.redis_outage import RedisOutage
from app.redis_pipeline import PipelinedRedis
from app.settings import Settings
from app.state import AppState
from app.tenancy.authenticator import Authenticator
from app.tenancy.origins import request_origin
from app.tenancy.store import create_store
from app.upstream.catalog import RuntimeCatalog
from app.upstream.pool import PistonPool

__all__ = ["create_app"]

_LOGGING_FLAG = "PGW_JSON_LOGS"

log = structlog.get_logger(__name__)

EXPOSED_HEADERS = [
    "X-Request-ID",
    "X-Cache",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "RateLimit-Policy",
    "RateLimit",
    "Retry-After",
]

DESCRIPTION = """
A gateway in front of [Piston](https://github.com/engineer-man/piston) that speaks Piston's own
v2 API and adds API keys, tenants with language allow-lists and caps, rate limits that hold
across replicas, daily quotas and a result cache.

Present a key as `Authorization: Bearer <key>`, `X-API-Key: <key>`, or a bare
`Authorization: <key>`. Every error is `{"message": "..."}`.
"""


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    redis = open_redis(str(settings.redis_url), name="pgw-gateway") if settings.redis_url else None
    if redis is None:
        log.warning(
            "no_redis",
            detail="GATEWAY_REDIS_URL is unset: tenants, keys, limits and the cache live in this"
            " process only. Fine for one process in development; set it for anything else.",
        )
    pool = PistonPool(
        [str(url) for url in settings.piston_urls],
        connect_timeout=settings.upstream_connect_timeout_ms / 1000,
        health_seconds=settings.health_check_seconds,
        discovery_seconds=settings.discovery_seconds,
        metrics=metrics,
        transport=app.state.upstream_transport,
    )
    # The two script calls of every request (admit, finish) on one pipelined connection: the
    # hot path's Redis client (app/redis_pipeline.py, README "Benchmarks"). Through Sentinel the
    # master can move, which that client does not follow: redis-py serves everything then.
    scripts = (
        PipelinedRedis(str(settings.redis_url), client_name="pgw-gateway-hot")
        if redis is not None and not settings.redis_sentinels
        else None
    )
    outage = RedisOutage(redis)
    cache = create_cache_store(redis, outage=outage)
    store = create_store(redis, outage=outage)
    authenticator = Authenticator(
        store,
        admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None,
        redis=redis,
        cache_seconds=settings.key_cache_seconds,
        outage=outage,
        outage_seconds=settings.key_cache_outage_seconds,
        clock=app.state.clock,
    )
    catalog = RuntimeCatalog(pool)
    state = AppState(
        settings=settings,
        metrics=metrics,
        redis=redis,
        pool=pool,
        catalog=catalog,
        store=store,
        authenticator=authenticator,
        gate=create_gate(
            redis, settings=settings, metrics=metrics, outage=outage, cache=cache, scripts=scripts
        ),
        cache=cache,
        slots=UpstreamSlots(
            settings.max_concurrency,
            max_queue=settings.max_queue,
            queue_timeout_ms=settings.queue_timeout_ms,
            metrics=metrics,
        ),
        flights=SingleFlight(redis, metrics=metrics),
        auth_failures=AuthFailureLimiter(settings=settings, redis=redis, outage=outage),
        extras={},
        plans=Plans(settings, catalog),
        outage=outage,
    )
    app.state.gateway = state
    await pool.start()
    await authenticator.start()
    await state.flights.start()
    for on_started in getattr(app.state, "on_started", ()):
        await on_started(state)
    log.info(
        "gateway_started",
        upstreams=[u.url for u in pool.upstreams],
        healthy=sum(u.healthy for u in pool.upstreams),
        redis=bool(redis),
    )
    # Everything alive now (settings, clients, the app) lives as long as the process: moving it
    # out of the collector's generations keeps full collections short (85-100 ms under load).
    gc.freeze()
    metrics.watch_gc()
    try:
        yield
    finally:
        metrics.close()
        await state.flights.close()
        await authenticator.close()
        await state.auth_failures.close()
        await outage.close()
        await pool.close()
        if scripts is not None:
            await scripts.aclose()
        if redis is not None:
            await redis.aclose()


def _document_key_schemes(app: FastAPI) -> None:
    """Both ways of presenting a key, on every route unless it says `security: []`."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Authorization: Bearer pgw_...",
                },
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }
            schema["security"] = [{"bearer": []}, {"apiKey": []}]
            # Validation errors are answered 400 {"message"}; FastAPI's 422 never happens.
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                schema["components"].get("schemas", {}).pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _serve_directly(app: FastAPI) -> None:
    """The routes marked `served_directly` skip FastAPI's routing, in the app's own middleware.

    Built when the app builds its stack (at its first request), so middleware and handlers
    added until then are all in: the same list, around each route, a second time.
    """
    build_full = app.build_middleware_stack

    def build() -> ASGIApp:
        # Exception (and 500) go to Starlette's outermost ServerErrorMiddleware there; here
        # UnexpectedErrorMiddleware answers them, as it does first on the full stack too.
        handlers = {
            cls: handler
            for cls, handler in app.exception_handlers.items()
            if isinstance(cls, type) and cls is not Exception
        }
        direct: dict[tuple[str, str], ASGIApp] = {}
        for router in ROUTERS:
            for route in router.routes:
                if not is_served_directly(route):
                    continue
                assert isinstance(route, APIRoute)
                served = direct_route_app(route, authorize, handlers)
                for cls, args, kwargs in reversed(app.user_middleware):
                    served = cls(served, *args, **kwargs)
                for method in route.methods or ():
                    direct[(method, route.path)] = served
        return DirectRoutes(build_full(), direct)

    app.build_middleware_stack = build  # type: ignore[method-assign]


def create_app(
    settings: Settings | None = None,
    *,
    upstream_transport: Any | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> FastAPI:
    """Build the gateway. `upstream_transport` lets fault tests put a fake Piston behind it;
    `clock` lets tests move the time keys and browser keys expire by."""
    settings = settings or Settings()
    if os.environ.get(_LOGGING_FLAG):
        # Set by `serve` so that each worker process (a fresh interpreter) logs JSON too; tests
        # leave logging alone so pytest can capture it.
        configure_logging(settings.log_level)
    metrics = Metrics()
    app = FastAPIOffline(
        title="piston-gateway",
        version=__version__,
        description=DESCRIPTION,
        lifespan=_lifespan,
        redirect_slashes=False,
        # FastAPI's native OpenTelemetry asks the global providers on every request whether it
        # is on; the gateway exports Prometheus metrics instead (app.metrics).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.upstream_transport = upstream_transport
    app.state.clock = clock
    install_error_handlers(app)

    for router in ROUTERS:
        app.include_router(router)

    _document_key_schemes(app)
    # Added innermost first: errors -> CORS -> request context (outermost), so that every
    # answer, a 500 included, carries X-Request-ID and the CORS headers.
    app.add_middleware(UnexpectedErrorMiddleware)

    def live_origin(origin: str) -> bool:
        # A browser key's origin, live now (minted, not revoked, not expired) on any replica.
        state: AppState | None = getattr(app.state, "gateway", None)
        return state is not None and state.authenticator.origins.allows(
            request_origin(origin), clock.wall()
        )

    # Always installed: a browser key minted at any time needs its preflights answered.
    app.add_middleware(
        LiveOriginsCORSMiddleware,
        live=live_origin,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
        allow_headers=[
            "Authorization",
            "X-API-Key",
            "Content-Type",
            "Cache-Control",
            "X-Request-ID",
        ],
        expose_headers=EXPOSED_HEADERS,
        max_age=600,
    )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout_seconds,
    )
    _serve_directly(app)
    return app
