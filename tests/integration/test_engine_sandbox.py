"""Sandbox probes run through a real engine: what a hostile job can see, create and fill.

The engine here runs with a canary variable in its environment and small disk caps, so that a job
reading any process's environment, or writing until the disk is full, shows it within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from app.engine.config import EngineSettings
from app.engine.disk import mount_job_disk, mounts_under, unmount
from app.engine.sandbox import UidPool
from tests.support import Service, start_engine

CANARY = "PGW_CANARY_SECRET"
CANARY_VALUE = "canary-7f3a9c-do-not-leak"
DISK_LIMIT = 32 * 1024 * 1024
FILE_LIMIT = 2_000


@pytest.fixture(scope="module")
def sandbox_engine() -> Iterator[Service]:
    service = start_engine(
        env={
            CANARY: CANARY_VALUE,
            "PISTON_JOB_DISK_LIMIT": str(DISK_LIMIT),
            "PISTON_JOB_FILE_LIMIT": str(FILE_LIMIT),
        }
    )
    yield service
    service.stop()


def execute(engine: Service, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(engine.url + "/api/v2/execute", json=body, timeout=60)


def run(engine: Service, language: str, code: str, **extra: Any) -> dict[str, Any]:
    response = execute(
        engine, {"language": language, "version": "*", "files": [{"content": code}], **extra}
    )
    assert response.status_code == 200, response.text
    stage: dict[str, Any] = response.json()["run"]
    return stage


# -- what a job can read ----------------------------------------------------------------------

READ_EVERY_PROCESS = r"""
import json, os
seen = {}
for pid in sorted(p for p in os.listdir("/proc") if p.isdigit()):
    for name in ("environ", "cmdline", "mountinfo"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                seen[f"{pid}/{name}"] = f.read().decode("utf-8", "replace")
        except OSError as exc:
            seen[f"{pid}/{name}"] = f"unreadable: {exc}"
print(json.dumps(seen))
"""


def test_no_process_a_job_sees_carries_the_engine_env_or_command_line(
    sandbox_engine: Service,
) -> None:
    stage = run(sandbox_engine, "python", READ_EVERY_PROCESS)
    assert stage["status"] is None, stage
    seen: dict[str, str] = json.loads(stage["stdout"])
    # Not vacuous: the job read PID 1 (bwrap, the job namespace's init) and its own process.
    assert "1/environ" in seen
    assert not seen["1/environ"].startswith("unreadable"), seen["1/environ"]
    assert not seen["1/cmdline"].startswith("unreadable"), seen["1/cmdline"]
    assert len([key for key in seen if key.endswith("/environ")]) >= 2
    host_job_root = str(EngineSettings().data_directory)  # where the suite's engines keep jobs
    for where, content in seen.items():
        assert CANARY not in content, where
        assert CANARY_VALUE not in content, where
        # The engine's own command line, and the host path of the job's folder.
        assert "--port" not in content, (where, content[:200])
        assert host_job_root not in content, (where, content[:200])
    # bwrap starts with an empty environment: PID 1 shows nothing at all.
    assert seen["1/environ"] == ""


def test_a_compile_stage_sees_no_engine_env_either(
    sandbox_engine: Service, languages: set[str]
) -> None:
    if "c" not in languages:
        pytest.skip("c is not installed on this host")
    # The compiler runs in a sandbox of its own: its PID 1 is a separate bwrap.
    code = (
        "#include <stdio.h>\n"
        'int main(void) { FILE *f = fopen("/proc/1/environ", "rb"); int n = 0;'
        ' if (!f) return 2; while (fgetc(f) != EOF) n++; printf("%d\\n", n); return 0; }\n'
    )
    body = execute(
        sandbox_engine,
        {"language": "c", "version": "*", "files": [{"name": "main.c", "content": code}]},
    ).json()
    assert body["compile"]["code"] == 0, body
    assert body["run"]["stdout"] == "0\n", body


@pytest.fixture(scope="module")
def languages(sandbox_engine: Service) -> set[str]:
    runtimes = httpx.get(sandbox_engine.url + "/api/v2/runtimes", timeout=10).json()
    return {runtime["language"] for runtime in runtimes}


# -- what a job can create --------------------------------------------------------------------


def test_nested_user_namespaces_are_refused(sandbox_engine: Service) -> None:
    stage = run(sandbox_engine, "bash", "unshare -U true; echo unshare=$?; unshare -Ur id")
    assert stage["stdout"].startswith("unshare="), stage
    assert stage["stdout"] != "unshare=0\n", stage
    assert "unshare failed" in stage["stderr"], stage
    assert "uid=0" not in stage["stdout"], stage
    # The system call itself, not only the tool: CLONE_NEWUSER is refused with ENOSPC (bwrap's
    # --disable-userns leaves a user-namespace count of zero for the job).
    python = run(
        sandbox_engine,
        "python",
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.unshare(0x10000000), os.strerror(ctypes.get_errno()))",
    )
    assert python["stdout"].startswith("-1 "), python


# -- what a job can fill ----------------------------------------------------------------------

FILL_EVERY_PLACE = r"""
import os
places = ("/tmp", "/var/tmp", "/dev/shm", ".")
written, failure = {place: 0 for place in places}, None
try:
    for i in range(64):
        place = places[i % 4]
        with open(f"{place}/fill{i}", "wb") as f:
            for _ in range(4):
                f.write(b"x" * (1024 * 1024))
                f.flush()
                written[place] += 1024 * 1024
except OSError as exc:
    failure = exc.errno
print(sum(written.values()), min(written.values()), failure)
"""


def test_the_disk_cap_holds_across_every_writable_place(sandbox_engine: Service) -> None:
    stage = run(sandbox_engine, "python", FILL_EVERY_PLACE)
    # The job goes on past the failed write and its answer comes back as usual.
    assert stage["status"] is None, stage
    assert stage["code"] == 0
    total, least, failure = stage["stdout"].split()
    assert failure in ("28", "27"), stage  # ENOSPC or EFBIG
    # One total for the four places together, not one cap each; each place took its share.
    assert int(total) <= DISK_LIMIT
    assert int(total) >= DISK_LIMIT // 2
    assert int(least) > 0


# Everywhere else a job might write: bwrap's own root and /dev are tmpfs mounts in RAM, outside
# the job's cap and its memory limit, unless they are read-only.
WRITE_OUTSIDE = """
import errno, os
for place in ("/", "/etc", "/dev", "/usr", "/home", "/box/.."):
    try:
        with open(os.path.join(place, "pgw-outside"), "wb") as f:
            f.write(b"x" * 1024)
        print(place, "written")
    except OSError as exc:
        print(place, errno.errorcode[exc.errno])
for place in ("/", "/dev"):
    try:
        os.mkdir(os.path.join(place, "pgw-dir"))
        print(place, "mkdir")
    except OSError as exc:
        print(place, errno.errorcode[exc.errno])
with open("/dev/null", "wb") as f:  # devices still work on a read-only /dev
    f.write(b"fine")
print("devnull ok")
"""


def test_nothing_outside_the_capped_places_is_writable(sandbox_engine: Service) -> None:
    stage = run(sandbox_engine, "python", WRITE_OUTSIDE)
    assert stage["status"] is None, stage
    lines = stage["stdout"].splitlines()
    assert lines[-1] == "devnull ok", stage
    for line in lines[:-1]:
        place, outcome = line.split()
        assert outcome in ("EROFS", "EACCES", "ENOENT", "EPERM"), (place, outcome, stage)


def test_the_file_count_is_capped(sandbox_engine: Service) -> None:
    code = (
        "import os\ncount = 0\ntry:\n"
        "    for i in range(50_000):\n        open(f'/tmp/e{i}', 'w').close(); count += 1\n"
        "except OSError as exc:\n    print(count, exc.errno)\nelse:\n    print(count, 'none')"
    )
    stage = run(sandbox_engine, "python", code)
    assert stage["status"] is None, stage
    count, failure = stage["stdout"].split()
    assert failure == "28", stage
    assert 0 < int(count) <= FILE_LIMIT


def test_the_cap_is_per_job_and_freed_with_it(sandbox_engine: Service) -> None:
    # 27 MiB of the 32: three files, each below the engine's 10 MB file size limit.
    fill = (
        "for i in range(3): open(f'/tmp/big{i}', 'wb').write(b'x' * (9 * 1024 * 1024))\n"
        "print('filled')"
    )
    # Two full jobs in a row: the second starts with the whole cap, the first's files gone.
    for _ in range(2):
        assert run(sandbox_engine, "python", fill)["stdout"] == "filled\n"


# -- what a job leaves open in the engine ----------------------------------------------------


def open_descriptors(engine: Service) -> tuple[int, int]:
    """The engine's descriptors: (pipes, files and the rest, sockets)."""
    assert engine.proc is not None
    fd_dir = f"/proc/{engine.proc.pid}/fd"
    kinds = []
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):  # closed while listed
            kinds.append(os.readlink(f"{fd_dir}/{fd}").startswith("socket:"))
    return kinds.count(False), kinds.count(True)


