"""Key material: minting, hashing, the display prefix, header parsing and --expires-in."""

from __future__ import annotations

import base64
import hashlib
from datetime import timedelta

import pytest

from app.tenancy.keys import (
    generate_key,
    generate_key_id,
    hash_key,
    key_from_headers,
    key_prefix,
    parse_duration,
)


class TestGenerateKey:
    def test_scheme_and_entropy(self) -> None:
        key = generate_key()
        assert key.startswith("pgw_")
        raw = base64.urlsafe_b64decode(key.removeprefix("pgw_") + "=")
        assert len(raw) >= 32

    def test_keys_differ(self) -> None:
        assert len({generate_key() for _ in range(1000)}) == 1000

    def test_key_id_is_not_the_key(self) -> None:
        key_id = generate_key_id()
        assert key_id.startswith("key_")
        assert len(key_id) == len("key_") + 16


class TestHashAndPrefix:
    def test_hash_is_sha256_hex(self) -> None:
        assert hash_key("pgw_abc") == hashlib.sha256(b"pgw_abc").hexdigest()

    def test_prefix_is_first_twelve_characters(self) -> None:
        key = generate_key()
        assert key_prefix(key) == key[:12]
        assert key_prefix(key).startswith("pgw_")
        assert len(key_prefix(key)) == 12


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "expected"),
    [
        ("Bearer pgw_abc", None, "pgw_abc"),
        ("bearer pgw_abc", None, "pgw_abc"),
        ("BEARER   pgw_abc  ", None, "pgw_abc"),
        ("pgw_abc", None, "pgw_abc"),
        ("  pgw_abc  ", None, "pgw_abc"),
        (None, "pgw_abc", "pgw_abc"),
        (None, "  pgw_abc ", "pgw_abc"),
        ("Basic dXNlcjpwYXNz", "pgw_abc", "pgw_abc"),  # someone else's Authorization
        ("Bearer pgw_other", "pgw_abc", "pgw_abc"),  # X-API-Key is unambiguous: it wins
        (None, None, None),
        ("", None, None),
        ("   ", "", None),
        ("Bearer", None, None),
        ("Bearer ", None, None),
        ("Basic dXNlcjpwYXNz", None, None),
        ("Bearer a b", None, None),
        (None, "   ", None),
    ],
)
def test_key_from_headers(
    authorization: str | None, x_api_key: str | None, expected: str | None
) -> None:
    assert key_from_headers(authorization, x_api_key) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
        (" 7D ", timedelta(days=7)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "d", "0d", "-1d", "1.5h", "3x", "1d2h", "forever"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration like 30d"):
        parse_duration(text)
