"""Graded batch runs, the pure part: the body's cases, the three comparisons, verdicts, summary.

`POST /api/v2/batch` (app/api/batch.py) runs one program over many cases; everything here decides
what a case is, whether its output is right and what the batch's answer says, with no I/O, so it
can be tested over tables.

Strict types, as the admin API: a field of the wrong JSON type is a 400 naming it (`cases[3].stdin
must be a string`), never coerced. A field given as `null` is as if it were absent (execute treats
`stdin` and `args` so). A case with a key it does not know is refused: a misspelt
`expected_output` would otherwise grade every case `ran`, and a judge would read that as a pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast, get_args

from app.errors import BadRequest
from app.upstream.pool import stage_times

__all__ = [
    "BATCH_FIELDS",
    "CASE_FIELDS",
    "PASSED",
    "BatchRequest",
    "Case",
    "CaseResult",
    "Compare",
    "Verdict",
    "answer_json",
    "outputs_match",
    "parse_batch",
    "stops_batch",
    "summary",
    "verdict",
]

Compare = Literal["lines", "exact", "tokens"]
COMPARE_MODES: Final[tuple[str, ...]] = get_args(Compare)
Verdict = Literal[
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
PASSED: Final = frozenset({"accepted", "ran"})
MAX_ID_LENGTH: Final = 64
# The batch's own fields; every other field is execute's, checked by execute's parser.
BATCH_FIELDS: Final = ("cases", "compare", "stop_on_failure")
CASE_FIELDS: Final = ("id", "stdin", "args", "expected_output")


@dataclass(frozen=True, slots=True)
class Case:
    id: str
    stdin: str = ""
    args: tuple[str, ...] = ()
    expected_output: str | None = None


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """A checked batch body: `execute` is the body execute would see, without stdin and args."""

    execute: dict[str, Any]
    cases: tuple[Case, ...]
    compare: Compare = "lines"
    stop_on_failure: bool = False


def _parse_case(index: int, raw: object) -> Case:
    where = f"cases[{index}]"
    if not isinstance(raw, dict):
        raise BadRequest(f"{where} must be an object")
    for name in raw:
        if name not in CASE_FIELDS:
            raise BadRequest(
                f"{where}.{name} is not a field of a case (one of {', '.join(CASE_FIELDS)})"
            )
    case_id = raw.get("id")
    if case_id is None:
        case_id = str(index)
    elif not isinstance(case_id, str) or not 1 <= len(case_id) <= MAX_ID_LENGTH:
        raise BadRequest(f"{where}.id must be a string of 1 to {MAX_ID_LENGTH} characters")
    stdin = raw.get("stdin")
    if stdin is None:
        stdin = ""
    elif not isinstance(stdin, str):
        raise BadRequest(f"{where}.stdin must be a string")
    args = raw.get("args")
    if args is None:
        args = []
    elif not isinstance(args, list):
        raise BadRequest(f"{where}.args must be an array of strings")
    for n, arg in enumerate(args):
        if not isinstance(arg, str):
            raise BadRequest(f"{where}.args[{n}] must be a string")
        if "\x00" in arg:
            # The upstream cannot pass it to a program (execve); NUL in stdin is data.
            raise BadRequest(f"{where}.args[{n}] must not contain a NUL character")
    expected = raw.get("expected_output")
    if expected is not None and not isinstance(expected, str):
        raise BadRequest(f"{where}.expected_output must be a string")
    return Case(id=case_id, stdin=stdin, args=tuple(args), expected_output=expected)


def parse_batch(body: object, *, max_cases: int) -> BatchRequest:
    """The batch's own fields and cases; execute's fields are left to execute's parser."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    for name in ("stdin", "args"):
        if body.get(name) is not None:
            raise BadRequest(f"{name} is given per case in a batch: cases[].{name}")
    raw_cases = body.get("cases")
    if not isinstance(raw_cases, list) or not 1 <= len(raw_cases) <= max_cases:
        raise BadRequest(f"cases is required as an array of 1 to {max_cases} cases")
    cases = tuple(_parse_case(i, raw) for i, raw in enumerate(raw_cases))
    seen: dict[str, int] = {}
    for index, case in enumerate(cases):
        if case.id in seen:
            raise BadRequest(
                f"cases[{index}].id {case.id!r} is already the id of cases[{seen[case.id]}];"
                " ids must be unique"
            )
        seen[case.id] = index
    raw_compare = body.get("compare")
    compare: Compare = "lines"
    if raw_compare is not None:
        if not isinstance(raw_compare, str) or raw_compare not in COMPARE_MODES:
            raise BadRequest(f"compare must be one of {', '.join(COMPARE_MODES)}")
        compare = cast(Compare, raw_compare)
    stop = body.get("stop_on_failure")
    if stop is None:
        stop = False
    elif not isinstance(stop, bool):
        raise BadRequest("stop_on_failure must be true or false")
    execute = {name: value for name, value in body.items() if name not in BATCH_FIELDS}
    return BatchRequest(execute=execute, cases=cases, compare=compare, stop_on_failure=stop)


