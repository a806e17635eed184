"""The engine's settings: Piston's own environment variables (`PISTON_*`), same names, same meaning.

Each stage limit is both the default a request gets when it leaves the field out and the maximum it
may ask for, as in Piston's `config.js`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.piston.schemas import LIMIT_FIELDS

__all__ = ["UID_BLOCK_SIZE", "EngineSettings"]

Positive = Annotated[int, Field(gt=0)]
MemoryLimit = Annotated[int, Field(ge=-1)]

# Each engine process claims a block of this many uids, so two engines on one machine (a test
# session next to `make run`) never share a job uid and never sweep each other's processes.
UID_BLOCK_SIZE = 256


def _default_concurrency() -> int:
    return min(UID_BLOCK_SIZE, 2 * (os.cpu_count() or 1))


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PISTON_", extra="ignore", frozen=True)

    # Per-stage limits (ms, bytes; -1 = unlimited memory).
    compile_timeout: Positive = 10_000
    run_timeout: Positive = 3_000
    compile_cpu_time: Positive = 10_000
    run_cpu_time: Positive = 3_000
    compile_memory_limit: MemoryLimit = -1
    run_memory_limit: MemoryLimit = -1

    # Per-job limits.
    output_max_size: Positive = 65_536  # bytes per stream (stdout, stderr)
    max_process_count: Positive = 64
    max_open_files: Positive = 2_048
    max_file_size: Positive = 10_000_000
    tmpfs_size: Positive = 64 * 1024 * 1024  # each of /tmp, /var/tmp, /dev/shm of a probe stage
    # All a job writes, across its folder, /tmp, /var/tmp and /dev/shm together, for both stages:
    # bytes, and files and folders (inodes). Past either, writes fail with ENOSPC.
    job_disk_limit: Positive = 256 * 1024 * 1024
    job_file_limit: Positive = 16_384

    # The largest execute body and WebSocket message the engine reads, and the stdin an interactive
    # job may have waiting for its program (the gateway's GATEWAY_WS_MAX_PENDING_STDIN_BYTES).
    max_body_bytes: Positive = 1024 * 1024
    ws_max_pending_stdin_bytes: Positive = 1024 * 1024

    max_concurrent_jobs: Annotated[int, Field(gt=0, le=UID_BLOCK_SIZE)] = Field(
        default_factory=_default_concurrency
    )
    runner_uid_min: Annotated[int, Field(ge=1000)] = 61_000
    uid_blocks: Positive = 16
    data_directory: Path = Field(
        default_factory=lambda: Path(tempfile.gettempdir()) / "piston-gateway-engine"
    )
    bwrap_path: Path = Path("/usr/bin/bwrap")
    # The in-sandbox supervisor needs an interpreter the job uid can read: the system one, never a
    # pyenv or venv python under /root.
    supervisor_python: Path = Path("/usr/bin/python3")

    @property
    def caps(self) -> dict[str, int]:
        """The maximum of each request limit, by Piston field name."""
        return {name: int(getattr(self, name)) for name in LIMIT_FIELDS}
