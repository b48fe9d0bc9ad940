"""Gunicorn settings for the container (``gunicorn queueworker.wsgi --config <this file>``).

The same variables as the Procfile's web line: ``QW_BIND`` and ``WEB_CONCURRENCY``.
"""

from __future__ import annotations

import os

bind = os.environ.get("QW_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
accesslog = "-"
# Heartbeat files in memory, not on the (possibly read-only) root filesystem.
worker_tmp_dir = "/dev/shm"  # noqa: S108  # tmpfs, private to the container
# Gunicorn 24+ opens a control socket under $HOME; the container neither needs nor can write it.
control_socket_disable = True
# On SIGTERM, requests in flight get this long to finish (the pod's grace period is longer).
graceful_timeout = 30
timeout = 60
# Recycle workers now and then so that a slow leak cannot grow for weeks.
max_requests = 2000
max_requests_jitter = 200
