# Each target creates .venv and installs what it needs, so one command works on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint proto clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dspex_dspy.demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest --cov=dspex_dspy --cov-report=term $(PYTEST_ARGS) || exit $$?
	$(BIN)/ruff check dspex_dspy tests benchmarks examples
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check dspex_dspy tests benchmarks examples
	$(BIN)/ruff format --check dspex_dspy tests benchmarks examples
	$(BIN)/mypy

proto: $(STAMP)
	$(BIN)/python -m bridge.generate

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
