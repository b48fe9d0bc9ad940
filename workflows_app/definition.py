"""Workflow definitions (docs/workflows.md): normalisation and validation, each problem with
its path.

Canonical form::

    {"start": "reserve",
     "steps": {"reserve": {"type": "HTTP_REQUEST", "payload": {...}, "compensation": {...},
                           "next": ["charge", "notify"], "max_retries": 3},
               ...}}

``next`` names one step or several (fan-out); a step with several predecessors waits for all
of them (fan-in). ``{"$ref": "<JMESPath>"}`` anywhere in a payload is replaced when the step
starts, by that expression over ``{input, steps: {<name>: {result, status, task}}}``; it may
only name ``input`` or an ancestor step. The seed's legacy form ``{initialTask, transitions}``
is accepted and normalised.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jmespath
from django.conf import settings
from jmespath.exceptions import JMESPathError

from tasks_app.handlers.registry import registry
from tasks_app.paths import join_path
from tasks_app.task_types import TaskType

STEP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
STEP_KEYS = {
    "type",
    "payload",
    "compensation",
    "next",
    "max_retries",
    "timeout_s",
    "priority",
}
MAX_STEPS = 200
MAX_RETRIES = 25
#: A ``$ref`` expression's length; its evaluation is bounded too, when the step starts.
MAX_REF_CHARS = 1000


class DefinitionError(ValueError):
    """An invalid definition; ``problems`` are ``"<json path>: <message>"`` strings."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Step:
    name: str
    type: str
    payload: Any
    next: tuple[str, ...]
    compensation: dict[str, Any] | None = None
    max_retries: int | None = None
    timeout_s: int | None = None
    priority: int | None = None


@dataclass(frozen=True)
class Graph:
    """A validated definition: steps, edges both ways, and a topological order."""

    start: str
    steps: dict[str, Step]
    predecessors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    order: tuple[str, ...] = ()

    def successors(self, name: str) -> tuple[str, ...]:
        return self.steps[name].next

    def ancestors(self, name: str) -> set[str]:
        seen: set[str] = set()
        queue = deque(self.predecessors.get(name, ()))
        while queue:
            current = queue.popleft()
            if current not in seen:
                seen.add(current)
                queue.extend(self.predecessors.get(current, ()))
        return seen


def normalise(definition: Any) -> dict[str, Any]:
    """The canonical form of ``definition``; the legacy form becomes a linear chain.

    Legacy: ``{"initialTask": {type, payload}, "transitions": {"<type just completed>":
    {type, payload}}}``: each completed type names the next task, so the chain follows the
    types from ``initialTask`` until a type has no transition. Steps are named ``step1``…
    """
    if not isinstance(definition, dict):
        raise DefinitionError([": must be an object"])
    if "initialTask" not in definition and "transitions" not in definition:
        return definition
    unknown = sorted(set(definition) - {"initialTask", "transitions"})
    if unknown:
        raise DefinitionError([f"{key}: unknown field in the legacy form" for key in unknown])
    initial: Any = definition.get("initialTask")
    transitions: Any = definition.get("transitions", {})
    problems = []
    if not isinstance(initial, dict) or not isinstance(initial.get("type"), str):
        problems.append("initialTask: must be an object with a type")
    if not isinstance(transitions, dict):
        problems.append("transitions: must be an object mapping a task type to the next task")
    if problems:
        raise DefinitionError(problems)
    chain = [initial]
    seen_types = {initial["type"]}
    while (follow := transitions.get(chain[-1]["type"])) is not None:
        if not isinstance(follow, dict) or not isinstance(follow.get("type"), str):
            raise DefinitionError([f"transitions.{chain[-1]['type']}: must be {{type, payload}}"])
        if follow["type"] in seen_types:
            raise DefinitionError(
                [f"transitions.{chain[-1]['type']}: cycle back to type {follow['type']}"]
            )
        seen_types.add(follow["type"])
        chain.append(follow)
    unused = sorted(set(transitions) - {task["type"] for task in chain[:-1]})
    if unused:
        raise DefinitionError([f"transitions.{t}: unreachable from initialTask" for t in unused])
    steps: dict[str, Any] = {}
    for index, task in enumerate(chain, start=1):
        step = {k: v for k, v in task.items() if k in STEP_KEYS - {"next"}}
        step.setdefault("payload", {})
        if index < len(chain):
            step["next"] = f"step{index + 1}"
        steps[f"step{index}"] = step
    return {"start": "step1", "steps": steps}


