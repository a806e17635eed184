"""Pure parts of the engine: version parsing, argv building, verdicts."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from app.engine.config import EngineSettings
from app.engine.disk import mount_point
from app.engine.host_runtimes import SPECS, entry_arg, host_runtime, normalize_version
from app.engine.sandbox import (
    SUPERVISOR,
    PendingStdin,
    StageLimits,
    SupervisorReport,
    bwrap_parts,
    classify,
    parse_report,
    run_stage,
)

LIMITS = StageLimits(
    timeout_ms=3000,
    cpu_time_ms=2500,
    memory_limit=-1,
    max_processes=64,
    max_open_files=2048,
    max_file_size=10_000_000,
    output_max_size=65_536,
)


@pytest.mark.parametrize(
    ("banner", "version"),
    [
        ("Python 3.11.2", "3.11.2"),
        ("v20.20.2\n", "20.20.2"),
        ("5.2.15(1)-release", "5.2.15"),
        ("12.2.0", "12.2.0"),
        ("javac 17.0.15", "17.0.15"),
        ("openjdk 21", "21.0.0"),
        ("go1.22", "1.22.0"),
        ("no digits", None),
    ],
)
def test_normalize_version(banner: str, version: str | None) -> None:
    assert normalize_version(banner) == version


def test_file_names_never_become_options() -> None:
    assert entry_arg("-o") == "./-o"
    assert entry_arg("main.c") == "main.c"


def test_python_aliases_follow_piston() -> None:
    spec = next(spec for spec in SPECS if spec.language == "python")
    host = host_runtime(spec, {"python3": "/usr/bin/python3.11"}, "Python 3.11.2")
    assert host is not None
    assert host.runtime.aliases == ("py", "py3", "python3", "python3.11")
    assert host.run_argv("file0.code", ["a"]) == ["/usr/bin/python3.11", "file0.code", "a"]
    assert not host.compiled


def test_c_compiles_every_file_then_runs_a_out() -> None:
    spec = next(spec for spec in SPECS if spec.language == "c")
    host = host_runtime(spec, {"gcc": "/usr/bin/gcc-12"}, "12.2.0")
    assert host is not None
    assert host.runtime.runtime == "gcc"
    argv = host.compile_argv(["main.c", "-x.c"])
    assert argv[0] == "/usr/bin/gcc-12"
    assert argv[-3:] == ["main.c", "./-x.c", "-lm"]
    assert host.run_argv("main.c", ["1", "2"]) == ["./a.out", "1", "2"]


def test_java_runs_the_source_launcher() -> None:
    spec = next(spec for spec in SPECS if spec.language == "java")
    host = host_runtime(spec, {"java": "/j/java", "javac": "/j/javac"}, "javac 17.0.15")
    assert host is not None
    argv = host.run_argv("file0.code", ["x"])
    assert argv[0] == "/j/java"
    assert argv[-4:] == ["--source", "17", "file0.code", "x"]


def bwrap_argv(**parts: Any) -> list[str]:
    """bwrap's whole command line as the engine hands it over: bwrap, its options, `--`, the
    sandboxed command."""
    bwrap, options, sandboxed = bwrap_parts(**parts)
    return [bwrap, *options, "--", *sandboxed]


def test_bwrap_argv_isolates_the_job() -> None:
    settings = EngineSettings(bwrap_path=Path("/usr/bin/bwrap"))
    argv = bwrap_argv(
        settings=settings,
        job_dir=Path("/jobs/abc"),
        env={"PATH": "/usr/bin", "HOME": "/tmp"},
        command=["/usr/bin/python3", "file0.code"],
        limits=LIMITS,
        status_fd=7,
        control_fd=8,
    )
    joined = " ".join(argv)
    assert argv[0] == "/usr/bin/bwrap"
    for flag in (
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
    ):
        assert flag in argv
    assert "--share-net" not in argv
    assert "--ro-bind /usr /usr" in joined
    assert "--bind /jobs/abc /box/submission" in joined
    for private in ("/tmp", "/var/tmp", "/dev/shm"):
        assert f"--tmpfs {private}" in joined
    # /etc is never bound whole: only the entries a runtime needs.
    assert "--ro-bind /etc /etc" not in joined
    separator = argv.index("--")
    supervisor = argv[separator + 1 :]
    assert supervisor[supervisor.index("-c") + 1] == SUPERVISOR
    # status fd, control fd, CPU seconds (2500 ms rounded up), memory, processes, files, size.
    assert supervisor[-9:] == [
        "7", "8", "3", "-1", "64", "2048", "10000000", "/usr/bin/python3", "file0.code",
    ]  # fmt: skip


@pytest.mark.parametrize(("cpu_ms", "seconds"), [(1, 1), (1000, 1), (1001, 2), (3000, 3)])
def test_cpu_seconds_round_up(cpu_ms: int, seconds: int) -> None:
    assert dataclasses.replace(LIMITS, cpu_time_ms=cpu_ms).cpu_seconds == seconds


def test_parse_report() -> None:
    assert parse_report(b"-11 20 8388608\n") == SupervisorReport(-11, 20, 8_388_608)
    assert parse_report(b"") is None
    assert parse_report(b"garbage") is None


def _report(code: int, cpu: int = 10) -> SupervisorReport:
    return SupervisorReport(exit_code=code, cpu_time_ms=cpu, memory_bytes=1)


@pytest.mark.parametrize(
    ("killed", "report", "expected"),
    [
        (None, _report(0), (0, None, None, None)),
        (None, _report(3), (3, None, "RE", "Exited with error status 3")),
        (None, _report(-signal.SIGSEGV), (None, "SIGSEGV", "SG", "Caught fatal signal 11")),
        (None, _report(-signal.SIGKILL), (None, "SIGKILL", "SG", "Caught fatal signal 9")),
        (None, _report(-signal.SIGXCPU, 1000), (None, "SIGKILL", "TO", "Time limit exceeded")),
        (None, _report(0, 2501), (None, "SIGKILL", "TO", "Time limit exceeded")),
        ("TO", _report(-9), (None, "SIGKILL", "TO", "Time limit exceeded (wall clock)")),
        ("OL", _report(-9), (None, "SIGKILL", "OL", "stdout length exceeded")),
        ("EL", None, (None, "SIGKILL", "EL", "stderr length exceeded")),
        (None, None, (None, None, "XX", "Internal error: the sandbox did not report")),
    ],
)
def test_classify(
    killed: str | None,
    report: SupervisorReport | None,
    expected: tuple[int | None, str | None, str | None, str | None],
) -> None:
    verdict = classify(killed=killed, report=report, cpu_time_ms=2500)
    assert (verdict.code, verdict.signal, verdict.status, verdict.message) == expected


def test_settings_use_pistons_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PISTON_RUN_TIMEOUT", "5000")
    monkeypatch.setenv("PISTON_OUTPUT_MAX_SIZE", "1024")
    settings = EngineSettings()
    assert settings.run_timeout == 5000
    assert settings.output_max_size == 1024
    assert settings.caps["run_timeout"] == 5000
    assert settings.caps["compile_timeout"] == 10_000


def _argv(**overrides: object) -> list[str]:
    arguments: dict[str, object] = {
        "settings": EngineSettings(bwrap_path=Path("/usr/bin/bwrap")),
        "job_dir": Path("/jobs/abc/submission"),
        "env": {"PATH": "/usr/bin"},
        "command": ["/usr/bin/python3", "file0.code"],
        "limits": LIMITS,
        "status_fd": 7,
        "control_fd": 8,
        **overrides,
    }
    return bwrap_argv(**arguments)


def test_a_jobs_scratch_folders_share_its_one_capped_filesystem() -> None:
    joined = " ".join(_argv(scratch=Path("/jobs/abc")))
    assert "--tmpfs" not in joined
    assert "--bind /jobs/abc/tmp /tmp" in joined
    assert "--bind /jobs/abc/var-tmp /var/tmp" in joined
    assert "--bind /jobs/abc/shm /dev/shm" in joined
    assert "--bind /jobs/abc/submission /box/submission" in joined


@pytest.mark.parametrize(
    "overrides",
    [
        {"command": ["/usr/bin/python3", "a\x00--bind"]},
        {"env": {"X": "a\x00b"}},
        {"job_dir": Path("/jobs/a\x00b")},
    ],
)
def test_bwrap_argv_refuses_a_nul(overrides: dict[str, object]) -> None:
    # bwrap reads its options NUL-separated: a NUL would split one argument into two.
    with pytest.raises(ValueError, match="NUL"):
        _argv(**overrides)


def _open_descriptors() -> int:
    """The pipes and memfds this process holds: the kinds a stage opens.

    Not every descriptor: in a full run, sockets that earlier tests' clients left open close in
    the middle of the count (17 after, 21 before), whatever the stage did.
    """
    kinds = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor, now closed
            kinds.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sum(1 for kind in kinds if kind.startswith(("pipe:", "/memfd:")))


@pytest.mark.parametrize(
    ("settings", "command"),
    [
        (EngineSettings(), ["/usr/bin/true", "a\x00b"]),
        (EngineSettings(bwrap_path=Path("/nonexistent/bwrap")), ["/usr/bin/true"]),
    ],
)
async def test_a_stage_that_cannot_start_leaves_no_descriptor(
    tmp_path: Path, settings: EngineSettings, command: list[str]
) -> None:
    before = _open_descriptors()
    for _ in range(5):
        result = await run_stage(
            settings=settings,
            uid=os.getuid(),
            job_dir=tmp_path,
            env={},
            command=command,
            stdin=b"",
            limits=LIMITS,
        )
        assert result.status == "XX"
        assert result.message is not None
        assert result.message.startswith("Internal error: cannot start the sandbox")
    assert _open_descriptors() == before


async def test_pending_stdin_is_held_to_its_limit() -> None:
    pending = PendingStdin(10)
    assert pending.put(b"123456")
    assert not pending.put(b"12345")  # 11 bytes would be waiting
    assert pending.put(b"1234")
    assert pending.pending == 10
    assert await pending.get() == b"123456"
    assert pending.pending == 10  # still the engine's until the program's pipe takes it
    pending.taken(6)
    assert pending.put(b"abcdef")
    assert pending.pending == 10


def test_job_caps_default_to_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = EngineSettings()
    assert settings.job_disk_limit == 256 * 1024 * 1024
    assert settings.ws_max_pending_stdin_bytes == 1024 * 1024
    monkeypatch.setenv("PISTON_JOB_DISK_LIMIT", "1000000")
    monkeypatch.setenv("PISTON_WS_MAX_PENDING_STDIN_BYTES", "2048")
    assert EngineSettings().job_disk_limit == 1_000_000
    assert EngineSettings().ws_max_pending_stdin_bytes == 2048


def test_mountinfo_escapes_are_undone() -> None:
    line = b"84 67 0:39 / /tmp/jobs\\040x/a rw,nosuid - tmpfs pgw-job rw,size=1k\n"
    assert mount_point(line) == b"/tmp/jobs x/a"
    assert mount_point(b"garbage\n") == b""
