"""QueueWorker benchmarks (`make bench` = `python -m bench`).

The run isolates itself (its own RabbitMQ vhost and PostgreSQL database, both dropped at the
end), starts the service as real processes (gunicorn and one Celery worker), and measures, end to
end from outside with the publisher and the worker running at the same time:

* bulk end to end: N no-op tasks through ``POST /api/tasks/bulk/`` while the worker drains;
* single create latency: sequential ``POST /api/tasks/`` with the worker running;
* bare Celery: the same N no-op tasks through a plain Celery app (``bench.bare_app``) under the
  same reliability settings, in the same run and vhost, as the yardstick.

Modules: ``services`` (isolation and child processes), ``bare_app`` (the bare Celery app),
``scenarios`` (the measurements), ``report`` (table and JSON), ``__main__`` (the command line).
"""
