"""app.pipeline: plan is pure, admit finishes exactly once whatever happens in its block."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest
from starlette.datastructures import Headers

from app.cache.flight import SingleFlight
from app.cache.keys import cache_digest
from app.errors import BadRequest, GatewayError, GatewayTimeout, TooManyRequests
from app.limits import Admission, MemoryGate
from app.metrics import Metrics
from app.pipeline import NO_CACHE, Plans, admit, plan
from app.protocol.resolve import Runtime
from app.settings import Settings
from app.state import AppState
from app.tenancy.models import Tenant
from app.upstream.catalog import RuntimeCatalog

PYTHON = Runtime("python", "3.12.0", ("py",))
BODY: dict[str, Any] = {"language": "py", "version": "3", "files": [{"content": "print(1)"}]}


class _Catalog:
    """The one runtime a real catalog would resolve `py`/`3` to, without a pool."""

    def resolve(self, language: str, selector: str) -> Runtime:
        assert (language, selector) == ("py", "3")
        return PYTHON


def _plan(body: object = BODY, headers: Headers | None = None, **settings: Any) -> Any:
    return plan(
        Tenant(id="acme"),
        body,
        Headers() if headers is None else headers,
        settings=Settings(**settings),
        catalog=cast(RuntimeCatalog, _Catalog()),
    )


class TestPlan:
    def test_the_effective_request_and_its_cache_key(self) -> None:
        planned = _plan()
        assert (planned.request.language, planned.request.version) == ("python", "3.12.0")
        assert planned.cache.mode.lookup
        assert planned.cache.mode.store
        assert planned.cache.digest == cache_digest(planned.request, tenant_id="acme")
        assert planned.cache.key == f"pgw:cache:{planned.cache.digest}"
        # Piston's defaults (10 s compile, 3 s run) and the grace; the lease outlives the queue.
        settings = Settings()
        assert planned.deadline_ms == 13_000 + settings.upstream_grace_ms
        assert planned.lease_ttl_ms > planned.deadline_ms + settings.queue_timeout_ms

    def test_no_store_plans_no_cache(self) -> None:
        planned = _plan(headers=Headers({"cache-control": "no-store"}))
        assert planned.cache.digest is None
        assert planned.cache.lookup_key is None
        assert planned.cache.mode.label == "BYPASS"

    def test_no_cache_stores_without_looking_up(self) -> None:
        planned = _plan(headers=Headers({"cache-control": "no-cache"}))
        assert planned.cache.lookup_key is None
        assert planned.cache.key is not None

    def test_a_websocket_run_is_never_cached(self) -> None:
        planned = plan(
            Tenant(id="acme"),
            BODY,
            None,
            settings=Settings(),
            catalog=cast(RuntimeCatalog, _Catalog()),
        )
        assert planned.cache == NO_CACHE

    def test_the_protocol_error_is_the_gateways_400(self) -> None:
        with pytest.raises(BadRequest, match="language is required as a string"):
            _plan({**BODY, "language": None})

    def test_a_case_input_has_its_own_key(self) -> None:
        base = _plan()
        case = base.with_input(stdin="1 2", args=("x",))
        assert (case.request.stdin, case.request.args) == ("1 2", ("x",))
        assert case.cache.digest == cache_digest(case.request, tenant_id="acme")
        assert case.cache.digest != base.cache.digest
        assert case.deadline_ms == base.deadline_ms


class _CountingGate(MemoryGate):
    def __init__(self) -> None:
        super().__init__(default_rate_limit="100/minute")
        self.finished: list[dict[str, Any]] = []

    async def finish(self, admission: Admission, **figures: Any) -> None:
        self.finished.append(figures)
        await super().finish(admission, **figures)


def _state(gate: _CountingGate) -> AppState:
    return cast(AppState, SimpleNamespace(gate=gate, metrics=Metrics(), flights=SingleFlight(None)))


class TestAdmit:
    async def test_finishes_once_with_the_runs_figures(self) -> None:
        gate = _CountingGate()
        tenant = Tenant(id="acme", max_concurrency=1)
        async with admit(_state(gate), tenant, _plan()) as admission:
            assert admission.lease is not None
            admission.cpu_time_ms += 5
        assert gate.finished == [
            {"error": False, "cpu_time_ms": 5, "wall_time_ms": 0, "cache_hits": 0}
        ]
        # The lease went back: the tenant's one slot is free for the next request.
        async with admit(_state(gate), tenant, _plan()):
            pass
        assert len(gate.finished) == 2

    async def test_an_exception_in_the_block_still_finishes_once_as_an_error(self) -> None:
        gate = _CountingGate()
        tenant = Tenant(id="acme", max_concurrency=1)
        with pytest.raises(RuntimeError):
            async with admit(_state(gate), tenant, _plan()):
                raise RuntimeError("a bug")
        assert [f["error"] for f in gate.finished] == [True]
        async with admit(_state(gate), tenant, _plan()):  # the lease was released
            pass

    async def test_a_gateway_error_leaving_the_block_carries_the_rate_limit_headers(self) -> None:
        gate = _CountingGate()
        with pytest.raises(GatewayError) as info:
            async with admit(_state(gate), Tenant(id="acme"), _plan()):
                raise GatewayTimeout("the upstream took too long")
        assert info.value.headers["X-RateLimit-Limit"] == "100"
        assert info.value.status_code == 504

    async def test_a_refusal_finishes_nothing(self) -> None:
        gate = _CountingGate()
        tenant = Tenant(id="acme", rate_limit="1/minute")
        async with admit(_state(gate), tenant, _plan()):
            pass
        with pytest.raises(TooManyRequests):
            async with admit(_state(gate), tenant, _plan()):
                pytest.fail("a refused request runs nothing")
        assert len(gate.finished) == 1


class _VersionedCatalog(_Catalog):
    """The fake catalog, counting resolutions, with the runtime set's version."""

    def __init__(self) -> None:
        self.version = 0
        self.resolved = 0

    def resolve(self, language: str, selector: str) -> Runtime:
        self.resolved += 1
        return super().resolve(language, selector)


