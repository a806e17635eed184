"""API key material: minting, hashing, the prefix shown in lists, and reading keys off headers.

Pure functions only, so every rule here is a unit test away from being checked.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import timedelta
from typing import Final

__all__ = [
    "KEY_PREFIX_LENGTH",
    "KEY_SCHEME",
    "generate_key",
    "generate_key_id",
    "hash_key",
    "key_from_headers",
    "key_prefix",
    "parse_duration",
]

KEY_SCHEME: Final = "pgw_"
KEY_PREFIX_LENGTH: Final = 12
# 32 bytes = 256 bits from the OS CSPRNG: a key can't be guessed, so a plain SHA-256 (no salt,
# no slow KDF) is enough to store it, and it lets a lookup be one hash plus one GET.
_KEY_ENTROPY_BYTES: Final = 32
_BEARER = re.compile(r"^bearer\s+(\S+)\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)
_DURATION_UNITS: Final = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def generate_key() -> str:
    """A new secret key: `pgw_` and 43 URL-safe characters (32 random bytes)."""
    return KEY_SCHEME + secrets.token_urlsafe(_KEY_ENTROPY_BYTES)


def generate_key_id() -> str:
    """The public id of a key (what `DELETE /admin/keys/{key_id}` takes); not a secret."""
    return "key_" + secrets.token_hex(8)


def hash_key(key: str) -> str:
    """The SHA-256 hex digest a key is stored and looked up under."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_prefix(key: str) -> str:
    """The first 12 characters: enough to recognise a key in a list or a log, no help to a thief."""
    return key[:KEY_PREFIX_LENGTH]


def key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a request presents, or None.

    `X-API-Key` wins because it can only mean a gateway key; `Authorization` is read as
    `Bearer <key>` or, as the hosted Piston API's clients send it, a bare `<key>`. Any other
    scheme (`Basic ...`) is not a key.
    """
    if x_api_key is not None and x_api_key.strip():
        return x_api_key.strip()
    if authorization is None:
        return None
    value = authorization.strip()
    if not value:
        return None
    bearer = _BEARER.match(value)
    if bearer is not None:
        return bearer.group(1)
    if any(char.isspace() for char in value) or value.lower() == "bearer":
        return None
    return value


_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}
_MAX_DURATION_SECONDS: Final = 100 * 366 * 86_400


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `45s` or `2w` as a timedelta; ValueError says what is accepted."""
    match = _DURATION.match(text)
    if match is None or int(match.group(1)) <= 0:
        raise ValueError(
            f"{text!r} is not a duration like 30d, 12h, 90m, 45s or 2w (a positive whole number "
            "and one unit)"
        )
    amount, unit = int(match.group(1)), match.group(2).lower()
    # Bounded before a timedelta is built: a huge count overflows it (and any date after it).
    if amount * _UNIT_SECONDS[unit] > _MAX_DURATION_SECONDS:
        raise ValueError(f"{text!r} is longer than the longest lifetime of 100 years")
    return timedelta(**{_DURATION_UNITS[unit]: amount})
