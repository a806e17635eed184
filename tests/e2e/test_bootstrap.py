"""`piston-gateway bootstrap` as a process, against fake Pistons on loopback.

The one place a fake stands in for Piston: no machine here can run Piston's package installs. The
fakes are real HTTP servers that speak the two endpoints bootstrap uses, `GET /api/v2/runtimes`
and `POST /api/v2/packages` (with Piston's answers: the installed package on 200, `{"message"}` on
an error), and record every install request they receive.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from typer.testing import CliRunner

from app.bootstrap import Runtime, expand_upstreams
from app.bootstrap import bootstrap as run_bootstrap
from app.cli import app
from tests.support import ROOT, cli, free_port


@dataclass
class FakePiston:
    port: int = field(default_factory=free_port)
    runtimes: list[dict[str, Any]] = field(default_factory=list)
    installs: list[dict[str, Any]] = field(default_factory=list)
    # language-version -> (status, message): installs that Piston refuses.
    refuse: dict[str, tuple[int, str]] = field(default_factory=dict)
    install_seconds: float = 0.0  # how long an install takes (a real one: minutes)
    host: str = "127.0.0.1"  # "::" listens on every IPv6 and (v4-mapped) IPv4 address
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/api/v2/runtimes":
                    self._send(200, fake.runtimes)
                else:
                    self._send(404, {"message": "not found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                if self.path != "/api/v2/packages":
                    self._send(404, {"message": "not found"})
                    return
                fake.installs.append(body)
                time.sleep(fake.install_seconds)
                name = f"{body['language']}-{body['version']}"
                if name in fake.refuse:
                    status, message = fake.refuse[name]
                    self._send(status, {"message": message})
                    return
                fake.runtimes.append(
                    {"language": body["language"], "version": body["version"], "aliases": []}
                )
                self._send(200, {"language": body["language"], "version": body["version"]})

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server_class: type[http.server.ThreadingHTTPServer] = http.server.ThreadingHTTPServer
        if ":" in self.host:
            server_class = type("Server6", (server_class,), {"address_family": socket.AF_INET6})
        self.server = server_class((self.host, self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def pistons() -> Iterator[list[FakePiston]]:
    fakes = [FakePiston(), FakePiston()]
    for fake in fakes:
        fake.start()
    yield fakes
    for fake in fakes:
        fake.stop()


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def bootstrap(
    *args: str, urls: list[str], env: dict[str, str] | None = None, process: bool = False
) -> Outcome:
    """The `bootstrap` command with GATEWAY_PISTON_URLS=urls: in this process through typer's
    runner (the same command code; a new interpreter costs seconds), or as a real process."""
    environment: dict[str, str | None] = {k: None for k in os.environ if k.startswith("GATEWAY_")}
    environment["GATEWAY_PISTON_URLS"] = ",".join(urls)
    environment.update(env or {})
    if not process:
        result = CliRunner().invoke(app, ["bootstrap", *args], env=environment)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Outcome(result.exit_code, result.stdout, result.stderr)
    clean = {k: v for k, v in {**os.environ, **environment}.items() if v is not None}
    done = subprocess.run(
        cli("bootstrap", *args),
        env=clean,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


def verdicts(result: Outcome) -> dict[tuple[str, str], str]:
    """{(upstream, language-version): verdict} from the one line per upstream and runtime."""
    found: dict[tuple[str, str], str] = {}
    for line in result.stdout.splitlines():
        head, sep, verdict = line.partition(": ")
        words = head.split(" ")
        if sep and len(words) == 2 and words[0].startswith(("http:", "dns+http:")):
            if verdict.startswith(("installing", "still installing")):
                continue
            assert (words[0], words[1]) not in found, f"two verdicts for {head}:\n{result.stdout}"
            found[(words[0], words[1])] = verdict
    return found


PYTHON = {"language": "python", "version": "3.10.0"}
SCALA = {"language": "scala", "version": "3.0.0"}


class TestInstalls:
    def test_missing_runtimes_installed_on_each_upstream_then_nothing_again(
        self, pistons: list[FakePiston]
    ) -> None:
        first, second = pistons
        first.runtimes.append({**PYTHON, "aliases": ["py"]})  # already there on the first
        urls = [p.url for p in pistons]

        result = bootstrap("--runtimes", "python=3.10.0,scala=3.0.0", urls=urls)

        assert result.returncode == 0, result.stdout + result.stderr
        assert first.installs == [SCALA]
        assert second.installs == [PYTHON, SCALA]
        assert verdicts(result) == {
            (first.url, "python-3.10.0"): "already installed",
            (first.url, "scala-3.0.0"): "installed",
            (second.url, "python-3.10.0"): "installed",
            (second.url, "scala-3.0.0"): "installed",
        }
        assert f"{second.url} python-3.10.0: installing" in result.stdout  # progress

        again = bootstrap("--runtimes", "python=3.10.0,scala=3.0.0", urls=urls)

        assert again.returncode == 0, again.stdout + again.stderr
        assert first.installs == [SCALA]  # no new POST
        assert second.installs == [PYTHON, SCALA]
        assert set(verdicts(again).values()) == {"already installed"}
        assert len(verdicts(again)) == 4

    def test_environment_default_when_no_runtimes_option(self, pistons: list[FakePiston]) -> None:
        (fake, _) = pistons
        result = bootstrap(urls=[fake.url], env={"GATEWAY_BOOTSTRAP_RUNTIMES": "ruby=3.0.1"})
        assert result.returncode == 0, result.stdout + result.stderr
        assert fake.installs == [{"language": "ruby", "version": "3.0.1"}]
        assert verdicts(result) == {(fake.url, "ruby-3.0.1"): "installed"}

    def test_builtin_default_is_the_seeds_two_runtimes(self, pistons: list[FakePiston]) -> None:
        (fake, _) = pistons
        result = bootstrap(urls=[fake.url], process=True)  # the console script, for real
        assert result.returncode == 0, result.stdout + result.stderr
        assert fake.installs == [PYTHON, SCALA]

    def test_failed_install_reports_pistons_message_and_fails(
        self, pistons: list[FakePiston]
    ) -> None:
        fake, other = pistons
        fake.refuse["scala-3.0.0"] = (500, "Checksum miss-match want: abc got: def")
        result = bootstrap("--runtimes", "python=3.10.0,scala=3.0.0", urls=[fake.url, other.url])
        assert result.returncode != 0
        assert verdicts(result) == {
            (fake.url, "python-3.10.0"): "installed",
            (fake.url, "scala-3.0.0"): "failed: Checksum miss-match want: abc got: def",
            (other.url, "python-3.10.0"): "installed",
            (other.url, "scala-3.0.0"): "installed",
        }
        assert "Traceback" not in result.stderr

    def test_unknown_package_reports_pistons_404_message(self, pistons: list[FakePiston]) -> None:
        (fake, _) = pistons
        fake.refuse["cobol-9.9.9"] = (404, "Requested package cobol-9.9.9 does not exist")
        result = bootstrap("--runtimes", "cobol=9.9.9", urls=[fake.url], process=True)
        assert result.returncode == 1  # the process's exit status
        assert verdicts(result) == {
            (fake.url, "cobol-9.9.9"): "failed: Requested package cobol-9.9.9 does not exist"
        }

    def test_a_concurrent_install_answered_already_installed_counts(
        self, pistons: list[FakePiston]
    ) -> None:
        # Another bootstrap (a second replica) won the race: Piston refuses, but lists it.
        (fake, _) = pistons
        fake.refuse["python-3.10.0"] = (500, "python-3.10.0 is already installed")
        fake.runtimes.append({**PYTHON, "aliases": []})
        result = bootstrap("--runtimes", "python=3.10.0", urls=[fake.url])
        assert result.returncode == 0
        assert verdicts(result) == {(fake.url, "python-3.10.0"): "already installed"}

    def test_a_long_install_shows_progress(self, pistons: list[FakePiston]) -> None:
        (fake, _) = pistons
        fake.install_seconds = 1.5
        result = bootstrap(
            "--runtimes", "python=3.10.0", "--progress-every", "0.3", urls=[fake.url]
        )
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        started = lines.index(f"{fake.url} python-3.10.0: installing (this can take minutes)")
        still = [i for i, line in enumerate(lines) if "python-3.10.0: still installing (" in line]
        done = lines.index(f"{fake.url} python-3.10.0: installed")
        assert still, result.stdout
        assert started < still[0] < done

    def test_a_dns_entry_stands_for_every_address_it_resolves_to(self) -> None:
        fake = FakePiston(host="::")
        fake.start()
        try:
            entry = f"dns+http://localhost:{fake.port}"
            addresses = expand_upstreams([entry])
            assert f"http://127.0.0.1:{fake.port}" in addresses
            result = bootstrap("--runtimes", "python=3.10.0", urls=[entry])
        finally:
            fake.stop()
        assert result.returncode == 0, result.stdout + result.stderr
        assert set(verdicts(result)) == {(url, "python-3.10.0") for url in addresses}

    async def test_an_upstream_named_twice_is_installed_on_once(
        self, pistons: list[FakePiston]
    ) -> None:
        """A plain URL and a dns+http name for the same address are one upstream."""
        fake = pistons[0]

        def resolve(host: str, port: int) -> list[str]:
            return ["127.0.0.1"]

        lines: list[str] = []
        ok = await run_bootstrap(
            [fake.url, f"dns+http://piston.local:{fake.port}"],
            [Runtime("python", "3.10.0")],
            wait=5,
            echo=lines.append,
            resolve=resolve,
        )
        assert ok is True
        assert fake.installs == [PYTHON]
        assert [line for line in lines if line.endswith(": installed")] == [
            f"{fake.url} python-3.10.0: installed"
        ]


class TestWaiting:
    def test_waits_for_an_upstream_that_starts_late(self, pistons: list[FakePiston]) -> None:
        late = FakePiston()
        timer = threading.Timer(2.0, late.start)
        timer.start()
        try:
            result = bootstrap(
                "--runtimes",
                "python=3.10.0",
                "--wait",
                "30",
                "--progress-every",
                "0.5",
                urls=[pistons[0].url, late.url],
            )
        finally:
            timer.join()
            late.stop()
        assert result.returncode == 0, result.stdout + result.stderr
        assert late.installs == [PYTHON]
        assert pistons[0].installs == [PYTHON]
        assert "waiting for upstreams (" in result.stdout  # progress while it waits
        assert verdicts(result)[(late.url, "python-3.10.0")] == "installed"

    def test_an_upstream_that_never_answers_fails_with_a_clear_line(
        self, pistons: list[FakePiston]
    ) -> None:
        silent = f"http://127.0.0.1:{free_port()}"
        result = bootstrap(
            "--runtimes", "python=3.10.0", "--wait", "1", urls=[pistons[0].url, silent]
        )
        assert result.returncode == 1
        lines = verdicts(result)
        assert lines[(pistons[0].url, "python-3.10.0")] == "installed"  # the other one proceeds
        assert lines[(silent, "python-3.10.0")].startswith(
            "failed: did not answer /api/v2/runtimes within 1 s"
        )
        assert "Traceback" not in result.stderr

    async def test_a_name_that_never_resolves_holds_back_no_other_upstream(
        self, pistons: list[FakePiston]
    ) -> None:
        def resolve(host: str, port: int) -> list[str]:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        lines: list[str] = []
        ok = await run_bootstrap(
            [pistons[0].url, "dns+http://piston-headless.nowhere:2000"],
            [Runtime("python", "3.10.0")],
            wait=1,
            echo=lines.append,
            resolve=resolve,
        )
        assert ok is False
        found = verdicts(Outcome(1, "\n".join(lines), ""))
        assert found[(pistons[0].url, "python-3.10.0")] == "installed"
        assert found[("dns+http://piston-headless.nowhere:2000", "python-3.10.0")] == (
            "failed: did not answer /api/v2/runtimes within 1 s"
            " (does not resolve (Name or service not known))"
        )


class TestBadInput:
    @pytest.mark.parametrize("value", ["python", "python=", "=3.10.0", ",", "a=1=2"])
    def test_bad_runtimes_option_is_one_line(self, value: str) -> None:
        # As a process for the first (no traceback on a real stderr), in this one for the rest.
        result = bootstrap(
            "--runtimes", value, urls=["http://127.0.0.1:9"], process=value == "python"
        )
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: --runtimes: ")

    def test_bad_environment_default_is_one_line(self) -> None:
        result = bootstrap(
            urls=["http://127.0.0.1:9"], env={"GATEWAY_BOOTSTRAP_RUNTIMES": "x"}, process=True
        )
        assert result.returncode == 1
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: invalid settings: GATEWAY_BOOTSTRAP_RUNTIMES")
