# The two set-up commands: `make run` (the daemon) and `make test` (the whole suite).
# Each creates its own virtualenv on a fresh machine with only Python 3.11 and pip.
PYTHON ?= python3.11
VENV   ?= .venv
CONFIG ?= config/spoold.yaml
SPOOL  ?= ./spool
BIN    := $(VENV)/bin

.PHONY: run test lint typecheck pytest clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/spoold run --config $(CONFIG) --spool $(SPOOL)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

pytest: $(VENV)/.installed
	$(BIN)/pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
