"""The workflows API: validated definitions, versions on change, owner scoping."""

from __future__ import annotations

import time

import pytest

from workflows_app.models import Workflow, WorkflowVersion

pytestmark = pytest.mark.django_db

DEFINITION = {
    "start": "a",
    "steps": {"a": {"type": "NOOP", "payload": {}, "next": "b"}, "b": {"type": "NOOP"}},
}


def _create(api, **overrides):
    body = {"name": "order", "definition": DEFINITION, **overrides}
    return api.post("/api/workflows/", body, format="json")


def test_create_returns_version_1_with_the_canonical_definition(api):
    response = _create(api, input_schema={"type": "object", "required": ["sku"]})

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["version"] == 1 and body["is_active"] is True
    assert body["definition"] == DEFINITION
    assert body["input_schema"] == {"type": "object", "required": ["sku"]}
    assert response["Location"] == f"/api/workflows/{body['id']}/"


def test_invalid_definition_is_a_400_naming_the_path_and_writes_nothing(api):
    bad = {"start": "a", "steps": {"a": {"type": "NOOP", "next": ["ghost"]}}}

    response = _create(api, definition=bad)

    assert response.status_code == 400
    assert response.json() == {"definition": ["steps.a.next[0]: unknown step 'ghost'"]}
    assert Workflow.objects.count() == 0 and WorkflowVersion.objects.count() == 0


def test_invalid_input_schema_is_a_400(api):
    response = _create(api, input_schema={"type": "nonsense"})
    assert response.status_code == 400
    assert "input_schema" in response.json()


def test_legacy_definition_is_stored_normalised(api):
    legacy = {"initialTask": {"type": "NOOP", "payload": {"result": 1}}}
    body = _create(api, definition=legacy).json()
    assert body["definition"] == {
        "start": "step1",
        "steps": {"step1": {"type": "NOOP", "payload": {"result": 1}}},
    }


def test_patch_of_definition_adds_a_version_and_keeps_the_old_one(api):
    workflow_id = _create(api).json()["id"]
    changed = {"start": "a", "steps": {"a": {"type": "NOOP", "payload": {"result": 2}}}}

    response = api.patch(f"/api/workflows/{workflow_id}/", {"definition": changed}, format="json")

    assert response.status_code == 200
    assert response.json()["version"] == 2 and response.json()["definition"] == changed
    versions = api.get(f"/api/workflows/{workflow_id}/versions/").json()
    assert [v["version"] for v in versions] == [2, 1]
    assert versions[1]["definition"] == DEFINITION


def test_patch_of_name_or_activity_adds_no_version(api):
    workflow_id = _create(api).json()["id"]

    body = api.patch(
        f"/api/workflows/{workflow_id}/", {"is_active": False, "name": "renamed"}, format="json"
    ).json()

    assert body["version"] == 1 and body["is_active"] is False and body["name"] == "renamed"


def test_patch_with_the_same_definition_adds_no_version(api):
    workflow_id = _create(api).json()["id"]
    body = api.patch(
        f"/api/workflows/{workflow_id}/", {"definition": DEFINITION}, format="json"
    ).json()
    assert body["version"] == 1


def test_invalid_patch_changes_nothing(api):
    workflow_id = _create(api).json()["id"]

    response = api.patch(
        f"/api/workflows/{workflow_id}/",
        {"name": "x", "definition": {"start": "zz", "steps": {}}},
        format="json",
    )

    assert response.status_code == 400
    assert Workflow.objects.get(pk=workflow_id).name == "order"
    assert WorkflowVersion.objects.filter(workflow_id=workflow_id).count() == 1


def test_duplicate_name_for_the_same_owner_is_a_409(api):
    _create(api)
    response = _create(api)
    assert response.status_code == 409 and "name" in response.json()


def test_another_users_workflow_is_a_404(api, client_for):
    from tests.factories import UserFactory

    workflow_id = _create(api).json()["id"]
    other = client_for(UserFactory())

    assert other.get(f"/api/workflows/{workflow_id}/").status_code == 404
    assert (
        other.patch(f"/api/workflows/{workflow_id}/", {"name": "x"}, format="json").status_code
        == 404
    )
    assert other.delete(f"/api/workflows/{workflow_id}/").status_code == 404
    assert other.get("/api/workflows/").json()["results"] == []


def test_list_delete_and_unknown_fields(api):
    workflow_id = _create(api).json()["id"]
    assert [w["id"] for w in api.get("/api/workflows/").json()["results"]] == [workflow_id]
    assert _create(api, name="x", colour=1).json() == {"colour": ["Unknown field."]}

    assert api.delete(f"/api/workflows/{workflow_id}/").status_code == 204
    assert Workflow.objects.count() == 0


def test_schema_documents_the_definition(client):
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    definition = schema["components"]["schemas"]["WorkflowCreateInputRequest"]["properties"][
        "definition"
    ]
    titles = [option["title"] for option in definition["oneOf"]]
    assert titles == ["Canonical form", "Legacy form (normalised on write)"]


@pytest.fixture
def no_broker(monkeypatch):
    from tasks_app import dispatch

    monkeypatch.setattr(dispatch, "publish", lambda wakeups: len(wakeups))