def validate(definition: Any) -> Graph:
    """Normalise and check ``definition``; raise ``DefinitionError`` listing every problem."""
    canonical = normalise(definition)
    problems: list[str] = []
    unknown = sorted(set(canonical) - {"start", "steps"})
    problems += [f"{key}: unknown field" for key in unknown]
    raw_steps = canonical.get("steps")
    if not isinstance(raw_steps, dict) or not raw_steps:
        raise DefinitionError([*problems, "steps: must be a non-empty object of named steps"])
    if len(raw_steps) > MAX_STEPS:
        raise DefinitionError([f"steps: at most {MAX_STEPS} steps, got {len(raw_steps)}"])
    steps: dict[str, Step] = {}
    for name, raw in raw_steps.items():
        step = _step(name, raw, set(raw_steps), problems)
        if step is not None:
            steps[name] = step
    start = canonical.get("start")
    if not isinstance(start, str):
        problems.append("start: must name the first step")
    elif start not in raw_steps:
        problems.append(f"start: unknown step '{start}'")
    if problems:
        raise DefinitionError(problems)
    assert isinstance(start, str)
    predecessors: dict[str, list[str]] = {name: [] for name in steps}
    for name, step in steps.items():
        for successor in step.next:
            predecessors[successor].append(name)
    if predecessors[start]:
        problems.append(f"start: step '{start}' cannot have predecessors")
    order = _topological_order(steps, problems)
    reachable = _reachable(start, steps)
    problems += [
        f"steps.{name}: unreachable from start '{start}'" for name in steps if name not in reachable
    ]
    if problems:
        raise DefinitionError(problems)
    graph = Graph(start, steps, {k: tuple(v) for k, v in predecessors.items()}, order)
    for name, step in steps.items():
        allowed = graph.ancestors(name)
        problems += _check_refs(f"steps.{name}.payload", step.payload, allowed)
        if step.compensation is not None:
            # A compensation runs after its step completed: it may read the step itself too.
            problems += _check_refs(
                f"steps.{name}.compensation.payload",
                step.compensation.get("payload", {}),
                allowed | {name},
            )
    if problems:
        raise DefinitionError(problems)
    return graph


