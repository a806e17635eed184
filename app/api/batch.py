"""`POST /api/v2/batch`: one program over many cases, each graded (a gateway extension).

Each case goes the way of the execute with its `stdin` and `args`: the batch's body is parsed,
resolved and put through the policy once (execute's `_effective`, so the whole-request errors are
execute's), and each case's effective request is that one with the case's input, so its cache key
is the execute's and an execute of the same program and input shares its entry and its flight
(`_cache_plan`, `_execute_once`).

Admission: the N cases are N executions of the tenant's rate limit and quota, taken in ONE admit
(`cost=N`), all or nothing. Concurrency: the batch holds one lease of the tenant's
`max_concurrency` for its whole run (so it is refused like an execute when the tenant is at its
cap) and runs its cases under a semaphore of `max_concurrency` of its own (the process's
`GATEWAY_MAX_CONCURRENCY` for a tenant without a cap), each inside the process's upstream slots
like any execute. The tenant's cap thus bounds the cases of one batch in flight; taking one lease
per running case instead would make a batch of a tenant with a cap of 1 racing its own executes
fail midway, which the all-or-nothing admission promises it will not.

Order: the first case runs alone, then the others start in request order, up to the bound at once.
A compile error (or, with `stop_on_failure`, any failure) stops the starting: the cases not
started yet are `not_run`; those already running finish and are shown as they ended. So the
`not_run` cases are always the last ones, and a program that does not compile costs one compile,
not N.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any, Final, Literal

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.piston import _cache_plan, _CachePlan, _effective, _execute_once, _timing
from app.batch import BatchRequest, CaseResult, answer_json, parse_batch, stops_batch, verdict
from app.errors import GatewayError, message_responses
from app.http import json_response, read_json_body
from app.piston.resolve import Runtime
from app.piston.schemas import ExecuteRequest
from app.state import AppState, get_state
from app.tenancy.auth import authorize, client_limit
from app.tenancy.models import Tenant

__all__ = ["BATCH_REQUEST_SCHEMA", "BATCH_RESPONSE_SCHEMA", "router"]

router = APIRouter(prefix="/api/v2", tags=["batch"])

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
        {"id": "1", "verdict": "not_run"},
    ],
}

_STAGE_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "description": "Piston's stage, unchanged",
    "additionalProperties": True,
}
_VERDICTS: Final = [
    "accepted",
    "wrong_answer",
    "ran",
    "runtime_error",
    "time_limit",
    "output_limit",
    "compile_error",
    "internal_error",
    "not_run",
]
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
    """One batch in flight: its cases' plans, and the figures its finish() must count."""

    def __init__(
        self,
        state: AppState,
        request: Request,
        tenant: Tenant,
        batch: BatchRequest,
        runtime: Runtime,
        base: ExecuteRequest,
    ) -> None:
        self.state, self.batch, self.runtime = state, batch, runtime
        # The execute's effective request with this case's input: the same cache key.
        self.effective = [
            dataclasses.replace(base, stdin=case.stdin, args=case.args) for case in batch.cases
        ]
        self.plans = [
            _cache_plan(request, state.settings, tenant, effective) for effective in self.effective
        ]
        self.deadline_ms, self.case_lease_ms = _timing(state.settings, base)
        self.results: list[CaseResult | None] = [None] * len(batch.cases)
        self.stopped = False
        self.cpu_time_ms = self.wall_time_ms = 0.0
        self.cache_hits = 0
        self.errors = 0

    async def case(self, index: int) -> None:
        result = await self._run_case(index, self.plans[index])
        self.results[index] = result
        if stops_batch(result.verdict, stop_on_failure=self.batch.stop_on_failure):
            self.stopped = True

    async def _run_case(self, index: int, plan: _CachePlan) -> CaseResult:
        case, effective, state = self.batch.cases[index], self.effective[index], self.state
        body: bytes | None = None
        outcome: Literal["HIT", "MISS", "BYPASS"] = plan.mode.label
        if plan.lookup_key is not None:
            body = await state.gate.read(plan.lookup_key)
            if body is not None:
                outcome = "HIT"
                self.cache_hits += 1
        if body is None:
            try:
                result = await _execute_once(
                    state,
                    plan,
                    effective,
                    self.runtime,
                    deadline_ms=self.deadline_ms,
                    lock_ttl_ms=self.case_lease_ms,
                )
            except GatewayError as exc:  # the upstream failed for this case (or no slot)
                self.errors += 1
                return CaseResult(case.id, "internal_error", outcome, message=exc.message)
            if isinstance(result, bytes):  # another process ran it and stored the answer
                body = result
            else:
                body = result.body
                self.cpu_time_ms += result.cpu_time_ms
                self.wall_time_ms += result.wall_time_ms
        state.metrics.cache_outcomes[outcome].inc()
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):  # a stored entry is one of Piston's 200 answers
            self.errors += 1
            return CaseResult(case.id, "internal_error", outcome, message="unreadable answer")
        graded = verdict(answer, case.expected_output, self.batch.compare)
        return CaseResult(case.id, graded, outcome, answer=answer)

    async def run_all(self, concurrency: int) -> list[CaseResult]:
        # The first case alone: a compile error there leaves the others not run.
        await self.case(0)
        bound = asyncio.Semaphore(concurrency)

        async def bounded(index: int) -> None:
            try:
                await self.case(index)
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


async def batch(request: Request) -> Response:
    """Run one program over test cases and grade each (scope `execute`; not part of Piston)."""
    principal = await authorize(request, "execute")
    state = get_state(request)
    settings, tenant = state.settings, principal.tenant
    body = await read_json_body(request, settings.max_body_bytes)
    parsed = parse_batch(body, max_cases=settings.max_batch_cases)
    runtime, base = _effective(state, tenant, parsed.execute)
    run = _Run(state, request, tenant, parsed, runtime, base)
    concurrency = min(tenant.max_concurrency or settings.max_concurrency, settings.max_concurrency)
    count = len(parsed.cases)
    # The lease must outlive the whole batch: the first case, then rounds of `concurrency`.
    rounds = 1 + math.ceil((count - 1) / concurrency)
    admission = await state.gate.admit(
        tenant,
        cache_key=None,
        lease_ttl_ms=run.case_lease_ms * rounds,
        cost=count,
        client=client_limit(request, principal),
    )
    try:
        results = await run.run_all(concurrency)
    finally:  # also when cancelled (the client went away): release the lease, count the runs
        await state.gate.finish(
            admission,
            error=run.errors > 0,
            cpu_time_ms=run.cpu_time_ms,
            wall_time_ms=run.wall_time_ms,
            cache_hits=run.cache_hits,
        )
        state.metrics.tenant_executions.labels(tenant=tenant.id).inc(count)
    return json_response(
        answer_json(runtime.language, runtime.version, results), headers=admission.headers
    )


# Like every Piston path, also with a trailing slash (only the first is in the docs).
router.add_api_route("/batch", batch, methods=["POST"], **_DOCS)
router.add_api_route("/batch/", batch, methods=["POST"], include_in_schema=False, **_DOCS)
