"""Piston's v2 API, served to keyed clients: execute, runtimes, packages.

Every path also answers with a trailing slash (aiopyston calls `execute/`), without a redirect.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request, WebSocket, WebSocketDisconnect
from starlette.responses import Response

from app.cache import CacheMode, cache_digest, cache_key, cache_mode
from app.errors import BadGateway, GatewayError, ServiceUnavailable, message_responses
from app.http import json_response, read_json_body
from app.limits import Admission, ClientLimit
from app.limits.slots import Reservation
from app.piston.client import UpstreamAnswer, upstream_error
from app.piston.connect import (
    ClientGone,
    Inbox,
    MessageRefused,
    RelayOutcome,
    close_client,
    notify_error,
    read_client,
    receive_message,
    relay,
    ws_url,
)
from app.piston.resolve import Runtime
from app.piston.schemas import (
    EXECUTE_REQUEST_SCHEMA,
    EXECUTE_RESPONSE_SCHEMA,
    ExecuteRequest,
    parse_execute,
)
from app.policy import effective_caps, effective_request, language_allowed
from app.settings import Settings
from app.state import AppState, StateDep, get_state
from app.tenancy.auth import (
    PrincipalDep,
    authorize,
    check_origin,
    client_limit,
    identify,
    require_scope,
)
from app.tenancy.keys import key_from_headers
from app.tenancy.models import Principal, Tenant

__all__ = ["router"]

router = APIRouter(prefix="/api/v2", tags=["piston"])

# Piston's own defaults, for the upstream deadline when a stage is left uncapped.
_PISTON_DEFAULT_MS = {"compile_timeout": 10_000, "run_timeout": 3_000}
_LEASE_SLACK_MS = 5_000


def _route(method: str, path: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
    """Register `path` and `path/`; only the first appears on the docs page."""

    def register(endpoint: Callable[..., Any]) -> Any:
        router.add_api_route(path, endpoint, methods=[method], **kwargs)
        slash_kwargs = {**kwargs, "include_in_schema": False}
        router.add_api_route(path + "/", endpoint, methods=[method], **slash_kwargs)
        return endpoint

    return register


def _stage_deadline_ms(limits: Mapping[str, int | None]) -> int:
    """How long Piston may take at most: both stages' timeouts (its defaults where unset)."""
    total = 0
    for name, default in _PISTON_DEFAULT_MS.items():
        value = limits.get(name)
        total += value if value is not None and value > 0 else default
    return total


async def _run_upstream(
    state: AppState,
    body: bytes,
    runtime: Runtime,
    *,
    deadline_s: float,
    reservation: Reservation | None = None,
) -> UpstreamAnswer:
    """One execution on an upstream, inside this process's cap on executions in flight."""
    async with state.slots.acquire(reservation):  # also keeps pgw_executions_in_flight
        return await state.pool.execute(body, runtime=runtime, read_timeout=deadline_s)


@dataclass(frozen=True, slots=True)
class _CachePlan:
    mode: CacheMode
    digest: str | None  # None: neither read nor written

    @property
    def key(self) -> str | None:
        return cache_key(self.digest) if self.digest else None

    @property
    def lookup_key(self) -> str | None:
        return self.key if self.mode.lookup else None


def _cache_plan(
    request: Request, settings: Settings, tenant: Tenant, effective: ExecuteRequest
) -> _CachePlan:
    mode = cache_mode(
        ttl_seconds=settings.cache_ttl_seconds,
        tenant_cache=tenant.cache,
        cache_control=", ".join(request.headers.getlist("cache-control")) or None,
    )
    if not mode.store:
        return _CachePlan(mode, None)
    scope = tenant.id if settings.cache_scope == "tenant" else None
    return _CachePlan(mode, cache_digest(effective, tenant_id=scope))


async def _execute_once(
    state: AppState,
    plan: _CachePlan,
    effective: ExecuteRequest,
    runtime: Runtime,
    *,
    deadline_ms: int,
    lock_ttl_ms: int,
    reservation: Reservation | None = None,
) -> UpstreamAnswer | bytes:
    """Run upstream; identical requests in flight share one run (and its stored answer)."""
    settings = state.settings
    forward = orjson.dumps(effective.as_json())
    deadline_s = deadline_ms / 1000

    async def run() -> UpstreamAnswer:
        return await _run_upstream(
            state, forward, runtime, deadline_s=deadline_s, reservation=reservation
        )

    key = plan.key
    if plan.digest is None or key is None:
        return await run()

    async def store(answer: UpstreamAnswer) -> None:
        if answer.cacheable:
            await state.gate.store(key, answer.body, settings.cache_ttl_seconds)

    return await state.flights.run(
        plan.digest,
        deadline_s=deadline_s + settings.queue_timeout_ms / 1000,
        lock_ttl_ms=lock_ttl_ms,  # like the lease: a wait for a slot, then the run
        execute=run,
        # no-cache asks for a fresh run: don't let the flight fall back on the entry.
        read_cached=(lambda: state.gate.read(key)) if plan.mode.lookup else None,
        on_result=store,
    )


