"""Writes on workflows: create, change (a new version when the definition changes), delete."""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.db.models import Max

from queueworker.errors import Conflict, InvalidInput, InvalidTransition
from tasks_app import services as task_services
from tasks_app.models import Task, TaskStatus
from tasks_app.paths import json_path
from tasks_app.task_types import TaskType
from workflows_app import compensation, coordinator, refs, runs
from workflows_app import definition as definitions
from workflows_app.models import (
    FINISHED_RUN_STATUSES,
    RunStatus,
    Workflow,
    WorkflowRun,
    WorkflowVersion,
)


def canonical_definition(raw: Any) -> dict[str, Any]:
    """The validated canonical form of ``raw``; ``InvalidInput`` lists each path at fault."""
    try:
        definitions.validate(raw)
    except definitions.DefinitionError as exc:
        raise InvalidInput({"definition": exc.problems}) from None
    return definitions.normalise(raw)


def input_validator(schema: dict[str, Any]) -> jsonschema_rs.Draft202012Validator:
    """The validator of a run's input: jsonschema-rs on Rust's ``regex`` crate.

    A user's ``pattern`` must not be able to stall a web process: Rust's engine matches in
    time linear in the input (no backtracking), and refuses the syntax that would need it
    (look-around, backreferences). Remote ``$ref`` are never fetched; formats are annotations,
    as Draft 2020-12 says by default. Raises ``jsonschema_rs.ValidationError`` for a schema it
    cannot compile.
    """
    return jsonschema_rs.Draft202012Validator(
        schema,
        validate_formats=False,
        pattern_options=jsonschema_rs.RegexOptions(),
        offline=True,
    )


def checked_input_schema(schema: Any) -> dict[str, Any] | None:
    """``schema`` if runs can be validated with it; else ``InvalidInput`` naming the path."""
    if schema is None:
        return None
    if not isinstance(schema, dict):
        raise InvalidInput({"input_schema": ["Must be a JSON Schema object."]})
    try:
        input_validator(schema)
    except jsonschema_rs.ValidationError as exc:
        raise InvalidInput({"input_schema": [_schema_problem(exc)]}) from None
    return schema


def _schema_problem(exc: jsonschema_rs.ValidationError) -> str:
    kind = exc.kind
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.Format) and kind.format == "regex":
        return (
            f"{_path(exc.instance_path)}{json.dumps(exc.instance)} is not a supported regular "
            "expression (no look-around or backreferences: patterns run in linear time)"
        )
    return f"{_path(exc.instance_path)}{exc.message}"


def workflow_create(
    *,
    owner: User,
    name: str,
    definition: Any,
    input_schema: Any = None,
    description: str = "",
    is_active: bool = True,
) -> Workflow:
    canonical = canonical_definition(definition)
    schema = checked_input_schema(input_schema)
    try:
        with transaction.atomic():
            workflow = Workflow.objects.create(
                owner=owner, name=name, description=description, is_active=is_active
            )
            WorkflowVersion.objects.create(
                workflow=workflow,
                version=1,
                definition=canonical,
                input_schema=schema,
                created_by=owner,
            )
    except IntegrityError:
        raise Conflict({"name": [f"You already have a workflow named '{name}'."]}) from None
    return workflow


_UNSET = object()


def workflow_update(
    *,
    workflow: Workflow,
    by: User,
    name: str | None = None,
    description: str | None = None,
    is_active: bool | None = None,
    definition: Any = _UNSET,
    input_schema: Any = _UNSET,
) -> WorkflowVersion | None:
    """Change a workflow; a new definition or input schema becomes the next version.

    A stored version is never changed in place, so a run keeps the definition it started
    with. Returns the new version, or None when only name, description or activity changed.
    """
    new_version: WorkflowVersion | None = None
    canonical = canonical_definition(definition) if definition is not _UNSET else _UNSET
    schema = checked_input_schema(input_schema) if input_schema is not _UNSET else _UNSET
    try:
        with transaction.atomic():
            locked = Workflow.objects.select_for_update().get(pk=workflow.pk)
            fields = []
            for attr, value in (
                ("name", name),
                ("description", description),
                ("is_active", is_active),
            ):
                if value is not None and getattr(locked, attr) != value:
                    setattr(locked, attr, value)
                    fields.append(attr)
            if fields:
                locked.save(update_fields=[*fields, "updated_at"])
            if canonical is not _UNSET or schema is not _UNSET:
                current = locked.versions.order_by("-version").first()
                assert current is not None  # every workflow is created with version 1
                new_definition = current.definition if canonical is _UNSET else canonical
                new_schema = current.input_schema if schema is _UNSET else schema
                if (new_definition, new_schema) != (current.definition, current.input_schema):
                    number = (locked.versions.aggregate(n=Max("version"))["n"] or 0) + 1
                    new_version = WorkflowVersion.objects.create(
                        workflow=locked,
                        version=number,
                        definition=new_definition,
                        input_schema=new_schema,
                        created_by=by,
                    )
                    locked.save(update_fields=["updated_at"])
    except IntegrityError:
        raise Conflict({"name": [f"You already have a workflow named '{name}'."]}) from None
    return new_version


def workflow_delete(*, workflow: Workflow) -> None:
    workflow.delete()


def run_start(*, workflow: Workflow, owner: User, input: Any) -> WorkflowRun:
    """Start a run of the workflow's latest version: its first step is published on commit."""
    if not workflow.is_active:
        raise InvalidTransition({"detail": f"Workflow '{workflow.name}' is inactive."})
    version = workflow.versions.order_by("-version").first()
    assert version is not None  # every workflow is created with version 1
    problems = run_input_problems(version, input)
    if problems:
        raise InvalidInput({"input": problems})
    graph = coordinator.graph_for_version(version)
    with transaction.atomic():
        run = WorkflowRun.objects.create(
            workflow=workflow, version=version, owner=owner, input=input
        )
        run.owner = owner
        coordinator.start_steps(run, graph, [graph.start], runs.context(run, []))
    return run


