# conveyor — the two front-door commands are `make demo` and `make test`.
# Everything else they need is installed here from the package registries.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SANDBOX_NAME ?= default

.PHONY: venv browser lint types unit fuzz cluster test demo sandbox-down bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian's Chromium for the dashboard's Playwright tests (Playwright's own browser
# download is not used). Installed only when missing; as root directly, else with sudo.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; \
		elif command -v sudo >/dev/null; then SUDO=sudo; \
		else echo "chromium missing: install it as root (apt-get install chromium)"; exit 1; fi; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

types: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m "not cluster" tests

# The readers of users' files and the renderers fuzzed at length: the unit run's tests
# with many more examples, new ones each run (FUZZ_EXAMPLES per test).
FUZZ_EXAMPLES ?= 1500
fuzz: $(STAMP)
	CONVEYOR_FUZZ_PROFILE=fuzz CONVEYOR_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
		$(BIN)/pytest -m "not cluster" tests/unit/test_fuzz_*.py -q

cluster: $(STAMP) browser
	$(BIN)/conveyor sandbox up --name test
	$(BIN)/pytest -m cluster tests

test: $(STAMP) browser
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest tests

demo: $(STAMP)
	$(BIN)/python -m conveyor.demo

sandbox-down: $(STAMP)
	$(BIN)/conveyor sandbox down --name $(SANDBOX_NAME)

# Benchmarks print ratios against their peers measured in the same run; they are not tests.
bench: $(STAMP)
	$(BIN)/python bench/agent_scale.py --results
	$(BIN)/python bench/images_scan.py
	$(BIN)/python bench/dashboard.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
