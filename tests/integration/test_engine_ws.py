"""The engine's interactive `WS /api/v2/connect`, against the real engine process."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.integration.test_engine import assert_clean, job_uids, live_processes
from tests.support import Service

ECHO = "import sys\nsys.stdout.write(sys.stdin.readline())\n"
C_ECHO = (
    "#include <stdio.h>\n"
    'int main(void){char b[64];if(!fgets(b,sizeof b,stdin))return 1;printf("c:%s",b);return 0;}\n'
)
SPIN = "while True:\n    pass\n"


def ws_url(engine: Service) -> str:
    return engine.url.replace("http://", "ws://", 1) + "/api/v2/connect"


def init(language: str, code: str, **extra: Any) -> dict[str, Any]:
    return {"type": "init", "language": language, "version": "*", "files": [{"content": code}]} | (
        extra
    )


async def send(ws: ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(orjson.dumps(message).decode())


async def receive(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 15))
    return message


async def until_closed(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every message left, then the close (its code and reason are on `ws`)."""
    messages: list[dict[str, Any]] = []
    try:
        while True:
            messages.append(await receive(ws))
    except ConnectionClosed:
        return messages


def close_code(ws: ClientConnection) -> tuple[int | None, str | None]:
    return ws.close_code, ws.close_reason


async def test_python_echoes_stdin_as_it_arrives(engine: Service) -> None:
    async with connect(ws_url(engine)) as ws:
        await send(ws, init("python", ECHO))
        runtime = await receive(ws)
        assert runtime["type"] == "runtime"
        assert runtime["language"] == "python"
        assert isinstance(runtime["version"], str)
        assert await receive(ws) == {"type": "stage", "stage": "run"}
        await send(ws, {"type": "data", "stream": "stdin", "data": "hello\n"})
        assert await receive(ws) == {"type": "data", "stream": "stdout", "data": "hello\n"}
        rest = await until_closed(ws)
    assert len(rest) == 1, rest
    exit_ = rest[0]
    assert exit_["type"] == "exit"
    assert exit_["stage"] == "run"
    assert exit_["code"] == 0
    assert exit_["signal"] is None
    assert exit_["status"] is None
    assert isinstance(exit_["wall_time"], int)
    assert close_code(ws) == (4999, "Job Completed")
    assert_clean(engine)


async def test_c_compiles_then_runs_with_the_init_stdin_first(engine: Service) -> None:
    async with connect(ws_url(engine)) as ws:
        await send(ws, init("c", C_ECHO, stdin="from init\n"))
        messages = [await receive(ws)] + await until_closed(ws)
    kinds = [(m["type"], m.get("stage")) for m in messages if m["type"] != "data"]
    assert kinds == [
        ("runtime", None),
        ("stage", "compile"),
        ("exit", "compile"),
        ("stage", "run"),
        ("exit", "run"),
    ]
    exits = [m for m in messages if m["type"] == "exit"]
    assert [m["code"] for m in exits] == [0, 0]
    stdout = "".join(m["data"] for m in messages if m.get("stream") == "stdout")
    assert stdout == "c:from init\n"
    assert close_code(ws) == (4999, "Job Completed")


async def test_invalid_init_is_notified_then_closed(engine: Service) -> None:
    async with connect(ws_url(engine)) as ws:
        await send(ws, init("no-such-language", "x"))
        messages = await until_closed(ws)
    assert len(messages) == 1
    assert messages[0]["type"] == "error"
    assert messages[0]["message"].endswith("runtime is unknown")
    assert close_code(ws) == (4002, "Notified Error")


async def test_no_init_times_out(engine: Service) -> None:
    async with connect(ws_url(engine)) as ws:
        started = asyncio.get_running_loop().time()
        assert await until_closed(ws) == []
        elapsed = asyncio.get_running_loop().time() - started
    assert close_code(ws) == (4001, "Initialization Timeout")
    assert 0.8 < elapsed < 3


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"type": "data", "stream": "stdin", "data": "x"}, 4003),
        ({"type": "signal", "signal": "SIGKILL"}, 4003),
    ],
)
async def test_data_or_signal_before_init(
    engine: Service, message: dict[str, Any], code: int
) -> None:
    async with connect(ws_url(engine)) as ws:
        await send(ws, message)
        assert await until_closed(ws) == []
    assert close_code(ws) == (code, "Not yet initialized")


@pytest.mark.parametrize(
    ("message", "close"),
    [
        ({"type": "data", "stream": "stdout", "data": "x"}, (4004, "Can only write to stdin")),
        ({"type": "signal", "signal": "SIGNOPE"}, (4005, "Invalid signal")),
        (init("python", "print(1)"), (4000, "Already Initialized")),
    ],
)
async def test_misuse_during_a_job_closes_and_kills_it(
    engine: Service, message: dict[str, Any], close: tuple[int, str]
) -> None:
    async with connect(ws_url(engine)) as ws:
        await send(ws, init("python", SPIN))
        assert (await receive(ws))["type"] == "runtime"
        assert await receive(ws) == {"type": "stage", "stage": "run"}
        await send(ws, message)
        await until_closed(ws)
    assert close_code(ws) == close
    assert_clean(engine)


