# `make demo`: set up and run the main job end to end on the embedded default corpus.
# `make test`: set up and run the whole test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch: an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: install install-test browser demo test bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH) ninja wheel "setuptools>=64"
	$(BIN)/pip install --quiet --no-build-isolation -e .

# Debian's Chromium and chromedriver for the browser test (tests/test_playground.py), skipped when
# present; as root with apt-get (CI), else the test skips and says why (and fails under CI=true).
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "make: chromium and chromium-driver are not installed and cannot be here (apt-get as root):" \
	  "the browser test will skip" >&2; fi

install-test: $(BIN)/python browser
	$(BIN)/pip install --quiet $(TORCH) ninja wheel "setuptools>=64"
	$(BIN)/pip install --quiet --no-build-isolation -e ".[test]"

demo: install
	$(BIN)/python -m mingpt.prepare --data_dir data/default
	$(BIN)/python -m mingpt.train --preset demo --data_dir data/default --out_dir out/demo --overwrite
	$(BIN)/python -m mingpt.sample --ckpt out/demo --start 好看 --sentiment pos --num_samples 5 --seed 1
	$(BIN)/python -m mingpt.sample --ckpt out/demo --start 难看 --sentiment neg --num_samples 5 --seed 1

test: install-test
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m mingpt.bench --json bench.json
