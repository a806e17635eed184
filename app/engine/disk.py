"""A job's one writable filesystem: a tmpfs of PISTON_JOB_DISK_LIMIT bytes and PISTON_JOB_FILE_LIMIT
inodes, mounted on the host for the job's lifetime.

Why one host mount rather than bwrap's `--size` tmpfs mounts: a job writes in four places (its
folder, /tmp, /var/tmp, /dev/shm) and runs in two sandboxes (compile, then run) that must see the
same files. A `--size` tmpfs lives in one sandbox's mount namespace, so it could neither carry the
compiled program to the run stage nor hold one total across the four places (four mounts are four
separate caps). One tmpfs per job, made before the first stage and holding all four as folders
bound into each stage, gives both: one total of bytes and of files for the whole job, kept from
compile to run, gone (memory included) when the job's folder is unmounted. tmpfs answers a write
past either cap with ENOSPC, so the job goes on and its answer comes back as usual.

Mounting needs root (CAP_SYS_ADMIN), which a deployed engine has: it runs each job as its own uid.
All of this is blocking (mount(2), file writes): the engine calls it through asyncio.to_thread.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path
from typing import Final

__all__ = ["mount_job_disk", "mount_point", "mounts_under", "unmount"]

_MS_NOSUID: Final = 0x2
_MS_NODEV: Final = 0x4
_MNT_DETACH: Final = 0x2
_libc = ctypes.CDLL(None, use_errno=True)


def mount_job_disk(root: Path, *, size: int, inodes: int, owner: int) -> None:
    """Make `root` a fresh tmpfs of `size` bytes and `inodes` files, owned by uid/gid `owner`."""
    root.mkdir(mode=0o700)
    options = f"size={size},nr_inodes={inodes},mode=0700,uid={owner},gid={owner}"
    if _libc.mount(
        b"pgw-job", os.fsencode(root), b"tmpfs", _MS_NOSUID | _MS_NODEV, options.encode()
    ):
        errno = ctypes.get_errno()
        root.rmdir()
        raise OSError(errno, f"cannot mount a tmpfs for a job at {root}: {os.strerror(errno)}")


def unmount(root: Path) -> None:
    """Detach the tmpfs at `root` (lazily: a process still in it cannot keep the mount busy)."""
    if _libc.umount2(os.fsencode(root), _MNT_DETACH):
        errno = ctypes.get_errno()
        if errno != 22:  # EINVAL: not a mount point (never mounted, or already gone)
            raise OSError(errno, f"cannot unmount the job tmpfs at {root}: {os.strerror(errno)}")


def mounts_under(directory: Path) -> list[Path]:
    """Mount points below `directory` (a crashed engine's job folders), deepest first."""
    prefix = os.fsencode(directory).rstrip(b"/") + b"/"
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        points = [mount_point(line) for line in mountinfo]
    found = [Path(os.fsdecode(point)) for point in points if point.startswith(prefix)]
    return sorted(found, key=lambda path: len(path.parts), reverse=True)


def mount_point(line: bytes) -> bytes:
    """The mount point of one /proc/self/mountinfo line, its octal escapes (space, tab, newline,
    backslash) undone."""
    fields = line.split(b" ")
    if len(fields) < 5:
        return b""
    return re.sub(rb"\\([0-7]{3})", lambda match: bytes([int(match[1], 8)]), fields[4])
