"""QueueWorker settings, read from the environment (every name is in docs/configuration.md).

With nothing set, the service runs on an embedded default that needs no server: SQLite in WAL
mode and kombu's ``filesystem://`` transport under ``var/``. ``DATABASE_URL`` and
``CELERY_BROKER_URL`` switch it to PostgreSQL and RabbitMQ.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import environ
from django.core.exceptions import ImproperlyConfigured
from kombu.utils.url import maybe_sanitize_url

from queueworker import messaging
from queueworker.config import Env, local_secret_key

BASE_DIR = Path(__file__).resolve().parent.parent
env = Env()

VAR_DIR = Path(env.str("QW_VAR_DIR", str(BASE_DIR / "var")))

# --- Django core -------------------------------------------------------------------------------
DEBUG = env.bool("DJANGO_DEBUG", False)
# Required wherever the service is deployed. Only the embedded demo (no DATABASE_URL) and DEBUG
# development make one of their own, once per installation, in QW_VAR_DIR: none is public.
SECRET_KEY = env.str("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG and env.str("DATABASE_URL", ""):
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set (nor DJANGO_SECRET_KEY_FILE). Set it to a long random "
            "value, e.g. from: python3 -c 'import secrets; print(secrets.token_urlsafe(50))'"
        )
    SECRET_KEY = local_secret_key(VAR_DIR / "secret-key")
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", [])
# Behind a proxy that terminates TLS (an ingress, a load balancer) and sets X-Forwarded-Proto on
# every request: https for request.is_secure(), CSRF checks and absolute URLs (pagination links).
if env.bool("DJANGO_TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# HTTPS, where the site is served over TLS (`check --deploy` wants each of these on). Off by
# default, so that `make run` answers on http://127.0.0.1; the prod overlay turns them on.
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", False)
# Probes and Prometheus speak plain HTTP to the process itself, inside the pod or host.
SECURE_REDIRECT_EXEMPT = [r"^api/health/", r"^metrics$"]
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env.bool("DJANGO_SECURE_HSTS_PRELOAD", False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", False)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files, so that /api/docs/ needs no CDN
    "django_celery_beat",
    "django_celery_results",
    "tasks_app",
    "workflows_app",
]

MIDDLEWARE = [
    # First, so that every response (a 413 too) and every log line of the request has its id.
    "queueworker.middleware.RequestIdMiddleware",
    "queueworker.middleware.BodySizeLimitMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "queueworker.urls"
WSGI_APPLICATION = "queueworker.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ----------------------------------------------------------------------------------
EMBEDDED_DATABASE_URL = f"sqlite:///{VAR_DIR / 'queueworker.sqlite3'}"
DATABASE_URL = env.str("DATABASE_URL", EMBEDDED_DATABASE_URL)
try:
    _db: dict[str, Any] = environ.Env.db_url_config(DATABASE_URL)
except Exception as exc:  # django-environ raises several types for a malformed URL
    raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from exc
if _db["ENGINE"] == "django.db.backends.sqlite3":
    if _db["NAME"] != ":memory:":
        Path(_db["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    _db.setdefault("OPTIONS", {}).update(
        {
            # Web, worker and beat share one file: WAL lets readers run beside the writer and
            # IMMEDIATE transactions queue writers instead of failing with "database is locked".
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
        }
    )
elif _db["ENGINE"] in ("django.db.backends.postgresql", "django.db.backends.postgresql_psycopg2"):
    _db["ENGINE"] = "django.db.backends.postgresql"
    _db.setdefault("OPTIONS", {}).setdefault("connect_timeout", 5)
    # Server-side binding lets psycopg prepare statements that repeat (the claim and the
    # completion run once per task): PostgreSQL then skips parsing and planning them.
    _db["OPTIONS"].setdefault("server_side_binding", env.bool("QW_DB_SERVER_SIDE_BINDING", True))
    # Django turns psycopg's automatic preparation off; prepare a statement after it ran this
    # many times (0: never, for a transaction-pooling proxy that cannot keep them).
    _prepare = env.int("QW_DB_PREPARE_THRESHOLD", 5, minimum=0)
    _db["OPTIONS"].setdefault("prepare_threshold", _prepare or None)
    _db["CONN_MAX_AGE"] = env.int("QW_DB_CONN_MAX_AGE", 600, minimum=0)
else:
    raise ImproperlyConfigured(
        f"DATABASE_URL must point at PostgreSQL or SQLite, got engine {_db['ENGINE']!r}"
    )
_db["CONN_HEALTH_CHECKS"] = True
DATABASES = {"default": _db}
IS_POSTGRES = _db["ENGINE"] == "django.db.backends.postgresql"
# A PostgreSQL read replica for the read-only API (queueworker.db_router); everything else,
# migrations included, stays on the primary.
DATABASE_REPLICA_URL = env.str("DATABASE_REPLICA_URL", "")
if DATABASE_REPLICA_URL:
    try:
        _replica: dict[str, Any] = environ.Env.db_url_config(DATABASE_REPLICA_URL)
    except Exception as exc:
        raise ImproperlyConfigured(f"DATABASE_REPLICA_URL is not a valid URL: {exc}") from exc
    if not IS_POSTGRES or _replica["ENGINE"] not in (
        "django.db.backends.postgresql",
        "django.db.backends.postgresql_psycopg2",
    ):
        raise ImproperlyConfigured("DATABASE_REPLICA_URL and DATABASE_URL must be PostgreSQL")
    _replica["ENGINE"] = "django.db.backends.postgresql"
    _replica.setdefault("OPTIONS", {})
    for _option in ("connect_timeout", "server_side_binding", "prepare_threshold"):
        _replica["OPTIONS"].setdefault(_option, _db["OPTIONS"][_option])
    _replica.update(
        CONN_MAX_AGE=_db["CONN_MAX_AGE"], CONN_HEALTH_CHECKS=True, TEST={"MIRROR": "default"}
    )
    DATABASES["replica"] = _replica
    DATABASE_ROUTERS = ["queueworker.db_router.PrimaryReplicaRouter"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Cache -------------------------------------------------------------------------------------
# Shared by every process, so that the API throttles count across web processes: by default
# Django's database cache, in the table `manage.py createcachetable` makes (`make migrate`, the
# image's `migrate` and the migration Job run it); any django-environ cache URL instead
# (`redis://host:6379/0`). A process-local cache (`locmemcache://`) would count per process.
# Django's database cache culls a third of its rows past MAX_ENTRIES (300 unless set), which
# would forget throttle histories past 300 active users.
CACHE_URL = env.str("CACHE_URL", "dbcache://qw_cache?max_entries=100000")
try:
    CACHES: dict[str, Any] = {"default": environ.Env.cache_url_config(CACHE_URL)}
except Exception as exc:  # django-environ raises several types for a malformed URL
    raise ImproperlyConfigured(f"CACHE_URL is not a valid cache URL: {exc}") from exc

# --- I18N, static ------------------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
# Artifacts (DATA_PROCESSING's large inputs and outputs) go through Django's storage API: a local
# folder by default; S3 and others by naming a django-storages backend and its options.
QW_ARTIFACT_ROOT = Path(env.str("QW_ARTIFACT_ROOT", str(VAR_DIR / "artifacts")))
QW_ARTIFACT_TTL_DAYS = env.int("QW_ARTIFACT_TTL_DAYS", 7, minimum=1)
QW_ARTIFACT_STORAGE = env.str("QW_ARTIFACT_STORAGE", "django.core.files.storage.FileSystemStorage")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
    "artifacts": {
        "BACKEND": QW_ARTIFACT_STORAGE,
        "OPTIONS": (
            {"location": str(QW_ARTIFACT_ROOT)}
            if QW_ARTIFACT_STORAGE.endswith("FileSystemStorage")
            else env.json("QW_ARTIFACT_STORAGE_OPTIONS", {})
        ),
    },
}
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# --- QueueWorker -------------------------------------------------------------------------------
QW_MAX_PAYLOAD_BYTES = env.int("QW_MAX_PAYLOAD_BYTES", 1024 * 1024, minimum=1024)
QW_BULK_MAX = env.int("QW_BULK_MAX", 1000, minimum=1, maximum=100_000)
QW_DEFAULT_MAX_RETRIES = env.int("QW_DEFAULT_MAX_RETRIES", 3, minimum=0, maximum=100)
QW_MAX_RETRIES_LIMIT = env.int("QW_MAX_RETRIES_LIMIT", 25, minimum=0, maximum=1000)
QW_DEFAULT_TIMEOUT_S = env.int("QW_DEFAULT_TIMEOUT_S", 300, minimum=1)
QW_MAX_TIMEOUT_S = env.int("QW_MAX_TIMEOUT_S", 1500, minimum=1)
QW_LEASE_SECONDS = env.int("QW_LEASE_SECONDS", 30, minimum=1)
QW_BACKOFF_BASE_S = env.float("QW_BACKOFF_BASE_S", 2.0, minimum=0.0)
QW_BACKOFF_CAP_S = env.float("QW_BACKOFF_CAP_S", 600.0, minimum=0.0)
# Work queues: classic (with priorities) or quorum (replicated; no priorities on RabbitMQ 3.x).
QW_QUEUE_TYPE = env.choice("QW_QUEUE_TYPE", messaging.CLASSIC, messaging.QUEUE_TYPES)
QW_QUEUE_DELIVERY_LIMIT = env.int(
    "QW_QUEUE_DELIVERY_LIMIT", messaging.DEFAULT_DELIVERY_LIMIT, minimum=1
)
# Celery's prefetch is static on quorum queues, so a countdown held in a worker would block one
# of its slots: there, backoffs wait in PostgreSQL and the dispatcher publishes them when due.
QW_ETA_MAX_SECONDS = env.int(
    "QW_ETA_MAX_SECONDS", 0 if QW_QUEUE_TYPE == messaging.QUORUM else 60, minimum=0, maximum=600
)
QW_REDISPATCH_SECONDS = env.int("QW_REDISPATCH_SECONDS", 300, minimum=1)
# A waiting task's message counts as lost after this long when its queue holds no ready message.
QW_LOST_MESSAGE_GRACE_S = env.float("QW_LOST_MESSAGE_GRACE_S", 10.0, minimum=1.0)
QW_DISPATCH_INTERVAL_S = env.float("QW_DISPATCH_INTERVAL_S", 1.0, minimum=0.05)
QW_SWEEP_INTERVAL_S = env.float("QW_SWEEP_INTERVAL_S", 5.0, minimum=0.1)
QW_PUBLISH_TIMEOUT_S = env.float("QW_PUBLISH_TIMEOUT_S", 1.0, minimum=0.1, maximum=10.0)
# Wake-ups of one type, queue, priority and delay share a message, up to this many ids
# (1: one message per task). Single creates always send one message of their own.
QW_MESSAGE_MAX_TASKS = env.int("QW_MESSAGE_MAX_TASKS", 100, minimum=1, maximum=500)
QW_IDEMPOTENCY_TTL_HOURS = env.int("QW_IDEMPOTENCY_TTL_HOURS", 24, minimum=1)
QW_THROTTLE_CREATE = env.rate("QW_THROTTLE_CREATE", None)
QW_MAX_SCHEDULES_PER_USER = env.int("QW_MAX_SCHEDULES_PER_USER", 100, minimum=1)
QW_WORKER_SYNC_COMMIT = env.bool("QW_WORKER_SYNC_COMMIT", False)
# A message that wakes several tasks (tasks_app.worker.run_batch): claimed in sub-batches of at
# most QW_WORKER_CLAIM_MAX, completions written together every QW_WORKER_FLUSH_MS or
# QW_WORKER_FLUSH_TASKS, ids not claimed within QW_WORKER_BATCH_BUDGET_S published again.
QW_WORKER_BATCH_BUDGET_S = env.float("QW_WORKER_BATCH_BUDGET_S", 5.0, minimum=0.1, maximum=60.0)
QW_WORKER_CLAIM_MAX = env.int("QW_WORKER_CLAIM_MAX", 100, minimum=1, maximum=500)
QW_WORKER_FLUSH_MS = env.int("QW_WORKER_FLUSH_MS", 20, minimum=1, maximum=1000)
QW_WORKER_FLUSH_TASKS = env.int("QW_WORKER_FLUSH_TASKS", 100, minimum=1, maximum=500)
# DATA_PROCESSING (tasks_app/handlers/data_processing.py).
QW_DATA_BATCH_SIZE = env.int("QW_DATA_BATCH_SIZE", 100_000, minimum=1, maximum=1_000_000)
QW_DATA_MAX_SOURCE_BYTES = env.int("QW_DATA_MAX_SOURCE_BYTES", 1024**3, minimum=1024)
QW_DATA_MAX_COMPRESSION_RATIO = env.int("QW_DATA_MAX_COMPRESSION_RATIO", 100, minimum=0)
QW_DATA_MAX_BATCHES = env.int("QW_DATA_MAX_BATCHES", 1000, minimum=1)
QW_DATA_INLINE_MAX_BYTES = env.int("QW_DATA_INLINE_MAX_BYTES", 1024 * 1024, minimum=1024)
QW_ARTIFACT_QUOTA_BYTES = env.int("QW_ARTIFACT_QUOTA_BYTES", 10 * 1024**3, minimum=0)
QW_QUEUE_OVERLOAD_THRESHOLD = env.int("QW_QUEUE_OVERLOAD_THRESHOLD", 10_000, minimum=1)
# RabbitMQ's management API (http://user:password@host:15672): the only source of unacked counts.
QW_RABBITMQ_MANAGEMENT_URL = env.str("QW_RABBITMQ_MANAGEMENT_URL", "")
QW_HEALTH_TIMEOUT_S = env.float("QW_HEALTH_TIMEOUT_S", 2.5, minimum=0.1, maximum=10.0)
# A process answers /api/health/… from its last run of the checks for this long (0: every time).
QW_HEALTH_CACHE_S = env.float("QW_HEALTH_CACHE_S", 2.0, minimum=0.0, maximum=60.0)
# /metrics needs "Authorization: Bearer <token>" when set; open when empty (docs/api.md).
QW_METRICS_TOKEN = env.str("QW_METRICS_TOKEN", "")
QW_HANDLER_MODULES = env.list("QW_HANDLER_MODULES", [])
QW_TYPE_ROUTES = messaging.parse_type_routes(env.list("QW_TYPE_ROUTES", []))
if QW_MAX_TIMEOUT_S + QW_LEASE_SECONDS >= 1800:
    raise ImproperlyConfigured(
        "QW_MAX_TIMEOUT_S + QW_LEASE_SECONDS must stay below RabbitMQ's 30-minute consumer "
        f"timeout, got {QW_MAX_TIMEOUT_S} + {QW_LEASE_SECONDS}"
    )
if QW_DEFAULT_TIMEOUT_S > QW_MAX_TIMEOUT_S:
    raise ImproperlyConfigured("QW_DEFAULT_TIMEOUT_S must not exceed QW_MAX_TIMEOUT_S")

# HTTP_REQUEST (docs/task-types.md): destinations the SSRF guard lets through although
# private or loopback, as host or host:port. Empty: only public addresses.
# Parsed by the HTTP guard when the tasks app is ready: a malformed entry stops every process.
QW_HTTP_ALLOWED_HOSTS = env.list("QW_HTTP_ALLOWED_HOSTS", [])
QW_HTTP_TIMEOUT_S = env.float("QW_HTTP_TIMEOUT_S", 30.0, minimum=0.001)
QW_HTTP_MAX_TIMEOUT_S = env.float("QW_HTTP_MAX_TIMEOUT_S", 300.0, minimum=0.001)
QW_HTTP_RESPONSE_BYTES = env.int("QW_HTTP_RESPONSE_BYTES", 1024 * 1024, minimum=0)
QW_HTTP_MAX_RESPONSE_BYTES = env.int("QW_HTTP_MAX_RESPONSE_BYTES", 10 * 1024 * 1024, minimum=0)
QW_HTTP_MAX_REDIRECTS = env.int("QW_HTTP_MAX_REDIRECTS", 5, minimum=0, maximum=30)
# HTTP_REQUEST tasks of one message run this many at a time in each worker process's thread
# pool (tasks_app.concurrent); 1 runs them one after another on the message's own thread.
QW_HTTP_CONCURRENCY = env.int("QW_HTTP_CONCURRENCY", 16, minimum=1, maximum=256)
if not QW_HTTP_TIMEOUT_S <= QW_HTTP_MAX_TIMEOUT_S <= QW_MAX_TIMEOUT_S:
    raise ImproperlyConfigured(
        "QW_HTTP_TIMEOUT_S <= QW_HTTP_MAX_TIMEOUT_S <= QW_MAX_TIMEOUT_S must hold, got "
        f"{QW_HTTP_TIMEOUT_S}, {QW_HTTP_MAX_TIMEOUT_S}, {QW_MAX_TIMEOUT_S}"
    )
if QW_HTTP_RESPONSE_BYTES > QW_HTTP_MAX_RESPONSE_BYTES:
    raise ImproperlyConfigured("QW_HTTP_RESPONSE_BYTES must not exceed QW_HTTP_MAX_RESPONSE_BYTES")

# Django rejects bodies above this before they are parsed; the middleware answers JSON 413.
DATA_UPLOAD_MAX_MEMORY_SIZE = QW_MAX_PAYLOAD_BYTES

# --- Celery ------------------------------------------------------------------------------------
EMBEDDED_BROKER_URL = "filesystem://localhost//"
# One URL, or a RabbitMQ cluster's nodes as a ";"-separated failover list (kombu tries each).
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", EMBEDDED_BROKER_URL)
_broker_schemes = {urlsplit(url).scheme for url in messaging.broker_urls(CELERY_BROKER_URL)}
IS_EMBEDDED_BROKER = _broker_schemes == {"filesystem"}
IS_BROKER_TLS = _broker_schemes == {"amqps"}
if any(c.isspace() for c in CELERY_BROKER_URL):
    # Celery reads the variable itself, unstripped: a space would become part of a host name.
    raise ImproperlyConfigured("CELERY_BROKER_URL must not contain spaces (separate URLs by ;)")
if IS_EMBEDDED_BROKER:
    _broker_dir = VAR_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, Any] = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
        "polling_interval": 0.1,
    }
elif IS_BROKER_TLS or (_broker_schemes and _broker_schemes <= {"amqp", "pyamqp"}):
    CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True, "max_retries": 1}
else:
    raise ImproperlyConfigured(
        "CELERY_BROKER_URL must be amqp:// or amqps:// URLs of RabbitMQ (several separated by ;, "
        "all with TLS or none) or filesystem://, got "
        f"{';'.join(maybe_sanitize_url(u) for u in messaging.broker_urls(CELERY_BROKER_URL))!r}"
    )
# TLS (amqps://): the server's certificate is checked against the system's CAs, or the bundle in
# QW_BROKER_SSL_CA, and its name against the host of the URL in use; QW_BROKER_SSL_CERT and
# QW_BROKER_SSL_KEY give a client certificate (mutual TLS, or RabbitMQ's EXTERNAL login).
_broker_tls_files = {
    name: env.str(name, "")
    for name in ("QW_BROKER_SSL_CA", "QW_BROKER_SSL_CERT", "QW_BROKER_SSL_KEY")
}
for _name, _path in _broker_tls_files.items():
    if _path and not IS_BROKER_TLS:
        raise ImproperlyConfigured(f"{_name} needs amqps:// in CELERY_BROKER_URL")
    if _path and not Path(_path).is_file():
        raise ImproperlyConfigured(f"{_name}: no such file {_path!r}")
if _broker_tls_files["QW_BROKER_SSL_KEY"] and not _broker_tls_files["QW_BROKER_SSL_CERT"]:
    raise ImproperlyConfigured("QW_BROKER_SSL_KEY needs QW_BROKER_SSL_CERT")
if IS_BROKER_TLS:
    CELERY_BROKER_USE_SSL: dict[str, Any] | None = {
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": None,  # kombu fills in the host of the URL it connects to
        "ca_certs": _broker_tls_files["QW_BROKER_SSL_CA"] or None,
        "certfile": _broker_tls_files["QW_BROKER_SSL_CERT"] or None,
        "keyfile": _broker_tls_files["QW_BROKER_SSL_KEY"] or None,
    }
else:
    CELERY_BROKER_USE_SSL = None

CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_QUEUES = messaging.work_queues(QW_TYPE_ROUTES, QW_QUEUE_TYPE, QW_QUEUE_DELIVERY_LIMIT)
CELERY_TASK_DEFAULT_QUEUE_TYPE = QW_QUEUE_TYPE
CELERY_TASK_DEFAULT_QUEUE = messaging.DEFAULT_QUEUE
CELERY_TASK_DEFAULT_EXCHANGE = messaging.TASKS_EXCHANGE
CELERY_TASK_DEFAULT_EXCHANGE_TYPE = "direct"
CELERY_TASK_DEFAULT_ROUTING_KEY = messaging.DEFAULT_QUEUE
CELERY_TASK_CREATE_MISSING_QUEUES = False
CELERY_TASK_ROUTES = ("queueworker.tasking.route_declared",)
CELERY_TASK_DEFAULT_PRIORITY = 0
# Celery adds x-max-priority to every queue when this is set; quorum queues refuse it.
CELERY_TASK_QUEUE_MAX_PRIORITY = (
    messaging.MAX_PRIORITY if QW_QUEUE_TYPE == messaging.CLASSIC else None
)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = env.int("QW_WORKER_PREFETCH", 1, minimum=1)
# A worker lowers its CPU priority by this much at start (its pool inherits it), so that on a
# host it shares with the API a saturated worker does not starve the requests that create its
# work; 0 keeps the priority it was started with. No effect where each runs alone (containers).
QW_WORKER_NICE = env.int("QW_WORKER_NICE", 5, minimum=0, maximum=19)
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_HEARTBEAT = env.int("QW_BROKER_HEARTBEAT_S", 30, minimum=0)
CELERY_BROKER_CONNECTION_TIMEOUT = QW_PUBLISH_TIMEOUT_S
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_POOL_LIMIT = 10
CELERY_TASK_PUBLISH_RETRY = True
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.2,
}
# Hard limit for anything that slips past a task's own limit, below the consumer timeout.
CELERY_TASK_TIME_LIMIT = QW_MAX_TIMEOUT_S + QW_LEASE_SECONDS
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = False
CELERY_TASK_SEND_SENT_EVENT = False
CELERY_WORKER_SEND_TASK_EVENTS = env.bool("QW_WORKER_SEND_EVENTS", False)
CELERY_BEAT_SCHEDULER = "workflows_app.scheduler:QueueWorkerScheduler"
# Celery's Django fixup closes the database connection around every task unless told to reuse
# it; reopening a PostgreSQL session per task costs more than the task (docs/performance.md).
CELERY_DB_REUSE_MAX = env.int("QW_DB_REUSE_MAX", 100_000, minimum=0)
CELERY_WORKER_CONCURRENCY = env.int("QW_WORKER_CONCURRENCY", 1 if IS_EMBEDDED_BROKER else 2)

# --- REST framework ----------------------------------------------------------------------------
REST_FRAMEWORK: dict[str, Any] = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["queueworker.api.SafeJSONParser"],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_PAGINATION_CLASS": "queueworker.api.DefaultCursorPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "queueworker.api.exception_handler",
    "DEFAULT_METADATA_CLASS": "queueworker.api.SchemaMetadata",
    # QW_THROTTLE_CREATE is read by queueworker.api.CreateThrottle itself, at each request.
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "QueueWorker API",
    "DESCRIPTION": "Typed background tasks and saga workflows on Celery and RabbitMQ.",
    "VERSION": "0.1.0",
    # /api/docs/ loads Swagger UI from this server's static files (whitenoise), not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # 3.1: its schemas are JSON Schema 2020-12, the dialect of the task types' payload schemas.
    "OAS_VERSION": "3.1.0",
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "queueworker.schema.apply_contributions",
    ],
    "ENUM_NAME_OVERRIDES": {
        "TaskStatusEnum": "tasks_app.models.TaskStatus",
    },
}

# --- Logging -----------------------------------------------------------------------------------
LOG_LEVEL = env.choice(
    "LOG_LEVEL", "info", ("debug", "info", "warning", "error", "critical")
).upper()
LOG_FORMAT = env.choice("LOG_FORMAT", "console", ("json", "console"))
LOGGING_CONFIG = "queueworker.logging.configure"  # dictConfig, and warnings become records
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {"()": "queueworker.logging.JsonFormatter"},
        "console": {
            "class": "queueworker.logging.ConsoleFormatter",
            "format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        },
    },
    "filters": {
        # The task or request a record belongs to (queueworker.logcontext).
        "context": {"()": "queueworker.logcontext.ContextFilter"},
        # One filter keeps secrets out of every record these handlers write (queueworker.redaction).
        "redact": {"()": "queueworker.redaction.RedactingFilter"},
    },
    "handlers": {
        "default": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["context", "redact"],
        },
    },
    "root": {"handlers": ["default"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        "amqp": {"level": "WARNING"},
        "kombu": {"level": "WARNING"},
    },
}
