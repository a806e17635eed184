"""Running one stage of a job inside bubblewrap, with Piston's limits and Piston's verdicts.

Shape of one stage:

    engine ──(real uid = job uid)──▶ bwrap (user/pid/net/ipc/uts/mount namespaces; nested user
                                        │  namespaces disabled; empty environment, options read
                                        │  from a memfd, so PID 1 shows nothing of the engine)
                                        └▶ supervisor (system python, -I -S)
                                              └▶ the program, with rlimits set between fork and exec

The supervisor exists because bwrap reports a program killed by signal N as exit code 128+N, which
cannot be told apart from `exit(128+N)`; it waits for the program with wait4(), so it knows the real
exit status, the CPU time and the peak memory, and writes them to a pipe only the engine reads.
It also kills the whole sandbox on the engine's word ("k" or EOF on a control pipe), which is how
wall-clock and output limits end a job while still reporting its resource use; any other byte on
that pipe is a signal number it sends to the program (an interactive job's `signal` message).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from app.engine.config import UID_BLOCK_SIZE, EngineSettings
from app.engine.disk import mounts_under, unmount

__all__ = [
    "SUPERVISOR",
    "LiveIO",
    "PendingStdin",
    "SandboxUnavailable",
    "StageLimits",
    "StageResult",
    "SupervisorReport",
    "UidPool",
    "bwrap_parts",
    "classify",
    "parse_report",
    "run_stage",
    "sweep_uid",
]

# Seconds between asking the supervisor to stop a job and killing bwrap outright.
_KILL_GRACE_SECONDS: Final = 1.0
_READ_CHUNK: Final = 65_536

SUPERVISOR: Final = r"""
import os, resource as R, select, signal, sys
status_fd, control_fd, cpu, mem, nproc, nofile, fsize = map(int, sys.argv[1:8])
cmd = sys.argv[8:]
pid = os.fork()
if pid == 0:
    try:
        os.close(status_fd)
        os.close(control_fd)
        # Python ignores these two; a program must start with the default dispositions.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        R.setrlimit(R.RLIMIT_CPU, (cpu, cpu + 1))
        if mem >= 0:
            R.setrlimit(R.RLIMIT_AS, (mem, mem))
        R.setrlimit(R.RLIMIT_NPROC, (nproc, nproc))
        R.setrlimit(R.RLIMIT_NOFILE, (nofile, nofile))
        R.setrlimit(R.RLIMIT_FSIZE, (fsize, fsize))
        R.setrlimit(R.RLIMIT_CORE, (0, 0))
        os.execv(cmd[0], cmd)
    except BaseException as exc:
        os.write(2, ("cannot start %s: %s\n" % (cmd[0], exc)).encode())
    os._exit(127)
pidfd = os.pidfd_open(pid)
while pidfd not in select.select([pidfd, control_fd], [], [])[0]:
    # The engine's word: "k" or EOF stops the sandbox; any other byte is a signal for the program.
    word = os.read(control_fd, 64)
    if not word or b"k" in word:
        os.kill(-1, signal.SIGKILL)
        break
    for number in word:
        try:
            os.kill(pid, number)
        except OSError:
            pass
_, status, usage = os.wait4(pid, 0)
try:
    os.kill(-1, signal.SIGKILL)  # whatever the program left running ends with it
except OSError:
    pass
