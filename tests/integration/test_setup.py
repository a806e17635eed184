"""scripts/setup-system.sh, the step `make run` and `make test` start with, on a stand-in machine.

The machine's own tools are never touched: the script runs with a PATH of stand-ins only (a
directory of small executables named like the tools it looks for), where `bwrap` and
`redis-server` are absent, `apt-get` records its arguments (and "installs" by adding the tool),
and `id` says who we are.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from pathlib import Path

from tests.support import ROOT

SCRIPT = ROOT / "scripts" / "setup-system.sh"
EVERY_TOOL = (
    "bwrap",
    "redis-server",
    "setpriv",
    "gcc",
    "g++",
    "wrk",
    "chromium",
    "make",
    "python3.11",
    "uv",
)
PROVIDES = {"bubblewrap": "bwrap", "redis-server": "redis-server", "wrk": "wrk"}


def _executable(path: Path, body: str) -> None:
    path.write_text(f"#!{shutil.which('bash')}\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def machine(tmp_path: Path, *, lacking: set[str], uid: int) -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt-get.log"
    for tool in EVERY_TOOL:
        if tool not in lacking:
            _executable(bin_dir / tool, "exit 0")
    _executable(bin_dir / "python3", "exit 0")
    _executable(bin_dir / "id", f'[ "$1" = "-u" ] && echo {uid}')
    # apt-get: record the call; `install` provides the tools of the packages it was given.
    provides = " ".join(f"[{pkg}]={tool}" for pkg, tool in PROVIDES.items())
    _executable(
        bin_dir / "apt-get",
        f'echo "$*" >> {log}\n'
        f"declare -A provides=({provides})\n"
        'if [ "$1" = install ]; then for p in "$@"; do t=${provides[$p]:-}; '
        f'[ -n "$t" ] && printf "#!/bin/sh\\nexit 0\\n" > {bin_dir}/$t && chmod +x {bin_dir}/$t; '
        "done; fi; exit 0",
    )
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    return env, log


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    assert bash
    return subprocess.run(
        [bash, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_as_root_it_installs_exactly_the_missing_packages(tmp_path: Path) -> None:
    env, log = machine(tmp_path, lacking={"bwrap", "redis-server"}, uid=0)
    result = run(env)
    assert result.returncode == 0, result.stderr
    assert calls(log) == [
        "update -qq",
        "install -y -qq --no-install-recommends bubblewrap redis-server",
    ]


def test_as_root_with_nothing_missing_it_does_nothing(tmp_path: Path) -> None:
    env, log = machine(tmp_path, lacking=set(), uid=0)
    result = run(env)
    assert result.returncode == 0, result.stderr
    assert calls(log) == []
    assert result.stdout == ""


def test_not_root_it_stops_with_the_exact_command(tmp_path: Path) -> None:
    env, log = machine(tmp_path, lacking={"bwrap", "redis-server", "wrk"}, uid=1000)
    result = run(env)
    assert result.returncode == 1
    assert calls(log) == []  # nothing attempted
    assert (
        "  sudo apt-get update && sudo apt-get install -y -qq --no-install-recommends"
        " bubblewrap redis-server wrk"
    ) in result.stderr.splitlines()


def test_a_package_that_does_not_provide_the_tool_is_an_error(tmp_path: Path) -> None:
    env, log = machine(tmp_path, lacking={"setpriv"}, uid=0)  # the stand-in never adds setpriv
    result = run(env)
    assert result.returncode == 1
    assert calls(log)[-1] == "install -y -qq --no-install-recommends util-linux"
    assert "still missing after apt-get install: setpriv" in result.stderr


def test_without_uv_or_pip_it_asks_for_pip(tmp_path: Path) -> None:
    env, log = machine(tmp_path, lacking={"uv"}, uid=0)
    _executable(Path(env["PATH"]) / "python3", "exit 1")  # no `python3 -m uv`, no `-m pip`
    run(env)
    assert calls(log)[1] == "install -y -qq --no-install-recommends python3-pip"


def test_make_run_and_make_test_start_with_it() -> None:
    makefile = (ROOT / "Makefile").read_text()
    rules = dict(re.findall(r"^([a-z-]+):(.*)$", makefile, flags=re.MULTILINE))
    assert "system-deps" in rules["setup"].split()
    assert "setup" in rules["run"].split()
    assert "setup" in rules["test"].split()
    assert "scripts/setup-system.sh" in makefile


def test_ci_does_no_more_than_make_test() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert lines[:2] == ["set -euo pipefail", 'cd "$(dirname "$0")/.."']
    assert lines[-1] == "make test"
    assert "apt-get" not in "\n".join(lines)
