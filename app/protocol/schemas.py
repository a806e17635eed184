"""Piston's execute request: parsing with Piston's own 400 messages, decoding, limit checks.

Used by the gateway and by the embedded engine, so a bad request gets the same answer from both.
The checks run in Piston's order (`api/v2.js: get_job`), then the ones Piston leaves to the job
(file names, encodings) are done up front so that nothing invalid reaches an upstream.
"""

from __future__ import annotations

import base64
import binascii
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard

from pydantic import BaseModel, ConfigDict, Field

from app.protocol.errors import InvalidRequest

__all__ = [
    "ENCODINGS",
    "EXECUTE_REQUEST_SCHEMA",
    "EXECUTE_RESPONSE_SCHEMA",
    "LIMIT_FIELDS",
    "MAX_SAFE_INTEGER",
    "ExecuteRequest",
    "PistonFile",
    "decode_content",
    "enforce_caps",
    "parse_execute",
    "require_utf8_file",
]

Encoding = Literal["utf8", "base64", "hex"]
ENCODINGS: tuple[Encoding, ...] = ("utf8", "base64", "hex")
_ENCODING: dict[str, Encoding] = {name: name for name in ENCODINGS}
# The six per-request limits Piston accepts, in Piston's own order.
LIMIT_FIELDS: tuple[str, ...] = (
    "compile_memory_limit",
    "run_memory_limit",
    "compile_timeout",
    "run_timeout",
    "compile_cpu_time",
    "run_cpu_time",
)
# The largest integer a JSON number holds exactly everywhere (JavaScript's MAX_SAFE_INTEGER, so
# Piston's own limit): past it a limit means nothing, and past 2^63 it breaks the sandbox's calls.
MAX_SAFE_INTEGER = 2**53 - 1


@dataclass(frozen=True, slots=True)
class PistonFile:
    content: str
    name: str | None = None
    encoding: Encoding = "utf8"

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"content": self.content, "encoding": self.encoding}
        if self.name is not None:
            data["name"] = self.name
        return data


@dataclass(frozen=True, slots=True)
class ExecuteRequest:
    """A syntactically valid execute body. Limits are None when the client left them out."""

    language: str
    version: str
    files: tuple[PistonFile, ...]
    stdin: str = ""
    args: tuple[str, ...] = ()
    limits: Mapping[str, int | None] = field(default_factory=dict)

    def limit(self, name: str) -> int | None:
        return self.limits.get(name)

    def as_json(self) -> dict[str, Any]:
        """The body to forward: every field explicit, limits only where set."""
        data: dict[str, Any] = {
            "language": self.language,
            "version": self.version,
            "files": [f.as_json() for f in self.files],
            "stdin": self.stdin,
            "args": list(self.args),
        }
        for name in LIMIT_FIELDS:
            value = self.limits.get(name)
            if value is not None:
                data[name] = value
        return data


def decode_content(file: PistonFile) -> bytes:
    """The file's bytes; raises ValueError if the content does not decode."""
    if file.encoding == "base64":
        return base64.b64decode(file.content, validate=True)
    if file.encoding == "hex":
        return bytes.fromhex(file.content)
    return file.content.encode("utf-8")


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _no_nul(value: str, where: str) -> str:
    """A name or argument reaches the sandbox's exec() and paths: a NUL there cannot be run."""
    if "\x00" in value:
        raise InvalidRequest(f"{where} must not contain a NUL character")
    return value


def _safe_name(name: str) -> bool:
    if not name or name.startswith("/"):
        return False
    normalised = posixpath.normpath(name)
    return normalised not in (".", "..") and not normalised.startswith("../")


def _parse_file(index: int, raw: object) -> PistonFile:
    if not isinstance(raw, dict):
        raise InvalidRequest(f"files[{index}] must be an object with a content string")
    content = raw.get("content")
    if not isinstance(content, str):
        raise InvalidRequest(f"files[{index}].content is required as a string")
    name = raw.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise InvalidRequest(f"files[{index}].name must be a string")
        _no_nul(name, f"files[{index}].name")
        if not _safe_name(name):
            raise InvalidRequest(
                f"files[{index}].name must be a relative path inside the job folder "
                "(no leading '/', no '..')"
            )
    raw_encoding = raw.get("encoding")
    # Omitted or null is Piston's default; otherwise only the three strings (`{}`, `0` or `""`
    # are not "utf8" by being falsy).
    encoding: Encoding | None = "utf8" if raw_encoding is None else None
    if isinstance(raw_encoding, str):
        encoding = _ENCODING.get(raw_encoding)
    if encoding is None:
        raise InvalidRequest(f"files[{index}].encoding must be one of utf8, base64, hex")
    file = PistonFile(content=content, name=name, encoding=encoding)
    try:
        decode_content(file)
    except (ValueError, binascii.Error):
        raise InvalidRequest(f"files[{index}].content is not valid {encoding}") from None
    return file


def _required_text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not value or not isinstance(value, str):
        raise InvalidRequest(f"{name} is required as a string")
    return _no_nul(value, name)


