"""Workflow definitions: every invalid form is rejected with the JSON path at fault."""

from __future__ import annotations

import pytest

from workflows_app.definition import DefinitionError, normalise, validate


def _steps(**steps):
    return {"start": next(iter(steps)), "steps": steps}


def noop(**extra):
    return {"type": "NOOP", "payload": {}, **extra}


DIAMOND = {
    "start": "reserve",
    "steps": {
        "reserve": noop(next=["charge", "notify"], compensation={"type": "NOOP"}),
        "charge": noop(next="ship", payload={"result": {"$ref": "steps.reserve.result"}}),
        "notify": noop(next="ship"),
        "ship": noop(payload={"result": {"$ref": "[steps.charge.result, input.sku]"}}),
    },
}


def _problems(definition) -> list[str]:
    with pytest.raises(DefinitionError) as excinfo:
        validate(definition)
    return excinfo.value.problems


def test_diamond_validates_with_fan_out_and_fan_in():
    graph = validate(DIAMOND)

    assert graph.start == "reserve"
    assert graph.successors("reserve") == ("charge", "notify")
    assert set(graph.predecessors["ship"]) == {"charge", "notify"}
    assert graph.order[0] == "reserve" and graph.order[-1] == "ship"
    assert graph.ancestors("ship") == {"reserve", "charge", "notify"}


@pytest.mark.parametrize(
    ("definition", "expected"),
    [
        (_steps(a=noop(next=["ghost"])), "steps.a.next[0]: unknown step 'ghost'"),
        (_steps(a=noop(next="ghost")), "steps.a.next: unknown step 'ghost'"),
        ({"start": "nope", "steps": {"a": noop()}}, "start: unknown step 'nope'"),
        (_steps(a={"type": "NOPE"}), "steps.a.type: unknown task type 'NOPE'"),
        (_steps(a={"payload": {}}), "steps.a.type: this field is required"),
        (_steps(a=noop(payload={"sleep_ms": -1})), "steps.a.payload.sleep_ms: "),
        (_steps(a=noop(payload={"bogus": 1})), "steps.a.payload.bogus: unknown field"),
        (_steps(a=noop(colour="red")), "steps.a.colour: unknown field"),
        (_steps(a=noop(max_retries=-1)), "steps.a.max_retries: must be an integer from 0"),
        (
            _steps(a=noop(compensation={"type": "NOPE"})),
            "steps.a.compensation.type: unknown task type 'NOPE'",
        ),
        (_steps(a=noop(next="b"), b=noop(next="a")), "start: step 'a' cannot have predecessors"),
        (_steps(a=noop(next="b"), b=noop(next="c"), c=noop(next="b")), "steps: cycle through b, c"),
        (_steps(a=noop(), b=noop()), "steps.b: unreachable from start 'a'"),
        (
            _steps(
                a=noop(next=["b", "c"]),
                b=noop(),
                c=noop(payload={"result": {"$ref": "steps.b.result"}}),
            ),
            "steps.c.payload.result.$ref: step 'b' is not an ancestor of this step",
        ),
        (
            _steps(a=noop(next="b"), b=noop(payload={"result": {"$ref": "steps.a.[[["}})),
            "steps.b.payload.result.$ref: invalid JMESPath",
        ),
        (
            _steps(a=noop(payload={"result": {"$ref": "secrets.key"}})),
            "steps.a.payload.result.$ref: may read only input or steps.<ancestor>, not 'secrets'",
        ),
        (
            _steps(a=noop(next="b"), b=noop(payload={"result": {"$ref": "steps.*.result"}})),
            "steps.b.payload.result.$ref: name the step directly",
        ),
        ({"steps": {}}, "steps: must be a non-empty object of named steps"),
        ({"start": "a", "steps": {"a": noop()}, "extra": 1}, "extra: unknown field"),
        (_steps(**{"bad name": noop()}), "steps.bad name: a step name is"),
    ],
)
def test_invalid_definition_names_the_path(definition, expected):
    problems = _problems(definition)
    assert any(problem.startswith(expected) for problem in problems), problems


def test_ref_to_an_ancestor_through_a_function_or_filter_is_allowed():
    definition = _steps(
        a=noop(next="b"),
        b=noop(payload={"result": {"$ref": "length(steps.a.result.items[?n > `1`])"}}),
    )
    assert validate(definition).ancestors("b") == {"a"}


def test_compensation_may_read_its_own_step():
    definition = _steps(
        a=noop(compensation={"type": "NOOP", "payload": {"result": {"$ref": "steps.a.result"}}})
    )
    validate(definition)


def test_ref_values_skip_the_type_check_until_the_step_starts():
    # sleep_ms must be an integer, but a $ref is resolved (and checked) only at start
    validate(_steps(a=noop(payload={"sleep_ms": {"$ref": "input.delay"}})))


def test_every_problem_is_reported_at_once():
    problems = _problems(_steps(a=noop(next="ghost", colour=1), b={"type": "NOPE"}))
    assert len(problems) >= 3


def test_legacy_form_normalises_to_a_chain():
    legacy = {
        "initialTask": {"type": "NOOP", "payload": {"result": 1}},
        "transitions": {"NOOP": {"type": "COMPENSATION_TEST", "payload": {}}},
    }
    # the chain follows types: NOOP → COMPENSATION_TEST (unknown here, so validation fails)
    assert _problems(legacy) == ["steps.step2.type: unknown task type 'COMPENSATION_TEST'"]
    chain = normalise({"initialTask": {"type": "NOOP", "payload": {"result": 1}}})
    assert chain == {
        "start": "step1",
        "steps": {"step1": {"type": "NOOP", "payload": {"result": 1}}},
    }


def test_legacy_cycle_and_unreachable_transitions_rejected():
    cyc = {"initialTask": {"type": "NOOP"}, "transitions": {"NOOP": {"type": "NOOP"}}}
    assert _problems(cyc) == ["transitions.NOOP: cycle back to type NOOP"]
    stray = {"initialTask": {"type": "NOOP"}, "transitions": {"OTHER": {"type": "NOOP"}}}
    assert _problems(stray) == ["transitions.OTHER: unreachable from initialTask"]


def test_ref_longer_than_the_cap_is_rejected_with_its_path():
    expression = "input.x" + " | [@,@][]" * 100  # 1,007 characters

    problems = _problems(_steps(a=noop(payload={"result": {"$ref": expression}})))

    assert problems == [
        f"steps.a.payload.result.$ref: at most 1000 characters, got {len(expression)}"
    ]


def test_ref_nested_too_deeply_for_the_parser_is_rejected_not_raised():
    expression = "(" * 495 + "input" + ")" * 495  # under the cap, over Python's recursion limit

    problems = _problems(_steps(a=noop(payload={"$ref": expression})))

    assert problems == ["steps.a.payload.$ref: invalid JMESPath: nested too deeply"]
