"""The pure part of batch runs: parsing cases, the three comparisons, verdicts and the summary."""

from __future__ import annotations

from typing import Any

import pytest

from app.batch import (
    Case,
    CaseResult,
    Compare,
    answer_json,
    outputs_match,
    parse_batch,
    stops_batch,
    summary,
    verdict,
)
from app.errors import BadRequest

BODY: dict[str, Any] = {
    "language": "python",
    "version": "*",
    "files": [{"content": "print(input())"}],
    "run_timeout": 1000,
}


def stage(
    stdout: str | None = "", *, code: int | None = 0, status: str | None = None, **kw: Any
) -> Any:
    return {"stdout": stdout, "stderr": "", "code": code, "signal": None, "status": status, **kw}


class TestParse:
    def test_defaults(self) -> None:
        parsed = parse_batch({**BODY, "cases": [{}, {"stdin": "x", "args": ["a"]}]}, max_cases=50)
        assert parsed.cases == (Case("0"), Case("1", "x", ("a",)))
        assert (parsed.compare, parsed.stop_on_failure) == ("lines", False)
        assert parsed.execute == BODY  # what execute's parser sees: no batch fields

    def test_nulls_are_absent(self) -> None:
        raw = {"id": None, "stdin": None, "args": None, "expected_output": None}
        parsed = parse_batch(
            {**BODY, "cases": [raw], "compare": None, "stop_on_failure": None}, max_cases=5
        )
        assert parsed.cases == (Case("0"),)

    def test_fields_kept(self) -> None:
        parsed = parse_batch(
            {
                **BODY,
                "cases": [{"id": "a" * 64, "expected_output": "", "stdin": "\x00"}],
                "compare": "tokens",
                "stop_on_failure": True,
            },
            max_cases=1,
        )
        assert parsed.cases == (Case("a" * 64, "\x00", (), ""),)  # NUL in stdin is data
        assert (parsed.compare, parsed.stop_on_failure) == ("tokens", True)

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            ([], "request body must be a JSON object"),
            ({**BODY}, "cases is required as an array of 1 to 3 cases"),
            ({**BODY, "cases": [{}] * 4}, "cases is required as an array of 1 to 3 cases"),
            ({**BODY, "cases": [{}, {"stdin": 1}]}, "cases[1].stdin must be a string"),
            (
                {**BODY, "cases": [{"id": True}]},
                "cases[0].id must be a string of 1 to 64 characters",
            ),
            ({**BODY, "cases": [{"args": [None]}]}, "cases[0].args[0] must be a string"),
            (
                {**BODY, "cases": [{"expected_output": ["3"]}]},
                "cases[0].expected_output must be a string",
            ),
            (
                {**BODY, "cases": [{}], "compare": ["lines"]},
                "compare must be one of lines, exact, tokens",
            ),
            (
                {**BODY, "cases": [{}], "compare": "LINES"},
                "compare must be one of lines, exact, tokens",
            ),
            (
                {**BODY, "cases": [{}], "stop_on_failure": 1},
                "stop_on_failure must be true or false",
            ),
            (
                {**BODY, "cases": [{}], "stop_on_failure": "true"},
                "stop_on_failure must be true or false",
            ),
            (
                {**BODY, "cases": [{}], "stdin": ""},
                "stdin is given per case in a batch: cases[].stdin",
            ),
        ],
    )
    def test_refusals(self, body: Any, message: str) -> None:
        with pytest.raises(BadRequest) as info:
            parse_batch(body, max_cases=3)
        assert info.value.message == message


class TestCompare:
    @pytest.mark.parametrize(
        ("actual", "expected", "lines", "exact", "tokens"),
        [
            ("3\n", "3", True, False, True),
            ("3", "3", True, True, True),
            ("a  \r\nb\t\n\n\n", "a\nb", True, False, True),
            ("a\n\nb\n", "a\nb\n", False, False, True),  # an empty line inside counts for lines
            ("  a\n", "a\n", False, False, True),  # leading whitespace counts for lines
            ("a b\n", "a\nb\n", False, False, True),
            ("a b\n", "ab\n", False, False, False),
            ("", "", True, True, True),
            ("\n\n", "", True, False, True),
            ("x", "", False, False, False),
        ],
    )
    def test_modes(
        self, actual: str, expected: str, lines: bool, exact: bool, tokens: bool
    ) -> None:
        modes: dict[Compare, bool] = {"lines": lines, "exact": exact, "tokens": tokens}
        for mode, want in modes.items():
            assert outputs_match(actual, expected, mode) is want, mode


