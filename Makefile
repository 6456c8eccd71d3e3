# The two commands that matter: `make demo` and `make test`. Both set up the locked environment first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup setup-dvc setup-browser setup-postgres test lint demo ui clean services \
	services-stop services-status dvc-remote gpu-wheels

# pip byte-compiles what it installs one file at a time; PIP_INSTALL skips that, BYTECOMPILE does
# it on every core (about 30 s less on 2 cores). Files that do not compile on this Python are
# skipped, as pip skips them (torch ships a Python 3.12-only test helper).
PIP_INSTALL = -m pip install -qq --disable-pip-version-check --no-compile
BYTECOMPILE = -c "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_path('purelib'), \
	quiet=2, workers=0)"

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) $(PIP_INSTALL) -r requirements.lock
	$(PY) $(BYTECOMPILE)
	$(PY) $(PIP_INSTALL) --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# DVC in its own environment (its antlr4 pin clashes with Dagster's); tests call its CLI.
DVC_VENV := .venv-dvc
DVC_STAMP := $(DVC_VENV)/.installed-stamp

$(DVC_STAMP): requirements-dvc.lock
	test -x $(DVC_VENV)/bin/python || $(PYTHON) -m venv $(DVC_VENV)
	$(DVC_VENV)/bin/python $(PIP_INSTALL) -r requirements-dvc.lock
	$(DVC_VENV)/bin/python $(BYTECOMPILE)
	touch $(DVC_STAMP)

setup-dvc: $(DVC_STAMP)

# Headless Chromium and its WebDriver from Debian packages, for tests/test_browser.py.
# Installed only when missing; needs root (as CI has).
setup-browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		DEBIAN_FRONTEND=noninteractive dpkg --configure -a && apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		chromium chromium-driver; \
	fi

# Debian's PostgreSQL server (initdb, postgres, pg_isready in /usr/lib/postgresql/<ver>/bin) for
# tests/test_services_postgres.py and `make services POSTGRES=1`; installed only when missing,
# without Debian's default cluster (infra/postgres.py runs clusters of its own). Needs root.
setup-postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1; then \
		mkdir -p /etc/postgresql-common/createcluster.d && \
		echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/cris.conf && \
		DEBIAN_FRONTEND=noninteractive dpkg --configure -a && apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; \
	fi

test: setup setup-dvc setup-browser setup-postgres
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check cris_model data_checks pipelines infra tests bench
	$(VENV)/bin/mypy cris_model data_checks pipelines infra

# The demo: the whole Dagster asset graph on synthetic data with cris_tiny on the CPU, then
# registration and promotion. Everything it writes stays under demo/ (gitignored); the full
# Dagster logs go to demo/demo.log, the screen shows steps, epochs and the result, and the last
# line of output is the promoted model as one JSON object. DEMO_SET="k=v ..." adds params
# overrides for every stage, e.g. make demo DEMO_SET="train.epochs=1 train.max_steps=20".
DEMO := $(CURDIR)/demo
DAGSTER := $(VENV)/bin/dagster
DEFS := -m pipelines.definitions
UI_HOST ?= 127.0.0.1
DAGSTER_PORT ?= 3000
MLFLOW_PORT ?= 5000
APP_PORT ?= 7860
# CRIS_STACK=services (after `make services`) runs the same targets on the shared services:
# the MLflow server, the S3 store and their Dagster instance (infra/stack.py reads them).
CRIS_STACK ?= embedded
ifeq ($(CRIS_STACK),services)
STACK_READY := $(PY) -m infra.services status > /dev/null &&
DEMO_ENV = CRIS_STACK=services $(shell CRIS_STACK=services $(PY) -m infra.stack env) \
	CRIS_STORAGE_ROOT=$(DEMO)/assets CRIS_MLFLOW_UI_URL=http://$(UI_HOST):$(MLFLOW_PORT) \
	CRIS_APP_URL=http://$(UI_HOST):$(APP_PORT) CI=1
