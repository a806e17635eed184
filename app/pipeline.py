"""One request's path, in named phases: plan -> admit -> run once -> answer.

Execute, batch (a plan per case) and the WebSocket `init` all go this way:

- `plan` (pure): from the caller, the body and the headers to a `Plan`: the effective request
  (parse, resolve, policy), its runtime, its cache key or none, its deadlines.
- `admit` (one Redis round trip): an async context manager around the gate that refuses (429,
  503) or yields an `Admission`; on a miss that will be stored it also claims the single-flight
  lock. Leaving the block finishes it exactly once (usage, the lease's release, and a claimed
  lock no flight led with), whatever happened inside.
- `run_once`: owns the cache for a miss: single-flight across replicas, the upstream call inside
  this process's slots, the write of a cacheable answer; each caller gets its own error. A
  claimed miss lands in one script call, its admission's finish with the store, the lock's
  release and the wake-up (`_land`): two round trips before the answer in all, the admit's and
  that one.
- `answer`: the response, its headers and its metrics.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Final, Literal

import orjson
from starlette.datastructures import Headers
from starlette.responses import Response

from app.cache.flight import Claim
from app.cache.keys import CacheMode, cache_digest, cache_key, cache_mode
from app.errors import BadRequest, GatewayError
from app.limits.gate import Admission, ClientLimit
from app.limits.slots import Reservation
from app.middleware import RawResponse, parse_json, raw_headers
from app.policy import effective_caps, effective_request
from app.protocol.errors import InvalidRequest
from app.protocol.resolve import Runtime
from app.protocol.schemas import ExecuteRequest, parse_execute
from app.redis import flight_lock
from app.settings import Settings
from app.state import AppState
from app.tenancy.models import Tenant
from app.upstream.catalog import RuntimeCatalog
from app.upstream.pool import UpstreamAnswer

__all__ = ["NO_CACHE", "Admission", "CachePlan", "Plan", "Result", "admit", "answer", "plan"]
__all__ += ["Plans", "run_once"]

# Piston's own defaults, for the upstream deadline when a stage is left uncapped.
_PISTON_DEFAULT_MS: Final = {"compile_timeout": 10_000, "run_timeout": 3_000}
_LEASE_SLACK_MS: Final = 5_000

CacheOutcome = Literal["HIT", "MISS", "BYPASS"]

# --------------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class CachePlan:
    """Whether and under which digest one request reads and writes the cache."""

    mode: CacheMode
    digest: str | None  # None: neither read nor written

    @property
    def key(self) -> str | None:
        return cache_key(self.digest) if self.digest else None

    @property
    def lookup_key(self) -> str | None:
        """The key the admission reads, or None when this request must run fresh."""
        return self.key if self.mode.lookup else None


NO_CACHE: Final = CachePlan(CacheMode(lookup=False, store=False, label="BYPASS"), None)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one execution will be, decided before anything is counted or run."""

    request: ExecuteRequest  # the effective request: what is forwarded, cached and counted
    runtime: Runtime
    cache: CachePlan
    deadline_ms: int  # the upstream's deadline: both stages' timeouts and a grace
    lease_ttl_ms: int  # outlives a wait for a slot plus the run
    cache_scope: str | None  # the tenant id in the digest, or None for the global scope

    def with_input(self, *, stdin: str, args: tuple[str, ...]) -> Plan:
        """The same program with another input (a batch's case): its own cache key."""
        request = dataclasses.replace(self.request, stdin=stdin, args=args)
        cache = self.cache
        if cache.digest is not None:
            cache = CachePlan(cache.mode, cache_digest(request, tenant_id=self.cache_scope))
        return dataclasses.replace(self, request=request, cache=cache)


def _stage_deadline_ms(limits: Mapping[str, int | None]) -> int:
    """How long Piston may take at most: both stages' timeouts (its defaults where unset)."""
    total = 0
    for name, default in _PISTON_DEFAULT_MS.items():
        value = limits.get(name)
        total += value if value is not None and value > 0 else default
    return total


