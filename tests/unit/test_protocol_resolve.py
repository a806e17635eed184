"""Runtime resolution must pick what Piston would pick."""

from __future__ import annotations

import pytest

from app.protocol.resolve import Runtime, resolve_runtime, unknown_runtime_message

RUNTIMES = [
    Runtime("python", "3.10.0", ("py", "py3", "python3")),
    Runtime("python", "3.12.0", ("py", "py3", "python3")),
    Runtime("python", "2.7.18", ("py2", "python2")),
    Runtime("javascript", "18.15.0", ("node-javascript", "node-js", "javascript", "js"), "node"),
    Runtime("javascript", "1.32.3", ("deno-js", "deno"), "deno"),
    Runtime("c++", "10.2.0", ("cpp", "g++")),
]


@pytest.mark.parametrize(
    ("language", "selector", "expected"),
    [
        ("python", "*", ("python", "3.12.0")),
        ("py", "3.x", ("python", "3.12.0")),
        ("py3", "3.10.0", ("python", "3.10.0")),
        ("python", "3.10", ("python", "3.10.0")),
        ("python", "2.x", ("python", "2.7.18")),
        ("python", "<3.11", ("python", "3.10.0")),
        ("python", ">=3.10 <3.12", ("python", "3.10.0")),
        ("python", "~3.10.0", ("python", "3.10.0")),
        ("python", "^3.10.0", ("python", "3.12.0")),
        ("js", "*", ("javascript", "18.15.0")),
        ("deno", "*", ("javascript", "1.32.3")),
        ("cpp", "10", ("c++", "10.2.0")),
    ],
)
def test_resolves_like_piston(language: str, selector: str, expected: tuple[str, str]) -> None:
    found = resolve_runtime(RUNTIMES, language, selector)
    assert found is not None
    assert (found.language, found.version) == expected


@pytest.mark.parametrize(
    ("language", "selector"),
    [("python", "4.x"), ("ruby", "*"), ("PYTHON", "*"), ("python", "not a range"), ("", "*")],
)
def test_unknown(language: str, selector: str) -> None:
    assert resolve_runtime(RUNTIMES, language, selector) is None


def test_equal_versions_keep_the_first_listed() -> None:
    twins = [
        Runtime("javascript", "1.0.0", ("js",), "node"),
        Runtime("javascript", "1.0.0", ("js",), "bun"),
    ]
    found = resolve_runtime(twins, "js", "*")
    assert found is not None
    assert found.runtime == "node"


def test_message_is_pistons() -> None:
    assert unknown_runtime_message("ruby", "3.x") == "ruby-3.x runtime is unknown"


def test_json_round_trip_keeps_unknown_fields() -> None:
    data = {
        "language": "python",
        "version": "3.12.0",
        "aliases": ["py"],
        "runtime": "cpython",
        "x": 1,
    }
    assert Runtime.from_json(data).as_json() == data
