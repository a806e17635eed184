"""POST /api/v2/batch through an in-process gateway, every case run by the real engine."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, GatewayFactory
from tests.fakes import FakePiston, serve_fake

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"


def python(source: str, **fields: Any) -> dict[str, Any]:
    return {
        "language": "python",
        "version": "*",
        "files": [{"name": "main.py", "content": source}],
        **fields,
    }


async def post(gateway: Gateway, key: str, body: Any) -> httpx.Response:
    return await gateway.client.post(
        "/api/v2/batch", json=body, headers={"Authorization": f"Bearer {key}"}
    )


def verdicts(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [case["verdict"] for case in response.json()["cases"]]


class TestVerdicts:
    async def test_accepted_wrong_answer_and_ran(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        body = python(
            ADD,
            cases=[
                {"id": "small", "stdin": "1 2", "expected_output": "3"},
                {"id": "wrong", "stdin": "2 2", "expected_output": "5"},
                {"id": "free", "stdin": "4 4"},
            ],
        )
        response = await post(gateway, key, body)
        data = response.json()
        assert verdicts(response) == ["accepted", "wrong_answer", "ran"]
        assert [c["id"] for c in data["cases"]] == ["small", "wrong", "free"]
        assert data["cases"][1]["run"]["stdout"] == "4\n"  # Piston's stage, unchanged
        assert data["language"] == "python"
        summary = data["summary"]
        assert {k: summary[k] for k in ("cases", "passed", "failed", "not_run", "verdict")} == {
            "cases": 3,
            "passed": 2,
            "failed": 1,
            "not_run": 0,
            "verdict": "wrong_answer",
        }
        assert summary["cpu_time"] > 0
        assert summary["wall_time"] > 0
        assert {c["cache"] for c in data["cases"]} == {"MISS"}
        assert response.headers["X-RateLimit-Remaining"] == "57"  # 60/minute, 3 taken

    async def test_runtime_time_and_output_limits(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        source = (
            "import sys, time\n"
            "kind = input()\n"
            "if kind == 'raise': raise SystemExit(3)\n"
            "if kind == 'crash': 1 / 0\n"
            "if kind == 'sleep': time.sleep(30)\n"
            "if kind == 'flood':\n"
            "    while True: sys.stdout.write('x' * 65536)\n"
            "print('ok')\n"
        )
        cases = [{"stdin": kind} for kind in ("raise", "crash", "sleep", "flood", "fine")]
        body = python(source, cases=cases, run_timeout=1000)
        response = await post(gateway, key, body)
        assert verdicts(response) == [
            "runtime_error",
            "runtime_error",
            "time_limit",
            "output_limit",
            "ran",
        ]
        run = response.json()["cases"]
        assert run[0]["run"]["code"] == 3
        assert run[2]["run"]["status"] == "TO"
        assert run[3]["run"]["status"] in ("OL", "EL")
        assert response.json()["summary"]["verdict"] == "runtime_error"

    async def test_compile_error_leaves_the_rest_not_run(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        body = {
            "language": "c",
            "version": "*",
            "files": [{"name": "main.c", "content": "int main(void) { return 0 }"}],
            "cases": [{"stdin": "1"}, {"stdin": "2"}, {"stdin": "3"}],
        }
        response = await post(gateway, key, body)
        assert verdicts(response) == ["compile_error", "not_run", "not_run"]
        data = response.json()
        assert data["cases"][0]["compile"]["code"] != 0
        assert "error" in data["cases"][0]["compile"]["stderr"]
        assert data["cases"][1] == {"id": "1", "verdict": "not_run", "cache": "BYPASS"}
        summary = data["summary"]
        assert (summary["passed"], summary["failed"], summary["not_run"]) == (0, 1, 2)
        assert summary["verdict"] == "compile_error"

    async def test_a_c_program_that_compiles_is_graded(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        source = (
            '#include <stdio.h>\nint main(void){int a,b;scanf("%d %d",&a,&b);printf("%d\\n",a*b);}'
        )
        body = {
            "language": "c",
            "version": "*",
            "files": [{"name": "main.c", "content": source}],
            "cases": [
                {"stdin": "2 3", "expected_output": "6"},
                {"stdin": "4 4", "expected_output": "15"},
            ],
        }
        response = await post(gateway, key, body)
        assert verdicts(response) == ["accepted", "wrong_answer"]
        assert response.json()["cases"][0]["compile"]["code"] == 0

    async def test_stop_on_failure(self, gateway: Gateway) -> None:
        key = await gateway.tenant(max_concurrency=1)
        cases = [
            {"stdin": "1 1", "expected_output": "2"},
            {"stdin": "1 1", "expected_output": "3"},
            {"stdin": "2 2", "expected_output": "4"},
        ]
        stopped = await post(gateway, key, python(ADD, cases=cases, stop_on_failure=True))
        assert verdicts(stopped) == ["accepted", "wrong_answer", "not_run"]
        assert stopped.json()["summary"]["not_run"] == 1
        going_on = await post(gateway, key, python(ADD, cases=cases))
        assert verdicts(going_on) == ["accepted", "wrong_answer", "accepted"]

    async def test_args_per_case(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        body = python(
            "import sys\nprint(*sys.argv[1:])\n",
            cases=[{"args": ["a", "b"], "expected_output": "a b"}, {"args": []}],
        )
        response = await post(gateway, key, body)
        assert verdicts(response) == ["accepted", "ran"]
        assert response.json()["cases"][1]["run"]["stdout"] == "\n"

    async def test_internal_error_when_the_upstream_fails(
        self, make_gateway: GatewayFactory
    ) -> None:
        async with serve_fake(FakePiston(mode="500")) as fake:
            gateway = await make_gateway(piston_urls=[fake.url])
            key = await gateway.tenant()
            body = python("print(1)", cases=[{"stdin": "x"}, {"stdin": "y"}])
            response = await post(gateway, key, body)
        assert verdicts(response) == ["internal_error", "internal_error"]
        case = response.json()["cases"][0]
        assert case["message"].startswith("the upstream failed with status 500")
        assert response.json()["summary"]["verdict"] == "internal_error"
        [today] = await gateway.state.gate.usage("acme", days=1)
        assert (today["executions"], today["errors"]) == (2, 1)  # two runs, one failed request


class TestCompareModes:
    @pytest.mark.parametrize(
        ("compare", "expected"),
        [
            ("lines", ["accepted", "accepted", "wrong_answer", "wrong_answer"]),
            ("exact", ["wrong_answer", "accepted", "wrong_answer", "wrong_answer"]),
            ("tokens", ["accepted", "accepted", "accepted", "wrong_answer"]),
        ],
    )
    async def test_modes_on_real_output(
        self, gateway: Gateway, compare: str, expected: list[str]
    ) -> None:
        key = await gateway.tenant()
        source = "import sys\nsys.stdout.write('1 2  \\n\\n')\n"  # trailing spaces, empty line
        cases = [
            {"expected_output": "1 2"},
            {"expected_output": "1 2  \n\n"},
            {"expected_output": "1\n2"},  # the same tokens on other lines
            {"expected_output": "1 3"},
        ]
        response = await post(gateway, key, python(source, cases=cases, compare=compare))
        assert verdicts(response) == expected


class TestCacheSharedWithExecute:
    async def test_a_case_then_an_execute_of_the_same_input_hits(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        source = "import random\nprint(input(), random.random())\n"
        response = await post(gateway, key, python(source, cases=[{"stdin": "a"}]))
        case = response.json()["cases"][0]
        assert case["cache"] == "MISS"
        execute = await gateway.execute(key, python(source, stdin="a"))
        assert execute.headers["x-cache"] == "HIT"
        assert execute.json()["run"] == case["run"]

    async def test_an_execute_then_a_case_hits(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        source = "import random, sys\nprint(input(), sys.argv[1:], random.random())\n"
        execute = await gateway.execute(key, python(source, stdin="b", args=["x"]))
        assert execute.headers["x-cache"] == "MISS"
        body = python(source, cases=[{"stdin": "b", "args": ["x"]}, {"stdin": "b"}])
        response = await post(gateway, key, body)
        cases = response.json()["cases"]
        assert [c["cache"] for c in cases] == ["HIT", "MISS"]
        assert cases[0]["run"] == execute.json()["run"]
        [today] = await gateway.state.gate.usage("acme", days=1)
        assert (today["executions"], today["cache_hits"]) == (3, 1)

    async def test_a_case_joins_the_flight_of_an_execute_in_flight(
        self, make_gateway: GatewayFactory
    ) -> None:
        async with serve_fake(FakePiston(delay=1.0)) as fake:
            gateway = await make_gateway(piston_urls=[fake.url])
            key = await gateway.tenant()
            execute = asyncio.create_task(gateway.execute(key, python("print(1)", stdin="x")))
            deadline = asyncio.get_running_loop().time() + 5
            while fake.executions == 0:  # the execute has reached the upstream, which waits
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            body = python("print(1)", cases=[{"stdin": "x"}, {"stdin": "x"}])
            response = await post(gateway, key, body)
            assert (await execute).headers["x-cache"] == "MISS"
        # The first case joined the execute's flight; the second, started after it, found the
        # answer stored: one run upstream for all three.
        assert [c["cache"] for c in response.json()["cases"]] == ["MISS", "HIT"]
        assert verdicts(response) == ["ran", "ran"]
        assert fake.executions == 1

    async def test_no_store_bypasses_every_case(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        response = await gateway.client.post(
            "/api/v2/batch",
            json=python("print(1)", cases=[{}, {"stdin": "x"}]),
            headers={"Authorization": f"Bearer {key}", "Cache-Control": "no-store"},
        )
        assert [c["cache"] for c in response.json()["cases"]] == ["BYPASS", "BYPASS"]


class TestAdmission:
    async def test_all_or_nothing(self, gateway: Gateway) -> None:
        key = await gateway.tenant(rate_limit="5/minute")
        cases = [{"stdin": str(n)} for n in range(5)]
        first = await post(gateway, key, python("print(input())", cases=cases[:2]))
        assert verdicts(first) == ["ran"] * 2
        refused = await post(gateway, key, python("print(input())", cases=cases[:4]))
        assert refused.status_code == 429
        assert refused.json() == {
            "message": "this request needs 4 executions and 3 are left: "
            "rate limit exceeded: 5 per 1 minute"
        }
        assert refused.headers["X-RateLimit-Remaining"] == "3"
        assert "Retry-After" in refused.headers
        admitted = await post(gateway, key, python("print(input())", cases=cases[2:5]))
        assert verdicts(admitted) == ["ran"] * 3
        assert admitted.headers["X-RateLimit-Remaining"] == "0"
        one_more = await gateway.execute(key, python("print(1)"))
        assert one_more.status_code == 429

    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            (
                {"rate_limit": "5/minute"},
                "this batch needs 6 executions, more than the rate limit of 5 per 1 minute"
                " allows at all: send at most 5 cases",
            ),
            (
                {"rate_limit": "100/minute;5/hour"},
                "this batch needs 6 executions, more than the rate limit of 5 per 1 hour"
                " allows at all: send at most 5 cases",
            ),
            (
                {"daily_quota": 5},
                "this batch needs 6 executions, more than the daily quota of 5:"
                " send at most 5 cases",
            ),
        ],
    )
    async def test_a_batch_that_can_never_fit_is_400_not_a_429_to_retry(
        self, gateway: Gateway, fields: dict[str, Any], message: str
    ) -> None:
        key = await gateway.tenant(**fields)
        cases = [{"stdin": str(n)} for n in range(6)]
        refused = await post(gateway, key, python("print(input())", cases=cases))
        assert refused.status_code == 400
        assert refused.json() == {"message": message}
        assert "Retry-After" not in refused.headers
        # It consumed nothing: five still fit.
        admitted = await post(gateway, key, python("print(input())", cases=cases[:5]))
        assert verdicts(admitted) == ["ran"] * 5

    async def test_usage_counts_every_case(self, gateway: Gateway) -> None:
        key = await gateway.tenant(daily_quota=10)
        cases = [{"stdin": str(n)} for n in range(4)]
        response = await post(gateway, key, python("print(input())", cases=cases))
        assert response.headers["RateLimit-Policy"].endswith('"daily";q=10;w=86400')
        [today] = await gateway.state.gate.usage("acme", days=1)
        assert today["executions"] == 4
        assert today["cpu_time_ms"] > 0

    async def test_quota_refuses_a_batch_over_what_is_left(self, gateway: Gateway) -> None:
        key = await gateway.tenant(daily_quota=5)
        cases = [{"stdin": str(n)} for n in range(3)]
        assert (await post(gateway, key, python("print(input())", cases=cases))).status_code == 200
        refused = await post(gateway, key, python("print(input())", cases=cases))
        assert refused.status_code == 429
        assert refused.json()["message"].startswith(
            "this request needs 3 executions and 2 are left: daily quota of 5 executions reached"
        )


class TestConcurrency:
    async def test_cases_run_at_most_the_tenant_cap_at_a_time(self, gateway: Gateway) -> None:
        key = await gateway.tenant(max_concurrency=2)
        # Each case prints when it started and ended (the host's clock: the sandbox shares it).
        source = "import time\ns = time.time()\ntime.sleep(0.8)\nprint(s, time.time())\n"
        cases = [{"stdin": str(n)} for n in range(5)]  # distinct inputs: no shared flight
        response = await post(gateway, key, python(source, cases=cases))
        assert verdicts(response) == ["ran"] * 5
        spans = [tuple(map(float, c["run"]["stdout"].split())) for c in response.json()["cases"]]
        # The most cases running at one instant: at every start, count the spans covering it.
        overlap = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
        # Never more than the cap; and the cap is used (0.8 s sleeps started together overlap).
        assert overlap == 2

    async def test_a_batch_holds_one_of_the_tenants_leases(self, gateway: Gateway) -> None:
        key = await gateway.tenant(max_concurrency=1)
        source = "import time\ntime.sleep(0.5)\nprint(input())\n"
        body = python(source, cases=[{"stdin": "1"}, {"stdin": "2"}])
        running = asyncio.create_task(post(gateway, key, body))
        deadline = asyncio.get_running_loop().time() + 5
        while gateway.state.slots.in_flight == 0:  # the batch's first case is upstream
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        refused = await gateway.execute(key, python("print(2)"))
        assert refused.status_code == 429
        assert refused.json() == {"message": "concurrency limit of 1 executions in flight reached"}
        assert verdicts(await running) == ["ran", "ran"]
        # The lease is given back with the batch's answer.
        assert (await gateway.execute(key, python("print(3)"))).status_code == 200

    async def test_a_batch_takes_only_the_leases_left(self, gateway: Gateway) -> None:
        """With one execute in flight and a cap of 3, a batch runs 2 cases at a time, not 3:
        every execution in flight holds one of the tenant's leases."""
        key = await gateway.tenant(max_concurrency=3)
        source = "import time\ns = time.time()\ntime.sleep(0.8)\nprint(s, time.time())\n"
        slow = asyncio.create_task(
            gateway.execute(key, python("import time\ntime.sleep(3)\nprint('slow')"))
        )
        deadline = asyncio.get_running_loop().time() + 5
        while gateway.state.slots.in_flight == 0:  # the execute holds its lease, upstream
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        cases = [{"stdin": str(n)} for n in range(5)]
        response = await post(gateway, key, python(source, cases=cases))
        assert verdicts(response) == ["ran"] * 5
        spans = [tuple(map(float, c["run"]["stdout"].split())) for c in response.json()["cases"]]
        overlap = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
        assert overlap == 2
        assert (await slow).status_code == 200

    async def test_a_second_batch_is_refused_while_the_first_holds_every_lease(
        self, gateway: Gateway
    ) -> None:
        key = await gateway.tenant(max_concurrency=2)
        source = "import time\ntime.sleep(0.6)\nprint(input())\n"
        first = asyncio.create_task(
            post(gateway, key, python(source, cases=[{"stdin": str(n)} for n in range(3)]))
        )
        deadline = asyncio.get_running_loop().time() + 5
        while gateway.state.slots.in_flight == 0:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        second = await post(gateway, key, python(source, cases=[{"stdin": "9"}]))
        assert second.status_code == 429
        assert second.json() == {"message": "concurrency limit of 2 executions in flight reached"}
        assert verdicts(await first) == ["ran"] * 3
        # Every lease is given back with the answer: a batch using both runs again.
        again = await post(gateway, key, python(source, cases=[{"stdin": "7"}, {"stdin": "8"}]))
        assert verdicts(again) == ["ran", "ran"]


