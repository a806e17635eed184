"""The cache key and the cache modes: what shares an entry, what must not, and Cache-Control."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from app.cache.keys import CacheMode, cache_digest, cache_key, cache_mode
from app.protocol.errors import InvalidRequest
from app.protocol.schemas import LIMIT_FIELDS, MAX_SAFE_INTEGER, ExecuteRequest, parse_execute

# What policy would fill an omitted limit with (a tenant's caps).
CAPS: dict[str, int] = {
    "compile_memory_limit": 512_000_000,
    "run_memory_limit": 256_000_000,
    "compile_timeout": 10_000,
    "run_timeout": 3_000,
    "compile_cpu_time": 10_000,
    "run_cpu_time": 3_000,
}

BASE: dict[str, Any] = {
    "language": "python",
    "version": "3.12.0",
    "files": [
        {"name": "main.py", "content": "import lib; print(input())", "encoding": "utf8"},
        {"name": "lib.py", "content": "x = 1", "encoding": "utf8"},
    ],
    "stdin": "hello",
    "args": ["a", "b"],
    **CAPS,
}


def effective(body: dict[str, Any], caps: dict[str, int] = CAPS) -> ExecuteRequest:
    """Parse, then fill omitted limits the way policy does (an omitted limit runs at the cap)."""
    parsed = parse_execute(body)
    limits = {name: parsed.limits.get(name) or caps.get(name) for name in LIMIT_FIELDS}
    return ExecuteRequest(
        language=parsed.language,
        version=parsed.version,
        files=parsed.files,
        stdin=parsed.stdin,
        args=parsed.args,
        limits=limits,
    )


def digest(body: dict[str, Any], tenant_id: str | None = "acme") -> str:
    return cache_digest(effective(body), tenant_id=tenant_id)


def changed(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    body = copy.deepcopy(BASE)
    change(body)
    return body


class TestDigestShared:
    """Requests that run the same program the same way share one entry."""

    def test_shape(self) -> None:
        value = digest(BASE)
        assert len(value) == 64
        assert int(value, 16) >= 0
        assert cache_key(value) == "pgw:cache:" + value

    def test_stable(self) -> None:
        assert digest(BASE) == digest(copy.deepcopy(BASE))

    def test_the_encoding_does_not_drift(self) -> None:
        # Pinned: an entry stored by an older release must still be found (a change of the
        # encoding bumps its format tag, on purpose, and these values with it).
        other = copy.deepcopy(BASE)
        other["files"][1].pop("name")
        other["stdin"] = "\ud800"
        other["args"] = []
        assert digest(BASE) == "e90e2f87c8ae7eb1bf428b3fde91c31710de574ac1c089b2f1cb7ad7671604d2"
        assert digest(BASE, None) == (
            "98a8f1e135f96120b9980b5b8174a1a8157866644efaf065fbfb475c64c03334"
        )
        assert digest(other) == "b131adcc48704f47617751b8cd0398497d3f241d72dd33085a70abd0428ecac3"

    def test_json_key_order(self) -> None:
        forward = orjson.dumps(BASE)
        backward = (
            b"{"
            + b",".join(
                orjson.dumps(key) + b":" + orjson.dumps(value)
                for key, value in reversed(list(BASE.items()))
            )
            + b"}"
        )
        reordered_files = changed(
            lambda b: b.update(files=[dict(reversed(list(f.items()))) for f in b["files"]])
        )
        assert forward != backward
        assert digest(orjson.loads(forward)) == digest(orjson.loads(backward))
        assert digest(BASE) == digest(reordered_files)

    def test_omitted_limits_equal_the_caps_they_default_to(self) -> None:
        omitted = {k: v for k, v in BASE.items() if k not in LIMIT_FIELDS}
        assert digest(omitted) == digest(BASE)

    def test_some_limits_omitted(self) -> None:
        partial = {k: v for k, v in BASE.items() if k not in ("run_timeout", "compile_cpu_time")}
        assert digest(partial) == digest(BASE)

    def test_uncapped_limit_omitted_equals_unset(self) -> None:
        # No cap: the limit stays unset whether omitted, null or 0 (Piston treats 0 as omitted).
        caps = {k: v for k, v in CAPS.items() if k != "run_memory_limit"}
        body = {k: v for k, v in BASE.items() if k != "run_memory_limit"}
        as_null = {**body, "run_memory_limit": None}
        as_zero = {**body, "run_memory_limit": 0}
        keys = {
            cache_digest(effective(b, caps), tenant_id="acme") for b in (body, as_null, as_zero)
        }
        assert len(keys) == 1

    def test_defaults_of_encoding_stdin_args(self) -> None:
        explicit = {**BASE, "stdin": "", "args": []}
        explicit["files"] = [{**f, "encoding": "utf8"} for f in BASE["files"]]
        implicit = {k: v for k, v in BASE.items() if k not in ("stdin", "args")}
        implicit["files"] = [{k: v for k, v in f.items() if k != "encoding"} for f in BASE["files"]]
        nulls = {**implicit, "stdin": None, "args": None}
        assert digest(explicit) == digest(implicit) == digest(nulls)

    @pytest.mark.parametrize("index", [0, 1])
    def test_omitted_name_is_the_name_piston_gives(self, index: int) -> None:
        # Piston's job.js: `name: file.name || \`file${i}.code\``: the same file, the same argv.
        named = changed(lambda b: b["files"][index].update(name=f"file{index}.code"))
        unnamed = changed(lambda b: b["files"][index].pop("name"))
        assert digest(unnamed) == digest(named)

    def test_omitted_name_differs_from_another_index_default(self) -> None:
        unnamed = changed(lambda b: b["files"][1].pop("name"))  # becomes file1.code
        named = changed(lambda b: b["files"][1].update(name="file0.code"))
        assert digest(unnamed) != digest(named)

    def test_global_scope_equal_across_tenants(self) -> None:
        assert digest(BASE, tenant_id=None) == cache_digest(effective(BASE), tenant_id=None)


def _files(body: dict[str, Any]) -> list[dict[str, Any]]:
    files: list[dict[str, Any]] = body["files"]
    return files


def _lower_limit(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda body: body.update({name: CAPS[name] - 1})


# Every change that can alter what the program prints, one per row.
OUTPUT_CHANGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "language": lambda b: b.update(language="python2"),
    "version": lambda b: b.update(version="3.12.1"),
    "file name": lambda b: _files(b)[0].update(name="main2.py"),
    "second file name": lambda b: _files(b)[1].update(name="lib2.py"),
    "file content": lambda b: _files(b)[0].update(content="import lib; print(input()) "),
    "second file content": lambda b: _files(b)[1].update(content="x = 2"),
    "file encoding": lambda b: _files(b)[1].update(encoding="base64", content="eCA9IDE="),
    "encoding alone": lambda b: _files(b)[1].update(encoding="hex", content="00"),
    "file order": lambda b: b.update(files=list(reversed(_files(b)))),
    "extra file": lambda b: _files(b).append({"name": "c.txt", "content": ""}),
    "one file fewer": lambda b: b.update(files=_files(b)[:1]),
    "stdin": lambda b: b.update(stdin="hello!"),
    "stdin trailing newline": lambda b: b.update(stdin="hello\n"),
    "args": lambda b: b.update(args=["a", "c"]),
    "args order": lambda b: b.update(args=["b", "a"]),
    "args joined": lambda b: b.update(args=["a b"]),
    "args concatenated": lambda b: b.update(args=["ab"]),
    "extra empty arg": lambda b: b.update(args=["a", "b", ""]),
    **{f"limit {name}": _lower_limit(name) for name in LIMIT_FIELDS},
    "memory unlimited": lambda b: b.update(run_memory_limit=-1),
}


class TestDigestDiffers:
    """Anything that can change the output changes the key."""

    @pytest.mark.parametrize("what", list(OUTPUT_CHANGES))
    def test_change(self, what: str) -> None:
        assert digest(changed(OUTPUT_CHANGES[what])) != digest(BASE)

    def test_every_change_is_its_own_key(self) -> None:
        keys = {digest(changed(change)) for change in OUTPUT_CHANGES.values()}
        assert len(keys) == len(OUTPUT_CHANGES)

    def test_tenant(self) -> None:
        assert digest(BASE, tenant_id="acme") != digest(BASE, tenant_id="globex")

    def test_tenant_scope_differs_from_global(self) -> None:
        assert digest(BASE, tenant_id="acme") != digest(BASE, tenant_id=None)
        assert digest(BASE, tenant_id="global") != digest(BASE, tenant_id=None)

    def test_field_boundaries(self) -> None:
        # Length-prefixed fields: moving text from one field into the next is a new request.
        assert digest({**BASE, "stdin": "ab", "args": []}) != digest(
            {**BASE, "stdin": "a", "args": ["b"]}
        )
        split = changed(lambda b: _files(b)[0].update(name="m", content="ain.py" + "x"))
        joined = changed(lambda b: _files(b)[0].update(name="main.py", content="x"))
        assert digest(split) != digest(joined)

    def test_no_cap_set_vs_explicit(self) -> None:
        caps = {k: v for k, v in CAPS.items() if k != "run_timeout"}
        unset = {k: v for k, v in BASE.items() if k != "run_timeout"}
        explicit = {**unset, "run_timeout": 3_000}
        assert cache_digest(effective(unset, caps), tenant_id="acme") != cache_digest(
            effective(explicit, caps), tenant_id="acme"
        )


class TestDigestTotal:
    """Any request that parses can be hashed: the key never turns a request into a 500."""

    def test_huge_limit(self) -> None:
        # The largest limit that parses (past 2^53 - 1 the request is a 400 before any hashing).
        caps = {k: v for k, v in CAPS.items() if k != "run_memory_limit"}
        body = {**BASE, "run_memory_limit": MAX_SAFE_INTEGER}
        assert len(cache_digest(effective(body, caps), tenant_id="acme")) == 64
        with pytest.raises(InvalidRequest):
            effective({**BASE, "run_memory_limit": 10**30}, caps)

    def test_lone_surrogate(self) -> None:
        a = cache_digest(effective({**BASE, "stdin": "\ud800"}), tenant_id="acme")
        b = cache_digest(effective({**BASE, "stdin": "\ud801"}), tenant_id="acme")
        assert a != b


USE = CacheMode(lookup=True, store=True, label="MISS")
REFRESH = CacheMode(lookup=False, store=True, label="MISS")
BYPASS = CacheMode(lookup=False, store=False, label="BYPASS")


class TestCacheMode:
    @pytest.mark.parametrize(
        ("ttl", "tenant_cache", "header", "expected"),
        [
            (3600, True, None, USE),
            (3600, True, "", USE),
            (0, True, None, BYPASS),
            (0, True, "no-cache", BYPASS),
            (3600, False, None, BYPASS),
            (3600, False, "no-cache", BYPASS),
            (3600, True, "no-cache", REFRESH),
            (3600, True, "No-Cache", REFRESH),
            (3600, True, "NO-CACHE", REFRESH),
            (3600, True, "max-age=0, no-cache", REFRESH),
            (3600, True, "  no-cache  ,max-age=0", REFRESH),
            (3600, True, 'no-cache="Set-Cookie"', REFRESH),
            (3600, True, "no-cache = x", REFRESH),
            (3600, True, "no-store", BYPASS),
            (3600, True, "No-Store", BYPASS),
            (3600, True, "no-cache, no-store", BYPASS),
            (3600, True, "no-store,no-cache", BYPASS),
            (3600, True, "max-age=0", USE),
            (3600, True, "max-stale", USE),
            (3600, True, "no-cachex, xno-store", USE),
            (3600, True, " , ,, ", USE),
            (3600, True, 'ext="no-store, no-cache"', USE),
            (3600, True, 'ext="a\\", no-store"', USE),
            (3600, True, 'ext="a\\", no-store", no-cache', REFRESH),
            (3600, True, 'ext="unterminated, no-store', USE),
        ],
    )
    def test_mode(
        self, ttl: int, tenant_cache: bool, header: str | None, expected: CacheMode
    ) -> None:
        assert cache_mode(ttl_seconds=ttl, tenant_cache=tenant_cache, cache_control=header) == (
            expected
        )

    def test_labels(self) -> None:
        assert USE.label == REFRESH.label == "MISS"
        assert BYPASS.label == "BYPASS"