cpu_ms = int((usage.ru_utime + usage.ru_stime) * 1000)
code = os.waitstatus_to_exitcode(status)
os.write(status_fd, b"%d %d %d\n" % (code, cpu_ms, usage.ru_maxrss * 1024))
"""

# /etc entries a runtime may need: the dynamic linker's cache, the alternatives symlinks behind
# /usr/bin/java, the JDK's configuration, the time zone. Nothing else of /etc is visible.
_ETC_ENTRIES: Final = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/localtime",
)
_USR_MERGED_LINKS: Final = (("usr/bin", "/bin"), ("usr/sbin", "/sbin"), ("usr/lib", "/lib"))
_USR_OPTIONAL_LINKS: Final = (("usr/lib64", "/lib64"), ("usr/lib32", "/lib32"))

BOX_DIR: Final = "/box/submission"
# A job's writable places other than its folder: scratch folder name -> where the job sees it.
SCRATCH_DIRS: Final = {"tmp": "/tmp", "var-tmp": "/var/tmp", "shm": "/dev/shm"}
# bwrap's own environment: nothing of the engine's. bwrap is PID 1 of the job's pid namespace, so
# whatever it was started with, a job could read in /proc/1/environ.
_BWRAP_ENV: Final[dict[str, str]] = {}


class SandboxUnavailable(RuntimeError):
    """bwrap is missing or cannot build a sandbox here: the engine must not start."""


@dataclass(frozen=True, slots=True)
class StageLimits:
    timeout_ms: int
    cpu_time_ms: int
    memory_limit: int  # bytes, -1 = unlimited
    max_processes: int
    max_open_files: int
    max_file_size: int
    output_max_size: int

    @property
    def cpu_seconds(self) -> int:
        # RLIMIT_CPU counts whole seconds; the verdict compares the measured milliseconds.
        return max(1, math.ceil(self.cpu_time_ms / 1000))


class PendingStdin:
    """An interactive job's stdin not yet taken by the program, held to `limit` bytes in total.

    A chunk counts from `put` until the program's pipe has taken it (`taken`), so a program that
    never reads its stdin holds at most `limit` bytes of the engine's memory, whatever is sent.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = 0
        self._chunks: deque[bytes] = deque()
        self._ready = asyncio.Event()

    def put(self, chunk: bytes) -> bool:
        """Queue `chunk`; False (and nothing queued) when it would pass the limit."""
        if self.pending + len(chunk) > self.limit:
            return False
        self.pending += len(chunk)
        self._chunks.append(chunk)
        self._ready.set()
        return True

    async def get(self) -> bytes:
        while not self._chunks:
            self._ready.clear()
            await self._ready.wait()
        return self._chunks.popleft()

    def taken(self, size: int) -> None:
        self.pending -= size


@dataclass(slots=True)
class LiveIO:
    """An interactive stage's channel: stdin and signals in as they come, output out as it comes.

    `output(stream, chunk)` gets each chunk of "stdout" or "stderr" (within the output caps); the
    stage's result then carries empty stdout, stderr and output, as Piston's does.
    """

    output: Callable[[str, bytes], Awaitable[None]]
    stdin: PendingStdin
    signals: asyncio.Queue[int] = field(default_factory=asyncio.Queue)


