# Two commands on a fresh machine: `make train`, `make test`. Everything else is installed from here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RECIPE ?= recipes/debug.yaml
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install system-deps ops train test test-fast test-multiproc lint bench bench-scale clean

install: $(STAMP)

# System packages: a venv-capable Python, a C++ compiler for DeepSpeed's JIT ops, libaio for NVMe offload.
system-deps:
	@missing=""; \
	$(PYTHON) -c "import ensurepip, venv" 2>/dev/null || missing="$$missing python3-venv"; \
	command -v g++ >/dev/null 2>&1 || missing="$$missing g++"; \
	dpkg -s libaio-dev >/dev/null 2>&1 || missing="$$missing libaio-dev"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "note: missing system packages:$$missing — run 'sudo apt-get install -y$$missing' (libaio-dev is needed only for NVMe offload)"; \
	  fi; \
	fi

$(STAMP): constraints.txt pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch (or one pulled in by another package) is a multi-GB CUDA build.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@$(MAKE) --no-print-directory ops
	# this machine's rates for the planner's step times (zero-trainer probe: ~15 s, cached per machine and install)
	$(PY) -m zero_trainer probe > /dev/null
	touch $(STAMP)

# Build DeepSpeed's CPU ops once (cached under $$TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions);
# stale locks from killed builds are removed first, never waited on.
ops:
	$(PY) -m zero_trainer.ops

train: install
	$(VENV)/bin/zero-trainer train --recipe $(RECIPE) $(ARGS)

# Two pytest workers on this 2-core box: much of a launch runs in one process at a time (imports, the launcher,
# preflight), so two streams keep both cores busy. The session's engine runs are launched once and shared between
# the workers (tests/conftest.py EngineRuns); `make test PYTEST_ARGS="-n 0"` runs everything in one process.
test: install
	$(PY) -m pytest -q -n 2 --dist worksteal $(PYTEST_ARGS) tests

test-fast: install
	$(PY) -m pytest -q -m "not multiproc" tests

test-multiproc: install
	$(PY) -m pytest -q -n 2 --dist worksteal -m multiproc tests

lint: install
	$(PY) -m ruff check zero_trainer tests bench

bench: install
	$(PY) -m bench.run_all

bench-scale: install
	$(PY) -m bench.scale

clean:
	rm -rf runs .pytest_cache
