from __future__ import annotations

from django.apps import AppConfig


class TasksAppConfig(AppConfig):
    name = "tasks_app"
    verbose_name = "Tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Importing registers the built-in handlers with the registry.
        from tasks_app import handlers  # noqa: F401

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
