# Two entry points that work on a fresh machine with Python 3.11+: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export TF_CPP_MIN_LOG_LEVEL := 3

PIP    := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo test test-slow test-all lint format lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The demo needs only the runtime (plus ffmpeg for MP4 outputs); tests add pytest, the PyTorch extras and libtpu
# (compile-only TPU devices: the TPU compile and splash-attention tests).
$(VENV)/.demo: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[video]"
	touch $@

$(VENV)/.test: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[video,test,torch,tpu]"
	touch $@ $(VENV)/.demo

$(VENV)/.lint: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[video,test,torch,tpu,lint]"
	touch $@ $(VENV)/.test $(VENV)/.demo

demo: $(VENV)/.demo
	$(BIN)/layerflow demo --workdir demo_out

# Test files run in parallel (pytest-xdist), one worker per core this process may use (taskset counts), at most
# 4: a file's tests stay in one worker, so its module fixtures are built once.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1))")

test: $(VENV)/.test
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

# The gate (.ci/run, before the tests; under a minute): ruff's rules and format, pyright on the library, vulture.
lint: $(VENV)/.lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pyright
	$(BIN)/vulture

format: $(VENV)/.lint
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test-slow: $(VENV)/.test
	$(BIN)/python -m pytest -q -m slow

test-all: $(VENV)/.test
	$(BIN)/python -m pytest -q

# Re-resolve the pinned set: a fresh venv takes the newest versions pyproject.toml allows, runs nothing, and writes
# them to constraints.txt. Then run `make test` on it before committing the new pins.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q -e ".[video,test,torch,tpu,lint]"
	{ sed -n '1,2p' constraints.txt; .venv-lock/bin/pip freeze --exclude-editable | sed -E 's/^(torch==[0-9.]+)\+cpu/\1/'; } \
	  > constraints.txt.new && mv constraints.txt.new constraints.txt && rm -rf .venv-lock

clean:
	rm -rf demo_out data runs .pytest_cache