def _step(name: str, raw: Any, names: set[str], problems: list[str]) -> Step | None:
    path = f"steps.{name}"
    if not STEP_NAME.match(name):
        problems.append(f"{path}: a step name is a letter then letters, digits, _ or -")
        return None
    if not isinstance(raw, dict):
        problems.append(f"{path}: must be an object")
        return None
    problems += [f"{path}.{key}: unknown field" for key in sorted(set(raw) - STEP_KEYS)]
    task_type = raw.get("type")
    if task_type == TaskType.COMPENSATION:
        problems.append(f"{path}.type: COMPENSATION is for a step's compensation, not a step")
    else:
        step_timeout = raw.get("timeout_s")
        problems += _check_task(
            path,
            task_type,
            raw.get("payload", {}),
            timeout_s=step_timeout if isinstance(step_timeout, int) else None,
        )
    nxt = raw.get("next", [])
    successors: list[str] = []
    if isinstance(nxt, str):
        nxt = [nxt]
        single = True
    else:
        single = False
    if not isinstance(nxt, list) or not all(isinstance(n, str) for n in nxt):
        problems.append(f"{path}.next: must name a step or a list of steps")
    else:
        for index, successor in enumerate(nxt):
            where = f"{path}.next" if single else f"{path}.next[{index}]"
            if successor not in names:
                problems.append(f"{where}: unknown step '{successor}'")
            elif successor in successors:
                problems.append(f"{where}: step '{successor}' named twice")
            else:
                successors.append(successor)
    compensation = raw.get("compensation")
    if compensation is not None:
        if not isinstance(compensation, dict):
            problems.append(f"{path}.compensation: must be {{type, payload}}")
            compensation = None
        else:
            extra = sorted(set(compensation) - {"type", "payload", "max_retries"})
            problems += [f"{path}.compensation.{key}: unknown field" for key in extra]
            problems += _check_task(
                f"{path}.compensation", compensation.get("type"), compensation.get("payload", {})
            )
    for key, low, high in (
        ("max_retries", 0, MAX_RETRIES),
        ("timeout_s", 1, None),
        ("priority", 0, 9),
    ):
        value = raw.get(key)
        if value is None:
            continue
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < low
            or (high is not None and value > high)
        ):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            problems.append(f"{path}.{key}: must be an integer {bound}")
    if not isinstance(task_type, str):
        return None
    return Step(
        name=name,
        type=task_type,
        payload=raw.get("payload", {}),
        next=tuple(successors),
        compensation=compensation,
        max_retries=raw.get("max_retries"),
        timeout_s=raw.get("timeout_s"),
        priority=raw.get("priority"),
    )


def _check_task(path: str, task_type: Any, payload: Any, timeout_s: int | None = None) -> list[str]:
    if not isinstance(task_type, str):
        return [f"{path}.type: this field is required"]
    spec = registry.get(task_type)
    if spec is None:
        return [f"{path}.type: unknown task type '{task_type}'"]
    refs = set(_ref_paths(payload))
    problems = []
    if timeout_s is None:
        timeout_s = settings.QW_DEFAULT_TIMEOUT_S
    for where, message in spec.validate(_without_refs(payload), timeout_s=timeout_s):
        # A $ref's value is known only when the step starts; its schema is checked then.
        if any(where == ref or where.startswith((f"{ref}.", f"{ref}[")) for ref in refs):
            continue
        problems.append(f"{join_path(f'{path}.payload', where)}: {message}")
    return problems


def is_ref(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"$ref"}


def _walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, value
    if is_ref(value):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")


def _ref_paths(payload: Any) -> Iterator[str]:
    return (path for path, value in _walk(payload) if is_ref(value))