# --------------------------------------------------------------------------- grading


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def outputs_match(actual: str, expected: str, compare: Compare) -> bool:
    """`lines`: each line's trailing whitespace and trailing empty lines ignored (so "\\r\\n"
    equals "\\n"); `exact`: byte for byte; `tokens`: the same whitespace-separated tokens."""
    if compare == "exact":
        return actual == expected
    if compare == "tokens":
        return actual.split() == expected.split()
    return _lines(actual) == _lines(expected)


def _compile_failed(stage: Mapping[str, Any]) -> bool:
    return stage.get("status") is not None or stage.get("code") != 0


def verdict(answer: Mapping[str, Any], expected: str | None, compare: Compare) -> Verdict:
    """A case's verdict from Piston's answer to its execute (stdout is what is compared)."""
    compile_stage = answer.get("compile")
    if isinstance(compile_stage, Mapping) and _compile_failed(compile_stage):
        # XX is the sandbox failing, not the program: the same verdict as in the run stage.
        return "internal_error" if compile_stage.get("status") == "XX" else "compile_error"
    run = answer.get("run")
    if not isinstance(run, Mapping):
        return "internal_error"
    status = run.get("status")
    if status == "XX":
        return "internal_error"
    if status == "TO":
        return "time_limit"
    if status in ("OL", "EL"):
        return "output_limit"
    if status is not None or run.get("code") != 0:
        return "runtime_error"  # RE, SG (or a status Piston may add), or a non-zero code
    if expected is None:
        return "ran"
    stdout = run.get("stdout")
    if isinstance(stdout, str) and outputs_match(stdout, expected, compare):
        return "accepted"
    return "wrong_answer"


def stops_batch(case_verdict: Verdict, *, stop_on_failure: bool) -> bool:
    """Whether the cases not started yet become `not_run`."""
    if case_verdict == "compile_error":
        return True  # the same program fails to compile for every case
    return stop_on_failure and case_verdict not in PASSED


@dataclass(frozen=True, slots=True)
class CaseResult:
    """One case's line of the answer; `answer` is Piston's answer to its execute, if it ran."""

    id: str
    verdict: Verdict
    # A case not run has touched no cache: BYPASS (the contract's case always names its cache).
    cache: Literal["HIT", "MISS", "BYPASS"] = "BYPASS"
    answer: Mapping[str, Any] | None = None
    message: str | None = None  # why, for an internal_error the gateway saw

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "verdict": self.verdict, "cache": self.cache}
        if self.answer is not None:
            for stage in ("compile", "run"):
                if stage in self.answer:
                    data[stage] = self.answer[stage]
        if self.message is not None:
            data["message"] = self.message
        return data


def _answer_times(answer: Mapping[str, Any]) -> tuple[float, float]:
    """cpu and wall ms of both stages; a failed compile that Piston mirrors as `run`, once."""
    cpu = wall = 0.0
    for name in ("compile", "run"):
        stage = answer.get(name)
        if not isinstance(stage, Mapping):
            continue
        if name == "run" and stage == answer.get("compile"):
            continue
        stage_cpu, stage_wall = stage_times(stage)
        cpu += stage_cpu
        wall += stage_wall
    return cpu, wall


def _whole(value: float) -> int | float:
    return int(value) if value.is_integer() else round(value, 3)


def summary(results: Sequence[CaseResult]) -> dict[str, Any]:
    """`passed` counts accepted and ran, `not_run` those not run, `failed` every other case;
    the verdict is `accepted` when every case passed, else the first failing case's verdict.
    cpu_time and wall_time add up the stages of every answer shown (a cache hit's included)."""
    passed = sum(1 for r in results if r.verdict in PASSED)
    not_run = sum(1 for r in results if r.verdict == "not_run")
    failing = [r.verdict for r in results if r.verdict not in PASSED and r.verdict != "not_run"]
    cpu = wall = 0.0
    for r in results:
        if r.answer is not None:
            case_cpu, case_wall = _answer_times(r.answer)
            cpu += case_cpu
            wall += case_wall
    return {
        "cases": len(results),
        "passed": passed,
        "failed": len(results) - passed - not_run,
        "not_run": not_run,
        "verdict": failing[0] if failing else "accepted",
        "cpu_time": _whole(cpu),
        "wall_time": _whole(wall),
    }


def answer_json(language: str, version: str, results: Sequence[CaseResult]) -> dict[str, Any]:
    """The batch's 200 answer, cases in request order."""
    return {
        "language": language,
        "version": version,
        "summary": summary(results),
        "cases": [r.as_json() for r in results],
    }
