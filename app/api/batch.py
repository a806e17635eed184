"""`POST /api/v2/batch`: one program over many cases, each graded (a gateway extension).

Each case goes the way of the execute with its `stdin` and `args`: the batch's body is parsed,
resolved and put through the policy once (`app.pipeline.plan`, so the whole-request errors are
execute's), and each case's effective request is that one with the case's input, so its cache key
is the execute's and an execute of the same program and input shares its entry and its flight
(`Plan.with_input`, `run_once`).

Admission: the N cases are N executions of the tenant's rate limit and quota, taken in ONE admit
(`cost=N`), all or nothing. Concurrency: every case in flight holds one of the tenant's
`max_concurrency` leases, as every execute does, so two batches (or a batch and executes) never
have more than the cap in flight together. The admit takes as many leases as are free, up to
min(N, cap), at least one (refused like an execute when none is free), all in the same round
trip, and the batch runs that many cases side by side for its whole run: it never has to take a
lease midway, so a batch admitted is never refused halfway (a tenant without a cap takes no
lease, and its cases are bound by `GATEWAY_MAX_CONCURRENCY` and the process's upstream slots).

Order: the first case runs alone, then the others start in request order, up to the bound at once.
A compile error (or, with `stop_on_failure`, any failure) stops the starting: the cases not
started yet are `not_run`; those already running finish and are shown as they ended. So the
`not_run` cases are always the last ones, and a program that does not compile costs one compile,
not N.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final, get_args

import orjson
from fastapi import Request
from starlette.responses import Response

from app.api.deps import (
    AppState,
    client_limit,
    get_state,
    keyed_router,
    principal_of,
    with_trailing_slash,
)
from app.batch import (
    BatchRequest,
    CaseResult,
    Verdict,
    answer_json,
    parse_batch,
    stops_batch,
    verdict,
)
from app.errors import BadRequest, GatewayError, message_responses
from app.limits.gate import ClientLimit, counted_windows
from app.middleware import json_response, read_json_body
from app.pipeline import NO_CACHE, Admission, Plan, admit, plan, run_once
from app.settings import Settings
from app.tenancy.models import Tenant

__all__ = ["BATCH_REQUEST_SCHEMA", "BATCH_RESPONSE_SCHEMA", "router"]

router = keyed_router(scope="execute", prefix="/api/v2", tags=["batch"])

_PYTHON_BATCH: Final[dict[str, Any]] = {
    "language": "python",
    "version": "3.x",
    "files": [{"name": "main.py", "content": "a, b = map(int, input().split())\nprint(a + b)\n"}],
    "cases": [
        {"id": "small", "stdin": "1 2", "expected_output": "3"},
        {"id": "negative", "stdin": "-5 3", "expected_output": "-2"},
        {"id": "wrong", "stdin": "2 2", "expected_output": "5"},
    ],
    "compare": "lines",
}


def _stage(
    stdout: str,
    *,
    stderr: str = "",
    code: int = 0,
    status: str | None = None,
    message: str | None = None,
    cpu: int,
    wall: int,
    memory: int,
) -> dict[str, Any]:
    return {
        "stdout": stdout,
        "stderr": stderr,
        "output": stdout + stderr,
        "code": code,
        "signal": None,
        "message": message,
        "status": status,
        "cpu_time": cpu,
        "wall_time": wall,
        "memory": memory,
    }


# The examples are real answers of the embedded engine (Debian's python3 and gcc).
_PYTHON_ANSWER: Final[dict[str, Any]] = {
    "language": "python",
    "version": "3.11.2",
    "summary": {
        "cases": 3,
        "passed": 2,
        "failed": 1,
        "not_run": 0,
        "verdict": "wrong_answer",
        "cpu_time": 47,
        "wall_time": 274,
    },
    "cases": [
        {
            "id": "small",
            "verdict": "accepted",
            "cache": "MISS",
            "run": _stage("3\n", cpu=14, wall=65, memory=8433664),
        },
        {
            "id": "negative",
            "verdict": "accepted",
            "cache": "MISS",
            "run": _stage("-2\n", cpu=16, wall=102, memory=8474624),
        },
        {
            "id": "wrong",
            "verdict": "wrong_answer",
            "cache": "MISS",
            "run": _stage("4\n", cpu=17, wall=107, memory=8478720),
        },
    ],
}

_C_BATCH: Final[dict[str, Any]] = {
    "language": "c",
    "version": "*",
    "files": [{"name": "main.c", "content": "int main(void) { return 0 }"}],
    "cases": [{"stdin": "1"}, {"stdin": "2"}],
}
_C_STAGE: Final[dict[str, Any]] = _stage(
    "",
    stderr=(
        "main.c: In function \u2018main\u2019:\n"
        "main.c:1:26: error: expected \u2018;\u2019 before \u2018}\u2019 token\n"
        "    1 | int main(void) { return 0 }\n"
        "      |                          ^~\n"
        "      |                          ;\n"
    ),
    code=1,
    status="RE",
    message="Exited with error status 1",
    cpu=10,
    wall=82,
    memory=19587072,
)
_C_ANSWER: Final[dict[str, Any]] = {
    "language": "c",
    "version": "12.2.0",
    "summary": {
        "cases": 2,
        "passed": 0,
        "failed": 1,
        "not_run": 1,
        "verdict": "compile_error",
        "cpu_time": 10,
        "wall_time": 82,
    },
    "cases": [
        # Piston mirrors a failed compile as `run` too (for older clients).
        {
            "id": "0",
            "verdict": "compile_error",
            "cache": "MISS",
            "compile": _C_STAGE,
            "run": _C_STAGE,
        },
        {"id": "1", "verdict": "not_run", "cache": "BYPASS"},
    ],
}

_STAGE_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "description": "Piston's stage, unchanged",
    "additionalProperties": True,
}
_VERDICTS: Final = list(get_args(Verdict))  # the schema names exactly what the code grades
BATCH_REQUEST_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["language", "version", "files", "cases"],
    "description": "execute's fields other than stdin and args, and the cases",
    "properties": {
        "language": {"type": "string"},
        "version": {"type": "string"},
        "files": {"type": "array", "items": {"type": "object"}},
        "cases": {
            "type": "array",
            "minItems": 1,
            "description": "1 to GATEWAY_MAX_BATCH_CASES (default 50)",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "id": {
                        "type": "string",
                        "maxLength": 64,
                        "description": "unique; default the case's index",
                    },
                    "stdin": {"type": "string", "default": ""},
                    "args": {"type": "array", "items": {"type": "string"}, "default": []},
                    "expected_output": {"type": "string"},
                },
            },
        },
        "compare": {"type": "string", "enum": ["lines", "exact", "tokens"], "default": "lines"},
        "stop_on_failure": {"type": "boolean", "default": False},
        **{
            name: {"type": "integer"}
            for name in (
                "compile_timeout",
                "run_timeout",
                "compile_cpu_time",
                "run_cpu_time",
                "compile_memory_limit",
                "run_memory_limit",
            )
        },
    },
}
BATCH_RESPONSE_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "language": {"type": "string"},
        "version": {"type": "string"},
        "summary": {
            "type": "object",
            "properties": {
                "cases": {"type": "integer"},
                "passed": {"type": "integer", "description": "accepted and ran"},
                "failed": {"type": "integer"},
                "not_run": {"type": "integer"},
                "verdict": {"type": "string", "enum": _VERDICTS[:-1]},
                "cpu_time": {"type": "number"},
                "wall_time": {"type": "number"},
            },
        },
        "cases": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "verdict", "cache"],
                "properties": {
                    "id": {"type": "string"},
                    "verdict": {"type": "string", "enum": _VERDICTS},
                    "cache": {"type": "string", "enum": ["HIT", "MISS", "BYPASS"]},
                    "compile": _STAGE_SCHEMA,
                    "run": _STAGE_SCHEMA,
                    "message": {
                        "type": "string",
                        "description": "for an internal_error: what failed upstream",
                    },
                },
            },
        },
    },
}


class _Run:
    """One batch in flight: its cases' plans, and their figures added to its one admission."""

    def __init__(self, state: AppState, batch: BatchRequest, base: Plan) -> None:
        self.state, self.batch = state, batch
        # The execute's plan with this case's input: the same cache key as that execute.
        self.plans = [base.with_input(stdin=case.stdin, args=case.args) for case in batch.cases]
        self.results: list[CaseResult | None] = [None] * len(batch.cases)
        self.stopped = False

    async def case(self, index: int, admission: Admission) -> None:
        result = await self._run_case(index, admission)
        self.results[index] = result
        if stops_batch(result.verdict, stop_on_failure=self.batch.stop_on_failure):
            self.stopped = True

    async def _run_case(self, index: int, admission: Admission) -> CaseResult:
        case, planned, state = self.batch.cases[index], self.plans[index], self.state
        # The batch's admission read no entry (N cases, one script): each case reads its own.
        lookup_key = None if admission.degraded else planned.cache.lookup_key
        cached = await state.cache.read(lookup_key) if lookup_key is not None else None
        if cached is not None:
            admission.cache_hits += 1
        try:
            result = await run_once(state, planned, admission, cached=cached)
        except GatewayError as exc:  # the upstream failed for this case (or no slot)
            admission.error = True
            label = NO_CACHE.mode.label if admission.degraded else planned.cache.mode.label
            return CaseResult(case.id, "internal_error", label, message=exc.message)
        state.metrics.cache_outcomes[result.cache].inc()
        try:
            answer = orjson.loads(result.body)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):  # a stored entry is one of Piston's 200 answers
            admission.error = True
            return CaseResult(case.id, "internal_error", result.cache, message="unreadable answer")
        graded = verdict(answer, case.expected_output, self.batch.compare)
        return CaseResult(case.id, graded, result.cache, answer=answer)

    async def run_all(self, concurrency: int, admission: Admission) -> list[CaseResult]:
        # The first case alone: a compile error there leaves the others not run.
        await self.case(0, admission)
        bound = asyncio.Semaphore(concurrency)

        async def bounded(index: int) -> None:
            try:
                await self.case(index, admission)
            finally:
                bound.release()

        async with asyncio.TaskGroup() as group:
            for index in range(1, len(self.plans)):
                await bound.acquire()  # cases start in request order, at most `concurrency`
                if self.stopped:
                    bound.release()
                    break
                group.create_task(bounded(index))
        return [
            r if r is not None else CaseResult(case.id, "not_run")
            for r, case in zip(self.results, self.batch.cases, strict=True)
        ]


