"""What the lifespan opens, hung on `app.state.gateway`, and the Annotated accessors routes use.

No module-level singletons: every app (each test builds its own) carries its own clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from app.metrics import Metrics
from app.settings import Settings

if TYPE_CHECKING:
    from app.cache.flight import SingleFlight
    from app.cache.store import CacheStore
    from app.limits import AuthFailureLimiter, Gate, UpstreamSlots
    from app.redis_outage import RedisOutage
    from app.tenancy.authenticator import Authenticator
    from app.tenancy.store import TenantStore
    from app.upstream.catalog import RuntimeCatalog
    from app.upstream.pool import PistonPool

__all__ = ["AppState", "StateDep", "get_state"]


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    redis: Redis | None
    pool: PistonPool
    catalog: RuntimeCatalog
    store: TenantStore
    authenticator: Authenticator
    gate: Gate
    cache: CacheStore
    slots: UpstreamSlots
    flights: SingleFlight
    auth_failures: AuthFailureLimiter
    extras: dict[str, Any]
    # One outage state for every Redis user of the process, so that they all behave alike.
    outage: RedisOutage | None = None


def get_state(connection: HTTPConnection) -> AppState:
    state: AppState = connection.app.state.gateway
    return state


async def _state_dependency(request: Request) -> AppState:
    # async on purpose: FastAPI runs a plain `def` dependency in a thread pool, a thread hop
    # per request on the hot path.
    return get_state(request)


StateDep = Annotated[AppState, Depends(_state_dependency)]