def run_input_problems(version: WorkflowVersion, input: Any) -> list[str]:
    """What is wrong with ``input`` for this version's input schema (empty when it fits)."""
    if not version.input_schema:
        return []
    try:
        validator = input_validator(version.input_schema)
    except jsonschema_rs.ValidationError as exc:
        # Stored before patterns were checked at write: the workflow needs a new version.
        return [f"the workflow's input_schema cannot be used: {_schema_problem(exc)}"]
    problems = sorted(validator.iter_errors(input), key=lambda e: [str(p) for p in e.instance_path])
    return [f"{_path(e.instance_path)}{e.message}" for e in problems]


def _path(parts: Any) -> str:
    path = json_path(parts)
    return f"{path}: " if path else ""


def run_cancel(*, run: WorkflowRun, by: str) -> WorkflowRun:
    """Stop the run: waiting steps are cancelled, running ones asked to stop, completed ones
    compensated; the run ends CANCELLED."""
    with transaction.atomic():
        locked, tasks = coordinator.locked_run(run.pk)
        if locked.status in FINISHED_RUN_STATUSES:
            raise InvalidTransition({"detail": f"Cannot cancel a run that is {locked.status}."})
        locked.cancel_requested = True
        if locked.status == RunStatus.RUNNING:
            locked.status = RunStatus.COMPENSATING
            locked.error = f"cancelled by {by}"
        locked.save(update_fields=["cancel_requested", "status", "error", "updated_at"])
        coordinator.decide(locked, tasks)
    return locked


def run_retry(*, run: WorkflowRun, by: str) -> WorkflowRun:
    """A FAILED run: re-run the compensation that failed and continue the undo, or (nothing
    was undone) resume from the failed step, keeping the completed steps' results."""
    with transaction.atomic():
        locked, tasks = coordinator.locked_run(run.pk)
        if locked.status != RunStatus.FAILED:
            raise InvalidTransition({"detail": f"Cannot retry a run that is {locked.status}."})
        broken = [t for t in tasks if t.status in (TaskStatus.FAILED, TaskStatus.CANCELLED)]
        failed_undo = [t for t in broken if t.type == runs.COMPENSATION_TYPE]
        again = failed_undo or broken
        for task in again:
            payload = None
            if task.error.startswith(runs.COULD_NOT_START):
                payload = _payload_again(locked, task, tasks)
            task_services.task_retry(task=task, by=by, reason="workflow run retry", payload=payload)
        locked.status = RunStatus.COMPENSATING if failed_undo else RunStatus.RUNNING
        locked.error = ""
        locked.finished_at = None
        locked.save(update_fields=["status", "error", "finished_at", "updated_at"])
    return locked


def _payload_again(run: WorkflowRun, task: Task, tasks: list[Task]) -> Any:
    """The payload of a task that failed before it ran, its ``$ref`` resolved again (a
    setting may have changed); ``InvalidTransition`` when it still cannot be."""
    graph = coordinator.graph_for(run)
    ctx = runs.context(run, tasks)
    step = graph.steps[str(task.step)]
    try:
        if task.type == runs.COMPENSATION_TYPE:
            undone = next(t for t in tasks if t.pk == task.parent_id)
            assert step.compensation is not None  # a compensation task exists for it
            spec = compensation.compensation_spec(undone, step.compensation, ctx)
            return spec.payload
        return refs.resolve(step.payload, ctx, path=f"steps.{step.name}.payload")
    except refs.RefError as exc:
        raise InvalidTransition({"detail": f"Step {step.name} still cannot start: {exc}"}) from None


def task_compensate(*, task: Task, by: str, action: dict[str, Any] | None = None) -> Task:
    """Undo a COMPLETED task by hand: its step's declared compensation, or ``action``.

    A task is compensated once: a second request while a compensation exists is a 409.
    """
    with transaction.atomic():
        locked = Task.objects.select_for_update().get(pk=task.pk)
        if locked.status != TaskStatus.COMPLETED or locked.type == runs.COMPENSATION_TYPE:
            raise InvalidTransition(
                {"detail": f"Only a COMPLETED task can be compensated, not a {locked.status} one."}
            )
        if Task.objects.filter(parent=locked, type=runs.COMPENSATION_TYPE).exists():
            raise InvalidTransition({"detail": "This task already has a compensation."})
        declared = None
        run = locked.workflow_run
        if run is not None and locked.step:
            declared = coordinator.graph_for(run).steps[locked.step].compensation
        spec = action or declared
        if spec is None:
            raise InvalidInput(
                {"action": ["Give {type, payload}: this task's step declares no compensation."]}
            )
        ctx = runs.context(run, list(run.tasks.all())) if run else {"input": {}, "steps": {}}
        # Outside a failed run's saga: not one of the run's steps (no workflow_run).
        try:
            undo = compensation.compensation_spec(locked, spec, ctx, priority=locked.priority)
        except refs.RefError as exc:
            raise InvalidInput({"action": [str(exc)]}) from None
        problems = registry_validate(TaskType.COMPENSATION, undo.payload)
        if problems:
            raise InvalidInput({"action": problems})
        (created,) = task_services.task_bulk_create(owner=locked.owner, specs=[undo], by=by)
    return created


def registry_validate(task_type: str, payload: Any) -> list[str]:
    from tasks_app.handlers import registry

    spec = registry.get(task_type)
    assert spec is not None
    return [
        f"{path.removeprefix('action.')}: {message}" if path else message
        for path, message in spec.validate(payload)
    ]
