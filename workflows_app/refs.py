"""``$ref`` values: JMESPath over a run's context, bounded in work and in size.

An expression is short (``definition.MAX_REF_CHARS``), yet JMESPath can still make work grow
exponentially with its length: ``input.x | [@,@][] | [@,@][] …`` doubles a list at each
stage, ``[@,@]`` without the flatten doubles the JSON text while sharing the values, and
``==`` or ``to_string`` over such shared values walk every copy. So a step's payload is
resolved under one budget of ``WORK_PER_BYTE × QW_MAX_PAYLOAD_BYTES`` units:

1. Each node the interpreter visits costs one unit, and each value it returns costs its size
   (the length of a list, object or string).
2. Before a flatten merges its lists, their total length is charged; before a comparison or a
   function call, the size of the values it will walk (every nested value and every string's
   length, shared values once per appearance) is charged. So nothing is built, or walked,
   beyond what the budget already paid for.
3. The resolved payload, as compact UTF-8 JSON, must fit in ``QW_MAX_PAYLOAD_BYTES``, like a
   task created through the API (measured without encoding a text that cannot fit).

Any of these, and any error of the expression itself (``length(5)``), is a ``RefError``: the
step cannot start, and fails with that message.
"""

from __future__ import annotations

import json
from typing import Any

import jmespath
from django.conf import settings
from jmespath.exceptions import JMESPathError
from jmespath.visitor import TreeInterpreter, _is_comparable

from workflows_app import definition as definitions

#: Work units allowed per byte of the payload limit: room to read, filter and reshape inputs
#: about as large as a payload may be, while the worst case stays a few seconds of CPU.
WORK_PER_BYTE = 4


class RefError(Exception):
    """A payload's ``$ref`` could not be resolved within the bounds; the message says why."""


class _OverBudget(Exception):
    pass


def resolve(value: Any, ctx: dict[str, Any], *, path: str = "payload") -> Any:
    """``value`` with every ``{"$ref": expr}`` replaced by ``expr`` searched over ``ctx``.

    ``path`` names ``value`` in messages (``steps.ship.payload``). Raises ``RefError``.
    """
    limit: int = settings.QW_MAX_PAYLOAD_BYTES
    interpreter = _BoundedInterpreter(budget=WORK_PER_BYTE * limit)
    resolved = _resolve(value, ctx, interpreter, path)
    size = json_size(resolved, limit)
    if size > limit:
        raise RefError(
            f"{path}: over {limit} bytes once its $ref values are resolved (QW_MAX_PAYLOAD_BYTES)"
        )
    return resolved


def _resolve(value: Any, ctx: dict[str, Any], interpreter: _BoundedInterpreter, path: str) -> Any:
    if definitions.is_ref(value):
        expression = value["$ref"]
        try:
            return interpreter.visit(jmespath.compile(expression).parsed, ctx)
        except _OverBudget:
            raise RefError(
                f"{path}.$ref: stopped after {interpreter.budget} units of work "
                f"({WORK_PER_BYTE} per byte of QW_MAX_PAYLOAD_BYTES)"
            ) from None
        except JMESPathError as exc:
            raise RefError(f"{path}.$ref: {str(exc).splitlines()[0]}") from None
        except RecursionError:
            raise RefError(f"{path}.$ref: the expression is nested too deeply") from None
    if isinstance(value, dict):
        return {
            key: _resolve(item, ctx, interpreter, f"{path}.{key}") for key, item in value.items()
        }
    if isinstance(value, list):
        return [_resolve(item, ctx, interpreter, f"{path}[{i}]") for i, item in enumerate(value)]
    return value


def json_size(value: Any, limit: int) -> int:
    """The size in bytes of ``value`` as compact UTF-8 JSON, or a number over ``limit``.

    JSON text is never shorter than ``_weight`` (each value takes a byte at least, a string its
    characters), so a value whose text would be huge (shared sub-values repeat in it) is told
    apart by a walk that stops at ``limit``; only one that may fit is encoded.
    """
    weight = _weight(value, limit)
    if weight > limit:
        return weight
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), check_circular=False)
    return len(text.encode("utf-8"))


def _weight(value: Any, cap: int) -> int:
    """The number of values nested in ``value`` plus its strings' lengths, or a number over
    ``cap`` (the walk stops there)."""
    total = 0
    stack = [value]
    while stack and total <= cap:
        current = stack.pop()
        total += 1
        if isinstance(current, str):
            total += len(current)
        elif isinstance(current, dict):
            stack.extend(current.values())
            total += sum(len(key) for key in current)
        elif isinstance(current, list):
            stack.extend(current)
    return total


def _size(value: Any) -> int:
    return len(value) if isinstance(value, list | dict | str) else 0


class _BoundedInterpreter(TreeInterpreter):  # type: ignore[misc]
    """JMESPath's own tree interpreter, charging the work it does to a budget."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget
        self.left = budget

    def _charge(self, units: int) -> None:
        self.left -= units
        if self.left < 0:
            raise _OverBudget

    def _charge_walk(self, values: list[Any]) -> None:
        for value in values:
            if isinstance(value, list | dict | str):
                self._charge(_weight(value, self.left))

    def visit(self, node: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self._charge(1)
        result = super().visit(node, *args, **kwargs)
        self._charge(_size(result))
        return result

    def visit_flatten(self, node: dict[str, Any], value: Any) -> Any:
        base = self.visit(node["children"][0], value)
        if not isinstance(base, list):
            return None
        self._charge(sum(len(e) if isinstance(e, list) else 1 for e in base))
        merged: list[Any] = []
        for element in base:
            if isinstance(element, list):
                merged.extend(element)
            else:
                merged.append(element)
        return merged

    def visit_comparator(self, node: dict[str, Any], value: Any) -> Any:
        left = self.visit(node["children"][0], value)
        right = self.visit(node["children"][1], value)
        self._charge_walk([left, right])
        operator = node["value"]
        if operator not in self._EQUALITY_OPS and not (
            _is_comparable(left) and _is_comparable(right)
        ):
            return None  # ordering compares numbers only, as in JMESPath's own interpreter
        return self.COMPARATOR_FUNC[operator](left, right)

    def visit_function_expression(self, node: dict[str, Any], value: Any) -> Any:
        args = [self.visit(child, value) for child in node["children"]]
        self._charge_walk(args)
        return self._functions.call_function(node["value"], args)
