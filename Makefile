# Each target creates .venv and installs what it needs, so one command works on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint proto clean redis-server

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dspex_dspy.demo $(DEMO_ARGS)

# The Redis tests start their own redis-server (never skipped): install it when it is missing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y redis-server; \
	  else echo "redis-server is missing; run: sudo apt-get update && sudo apt-get install -y redis-server" >&2; exit 1; fi; }

test: $(STAMP) redis-server
	$(BIN)/python -m pytest --cov=dspex_dspy --cov-report=term $(PYTEST_ARGS) || exit $$?
	$(BIN)/ruff check dspex_dspy tests benchmarks examples
	$(BIN)/mypy

bench: $(STAMP) redis-server
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check dspex_dspy tests benchmarks examples
	$(BIN)/ruff format --check dspex_dspy tests benchmarks examples
	$(BIN)/mypy

proto: $(STAMP)
	$(BIN)/python -m bridge.generate

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
