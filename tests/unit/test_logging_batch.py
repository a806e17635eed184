"""app.logging._BatchedLines: the access lines of one loop iteration, written together in whole
lines of at most PIPE_BUF bytes (workers share one stderr pipe), none lost or reordered."""

from __future__ import annotations

import asyncio
import io

from app.logging import _ATOMIC_WRITE, _BatchedLines


class RecordingStream(io.RawIOBase):
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


def _lines(count: int, size: int = 300) -> list[bytes]:
    return [f"{n:04d}".encode() + b"x" * (size - 4) for n in range(count)]


async def test_one_iterations_lines_in_whole_atomic_writes_in_order() -> None:
    stream = RecordingStream()
    batch = _BatchedLines(stream)  # type: ignore[arg-type]
    lines = _lines(100)
    for line in lines:
        batch.msg(line)
    assert stream.writes == []  # held until the iteration ends
    await asyncio.sleep(0)
    assert len(stream.writes) > 1
    assert all(len(write) <= _ATOMIC_WRITE and write.endswith(b"\n") for write in stream.writes)
    assert b"".join(stream.writes).split(b"\n")[:-1] == lines
    batch.close()


async def test_a_line_longer_than_the_bound_goes_alone() -> None:
    stream = RecordingStream()
    batch = _BatchedLines(stream)  # type: ignore[arg-type]
    long = b"y" * (_ATOMIC_WRITE * 2)
    for line in (b"a", long, b"b"):
        batch.msg(line)
    await asyncio.sleep(0)
    assert stream.writes == [b"a\n", long + b"\n", b"b\n"]
    batch.close()


def test_lines_held_by_a_loop_that_closed_go_out_with_the_next() -> None:
    stream = RecordingStream()
    batch = _BatchedLines(stream)  # type: ignore[arg-type]

    async def log(line: bytes) -> None:
        batch.msg(line)

    first = asyncio.new_event_loop()
    first.run_until_complete(log(b"held"))  # its flush was scheduled, never ran
    first.close()
    second = asyncio.new_event_loop()
    second.run_until_complete(log(b"next"))
    second.run_until_complete(asyncio.sleep(0))
    second.close()
    assert b"".join(stream.writes) == b"held\nnext\n"
    batch.close()


def test_outside_a_loop_a_line_is_written_at_once() -> None:
    stream = RecordingStream()
    batch = _BatchedLines(stream)  # type: ignore[arg-type]
    batch.msg(b"now")
    assert stream.writes == [b"now\n"]
    batch.close()