class TestValidation:
    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"cases": []}, "cases is required as an array of 1 to 50 cases"),
            ({"cases": {"stdin": "x"}}, "cases is required as an array of 1 to 50 cases"),
            ({"cases": [{}] * 51}, "cases is required as an array of 1 to 50 cases"),
            ({"cases": [{}, {}, {}, {"stdin": 3}]}, "cases[3].stdin must be a string"),
            ({"cases": ["x"]}, "cases[0] must be an object"),
            ({"cases": [{"args": "a"}]}, "cases[0].args must be an array of strings"),
            ({"cases": [{"args": [1]}]}, "cases[0].args[0] must be a string"),
            (
                {"cases": [{"args": ["a\x00b"]}]},
                "cases[0].args[0] must not contain a NUL character",
            ),
            ({"cases": [{"expected_output": 3}]}, "cases[0].expected_output must be a string"),
            ({"cases": [{"id": 1}]}, "cases[0].id must be a string of 1 to 64 characters"),
            ({"cases": [{"id": ""}]}, "cases[0].id must be a string of 1 to 64 characters"),
            ({"cases": [{"id": "x" * 65}]}, "cases[0].id must be a string of 1 to 64 characters"),
            (
                {"cases": [{"id": "a"}, {"id": "a"}]},
                "cases[1].id 'a' is already the id of cases[0]; ids must be unique",
            ),
            (
                {"cases": [{"id": "1"}, {}]},
                "cases[1].id '1' is already the id of cases[0]; ids must be unique",
            ),
            (
                {"cases": [{"expected": "3"}]},
                "cases[0].expected is not a field of a case "
                "(one of id, stdin, args, expected_output)",
            ),
            ({"compare": "fuzzy"}, "compare must be one of lines, exact, tokens"),
            ({"compare": 1}, "compare must be one of lines, exact, tokens"),
            ({"stop_on_failure": "yes"}, "stop_on_failure must be true or false"),
            ({"stop_on_failure": 0}, "stop_on_failure must be true or false"),
            ({"stdin": "x"}, "stdin is given per case in a batch: cases[].stdin"),
            ({"args": ["x"]}, "args is given per case in a batch: cases[].args"),
            # The whole request's errors are execute's.
            ({"files": []}, "files must include at least one file"),
            ({"run_timeout": 10**9}, "run_timeout cannot exceed the configured limit of 3000"),
            ({"language": "cobol-9000"}, None),
        ],
    )
    async def test_refused_with_a_message(
        self, gateway: Gateway, change: dict[str, Any], message: str | None
    ) -> None:
        key = await gateway.tenant()
        body = {**python("print(1)", cases=[{}]), **change}
        response = await post(gateway, key, body)
        assert response.status_code == 400, response.text
        if message is not None:
            assert response.json() == {"message": message}
        else:
            assert "cobol-9000" in response.json()["message"]
        [today] = await gateway.state.gate.usage("acme", days=1)
        assert today["executions"] == 0  # nothing admitted, nothing counted

    async def test_language_not_allowed_is_403(self, gateway: Gateway) -> None:
        key = await gateway.tenant(allowed_languages=["bash"])
        response = await post(gateway, key, python("print(1)", cases=[{}]))
        assert response.status_code == 403
        assert response.json() == {"message": "language 'python' is not allowed for this key"}

    async def test_a_smaller_case_cap(self, make_gateway: GatewayFactory) -> None:
        gateway = await make_gateway(max_batch_cases=2)
        key = await gateway.tenant()
        response = await post(gateway, key, python("print(1)", cases=[{}, {}, {}]))
        assert response.json() == {"message": "cases is required as an array of 1 to 2 cases"}

    async def test_needs_a_key_and_json(self, gateway: Gateway) -> None:
        assert (await gateway.client.post("/api/v2/batch", json={})).status_code == 401
        key = await gateway.tenant()
        response = await gateway.client.post(
            "/api/v2/batch",
            content=b"x",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "text/plain"},
        )
        assert response.status_code == 415

    async def test_trailing_slash(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        response = await gateway.client.post(
            "/api/v2/batch/",
            json=python("print(1)", cases=[{"expected_output": "1"}]),
            headers={"Authorization": f"Bearer {key}"},
        )
        assert verdicts(response) == ["accepted"]


async def test_openapi_documents_the_batch(gateway: Gateway) -> None:
    document = (await gateway.client.get("/openapi.json")).json()
    operation = document["paths"]["/api/v2/batch"]["post"]
    assert "/api/v2/batch/" not in document["paths"]
    requests = operation["requestBody"]["content"]["application/json"]["examples"]
    answers = operation["responses"]["200"]["content"]["application/json"]["examples"]
    assert set(requests) == set(answers) == {"one_wrong_answer", "compile_error"}
    assert answers["compile_error"]["value"]["summary"]["verdict"] == "compile_error"
    assert answers["one_wrong_answer"]["value"]["summary"]["verdict"] == "wrong_answer"
    for status in ("400", "401", "403", "413", "415", "429", "503"):
        assert status in operation["responses"]


@pytest.mark.parametrize("name", ["one_wrong_answer", "compile_error"])
async def test_the_documented_examples_are_what_the_engine_answers(
    gateway: Gateway, name: str
) -> None:
    document = (await gateway.client.get("/openapi.json")).json()
    operation = document["paths"]["/api/v2/batch"]["post"]
    request = operation["requestBody"]["content"]["application/json"]["examples"][name]["value"]
    shown = operation["responses"]["200"]["content"]["application/json"]["examples"][name]["value"]
    key = await gateway.tenant()
    answer = (await post(gateway, key, request)).json()
    counts = ("cases", "passed", "failed", "not_run", "verdict")
    assert {k: answer["summary"][k] for k in counts} == {k: shown["summary"][k] for k in counts}
    assert [(c["id"], c["verdict"], c.get("cache")) for c in answer["cases"]] == [
        (c["id"], c["verdict"], c.get("cache")) for c in shown["cases"]
    ]
    for got, documented in zip(answer["cases"], shown["cases"], strict=True):
        for stage in ("compile", "run"):
            assert (stage in got) == (stage in documented)
            if stage in got:
                assert got[stage]["code"] == documented[stage]["code"]
                assert got[stage]["stdout"] == documented[stage]["stdout"]
