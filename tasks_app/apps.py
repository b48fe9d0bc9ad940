from __future__ import annotations

from django.apps import AppConfig


class TasksAppConfig(AppConfig):
    name = "tasks_app"
    verbose_name = "Tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Importing registers the built-in handlers with the registry, and connects the
        # engine's worker and beat signal handlers (heartbeats, the dispatcher candidate).
        from queueworker import health, metrics, schema
        from tasks_app import dispatcher, handlers, worker_signals  # noqa: F401
        from tasks_app import metrics as task_metrics
        from tasks_app.api import schema as task_schema

        # The engine's part of the project's metrics, health and API schema.
        metrics.register_summary(task_metrics.task_summary)
        metrics.register_collector(task_metrics.TaskCollector())
        health.register_check("dispatcher", dispatcher.health_check, readiness="advisory")
        schema.register_postprocessor(task_schema.add_payload_schemas)
        check_allowed_hosts()


def check_allowed_hosts() -> None:
    """Refuse to start with a malformed ``QW_HTTP_ALLOWED_HOSTS`` (every process sets the app
    up, workers included, so none runs with a guard that would read it otherwise)."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    from tasks_app.http import guard

    try:
        guard.parse_allowed_hosts(settings.QW_HTTP_ALLOWED_HOSTS)
    except ValueError as exc:
        raise ImproperlyConfigured(f"QW_HTTP_ALLOWED_HOSTS: {exc}") from None
