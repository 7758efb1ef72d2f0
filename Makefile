# Each target creates .venv and installs what it needs, so one command works on a fresh machine.
# The demo installs only the package and DSPy; test/lint/bench install the whole dev toolchain.
# Installs are editable in strict mode, so type checkers see the package like an installed one.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet
DEV_STAMP := $(VENV)/.installed-dev
DEMO_STAMP := $(VENV)/.installed-demo
PYTHONS ?= 3.10 3.11 3.12 3.13
# A strict editable install links the package's files as they were at install time: a new module
# needs a reinstall. This file changes (and triggers one) only when the list of modules changes.
PKG_LIST := $(VENV)/.package-files
PKG_FILES := $(sort $(wildcard dspex_dspy/*.py dspex_dspy/*/*.py dspex_dspy/*/*/*.py))

.PHONY: demo test test-pythons bench bench-instructions lint proto clean system-packages dashboard-screenshot FORCE

$(PKG_LIST): FORCE | $(BIN)/python
	@echo "$(PKG_FILES)" | cmp -s - $@ || echo "$(PKG_FILES)" > $@

$(BIN)/python:
	@echo "==> creating the virtual environment $(VENV) with $(PY)"
	$(PY) -m venv $(VENV)
	@$(PIP) --upgrade pip

$(DEV_STAMP): pyproject.toml $(PKG_LIST) | $(BIN)/python
	@echo "==> installing dspex-dspy (editable) with the dev tools: DSPy, pytest, ruff, mypy, nbclient ... (a minute or two the first time)"
	$(PIP) -e '.[dev]' --config-settings editable_mode=strict
	touch $(DEV_STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml $(PKG_LIST) | $(BIN)/python
	@echo "==> installing what the demo needs: dspex-dspy (editable) and DSPy, nothing else"
	$(PIP) -e '.[dspy]' --config-settings editable_mode=strict
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	@echo "==> running the demo on the embedded bridge with an offline LM (no network, no API key)"
	$(BIN)/python -m dspex_dspy.demo $(DEMO_ARGS)

# Tests start their own redis-server and drive Debian's headless Chromium (never skipped): install
# the system packages they need when missing (as root), or stop with the exact command to run.
# Each entry is COMMAND:PACKAGES (packages joined by +).
SYSTEM_PACKAGES := redis-server:redis-server chromium:chromium+chromium-driver chromedriver:chromium-driver
system-packages:
	@missing=""; for entry in $(SYSTEM_PACKAGES); do \
	  cmd=$${entry%%:*}; pkgs=$$(echo $${entry#*:} | tr '+' ' '); \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkgs"; done; \
	missing=$$(echo $$missing | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	if [ -n "$${missing% }" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "==> installing system packages: $$missing"; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	  else echo "missing system packages: $$missing"; \
	    echo "run: sudo apt-get update && sudo apt-get install -y $$missing" >&2; exit 1; fi; \
	fi

test: $(DEV_STAMP) system-packages
	$(BIN)/python -m pytest --cov=dspex_dspy --cov-report=term $(PYTEST_ARGS) || exit $$?
	$(BIN)/ruff check dspex_dspy tests benchmarks examples
	$(BIN)/mypy

# Refresh the dashboard screenshot the README shows (from the end-to-end test's session view).
dashboard-screenshot: $(DEV_STAMP) system-packages
	DSPEX_DASHBOARD_SCREENSHOT=$(CURDIR)/docs/dashboard.png $(BIN)/python -m pytest -q tests/e2e -k lists_a_session

# The suite on every Python of $(PYTHONS) found (pyenv versions or python3.X on PATH), one venv each.
test-pythons:
	PYTHONS="$(PYTHONS)" PYTEST_ARGS="$(PYTEST_ARGS)" ./.ci/test-pythons

bench: $(DEV_STAMP) system-packages
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# Instructions per call of every process of a write, counted by callgrind (repeatable to ~0.1%).
bench-instructions: $(DEV_STAMP)
	@$(MAKE) --no-print-directory system-packages SYSTEM_PACKAGES="redis-server:redis-server valgrind:valgrind"
	$(BIN)/python -m benchmarks.instructions $(BENCH_ARGS)

lint: $(DEV_STAMP)
	$(BIN)/ruff check dspex_dspy tests benchmarks examples
	$(BIN)/ruff format --check dspex_dspy tests benchmarks examples
	$(BIN)/mypy

proto: $(DEV_STAMP)
	$(BIN)/python -m bridge.generate

clean:
	rm -rf $(VENV) .venv-py* .pytest_cache .mypy_cache .ruff_cache .coverage build dist