def _cache_control(headers: Headers) -> str | None:
    # Every Cache-Control line, as one (a header may be sent more than once).
    return ", ".join(headers.getlist("cache-control")) or None


def plan(
    tenant: Tenant,
    body: object,
    headers: Headers | None,
    *,
    settings: Settings,
    catalog: RuntimeCatalog,
) -> Plan:
    """parse -> resolve -> policy -> cache key and deadlines (400/403/503 on the way).

    `headers` None is a WebSocket run: interactive, so never cached.
    """
    try:
        parsed = parse_execute(body, max_files=settings.max_files)
    except InvalidRequest as exc:  # the protocol's 400, as the gateway's own
        raise BadRequest(exc.message) from None
    runtime = catalog.resolve(parsed.language, parsed.version)
    effective = effective_request(
        tenant,
        parsed,
        runtime,
        global_languages=settings.allowed_languages,
        caps=effective_caps(tenant, settings),
    )
    scope = tenant.id if settings.cache_scope == "tenant" else None
    cache = NO_CACHE
    if headers is not None:
        mode = cache_mode(
            ttl_seconds=settings.cache_ttl_seconds,
            tenant_cache=tenant.cache,
            cache_control=_cache_control(headers),
        )
        digest = cache_digest(effective, tenant_id=scope) if mode.store else None
        cache = CachePlan(mode, digest)
    deadline_ms = _stage_deadline_ms(effective.limits) + settings.upstream_grace_ms
    return Plan(
        request=effective,
        runtime=runtime,
        cache=cache,
        deadline_ms=deadline_ms,
        lease_ttl_ms=deadline_ms + settings.queue_timeout_ms + _LEASE_SLACK_MS,
        cache_scope=scope,
    )