_DOCS: Final[dict[str, Any]] = {
    "description": (
        "Run one program over test cases and grade each (scope `execute`; a gateway extension, "
        "not part of Piston). Each case counts as one execution: a batch of N needs N of the "
        "rate limit and quota, admitted all or nothing (429 says how many it needs and how "
        "many are left). At most the tenant's `max_concurrency` cases run at a time, each "
        "cached and single-flighted as the execute with its `stdin` and `args`. The first case "
        "runs alone; a compile error (or, with `stop_on_failure`, any failure) leaves the cases "
        "not started `not_run`."
    ),
    "responses": {
        200: {
            "description": "Every case's verdict and Piston's stages, in request order",
            "content": {
                "application/json": {
                    "schema": BATCH_RESPONSE_SCHEMA,
                    "examples": {
                        "one_wrong_answer": {
                            "summary": "Python, one wrong answer",
                            "value": _PYTHON_ANSWER,
                        },
                        "compile_error": {
                            "summary": "C that does not compile",
                            "value": _C_ANSWER,
                        },
                    },
                }
            },
        },
        **message_responses(400, 401, 403, 413, 415, 429, 503),
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": BATCH_REQUEST_SCHEMA,
                    "examples": {
                        "one_wrong_answer": {
                            "summary": "Python, one wrong answer",
                            "value": _PYTHON_BATCH,
                        },
                        "compile_error": {"summary": "C that does not compile", "value": _C_BATCH},
                    },
                }
            },
        }
    },
}


