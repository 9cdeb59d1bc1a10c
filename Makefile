# conveyor — the two front-door commands are `make demo` and `make test`.
# Everything else they need is installed here from the package registries.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SANDBOX_NAME ?= default

.PHONY: venv lock image image-context image-tools browser lint types unit fuzz cluster test demo \
	sandbox-down bench bench-dashboard bench-flux-local clean

# Installs are reproducible: every package comes from the lock (uv.lock, exported with
# hashes to requirements/), the same lock `make image` installs from; conveyor itself
# goes on top without resolving anything. tests/unit/test_lock.py fails when pyproject.toml
# and the lock disagree; `make lock` brings them back together.
$(STAMP): pyproject.toml uv.lock requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

lock: $(STAMP)
	$(BIN)/uv lock
	$(BIN)/uv export --frozen --no-emit-project --no-header -q -o requirements/runtime.txt
	$(BIN)/uv export --frozen --no-emit-project --extra dev --no-header -q -o requirements/dev.txt

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

# Debian's daemonless image tools: mmdebstrap builds the base, buildah runs the
# Containerfile (chroot isolation) and pushes, podman runs the image in the tests (with
# runc: crun cannot set up this VM's hybrid cgroups). Installed only when missing.
IMAGE_TOOLS := mmdebstrap buildah podman runc
image-tools:
	@missing=; for tool in $(IMAGE_TOOLS); do \
		command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; \
		elif command -v sudo >/dev/null; then SUDO=sudo; \
		else echo "missing:$$missing: install them as root (apt-get install$$missing)"; exit 1; fi; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# conveyor's image, built without a daemon (image/build.py runs the Containerfile
# on a Debian base from mmdebstrap) and pushed to the sandbox's registry.
image: $(STAMP) image-tools
	$(BIN)/conveyor sandbox up --name $(SANDBOX_NAME)
	$(BIN)/python image/build.py --push $(SANDBOX_NAME)

# The Containerfile's build context, for podman or docker elsewhere:
#   make image-context && podman build -t conveyor .image-context
image-context: $(STAMP)
	$(BIN)/python image/build.py --context .image-context

lint: $(STAMP)
	$(BIN)/ruff check src tests bench image
	$(BIN)/ruff format --check src tests bench image

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

cluster: $(STAMP) browser image-tools
	$(BIN)/conveyor sandbox up --name test
	$(BIN)/pytest -m cluster tests

test: $(STAMP) browser image-tools
	$(BIN)/ruff check src tests bench image
	$(BIN)/ruff format --check src tests bench image
	$(BIN)/mypy
	@# The unit tests (four minutes of one core) run beside the cluster tests, which spend
	@# much of their time waiting on the control plane; their output follows.
	@# Their temporary files go apart: a pytest session prunes others' old ones.
	@unit=$$(mktemp -d); \
	$(BIN)/pytest -m "not cluster" -p no:cacheprovider --basetemp "$$unit/tmp" tests \
		>"$$unit/log" 2>&1 & pid=$$!; \
	status=0; $(BIN)/pytest -m cluster tests || status=$$?; \
	wait $$pid || status=$$?; echo "--- the unit tests, run beside them ---"; \
	cat "$$unit/log"; rm -rf "$$unit"; exit $$status

demo: $(STAMP)
	$(BIN)/python -m conveyor.demo

sandbox-down: $(STAMP)
	$(BIN)/conveyor sandbox down --name $(SANDBOX_NAME)

# Benchmarks print ratios against their peers measured in the same run; they are not tests.
bench: $(STAMP)
	$(BIN)/python bench/agent_scale.py --results
	$(BIN)/python bench/images_scan.py
	$(BIN)/python bench/dashboard.py
	$(BIN)/python bench/flux_local.py

# The dashboard alone: 60 apps x 12 environments over two sandboxes ("bench" and
# "bench2", started if down and stopped after), a change in each timed to an open page
# (the SSE stream and Chromium; `make browser` installs it).
bench-dashboard: $(STAMP)
	$(BIN)/python bench/dashboard.py

# The offline PR diff against flux-local's, on one generated Flux v2 repository. flux-local
# goes into a venv of its own under ~/.cache/conveyor/bench (never into the lock);
# kustomize and flux are built once from the Go module proxy. No cluster is started.
bench-flux-local: $(STAMP)
	$(BIN)/python bench/flux_local.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .image-context