class Plans:
    """`plan`, remembered for requests seen before: a repeat (every cache hit is one) is
    planned once, without parsing, resolving, checking policy or hashing it again.

    A plan follows from the tenant, the body's exact bytes, the Cache-Control lines, the
    settings and the runtime set, nothing else (`plan` is pure). The entries are keyed by the
    tenant object (an edited tenant is a new object), the bytes, the Cache-Control lines and the
    catalog's version (bumped when the runtime or upstream set changes); the settings are this
    app's. Refusals are not remembered. Bounded: small requests only (body and Cache-Control
    within `max_body_bytes`), `max_entries` of them, then it starts afresh, so at most about
    `max_entries * max_body_bytes * 2` bytes are held.
    """

    def __init__(
        self,
        settings: Settings,
        catalog: RuntimeCatalog,
        *,
        max_entries: int = 256,
        max_body_bytes: int = 4096,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._max_entries = max_entries
        self._max_body_bytes = max_body_bytes
        self._entries: dict[tuple[int, bytes, str | None, int], tuple[Tenant, Plan]] = {}

    def plan(self, tenant: Tenant, raw: bytes, headers: Headers) -> Plan:
        """The plan of an execute whose body is `raw` (400 for JSON that is not)."""
        cache_control = _cache_control(headers)
        key = (id(tenant), raw, cache_control, self._catalog.version)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is tenant:
            return entry[1]
        planned = plan(
            tenant, parse_json(raw), headers, settings=self._settings, catalog=self._catalog
        )
        if len(raw) + len(cache_control or "") <= self._max_body_bytes:
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
            self._entries[key] = (tenant, planned)
        return planned


# --------------------------------------------------------------------------- admit


class _Admitting:
    """`async with admit(...)`: a class rather than a generator, the hot path's cheaper form."""

    __slots__ = (
        "_admission",
        "_cache_key",
        "_client",
        "_cost",
        "_flight",
        "_flight_lease_ms",
        "_lease_ttl_ms",
        "_leases",
        "_state",
        "_tenant",
    )

    def __init__(
        self,
        state: AppState,
        tenant: Tenant,
        *,
        cache_key: str | None,
        lease_ttl_ms: int,
        cost: int,
        client: ClientLimit | None,
        leases: int,
        flight: str | None,
        flight_lease_ms: int,
    ) -> None:
        self._state, self._tenant = state, tenant
        self._cache_key, self._lease_ttl_ms, self._cost = cache_key, lease_ttl_ms, cost
        self._client, self._leases = client, leases
        self._flight, self._flight_lease_ms = flight, flight_lease_ms
        self._admission: Admission | None = None

    async def __aenter__(self) -> Admission:
        self._admission = await self._state.gate.admit(
            self._tenant,
            cache_key=self._cache_key,
            lease_ttl_ms=self._lease_ttl_ms,
            cost=self._cost,
            client=self._client,
            leases=self._leases,
            flight=self._flight,
            flight_lease_ms=self._flight_lease_ms,
        )
        return self._admission

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        admission, self._admission = self._admission, None
        if admission is None:
            return  # finished already: exactly once
        if not admission.finished:  # else a claimed flight's landing finished it (`_land`)
            if exc is not None:  # cancelled (client gone), refused by a slot, a failed run, a bug
                admission.error = True
            await _finish(self._state, admission)
        self._state.metrics.tenant_executed(admission.tenant_id, self._cost)
        if isinstance(exc, GatewayError):
            # The answer to an admitted request carries its rate-limit headers, an error too.
            exc.headers = {**admission.headers, **exc.headers}


async def _finish(state: AppState, admission: Admission) -> None:
    """The admission's one finish call (and, holding a flight lock, its landing)."""
    admission.finished = True
    await state.gate.finish(
        admission,
        error=admission.error,
        cpu_time_ms=admission.cpu_time_ms,
        wall_time_ms=admission.wall_time_ms,
        cache_hits=admission.cache_hits,
    )


def admit(
    state: AppState,
    tenant: Tenant,
    planned: Plan,
    *,
    cost: int = 1,
    lease_ttl_ms: int | None = None,
    read_cache: bool = True,
    client: ClientLimit | None = None,
    leases: int = 1,
) -> _Admitting:
    """Count the request against the tenant's limits and read its cache entry, in one round trip.

    Refuses with 429 (rate limit, quota, concurrency) or 503 (Redis unreachable, failing
    closed). A batch is `cost` executions at once, with up to `leases` of the tenant's leases
    (as many as are free, at least one; `Admission.leases`) of `lease_ttl_ms` (default: the
    plan's), and reads no entry here (`read_cache=False`): each case reads its own.
    `client`: a browser key's per-visitor limit, counted in the same round trip.
    With `read_cache`, a miss that will be stored also claims its single-flight lock (when
    flights span processes), for `run_once` to lead with.
    """
    digest = planned.cache.digest if read_cache and state.flights.shared else None
    return _Admitting(
        state,
        tenant,
        cache_key=planned.cache.lookup_key if read_cache else None,
        lease_ttl_ms=lease_ttl_ms or planned.lease_ttl_ms,
        cost=cost,
        client=client,
        leases=leases,
        flight=flight_lock(digest) if digest else None,
        # like the lock a flight takes itself (app.cache.flight): a lease, renewed while it runs
        flight_lease_ms=min(state.flights.lease_ms, planned.lease_ttl_ms) if digest else 0,
    )


# --------------------------------------------------------------------------- run once


@dataclass(frozen=True, slots=True)
class Result:
    """What a request answers: Piston's body (the bytes that go out) and where it came from."""

    body: bytes
    cache: CacheOutcome
    status_code: int = 200


def _own_error(exc: GatewayError) -> GatewayError:
    # Callers joined in one flight share the exception object: each must get its own, to carry
    # its own rate-limit headers.
    return GatewayError(exc.message, status_code=exc.status_code, headers=exc.headers)


async def _run_upstream(
    state: AppState, body: bytes, planned: Plan, reservation: Reservation | None
) -> UpstreamAnswer:
    """One execution on an upstream, inside this process's cap on executions in flight."""
    async with state.slots.acquire(reservation):  # also keeps pgw_executions_in_flight
        return await state.pool.execute(
            body, runtime=planned.runtime, read_timeout=planned.deadline_ms / 1000
        )


async def _land(
    state: AppState,
    admission: Admission,
    key: str,
    answer: UpstreamAnswer | None,
    wake_up: bytes,
) -> bool:
    """A claimed flight's landing (`Claim.land`): the admission's finish, with the answer's
    store, the lock's release and the wake-up, in one script call; False once it finished."""
    if admission.finished:
        return False  # the request is gone (cancelled, past its deadline): the flight lands alone
    if answer is None:
        admission.error = True  # the run failed: an upstream error, a slot refused, a bug
    else:
        admission.cpu_time_ms += answer.cpu_time_ms
        admission.wall_time_ms += answer.wall_time_ms
        if answer.cacheable:
            admission.store = (key, answer.body, state.settings.cache_ttl_seconds)
    admission.wake_up = wake_up
    await _finish(state, admission)
    return True


async def run_once(
    state: AppState,
    planned: Plan,
    admission: Admission,
    *,
    reservation: Reservation | None = None,
    cached: bytes | None = None,
) -> Result:
    """The admission's cache entry, or one run for every identical request in flight anywhere.

    `cached` is an entry read apart from the admission (a batch's case). The run's figures are
    added to the admission, so leaving `admit` counts them; an admission that claimed the
    flight lock and led the run is finished by its landing already, before the answer.
    """
    cached = cached if cached is not None else admission.cached
    if cached is not None:
        if reservation is not None:
            reservation.release()  # a hit needs no slot
        return Result(cached, "HIT")
    # Redis unreachable and failing open: no shared cache, no shared flight.
    cache = NO_CACHE if admission.degraded else planned.cache
    forward = orjson.dumps(planned.request.as_json())
    settings = state.settings
    try:
        if cache.digest is None or cache.key is None:
            ran: UpstreamAnswer | bytes = await _run_upstream(state, forward, planned, reservation)
        else:
            key = cache.key

            async def execute() -> UpstreamAnswer:
                return await _run_upstream(state, forward, planned, reservation)

            async def write(answer: UpstreamAnswer) -> None:
                if answer.cacheable:
                    await state.cache.write(key, answer.body, settings.cache_ttl_seconds)

            # The admit claimed the lock with its cache read: lead with it, land with `_land`.
            claim = (
                Claim(admission.token, partial(_land, state, admission, key))
                if admission.flight_lock is not None
                else None
            )
            try:
                ran = await state.flights.run(
                    cache.digest,
                    deadline_s=(planned.deadline_ms + settings.queue_timeout_ms) / 1000,
                    lock_ttl_ms=planned.lease_ttl_ms,  # like the lease: a wait for a slot, the run
                    execute=execute,
                    # no-cache asks for a fresh run: don't let the flight fall back on the entry.
                    read_cached=(lambda: state.cache.read(key)) if cache.mode.lookup else None,
                    on_result=write,
                    claim=claim,
                )
            finally:
                if claim is not None and not claim.withdraw():
                    admission.flight_lock = None  # a flight led with it: the flight releases it
    except GatewayError as exc:
        raise _own_error(exc) from None
    if isinstance(ran, bytes):  # another process ran it and stored the answer meanwhile
        return Result(ran, cache.mode.label)
    if not admission.finished:
        admission.cpu_time_ms += ran.cpu_time_ms
        admission.wall_time_ms += ran.wall_time_ms
    return Result(ran.body, cache.mode.label, ran.status_code)


# --------------------------------------------------------------------------- answer


def answer(
    state: AppState, planned: Plan, admission: Admission, result: Result, *, started: float
) -> Response:
    """The execute's response: Piston's bytes, the rate-limit headers and X-Cache."""
    metrics = state.metrics
    metrics.execute_answered(planned.runtime.language, time.perf_counter() - started)
    metrics.cache_outcomes[result.cache].inc()
    body = result.body
    headers = raw_headers(admission.headers)  # as Starlette orders them: given, then its own
    headers += (
        (b"x-cache", result.cache.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"content-type", b"application/json"),
    )
    return RawResponse(body, result.status_code, headers)