else
STACK_READY :=
DEMO_ENV := DAGSTER_HOME=$(DEMO)/dagster MLFLOW_TRACKING_URI=sqlite:///$(DEMO)/mlflow.db \
	CRIS_STORAGE_ROOT=$(DEMO)/assets CRIS_MLFLOW_UI_URL=http://$(UI_HOST):$(MLFLOW_PORT) \
	CRIS_APP_URL=http://$(UI_HOST):$(APP_PORT) CI=1
endif
DEMO_SET ?=
DEMO_LOG := $(DEMO)/demo.log
RUN_CONFIG := -c $(DEMO)/run_config.yaml
SHOW := $(PY) -m pipelines.progress --log $(DEMO_LOG) --
RUN_JOB := $(DEMO_ENV) $(SHOW) $(DAGSTER) job execute $(DEFS) $(RUN_CONFIG) -j
MATERIALIZE := $(DEMO_ENV) $(SHOW) $(DAGSTER) asset materialize $(DEFS) $(RUN_CONFIG) --select
SPLITS = $(shell $(PY) -c "from pipelines.defs.params import eval_splits; print(*eval_splits())")

demo: setup
	@$(STACK_READY) rm -rf $(DEMO) && mkdir -p $(DEMO)/dagster && cp infra/dagster/dagster.yaml $(DEMO)/dagster/
	@$(PY) -c "import sys, yaml; yaml.safe_dump({'resources': {'params': {'config': \
		{'overrides': sys.argv[1:]}}}}, sys.stdout)" $(DEMO_SET) > $(DEMO)/run_config.yaml
	@echo "Demo: data, checks, training, evaluation and registration (full logs: $(DEMO_LOG))"
	@echo "job train_pipeline"
	@$(RUN_JOB) train_pipeline
	@for split in $(SPLITS); do echo "asset evaluation, partition $$split"; \
		$(MATERIALIZE) evaluation --partition $$split || exit 1; done
	@echo "asset registered_model"
	@$(MATERIALIZE) registered_model
	@echo "job promote_model"
	@$(RUN_JOB) promote_model
	@$(PY) -m pipelines.progress --summary $(DEMO)/assets
	@echo "Demo finished. Where to look:"
	@echo "  make ui   Dagster http://$(UI_HOST):$(DAGSTER_PORT) (asset graph, checks, metrics, plots)"
	@echo "            MLflow  http://$(UI_HOST):$(MLFLOW_PORT) (runs, loss curve, model cris@champion)"
	@echo "            Try it  http://$(UI_HOST):$(APP_PORT) (phrases on your image, champion vs challenger)"
	@echo "  files     $(DEMO)/assets (data, train/best, eval/<split>/metrics.json, galleries)"
	@echo "  logs      $(DEMO_LOG)"
	@cat $(DEMO)/assets/promotion.json

# The Dagster and MLflow UIs and the try-it page (`cris app`: the champion beside the challenger,
# the demo's val images as examples) over the demo's instance and tracking store; Ctrl-C stops
# all three. Before `make demo` has promoted a champion the page says so in one line and does
# not start; Dagster and MLflow run all the same. APP_PORT= changes its port.
PREPARED := $(DEMO)/assets/prepared
APP = $(DEMO_ENV) $(VENV)/bin/cris app --compare models:/cris@challenger --host $(UI_HOST) \
	--port $(APP_PORT) $(if $(wildcard $(PREPARED)/summary.json),--data $(PREPARED))
UI_URLS = "Dagster: http://$(UI_HOST):$(DAGSTER_PORT)   MLflow: http://$(UI_HOST):$(MLFLOW_PORT)   Try it: http://$(UI_HOST):$(APP_PORT)"
# Without the demo's store the page is not started at all: it would create the store while
# `mlflow ui` does too.
APP_EMBEDDED = $(if $(wildcard $(DEMO)/mlflow.db),$(APP),echo "Try it: not started: no \
	$(DEMO)/mlflow.db yet (make demo registers and promotes a champion)")
