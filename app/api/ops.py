"""Operations, no key needed: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.responses import Response

from app.api.deps import AppState, StateDep
from app.middleware import json_response

__all__ = ["router"]

router = APIRouter(tags=["operations"])
_NO_KEY: dict[str, Any] = {"security": []}


@router.get("/healthz", openapi_extra=_NO_KEY)
async def healthz() -> Response:
    """200 while the process serves."""
    return json_response({"status": "ok"})


async def _redis_status(state: AppState) -> dict[str, Any]:
    if state.redis is None:
        return {"ok": True, "configured": False}
    started = time.perf_counter()
    try:
        await asyncio.wait_for(state.redis.ping(), timeout=1.0)
    except (RedisError, OSError, TimeoutError) as exc:
        return {"ok": False, "configured": True, "error": type(exc).__name__}
    return {"ok": True, "configured": True, "ms": round((time.perf_counter() - started) * 1000, 2)}


@router.get(
    "/readyz",
    openapi_extra=_NO_KEY,
    responses={503: {"description": "Redis or every upstream is unavailable"}},
)
async def readyz(state: StateDep) -> Response:
    """200 when Redis (if configured) answers and at least one upstream is healthy."""
    redis = await _redis_status(state)
    upstreams = [upstream.status() for upstream in state.pool.upstreams]
    ready = redis["ok"] and any(u["healthy"] for u in upstreams)
    body = {"status": "ok" if ready else "unavailable", "redis": redis, "upstreams": upstreams}
    return json_response(body, status_code=200 if ready else 503)


@router.get("/metrics", openapi_extra=_NO_KEY, response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Prometheus text format, families prefixed `pgw_`."""
    state.metrics.record_gc()
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