class TestVerdict:
    @pytest.mark.parametrize(
        ("answer", "expected", "want"),
        [
            ({"run": stage("3\n")}, "3", "accepted"),
            ({"run": stage("4\n")}, "3", "wrong_answer"),
            ({"run": stage("4\n")}, None, "ran"),
            ({"run": stage("3\n", code=1)}, "3", "runtime_error"),
            ({"run": stage("", code=None, status="SG", signal="SIGKILL")}, None, "runtime_error"),
            ({"run": stage("", code=1, status="RE")}, None, "runtime_error"),
            ({"run": stage("3\n", code=None, status="TO")}, "3", "time_limit"),
            ({"run": stage("", code=None, status="OL")}, None, "output_limit"),
            ({"run": stage("", code=None, status="EL")}, None, "output_limit"),
            ({"run": stage("", code=None, status="XX")}, None, "internal_error"),
            ({"compile": stage(code=1), "run": stage(code=1)}, None, "compile_error"),
            ({"compile": stage(code=None, status="TO")}, None, "compile_error"),
            ({"compile": stage(code=None, status="XX")}, None, "internal_error"),
            ({"compile": stage(), "run": stage("3")}, "3", "accepted"),
            ({"language": "python"}, None, "internal_error"),
            ({"run": stage(None)}, "", "wrong_answer"),
        ],
    )
    def test_verdicts(self, answer: dict[str, Any], expected: str | None, want: str) -> None:
        assert verdict(answer, expected, "lines") == want

    def test_the_compare_mode_is_used(self) -> None:
        assert verdict({"run": stage("3\n")}, "3", "exact") == "wrong_answer"

    @pytest.mark.parametrize(
        ("case_verdict", "stop_on_failure", "stops"),
        [
            ("compile_error", False, True),
            ("wrong_answer", False, False),
            ("wrong_answer", True, True),
            ("internal_error", True, True),
            ("accepted", True, False),
            ("ran", True, False),
        ],
    )
    def test_what_stops_a_batch(
        self, case_verdict: Any, stop_on_failure: bool, stops: bool
    ) -> None:
        assert stops_batch(case_verdict, stop_on_failure=stop_on_failure) is stops


class TestSummary:
    def test_counts_add_up_and_first_failure_is_the_verdict(self) -> None:
        results = [
            CaseResult("a", "accepted", "MISS", {"run": stage(cpu_time=5, wall_time=10)}),
            CaseResult("b", "ran", "HIT", {"run": stage(cpu_time=5, wall_time=10)}),
            CaseResult("c", "time_limit", "MISS", {"run": stage(cpu_time=2.5, wall_time=1000)}),
            CaseResult("d", "wrong_answer", "MISS", {"run": stage(cpu_time=1, wall_time=1)}),
            CaseResult("e", "not_run"),
        ]
        assert summary(results) == {
            "cases": 5,
            "passed": 2,
            "failed": 2,
            "not_run": 1,
            "verdict": "time_limit",
            "cpu_time": 13.5,
            "wall_time": 1021,
        }

    def test_all_passed_is_accepted(self) -> None:
        results = [CaseResult("a", "ran", "MISS", {"run": stage()})]
        assert summary(results)["verdict"] == "accepted"

    def test_a_mirrored_compile_is_counted_once(self) -> None:
        failed = stage(code=1, cpu_time=40, wall_time=50)
        results = [
            CaseResult("0", "compile_error", "MISS", {"compile": failed, "run": dict(failed)}),
            CaseResult("1", "not_run"),
        ]
        assert (summary(results)["cpu_time"], summary(results)["wall_time"]) == (40, 50)

    def test_answer_shape(self) -> None:
        run = stage("1\n")
        results = [
            CaseResult("0", "ran", "BYPASS", {"language": "python", "run": run}),
            CaseResult("1", "internal_error", "MISS", message="the upstream failed"),
            CaseResult("2", "not_run"),
        ]
        data = answer_json("python", "3.12.3", results)
        assert data["cases"] == [
            {"id": "0", "verdict": "ran", "cache": "BYPASS", "run": run},
            {
                "id": "1",
                "verdict": "internal_error",
                "cache": "MISS",
                "message": "the upstream failed",
            },
            {"id": "2", "verdict": "not_run", "cache": "BYPASS"},
        ]
        assert (data["language"], data["version"]) == ("python", "3.12.3")
