# The two commands that matter: `make demo` and `make test`. Both set up the locked environment first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup setup-dvc setup-browser test lint demo ui clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# DVC in its own environment (its antlr4 pin clashes with Dagster's); tests call its CLI.
DVC_VENV := .venv-dvc
DVC_STAMP := $(DVC_VENV)/.installed-stamp

$(DVC_STAMP): requirements-dvc.lock
	test -x $(DVC_VENV)/bin/python || $(PYTHON) -m venv $(DVC_VENV)
	$(DVC_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-dvc.lock
	touch $(DVC_STAMP)

setup-dvc: $(DVC_STAMP)

# Headless Chromium and its WebDriver from Debian packages, for tests/test_browser.py.
# Installed only when missing; needs root (as CI has).
setup-browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q --no-install-recommends chromium chromium-driver; \
	fi

test: setup setup-dvc setup-browser
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check cris_model data_checks pipelines tests bench
	$(VENV)/bin/mypy cris_model data_checks pipelines

# The demo: the whole Dagster asset graph on synthetic data with cris_tiny on the CPU, then
# registration and promotion. Everything it writes stays under demo/ (gitignored); the last
# line of output is the promoted model as one JSON object. DEMO_SET="k=v ..." adds params
# overrides for every stage, e.g. make demo DEMO_SET="train.epochs=1 train.max_steps=20".
DEMO := $(CURDIR)/demo
DAGSTER := $(VENV)/bin/dagster
DEFS := -m pipelines.definitions
UI_HOST ?= 127.0.0.1
DAGSTER_PORT ?= 3000
MLFLOW_PORT ?= 5000
DEMO_ENV := DAGSTER_HOME=$(DEMO)/dagster MLFLOW_TRACKING_URI=sqlite:///$(DEMO)/mlflow.db \
	CRIS_STORAGE_ROOT=$(DEMO)/assets CRIS_MLFLOW_UI_URL=http://$(UI_HOST):$(MLFLOW_PORT) CI=1
DEMO_SET ?=
RUN_CONFIG := -c $(DEMO)/run_config.yaml
RUN_JOB := $(DEMO_ENV) $(DAGSTER) job execute $(DEFS) $(RUN_CONFIG) -j
MATERIALIZE := $(DEMO_ENV) $(DAGSTER) asset materialize $(DEFS) $(RUN_CONFIG) --select
SPLITS = $(shell $(PY) -c "from pipelines.defs.params import eval_splits; print(*eval_splits())")

demo: setup
	rm -rf $(DEMO) && mkdir -p $(DEMO)/dagster && cp infra/dagster/dagster.yaml $(DEMO)/dagster/
	$(PY) -c "import sys, yaml; yaml.safe_dump({'resources': {'params': {'config': \
		{'overrides': sys.argv[1:]}}}}, sys.stdout)" $(DEMO_SET) > $(DEMO)/run_config.yaml
	$(RUN_JOB) train_pipeline
	for split in $(SPLITS); do $(MATERIALIZE) evaluation --partition $$split || exit 1; done
	$(MATERIALIZE) registered_model
	$(RUN_JOB) promote_model
	@echo "Demo finished. Where to look:"
	@echo "  make ui   Dagster http://$(UI_HOST):$(DAGSTER_PORT) (asset graph, checks, metrics, plots)"
	@echo "            MLflow  http://$(UI_HOST):$(MLFLOW_PORT) (runs, loss curve, model cris@champion)"
	@echo "  files     $(DEMO)/assets (data, train/best, eval/<split>/metrics.json, galleries)"
	@cat $(DEMO)/assets/promotion.json

# The Dagster and MLflow UIs over the demo's instance and tracking store; Ctrl-C stops both.
ui: setup
	mkdir -p $(DEMO)/dagster && cp -n infra/dagster/dagster.yaml $(DEMO)/dagster/
	@echo "Dagster: http://$(UI_HOST):$(DAGSTER_PORT)   MLflow: http://$(UI_HOST):$(MLFLOW_PORT)"
	$(DEMO_ENV) $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(DEMO)/mlflow.db \
		--host $(UI_HOST) --port $(MLFLOW_PORT) & mlflow_pid=$$!; \
	trap 'kill $$mlflow_pid' EXIT; \
	$(DEMO_ENV) $(DAGSTER) dev $(DEFS) -h $(UI_HOST) -p $(DAGSTER_PORT)

clean:
	rm -rf $(VENV) $(DVC_VENV) demo .pytest_cache
