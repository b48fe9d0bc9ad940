#!/bin/sh
# QueueWorker's container entrypoint: the first argument names the process (the Procfile's
# names), the rest is passed on. Every branch `exec`s, so the process gets the container's
# signals itself: SIGTERM makes gunicorn finish its requests and a Celery worker finish its
# running tasks (warm shutdown) before it exits.
set -eu

process="${1:-web}"
[ "$#" -gt 0 ] && shift

case "$process" in
  web)
    exec gunicorn queueworker.wsgi --config /app/docker/gunicorn.conf.py "$@"
    ;;
  worker)
    # Queues come from the command (-Q ...); without -Q the worker consumes every work queue.
    exec celery -A queueworker worker --loglevel "${LOG_LEVEL:-info}" "$@"
    ;;
  beat)
    # The scheduler (workflows_app.scheduler:QueueWorkerScheduler) keeps its state in PostgreSQL;
    # the schedule file Celery insists on goes to /tmp, writable under a read-only root.
    exec celery -A queueworker beat --loglevel "${LOG_LEVEL:-info}" \
      --schedule /tmp/celerybeat-schedule "$@"
    ;;
  flower)
    # Flower has no login of its own and shows every task's arguments and results: it does not
    # start without one (FLOWER_BASIC_AUTH=user:password, or --basic-auth / --auth given here).
    case " $* " in
      *" --basic-auth"* | *" --auth"*) ;;
      *)
        if [ -z "${FLOWER_BASIC_AUTH:-}" ] && [ -z "${FLOWER_AUTH:-}" ]; then
          echo "refusing to start Flower without a login: set FLOWER_BASIC_AUTH=user:password" >&2
          exit 64
        fi
        ;;
    esac
    exec celery -A queueworker flower --port="${FLOWER_PORT:-5555}" --address=0.0.0.0 "$@"
    ;;
  migrate)
    # The cache table first (the API throttles share their counts through it): once
    # `migrate --check` passes, every process finds it.
    python manage.py createcachetable
    exec python manage.py migrate --no-input "$@"
    ;;
  wait-for-migrations)
    # For init containers: start the process only once the migration Job has run.
    until python manage.py migrate --check >/dev/null 2>&1; do
      echo "waiting for database migrations (python manage.py migrate --check)" >&2
      sleep "${QW_MIGRATION_WAIT_S:-5}"
    done
    exit 0
    ;;
  manage)
    exec python manage.py "$@"
    ;;
  *)
    # Anything else runs as given: `docker compose run --rm web celery -A queueworker inspect ping`.
    exec "$process" "$@"
    ;;
esac
