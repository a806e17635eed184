"""The engine: host runtimes, job slots, and one job from request to Piston's answer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from app.engine.config import EngineSettings
from app.engine.disk import mount_job_disk, unmount
from app.engine.runtimes import SPECS, HostRuntime, find_tool, host_runtime, locate
from app.engine.sandbox import (
    SCRATCH_DIRS,
    LiveIO,
    SandboxUnavailable,
    StageLimits,
    StageResult,
    UidPool,
    run_stage,
    sweep_uid,
)
from app.errors import BadRequest
from app.piston.resolve import Runtime, resolve_runtime, unknown_runtime_message
from app.piston.schemas import (
    ExecuteRequest,
    decode_content,
    enforce_caps,
    require_utf8_file,
)

__all__ = ["JOB_STATUSES", "Box", "Engine", "EngineMetrics", "Job", "StageEvents"]

JOB_STATUSES: Final = ("ok", "RE", "SG", "TO", "OL", "EL", "XX")
_PROBE_LIMITS: Final = StageLimits(
    timeout_ms=20_000,
    cpu_time_ms=20_000,
    memory_limit=-1,
    max_processes=64,
    max_open_files=256,
    max_file_size=1_000_000,
    output_max_size=65_536,
)
_INSTALL_HINT: Final = (
    "install bubblewrap (apt-get install bubblewrap) on a kernel that allows unprivileged user "
    "namespaces; the engine never runs code unsandboxed"
)


class EngineMetrics:
    """The engine's own registry, so tests and benchmarks can count real executions."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.executions = Counter(
            "pgw_engine_executions",
            "Jobs the engine has run (one per execute request that reached a sandbox)",
            registry=self.registry,
        )
        self.jobs = Counter(
            "pgw_engine_jobs",
            "Jobs by the status of their last stage (ok when it exited normally)",
            ["status"],
            registry=self.registry,
        )
        for status in JOB_STATUSES:
            self.jobs.labels(status=status)
        self.in_flight = Gauge(
            "pgw_engine_jobs_in_flight", "Jobs running in a sandbox now", registry=self.registry
        )
        self.waiting = Gauge(
            "pgw_engine_jobs_waiting", "Jobs waiting for a free slot", registry=self.registry
        )
        self.first_uid = Gauge(
            "pgw_engine_job_uid_first",
            "First uid of this engine's job slots (slot i runs as first + i)",
            registry=self.registry,
        )
        self.slots = Gauge(
            "pgw_engine_job_slots", "Jobs that may run at once", registry=self.registry
        )
        self.leftovers = Counter(
            "pgw_engine_leftover_processes",
            "Processes of a finished job's uid found and killed by the janitor (should stay 0)",
            registry=self.registry,
        )


@dataclass(frozen=True, slots=True)
class Job:
    """A checked request: its host runtime and its files, decoded."""

    request: ExecuteRequest
    host: HostRuntime
    files: list[tuple[str, bytes]]
    code_files: list[str]


@dataclass(frozen=True, slots=True)
class Box:
    """A primed job: the slot's uid and the job's root folder.

    With root, `root` is the job's own tmpfs (see app.engine.disk): its folder and its /tmp,
    /var/tmp and /dev/shm (`scratch`) under one cap. Without root it is a plain folder, and each
    stage gets tmpfs mounts of its own.
    """

    uid: int
    root: Path
    capped: bool

    @property
    def job_dir(self) -> Path:
        return self.root / "submission"

    @property
    def scratch(self) -> Path | None:
        return self.root if self.capped else None


class StageEvents(Protocol):
    """What an interactive job is told as its stages start and end."""

    async def stage(self, name: str) -> None: ...

    async def exit(self, name: str, result: StageResult) -> None: ...


def _write_files(job_dir: Path, files: Sequence[tuple[str, bytes]], uid: int | None) -> None:
    """Lay out a job folder the job uid owns (run in a worker thread: it is blocking I/O)."""
    job_dir.mkdir(mode=0o700)
    if uid is not None:
        os.chown(job_dir, uid, uid)
    for name, content in files:
        path = job_dir / name
        try:
            for parent in reversed(path.relative_to(job_dir).parents[:-1]):
                directory = job_dir / parent
                if not directory.is_dir():
                    directory.mkdir(mode=0o700)
                    if uid is not None:
                        os.chown(directory, uid, uid)
            path.write_bytes(content)
        except OSError as exc:
            raise BadRequest(f"file {name!r} cannot be written: {exc.strerror}") from None
        if uid is not None:
            os.chown(path, uid, uid)


def _lay_out(box: Box, files: Sequence[tuple[str, bytes]], settings: EngineSettings) -> None:
    """The job's root (its capped tmpfs, with root), its scratch folders and its files."""
    owner = box.uid if box.capped else None
    if box.capped:
        mount_job_disk(
            box.root, size=settings.job_disk_limit, inodes=settings.job_file_limit, owner=box.uid
        )
        for name in SCRATCH_DIRS:
            (box.root / name).mkdir(mode=0o700)
            os.chown(box.root / name, box.uid, box.uid)
    else:
        box.root.mkdir(mode=0o700)
    _write_files(box.job_dir, files, owner)


