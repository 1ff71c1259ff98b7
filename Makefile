# `make demo`: set up and run the main job end to end on the embedded default corpus.
# `make test`: set up and run the whole test suite (what CI runs), the CUDA build included.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch: an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
# The CUDA build (make test-cuda-build): the newest torch of the supported range, CUDA 13, in a venv of its
# own, the extension compiled for sm_80 (A100) and sm_90 (H100). No GPU is needed to build or to run its CPU ops.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH := torch==2.14.1
CUDA_ARCHS := 8.0;9.0
# What the CUDA build runs: its own checks and the C++ ops and sampler against the reference.
CUDA_BUILD_TESTS := tests/test_cuda_compile.py tests/test_cpp_ops.py tests/test_sampler.py tests/test_model.py

.PHONY: install install-test browser demo test test-cuda-build bench gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# mingpt._C is optional here: a failed build installs without it, and this says why.
install: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH) ninja wheel "setuptools>=64"
	$(BIN)/pip install --quiet --no-build-isolation -e .
	@$(BIN)/python -c "from mingpt.ops.extension import UNAVAILABLE_REASON as r; r and print('WARNING:', r)"

# Debian's Chromium and chromedriver for the browser test (tests/test_playground.py), skipped when
# present; as root with apt-get (CI), else the test skips and says why (and fails under CI=true).
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "make: chromium and chromium-driver are not installed and cannot be here (apt-get as root):" \
	  "the browser test will skip" >&2; fi

# CI: a build of mingpt._C that fails is an error (MINGPT_REQUIRE_EXTENSION=1).
install-test: $(BIN)/python browser
	$(BIN)/pip install --quiet $(TORCH) ninja wheel "setuptools>=64"
	MINGPT_REQUIRE_EXTENSION=1 $(BIN)/pip install --quiet --no-build-isolation -e ".[test]"

demo: install
	$(BIN)/python -m mingpt.prepare --data_dir data/default
	$(BIN)/python -m mingpt.train --preset demo --data_dir data/default --out_dir out/demo --overwrite
	$(BIN)/python -m mingpt.sample --ckpt out/demo --start 好看 --sentiment pos --num_samples 5 --seed 1
	$(BIN)/python -m mingpt.sample --ckpt out/demo --start 难看 --sentiment neg --num_samples 5 --seed 1

test: install-test test-cuda-build
	$(BIN)/python -m pytest

# A regular (not editable) install, so its mingpt._C lands in $(CUDA_VENV), never beside the sources where
# the CPU build's lives; python -P and the pytest script keep the source tree's mingpt off the path.
test-cuda-build:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install --quiet $(CUDA_TORCH) ninja wheel "setuptools>=64" pytest hypothesis
	TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MINGPT_FORCE_CUDA=1 MINGPT_REQUIRE_EXTENSION=1 \
	  $(CUDA_VENV)/bin/pip install --quiet --no-build-isolation .
	$(CUDA_VENV)/bin/python -P -c "import torch, mingpt._C as c; i = c.build_info(); \
	  assert i['cuda'], i; print('mingpt._C CUDA build:', i, 'torch', torch.__version__, torch.version.cuda)"
	MINGPT_EXPECT_CUDA_BUILD=1 $(CUDA_VENV)/bin/pytest -q -p no:cacheprovider $(CUDA_BUILD_TESTS)

bench: install
	$(BIN)/python -m mingpt.bench --json bench.json

# The GPU acceptance run (benchmarks/gpu_check.py), with the python that holds a CUDA build of torch: installs
# mingpt into it (pip -e, nothing downloaded) with mingpt._C built for the GPU it finds, runs the GPU tests, a
# convergence run and the bench, and prints a summary (files in gpu-check/). Exit 3: no GPU here.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out gpu-check
