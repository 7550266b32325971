# The two commands (README): `make test` and `make demo`. Both set everything up
# on a fresh machine: .venv, pinned requirements, the package with its C++ kernels.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.deps-stamp
# Pinned allocator: without it eager timings swing 2x. A 32 MB mmap
# threshold keeps buffers up to 32 MB on the heap (no page faults on every call).
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 1073741824
# Triton runs here (no GPU) only in its interpreter; must be set before import.
export TRITON_INTERPRET ?= 1

.PHONY: all install test pytest cpp-test cuda-check triton-aot-check gpu-wheelhouse demo bench clean

all: test

$(PY):
	python3 -m venv $(VENV)

$(STAMP): requirements.txt requirements-dev.txt requirements-examples.txt | $(PY)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q -r requirements-examples.txt -c requirements.txt
	touch $@

install: $(STAMP)
	$(PIP) install -q --no-build-isolation .

test: install
	$(VENV)/bin/pytest
	$(MAKE) --no-print-directory cpp-test
	$(MAKE) --no-print-directory cuda-check
	$(MAKE) --no-print-directory triton-aot-check

pytest: install
	$(VENV)/bin/pytest

# C++ build of the same sources against the installed torch, and its ctest.
cpp-test: install
	cmake -S . -B build/cmake -DPython_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" > build/cmake.log 2>&1 \
	  || (cat build/cmake.log; exit 1)
	cmake --build build/cmake -j2 > build/cmake-build.log 2>&1 || (tail -50 build/cmake-build.log; exit 1)
	ctest --test-dir build/cmake --output-on-failure

# Compile-check every CUDA kernel for sm_90 with nvcc, when nvcc exists.
cuda-check: install
	@$(PY) tools/cuda_compile_check.py

# Compile every Triton kernel (the GPU launchers' configs) to an sm_90 cubin, no GPU needed;
# fails on a compile error or a register spill.
triton-aot-check: install
	@TRITON_INTERPRET=0 $(PY) tools/triton_aot_check.py

# Pure-Python build/test wheels for an offline GPU machine (Python 3.12) that may lack them;
# carry build/wheelhouse with the device run, benchmarks/gpu_check.sh installs from it.
gpu-wheelhouse: | $(PY)
	$(PIP) download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
	  --platform manylinux_2_17_x86_64 -d build/wheelhouse pytest pytest-xdist setuptools wheel ninja

demo: install
	$(VENV)/bin/dps-train --demo --out runs/demo --overwrite

bench: install
	$(VENV)/bin/pytest benchmarks -p no:cacheprovider --benchmark-enable --benchmark-only -q \
	  -o addopts="" --benchmark-json=benchmarks/results/pytest-benchmark-cpu.json
	$(PY) benchmarks/summarize.py benchmarks/results

clean:
	rm -rf build dist *.egg-info runs
