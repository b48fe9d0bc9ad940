from __future__ import annotations

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from tasks_app.models import Task, TaskStatus


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.django.Password("pw")


class TaskFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Task

    owner = factory.SubFactory(UserFactory)
    type = "NOOP"
    payload = factory.LazyFunction(dict)
    status = TaskStatus.PENDING
    queue = "task.created"
    max_retries = 3
    timeout_s = 30
    next_attempt_at = factory.LazyFunction(timezone.now)
    dispatched_at = factory.LazyFunction(timezone.now)