def test_run_start_shows_steps_in_graph_order(api, no_broker):
    workflow_id = _create(api).json()["id"]

    response = api.post(
        f"/api/workflows/{workflow_id}/runs/", {"input": {"sku": "A"}}, format="json"
    )

    assert response.status_code == 201, response.content
    run = response.json()
    assert response["Location"] == f"/api/workflow-runs/{run['id']}/"
    assert run["status"] == "RUNNING" and run["version"] == 1 and run["input"] == {"sku": "A"}
    assert [(s["name"], s["status"]) for s in run["steps"]] == [("a", "PENDING"), ("b", None)]
    assert run["steps"][0]["wait_reason"] is None
    assert run["steps"][1]["wait_reason"] == {
        "code": "waiting_for_predecessors",
        "detail": "Starts once a completed.",
    }
    assert run["compensations"] == []
    tasks = api.get(f"/api/tasks/?workflow_run={run['id']}").json()["results"]
    assert [t["id"] for t in tasks] == [run["steps"][0]["task"]]


def test_run_of_an_inactive_workflow_is_a_409_and_bad_input_a_400(api, no_broker):
    schema = {"type": "object", "required": ["sku"]}
    workflow_id = _create(api, input_schema=schema).json()["id"]

    bad = api.post(f"/api/workflows/{workflow_id}/runs/", {"input": {}}, format="json")
    api.patch(f"/api/workflows/{workflow_id}/", {"is_active": False}, format="json")
    inactive = api.post(f"/api/workflows/{workflow_id}/runs/", {"input": {"sku": 1}}, format="json")

    assert bad.status_code == 400 and bad.json() == {"input": ['"sku" is a required property']}
    assert inactive.status_code == 409
    assert api.get("/api/workflow-runs/").json()["results"] == []


def test_runs_are_listed_filtered_cancelled_and_scoped(api, client_for, no_broker):
    from tests.factories import UserFactory

    workflow_id = _create(api).json()["id"]
    run_id = api.post(f"/api/workflows/{workflow_id}/runs/", {}, format="json").json()["id"]

    listed = api.get(f"/api/workflow-runs/?workflow={workflow_id}&status=RUNNING").json()
    cancelled = api.post(f"/api/workflow-runs/{run_id}/cancel/")
    again = api.post(f"/api/workflow-runs/{run_id}/cancel/")
    retry = api.post(f"/api/workflow-runs/{run_id}/retry/")
    other = client_for(UserFactory())

    assert [r["id"] for r in listed["results"]] == [run_id]
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "CANCELLED"
    assert again.status_code == 409 and retry.status_code == 409
    assert other.get(f"/api/workflow-runs/{run_id}/").status_code == 404
    assert other.post(f"/api/workflow-runs/{run_id}/cancel/").status_code == 404


# --- input_schema patterns ---------------------------------------------------------------------

NESTED_QUANTIFIER = "^(\\w+\\s?)*$"  # exponential on a backtracking engine


def test_run_input_against_a_backtracking_pattern_answers_within_a_second(api, no_broker):
    # given a pattern that a backtracking engine needs ~2**40 steps to reject on this input
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "pattern": NESTED_QUANTIFIER}},
    }
    workflow_id = _create(api, input_schema=schema).json()["id"]

    # when
    started = time.monotonic()
    response = api.post(
        f"/api/workflows/{workflow_id}/runs/", {"input": {"name": "a" * 39 + "!"}}, format="json"
    )
    elapsed = time.monotonic() - started

    # then the input is refused with its path, in linear time
    assert response.status_code == 400
    assert response.json()["input"][0].startswith("name: ")
    assert elapsed < 1.0
    ok = api.post(
        f"/api/workflows/{workflow_id}/runs/", {"input": {"name": "a b c"}}, format="json"
    )
    assert ok.status_code == 201, ok.content


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        pytest.param(
            {"properties": {"name": {"type": "string", "pattern": "^(?=a)\\w+$"}}},
            'properties.name.pattern: "^(?=a)\\\\w+$" is not a supported regular expression',
            id="look-ahead",
        ),
        pytest.param(
            {"properties": {"name": {"pattern": "^(a)\\1$"}}},
            'properties.name.pattern: "^(a)\\\\1$" is not a supported regular expression',
            id="backreference",
        ),
        pytest.param(
            {"patternProperties": {"(?<!x)y": {}}},
            'patternProperties.(?<!x)y: "(?<!x)y" is not a supported regular expression',
            id="pattern-properties",
        ),
    ],
)
def test_input_schema_pattern_the_linear_engine_cannot_run_is_a_400_with_its_path(
    api, schema, problem
):
    response = _create(api, input_schema=schema)

    assert response.status_code == 400
    (message,) = response.json()["input_schema"]
    assert message.startswith(problem), message
    assert Workflow.objects.count() == 0


def test_input_schema_with_a_remote_ref_is_refused_without_fetching_it(api):
    response = _create(api, input_schema={"$ref": "http://127.0.0.1:9/schema.json"})

    assert response.status_code == 400
    assert "Retrieval is disabled" in response.json()["input_schema"][0]
