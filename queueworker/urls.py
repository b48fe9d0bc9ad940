from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from queueworker import health, metrics_views

# The one module of the project package that names the apps: each brings its own routes.
urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("tasks_app.urls")),
    path("api/", include("workflows_app.urls")),
    path("api/health/", health.HealthView.as_view(), name="health"),
    path("api/health/live/", health.LiveView.as_view(), name="health-live"),
    path("api/health/ready/", health.ReadyView.as_view(), name="health-ready"),
    path("api/metrics/", metrics_views.MetricsView.as_view(), name="metrics"),
    path("metrics", metrics_views.prometheus_metrics, name="prometheus-metrics"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("api-auth/", include("rest_framework.urls")),
]

# JSON under /api/ (DRF's {"detail": …}), Django's own pages elsewhere.
handler400 = "queueworker.errors.bad_request"
handler403 = "queueworker.errors.permission_denied"
handler404 = "queueworker.errors.page_not_found"
handler500 = "queueworker.errors.server_error"