def wait_for_descriptors(engine: Service, before: tuple[int, int]) -> tuple[int, int]:
    # Connections the engine has answered close a moment after the client has the answer.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        others, sockets = open_descriptors(engine)
        if others == before[0] and sockets <= before[1]:
            break
        time.sleep(0.05)
    return others, sockets


PY = {"language": "python", "version": "*"}
REFUSED: list[tuple[dict[str, Any], str]] = [
    ({**PY, "files": [{"content": "print(1)"}], "args": ["a\x00b"]}, "args[0]"),
    ({**PY, "files": [{"content": "print(1)"}], "args": ["ok", "\x00"]}, "args[1]"),
    ({"language": "py\x00thon", "version": "*", "files": [{"content": "1"}]}, "language"),
    ({"language": "python", "version": "3\x00", "files": [{"content": "1"}]}, "version"),
    ({**PY, "files": [{"name": "a\x00.py", "content": "1"}]}, "files[0].name"),
    ({**PY, "files": [{"name": "a", "content": "1"}, {"name": "a/b", "content": "1"}]}, "a/b"),
    ({"language": "cobol", "version": "*", "files": [{"content": "1"}]}, "cobol"),
]


async def _interactive_failures(engine: Service) -> None:
    url = engine.url.replace("http", "ws") + "/api/v2/connect"
    init = {"type": "init", **PY, "files": [{"content": "import time; time.sleep(30)"}]}
    # A client that goes away mid-job, one that floods stdin, one whose init is refused.
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps(init))
        assert json.loads(await ws.recv())["type"] == "runtime"
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps(init))
        flood = json.dumps({"type": "data", "stream": "stdin", "data": "x" * 600_000})
        with contextlib.suppress(websockets.ConnectionClosed):
            for _ in range(8):
                await ws.send(flood)
            async for _ in ws:
                pass  # `runtime`, then the close
        assert ws.close_code == 1009
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({**init, "args": ["\x00"]}))
        assert json.loads(await ws.recv())["type"] == "error"


