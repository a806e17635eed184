"""The effective request: allow-lists on the canonical language, caps applied and enforced."""

from __future__ import annotations

from typing import Any

import pytest

from app.errors import BadRequest, Forbidden
from app.policy import effective_caps, effective_request, language_allowed
from app.protocol.resolve import Runtime
from app.protocol.schemas import parse_execute
from app.settings import Settings
from app.tenancy.models import Tenant

PYTHON = Runtime("python", "3.12.0", ("py", "py3", "python3"))


def run(tenant: Tenant, settings: Settings | None = None, **body: Any) -> dict[str, Any]:
    settings = settings or Settings()
    raw = {"language": "py", "version": "3.x", "files": [{"content": "print(1)"}], **body}
    effective = effective_request(
        tenant,
        parse_execute(raw),
        PYTHON,
        global_languages=settings.allowed_languages,
        caps=effective_caps(tenant, settings),
    )
    return effective.as_json()


@pytest.mark.parametrize(
    ("language", "lists", "allowed"),
    [
        ("python", (["*"], ["*"]), True),
        ("python", (["*"], ["python"]), True),
        ("python", (["python", "c"], ["*"]), True),
        ("python", (["c"], ["*"]), False),
        ("python", (["*"], ["c", "bash"]), False),
        ("python", (["c"], ["python"]), False),  # the global list narrows a tenant's
    ],
)
def test_language_allowed(language: str, lists: tuple[list[str], list[str]], allowed: bool) -> None:
    assert language_allowed(language, *lists) is allowed


def test_canonical_runtime_is_forwarded() -> None:
    sent = run(Tenant(id="t"))
    assert (sent["language"], sent["version"]) == ("python", "3.12.0")


def test_alias_cannot_slip_past_the_allow_list() -> None:
    with pytest.raises(Forbidden, match="language 'python' is not allowed for this key"):
        run(Tenant(id="t", allowed_languages=["bash"]))


def test_global_list_applies_to_every_tenant() -> None:
    with pytest.raises(Forbidden):
        run(Tenant(id="t"), Settings(allowed_languages=["bash"]))


@pytest.mark.parametrize(
    ("tenant_caps", "body", "expected"),
    [
        # omitted limits take the tenant's cap, or the global one
        ({}, {}, {"run_timeout": 3000, "compile_timeout": 10000, "run_cpu_time": 3000}),
        ({"max_run_timeout": 1000}, {}, {"run_timeout": 1000}),
        ({"max_run_timeout": 1000}, {"run_timeout": 500}, {"run_timeout": 500}),
        ({"max_run_timeout": 9000}, {}, {"run_timeout": 3000}),  # under the global maximum
        ({"max_run_memory_limit": 10_000_000}, {}, {"run_memory_limit": 10_000_000}),
        ({}, {"run_memory_limit": -1}, {"run_memory_limit": -1}),
        ({}, {"run_timeout": 0}, {"run_timeout": 3000}),  # Piston treats 0 as omitted
    ],
)
def test_caps_fill_omitted_limits(
    tenant_caps: dict[str, int], body: dict[str, Any], expected: dict[str, int]
) -> None:
    sent = run(Tenant(id="t", **tenant_caps), **body)
    for name, value in expected.items():
        assert sent[name] == value


def test_uncapped_memory_stays_omitted() -> None:
    assert "run_memory_limit" not in run(Tenant(id="t"))


@pytest.mark.parametrize(
    ("tenant_caps", "body", "message"),
    [
        (
            {"max_run_timeout": 1000},
            {"run_timeout": 1001},
            "run_timeout cannot exceed the configured limit of 1000",
        ),
        (
            {},
            {"compile_timeout": 10001},
            "compile_timeout cannot exceed the configured limit of 10000",
        ),
        (
            {"max_run_memory_limit": 1000},
            {"run_memory_limit": -1},
            "run_memory_limit must be non-negative",
        ),
        ({}, {"run_cpu_time": -2}, "run_cpu_time must be non-negative"),
    ],
)
def test_caps_refuse(tenant_caps: dict[str, int], body: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        run(Tenant(id="t", **tenant_caps), **body)