async def test_sigkill_ends_the_program(engine: Service) -> None:
    async with connect(ws_url(engine)) as ws:
        await send(ws, init("python", SPIN))
        assert (await receive(ws))["type"] == "runtime"
        assert await receive(ws) == {"type": "stage", "stage": "run"}
        await send(ws, {"type": "signal", "signal": "SIGKILL"})
        messages = await until_closed(ws)
    assert [m["type"] for m in messages] == ["exit"]
    assert messages[0]["signal"] == "SIGKILL"
    assert messages[0]["status"] == "SG"
    assert messages[0]["code"] is None
    assert close_code(ws) == (4999, "Job Completed")


async def test_wall_timeout_applies(engine: Service) -> None:
    async with connect(ws_url(engine)) as ws:
        await send(ws, init("python", SPIN, run_timeout=200))
        messages = await until_closed(ws)
    exit_ = messages[-1]
    assert exit_["type"] == "exit"
    assert exit_["status"] == "TO"
    assert exit_["signal"] == "SIGKILL"
    assert close_code(ws) == (4999, "Job Completed")


async def test_client_disconnect_kills_the_job(engine: Service) -> None:
    uids = job_uids(engine)
    async with connect(ws_url(engine)) as ws:
        await send(
            ws,
            init("python", "import subprocess, time\nsubprocess.Popen(['sleep', '60'])\n" + SPIN),
        )
        assert (await receive(ws))["type"] == "runtime"
        assert await receive(ws) == {"type": "stage", "stage": "run"}
        for _ in range(100):  # the program is running as a job uid
            if live_processes(uids):
                break
            await asyncio.sleep(0.02)
        assert live_processes(uids)
    # The client is gone well before the 3 s run timeout: nothing of the job may stay.
    await asyncio.to_thread(assert_clean, engine)


async def test_output_cap_applies_to_streamed_output(engine: Service) -> None:
    async with connect(ws_url(engine)) as ws:
        await send(ws, init("python", "import sys\nsys.stdout.write('x' * 1_000_000)\n"))
        messages = await until_closed(ws)
    streamed = "".join(m["data"] for m in messages if m.get("stream") == "stdout")
    assert len(streamed) <= 65_536
    exit_ = messages[-1]
    assert (exit_["type"], exit_["status"], exit_["signal"]) == ("exit", "OL", "SIGKILL")
    assert exit_["stdout"] == ""  # streamed, as Piston's interactive result
    assert close_code(ws) == (4999, "Job Completed")


# -- binary frames, bounds ----------------------------------------------------------------------


async def test_binary_frames_are_read_as_json_text(engine: Service) -> None:
    # Piston reads a binary frame's payload as the same JSON text: init and stdin alike.
    async with connect(ws_url(engine)) as ws:
        await ws.send(orjson.dumps(init("python", ECHO)))
        assert (await receive(ws))["type"] == "runtime"
        assert await receive(ws) == {"type": "stage", "stage": "run"}
        await ws.send(orjson.dumps({"type": "data", "stream": "stdin", "data": "bin\n"}))
        assert await receive(ws) == {"type": "data", "stream": "stdout", "data": "bin\n"}
        rest = await until_closed(ws)
    assert [m["type"] for m in rest] == ["exit"]
    assert rest[0]["code"] == 0
    assert close_code(ws) == (4999, "Job Completed")


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (orjson.dumps(init("no-such-language", "x")), "runtime is unknown"),
        (orjson.dumps(init("python", "x", args=["a\x00b"])), "args[0] must not contain a NUL"),
        (b"\xff\xfe not json", "message is not valid JSON"),
    ],
)
async def test_a_refused_binary_init_is_sent_an_error_before_the_close(
    engine: Service, frame: bytes, message: str
) -> None:
    async with connect(ws_url(engine)) as ws:
        await ws.send(frame)
        messages = await until_closed(ws)
    assert [m["type"] for m in messages] == ["error"]
    assert message in messages[0]["message"]
    assert close_code(ws) == (4002, "Notified Error")


def _rss_mib(engine: Service) -> float:
    assert engine.proc is not None
    with open(f"/proc/{engine.proc.pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


async def test_stdin_a_program_never_reads_is_bounded(engine: Service) -> None:
    before = _rss_mib(engine)
    chunk = orjson.dumps({"type": "data", "stream": "stdin", "data": "x" * 1_000_000}).decode()
    async with connect(ws_url(engine)) as ws:
        await send(ws, init("python", "import time\ntime.sleep(30)\n"))
        assert (await receive(ws))["type"] == "runtime"
        # At most 48 MB sent; the engine holds PISTON_WS_MAX_PENDING_STDIN_BYTES (1 MiB) of it.
        with contextlib.suppress(ConnectionClosed):
            for _ in range(48):
                await ws.send(chunk)
            await until_closed(ws)
    assert close_code(ws)[0] == 1009
    assert "Traceback" not in engine.log()
    # The socket's memory is the engine's no longer (a generous bound: allocator slack).
    assert _rss_mib(engine) - before < 40
    assert_clean(engine)


async def test_a_message_over_the_body_limit_is_refused(engine: Service) -> None:
    big = init("python", "#" * (2 * 1024 * 1024))
    async with connect(ws_url(engine), max_size=None) as ws:
        await send(ws, big)
        assert await until_closed(ws) == []
    assert close_code(ws)[0] == 1009
    assert "Traceback" not in engine.log()