def _parse_files(raw_files: object, max_files: int | None) -> tuple[PistonFile, ...]:
    if not isinstance(raw_files, list):
        raise InvalidRequest("files is required as an array")
    if not raw_files:
        raise InvalidRequest("files must include at least one file")
    if max_files is not None and len(raw_files) > max_files:
        raise InvalidRequest(f"files cannot hold more than {max_files} files")
    return tuple(_parse_file(i, raw) for i, raw in enumerate(raw_files))


def _parse_stdin(stdin: object) -> str:
    if stdin is None:
        return ""
    if not isinstance(stdin, str):
        raise InvalidRequest("stdin must be a string")
    return stdin


def _parse_args(args: object) -> tuple[str, ...]:
    if args is None:
        return ()
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        raise InvalidRequest("args must be an array of strings")
    return tuple(_no_nul(arg, f"args[{i}]") for i, arg in enumerate(args))


def _parse_limit(name: str, value: object) -> int | None:
    if value is None:
        return None
    if not _is_number(value):
        raise InvalidRequest(f"If specified, {name} must be a number")
    if isinstance(value, float):
        if not value.is_integer():
            raise InvalidRequest(f"If specified, {name} must be a whole number")
        value = int(value)
    if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        raise InvalidRequest(f"If specified, {name} must be at most {MAX_SAFE_INTEGER} (2^53 - 1)")
    return int(value)


def parse_execute(body: object, *, max_files: int | None = None) -> ExecuteRequest:
    """Check an execute body the way Piston does, plus the checks Piston leaves to the job.

    Field by field in Piston's order, so the first error is the one Piston names."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    language = _required_text(body, "language")
    version = _required_text(body, "version")
    files = _parse_files(body.get("files"), max_files)
    stdin = _parse_stdin(body.get("stdin"))
    args = _parse_args(body.get("args"))
    limits = {name: _parse_limit(name, body.get(name)) for name in LIMIT_FIELDS}
    return ExecuteRequest(
        language=language,
        version=version,
        files=files,
        stdin=stdin,
        args=args,
        limits=limits,
    )


def require_utf8_file(request: ExecuteRequest) -> None:
    """Piston needs one utf8 file to run (the first one is the entry point)."""
    if not any(f.encoding == "utf8" for f in request.files):
        raise InvalidRequest("files must include at least one utf8 encoded file")


def enforce_caps(request: ExecuteRequest, caps: Mapping[str, int]) -> None:
    """Piston's limit checks against configured maximums (a cap <= 0 means no cap)."""
    for name in LIMIT_FIELDS:
        value = request.limits.get(name)
        if not value:  # Piston skips 0 and absent values alike
            continue
        cap = caps.get(name, -1)
        if cap > 0 and value > cap:
            raise InvalidRequest(f"{name} cannot exceed the configured limit of {cap}")
        # -1 asks for "unlimited" memory, which only an uncapped limit can grant.
        unlimited_memory = value == -1 and name.endswith("memory_limit") and cap <= 0
        if value < 0 and not unlimited_memory:
            raise InvalidRequest(f"{name} must be non-negative")


# Documentation models: the execute route parses bodies itself (Piston's messages, one pass), so
# these only describe the shapes on the docs page.
class _FileDoc(BaseModel):
    name: str | None = Field(None, examples=["main.py"])
    content: str = Field(examples=["print(input())"])
    encoding: Encoding = "utf8"


class _ExecuteDoc(BaseModel):
    language: str = Field(examples=["python"], description="Name or alias")
    version: str = Field(examples=["3.x"], description="npm-style semver selector")
    files: list[_FileDoc]
    stdin: str = Field("", examples=["hello"])
    args: list[str] = Field(default_factory=list)
    compile_timeout: int | None = Field(None, ge=0, le=MAX_SAFE_INTEGER, description="ms")
    run_timeout: int | None = Field(None, ge=0, le=MAX_SAFE_INTEGER, description="ms")
    compile_cpu_time: int | None = Field(None, ge=0, le=MAX_SAFE_INTEGER, description="ms")
    run_cpu_time: int | None = Field(None, ge=0, le=MAX_SAFE_INTEGER, description="ms")
    compile_memory_limit: int | None = Field(
        None, ge=-1, le=MAX_SAFE_INTEGER, description="bytes, -1 for no limit"
    )
    run_memory_limit: int | None = Field(
        None, ge=-1, le=MAX_SAFE_INTEGER, description="bytes, -1 for no limit"
    )


class _StageDoc(BaseModel):
    model_config = ConfigDict(extra="allow")
    stdout: str
    stderr: str
    output: str
    code: int | None
    signal: str | None
    message: str | None = None
    status: str | None = Field(None, description="RE, SG, TO, OL, EL, XX or null")
    cpu_time: int | None = None
    wall_time: int | None = None
    memory: int | None = None


class _ExecuteAnswerDoc(BaseModel):
    model_config = ConfigDict(extra="allow")
    language: str
    version: str
    run: _StageDoc
    compile: _StageDoc | None = None


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with `$defs` inlined, fit for `openapi_extra`."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    return inlined


EXECUTE_REQUEST_SCHEMA = _inline_schema(_ExecuteDoc)
EXECUTE_RESPONSE_SCHEMA = _inline_schema(_ExecuteAnswerDoc)
