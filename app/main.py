"""create_app(settings): the gateway app, and the lifespan that opens and closes every client."""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import hiredis
import structlog
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from redis.asyncio import Connection, ConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedSSLConnection
from redis.backoff import NoBackoff

from app import __version__
from app.cache import SingleFlight
from app.errors import install_error_handlers
from app.http import LiveOriginsCORSMiddleware, RequestContextMiddleware, UnexpectedErrorMiddleware
from app.limits import AuthFailureLimiter, UpstreamSlots, create_gate
from app.logging import configure_logging
from app.metrics import Metrics
from app.piston.client import PistonPool
from app.piston.runtimes import RuntimeCatalog
from app.redis_outage import RedisOutage
from app.settings import RedisSentinelSettings, Settings, sentinel_address
from app.state import AppState
from app.tenancy.auth import Authenticator
from app.tenancy.origins import request_origin
from app.tenancy.store import create_store

__all__ = ["create_app", "open_redis"]

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


class _HiredisPackingConnection(Connection):
    """redis-py's asyncio connection packs commands in Python (its sync one uses hiredis):
    a fifth of a cache hit's CPU went to packing the gate's script call (bench/, cProfile)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        command = args[0]
        if isinstance(command, str) and " " in command:  # "SCRIPT LOAD": words go separately
            args = (*command.split(), *args[1:])
        return [hiredis.pack_command(args)]


class _SentinelRedis(Redis):
    """A client of the Sentinel's current master that also closes its connections to the
    sentinels when it is closed (redis-py leaves those open)."""

    sentinels: list[Redis]

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in self.sentinels:
            await sentinel.aclose()


def open_redis(
    url: str,
    *,
    name: str,
    sentinels: Sequence[str] | None = None,
    sentinel_master: str | None = None,
    sentinel_password: str | None = None,
) -> Redis:
    """One pool per process, short timeouts so an outage is answered quickly, never hung on.

    With Redis Sentinel (`sentinels` as `host:port`, or GATEWAY_REDIS_SENTINELS when the caller
    passes none) the pool asks the sentinels for the current master of `sentinel_master` and
    follows a failover; `url` then gives only the database, the master's credentials and TLS.
    """
    timeouts: dict[str, Any] = {
        "socket_connect_timeout": 0.5,
        "socket_timeout": 1.0,
        "health_check_interval": 15,
        "retry": Retry(NoBackoff(), 1),
        "client_name": f"{name}-{os.getpid()}",
    }
    if sentinels is None:
        from_env = RedisSentinelSettings()
        sentinels = from_env.redis_sentinels
        sentinel_master = sentinel_master or from_env.redis_sentinel_master
        if sentinel_password is None and from_env.redis_sentinel_password is not None:
            sentinel_password = from_env.redis_sentinel_password.get_secret_value()
    if sentinels:
        target = parse_url(url)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            [sentinel_address(entry) for entry in sentinels],
            sentinel_kwargs={
                "password": sentinel_password,
                "socket_connect_timeout": 0.5,
                "socket_timeout": 1.0,
            },
        )
        if url.startswith("rediss"):
            timeouts["connection_class"] = SentinelManagedSSLConnection
        client: _SentinelRedis = sentinel.master_for(
            sentinel_master or "mymaster",
            redis_class=_SentinelRedis,
            db=target.get("db", 0),
            username=target.get("username"),
            password=target.get("password"),
            max_connections=2048,
            **timeouts,
        )
        client.sentinels = list(sentinel.sentinels)
        return client
    # A plain pool: BlockingConnectionPool's condition and timeout per command cost a fifth of
    # a Redis call's CPU (bench/, cProfile); a ceiling this high is not reached in practice.
    fast = {"connection_class": _HiredisPackingConnection} if url.startswith("redis://") else {}
    pool = ConnectionPool.from_url(url, **fast, max_connections=2048, **timeouts)
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes both


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
    outage = RedisOutage(redis)
    store = create_store(redis, outage=outage)
    authenticator = Authenticator(
        store,
        admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None,
        redis=redis,
        cache_seconds=settings.key_cache_seconds,
        outage=outage,
        outage_seconds=settings.key_cache_outage_seconds,
    )
    state = AppState(
        settings=settings,
        metrics=metrics,
        redis=redis,
        pool=pool,
        catalog=RuntimeCatalog(pool),
        store=store,
        authenticator=authenticator,
        gate=create_gate(redis, settings=settings, metrics=metrics, outage=outage),
        slots=UpstreamSlots(
            settings.max_concurrency,
            max_queue=settings.max_queue,
            queue_timeout_ms=settings.queue_timeout_ms,
            metrics=metrics,
        ),
        flights=SingleFlight(redis, metrics=metrics),
        auth_failures=AuthFailureLimiter(
            settings=settings, redis_url=settings.redis_url, outage=outage
        ),
        extras={},
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
    try:
        yield
    finally:
        metrics.close()
        await state.flights.close()
        await authenticator.close()
        await state.auth_failures.close()
        await outage.close()
        await pool.close()
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


def create_app(
    settings: Settings | None = None, *, upstream_transport: Any | None = None
) -> FastAPI:
    """Build the gateway. `upstream_transport` lets fault tests put a fake Piston behind it."""
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
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.upstream_transport = upstream_transport
    install_error_handlers(app)

    from app.api import admin, batch, ops, piston  # routers only; they import the modules above

    app.include_router(piston.router)
    app.include_router(admin.router)
    app.include_router(ops.router)
    app.include_router(batch.router)

    _document_key_schemes(app)
    # Added innermost first: errors -> CORS -> request context (outermost), so that every
    # answer, a 500 included, carries X-Request-ID and the CORS headers.
    app.add_middleware(UnexpectedErrorMiddleware)

    def live_origin(origin: str) -> bool:
        # A browser key's origin, live now (minted, not revoked, not expired) on any replica.
        state: AppState | None = getattr(app.state, "gateway", None)
        return state is not None and state.authenticator.origins.allows(request_origin(origin))

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
    return app