def _effective(state: AppState, tenant: Tenant, body: object) -> tuple[Runtime, ExecuteRequest]:
    """parse -> resolve -> policy: the request as it will run (400/403/503 on the way)."""
    settings = state.settings
    parsed = parse_execute(body, max_files=settings.max_files)
    runtime = state.catalog.resolve(parsed.language, parsed.version)
    effective = effective_request(
        tenant,
        parsed,
        runtime,
        global_languages=settings.allowed_languages,
        caps=effective_caps(tenant, settings),
    )
    return runtime, effective


def _timing(settings: Settings, effective: ExecuteRequest) -> tuple[int, int]:
    """The upstream deadline, and the lease that must outlive a wait for a slot plus the run."""
    deadline_ms = _stage_deadline_ms(effective.limits) + settings.upstream_grace_ms
    return deadline_ms, deadline_ms + settings.queue_timeout_ms + _LEASE_SLACK_MS


def _answer(
    state: AppState,
    admission: Admission,
    body: bytes,
    *,
    outcome: str,
    language: str,
    started: float,
    status: int = 200,
) -> Response:
    metrics = state.metrics
    metrics.execute_duration.labels(language=language).observe(time.perf_counter() - started)
    metrics.cache_outcomes[outcome].inc()
    metrics.tenant_executions.labels(tenant=admission.tenant_id).inc()
    headers = {**admission.headers, "X-Cache": outcome}
    return Response(body, status_code=status, headers=headers, media_type="application/json")


@_route(
    "POST",
    "/execute",
    responses={
        200: {
            "description": "Piston's answer, unchanged",
            "content": {"application/json": {"schema": EXECUTE_RESPONSE_SCHEMA}},
        },
        **message_responses(400, 401, 403, 413, 415, 429, 502, 503, 504),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": EXECUTE_REQUEST_SCHEMA}},
        }
    },
)
async def execute(request: Request) -> Response:
    """Run code, exactly as Piston's POST /api/v2/execute (answers carry X-Cache)."""
    started = time.perf_counter()
    # Plain calls rather than FastAPI dependencies: on a cache hit, resolving dependencies
    # cost a fifth of the request's CPU (bench/, cProfile). The 401/403 answers are the same.
    principal = await authorize(request, "execute")
    state = get_state(request)
    tenant = principal.tenant
    client = client_limit(request, principal)
    reservation = state.slots.reserve()  # past the queue: 503 now, not after body and Redis
    try:
        return await _execute_reserved(request, state, tenant, client, reservation, started)
    finally:
        reservation.release()  # unless the run took a slot with it already


async def _execute_reserved(
    request: Request,
    state: AppState,
    tenant: Tenant,
    client: ClientLimit | None,
    reservation: Reservation,
    started: float,
) -> Response:
    settings = state.settings
    body = await read_json_body(request, settings.max_body_bytes)
    runtime, effective = _effective(state, tenant, body)
    plan = _cache_plan(request, settings, tenant, effective)
    deadline_ms, lease_ttl_ms = _timing(settings, effective)
    admission = await state.gate.admit(
        tenant, cache_key=plan.lookup_key, lease_ttl_ms=lease_ttl_ms, client=client
    )
    if admission.degraded:  # Redis unreachable, failing open: no shared cache, no shared flight
        plan = _CachePlan(CacheMode(lookup=False, store=False, label="BYPASS"), None)
    if admission.cached is not None:
        reservation.release()  # a hit needs no slot
        return _answer(
            state,
            admission,
            admission.cached,
            outcome="HIT",
            language=runtime.language,
            started=started,
        )
    try:
        result = await _execute_once(
            state,
            plan,
            effective,
            runtime,
            deadline_ms=deadline_ms,
            lock_ttl_ms=lease_ttl_ms,
            reservation=reservation,
        )
    except GatewayError as exc:
        await state.gate.finish(admission, error=True, cpu_time_ms=0, wall_time_ms=0)
        # A fresh error per caller: callers joined in one flight share the exception object,
        # and each must see its own rate-limit headers.
        raise GatewayError(
            exc.message, status_code=exc.status_code, headers={**admission.headers, **exc.headers}
        ) from None
    except BaseException:  # cancelled (client gone) or a bug: still release the lease
        await state.gate.finish(admission, error=True, cpu_time_ms=0, wall_time_ms=0)
        raise
    if isinstance(result, bytes):  # another process ran it and stored the answer meanwhile
        await state.gate.finish(admission, error=False, cpu_time_ms=0, wall_time_ms=0)
        return _answer(
            state,
            admission,
            result,
            outcome=plan.mode.label,
            language=runtime.language,
            started=started,
        )
    await state.gate.finish(
        admission, error=False, cpu_time_ms=result.cpu_time_ms, wall_time_ms=result.wall_time_ms
    )
    return _answer(
        state,
        admission,
        result.body,
        outcome=plan.mode.label,
        status=result.status_code,
        language=runtime.language,
        started=started,
    )


