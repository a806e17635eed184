"""Execute bodies are checked with Piston's messages, plus the checks Piston leaves to the job."""

from __future__ import annotations

from typing import Any

import pytest

from app.protocol.errors import InvalidRequest
from app.protocol.schemas import LIMIT_FIELDS, enforce_caps, parse_execute, require_utf8_file


def body(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"language": "python", "version": "*", "files": [{"content": "x"}]}
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "request body must be a JSON object"),
        ({"version": "*", "files": []}, "language is required as a string"),
        (body(language=3), "language is required as a string"),
        (body(version=None), "version is required as a string"),
        (body(files="x"), "files is required as an array"),
        (body(files=[]), "files must include at least one file"),
        (body(files=[{"content": 1}]), "files[0].content is required as a string"),
        (body(files=["x"]), "files[0] must be an object with a content string"),
        (
            body(files=[{"content": "x"}, {"name": 5, "content": "y"}]),
            "files[1].name must be a string",
        ),
        (
            body(files=[{"name": "/etc/passwd", "content": "x"}]),
            "files[0].name must be a relative path",
        ),
        (body(files=[{"name": "../x", "content": "x"}]), "files[0].name must be a relative path"),
        (
            body(files=[{"name": "a/../../x", "content": "x"}]),
            "files[0].name must be a relative path",
        ),
        (body(files=[{"name": "..", "content": "x"}]), "files[0].name must be a relative path"),
        (body(files=[{"content": "x", "encoding": "rot13"}]), "files[0].encoding must be one of"),
        (
            body(files=[{"content": "%%%", "encoding": "base64"}]),
            "files[0].content is not valid base64",
        ),
        (body(files=[{"content": "zz", "encoding": "hex"}]), "files[0].content is not valid hex"),
        (body(stdin=5), "stdin must be a string"),
        (body(args="a b"), "args must be an array of strings"),
        (body(args=[1]), "args must be an array of strings"),
        (body(run_timeout="3000"), "If specified, run_timeout must be a number"),
        (body(run_timeout=True), "If specified, run_timeout must be a number"),
        (
            body(compile_memory_limit=1.5),
            "If specified, compile_memory_limit must be a whole number",
        ),
    ],
)
def test_bad_bodies(raw: Any, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_execute(raw)
    assert info.value.message.startswith(message)
    assert info.value.status_code == 400


def test_too_many_files() -> None:
    with pytest.raises(InvalidRequest, match="more than 2 files"):
        parse_execute(body(files=[{"content": "a"}] * 3), max_files=2)


def test_good_body() -> None:
    parsed = parse_execute(
        body(
            files=[
                {"name": "src/main.py", "content": "print(1)"},
                {"content": "aGk=", "encoding": "base64"},
            ],
            stdin="in",
            args=["a"],
            run_timeout=1000.0,
        )
    )
    assert parsed.files[0].name == "src/main.py"
    assert parsed.files[1].encoding == "base64"
    assert parsed.limits["run_timeout"] == 1000
    assert parsed.limits["compile_timeout"] is None
    assert parsed.as_json()["run_timeout"] == 1000
    assert "compile_timeout" not in parsed.as_json()


def test_needs_a_utf8_file() -> None:
    parsed = parse_execute(body(files=[{"content": "aGk=", "encoding": "base64"}]))
    with pytest.raises(InvalidRequest, match="at least one utf8"):
        require_utf8_file(parsed)


@pytest.mark.parametrize(
    ("limits", "caps", "message"),
    [
        (
            {"run_timeout": 5000},
            {"run_timeout": 3000},
            "run_timeout cannot exceed the configured limit of 3000",
        ),
        ({"run_timeout": -5}, {"run_timeout": 3000}, "run_timeout must be non-negative"),
        (
            {"run_memory_limit": -1},
            {"run_memory_limit": 1000},
            "run_memory_limit must be non-negative",
        ),
        ({"run_cpu_time": -3}, {"run_cpu_time": -1}, "run_cpu_time must be non-negative"),
    ],
)
def test_caps_refused(limits: dict[str, int], caps: dict[str, int], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        enforce_caps(parse_execute(body(**limits)), caps)


@pytest.mark.parametrize(
    ("limits", "caps"),
    [
        ({"run_timeout": 3000}, {"run_timeout": 3000}),
        ({"run_timeout": 0}, {"run_timeout": 3000}),
        ({"run_memory_limit": -1}, {"run_memory_limit": -1}),
        ({"run_memory_limit": 10**9}, {}),
    ],
)
def test_caps_allowed(limits: dict[str, int], caps: dict[str, int]) -> None:
    enforce_caps(parse_execute(body(**limits)), caps)


# A NUL in a name or an argument can never reach exec() or a path (the engine failed on it and
# leaked descriptors); in stdin and file contents it is data.
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (body(language="py\x00thon"), "language must not contain a NUL character"),
        (body(version="3\x00"), "version must not contain a NUL character"),
        (
            body(files=[{"name": "a\x00.py", "content": "x"}]),
            "files[0].name must not contain a NUL character",
        ),
        (body(args=["ok", "b\x00d"]), "args[1] must not contain a NUL character"),
    ],
)
def test_nul_in_names_and_args(raw: Any, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_execute(raw)
    assert info.value.message == message


def test_nul_in_stdin_and_content_is_data() -> None:
    parsed = parse_execute(body(stdin="a\x00b", files=[{"content": "x\x00y"}]))
    assert parsed.stdin == "a\x00b"
    assert parsed.files[0].content == "x\x00y"
    assert parsed.as_json()["stdin"] == "a\x00b"


@pytest.mark.parametrize("name", LIMIT_FIELDS)
@pytest.mark.parametrize("value", [2**53, 2**63, 2**64 + 1, -(2**63), 1e300])
def test_limits_past_2_53_are_refused(name: str, value: float) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_execute(body(**{name: value}))
    assert info.value.message == f"If specified, {name} must be at most 9007199254740991 (2^53 - 1)"


@pytest.mark.parametrize("name", LIMIT_FIELDS)
def test_limits_up_to_2_53_minus_1_pass(name: str) -> None:
    assert parse_execute(body(**{name: 2**53 - 1})).limits[name] == 2**53 - 1


@pytest.mark.parametrize("value", [False, True])
def test_booleans_are_not_limits(value: bool) -> None:
    with pytest.raises(InvalidRequest, match="If specified, run_memory_limit must be a number"):
        parse_execute(body(run_memory_limit=value))


@pytest.mark.parametrize("encoding", [{}, [], 0, False, "", "UTF8", "utf-8", ["utf8"]])
def test_encoding_is_one_of_three_strings(encoding: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_execute(body(files=[{"content": "x", "encoding": encoding}]))
    assert info.value.message == "files[0].encoding must be one of utf8, base64, hex"


def test_encoding_omitted_or_null_is_utf8() -> None:
    parsed = parse_execute(body(files=[{"content": "x"}, {"content": "y", "encoding": None}]))
    assert [f.encoding for f in parsed.files] == ["utf8", "utf8"]
