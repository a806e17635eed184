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
from datetime import UTC, datetime
from typing import IO, Any, Final
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


# Writes to a pipe of at most this many bytes are atomic (POSIX PIPE_BUF): the workers of
# `serve --workers N` share one stderr, and a longer write may be interleaved with theirs.
_ATOMIC_WRITE: Final = 4096


class _BatchedLines:
    """Where the access lines go once rendered: each line is kept, and the lines of one
    event-loop iteration go out together, after the answers of that iteration were sent, in
    writes of whole lines of at most PIPE_BUF bytes (a longer line alone), so lines of several
    worker processes sharing a pipe never mix.

    Outside a running loop a line is written at once. What is still held when the process ends
    is written by `flush` (atexit): no line is lost to the batch.
    """

    __slots__ = ("_flush", "_held", "_scheduled_on", "_write")

    def __init__(self, stream: IO[bytes]) -> None:
        self._write, self._flush = stream.write, stream.flush
        self._held: list[bytes] = []
        self._scheduled_on: asyncio.AbstractEventLoop | None = None
        atexit.register(self.flush)

    def msg(self, line: bytes) -> None:
        self._held.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: nothing to batch with
            self.flush()
            return
        if self._scheduled_on is not loop:  # (a loop that closed before its flush ran: again)
            self._scheduled_on = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled_on = None
        held, self._held = self._held, []
        try:
            chunk: list[bytes] = []
            size = 0
            for line in held:
                if chunk and size + len(line) + 1 > _ATOMIC_WRITE:
                    self._write_lines(chunk)
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line) + 1
            if chunk:
                self._write_lines(chunk)
        except (OSError, ValueError):  # the stream is gone (closed at exit): nowhere to log
            pass

    def _write_lines(self, lines: list[bytes]) -> None:
        self._write(b"\n".join(lines) + b"\n")
        self._flush()

    def close(self) -> None:
        """Write what is held and stop writing at exit (a new configuration replaces it)."""
        self.flush()
        atexit.unregister(self.flush)


class AccessLog:
    """The one access line per request (app.middleware), with the fields and redaction of every
    other line.

    Until `configure_logging` runs (tests, in-process) a line goes through structlog's
    configuration like any other. Once configured, `write` renders it itself: the same fields
    as structlog's chain would give (event, level, logger, timestamp, the request id, the
    request's fields), each string redacted, as bytes with orjson, into `_BatchedLines`; no
    stdlib `LogRecord`, handler lock, caller lookup or processor chain (that chain, structlog's
    own fast path, still cost a cache hit a fifth of its time: bench/). Above info, `enabled`
    is False and the caller builds nothing.
    """

    def __init__(self) -> None:
        self.logger: Any = structlog.get_logger("app.access")
        self.enabled = True  # whether a line would be written: if not, its fields go unbuilt
        self._lines: _BatchedLines | None = None

    def configure(self, level: int, stream: IO[bytes]) -> None:
        self.enabled = level <= logging.INFO
        if self._lines is not None:
            self._lines.close()
        self._lines = _BatchedLines(stream)

    def write(self, request_id: str, **fields: Any) -> None:
        """One access line: `event` "request", the request id and `fields`."""
        lines = self._lines
        if lines is None:
            self.logger.info("request", request_id=request_id, **fields)
            return
        line: dict[str, Any] = {"event": "request", "request_id": request_id}
        for name, value in fields.items():
            line[name] = redact(value) if isinstance(value, str) else value
        line["level"] = "info"
        line["logger"] = "app.access"
        line["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        lines.msg(orjson.dumps(line, default=str))


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
