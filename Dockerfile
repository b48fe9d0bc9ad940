# syntax=docker/dockerfile:1
#
# QueueWorker: one image for every process of the Procfile. The first argument of the command
# names the process (see docker/entrypoint.sh):
#
#   web                      gunicorn queueworker.wsgi
#   worker [-Q queues] ...   celery -A queueworker worker
#   beat                     celery -A queueworker beat (exactly one)
#   flower                   celery -A queueworker flower
#   migrate                  python manage.py migrate
#   wait-for-migrations      waits until `migrate --check` passes (a Kubernetes init container)
#   manage <command> ...     python manage.py <command> ...
#
# Build:  docker build -t queueworker .
# Run:    see compose.yaml and deploy/ (configuration comes from the environment at run time;
#         nothing secret is baked into the image).

# Pinned to a full release, so that a rebuild gets the same interpreter and Debian base; raise it
# on purpose (and rebuild) for a new Python patch release.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# The uv that reads uv.lock; the lock's own format needs a recent one.
ARG UV_VERSION=0.13.9

# --- build: wheels for the project and every dependency, at the versions of uv.lock ---------------
FROM ${PYTHON_IMAGE} AS build
ARG UV_VERSION

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
COPY queueworker/ queueworker/
COPY tasks_app/ tasks_app/
COPY workflows_app/ workflows_app/
# Every dependency ships a wheel for linux/amd64 and linux/arm64, so no compiler is needed even
# here; a dependency without one would be built in this stage, never in the runtime image.
# The s3 extra (django-storages, boto3) lets artifacts live in object storage (deploy/ prod).
# `uv export --frozen` writes the lock's versions for the service (no dependency groups: no test or
# lint tools) with their hashes, which pip checks on download; constraints.txt, the same pins
# without hashes, holds the runtime install to exactly those versions.
RUN pip install "uv==${UV_VERSION}" \
    && uv export --frozen --no-dev --extra s3 --no-emit-project -o /tmp/requirements.txt \
    && uv export --frozen --no-dev --extra s3 --no-emit-project --no-hashes -o /tmp/constraints.txt \
    && pip wheel --wheel-dir /wheels --require-hashes -r /tmp/requirements.txt \
    && pip wheel --wheel-dir /wheels --no-deps ".[s3]" \
    && cp /tmp/constraints.txt /wheels/constraints.txt

# --- runtime: the wheels, the entrypoint, collected static files; no build tools -----------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    QW_VAR_DIR=/app/var \
    QW_BIND=0.0.0.0:8000 \
    FLOWER_PORT=5555 \
    LOG_FORMAT=json

RUN groupadd --system --gid 10001 queueworker \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin queueworker

# The wheels are mounted from the build stage for this one step: they never become a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels --constraint /wheels/constraints.txt "queueworker[s3]"

WORKDIR /app
COPY manage.py ./
COPY --chmod=0755 docker/entrypoint.sh docker/healthcheck.py docker/
COPY docker/gunicorn.conf.py docker/

# Static files are collected at build time (whitenoise serves them from QW_VAR_DIR/static).
# Settings need a secret key to load: this placeholder lives only for this RUN step, and the
# PostgreSQL/AMQP URLs only keep settings from creating the embedded SQLite and broker folders;
# nothing connects to them.
RUN DJANGO_SECRET_KEY=collectstatic-placeholder-not-a-secret \
    DATABASE_URL=postgres://build@localhost/build \
    CELERY_BROKER_URL=amqp://localhost// \
    python manage.py collectstatic --no-input -v0 \
    && chown -R 10001:10001 /app/var

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

EXPOSE 8000 5555

# Checks what this container runs (PID 1): web answers /api/health/live/, a worker answers a
# Celery ping, Flower answers /healthcheck, beat is alive.
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py"]

ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["web"]