def _never_admitted(
    tenant: Tenant, client: ClientLimit | None, settings: Settings, count: int
) -> BadRequest | None:
    """A batch larger than a whole window (or the whole daily quota) could never be admitted:
    a 429 would only send the client to wait and retry forever."""
    limit = tenant.rate_limit or settings.default_rate_limit
    for window in counted_windows(limit, client, settings.rate_limit_strategy):
        if count > window.amount:
            return BadRequest(
                f"this batch needs {count} executions, more than the rate limit of"
                f" {window.describe()} allows at all: send at most {window.amount} cases"
            )
    if tenant.daily_quota and count > tenant.daily_quota:
        return BadRequest(
            f"this batch needs {count} executions, more than the daily quota of"
            f" {tenant.daily_quota}: send at most {tenant.daily_quota} cases"
        )
    return None


async def batch(request: Request) -> Response:
    """Run one program over test cases and grade each (scope `execute`; not part of Piston)."""
    principal = principal_of(request)  # authorized by the router (app.api.deps)
    state = get_state(request)
    settings, tenant = state.settings, principal.tenant
    body = await read_json_body(request, settings.max_body_bytes)
    parsed = parse_batch(body, max_cases=settings.max_batch_cases)
    base = plan(tenant, parsed.execute, request.headers, settings=settings, catalog=state.catalog)
    run = _Run(state, parsed, base)
    bound = min(tenant.max_concurrency or settings.max_concurrency, settings.max_concurrency)
    count = len(parsed.cases)
    client = client_limit(request, principal)
    never = _never_admitted(tenant, client, settings, count)
    if never is not None:
        raise never
    async with admit(
        state,
        tenant,
        base,
        cost=count,
        # The leases must outlive the whole batch, which may get only one of them (then the
        # cases run one after another): a lease per case's time, all in a row.
        lease_ttl_ms=base.lease_ttl_ms * count,
        read_cache=False,
        client=client,
        leases=min(count, bound),
    ) as admission:
        # Every case in flight holds one of the tenant's leases: as many side by side as the
        # batch got (a tenant without a cap takes none, and is bound by the process's slots).
        concurrency = admission.leases if admission.lease is not None else bound
        results = await run.run_all(concurrency, admission)
    return json_response(
        answer_json(base.runtime.language, base.runtime.version, results),
        headers=admission.headers,
    )


# Like every Piston path, also with a trailing slash.
with_trailing_slash(router, "POST", "/batch", batch, **_DOCS)
