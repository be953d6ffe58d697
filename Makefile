# Two entry points that work on a fresh machine with Python 3.11+: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: demo test test-slow test-all clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The demo needs only the runtime (plus ffmpeg for MP4 outputs); tests add pytest and the PyTorch extras.
$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[video]"
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[video,test,torch]"
	touch $@ $(VENV)/.demo

demo: $(VENV)/.demo
	$(BIN)/layerflow demo --workdir demo_out

test: $(VENV)/.test
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(VENV)/.test
	$(BIN)/python -m pytest -q -m slow

test-all: $(VENV)/.test
	$(BIN)/python -m pytest -q

clean:
	rm -rf demo_out data runs .pytest_cache
