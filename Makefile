# Two commands on a fresh machine:
#   make run        set up .venv and run the main job (configs/tiny.yaml, CPU, minutes)
#   make test       set up .venv with test extras and run the whole test suite
#   make test-fast  the suite without the slow end-to-end tests (the edit-test loop)
#
# torch is installed before the project so that nothing pulls a CUDA build by accident:
# without an NVIDIA GPU we install $(TORCH_SPEC) (a CPU wheel here; elsewhere point
# TORCH_INDEX at PyTorch's CPU wheel index); with one, the CUDA build of the same version.
# Every other package is installed at the exact version in $(CONSTRAINTS), the versions the
# suite last passed on (`make constraints` rewrites it from .venv); pyproject.toml keeps
# the lower bounds for users who install the package themselves. pip installs torch (it
# finds a local torch wheel where pip is configured with one; uv reads no pip config) and
# uv, at its pinned version; uv installs the rest: it fetches and unpacks in parallel and
# byte-compiles on every core (the test extras: 27 s against pip's 97 s, 2 cores, a cold
# cache). It leaves the installed torch alone: 2.13.0+cpu satisfies torch==2.13.0.

PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
CONSTRAINTS ?= constraints.txt
# torch's version is the constraints file's (one owner); a local label such as +cpu is
# left to the index: torch==2.13.0 matches 2.13.0+cpu and the CUDA wheel alike.
TORCH_SPEC ?= $(or $(shell grep -m1 '^torch==' $(CONSTRAINTS) 2>/dev/null),torch)
TORCH_INDEX ?=
CONFIG     ?= configs/tiny.yaml
PYTEST_ARGS ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test test-fast setup setup-test constraints lint clean

run: $(VENV)/.installed
	$(BIN)/lmforge run $(CONFIG)

# The 30 slowest tests are listed at the end of every run (CI's output included). Three
# pytest-xdist workers on 2 cores: the Slurm and the Ray cluster tests mostly wait on their
# schedulers, each on a worker of its own, while the other two keep the cores busy (measured:
# 3 workers 18:52, 2 workers 22:33, on the 2-core machine); tests that share a fixture stay on
# one worker (tests/xdist_groups.py). TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 3
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

test: setup-test
	$(BIN)/python -m pytest $(XDIST) --durations=30 $(PYTEST_ARGS)

test-fast: setup-test
	$(BIN)/python -m pytest $(XDIST) -m "not slow" --durations=30 $(PYTEST_ARGS)

setup: $(VENV)/.installed
# The test extras and DeepSpeed's op build side by side (-j2): uv installs while the compiler
# builds the two CPU ops (~135 CPU-s of the ~2 minutes a fresh set-up takes on 2 cores).
setup-test:
	$(MAKE) --no-print-directory -j2 $(VENV)/.installed-test $(VENV)/.ds-ops

UV_INSTALL = $(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -c $(CONSTRAINTS)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

$(BIN)/uv: | $(BIN)/python
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) uv

$(VENV)/.torch: | $(BIN)/python
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing CUDA torch ($(TORCH_SPEC))"; \
		$(BIN)/python -m pip install -q $(TORCH_SPEC); \
	else \
		echo "no GPU: installing CPU torch ($(TORCH_SPEC))"; \
		$(BIN)/python -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	touch $@

$(VENV)/.installed: $(VENV)/.torch $(BIN)/uv pyproject.toml $(CONSTRAINTS)
	$(UV_INSTALL) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.deepspeed pyproject.toml $(CONSTRAINTS)
	$(UV_INSTALL) -e ".[test]"
	touch $@ $(VENV)/.installed

# DeepSpeed (and what it imports) first, at the constrained version, so that its ops can be
# built while the rest installs; the later install finds it satisfied and leaves it alone.
$(VENV)/.deepspeed: $(VENV)/.torch $(BIN)/uv $(CONSTRAINTS)
	$(UV_INSTALL) deepspeed
	touch $@

# DeepSpeed's CPU ops the suite's runs use (shared-memory collectives, CPU Adam), built once
# here instead of inside the first test that needs each; clears a build lock a killed run
# left behind (tests/conftest.py does that too, at every session start).
$(VENV)/.ds-ops: $(VENV)/.deepspeed
	OMP_NUM_THREADS=1 $(BIN)/python tests/deepspeed_ops.py
	touch $@

# Rewrites $(CONSTRAINTS) from what .venv holds now: run it after upgrading a package
# and seeing `make test` pass. torch keeps its public version (no +cpu / +cu label).
constraints: $(VENV)/.installed-test
	{ echo "# Exact versions \`make test\` last passed on; \`make constraints\` rewrites this file"; \
	  echo "# from .venv. Used as pip -c by make run / make test; pyproject.toml keeps lower bounds."; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'; \
	} > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check pipeline model launch tests benchmarks

clean:
	rm -rf runs .pytest_cache
