from __future__ import annotations

from django.urls import path
from rest_framework.routers import DefaultRouter

from tasks_app.api.queues import (
    DeadLetterMessageViewSet,
    DeadLetterViewSet,
    QueueListView,
    QueuePurgeView,
)
from tasks_app.api.views import TaskViewSet
from workflows_app.api.schedules import ScheduleViewSet
from workflows_app.api.views import WorkflowRunViewSet, WorkflowViewSet

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("tasks", TaskViewSet, basename="task")
router.register(
    "queues/dead-letter/messages", DeadLetterMessageViewSet, basename="dead-letter-message"
)
router.register("queues/dead-letter", DeadLetterViewSet, basename="dead-letter")
router.register("workflows", WorkflowViewSet, basename="workflow")
router.register("workflow-runs", WorkflowRunViewSet, basename="workflow-run")
router.register("schedules", ScheduleViewSet, basename="schedule")

urlpatterns = [
    path("queues/", QueueListView.as_view(), name="queue-list"),
    path("queues/<str:name>/purge/", QueuePurgeView.as_view(), name="queue-purge"),
    *router.urls,
]