def _refuse_nul(request: ExecuteRequest) -> None:
    """A NUL cannot be part of a command line or a path: name the field that holds one."""
    fields = [("language", request.language), ("version", request.version)]
    fields += [
        (f"files[{index}].name", file.name or "") for index, file in enumerate(request.files)
    ]
    fields += [(f"args[{index}]", arg) for index, arg in enumerate(request.args)]
    for name, value in fields:
        if "\x00" in value:
            raise BadRequest(f"{name} must not contain a NUL character")


class Engine:
    """Everything the HTTP layer needs: the runtimes, the job slots, the metrics."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.pool = UidPool(settings)
        self.metrics = EngineMetrics()
        self.runtimes: list[HostRuntime] = []
        self._catalog: list[Runtime] = []

    # -- start -------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Claim a uid block, prove the sandbox, find the runtimes; raises SandboxUnavailable."""
        bwrap = self.settings.bwrap_path
        if not (bwrap.is_file() and os.access(bwrap, os.X_OK)):
            raise SandboxUnavailable(f"bubblewrap not found at {bwrap}: {_INSTALL_HINT}")
        if not self.settings.supervisor_python.is_file():
            raise SandboxUnavailable(
                f"{self.settings.supervisor_python} not found: the sandbox supervisor needs the "
                "system python3 (apt-get install python3)"
            )
        self.pool.claim()
        if self.pool.privileged:
            await asyncio.to_thread(self._prove_job_disk)
        else:
            sys.stderr.write(
                "engine: not root, so PISTON_JOB_DISK_LIMIT caps /tmp, /var/tmp and /dev/shm per "
                "stage but not the job folder (mounting a job's tmpfs needs root)\n"
            )
        self.metrics.first_uid.set(self.pool.uid_for(0))
        self.metrics.slots.set(self.settings.max_concurrent_jobs)
        true = find_tool("true") or "/usr/bin/true"
        probe = await self._sandboxed(self.pool.uid_for(0), [true])
        if probe.status is not None:
            detail = (probe.stderr.strip().splitlines() or [probe.message or "no output"])[0]
            raise SandboxUnavailable(
                f"bubblewrap cannot build a sandbox here ({detail}): {_INSTALL_HINT}"
            )
        found = await asyncio.gather(
            *(self._discover(spec_index, spec) for spec_index, spec in enumerate(SPECS))
        )
        self.runtimes = [runtime for runtime in found if runtime is not None]
        self._catalog = [runtime.runtime for runtime in self.runtimes]

    def _prove_job_disk(self) -> None:
        box = Box(uid=self.pool.uid_for(0), root=self.pool.jobs_dir / "probe-disk", capped=True)
        try:
            _lay_out(box, [], self.settings)
        except OSError as exc:
            raise SandboxUnavailable(
                f"{exc.strerror}: the engine caps each job's disk with a tmpfs of its own"
            ) from None
        finally:
            self._clean_up(box)

    async def _discover(self, index: int, spec: Any) -> HostRuntime | None:
        tools = locate(spec)
        if tools is None:
            return None
        uid = self.pool.uid_for(index % self.settings.max_concurrent_jobs)
        result = await self._sandboxed(uid, spec.version_argv(tools))
        if result.status is not None:
            sys.stderr.write(f"engine: {spec.language} not listed: its version query failed\n")
            return None
        return host_runtime(spec, tools, result.stdout + result.stderr)

    async def _sandboxed(self, uid: int, command: Sequence[str]) -> StageResult:
        job_dir = self.pool.jobs_dir / f"probe-{uuid.uuid4().hex}"
        owner = uid if self.pool.privileged else None
        await asyncio.to_thread(_write_files, job_dir, [], owner)
        try:
            return await run_stage(
                settings=self.settings,
                uid=uid,
                job_dir=job_dir,
                env=self._env("probe"),
                command=command,
                stdin=b"",
                limits=_PROBE_LIMITS,
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, job_dir, True)

    def close(self) -> None:
        self.pool.close()

    # -- catalog -----------------------------------------------------------------------------

    @property
    def catalog(self) -> list[Runtime]:
        return self._catalog

    def resolve(self, language: str, version: str) -> HostRuntime:
        runtime = resolve_runtime(self._catalog, language, version)
        if runtime is None:
            raise BadRequest(unknown_runtime_message(language, version))
        return next(host for host in self.runtimes if host.runtime is runtime)

    # -- jobs --------------------------------------------------------------------------------

    def _env(self, language: str) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "PISTON_LANGUAGE": language,
        }

    def _limits(self, request: ExecuteRequest, stage: str) -> StageLimits:
        settings = self.settings

        def pick(name: str) -> int:
            # Piston treats an absent or zero limit alike: the configured one applies.
            return request.limit(name) or int(getattr(settings, name))

        return StageLimits(
            timeout_ms=pick(f"{stage}_timeout"),
            cpu_time_ms=pick(f"{stage}_cpu_time"),
            memory_limit=pick(f"{stage}_memory_limit"),
            max_processes=settings.max_process_count,
            max_open_files=settings.max_open_files,
            max_file_size=settings.max_file_size,
            output_max_size=settings.output_max_size,
        )

    def job_for(self, request: ExecuteRequest) -> Job:
        """Check a request against the catalog and the caps (BadRequest: Piston's 400 message)."""
        _refuse_nul(request)
        require_utf8_file(request)
        host = self.resolve(request.language, request.version)
        enforce_caps(request, self.settings.caps)
        files = [
            (file.name or f"file{index}.code", decode_content(file))
            for index, file in enumerate(request.files)
        ]
        code_files = [
            name
            for (name, _), file in zip(files, request.files, strict=True)
            if file.encoding == "utf8"
        ]
        return Job(request=request, host=host, files=files, code_files=code_files)

    @contextlib.asynccontextmanager
    async def primed(self, job: Job) -> AsyncIterator[Box]:
        """A job slot and a job folder holding the job's files; both gone on exit.

        On exit, even when cancelled, the janitor kills whatever of the slot's uid still runs and
        the folder is removed before the slot is handed out again.
        """
        self.metrics.waiting.inc()
        try:
            uid = await self.pool.acquire()
        finally:
            self.metrics.waiting.dec()
        self.metrics.in_flight.inc()
        box = Box(uid=uid, root=self.pool.jobs_dir / uuid.uuid4().hex, capped=self.pool.privileged)
        try:
            writing = asyncio.ensure_future(
                asyncio.to_thread(_lay_out, box, job.files, self.settings)
            )
            try:
                await asyncio.shield(writing)
            except asyncio.CancelledError:
                # The thread writes on regardless: let it finish before the folder is removed.
                await asyncio.gather(writing, return_exceptions=True)
                raise
            self.metrics.executions.inc()
            yield box
        finally:
            # Shielded: a second cancellation must not leave the slot taken or the folder behind.
            await asyncio.shield(asyncio.ensure_future(self._release(box)))

    async def _release(self, box: Box) -> None:
        try:
            await asyncio.to_thread(self._clean_up, box)
        finally:
            self.metrics.in_flight.dec()
            self.pool.release(box.uid)

    async def run_stages(
        self,
        job: Job,
        box: Box,
        *,
        stdin: bytes,
        live: LiveIO | None = None,
        events: StageEvents | None = None,
    ) -> tuple[StageResult | None, StageResult]:
        """Compile if the runtime needs it, then run unless the compile failed (Piston's order).

        Returns (compile, last stage run); counts the job by the last stage's status.
        """
        host = job.host
        stage_args: dict[str, Any] = {
            "settings": self.settings,
            "uid": box.uid,
            "job_dir": box.job_dir,
            "scratch": box.scratch,
            "env": self._env(host.runtime.language),
            "stdin": stdin,
            "live": live,
        }
        compile_result: StageResult | None = None
        run_result: StageResult | None = None
        if host.compiled:
            if events is not None:
                await events.stage("compile")
            compile_result = await run_stage(
                command=host.compile_argv(job.code_files),
                limits=self._limits(job.request, "compile"),
                **stage_args,
            )
            if events is not None:
                await events.exit("compile", compile_result)
        if compile_result is None or compile_result.code == 0:
            if events is not None:
                await events.stage("run")
            run_result = await run_stage(
                command=host.run_argv(job.code_files[0], job.request.args),
                limits=self._limits(job.request, "run"),
                **stage_args,
            )
            if events is not None:
                await events.exit("run", run_result)
        last = run_result or compile_result
        assert last is not None
        self.metrics.jobs.labels(status=last.status or "ok").inc()
        return compile_result, last

    async def execute(self, request: ExecuteRequest) -> dict[str, Any]:
        """Run one job as Piston would and return Piston's answer."""
        job = self.job_for(request)
        stdin = request.stdin if request.stdin.endswith("\n") else request.stdin + "\n"
        async with self.primed(job) as box:
            compile_result, last = await self.run_stages(job, box, stdin=stdin.encode("utf-8"))
        answer: dict[str, Any] = {}
        if compile_result is not None:
            answer["compile"] = compile_result.as_json()
        # Piston answers a failed compile with `run` mirroring `compile`, for older clients.
        answer["run"] = last.as_json()
        answer["language"] = job.host.runtime.language
        answer["version"] = job.host.runtime.version
        return answer

    def _clean_up(self, box: Box) -> None:
        if self.pool.privileged:
            leftovers = sweep_uid(box.uid)
            if leftovers:
                self.metrics.leftovers.inc(leftovers)
        if box.capped:
            unmount(box.root)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(box.root)
