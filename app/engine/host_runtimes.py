"""The runtimes this host can run, named as Piston's packages name them.

A runtime is listed only when its tools exist under /usr (the only system tree a sandbox sees) and
answer a version query from inside a sandbox, so whatever is listed is known to work.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from app.protocol.resolve import Runtime

__all__ = [
    "SPECS",
    "HostRuntime",
    "RuntimeSpec",
    "entry_arg",
    "find_tool",
    "host_runtime",
    "locate",
    "normalize_version",
]

_SEARCH_PATH: Final = ("/usr/local/bin", "/usr/bin")
_VERSION: Final = re.compile(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def normalize_version(text: str) -> str | None:
    """The first version number in a tool's banner, as semver `x.y.z` (`v20.1` -> `20.1.0`)."""
    match = _VERSION.search(text)
    if match is None:
        return None
    major, minor, patch = match.groups()
    return f"{int(major)}.{int(minor or 0)}.{int(patch or 0)}"


def find_tool(name: str) -> str | None:
    """The real path of a tool, if it lives under /usr where a sandbox can see it."""
    for directory in _SEARCH_PATH:
        candidate = Path(directory, name)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            real = os.path.realpath(candidate)
            # A path outside /usr (a pyenv shim, /opt) would not exist inside the sandbox.
            if real.startswith("/usr/"):
                return real
    return None


def entry_arg(name: str) -> str:
    """A file name as a command argument: `./-x` rather than an option `-x`."""
    return f"./{name}" if name.startswith("-") else name


Argv = list[str]


@dataclass(frozen=True, slots=True)
class RuntimeSpec:
    """How to find, version, compile and run one language with the host's tools."""

    language: str
    aliases: tuple[str, ...]
    runtime: str | None
    tools: tuple[str, ...]
    version_argv: Callable[[dict[str, str]], Argv]
    run: Callable[[dict[str, str], str, Sequence[str]], Argv]
    compile: Callable[[dict[str, str], Sequence[str]], Argv] | None = None
    extra_aliases: Callable[[str], tuple[str, ...]] = field(default=lambda version: ())


@dataclass(frozen=True, slots=True)
class HostRuntime:
    """A runtime found on this host: its Piston entry and the commands of its stages."""

    spec: RuntimeSpec
    tools: dict[str, str]
    runtime: Runtime

    @property
    def compiled(self) -> bool:
        return self.spec.compile is not None

    def compile_argv(self, files: Sequence[str]) -> Argv:
        assert self.spec.compile is not None
        return self.spec.compile(self.tools, [entry_arg(name) for name in files])

    def run_argv(self, entry: str, args: Sequence[str]) -> Argv:
        return self.spec.run(self.tools, entry_arg(entry), args)


def _python_aliases(version: str) -> tuple[str, ...]:
    major, minor, _ = version.split(".")
    return (f"python{major}.{minor}",)


SPECS: Final[tuple[RuntimeSpec, ...]] = (
    RuntimeSpec(
        language="python",
        aliases=("py", "py3", "python3"),
        runtime=None,
        tools=("python3",),
        version_argv=lambda t: [t["python3"], "--version"],
        run=lambda t, entry, args: [t["python3"], entry, *args],
        extra_aliases=_python_aliases,
    ),
    RuntimeSpec(
        language="bash",
        aliases=("sh",),
        runtime=None,
        tools=("bash",),
        version_argv=lambda t: [t["bash"], "-c", "echo $BASH_VERSION"],
        run=lambda t, entry, args: [t["bash"], entry, *args],
    ),
    RuntimeSpec(
        language="javascript",
        aliases=("node-javascript", "node-js", "javascript", "js"),
        runtime="node",
        tools=("node",),
        version_argv=lambda t: [t["node"], "--version"],
        run=lambda t, entry, args: [t["node"], entry, *args],
    ),
    RuntimeSpec(
        language="c",
        aliases=("gcc",),
        runtime="gcc",
        tools=("gcc",),
        version_argv=lambda t: [t["gcc"], "-dumpfullversion"],
        # `-x c` compiles every file as C whatever its name, as Piston's script renames them all.
        compile=lambda t, files: [t["gcc"], "-std=c11", "-o", "a.out", "-x", "c", *files, "-lm"],
        run=lambda t, entry, args: ["./a.out", *args],
    ),
    RuntimeSpec(
        language="c++",
        aliases=("cpp", "g++"),
        runtime="gcc",
        tools=("g++",),
        version_argv=lambda t: [t["g++"], "-dumpfullversion"],
        compile=lambda t, files: [t["g++"], "-std=c++17", "-o", "a.out", "-x", "c++", *files],
        run=lambda t, entry, args: ["./a.out", *args],
    ),
    RuntimeSpec(
        # Piston's java package runs the entry file with the JDK's source launcher (no compile
        # stage); `--source` lets it take any file name and any public class name.
        language="java",
        aliases=(),
        runtime=None,
        tools=("java", "javac"),
        version_argv=lambda t: [t["javac"], "-version"],
        # C1 only and the serial collector: a hello world costs a third less CPU time, which
        # matters under a 3 s CPU limit that includes compiling the source.
        run=lambda t, entry, args: [
            t["java"],
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC",
            "--source",
            t["java_release"],
            entry,
            *args,
        ],
    ),
)


def locate(spec: RuntimeSpec) -> dict[str, str] | None:
    """The real paths of a spec's tools, or None if one is missing."""
    tools: dict[str, str] = {}
    for name in spec.tools:
        path = find_tool(name)
        if path is None:
            return None
        tools[name] = path
    return tools


def host_runtime(spec: RuntimeSpec, tools: dict[str, str], banner: str) -> HostRuntime | None:
    """The listed runtime for a spec whose version query printed `banner`."""
    version = normalize_version(banner)
    if version is None:
        return None
    if spec.language == "java":
        tools = {**tools, "java_release": version.split(".")[0]}
    aliases = (*spec.aliases, *spec.extra_aliases(version))
    return HostRuntime(
        spec=spec,
        tools=tools,
        runtime=Runtime(
            language=spec.language, version=version, aliases=aliases, runtime=spec.runtime
        ),
    )