def _without_refs(value: Any) -> Any:
    """The payload with every ``$ref`` replaced by null (checked when the step starts)."""
    if is_ref(value):
        return None
    if isinstance(value, dict):
        return {key: _without_refs(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_refs(item) for item in value]
    return value


def _check_refs(path: str, payload: Any, allowed_steps: set[str]) -> list[str]:
    problems = []
    for where, value in _walk(payload):
        if not is_ref(value):
            continue
        at = f"{path}.{where}.$ref" if where else f"{path}.$ref"
        expression = value["$ref"]
        if not isinstance(expression, str) or not expression.strip():
            problems.append(f"{at}: must be a JMESPath expression")
            continue
        if len(expression) > MAX_REF_CHARS:
            problems.append(f"{at}: at most {MAX_REF_CHARS} characters, got {len(expression)}")
            continue
        try:
            ast = jmespath.compile(expression).parsed
            roots = list(referenced_roots(ast))
        except JMESPathError as exc:
            problems.append(f"{at}: invalid JMESPath: {str(exc).splitlines()[0]}")
            continue
        except RecursionError:
            problems.append(f"{at}: invalid JMESPath: nested too deeply")
            continue
        for kind, name in roots:
            if kind == "steps?":
                problems.append(f"{at}: name the step directly, as steps.<name>…")
            elif kind == "step" and name not in allowed_steps:
                problems.append(f"{at}: step '{name}' is not an ancestor of this step")
            elif kind == "root" and name not in ("input", "steps"):
                problems.append(f"{at}: may read only input or steps.<ancestor>, not '{name}'")
    return problems


# Node kinds whose first child reads the root and whose other children read its result.
_LEFT_ROOTED = frozenset(
    {
        "subexpression",
        "index_expression",
        "projection",
        "value_projection",
        "filter_projection",
        "flatten",
        "pipe",
    }
)


def referenced_roots(node: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """What an expression reads from the document root: ("root", name), ("step", name).

    ``steps.<name>…`` yields the step; a use of ``steps`` that does not name one directly
    (``steps.*``, ``keys(steps)``) yields ("steps?", "").
    """
    kind = node.get("type")
    children = node.get("children", [])
    if kind == "field":
        yield "root", node["value"]
        return
    if kind in _LEFT_ROOTED:
        head = children[0] if children else {}
        if head.get("type") == "field":
            yield "root", head["value"]
            if head["value"] == "steps":
                second = children[1] if len(children) > 1 else {}
                if kind == "subexpression" and second.get("type") == "field":
                    yield "step", second["value"]
                else:
                    yield "steps?", ""
            return
        if head:
            yield from referenced_roots(head)
        return
    if kind in ("current", "literal", "expref"):
        return
    for child in children:
        if isinstance(child, dict):
            yield from referenced_roots(child)


def _reachable(start: str, steps: dict[str, Step]) -> set[str]:
    seen = {start}
    queue = deque([start])
    while queue:
        for successor in steps[queue.popleft()].next:
            if successor not in seen:
                seen.add(successor)
                queue.append(successor)
    return seen


def _topological_order(steps: dict[str, Step], problems: list[str]) -> tuple[str, ...]:
    """Kahn's algorithm; a cycle is reported with the steps on it."""
    indegree = {name: 0 for name in steps}
    for step in steps.values():
        for successor in step.next:
            indegree[successor] += 1
    ready = deque(sorted(name for name, degree in indegree.items() if degree == 0))
    order: list[str] = []
    while ready:
        name = ready.popleft()
        order.append(name)
        for successor in steps[name].next:
            indegree[successor] -= 1
            if indegree[successor] == 0:
                ready.append(successor)
    if len(order) < len(steps):
        cyclic = sorted(name for name, degree in indegree.items() if degree > 0)
        problems.append(f"steps: cycle through {', '.join(cyclic)}")
    return tuple(order)


_TASK_SPEC = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"type": "string", "description": "A registered task type."},
        "payload": {"description": 'The type\'s payload; any value may be {"$ref": expr}.'},
    },
}

#: The definition's JSON Schema, published in the OpenAPI document.
JSON_SCHEMA: dict[str, Any] = {
    "title": "Workflow definition",
    "oneOf": [
        {
            "title": "Canonical form",
            "type": "object",
            "required": ["start", "steps"],
            "additionalProperties": False,
            "properties": {
                "start": {"type": "string", "description": "The first step."},
                "steps": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["type"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "payload": {
                                "description": "The type's payload; any value may be "
                                '{"$ref": "<JMESPath over {input, steps}>"}.'
                            },
                            "compensation": {**_TASK_SPEC, "description": "Undoes the step."},
                            "next": {
                                "description": "One step, or several (fan-out).",
                                "oneOf": [
                                    {"type": "string"},
                                    {"type": "array", "items": {"type": "string"}},
                                ],
                            },
                            "max_retries": {
                                "type": "integer",
                                "minimum": 0,
                                "maximum": MAX_RETRIES,
                            },
                            "timeout_s": {"type": "integer", "minimum": 1},
                            "priority": {"type": "integer", "minimum": 0, "maximum": 9},
                        },
                    },
                },
            },
        },
        {
            "title": "Legacy form (normalised on write)",
            "type": "object",
            "required": ["initialTask"],
            "additionalProperties": False,
            "properties": {
                "initialTask": _TASK_SPEC,
                "transitions": {
                    "type": "object",
                    "description": "The type of the task just completed → the next task.",
                    "additionalProperties": _TASK_SPEC,
                },
            },
        },
    ],
}
