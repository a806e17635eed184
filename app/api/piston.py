"""Piston's v2 API, served to keys with the `execute` scope: execute, runtimes, connect.

Every path also answers with a trailing slash (aiopyston calls `execute/`), without a redirect.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import orjson
from fastapi import Request, WebSocket, WebSocketDisconnect
from starlette.responses import Response

from app.api.deps import (
    AppState,
    PrincipalDep,
    StateDep,
    authorize,
    check_origin,
    client_limit,
    get_state,
    keyed_router,
    principal_of,
    served_directly,
    with_trailing_slash,
)
from app.errors import GatewayError, ServiceUnavailable, message_responses
from app.limits import Admission, ClientLimit
from app.limits.slots import Reservation
from app.middleware import json_response, read_body
from app.pipeline import Plan, admit, answer, plan, run_once
from app.policy import language_allowed
from app.protocol.schemas import (
    EXECUTE_REQUEST_SCHEMA,
    EXECUTE_RESPONSE_SCHEMA,
)
from app.tenancy.models import Principal, Tenant
from app.upstream.relay import (
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

__all__ = ["router"]

# Every HTTP route here needs a key with the `execute` scope (app.api.deps).
router = keyed_router(scope="execute", prefix="/api/v2", tags=["piston"])


_EXECUTE_DOCS: dict[str, Any] = dict(
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


@served_directly  # the hot path: no FastAPI routing in front of it (app.middleware.DirectRoutes)
async def execute(request: Request) -> Response:
    """Run code, exactly as Piston's POST /api/v2/execute (answers carry X-Cache)."""
    started = time.perf_counter()
    principal = principal_of(request)  # authorized before this runs (app.api.deps)
    state = get_state(request)
    with state.slots.reserve() as reservation:  # past the queue: 503 now, not after the body
        raw = await read_body(request, state.settings.max_body_bytes)
        planned = state.plans.plan(principal.tenant, raw, request.headers)  # pipeline.plan
        client = client_limit(request, principal)  # a browser key's per-visitor limit, if any
        async with admit(state, principal.tenant, planned, client=client) as admission:
            result = await run_once(state, planned, admission, reservation=reservation)
    return answer(state, planned, admission, result, started=started)


with_trailing_slash(router, "POST", "/execute", execute, **_EXECUTE_DOCS)


async def runtimes(principal: PrincipalDep, state: StateDep) -> Response:
    """The runtimes this key may use, in Piston's shape."""
    available = state.catalog.runtimes
    if not available:
        raise ServiceUnavailable("no upstream Piston is reachable; try again shortly")
    return json_response(
        [
            rt.as_json()
            for rt in available
            if language_allowed(
                rt.language, state.settings.allowed_languages, principal.tenant.allowed_languages
            )
        ]
    )


with_trailing_slash(
    router, "GET", "/runtimes", runtimes, responses=message_responses(401, 403, 503)
)


_INIT_TIMEOUT_S = 1.0  # Piston closes a socket that sends no init within a second


async def _receive_init(websocket: WebSocket, max_bytes: int) -> str:
    async with asyncio.timeout(_INIT_TIMEOUT_S):
        text, _ = await receive_message(websocket, max_bytes)
    return text


async def _principal(websocket: WebSocket) -> Principal | None:
    try:
        return await authorize(websocket, "execute")
    except ServiceUnavailable:  # the key cannot be checked now (Redis): not an invalid key
        raise
    except GatewayError:  # no key, an invalid one, no scope, too many failed attempts
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
    except ServiceUnavailable as exc:
        await _stop(first_message)
        # As HTTP answers 503: the reason as an `error` message, then 1013 "Try Again Later".
        with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
            await websocket.send_text(
                orjson.dumps({"type": "error", "message": exc.message}).decode()
            )
        await close_client(websocket, 1013, "try again later")
        return
    except BaseException:
        await _stop(first_message)
        raise
    if principal is None:
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
        planned = plan(tenant, init, None, settings=state.settings, catalog=state.catalog)
        async with admit(state, tenant, planned, client=client) as admission:
            await _interactive(state, websocket, planned, admission, reservation)
    except GatewayError as exc:  # refused: nothing has reached the upstream
        await notify_error(websocket, exc.message)


async def _interactive(
    state: AppState,
    websocket: WebSocket,
    planned: Plan,
    admission: Admission,
    reservation: Reservation,
) -> None:
    """Relay, and add what the relay saw to the admission (its exit counts it)."""
    outcome = RelayOutcome()
    try:
        await _relay(state, websocket, planned, outcome, reservation)
    finally:
        admission.error = admission.error or outcome.error
        admission.cpu_time_ms += outcome.cpu_time_ms
        admission.wall_time_ms += outcome.wall_time_ms


async def _relay(
    state: AppState,
    websocket: WebSocket,
    planned: Plan,
    outcome: RelayOutcome,
    reservation: Reservation,
) -> None:
    """Read the client from now on (bounded), wait for a slot, relay; one place closes."""
    settings = state.settings
    inbox = Inbox(settings.ws_max_pending_stdin_bytes)
    reader = asyncio.create_task(read_client(websocket, inbox, settings.max_body_bytes))

    async def session() -> tuple[int, str] | None:
        async with state.slots.acquire(reservation):
            upstream = state.pool.candidates(planned.runtime)[0]
            return await relay(
                websocket,
                ws_url(upstream.url),
                {"type": "init", **planned.request.as_json()},
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


# WebSocket routes are not wrapped by the keyed router: `connect` authorizes (1008, not 401).
router.add_api_websocket_route("/connect", connect)
router.add_api_websocket_route("/connect/", connect)
