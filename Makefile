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
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .taquba .pytest_cache .hypothesis

.PHONY: bench bench-check

# Benchmarks (benchmarks/): tables on the terminal, an entry appended to
# benchmarks/RESULTS.md, exit status 1 when a performance target is missed.
bench: install
	$(BIN)/pip install -q -e '.[bench]'
	BENCH_COMMAND="make bench" $(BIN)/python -m benchmarks.run --profile full

bench-check: install
	BENCH_COMMAND="make bench-check" $(BIN)/python -m benchmarks.run --profile quick
