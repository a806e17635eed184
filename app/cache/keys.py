"""Whether a request reads and writes the cache, and under which key.

`cache_mode` reads the tenant's switch, the TTL and the request's Cache-Control; `cache_digest`
is the SHA-256 of everything that decides an effective request's output; `cache_key` names its
entry in Redis (`pgw:cache:<digest>`, from `app.redis`).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Final, Literal, NamedTuple

from app.protocol.schemas import LIMIT_FIELDS, ExecuteRequest
from app.redis import cache_entry

__all__ = ["CacheMode", "cache_digest", "cache_key", "cache_mode"]

# --------------------------------------------------------------------------- modes


class CacheMode(NamedTuple):
    """What the cache does for one request; `label` is its X-Cache value when it is not a hit."""

    lookup: bool
    store: bool
    label: Literal["MISS", "BYPASS"]


_USE: Final = CacheMode(lookup=True, store=True, label="MISS")
_REFRESH: Final = CacheMode(lookup=False, store=True, label="MISS")
_BYPASS: Final = CacheMode(lookup=False, store=False, label="BYPASS")


def _directive_names(header: str) -> set[str]:
    """The directive names of a Cache-Control value, lower-cased (RFC 9111 section 5.2).

    Split on the commas that are outside quoted strings, so an argument such as
    `community="no-store, x"` is never read as a directive of its own.
    """
    names: set[str] = set()
    element: list[str] = []
    in_quotes = escaped = False
    for char in header + ",":
        if escaped:
            escaped = False
        elif in_quotes:
            escaped = char == "\\"
            in_quotes = char != '"'
        elif char == '"':
            in_quotes = True
        elif char == ",":
            name = "".join(element).split("=", 1)[0].strip().lower()
            if name:
                names.add(name)
            element = []
            continue
        element.append(char)
    return names


def cache_mode(*, ttl_seconds: int, tenant_cache: bool, cache_control: str | None) -> CacheMode:
    """Whether to look up and store, from the TTL, the tenant's switch and the request's header.

    Pass every Cache-Control line joined with ", " (a header may be sent more than once).
    `no-store` wins over `no-cache` when both are present: storing is what it forbids.
    Other directives (`max-age=0` included) leave the cache on: the contract names only these
    two, and a browser's ordinary reload sends `max-age=0` where it means nothing for a POST.
    """
    if ttl_seconds <= 0 or not tenant_cache:
        return _BYPASS
    if not cache_control:
        return _USE
    directives = _directive_names(cache_control)
    if "no-store" in directives:
        return _BYPASS
    if "no-cache" in directives:
        return _REFRESH
    return _USE


# --------------------------------------------------------------------------- key

# Bumped whenever the encoding below changes, so old entries are simply never found again.
_DIGEST_FORMAT: Final = b"pgw-cache/1"


def _field(value: bytes) -> bytes:
    # Length-prefixed fields: no value can run into the next one, whatever bytes it holds.
    return len(value).to_bytes(8, "big") + value


def _text(value: str) -> bytes:
    # surrogatepass: a lone surrogate (legal in JSON via \\ud800) must hash, not crash.
    return value.encode("utf-8", "surrogatepass")


_GLOBAL_SCOPE: Final = _field(_DIGEST_FORMAT) + _field(b"global")
_LIMIT_NAMES: Final = tuple((name, _field(name.encode())) for name in LIMIT_FIELDS)
_NO_VALUE: Final = _field(b"")


@lru_cache(maxsize=4096)
def _scope(tenant_id: str | None) -> bytes:
    """The digest's first fields: the format and the scope (a tenant's, or the global one)."""
    if tenant_id is None:
        return _GLOBAL_SCOPE
    return _field(_DIGEST_FORMAT) + _field(b"tenant") + _field(_text(tenant_id))


def cache_digest(request: ExecuteRequest, *, tenant_id: str | None) -> str:
    """SHA-256 hex of everything that decides an effective request's output.

    `tenant_id=None` is the global scope: every tenant shares the entry.

    The encoding is a sequence of length-prefixed fields in a fixed order, not JSON: it is total
    (orjson refuses integers beyond 64 bits, which an uncapped limit may hold, and lone
    surrogates), it depends on no serializer's options or version, and it feeds the hash without
    building a document the size of the files. Key order in the client's JSON cannot reach it
    (the request is already parsed), and every limit is written, unset ones as an empty field,
    so "omitted" and "filled with the same value" are the same request only when policy made
    them so.

    A file without a name is hashed as `file<index>.code`: that is the name Piston's job.js
    gives it (`file.name || \\`file${i}.code\\``), so both requests write the same file and run
    the same command line. The encoding stays in the key even where the bytes agree, because
    Piston runs only the utf8 files as code. stdin is kept exactly (no newline added): current
    Piston passes it through unchanged.
    """
    # The fields, built as one buffer and hashed in one call (the same bytes as feeding them
    # one by one, a fraction of the calls on the hot path).
    parts = [
        _scope(tenant_id),
        _field(_text(request.language)),
        _field(_text(request.version)),
        _field(str(len(request.files)).encode()),
    ]
    for index, file in enumerate(request.files):
        parts.append(_field(_text(file.name if file.name is not None else f"file{index}.code")))
        parts.append(_field(_text(file.encoding)))
        parts.append(_field(_text(file.content)))
    parts.append(_field(_text(request.stdin)))
    parts.append(_field(str(len(request.args)).encode()))
    parts.extend(_field(_text(arg)) for arg in request.args)
    limits = request.limits
    for name, encoded_name in _LIMIT_NAMES:
        value = limits.get(name)
        parts.append(encoded_name)
        parts.append(_NO_VALUE if value is None else _field(str(value).encode()))
    return hashlib.sha256(b"".join(parts)).hexdigest()


def cache_key(digest: str) -> str:
    """The Redis key of a cached answer."""
    return cache_entry(digest)