class TestPlans:
    """Plans: a repeat is planned once; anything a plan follows from makes a new one."""

    RAW = orjson.dumps(BODY)

    def _plans(self, **kw: Any) -> tuple[Plans, _VersionedCatalog]:
        catalog = _VersionedCatalog()
        return Plans(Settings(), cast(RuntimeCatalog, catalog), **kw), catalog

    def test_a_repeat_is_the_same_plan_as_planning_it_afresh(self) -> None:
        plans, catalog = self._plans()
        tenant = Tenant(id="acme")
        first = plans.plan(tenant, self.RAW, Headers())
        assert plans.plan(tenant, self.RAW, Headers()) is first
        assert catalog.resolved == 1
        assert first == _plan()  # what plan() itself gives for these bytes

    def test_what_a_plan_follows_from_makes_a_new_one(self) -> None:
        plans, catalog = self._plans()
        tenant = Tenant(id="acme")
        first = plans.plan(tenant, self.RAW, Headers())
        edited = Tenant(id="acme", max_run_timeout=1000)  # an edit is a new object
        assert plans.plan(edited, self.RAW, Headers()).request.limits["run_timeout"] == 1000
        no_store = plans.plan(tenant, self.RAW, Headers({"cache-control": "no-store"}))
        assert no_store.cache.digest is None
        spaced = orjson.dumps(BODY, option=orjson.OPT_INDENT_2)  # other bytes, same request
        assert plans.plan(tenant, spaced, Headers()).cache.digest == first.cache.digest
        catalog.version += 1  # a runtime installed or gone
        assert plans.plan(tenant, self.RAW, Headers()) is not first
        assert catalog.resolved == 5

    def test_refusals_and_large_bodies_are_not_kept(self) -> None:
        plans, catalog = self._plans(max_body_bytes=len(self.RAW) - 1)
        tenant = Tenant(id="acme")
        plans.plan(tenant, self.RAW, Headers())
        plans.plan(tenant, self.RAW, Headers())
        assert catalog.resolved == 2
        for _ in range(2):
            with pytest.raises(BadRequest):
                plans.plan(tenant, b"{", Headers())
        small, _ = self._plans(max_body_bytes=len(self.RAW) + 10)
        long_header = Headers({"cache-control": "max-age=0, " + "x" * 100})
        small.plan(tenant, self.RAW, long_header)  # within the bound by its body, not with it
        assert len(small._entries) == 0

    def test_bounded(self) -> None:
        plans, _ = self._plans(max_entries=4)
        tenant = Tenant(id="acme")
        for n in range(10):
            plans.plan(tenant, orjson.dumps({**BODY, "stdin": str(n)}), Headers())
        assert len(plans._entries) <= 4
