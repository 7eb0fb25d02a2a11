# Event-sourced e-mail campaign engine. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: bench-tools help install up down status demo test test-unit chaos lint typecheck deploy-check schemas bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create the virtualenv and install the project with its dev tools

up: $(STAMP) ## Start Kafka, PostgreSQL, the SMTP sink and the four services (idempotent)
	$(PY) -m services.platform up

down: $(STAMP) ## Stop exactly what `make up` started
	$(PY) -m services.platform down

status: $(STAMP) ## Show what is running
	$(PY) -m services.platform status

demo: $(STAMP) ## A real 10,000-recipient campaign end to end, with live progress and a summary
	$(PY) -m services.demo

test: $(STAMP) ## Run every test (starts its own Kafka and PostgreSQL on test ports)
	$(PY) -m pytest -q

chaos: $(STAMP) ## The chaos suite at full size (CHAOS_RECIPIENTS=20000; make test runs it smaller)
	CHAOS_RECIPIENTS=$${CHAOS_RECIPIENTS:-20000} CHAOS_KILLS=$${CHAOS_KILLS:-5} $(PY) -m pytest -q -s tests/chaos

test-unit: $(STAMP) ## Unit tests only (no I/O)
	$(PY) -m pytest -q tests/unit

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .

typecheck: $(STAMP) ## mypy (strict defs)
	$(VENV)/bin/mypy .

deploy-check: ## Validate deploy/: kubeconform -strict, Compose schema, dashboard, hadolint
	deploy/validate.sh

schemas: $(STAMP) ## Regenerate schemas/json from the pydantic models
	$(PY) -m schemas.export

bench: $(STAMP) bench-tools ## Throughput figures; writes bench/results/latest.json (BENCH_RECIPIENTS=N)
	$(PY) -m bench.run

bench-tools: ## Postfix's smtp-sink and smtp-source (Debian's postfix), for the C-sink step
	@command -v smtp-sink >/dev/null || test -x /usr/sbin/smtp-sink || { \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postfix; }

clean: down ## Stop everything and delete local state
	rm -rf .state