def _visible(principal: Principal, state: AppState, language: str) -> bool:
    return language_allowed(
        language, state.settings.allowed_languages, principal.tenant.allowed_languages
    )


@_route(
    "GET",
    "/runtimes",
    dependencies=[Depends(require_scope("execute"))],
    responses=message_responses(401, 403, 503),
)
async def runtimes(principal: PrincipalDep, state: StateDep) -> Response:
    """The runtimes this key may use, in Piston's shape."""
    available = state.catalog.runtimes
    if not available:
        raise ServiceUnavailable("no upstream Piston is reachable; try again shortly")
    return json_response(
        [rt.as_json() for rt in available if _visible(principal, state, rt.language)]
    )


@_route("GET", "/packages", responses=message_responses(401, 502, 503, 504))
async def packages(principal: PrincipalDep, state: StateDep) -> Response:
    """The upstream's packages, without those this key may not use."""
    status, body = await state.pool.forward("GET", "/api/v2/packages")
    if status != 200:
        raise upstream_error(status, body)
    try:
        listed = orjson.loads(body)
        visible = [
            pkg for pkg in listed if _visible(principal, state, str(pkg.get("language", "")))
        ]
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        raise BadGateway("the upstream answered its package list with garbage") from None
    return json_response(visible)


async def _forward_package_change(request: Request, state: AppState) -> Response:
    body = await read_json_body(request, state.settings.max_body_bytes)
    status, answer = await state.pool.forward(
        request.method, "/api/v2/packages", orjson.dumps(body), read_timeout=600.0
    )
    if status >= 400:
        raise upstream_error(status, answer)
    return Response(answer, status_code=status, media_type="application/json")


_ADMIN_PACKAGES: dict[str, Any] = {
    "dependencies": [Depends(require_scope("admin"))],
    "responses": message_responses(400, 401, 403, 404, 413, 415, 502, 503, 504),
}


@_route("POST", "/packages", **_ADMIN_PACKAGES)
async def install_package(request: Request, state: StateDep) -> Response:
    """Install a language package on the upstream (scope `admin`)."""
    return await _forward_package_change(request, state)


@_route("DELETE", "/packages", **_ADMIN_PACKAGES)
async def uninstall_package(request: Request, state: StateDep) -> Response:
    """Remove a language package from the upstream (scope `admin`)."""
    return await _forward_package_change(request, state)


_INIT_TIMEOUT_S = 1.0  # Piston closes a socket that sends no init within a second


async def _receive_init(websocket: WebSocket, max_bytes: int) -> str:
    async with asyncio.timeout(_INIT_TIMEOUT_S):
        text, _ = await receive_message(websocket, max_bytes)
    return text


async def _principal(websocket: WebSocket) -> Principal | None:
    try:
        # Browsers cannot set headers on a WebSocket: `?api_key=` is accepted on this path only.
        key = key_from_headers(
            websocket.headers.get("authorization"), websocket.headers.get("x-api-key")
        ) or websocket.query_params.get("api_key")
        return await identify(websocket, key)
    except GatewayError:  # too many failed attempts from this address
        return None


def _origin_refusal(websocket: WebSocket, principal: Principal) -> str | None:
    """Why a browser key may not be used from this handshake's Origin, or None."""
    try:
        check_origin(principal, websocket.headers.get("origin"))
    except GatewayError as exc:
        return exc.message
    return None


