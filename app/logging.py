"""Logs are one JSON object per line, ours and uvicorn's alike, each with its request id.

No line carries a key: every string in every line (uvicorn's, a library's, an exception's text
included) has full keys cut to their public prefix and secret query parameters (`?api_key=`, as
browsers send WebSocket keys) blanked, whatever logged them.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import IO, Any
from urllib.parse import unquote

import orjson
import structlog

__all__ = ["AccessLog", "access_log", "configure_logging", "redact", "redact_secrets"]

# A key is `pgw_` and 43 URL-safe characters; its first 12 characters are its public prefix.
_KEY = re.compile(r"(pgw_[A-Za-z0-9_-]{8})[A-Za-z0-9_-]+")
_SECRET_PARAM = re.compile(
    r"([?&;](?:api[_-]?key|key|token|access_token|auth|authorization)=)[^&#\s\"']*", re.IGNORECASE
)


def _redact_plain(text: str) -> str:
    if "pgw_" in text:
        text = _KEY.sub(r"\1...", text)
    if "=" in text:
        text = _SECRET_PARAM.sub(r"\1[redacted]", text)
    return text


def redact(text: str) -> str:
    redacted = _redact_plain(text)
    if "%" in redacted:
        # A URL's query is decoded before it is used (`?api%5Fkey=%70gw%5F...` is a working key),
        # so it is checked decoded too; the line keeps its encoding unless that hid a secret.
        decoded = unquote(redacted)
        if _redact_plain(decoded) != decoded:
            return _redact_plain(decoded)
    return redacted


def redact_secrets(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for name, value in event_dict.items():
        if isinstance(value, str):
            event_dict[name] = redact(value)
    return event_dict


def _dumps(obj: object, default: object = None) -> str:
    return orjson.dumps(obj, default=str).decode()


class _BatchedLines:
    """structlog's logger for the access lines: each rendered line is kept, and the lines of one
    event-loop iteration go out in one write, after the answers of that iteration were sent.

    Outside a running loop (or if scheduling fails) a line is written at once. What is still
    held when the process ends is written by `flush` (atexit): no line is lost to the batch.
    """

    __slots__ = ("_flush", "_held", "_scheduled", "_write")

    def __init__(self, stream: IO[bytes]) -> None:
        self._write, self._flush = stream.write, stream.flush
        self._held: list[bytes] = []
        self._scheduled = False
        atexit.register(self.flush)

    def msg(self, line: bytes) -> None:
        self._held.append(line)
        if self._scheduled:
            return
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop: nothing to batch with
            self.flush()
            return
        self._scheduled = True

    info = msg

    def flush(self) -> None:
        self._scheduled = False
        held, self._held = self._held, []
        if held:
            try:
                self._write(b"\n".join(held) + b"\n")
                self._flush()
            except (OSError, ValueError):  # the stream is gone (closed at exit): nowhere to log
                pass


class AccessLog:
    """The one access line per request (app.middleware), with the fields and redaction of every
    other line. Until `configure_logging` runs (tests, in-process) it goes through structlog's
    configuration like any line; once configured it takes structlog's fast path: a filtering
    bound logger whose processors render bytes with orjson straight into `_BatchedLines`, no
    stdlib `LogRecord`, handler lock or caller lookup, and one write per loop iteration. At a
    level above info it is a no-op call.
    """

    def __init__(self) -> None:
        self.logger: Any = structlog.get_logger("app.access")
        self.enabled = True  # whether a line would be written: if not, its fields go unbuilt

    def configure(self, level: int, stream: IO[bytes]) -> None:
        self.enabled = level <= logging.INFO
        self.logger = structlog.wrap_logger(
            _BatchedLines(stream),
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                _access_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                redact_secrets,
                structlog.processors.JSONRenderer(serializer=_dump_bytes),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(level),
            cache_logger_on_first_use=True,
        )


def _access_logger_name(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict["logger"] = "app.access"
    return event_dict


def _dump_bytes(obj: object, default: object = None) -> bytes:
    return orjson.dumps(obj, default=str)


access_log = AccessLog()


def configure_logging(level: str = "info") -> None:
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_secrets,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(logging.NOTSET)  # our level decides, whatever uvicorn's config set before
    # Our middleware writes one access line per request, with the request id; uvicorn's would
    # be a second, id-less copy. (Its WebSocket lines come through "uvicorn.error", redacted.)
    logging.getLogger("uvicorn.access").disabled = True
    access_log.configure(numeric, sys.stderr.buffer)
    logging.captureWarnings(True)  # a library's warning is a JSON line too, not bare stderr
