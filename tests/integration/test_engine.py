"""The embedded engine as a real process running real code: Piston's API, limits and exploits."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Service, cli, free_port

JOBS_ROOT = Path("/tmp/piston-gateway-engine")


# -- helpers ----------------------------------------------------------------------------------


def post(engine: Service, body: Any, *, path: str = "/api/v2/execute") -> httpx.Response:
    return httpx.post(engine.url + path, json=body, timeout=60)


def run(engine: Service, language: str, code: str, **extra: Any) -> dict[str, Any]:
    response = post(
        engine, {"language": language, "version": "*", "files": [{"content": code}], **extra}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def metric(engine: Service, name: str) -> float:
    text = httpx.get(engine.url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def job_uids(engine: Service) -> set[int]:
    first = int(metric(engine, "pgw_engine_job_uid_first"))
    return set(range(first, first + int(metric(engine, "pgw_engine_job_slots"))))


def live_processes(uids: set[int]) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid not in uids:
                continue
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        if stat.rsplit(b")", 1)[-1].split()[0] != b"Z":
            found.append(stat.decode(errors="replace")[:80])
    return found


def assert_clean(engine: Service) -> None:
    """Nothing of a finished job survives: no process of a job uid, no job folder."""
    uids = job_uids(engine)
    first = min(uids)
    block_dir = JOBS_ROOT / f"block-{(first - 61_000) // 256}"
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        procs = live_processes(uids)
        folders = list(block_dir.iterdir()) if block_dir.exists() else []
        if not procs and not folders:
            break
        time.sleep(0.05)
    assert not procs, procs
    assert not folders, folders
    assert metric(engine, "pgw_engine_leftover_processes_total") == 0
    # ... and the engine answers the next request normally.
    assert run(engine, "python", "print('next')")["run"]["stdout"] == "next\n"


@pytest.fixture(scope="module")
def languages(engine: Service) -> set[str]:
    runtimes = httpx.get(engine.url + "/api/v2/runtimes", timeout=10).json()
    return {rt["language"] for rt in runtimes}


@pytest.fixture
def clean(engine: Service) -> Iterator[None]:
    yield
    assert_clean(engine)


# -- the listing endpoints -------------------------------------------------------------------


class TestRuntimes:
    def test_shape_and_aliases(self, engine: Service) -> None:
        runtimes = httpx.get(engine.url + "/api/v2/runtimes", timeout=10).json()
        by_language = {rt["language"]: rt for rt in runtimes}
        python = by_language["python"]
        assert re.fullmatch(r"\d+\.\d+\.\d+", python["version"])
        assert {"py", "py3", "python3"} <= set(python["aliases"])
        if "javascript" in by_language:
            assert {"node-javascript", "node-js", "js"} <= set(by_language["javascript"]["aliases"])
            assert by_language["javascript"]["runtime"] == "node"
        if "c++" in by_language:
            assert {"cpp", "g++"} <= set(by_language["c++"]["aliases"])
        assert "sh" in by_language["bash"]["aliases"]

    def test_trailing_slash_without_redirect(self, engine: Service) -> None:
        response = httpx.get(engine.url + "/api/v2/runtimes/", timeout=10)
        assert response.status_code == 200
        assert response.json() == httpx.get(engine.url + "/api/v2/runtimes", timeout=10).json()
        slash = post(
            engine,
            {"language": "py", "version": "*", "files": [{"content": "print(1)"}]},
            path="/api/v2/execute/",
        )
        assert slash.status_code == 200
        assert slash.json()["run"]["stdout"] == "1\n"


class TestPackages:
    def test_listing(self, engine: Service, languages: set[str]) -> None:
        packages = httpx.get(engine.url + "/api/v2/packages", timeout=10).json()
        assert {p["language"] for p in packages} == languages
        assert all(p["installed"] is True and p["language_version"] for p in packages)

    @pytest.mark.parametrize("method", ["POST", "DELETE"])
    def test_install_not_implemented(self, engine: Service, method: str) -> None:
        response = httpx.request(
            method,
            engine.url + "/api/v2/packages",
            json={"language": "python", "version": "3.11.0"},
            timeout=10,
        )
        assert response.status_code == 501
        assert "does not install packages" in response.json()["message"]

    def test_install_without_json_is_415(self, engine: Service) -> None:
        response = httpx.post(engine.url + "/api/v2/packages", content=b"x", timeout=10)
        assert response.status_code == 415
        assert response.json() == {"message": "requests must be of type application/json"}


# -- running each host runtime ---------------------------------------------------------------

PROGRAMS = {
    "python": ("import sys\nprint('hello', input(), sys.argv[1:])\nsys.exit(3)", "file0.code"),
    "bash": ('read line\necho "hello $line [$*]"\nexit 3', "file0.code"),
    "javascript": (
        "const l=require('fs').readFileSync(0,'utf8').trim();"
        "console.log('hello', l, process.argv.slice(2));process.exit(3)",
        "file0.code",
    ),
    "c": (
        '#include <stdio.h>\nint main(int c,char**v){char b[64];scanf("%63s",b);'
        'printf("hello %s %s %s\\n",b,v[1],v[2]);return 3;}',
        "main.c",
    ),
    "c++": (
        "#include <iostream>\n#include <string>\nint main(int c,char**v){std::string s;"
        'std::cin>>s;std::cout<<"hello "<<s<<" "<<v[1]<<" "<<v[2]<<std::endl;return 3;}',
        "main.cpp",
    ),
    "java": (
        "public class Main { public static void main(String[] a) throws Exception {"
        "String l = new java.io.BufferedReader("
        "new java.io.InputStreamReader(System.in)).readLine();"
        'System.out.println("hello " + l + " " + String.join(",", a)); System.exit(3); } }',
        "Main.java",
    ),
}


@pytest.mark.parametrize("language", sorted(PROGRAMS))
def test_hello_stdin_args_exit_code(engine: Service, languages: set[str], language: str) -> None:
    if language not in languages:
        pytest.skip(f"{language} is not installed on this host")
    code, name = PROGRAMS[language]
    body = post(
        engine,
        {
            "language": language,
            "version": "*",
            "files": [{"name": name, "content": code}],
            "stdin": "world",
            "args": ["a1", "a2"],
        },
    ).json()
    stage = body["run"]
    assert stage["stdout"].startswith("hello world"), body
    assert "a1" in stage["stdout"]
    assert "a2" in stage["stdout"]
    assert stage["code"] == 3
    assert stage["status"] == "RE"
    assert stage["message"] == "Exited with error status 3"
    assert stage["signal"] is None
    assert stage["output"] == stage["stdout"]
    assert isinstance(stage["wall_time"], int)
    assert isinstance(stage["cpu_time"], int)
    assert stage["memory"] > 0
    assert body["language"] == language
    assert ("compile" in body) == (language in ("c", "c++"))


@pytest.mark.parametrize("language", ["c", "c++"])
def test_compile_error(engine: Service, languages: set[str], language: str) -> None:
    if language not in languages:
        pytest.skip(f"{language} is not installed on this host")
    body = run(engine, language, "int main() { return undeclared; }")
    compile_stage = body["compile"]
    assert compile_stage["code"] != 0
    assert compile_stage["status"] == "RE"
    assert "undeclared" in compile_stage["stderr"]
    # Piston's backward compatibility: a failed compile is also reported as `run`.
    assert body["run"] == compile_stage


def test_output_interleaves_stdout_and_stderr(engine: Service) -> None:
    stage = run(engine, "bash", "echo one; echo two >&2; sleep 0.05; echo three")["run"]
    assert stage["stdout"] == "one\nthree\n"
    assert stage["stderr"] == "two\n"
    assert stage["output"] == "one\ntwo\nthree\n"


def test_stdin_gets_a_trailing_newline(engine: Service) -> None:
    assert (
        run(engine, "python", "import sys; print(repr(sys.stdin.read()))", stdin="x")["run"][
            "stdout"
        ]
        == "'x\\n'\n"
    )


def test_named_files_and_binary_encodings(engine: Service) -> None:
    body = post(
        engine,
        {
            "language": "python",
            "version": "*",
            "files": [
                {
                    "name": "main.py",
                    "content": "import lib; print(lib.X, open('pkg/data.bin','rb').read())",
                },
                {"name": "lib.py", "content": "X = 42"},
                {"name": "pkg/data.bin", "content": "AAEC", "encoding": "base64"},
                {"name": "h.bin", "content": "ff00", "encoding": "hex"},
            ],
        },
    ).json()
    assert body["run"]["stdout"] == "42 b'\\x00\\x01\\x02'\n", body


# -- limits and verdicts ---------------------------------------------------------------------


class TestLimits:
    def test_wall_clock_timeout(self, engine: Service, clean: None) -> None:
        stage = run(
            engine,
            "python",
            "import time; print('start', flush=True); time.sleep(30)",
            run_timeout=500,
        )["run"]
        assert stage["status"] == "TO"
        assert stage["message"] == "Time limit exceeded (wall clock)"
        assert stage["signal"] == "SIGKILL"
        assert stage["code"] is None
        assert stage["stdout"] == "start\n"
        assert 450 <= stage["wall_time"] < 2500

    def test_cpu_timeout(self, engine: Service, clean: None) -> None:
        stage = run(engine, "python", "while True: pass", run_cpu_time=300)["run"]
        assert stage["status"] == "TO"
        assert stage["message"] == "Time limit exceeded"
        assert stage["signal"] == "SIGKILL"
        assert stage["cpu_time"] >= 300

    def test_memory_limit(self, engine: Service, clean: None) -> None:
        code = "x = bytearray(300_000_000); print('allocated')"
        stage = run(engine, "python", code, run_memory_limit=100_000_000)["run"]
        assert stage["status"] == "RE"
        assert "MemoryError" in stage["stderr"]
        assert run(engine, "python", code)["run"]["stdout"] == "allocated\n"

    def test_stdout_over_the_limit(self, engine: Service, clean: None) -> None:
        stage = run(engine, "python", "while True: print('x' * 1000)")["run"]
        assert stage["status"] == "OL"
        assert stage["message"] == "stdout length exceeded"
        assert stage["signal"] == "SIGKILL"
        assert 0 < len(stage["stdout"]) <= 65_536

    def test_stderr_over_the_limit(self, engine: Service, clean: None) -> None:
        stage = run(engine, "python", "import sys\nwhile True: sys.stderr.write('e' * 1000)")["run"]
        assert stage["status"] == "EL"
        assert stage["message"] == "stderr length exceeded"
        assert stage["signal"] == "SIGKILL"
        assert len(stage["stderr"]) <= 65_536

    @pytest.mark.parametrize(("sig", "name"), [(9, "SIGKILL"), (11, "SIGSEGV")])
    def test_killed_by_a_signal(self, engine: Service, sig: int, name: str) -> None:
        stage = run(engine, "python", f"import os; os.kill(os.getpid(), {sig})")["run"]
        assert stage["status"] == "SG"
        assert stage["message"] == f"Caught fatal signal {sig}"
        assert stage["signal"] == name
        assert stage["code"] is None


# -- Piston's exploit programs ---------------------------------------------------------------

BOUNDED_FORK = """
import os, time
count = 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(5)
        os._exit(0)
    count += 1
