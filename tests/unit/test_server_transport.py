"""app.server._CoalescingTransport: a response's writes leave in one send, nothing is lost or
reordered, and ending the connection sends (close) or drops (abort) what is held."""

from __future__ import annotations

import asyncio
from typing import Any

from app.server import _CoalescingTransport


class RecordingTransport:
    def __init__(self) -> None:
        self.events: list[Any] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "written after close"
        self.events.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def abort(self) -> None:
        self.closing = True
        self.events.append("abort")

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


async def _iteration() -> None:
    await asyncio.sleep(0)  # the flush is scheduled with call_soon: one iteration later


async def test_writes_of_one_iteration_leave_together_in_order() -> None:
    real = RecordingTransport()
    transport = _CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.writelines([b"{", b"}"])
    assert real.events == []
    await _iteration()
    assert real.events == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
    transport.write(b"next")
    await _iteration()
    assert real.events[-1] == b"next"


async def test_close_sends_what_is_held_first() -> None:
    real = RecordingTransport()
    transport = _CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"answer")
    transport.close()
    await _iteration()  # the scheduled flush finds nothing more to send
    assert real.events == [b"answer", "close"]


async def test_abort_drops_what_is_held() -> None:
    real = RecordingTransport()
    transport = _CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"never sent")
    transport.abort()
    await _iteration()
    assert real.events == ["abort"]


async def test_the_rest_is_the_transport_s() -> None:
    real = RecordingTransport()
    transport = _CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    assert transport.get_extra_info("peername") == "info:peername"
    real.closing = True
    assert transport.is_closing()
    transport.write(b"to a closed connection")
    await _iteration()
    assert real.events == []


async def test_a_large_burst_is_not_held_back() -> None:
    # A producer writing a lot within one iteration: past 64 KiB it goes to the transport at
    # once, so the transport's own buffer and flow control see it (nothing piles up here).
    real = RecordingTransport()
    transport = _CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    for _ in range(20):
        transport.write(b"z" * 8192)
    assert sum(len(w) for w in real.events) >= 64 * 1024
    await _iteration()
    assert b"".join(real.events) == b"z" * 8192 * 20
