# Two commands from a fresh machine: `make up` (the local stack) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install up test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch that lies on disk here; elsewhere pip takes what fits the machine
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev,local]"
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/letterpress up

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/letterpress bench

clean:
	rm -rf $(VENV) .letterpress .pytest_cache
