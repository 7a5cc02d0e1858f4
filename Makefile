# Two commands on a fresh machine: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export PYTHONUNBUFFERED := 1

.PHONY: install demo test lint format clean

# torch first and pinned: an unpinned torch pulled in by a dependency would bring several GB of CUDA wheels.
# DeepSpeed's CPU communication op is compiled once here (~1 min) instead of inside the first run.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()"
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

test: lint
	$(PY) -m pytest -q

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf runs shards .pytest_cache .ruff_cache
