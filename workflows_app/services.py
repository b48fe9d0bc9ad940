"""Writes on workflows: create, change (a new version when the definition changes), delete."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.db.models import Max
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from queueworker.errors import Conflict, InvalidInput
from workflows_app import definition as definitions
from workflows_app.models import Workflow, WorkflowVersion


def canonical_definition(raw: Any) -> dict[str, Any]:
    """The validated canonical form of ``raw``; ``InvalidInput`` lists each path at fault."""
    try:
        definitions.validate(raw)
    except definitions.DefinitionError as exc:
        raise InvalidInput({"definition": exc.problems}) from None
    return definitions.normalise(raw)


def checked_input_schema(schema: Any) -> dict[str, Any] | None:
    if schema is None:
        return None
    if not isinstance(schema, dict):
        raise InvalidInput({"input_schema": ["Must be a JSON Schema object."]})
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise InvalidInput({"input_schema": [f"{where}: {exc.message}"]}) from None
    return schema


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
