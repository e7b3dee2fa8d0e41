# unilora_rs: `make demo` runs the main job, `make test` runs every check and test.
# Both create .venv, install pinned Python dependencies and build the extension first:
# `make demo` only what the demo runs (requirements/base.txt, torch.txt, data.txt), while
# the Rust build runs; `make test` adds the rest (lint and test tools, PEFT, TRL,
# DeepSpeed, Ray, llama.cpp, the LLM's GGUF).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q
# uv (pinned in requirements/base.txt) downloads in parallel: the torch stack in a
# fraction of pip's time. pip stays for llama-cpp-python, whose build it caches.
UV     := $(VENV)/bin/uv pip install -q --python $(PY)
# One stamp per set-up step: the venv with the build tool, the demo's packages, the rest.
VENV_STAMP := $(VENV)/.base-stamp
DEMO_STAMP := $(VENV)/.demo-stamp
TEST_STAMP := $(VENV)/.test-stamp
# The demo's pins constrain every later install, so the test set-up keeps them.
PINS   := -c requirements/base.txt -c requirements/torch.txt
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: all build demo lint test test-rust test-python smoke bench clean

all: test

$(VENV_STAMP): requirements/base.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -r requirements/base.txt
	touch $@

$(DEMO_STAMP): $(VENV_STAMP) requirements/torch.txt requirements/data.txt
	$(UV) $(PINS) -r requirements/torch.txt
	$(UV) --no-deps -r requirements/data.txt
	touch $@

$(TEST_STAMP): $(DEMO_STAMP) requirements/dev.txt requirements/integrations.txt \
               requirements/distributed.txt requirements/data-llm.txt requirements/llamacpp.txt
	$(UV) $(PINS) -r requirements/dev.txt -r requirements/integrations.txt \
	    -r requirements/distributed.txt
	$(UV) --no-deps -r requirements/data-llm.txt
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) $(PINS) -r requirements/llamacpp.txt
	touch $@

build: $(VENV_STAMP)
	PIP_QUIET=1 maturin develop --release -q

# The Rust build (CPU) and the demo's downloads (network, disk) run side by side.
demo: $(VENV_STAMP)
	$(MAKE) --no-print-directory -j2 build $(DEMO_STAMP)
	unilora demo

lint: $(TEST_STAMP) build
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --all-features --release -- -D warnings
	ruff check python tests benches examples .ci
	ruff format --check python tests benches examples .ci
	$(PY) -m mypy.stubtest unilora_rs._core

test-rust:
	cargo test -p unilora-core --release --all-features

test-python: $(TEST_STAMP) build
	$(PY) -m pytest

test: lint test-rust test-python

# The abi3 wheel and the sdist, each installed into a clean venv and smoke-tested there
# (.ci/smoke_installed.sh; README.md, "Install").
smoke: $(VENV_STAMP)
	bash .ci/smoke_installed.sh

bench: $(TEST_STAMP) build
	$(PY) benches/bench_reconstruct.py
	$(PY) benches/bench_merge.py
	$(PY) benches/bench_train.py
	$(PY) benches/bench_multi.py

clean:
	rm -rf target $(VENV) .pytest_cache .ruff_cache .mypy_cache
