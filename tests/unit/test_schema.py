"""The OpenAPI document describes every task type's payload (from the handler registry)."""

from __future__ import annotations

import pytest

from tasks_app.handlers import registry

pytestmark = pytest.mark.django_db


@pytest.fixture
def schema(client):
    response = client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    return response.json()


def test_every_registered_type_has_its_payload_schema(schema):
    components = schema["components"]["schemas"]
    for spec in registry:
        name = "".join(part.capitalize() for part in spec.type.split("_")) + "Payload"
        assert components[name]["properties"] == spec.schema["properties"], spec.type


def test_create_bodies_point_payload_at_the_type_schemas(schema):
    components = schema["components"]["schemas"]
    for body in ("TaskCreateInputRequest", "BulkItemInputRequest"):
        payload = components[body]["properties"]["payload"]
        refs = {ref["$ref"].rsplit("/", 1)[1] for ref in payload["anyOf"]}
        assert "NoopPayload" in refs
        assert "`NOOP` → `NoopPayload`" in payload["description"]
