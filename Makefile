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

.PHONY: all install test pytest cpp-test cuda-check triton-aot-check install-check gpu-wheelhouse demo bench clean \
	fuzz sanitize docs

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
	$(DOCS)

pytest: install
	$(VENV)/bin/pytest

# C++ build of the same sources against the installed torch, and its ctest.
cpp-test: install
	cmake -S . -B build/cmake -DPython_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" > build/cmake.log 2>&1 \
	  || (cat build/cmake.log; exit 1)
	cmake --build build/cmake -j2 > build/cmake-build.log 2>&1 || (tail -50 build/cmake-build.log; exit 1)
	ctest --test-dir build/cmake --output-on-failure

# The property-based tests (tests/test_properties.py) under the hypothesis profile "fuzz":
# random examples for FUZZ_SECONDS per test and backend (times the test's weight: about
# 7.6 x FUZZ_SECONDS in all, 12 min at 90 s), then the bank-state machine
# (tests/test_bank_state_machine.py: FUZZ_SECONDS per bank kind, 6 kinds), niced. Failures are kept in .hypothesis/ and
# replayed first next time; build/fuzz-report.txt lists the examples each test passed.
FUZZ_SECONDS ?= 90
fuzz: install
	@mkdir -p build; rm -f build/fuzz-report.txt; t0=$$(date +%s); \
	DPS_FAST_HYPOTHESIS_PROFILE=fuzz DPS_FAST_FUZZ_SECONDS=$(FUZZ_SECONDS) \
	  DPS_FAST_FUZZ_REPORT=$(abspath build/fuzz-report.txt) nice -n 19 $(VENV)/bin/pytest tests/test_properties.py tests/test_bank_state_machine.py; \
	rc=$$?; echo "make fuzz: $$(($$(date +%s) - t0)) s, pytest exit $$rc"; cat build/fuzz-report.txt; exit $$rc

# The C++ ops built with AddressSanitizer + UndefinedBehaviorSanitizer (CMake, DPS_FAST_SANITIZE,
# build/sanitize): their ctest, then the CPU kernel tests with that library loaded in place of
# dps_fast._C (tests/conftest.py, DPS_FAST_TEST_OPS_LIBRARY), the ASan runtime preloaded into Python
# with libstdc++ (else ASan cannot intercept C++ throws of libraries loaded later, e.g. Triton's).
# Reports go to build/sanitize/report.* (pytest's capture would swallow them) and are printed.
# Leak detection is off: the interpreter keeps its objects alive until exit by design.
SANITIZE_TESTS = tests/test_dps_cross_entropy.py tests/test_soft_cross_entropy.py tests/test_supcon.py \
	tests/test_validation.py tests/test_edge_policies.py tests/test_properties.py tests/test_cpu_row_kernels.py \
	tests/test_topk_kernel.py
sanitize: install
	@mkdir -p build; t0=$$(date +%s); \
	cmake -S . -B build/sanitize -DDPS_FAST_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug -DPython_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	  > build/sanitize-cmake.log 2>&1 || { cat build/sanitize-cmake.log; exit 1; }; \
	cmake --build build/sanitize -j$${MAX_JOBS:-2} --target dps_fast_ops test_ops > build/sanitize-build.log 2>&1 \
	  || { tail -50 build/sanitize-build.log; exit 1; }; t1=$$(date +%s); \
	rm -f build/sanitize/report.*; \
	export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1:log_path=$(abspath build/sanitize/report) \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$(abspath build/sanitize/report); \
	build/sanitize/test_ops || { cat build/sanitize/report.* 2>/dev/null; exit 1; }; \
	LD_PRELOAD="$$($${CXX:-c++} -print-file-name=libasan.so) $$($${CXX:-c++} -print-file-name=libstdc++.so)" \
	  DPS_FAST_TEST_OPS_LIBRARY=$(abspath build/sanitize/libdps_fast_ops.so) \
	  $(VENV)/bin/pytest -q -p no:cacheprovider -k "not triton" $(SANITIZE_TESTS) \
	  || { cat build/sanitize/report.* 2>/dev/null; exit 1; }; \
	if ls build/sanitize/report.* >/dev/null 2>&1; then cat build/sanitize/report.*; exit 1; fi; \
	echo "make sanitize: build $$((t1 - t0)) s, tests $$(($$(date +%s) - t1)) s, clean"