@dataclass(frozen=True, slots=True)
class SupervisorReport:
    exit_code: int  # negative: killed by that signal
    cpu_time_ms: int
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class StageResult:
    stdout: str
    stderr: str
    output: str
    code: int | None
    signal: str | None
    message: str | None
    status: str | None
    cpu_time: int | None
    wall_time: int
    memory: int | None

    def as_json(self) -> dict[str, Any]:
        return {
            "stdout": self.stdout,
            "stderr": self.stderr,
            "output": self.output,
            "code": self.code,
            "signal": self.signal,
            "message": self.message,
            "status": self.status,
            "cpu_time": self.cpu_time,
            "wall_time": self.wall_time,
            "memory": self.memory,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    code: int | None
    signal: str | None
    status: str | None
    message: str | None


def _signal_name(number: int) -> str | None:
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


def parse_report(raw: bytes) -> SupervisorReport | None:
    """The supervisor's `exit cpu_ms memory` line, or None when it never wrote one."""
    parts = raw.split()
    if len(parts) != 3:
        return None
    try:
        exit_code, cpu_ms, memory = (int(part) for part in parts)
    except ValueError:
        return None
    return SupervisorReport(exit_code=exit_code, cpu_time_ms=cpu_ms, memory_bytes=memory)


def classify(*, killed: str | None, report: SupervisorReport | None, cpu_time_ms: int) -> Verdict:
    """Piston's (isolate's) status, message, code and signal for how a stage ended."""
    if killed == "OL":
        return Verdict(None, "SIGKILL", "OL", "stdout length exceeded")
    if killed == "EL":
        return Verdict(None, "SIGKILL", "EL", "stderr length exceeded")
    if killed == "TO":
        return Verdict(None, "SIGKILL", "TO", "Time limit exceeded (wall clock)")
    if report is None:
        return Verdict(None, None, "XX", "Internal error: the sandbox did not report")
    code = report.exit_code
    # RLIMIT_CPU ends a program with SIGXCPU (then SIGKILL); one that stopped on its own after
    # using more than its CPU time has exceeded it just the same, as isolate judges it.
    if report.cpu_time_ms > cpu_time_ms or code == -signal.SIGXCPU:
        return Verdict(None, "SIGKILL", "TO", "Time limit exceeded")
    if code < 0:
        return Verdict(None, _signal_name(-code), "SG", f"Caught fatal signal {-code}")
    if code > 0:
        return Verdict(code, None, "RE", f"Exited with error status {code}")
    return Verdict(0, None, None, None)


def _system_binds() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for target, link in _USR_MERGED_LINKS:
        args += ["--symlink", target, link]
    for target, link in _USR_OPTIONAL_LINKS:
        if Path("/", target).exists():
            args += ["--symlink", target, link]
    etc = [entry for entry in _ETC_ENTRIES if Path(entry).exists()]
    etc += sorted(str(path) for path in Path("/etc").glob("java-*"))
    for entry in etc:
        args += ["--ro-bind", entry, entry]
    return args


def bwrap_parts(
    *,
    settings: EngineSettings,
    job_dir: Path,
    env: Mapping[str, str],
    command: Sequence[str],
    limits: StageLimits,
    status_fd: int,
    control_fd: int,
    scratch: Path | None = None,
) -> tuple[str, list[str], list[str]]:
    """One sandboxed stage: bwrap's path, its options, and the command it runs (the supervisor).

    `scratch` holds the job's /tmp, /var/tmp and /dev/shm (folders named as SCRATCH_DIRS's keys);
    without it each stage gets tmpfs mounts of its own (the start-up probes).
    Raises ValueError for an argument that holds a NUL.
    """
    options = [
        # user, ipc, pid, net, uts and cgroup namespaces: no network, no view of other processes.
        "--unshare-all",
        # A job may not make user namespaces of its own (`unshare -U` fails): they would widen the
        # kernel surface it can reach. --disable-userns needs the user namespace asked for by name.
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "piston",
        *_system_binds(),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
    ]
    if scratch is None:
        for private in SCRATCH_DIRS.values():
            # A tmpfs per stage: whatever a job leaves there is gone with its mount namespace.
            options += ["--size", str(settings.tmpfs_size), "--tmpfs", private]
    else:
        # The job's own folders on its one size-capped filesystem (see app.engine.disk): all that
        # the job writes anywhere counts against one PISTON_JOB_DISK_LIMIT, and both stages of
        # the job see the same files.
        for name, private in SCRATCH_DIRS.items():
            options += ["--bind", str(scratch / name), private]
    options += ["--bind", str(job_dir), BOX_DIR]
    # bwrap's own root and its /dev are tmpfs mounts in RAM, outside the job's disk cap and its
    # memory limit: read-only once every mount point is made, so the job's capped folders (and
    # /proc, and the device nodes, which a read-only mount still lets a job write to) are all
    # it can write. Last, because bwrap creates mount points after this no more.
    options += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", BOX_DIR, "--clearenv"]
    for key, value in env.items():
        options += ["--setenv", key, value]
    sandboxed = [
        str(settings.supervisor_python),
        "-I",
        "-S",
        "-c",
        SUPERVISOR,
        str(status_fd),
        str(control_fd),
        str(limits.cpu_seconds),
        str(limits.memory_limit),
        str(limits.max_processes),
        str(limits.max_open_files),
        str(limits.max_file_size),
        *command,
    ]
    # bwrap reads these from a descriptor, NUL-separated (see run_stage): a NUL inside one would
    # split it into two arguments, and so into options of bwrap's own.
    for arg in (*options, *sandboxed):
        if "\x00" in arg:
            raise ValueError(f"a sandbox argument holds a NUL character: {arg[:40]!r}")
    return str(settings.bwrap_path), options, sandboxed


def _processes_of(uid: int) -> list[int]:
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{entry}").st_uid == uid and not _is_zombie(entry):
                found.append(int(entry))
    return found


def sweep_uid(uid: int, *, grace: float = 0.5) -> int:
    """Kill every process whose uid is `uid` (Piston's janitor); returns how many it had to kill.

    bwrap's outer process exits as soon as the job's first process does, while the kernel is still
    tearing the pid namespace down, so processes of the uid may linger for a few milliseconds;
    they get `grace` seconds to go on their own. What is left after that escaped the namespace
    and is killed here, before the uid is handed out again. Blocking (it sleeps): the engine
    calls it through asyncio.to_thread, never on the event loop.
    """
    deadline = time.monotonic() + grace
    while (victims := _processes_of(uid)) and time.monotonic() < deadline:
        time.sleep(0.005)
    killed = 0
    for _ in range(10):
        if not victims:
            break
        killed += len(victims)
        # Stop first so nothing can fork while its siblings are being killed.
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in victims:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
        time.sleep(0.01)
        victims = _processes_of(uid)
    return killed


def _is_zombie(pid: str) -> bool:
    # A zombie holds nothing but its pid and is its parent's to reap; signals do not reach it.
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[-1].split()[0] == b"Z"


class UidPool:
    """One unprivileged uid per concurrent job slot; taking a uid is taking a slot."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.privileged = os.geteuid() == 0
        self._lock_fd: int | None = None
        self.block = 0
        self.jobs_dir = settings.data_directory
        self._free: asyncio.Queue[int] = asyncio.Queue()

    def claim(self) -> None:
        """Claim a uid block nobody else on this machine holds (an flock that dies with us)."""
        base = self.settings.data_directory
        base.mkdir(mode=0o711, parents=True, exist_ok=True)
        locks = base / "locks"
        locks.mkdir(mode=0o700, exist_ok=True)
        for block in range(self.settings.uid_blocks):
            fd = os.open(locks / f"uids-{block}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._lock_fd, self.block = fd, block
            break
        else:
            raise SandboxUnavailable(
                f"all {self.settings.uid_blocks} uid blocks are held by other engines "
                "(raise PISTON_UID_BLOCKS)"
            )
        self.jobs_dir = base / f"block-{self.block}"
        # Whatever a crashed engine with this block left behind is ours to remove, its jobs'
        # tmpfs mounts first.
        for mount_point in mounts_under(self.jobs_dir):
            unmount(mount_point)
        shutil.rmtree(self.jobs_dir, ignore_errors=True)
        self.jobs_dir.mkdir(mode=0o711)
        if self.privileged:
            for slot in range(self.settings.max_concurrent_jobs):
                sweep_uid(self.uid_for(slot), grace=0)

    def open(self) -> None:
        """Hand out the slots (in the loop that serves: the queue belongs to it)."""
        self._free = asyncio.Queue()
        for slot in range(self.settings.max_concurrent_jobs):
            self._free.put_nowait(self.uid_for(slot))

    def uid_for(self, slot: int) -> int:
        if not self.privileged:
            # Without root there is one uid to run as; the namespaces still bound each job.
            return os.getuid()
        return self.settings.runner_uid_min + self.block * UID_BLOCK_SIZE + slot

    async def acquire(self) -> int:
        return await self._free.get()

    def release(self, uid: int) -> None:
        self._free.put_nowait(uid)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class _Descriptors:
    """The descriptors a stage opens, each closed exactly once, and all of them on any way out.

    Closing a number twice could close a descriptor another job has opened since under the same
    number, so each is closed through here and forgotten.
    """

    def __init__(self) -> None:
        self._open: set[int] = set()

    def pipe(self) -> tuple[int, int]:
        read, write = os.pipe()
        self._open.update((read, write))
        return read, write

    def data(self, payload: bytes) -> int:
        """A descriptor a child reads `payload` from (a memfd: no size limit, nothing on disk)."""
        fd = os.memfd_create("bwrap-args", os.MFD_CLOEXEC)
        self._open.add(fd)
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def close(self, *fds: int) -> None:
        for fd in fds:
            if fd in self._open:
                self._open.discard(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)

    def close_all(self) -> None:
        self.close(*self._open.copy())


def _cannot_start(exc: Exception) -> StageResult:
    return StageResult(
        stdout="",
        stderr="",
        output="",
        code=None,
        signal=None,
        message=f"Internal error: cannot start the sandbox: {exc}",
        status="XX",
        cpu_time=None,
        wall_time=0,
        memory=None,
    )


async def run_stage(
    *,
    settings: EngineSettings,
    uid: int,
    job_dir: Path,
    env: Mapping[str, str],
    command: Sequence[str],
    stdin: bytes,
    limits: StageLimits,
    live: LiveIO | None = None,
    scratch: Path | None = None,
) -> StageResult:
    """Run `command` in a fresh sandbox on `job_dir` and judge it as Piston would.

    Without `live`, `stdin` is the program's whole input. With it, `stdin` is written first, then
    whatever arrives on `live.stdin` (stdin stays open), signals on `live.signals` reach the
    program, and output goes to `live.output` as it arrives instead of into the result.
    Every descriptor the stage opens is closed when it returns or raises, whatever happened.
    """
    descriptors = _Descriptors()
    try:
        return await _run_stage(
            descriptors,
            settings=settings,
            uid=uid,
            job_dir=job_dir,
            env=env,
            command=command,
            stdin=stdin,
            limits=limits,
            live=live,
            scratch=scratch,
        )
    finally:
        descriptors.close_all()


async def _run_stage(
    descriptors: _Descriptors,
    *,
    settings: EngineSettings,
    uid: int,
    job_dir: Path,
    env: Mapping[str, str],
    command: Sequence[str],
    stdin: bytes,
    limits: StageLimits,
    live: LiveIO | None,
    scratch: Path | None,
) -> StageResult:
    """spawn -> supervise -> judge."""
    sandbox = await _spawn(
        descriptors,
        settings=settings,
        uid=uid,
        job_dir=job_dir,
        env=env,
        command=command,
        limits=limits,
        scratch=scratch,
    )
    if isinstance(sandbox, StageResult):  # it could not start: the sandbox's failure, XX
        return sandbox
    supervisor = _Supervisor(sandbox, limits=limits, live=live, stdin=stdin)
    await supervisor.run(descriptors)
    return _judge(sandbox, supervisor, limits)


@dataclass(frozen=True, slots=True)
class _Sandbox:
    """A started stage: bwrap's process, and the engine's ends of its two pipes."""

    proc: asyncio.subprocess.Process
    started: float  # monotonic
    status_r: int  # the supervisor's report (exit status, cpu time, memory)
    control_w: int  # to the supervisor: a signal number, `k` to kill, EOF to end


async def _spawn(
    descriptors: _Descriptors,
    *,
    settings: EngineSettings,
    uid: int,
    job_dir: Path,
    env: Mapping[str, str],
    command: Sequence[str],
    limits: StageLimits,
    scratch: Path | None,
) -> _Sandbox | StageResult:
    """Start bwrap on the job; a StageResult (XX) when it cannot start."""
    try:
        status_r, status_w = descriptors.pipe()
        control_r, control_w = descriptors.pipe()
        bwrap, options, sandboxed = bwrap_parts(
            settings=settings,
            job_dir=job_dir,
            env=env,
            command=command,
            limits=limits,
            status_fd=status_w,
            control_fd=control_r,
            scratch=scratch,
        )
        # bwrap reads its options from a descriptor and starts with an empty environment: it is
        # PID 1 of the job's pid namespace, and its /proc/1/cmdline and /proc/1/environ would
        # otherwise show the job folder's host path and every variable of the engine. What stays
        # on its command line (after `--`, which bwrap takes there only) is the sandbox's own.
        args_fd = descriptors.data(b"".join(os.fsencode(arg) + b"\0" for arg in options))
    except (OSError, ValueError) as exc:
        return _cannot_start(exc)
    identity: dict[str, Any] = {}
    if os.geteuid() == 0:
        # Drop the real uid before bwrap, so RLIMIT_NPROC counts this job's processes only.
        identity = {"user": uid, "group": uid, "extra_groups": []}
    started = time.monotonic()
    spawning = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            bwrap,
            "--args",
            str(args_fd),
            "--",
            *sandboxed,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=(status_w, control_r, args_fd),
            env=_BWRAP_ENV,
            start_new_session=True,
            **identity,
        )
    )
    # A stage cancelled while bwrap starts (an interactive client went away) must still end its
    # sandbox the proper way: asyncio's own clean-up would kill bwrap alone, orphaning the rest.
    cancelled = False
    try:
        while True:
            try:
                proc = await asyncio.shield(spawning)
                break
            except asyncio.CancelledError:
                if spawning.cancelled():
                    raise
                cancelled = True
    except (OSError, ValueError) as exc:
        return _cannot_start(exc)
    finally:
        # The child's ends are the child's: the engine keeps none of them, however spawning went.
        descriptors.close(status_w, control_r, args_fd)
    if cancelled:
        descriptors.close(control_w)
        await _end_sandbox(proc)
        raise asyncio.CancelledError
    return _Sandbox(proc=proc, started=started, status_r=status_r, control_w=control_w)


class _Supervisor:
    """One running stage: its output under the limit, its stdin and signals, its deadline."""

    def __init__(
        self, sandbox: _Sandbox, *, limits: StageLimits, live: LiveIO | None, stdin: bytes
    ) -> None:
        self._sandbox, self._limits, self._live, self._stdin = sandbox, limits, live, stdin
        self.killed: str | None = None  # the status the stage was stopped with (TO, OL, EL)
        self._hard_kill: asyncio.TimerHandle | None = None
        self.stdout, self.stderr = bytearray(), bytearray()
        self.output: list[bytes] = []
        self.ended_at = sandbox.started

    def _stop(self, reason: str) -> None:
        if self.killed is not None:
            return
        self.killed = reason
        with contextlib.suppress(OSError):
            os.write(self._sandbox.control_w, b"k")
        self._hard_kill = asyncio.get_running_loop().call_later(
            _KILL_GRACE_SECONDS, _kill_quietly, self._sandbox.proc
        )

    async def _pump(
        self, stream: asyncio.StreamReader, buffer: bytearray, name: str, reason: str
    ) -> None:
        size = 0
        while chunk := await stream.read(_READ_CHUNK):
            if self.killed is not None:
                continue  # draining a stopped job: nothing more is kept
            if size + len(chunk) > self._limits.output_max_size:
                self._stop(reason)
                continue
            size += len(chunk)
            if self._live is not None:
                await self._live.output(name, chunk)
            else:
                buffer += chunk
                self.output.append(chunk)

    async def _feed(self) -> None:
        proc, live = self._sandbox.proc, self._live
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if self._stdin:
                proc.stdin.write(self._stdin)
                await proc.stdin.drain()
            while live is not None:
                chunk = await live.stdin.get()
                try:
                    proc.stdin.write(chunk)
                    await proc.stdin.drain()
                finally:
                    live.stdin.taken(len(chunk))
        proc.stdin.close()

    async def _relay_signals(self) -> None:
        while self._live is not None:
            number = await self._live.signals.get()
            if self.killed is None:
                with contextlib.suppress(OSError):
                    os.write(self._sandbox.control_w, bytes([number]))

    async def _wait_exit(self) -> None:
        await self._sandbox.proc.wait()
        self.ended_at = time.monotonic()

    async def run(self, descriptors: _Descriptors) -> None:
        """Until the program ends (or is stopped at its deadline); the sandbox is gone after."""
        proc = self._sandbox.proc
        assert proc.stdout is not None
        assert proc.stderr is not None
        tasks = [
            asyncio.ensure_future(self._pump(proc.stdout, self.stdout, "stdout", "OL")),
            asyncio.ensure_future(self._pump(proc.stderr, self.stderr, "stderr", "EL")),
            asyncio.ensure_future(self._wait_exit()),
        ]
        helpers = [
            asyncio.ensure_future(self._feed()),
            asyncio.ensure_future(self._relay_signals()),
        ]
        try:
            _, pending = await asyncio.wait(tasks, timeout=self._limits.timeout_ms / 1000)
            if pending:
                self._stop("TO")
            await asyncio.gather(*tasks)
            if self._live is not None:
                # An interactive stdin and signal relay stay open until the program ends.
                for helper in helpers:
                    helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
        finally:
            # Also when cancelled (an interactive client went away): the sandbox dies with it.
            for task in (*tasks, *helpers):
                task.cancel()
            if self._hard_kill is not None:
                self._hard_kill.cancel()
            descriptors.close(self._sandbox.control_w)
            await _end_sandbox(proc)


def _judge(sandbox: _Sandbox, supervisor: _Supervisor, limits: StageLimits) -> StageResult:
    """The stage's result as Piston reports it, from the supervisor's report and what was seen."""
    os.set_blocking(sandbox.status_r, False)
    try:
        raw = os.read(sandbox.status_r, 256)
    except BlockingIOError:
        raw = b""
    report = parse_report(raw)
    verdict = classify(killed=supervisor.killed, report=report, cpu_time_ms=limits.cpu_time_ms)
    return StageResult(
        stdout=supervisor.stdout.decode("utf-8", "replace"),
        stderr=supervisor.stderr.decode("utf-8", "replace"),
        output=b"".join(supervisor.output).decode("utf-8", "replace"),
        code=verdict.code,
        signal=verdict.signal,
        message=verdict.message,
        status=verdict.status,
        cpu_time=report.cpu_time_ms if report else None,
        wall_time=round((supervisor.ended_at - sandbox.started) * 1000),
        memory=report.memory_bytes if report else None,
    )


async def _end_sandbox(proc: asyncio.subprocess.Process) -> None:
    """End a stage whose control pipe is closed, and wait for it.

    EOF on the control pipe makes the supervisor kill the sandbox, after which bwrap exits. Killing
    bwrap first would orphan the namespace's processes (they hold the output pipes, and with them
    proc.wait(), open) or leave a half-built sandbox waiting for its parent; bwrap is killed only
    if the sandbox is not gone within the grace.
    """
    if proc.returncode is not None:
        return
    hard_kill = asyncio.get_running_loop().call_later(_KILL_GRACE_SECONDS, _kill_quietly, proc)
    try:
        await proc.wait()
    finally:
        hard_kill.cancel()
        if proc.returncode is None:
            _kill_quietly(proc)


def _kill_quietly(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
