# The README's commands. `make demo` and `make test` work on a fresh machine: they create .venv and
# install everything first (torch's CPU wheel here; set TORCH_SPEC for another build, e.g. a CUDA one).
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
TEST_STAMP := $(VENV)/.test-installed
# llama-cpp-python (the gguf-test and serve extras: llama.cpp judges our GGUF files and serves them on CPU) ships
# only as an sdist that compiles llama.cpp (about 10 minutes on 2 idle cores): its wheel is built once into this cache, outside the
# clone, and later installs take it from there. Portable (no -march=native), without the multimodal library.
WHEEL_CACHE ?= $(HOME)/.cache/trainer-wheels
LLAMA_CPP_SPEC := llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
# Two workers: a test mostly waits on a subprocess (imports, ranks, Slurm); the Slurm tests stay on one of them.
PYTEST_WORKERS ?= 2
DEMO_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install install-test demo test test-all test-fast lint bench tiny-base clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Torch first, so that the range in pyproject is satisfied by this build rather than a newer download.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[all]"
	touch $(STAMP)

install-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	mkdir -p $(WHEEL_CACHE)
	ls $(WHEEL_CACHE)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" \
		$(PY) -m pip wheel -q --no-deps -w $(WHEEL_CACHE) "$(LLAMA_CPP_SPEC)"
	$(PY) -m pip install -q --find-links $(WHEEL_CACHE) -e ".[all,gguf-test,serve,serve-test,preference-test,harness]"
	touch $(TEST_STAMP)

demo: install
	$(VENV)/bin/trainer train run.dir=$(DEMO_DIR)
	@echo "demo results: $(DEMO_DIR)/summary.json, $(DEMO_DIR)/loss_curve.png, $(DEMO_DIR)/final/"

# `make test` (CI) runs every test but the `extended` rest of the large matrices (strategies x PEFT methods, planner
# cases, families x methods), whose representative cases it keeps; `make test-all` runs everything.
test: install-test
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -m "not extended" $(PYTEST_ARGS)

test-all: install-test
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-fast: install-test
	$(PY) -m pytest -q -m "not slow and not slurm and not distributed" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check trainer launch tests benchmarks

bench: install
	$(PY) benchmarks/run.py

# Rebuild the embedded demo model from scratch (about 20 minutes on 2 CPU cores).
tiny-base: install
	$(PY) -m trainer.demo.build_base prepare build/tiny-base
	TINY_BASE_DIR=build/tiny-base $(VENV)/bin/trainer train experiment=tiny-base run.dir=build/tiny-base/run resume=never
	$(PY) -m trainer.demo.build_base install build/tiny-base/run

clean:
	rm -rf build runs outputs multirun .pytest_cache