print(count)
"""


class TestExploits:
    def test_process_limit_bounds_forks(self, engine: Service, clean: None) -> None:
        # Prove the limit with a bounded program before any real fork bomb.
        stage = run(engine, "python", BOUNDED_FORK)["run"]
        forked = int(stage["stdout"])
        assert 10 <= forked < 64, stage

    def test_fork_bomb(self, engine: Service, clean: None) -> None:
        stage = run(engine, "bash", ":(){ :|:& };:; sleep 1; echo survived", run_timeout=2000)[
            "run"
        ]
        assert stage["status"] in (None, "RE", "TO"), stage

    def test_endless_output(self, engine: Service, clean: None) -> None:
        assert run(engine, "bash", "yes spam")["run"]["status"] == "OL"

    def test_network_is_unreachable(self, engine: Service, clean: None) -> None:
        code = (
            "import socket\n"
            "try:\n"
            "    socket.create_connection(('1.1.1.1', 80), timeout=2); print('connected')\n"
            "except OSError as exc:\n"
            "    print('blocked', exc.errno)\n"
            "try:\n"
            "    socket.getaddrinfo('example.com', 80); print('resolved')\n"
            "except OSError:\n"
            "    print('no dns')\n"
        )
        stage = run(engine, "python", code)["run"]
        assert stage["stdout"].startswith("blocked"), stage
        assert "no dns" in stage["stdout"]

    def test_big_file_write_is_stopped(self, engine: Service, clean: None) -> None:
        code = (
            "f = open('big', 'wb')\n"
            "for _ in range(200):\n"
            "    f.write(b'x' * 1_000_000)\n"
            "print('wrote')"
        )
        stage = run(engine, "python", code)["run"]
        assert stage["status"] == "RE"
        assert "File too large" in stage["stderr"]
        assert "wrote" not in stage["stdout"]

    def test_private_temp_folders(self, engine: Service, clean: None) -> None:
        plant = (
            "for d in ('/tmp', '/dev/shm', '/var/tmp', '.'):\n"
            "    open(d + '/planted', 'w').write('x')"
        )
        assert run(engine, "python", plant)["run"]["status"] is None
        look = (
            "import os\n"
            "print([d for d in ('/tmp', '/dev/shm', '/var/tmp', '.') "
            "if os.path.exists(d + '/planted')])"
        )
        assert run(engine, "python", look)["run"]["stdout"] == "[]\n"

    def test_sandbox_view(self, engine: Service, clean: None) -> None:
        code = (
            "import os\n"
            "print(os.getuid() != 0, os.path.exists('/etc/passwd'), os.path.exists('/root'),"
            " len([p for p in os.listdir('/proc') if p.isdigit()]) < 5)\n"
            "try:\n    open('/usr/evil', 'w')\nexcept OSError:\n    print('ro')"
        )
        assert run(engine, "python", code)["run"]["stdout"] == "True False False True\nro\n"

    def test_background_process_does_not_outlive_the_job(
        self, engine: Service, clean: None
    ) -> None:
        stage = run(engine, "bash", "nohup sleep 60 >/dev/null 2>&1 &\necho started")["run"]
        assert stage["stdout"] == "started\n"

    def test_ten_parallel_requests(self, engine: Service, clean: None) -> None:
        before = metric(engine, "pgw_engine_executions_total")
        with ThreadPoolExecutor(10) as pool:
            bodies = list(
                pool.map(
                    lambda i: run(engine, "python", f"import time; time.sleep(0.2); print({i})"),
                    range(10),
                )
            )
        assert [body["run"]["stdout"] for body in bodies] == [f"{i}\n" for i in range(10)]
        assert metric(engine, "pgw_engine_executions_total") == before + 10


# -- bad requests ----------------------------------------------------------------------------

GOOD_FILE = {"content": "print(1)"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"language": "cobol", "version": "*", "files": [GOOD_FILE]}, "cobol-* runtime is unknown"),
        (
            {"language": "python", "version": "9.x", "files": [GOOD_FILE]},
            "python-9.x runtime is unknown",
        ),
        ({"version": "*", "files": [GOOD_FILE]}, "language is required as a string"),
        ({"language": 3, "version": "*", "files": [GOOD_FILE]}, "language is required as a string"),
        ({"language": "python", "files": [GOOD_FILE]}, "version is required as a string"),
        ({"language": "python", "version": "*"}, "files is required as an array"),
        ({"language": "python", "version": "*", "files": "x"}, "files is required as an array"),
        (
            {
                "language": "python",
                "version": "*",
                "files": [{"content": "AA==", "encoding": "base64"}],
            },
            "files must include at least one utf8 encoded file",
        ),
        (
            {
                "language": "python",
                "version": "*",
                "files": [{"content": "%%", "encoding": "base64"}],
            },
            "files[0].content is not valid base64",
        ),
        (
            {"language": "python", "version": "*", "files": [{"content": "zz", "encoding": "hex"}]},
            "files[0].content is not valid hex",
        ),
        (
            {"language": "python", "version": "*", "files": [{"name": "../x", "content": "1"}]},
            "files[0].name must be a relative path",
        ),
        (
            {"language": "python", "version": "*", "files": [{"name": "/abs", "content": "1"}]},
            "files[0].name must be a relative path",
        ),
        (
            {"language": "python", "version": "*", "files": [GOOD_FILE], "run_timeout": "1"},
            "If specified, run_timeout must be a number",
        ),
        (
            {"language": "python", "version": "*", "files": [GOOD_FILE], "args": [1]},
            "args must be an array of strings",
        ),
        (
            {"language": "python", "version": "*", "files": [GOOD_FILE], "run_timeout": 3001},
            "run_timeout cannot exceed the configured limit of 3000",
        ),
        (
            {
                "language": "python",
                "version": "*",
                "files": [GOOD_FILE],
                "compile_cpu_time": 10_001,
            },
            "compile_cpu_time cannot exceed the configured limit of 10000",
        ),
        # A NUL cannot be part of a command line or a path: refused before any sandbox starts.
        (
            {"language": "python", "version": "*", "files": [GOOD_FILE], "args": ["a\x00b"]},
            "args[0] must not contain a NUL character",
        ),
        (
            {"language": "pyth\x00on", "version": "*", "files": [GOOD_FILE]},
            "language must not contain a NUL character",
        ),
        (
            {"language": "python", "version": "3\x00", "files": [GOOD_FILE]},
            "version must not contain a NUL character",
        ),
    ],
)
def test_bad_request(engine: Service, body: dict[str, Any], message: str) -> None:
    response = post(engine, body)
    assert response.status_code == 400
    assert response.json()["message"].startswith(message), response.json()


def test_invalid_json_is_400(engine: Service) -> None:
    response = httpx.post(
        engine.url + "/api/v2/execute",
        content=b"{",
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 400
    assert set(response.json()) == {"message"}


def test_a_body_over_the_limit_is_413(engine: Service) -> None:
    # PISTON_MAX_BODY_BYTES (1 MiB by default), counted as the body arrives.
    body = {"language": "python", "version": "*", "files": [{"content": "#" * 2_000_000}]}
    response = post(engine, body)
    assert response.status_code == 413
    assert response.json() == {"message": "request body is larger than the limit of 1048576 bytes"}


def test_not_json_is_415(engine: Service) -> None:
    response = httpx.post(engine.url + "/api/v2/execute", content=b"language=python", timeout=10)
    assert response.status_code == 415
    assert response.json() == {"message": "requests must be of type application/json"}


def test_metrics_count_jobs_by_status(engine: Service) -> None:
    before = metric(engine, 'pgw_engine_jobs_total{status="RE"}')
    run(engine, "python", "raise SystemExit(2)")
    assert metric(engine, 'pgw_engine_jobs_total{status="RE"}') == before + 1


def test_refuses_to_start_without_bubblewrap() -> None:
    env = {**os.environ, "PISTON_BWRAP_PATH": "/nonexistent/bwrap"}
    result = subprocess.run(
        cli("engine", "--port", str(free_port())),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "install bubblewrap" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
