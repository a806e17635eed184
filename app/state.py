"""What the lifespan opens, hung on `app.state.gateway` as one typed state (routes reach it with
`app.api.deps.StateDep`).

No module-level singletons: every app (each test builds its own) carries its own clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from app.metrics import Metrics
from app.settings import Settings

if TYPE_CHECKING:
    from app.cache.flight import SingleFlight
    from app.cache.store import CacheStore
    from app.limits import AuthFailureLimiter, Gate, UpstreamSlots
    from app.pipeline import Plans
    from app.redis_outage import RedisOutage
    from app.tenancy.authenticator import Authenticator
    from app.tenancy.store import TenantStore
    from app.upstream.catalog import RuntimeCatalog
    from app.upstream.pool import PistonPool

__all__ = ["AppState", "get_state"]


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
    plans: Plans  # execute's plans of requests seen before (app.pipeline)
    # One outage state for every Redis user of the process, so that they all behave alike.
    outage: RedisOutage | None = None


def get_state(connection: HTTPConnection) -> AppState:
    state: AppState = connection.app.state.gateway
    return state
