# One entry point for every routine. `make run` and `make test` set up what they need first: the
# system packages (scripts/setup-system.sh), uv, and the virtualenv from uv.lock.
SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := .venv
# Ship the venv with compiled bytecode: where PYTHONDONTWRITEBYTECODE is set (as on our CI
# machines), every process would otherwise compile FastAPI, pydantic and redis anew at start.
export UV_COMPILE_BYTECODE := 1
PY := .venv/bin/python
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")

.PHONY: system-deps setup run test lint bench clean

# What the machine lacks (bubblewrap, redis-server, compilers, wrk, ...): installed with apt-get
# as root, else the exact command to run is printed. Quick when everything is there.
system-deps:
	@bash scripts/setup-system.sh

.venv/.synced: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet "uv==0.13.9" \
		|| python3 -m pip install --quiet --break-system-packages "uv==0.13.9"
	$(UV) sync --frozen --python python3.11
	@$(PY) -m compileall -q app bench tests >/dev/null
	@touch $@

setup: system-deps .venv/.synced

run: setup
	.venv/bin/piston-gateway dev

test: setup
	.venv/bin/pytest

lint: setup
	.venv/bin/ruff check app tests bench
	.venv/bin/ruff format --check app tests bench
	.venv/bin/mypy

bench: setup
	$(PY) -m bench

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
