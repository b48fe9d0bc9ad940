"""The engine's API under ``/api/``: tasks, queues and dead letters (``queueworker/urls.py``
includes it). Routes of the apps built on the engine live in their own ``urls.py``."""

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

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("tasks", TaskViewSet, basename="task")
router.register(
    "queues/dead-letter/messages", DeadLetterMessageViewSet, basename="dead-letter-message"
)
router.register("queues/dead-letter", DeadLetterViewSet, basename="dead-letter")

urlpatterns = [
    path("queues/", QueueListView.as_view(), name="queue-list"),
    path("queues/<str:name>/purge/", QueuePurgeView.as_view(), name="queue-purge"),
    *router.urls,
]
