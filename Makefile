# Two commands on a fresh machine:
#   make run    set up .venv and run the main job (configs/tiny.yaml, CPU, minutes)
#   make test   set up .venv with test extras and run the test suite
#
# torch is installed before the project so that nothing pulls a CUDA build by accident:
# without an NVIDIA GPU we install $(TORCH_SPEC) (a CPU wheel here; elsewhere point
# TORCH_INDEX at PyTorch's CPU wheel index); with one, the default CUDA build.

PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
CONFIG     ?= configs/tiny.yaml
PYTEST_ARGS ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test setup setup-test lint clean

run: $(VENV)/.installed
	$(BIN)/lmforge run $(CONFIG)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

$(VENV)/.torch: | $(BIN)/python
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing CUDA torch"; $(BIN)/python -m pip install -q torch; \
	else \
		echo "no GPU: installing CPU torch ($(TORCH_SPEC))"; \
		$(BIN)/python -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.torch pyproject.toml
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@ $(VENV)/.installed

lint: $(VENV)/.installed-test
	$(BIN)/ruff check pipeline model launch tests benchmarks

clean:
	rm -rf runs .pytest_cache
