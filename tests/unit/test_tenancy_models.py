"""The rules a tenant's fields obey, wherever they come from (admin API, CLI, settings)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.settings import Settings
from app.tenancy.models import MAX_INTEGER, TenantCreate, TenantUpdate, check_rate_limit

CANNOT_RUN = [
    ("0/minute", "allows no request"),
    ("5/minute;0/hour", "allows no request"),
    ("1/0 second", "window of 0"),
    ("1/0second", "window of 0"),
    ("1 per 0 minute", "window of 0"),
    ("1/9999999999999999999 years", "above the maximum"),
    ("9999999999999999999999/second", "above the maximum"),
    (f"{MAX_INTEGER + 1}/second", "above the maximum"),
    ("1/2 years", "longer than a year"),
    ("1/366 days", "longer than a year"),
    ("lots", "is not a rate limit"),
]


@pytest.mark.parametrize(("limit", "says"), CANNOT_RUN)
def test_rate_limit_that_cannot_run(limit: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        check_rate_limit(limit)


@pytest.mark.parametrize(
    "limit", ["60/minute", "10/second;500/hour", "1/year", "1/365 days", f"{MAX_INTEGER}/second"]
)
def test_rate_limit_that_can(limit: str) -> None:
    assert check_rate_limit(limit)


@pytest.mark.parametrize(("limit", "says"), CANNOT_RUN)
@pytest.mark.parametrize("setting", ["default_rate_limit", "auth_failure_rate_limit"])
def test_settings_refuse_it_at_start(limit: str, says: str, setting: str) -> None:
    values: dict[str, Any] = {setting: limit}
    with pytest.raises(ValidationError, match=says):
        Settings(**values)


@pytest.mark.parametrize("model", [TenantCreate, TenantUpdate])
@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"max_concurrency": "5"}, "max_concurrency"),
        ({"max_concurrency": 5.0}, "max_concurrency"),
        ({"max_concurrency": True}, "max_concurrency"),
        ({"daily_quota": MAX_INTEGER + 1}, "daily_quota"),
        ({"max_run_timeout": 0}, "max_run_timeout"),
        ({"max_run_timeout": -1}, "max_run_timeout"),
        ({"max_run_memory_limit": -2}, "max_run_memory_limit"),
        ({"cache": "yes"}, "cache"),
        ({"cache": 0}, "cache"),
        ({"name": "a\x00b"}, "name"),
    ],
)
def test_fields_of_their_own_type_only(
    model: type[TenantCreate | TenantUpdate], fields: dict[str, object], where: str
) -> None:
    with pytest.raises(ValidationError) as info:
        model.model_validate({"id": "acme", **fields} if model is TenantCreate else fields)
    assert info.value.errors()[0]["loc"] == (where,)
