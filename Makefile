# QueueWorker: `make run` starts the service, `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml uv.lock | sha1sum | cut -c1-12)
PYTEST_WORKERS ?= 2
QW_VAR_DIR ?= var
# Flower's login for `make run` when FLOWER_BASIC_AUTH is not set: made once, kept in var/.
FLOWER_AUTH_FILE := $(QW_VAR_DIR)/flower-auth

.PHONY: install docs run migrate test test-unit test-integration lint bench chaos soak clean

# uv installs exactly the versions of uv.lock into .venv: every dependency group, and the s3 extra
# that the image has. Where no uv is on PATH, pip puts one into a bootstrap environment first.
UV_BOOTSTRAP := .uv-bootstrap
UV ?= $(shell command -v uv 2>/dev/null || echo $(UV_BOOTSTRAP)/bin/uv)

$(UV_BOOTSTRAP)/bin/uv:
	$(PYTHON) -m venv $(UV_BOOTSTRAP)
	$(UV_BOOTSTRAP)/bin/pip install --quiet 'uv>=0.9,<1'

$(STAMP): pyproject.toml uv.lock | $(UV)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen --extra s3 --python $(PYTHON) --quiet
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

migrate: install
	$(BIN)/python manage.py createcachetable
	$(BIN)/python manage.py migrate --no-input

run: migrate
	$(BIN)/python manage.py collectstatic --no-input -v0
	@if [ -z "$$FLOWER_BASIC_AUTH" ] && [ ! -s "$(FLOWER_AUTH_FILE)" ]; then \
	  mkdir -p "$(QW_VAR_DIR)" && umask 077 && \
	  $(BIN)/python -c 'import secrets; print("admin:" + secrets.token_urlsafe(18))' > "$(FLOWER_AUTH_FILE)"; \
	fi
	$(BIN)/python manage.py qw_banner
	FLOWER_BASIC_AUTH="$${FLOWER_BASIC_AUTH:-$$(cat "$(FLOWER_AUTH_FILE)")}" \
	  PATH=$(abspath $(BIN)):$$PATH $(BIN)/honcho start -f Procfile

test: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --ignore=tests/chaos

test-unit: install
	$(BIN)/python -m pytest tests/unit -n $(PYTEST_WORKERS)

test-integration: install
	$(BIN)/python -m pytest tests/integration tests/e2e -n $(PYTEST_WORKERS) --dist loadfile

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy queueworker tasks_app workflows_app

bench: install
	$(BIN)/python -m bench
	$(BIN)/python -m bench.http_scenario
	$(BIN)/python -m bench.workflow_scenario
	$(BIN)/python -m bench.data_scenario

# Faults against real RabbitMQ, PostgreSQL and workers (tests/chaos); 1 is the issue's size.
QW_CHAOS_SCALE ?= 1
QW_SOAK_SECONDS ?= 600

chaos: install
	QW_CHAOS_SCALE=$(QW_CHAOS_SCALE) $(BIN)/python -m pytest tests/chaos --ignore=tests/chaos/test_soak.py

soak: install
	QW_SOAK_SECONDS=$(QW_SOAK_SECONDS) $(BIN)/python -m pytest tests/chaos/test_soak.py

clean:
	rm -rf var site .pytest_cache .mypy_cache .ruff_cache
