# syntax=docker/dockerfile:1
#
# The production image of piston-gateway.
#
#   docker build -t piston-gateway .
#   docker run -p 8000:8000 -e GATEWAY_PISTON_URLS=http://piston:2000 \
#       -e GATEWAY_REDIS_URL=redis://redis:6379/0 -e GATEWAY_ADMIN_KEY=... piston-gateway
#
# Worker processes: append `--workers N` to the command (docker-compose.yml and deploy/ do), or set
# WEB_CONCURRENCY, which uvicorn reads when no worker count is given.

# ---- build: resolve nothing, install exactly what uv.lock pins -------------------------------------
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1

# The same uv as the Makefile, so the lock file is read by the version that wrote it.
RUN pip install uv==0.13.9

WORKDIR /src

# Dependencies first, in their own layer: a change to app/ does not reinstall them.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project

# Then the project itself, as a real (non-editable) install, so /src is not needed at run time.
COPY README.md ./
COPY app ./app
RUN uv sync --frozen --no-dev --no-editable

# ---- runtime: the interpreter, the virtualenv, an unprivileged user --------------------------------
FROM python:3.11-slim-bookworm AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without resolving a name.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway

COPY --from=build /opt/venv /opt/venv

# An empty working directory: Settings reads an optional .env from here, and none is shipped.
WORKDIR /srv/gateway

USER 10001:10001

EXPOSE 8000

# slim has no curl: ask the gateway's own interpreter. urlopen raises on anything but 2xx.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]

CMD ["piston-gateway", "serve", "--host", "0.0.0.0", "--port", "8000"]