ui: setup
ifeq ($(CRIS_STACK),services)
	$(STACK_READY) true
	@echo $(UI_URLS)
	$(APP) & app_pid=$$!; trap 'kill $$app_pid 2> /dev/null' EXIT; \
	$(DEMO_ENV) $(DAGSTER) dev $(DEFS) -h $(UI_HOST) -p $(DAGSTER_PORT)
else
	mkdir -p $(DEMO)/dagster && cp -n infra/dagster/dagster.yaml $(DEMO)/dagster/
	@echo $(UI_URLS)
	$(DEMO_ENV) $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(DEMO)/mlflow.db \
		--host $(UI_HOST) --port $(MLFLOW_PORT) & mlflow_pid=$$!; \
	$(APP_EMBEDDED) & app_pid=$$!; \
	trap 'kill $$mlflow_pid $$app_pid 2> /dev/null' EXIT; \
	$(DEMO_ENV) $(DAGSTER) dev $(DEFS) -h $(UI_HOST) -p $(DAGSTER_PORT)
endif

# Shared services on this machine (infra/services.py): SeaweedFS S3 on $(S3_PORT) and an MLflow
# server on $(MLFLOW_PORT) (SQLite backend, artifacts proxied into s3://mlflow), state, logs and
# data under .services/. Credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
# POSTGRES=1 also starts a PostgreSQL cluster of its own on $(PG_PORT) (.services/postgres/)
# and keeps MLflow's runs and the Dagster instance there. To use another server instead:
# MLFLOW_BACKEND=postgresql+psycopg2://user@host:port/db and
# DAGSTER_YAML=infra/dagster/dagster-postgres.yaml with the DAGSTER_PG_* variables set.
S3_PORT ?= 8333
PG_PORT ?= 5433
POSTGRES ?=
MLFLOW_BACKEND ?=
DAGSTER_YAML ?= $(if $(POSTGRES),infra/dagster/dagster-postgres.yaml,infra/dagster/dagster.yaml)
services: setup $(if $(POSTGRES),setup-postgres)
	$(PY) -m infra.services start --s3-port $(S3_PORT) --mlflow-port $(MLFLOW_PORT) \
		--dagster-yaml $(DAGSTER_YAML) $(if $(MLFLOW_BACKEND),--backend-uri $(MLFLOW_BACKEND)) \
		$(if $(POSTGRES),--postgres --postgres-port $(PG_PORT))

services-stop:
	$(PY) -m infra.services stop

services-status:
	$(PY) -m infra.services status

# The DVC remote in the services' store; its endpoint goes to .dvc/config.local (not in git),
# the credentials stay in the AWS_* environment variables.
dvc-remote: setup setup-dvc
	CRIS_STACK=services $(PY) -c "from infra.stack import active_stack as a; s = a(); \
		print(s.dvc_remote, s.s3_endpoint_url)" | { read url endpoint; \
		$(DVC_VENV)/bin/dvc remote add --local -f -d store $$url && \
		$(DVC_VENV)/bin/dvc remote modify --local store endpointurl $$endpoint; }

# The wheels bench/gpu_suite.sh installs on a GPU machine whose image has torch but not these
# (Python 3.12, x86-64), at the versions requirements.lock pins; .whl/ stays out of git.
GPU_WHEELS := open_clip_torch ftfy wcwidth pycocotools
gpu-wheels:
	mkdir -p .whl
	for name in $(GPU_WHEELS); do \
		pin=$$(grep -i "^$$name==" requirements.lock) || exit 1; \
		$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
			--implementation cp --platform manylinux_2_28_x86_64 \
			--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
			"$$pin" || exit 1; \
	done

clean:
	rm -rf $(VENV) $(DVC_VENV) demo .pytest_cache
