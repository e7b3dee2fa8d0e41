# unilora_rs: `make demo` runs the main job, `make test` runs every check and test.
# Both create .venv, install pinned Python dependencies and build the extension first.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-stamp
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: all build demo lint test test-rust test-python bench clean

all: test

$(STAMP): requirements/dev.txt requirements/torch.txt requirements/data.txt requirements/distributed.txt \
          requirements/llamacpp.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/dev.txt -r requirements/torch.txt -r requirements/distributed.txt
	$(PY) -m pip install -q --no-deps -r requirements/data.txt
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -r requirements/llamacpp.txt
	touch $(STAMP)

build: $(STAMP)
	maturin develop --release -q

demo: build
	unilora demo

lint: build
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --all-features --release -- -D warnings
	ruff check python tests benches examples
	ruff format --check python tests benches examples
	$(PY) -m mypy.stubtest unilora_rs._core

test-rust:
	cargo test -p unilora-core --release --all-features

test-python: build
	$(PY) -m pytest

test: lint test-rust test-python

bench: build
	$(PY) benches/bench_reconstruct.py
	$(PY) benches/bench_merge.py
	$(PY) benches/bench_train.py
	$(PY) benches/bench_multi.py

clean:
	rm -rf target $(VENV) .pytest_cache .ruff_cache .mypy_cache