async def _stop(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def connect(websocket: WebSocket) -> None:
    """Piston's interactive execution, relayed after the key and the init are checked."""
    state = get_state(websocket)
    settings = state.settings
    await websocket.accept()
    # Piston's init timer runs from the connection: read the init while the key is checked,
    # so a slow key lookup under load does not stretch the second.
    first_message = asyncio.create_task(_receive_init(websocket, settings.max_body_bytes))
    try:
        principal = await _principal(websocket)
    except BaseException:
        await _stop(first_message)
        raise
    if principal is None or not principal.can("execute"):
        await _stop(first_message)
        # Nothing has reached the upstream; 1008 is the WebSocket "policy violation" close.
        await close_client(websocket, 1008, "a valid API key with the execute scope is required")
        return
    refused = _origin_refusal(websocket, principal)
    if refused is not None:
        await _stop(first_message)
        # The reason as an `error` message (a close reason is capped at 123 bytes), then 1008.
        with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
            await websocket.send_text(orjson.dumps({"type": "error", "message": refused}).decode())
        await close_client(websocket, 1008, "origin not allowed for this key")
        return
    tenant = principal.tenant
    client = client_limit(websocket, principal)
    try:
        text = await first_message
        first = orjson.loads(text)
    except TimeoutError:
        await close_client(websocket, 4001, "Initialization Timeout")
        return
    except ClientGone:
        return
    except MessageRefused as exc:
        await notify_error(websocket, exc.message, code=exc.code)
        return
    except orjson.JSONDecodeError:
        await notify_error(websocket, "the init message must be a JSON object")
        return
    if not isinstance(first, dict) or first.get("type") != "init":
        await close_client(websocket, 4003, "Not yet initialized")
        return
    try:
        reservation = state.slots.reserve()  # past the queue: refused now, not after Redis
    except GatewayError as exc:
        await notify_error(websocket, exc.message)
        return
    try:
        await _admitted(state, websocket, tenant, client, first, reservation)
    finally:
        reservation.release()  # unless the relay took a slot with it already


async def _admitted(
    state: AppState,
    websocket: WebSocket,
    tenant: Tenant,
    client: ClientLimit | None,
    init: dict[str, Any],
    reservation: Reservation,
) -> None:
    """The init through the policy and the limiter, then the interactive run."""
    try:
        runtime, effective = _effective(state, tenant, init)
        _, lease_ttl_ms = _timing(state.settings, effective)
        admission = await state.gate.admit(
            tenant, cache_key=None, lease_ttl_ms=lease_ttl_ms, client=client
        )
    except GatewayError as exc:
        await notify_error(websocket, exc.message)
        return
    outcome = RelayOutcome()
    try:
        await _interactive(state, websocket, runtime, effective, outcome, reservation)
    except BaseException:
        outcome.error = True
        raise
    finally:
        await state.gate.finish(
            admission,
            error=outcome.error,
            cpu_time_ms=outcome.cpu_time_ms,
            wall_time_ms=outcome.wall_time_ms,
        )
        state.metrics.tenant_executions.labels(tenant=tenant.id).inc()


async def _interactive(
    state: AppState,
    websocket: WebSocket,
    runtime: Runtime,
    effective: ExecuteRequest,
    outcome: RelayOutcome,
    reservation: Reservation,
) -> None:
    """Read the client from now on (bounded), wait for a slot, relay; one place closes."""
    settings = state.settings
    inbox = Inbox(settings.ws_max_pending_stdin_bytes)
    reader = asyncio.create_task(read_client(websocket, inbox, settings.max_body_bytes))

    async def session() -> tuple[int, str] | None:
        async with state.slots.acquire(reservation):
            upstream = state.pool.candidates(runtime)[0]
            return await relay(
                websocket,
                ws_url(upstream.url),
                {"type": "init", **effective.as_json()},
                inbox,
                outcome,
                open_timeout=settings.upstream_connect_timeout_ms / 1000,
            )

    relaying = asyncio.create_task(session())
    try:
        await asyncio.wait({reader, relaying}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not relaying.done():
            await _stop(relaying)  # closes the upstream socket: Piston kills the job
        await _stop(reader)
    if reader.done() and not reader.cancelled() and relaying.cancelled():
        exc = reader.exception()
        if isinstance(exc, MessageRefused):
            outcome.error = True
            await notify_error(websocket, exc.message, code=exc.code)
        elif exc is not None and not isinstance(exc, ClientGone):
            raise exc
        return
    try:
        close = relaying.result()
    except ClientGone:  # gone while the job's output was on its way down
        return
    except GatewayError as exc:  # the gateway is at capacity
        outcome.error = True
        await notify_error(websocket, exc.message)
        return
    if close is not None:
        await close_client(websocket, *close)


router.add_api_websocket_route("/connect", connect)
router.add_api_websocket_route("/connect/", connect)
