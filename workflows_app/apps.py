from __future__ import annotations

from django.apps import AppConfig


class WorkflowsAppConfig(AppConfig):
    name = "workflows_app"
    verbose_name = "Workflows"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The engine does not import this app: it is told of its tasks' outcomes through hooks.
        from queueworker import metrics as project_metrics
        from tasks_app import hooks, worker_signals
        from workflows_app import coordinator, recovery, scheduler
        from workflows_app import metrics as run_metrics

        hooks.register_terminal_observer(coordinator.RunObserver())
        hooks.register_reconciler(recovery.reconcile_runs)
        # Beat fires the schedules with this app's scheduler, or refuses to start.
        worker_signals.register_beat_check(scheduler.ensure_project_scheduler)
        # Runs by status in /api/metrics/ and /metrics.
        project_metrics.register_summary(run_metrics.run_summary)
        project_metrics.register_collector(run_metrics.RunCollector())
