PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/taquba demo

test: install-test
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .taquba .pytest_cache .hypothesis

.PHONY: soak

# The stateful model test's long profile (tests/test_model.py): examples of up
# to 100 steps until TAQUBA_SOAK_STEPS (default 10000) steps ran per store;
# prints the step count, the violations and what each operation did.
soak: install-test
	TAQUBA_MODEL_PROFILE=soak $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/test_model.py -k "test_state_machine and not s3"

.PHONY: bench bench-check

# Benchmarks (benchmarks/): tables on the terminal, an entry appended to
# benchmarks/RESULTS.md, exit status 1 when a performance target is missed.
bench: install
	$(BIN)/pip install -q -e '.[bench]'
	BENCH_COMMAND="make bench" $(BIN)/python -m benchmarks.run --profile full

bench-check: install
	BENCH_COMMAND="make bench-check" $(BIN)/python -m benchmarks.run --profile quick
