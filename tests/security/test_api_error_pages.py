"""Every answer under /api/ is JSON, the errors Django answers itself included; the admin and
other pages keep Django's HTML pages."""

from __future__ import annotations

import pytest
from django.test import Client

from queueworker import health

pytestmark = pytest.mark.django_db


@pytest.fixture
def anonymous() -> Client:
    return Client(raise_request_exception=False)


@pytest.mark.parametrize(
    "path", ["/api/nope/", "/api/nope", "/api/tasks/00000000-0000-0000-0000-000000000000/nope/"]
)
def test_unknown_api_url_answers_json_404(anonymous, path):
    response = anonymous.get(path)

    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "Not found."}


def test_unknown_url_outside_the_api_keeps_the_html_page(anonymous):
    response = anonymous.get("/nope/")

    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_unhandled_exception_under_the_api_answers_json_500(anonymous, monkeypatch):
    def broken(self, request):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(health.LiveView, "get", broken)

    response = anonymous.get("/api/health/live/")

    assert response.status_code == 500
    assert response.json() == {"detail": "A server error occurred."}
    assert b"secret internals" not in response.content


def test_disallowed_host_under_the_api_answers_json_400(anonymous):
    response = anonymous.get("/api/health/live/", HTTP_HOST="attacker.example")

    assert response.status_code == 400
    assert response.json() == {"detail": "Bad request."}


def test_wrong_method_under_the_api_answers_json_405(anonymous):
    response = anonymous.post("/api/health/live/")

    assert response.status_code == 405
    assert response["Content-Type"] == "application/json"
