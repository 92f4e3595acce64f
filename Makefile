# The README's commands. `make demo` and `make test` each install everything first (idempotent).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0

.PHONY: install demo lint test test-fast bench bench-list gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is pinned FIRST: this resolves to the CPU build on this kind of machine.
# Letting pip resolve plain `torch` downloads a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade "pip>=24"
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip check
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/seater demo --out runs/demo

lint: install
	$(BIN)/ruff check seater_dist tests bench jobs

# The whole suite (CI runs this); `make test-fast`: everything but Ray Train fits, Serve services and extra
# Ray clusters (tests/conftest.py), for daily work.
test: lint
	$(BIN)/python -m pytest -q --durations=10 tests

test-fast: lint
	$(BIN)/python -m pytest -q --durations=5 -m "not slow" tests

# `make bench` runs every benchmark's quick variant (heavy: nothing else on the machine meanwhile);
# `make bench-list` (or `make -n bench`) shows what it runs.
bench: install
	$(BIN)/python -m bench.run_all

bench-list: install
	$(BIN)/python -m bench.run_all --list

# The GPU path end to end (tiny preset, GPU vs CPU): "no GPU: skipped" on a machine without CUDA.
gpu-check: install
	$(BIN)/python -m bench.gpu_check

clean:
	rm -rf $(VENV) runs
