from __future__ import annotations

from django.apps import AppConfig


class WorkflowsAppConfig(AppConfig):
    name = "workflows_app"
    verbose_name = "Workflows"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The engine does not import this app: it is told of its tasks' outcomes through hooks.
        from tasks_app import hooks
        from workflows_app import coordinator, recovery

        hooks.register_terminal_observer(coordinator.RunObserver())
        hooks.register_reconciler(recovery.reconcile_runs)
