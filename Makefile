# Two commands on a fresh machine: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export PYTHONUNBUFFERED := 1
# DeepSpeed's compiled ops live in this environment, not in ~/.cache: a build killed elsewhere (its lock file
# left behind) cannot make this one wait forever. trainer/__init__.py sets the same default for direct runs.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions

.PHONY: install demo test lint format clean

# torch first and pinned: an unpinned torch pulled in by a dependency would bring several GB of CUDA wheels.
# DeepSpeed's CPU communication op is compiled once here (~1 min) instead of inside the first run.
# libaio-dev (Debian) lets DeepSpeed build its async_io op for NVMe parameter offload; without root it is
# skipped with a note and the NVMe test skips itself.
$(VENV)/.installed: setup.cfg pyproject.toml
	@if ! dpkg -s libaio-dev >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libaio-dev >/dev/null; \
	  else echo "note: libaio-dev is missing and this is not root: NVMe offload will be unavailable"; fi; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	rm -f $(TORCH_EXTENSIONS_DIR)/deepspeed_shm_comm/lock
	timeout 900 $(PY) -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()"
	touch $@

install: $(VENV)/.installed

shards/synthetic/test-000001.tar: | $(VENV)/.installed
	$(PY) -m launch.make_synthetic --out shards/synthetic

demo: install shards/synthetic/test-000001.tar
	$(PY) -m launch.train --config configs/demo.yaml
	@echo "final evaluation (runs/demo/eval.json):" && cat runs/demo/eval.json

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# NVMe offload's async_io op, compiled once before the tests that use it (skipped if it cannot be built
# within 15 minutes; ~3 min on 2 cores). Only make compiles here, so a lock left by a killed build is stale.
$(VENV)/.aio: $(VENV)/.installed
	rm -f $(TORCH_EXTENSIONS_DIR)/async_io/lock
	-timeout 900 $(PY) -c "from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder('AsyncIOBuilder'); \
	b.is_compatible(False) and b.load()"
	touch $@

test: lint $(VENV)/.aio
	$(PY) -m pytest -q

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf runs shards .pytest_cache .ruff_cache