def test_refused_and_failed_jobs_leave_no_descriptor_open(sandbox_engine: Service) -> None:
    assert run(sandbox_engine, "python", "print('warm')")["stdout"] == "warm\n"
    before = open_descriptors(sandbox_engine)
    for _ in range(5):
        for body, field in REFUSED:
            response = execute(sandbox_engine, body)
            assert response.status_code == 400, response.text
            assert set(response.json()) == {"message"}
            assert field in response.json()["message"], response.json()
    # Jobs that fail once started: a wall timeout, an output cap, a crash, a full disk.
    assert run(sandbox_engine, "python", "while True: pass", run_timeout=200)["status"] == "TO"
    assert run(sandbox_engine, "bash", "yes")["status"] == "OL"
    assert run(sandbox_engine, "python", "import os; os.abort()")["status"] == "SG"
    full = "for i in range(8): open(f'f{i}', 'wb').write(b'x' * (9 * 1024 * 1024))"
    assert run(sandbox_engine, "python", full)["status"] == "RE"
    asyncio.run(_interactive_failures(sandbox_engine))
    others, sockets = wait_for_descriptors(sandbox_engine, before)
    assert others == before[0]  # no pipe, memfd or file left by any of them
    assert sockets <= before[1]
    # ... and the engine still runs jobs.
    assert run(sandbox_engine, "python", "print('after')")["stdout"] == "after\n"


def test_a_crashed_engines_job_mounts_are_detached_when_its_block_is_claimed(
    tmp_path: Path,
) -> None:
    # What a SIGKILLed engine leaves: a job's tmpfs still mounted under its uid block.
    if os.geteuid() != 0:
        pytest.skip("mounting a job's tmpfs needs root (the suite runs as root)")
    settings = EngineSettings(data_directory=tmp_path, max_concurrent_jobs=1)
    leftover = tmp_path / "block-0" / "job"
    leftover.parent.mkdir(parents=True)
    mount_job_disk(leftover, size=1024 * 1024, inodes=64, owner=os.getuid())
    (leftover / "tmp").mkdir()
    pool = UidPool(settings)
    try:
        assert leftover in mounts_under(tmp_path)
        pool.claim()
        assert mounts_under(tmp_path) == []
        assert not leftover.exists()
        assert pool.jobs_dir == tmp_path / "block-0"
    finally:
        pool.close()
        for point in mounts_under(tmp_path):
            unmount(point)
