"""Workflows' API under ``/api/``: definitions, runs, schedules, and the undo of a task
(``POST /api/tasks/{id}/compensate/``), which is a saga's operation kept at the task's path.
``queueworker/urls.py`` includes it after the engine's routes."""

from __future__ import annotations

from rest_framework.routers import DefaultRouter

from workflows_app.api.schedules import ScheduleViewSet
from workflows_app.api.views import TaskCompensateViewSet, WorkflowRunViewSet, WorkflowViewSet

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
# Only the detail action ``compensate``: the engine's router answers every other task route.
router.register("tasks", TaskCompensateViewSet, basename="task")
router.register("workflows", WorkflowViewSet, basename="workflow")
router.register("workflow-runs", WorkflowRunViewSet, basename="workflow-run")
router.register("schedules", ScheduleViewSet, basename="schedule")

urlpatterns = router.urls
