# The two commands of the README:
#   make demo   installs Equilibrium into .venv and runs `equilibrium demo`
#   make test   installs it with the test tools and runs lint (ruff, mypy, the import contract)
#               and the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=

.PHONY: demo test install install-test lint unit

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'

demo: install
	$(BIN)/equilibrium demo $(DEMO_ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

unit: install-test
	$(BIN)/python -m pytest -q tests/unit
