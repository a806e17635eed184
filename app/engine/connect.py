"""Piston's interactive `WS /api/v2/connect`, message for message as Piston's api/v2.js answers it.

The client sends `init` (an execute body), then `data` (stdin) and `signal` messages; the engine
sends `runtime`, then per stage `stage`, `data` (stdout/stderr as it arrives) and `exit`, then
closes with 4999. Errors close with Piston's codes (4000-4005). The job runs on the same path as
execute (Engine.job_for, Engine.primed, Engine.run_stages), so every limit applies, and a client
that goes away mid-job has its job killed and cleaned up.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import signal
from collections.abc import MutableMapping
from typing import Any, Final

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from app.engine.jobs import Engine, Job
from app.engine.sandbox import LiveIO, PendingStdin, StageResult
from app.errors import BadRequest
from app.piston.schemas import parse_execute

__all__ = ["connect"]

INIT_TIMEOUT_SECONDS: Final = 1.0


def _signal_number(name: object) -> int | None:
    """The number of a signal Piston accepts by name (SIGKILL, SIGINT, ...), else None."""
    if not isinstance(name, str) or not name.startswith("SIG"):
        return None
    try:
        return int(signal.Signals[name])
    except KeyError:
        return None


class _Connection:
    """One client: its messages in, the job's events out, one close."""

    def __init__(self, websocket: WebSocket, engine: Engine) -> None:
        self.websocket = websocket
        self.engine = engine
        self.live = LiveIO(
            output=self._output,
            stdin=PendingStdin(engine.settings.ws_max_pending_stdin_bytes),
        )
        self.closed = False
        self._send_lock = asyncio.Lock()
        self._decoders = {
            stream: codecs.getincrementaldecoder("utf-8")("replace")
            for stream in ("stdout", "stderr")
        }

    # -- out -----------------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            if self.closed:
                return
            try:
                await self.websocket.send_text(orjson.dumps(message).decode())
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.closed = True

    async def close(self, code: int, reason: str) -> None:
        async with self._send_lock:
            if self.closed:
                return
            self.closed = True
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await self.websocket.close(code, reason)

    async def error(self, message: str) -> None:
        # A close reason is limited to 123 bytes, so Piston says what went wrong in a message.
        await self.send({"type": "error", "message": message})
        await self.close(4002, "Notified Error")

    async def _output(self, stream: str, chunk: bytes) -> None:
        data = self._decoders[stream].decode(chunk)
        if data:
            await self.send({"type": "data", "stream": stream, "data": data})

    # StageEvents

    async def stage(self, name: str) -> None:
        await self.send({"type": "stage", "stage": name})

    async def exit(self, name: str, result: StageResult) -> None:
        for stream, decoder in self._decoders.items():
            if rest := decoder.decode(b"", final=True):
                await self.send({"type": "data", "stream": stream, "data": rest})
            decoder.reset()
        await self.send({"type": "exit", "stage": name, **result.as_json()})

    # -- the job -------------------------------------------------------------------------------

    async def run(self, job: Job) -> None:
        try:
            async with self.engine.primed(job) as box:
                runtime = job.host.runtime
                await self.send(
                    {"type": "runtime", "language": runtime.language, "version": runtime.version}
                )
                await self.engine.run_stages(
                    job, box, stdin=job.request.stdin.encode("utf-8"), live=self.live, events=self
                )
        except BadRequest as exc:
            await self.error(exc.message)
            return
        await self.close(4999, "Job Completed")

    # -- in ------------------------------------------------------------------------------------

    async def serve(self) -> None:
        await self.websocket.accept()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + INIT_TIMEOUT_SECONDS
        job_task: asyncio.Task[None] | None = None
        receiving: asyncio.Task[MutableMapping[str, Any]] | None = None
        try:
            while not self.closed:
                if receiving is None:
                    receiving = asyncio.ensure_future(self.websocket.receive())
                waiting: set[asyncio.Future[Any]] = {receiving}
                timeout: float | None = None
                if job_task is None:
                    timeout = max(0.0, deadline - loop.time())
                else:
                    waiting.add(job_task)
                done, _ = await asyncio.wait(
                    waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    await self.close(4001, "Initialization Timeout")
                    break
                if receiving not in done:
                    break  # the job ended and closed the connection
                message = receiving.result()
                receiving = None
                if message["type"] == "websocket.disconnect":
                    self.closed = True
                    break
                raw = message.get("text") or message.get("bytes") or b""
                job_task = await self.handle(raw, job_task)
        finally:
            # Whatever ends the connection ends the job: its sandbox is killed, its slot freed.
            if receiving is not None:
                receiving.cancel()
            if job_task is not None:
                job_task.cancel()
                await asyncio.gather(job_task, return_exceptions=True)

    async def handle(
        self, raw: str | bytes, job_task: asyncio.Task[None] | None
    ) -> asyncio.Task[None] | None:
        """Act on one client message; returns the job task (started by a first `init`)."""
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await self.error("message is not valid JSON")
            return job_task
        if not isinstance(message, dict):
            return job_task  # Piston ignores what has no known `type`
        kind = message.get("type")
        if kind == "init":
            if job_task is not None:
                await self.close(4000, "Already Initialized")
                return job_task
            try:
                job = self.engine.job_for(parse_execute(message))
            except BadRequest as exc:
                await self.error(exc.message)
                return None
            return asyncio.ensure_future(self.run(job))
        if kind not in ("data", "signal"):
            return job_task
        if job_task is None:
            await self.close(4003, "Not yet initialized")
        elif kind == "data":
            data = message.get("data")
            if message.get("stream") != "stdin":
                await self.close(4004, "Can only write to stdin")
            elif not isinstance(data, str):
                await self.error("data is required as a string")
            elif not self.live.stdin.put(data.encode("utf-8")):
                # The program is not reading its stdin as fast as it comes: the engine holds
                # PISTON_WS_MAX_PENDING_STDIN_BYTES for it, not more (1009: message too big).
                await self.close(1009, "Pending stdin over the limit")
        elif (number := _signal_number(message.get("signal"))) is None:
            await self.close(4005, "Invalid signal")
        else:
            self.live.signals.put_nowait(number)
        return job_task


async def connect(websocket: WebSocket) -> None:
    """Piston's interactive execution: init, stdin and signals in; stages and output out."""
    engine: Engine = websocket.app.state.engine
    await _Connection(websocket, engine).serve()
