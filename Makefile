# Lodestar — the front door. `make run` and `make test` do all set-up themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
TOOLS := .tools
UV := $(TOOLS)/uv/bin/uv
UV_VERSION := 0.13.8
VENV := .venv
BIN := $(VENV)/bin
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: help bootstrap run test unit integration e2e proto proto-check lint bench bench-compare chart-check images litellm-proxy clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(UV):
	$(PYTHON) -m venv $(TOOLS)/uv
	$(TOOLS)/uv/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.synced: $(UV) uv.lock pyproject.toml libs/common/pyproject.toml $(wildcard services/*/pyproject.toml)
	$(UV) sync --frozen --all-packages --python $(PYTHON)
	@touch $@

bootstrap: $(VENV)/.synced ## create .venv from the lock file

run: bootstrap ## start core and every installed module on an embedded Postgres
	$(BIN)/lodestar up

test: bootstrap proto-check ## the whole test suite with branch coverage (floor in pyproject.toml), chart checks
	$(BIN)/pytest --cov --cov-report=term
	$(MAKE) chart-check

unit: bootstrap ## unit tests only
	$(BIN)/pytest tests/unit services/*/tests

integration: bootstrap ## integration tests (real Postgres, servers in the test process)
	$(BIN)/pytest tests/integration

e2e: bootstrap ## end-to-end tests (real processes)
	$(BIN)/pytest tests/e2e

proto: bootstrap ## regenerate Python code and stubs from protos/
	$(BIN)/python scripts/gen_protos.py
	cd protos && ../$(BIN)/buf lint

proto-check: bootstrap ## fail when generated code is stale or protos do not lint
	$(BIN)/python scripts/gen_protos.py --check
	cd protos && ../$(BIN)/buf lint

lint: bootstrap ## ruff, mypy, import-linter
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: bootstrap ## benchmarks: durable publish, delivery, latency, NATS JetStream comparison
	@if command -v npm >/dev/null; then npm ci --prefix bench/node --no-audit --no-fund --silent \
	|| echo "npm ci failed: the Node.js admission generator is skipped"; fi
	$(BIN)/python -m bench

bench-compare: bootstrap ## durable publish of this checkout against REF (a git commit), in one run
	@test -n "$(REF)" || { echo "usage: make bench-compare REF=<git commit>"; exit 2; }
	$(BIN)/python -m bench.compare $(REF)

PROXY_VENV := $(TOOLS)/litellm-proxy
PROXY_REQUIREMENTS := examples/litellm-proxy/requirements.txt

$(PROXY_VENV)/.synced: $(UV) $(PROXY_REQUIREMENTS) libs/common/pyproject.toml services/usage-tracker/pyproject.toml
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(PROXY_VENV)
	$(UV) pip install --quiet --python $(PROXY_VENV)/bin/python -r $(PROXY_REQUIREMENTS) \
		-e libs/common -e 'services/usage-tracker[litellm]'
	@touch $@

litellm-proxy: $(PROXY_VENV)/.synced ## a venv with the LiteLLM proxy server and Lodestar's callback (examples/litellm-proxy)

chart-check: bootstrap ## helm lint, render every scenario, validate against Kubernetes schemas
	bash scripts/chart_check.sh

images: ## build one image per service (needs a Docker engine)
	bash scripts/build_images.sh

clean: ## remove the virtualenv and tools
	rm -rf $(VENV) $(TOOLS) .lodestar