# The documentation site (mkdocs.yml, docs/) into site/, offline, with --strict: fails on a
# broken link or anchor, a page missing from the nav, an API name mkdocstrings cannot collect,
# or a public name of dps_fast without a docstring (tools/check_docstrings.py, run first).
# `make test` runs the same two commands after its other checks (about 15 s).
DOCS = $(PY) tools/check_docstrings.py && NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
docs: install
	$(DOCS)

# Compile-check every CUDA kernel for sm_90 with nvcc, when nvcc exists.
cuda-check: install
	@$(PY) tools/cuda_compile_check.py

# Compile every Triton kernel (the GPU launchers' configs) to an sm_90 cubin, no GPU needed;
# fails on a compile error or a register spill.
triton-aot-check: install
	@TRITON_INTERPRET=0 $(PY) tools/triton_aot_check.py

# The two user installs in fresh venvs (README "Install"), slow (the first import
# compiles the ops: minutes here), so not in `make test`: pip's default isolated
# build (`pip install .`), then `pip install -e .`. Each venv gets the local torch
# 2.13 wheel first; the check fails if pip replaced it, if the fused 'cpu' backend is
# missing, or if it disagrees with the reference. Each venv has its own fresh cache.
CHECK_VENV ?= /tmp/dps_fast-install-check
define INSTALL_CHECK_PY
import dps_fast, torch
print(dps_fast.available_backends(), torch.ops.dps_fast.dps_ce_fwd)
assert "cpu" in dps_fast.available_backends(), "the fused cpu backend is missing"
x, t = torch.randn(64, 10), torch.softmax(torch.randn(64, 10), -1)
got = dps_fast.soft_cross_entropy(x, t, backend="cpu")
torch.testing.assert_close(got, dps_fast.soft_cross_entropy(x, t, backend="reference"))
print("fused cpu matches the reference:", float(got))
assert "dps_ce_eager" in dps_fast._dispatch._eager_bindings, "dps_fast._C's binding of the eager op is missing"
z, idx, prior = torch.randn(8, 10), torch.arange(8), dps_fast.init_prior(torch.arange(8) % 10, 10)
step = dps_fast.dps_cross_entropy(z, idx, prior.clone())
torch.testing.assert_close(step, dps_fast.dps_cross_entropy(z, idx, prior.clone(), backend="reference"))
print("the eager op through dps_fast._C matches the reference:", float(step))
endef
export INSTALL_CHECK_PY

install-check:
	@set -eo pipefail; for mode in plain editable; do \
	  venv=$(CHECK_VENV)-$$mode; if [ $$mode = editable ]; then flag=-e; else flag=; fi; \
	  rm -rf $$venv; python3 -m venv $$venv; \
	  $$venv/bin/pip install -q torch==2.13.0 2>&1 | { grep -v "is ignored" || true; }; \
	  before=$$($$venv/bin/pip show torch | grep ^Version); \
	  t0=$$(date +%s); $$venv/bin/pip install -q $$flag . 2>&1 | { grep -v "is ignored" || true; }; t1=$$(date +%s); \
	  test "$$before" = "$$($$venv/bin/pip show torch | grep ^Version)" || { echo "pip replaced torch"; exit 1; }; \
	  (cd /tmp && DPS_FAST_CACHE_DIR=$$venv/cache $$venv/bin/python -c "$$INSTALL_CHECK_PY"); t2=$$(date +%s); \
	  (cd /tmp && DPS_FAST_CACHE_DIR=$$venv/cache $$venv/bin/python -c "$$INSTALL_CHECK_PY" >/dev/null); t3=$$(date +%s); \
	  echo "install-check $$mode (pip install $$flag .): install $$((t1-t0)) s, first import $$((t2-t1)) s," \
	       "next import $$((t3-t2)) s"; \
	done

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
	cd benchmarks && ../$(PY) bandwidth_probe.py --out results/bandwidth-probe.json
	cd benchmarks && ../$(PY) overhead_probe.py --threads 2 --out results/overhead-probe.json

clean:
	rm -rf build dist *.egg-info runs site
