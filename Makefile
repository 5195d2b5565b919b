# Two commands a new user needs: `make demo` (train on Shakespeare) and `make test`.
# Each creates .venv when it is missing and installs only what it needs: the demo gets
# gptlab with its built-in corpus (.[corpus]), the tests get the dev tools too (.[dev]).
# Each install leaves its own stamp, so `make demo` then `make test` adds what is missing.
# TORCH_SPEC picks the torch build pip installs first; override it for your platform,
# e.g. `make demo TORCH_SPEC='torch>=2.4'`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-machines lint setup clean

# The venv and torch, shared by both installs below.
$(VENV)/.torch-installed:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.demo-installed: pyproject.toml $(VENV)/.torch-installed
	$(BIN)/python -m pip install -q -e ".[corpus]"
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.torch-installed
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.dev-installed

demo: $(VENV)/.demo-installed
	$(BIN)/gptlab train

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q

# The suite as other machines run it: two threads (sums split otherwise) and AVX2 kernels
# (a CPU without AVX512). Not in CI (it triples the time); run it before changing numerics.
test-machines: $(VENV)/.dev-installed
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q
	ATEN_CPU_CAPABILITY=avx2 $(BIN)/python -m pytest -q

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs
