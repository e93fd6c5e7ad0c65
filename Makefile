# PIVOT Lab — set-up, main job and tests. Every target installs what it needs, idempotently:
#   make demo   the study on the embedded default data (main job)
#   make test   every test (what CI runs through .ci/run)
SHELL := /bin/bash
.DEFAULT_GOAL := demo

ROOT   := $(abspath .)
VENV   := $(ROOT)/.venv
PY     := $(VENV)/bin/python
# Build cache outside the clone, so a fresh clone on the same machine reuses compiled deps.
CACHE  ?= $(HOME)/.cache/pivot-lab
export CARGO_TARGET_DIR ?= $(CACHE)/target
# torch-sys finds libtorch through the venv's torch; our build scripts bake in an rpath.
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(VENV)/bin:$(PATH)
export PIVOT_PYTHON := $(PY)
export PIVOT_FIXTURES := $(ROOT)/tests/fixtures/generated
# The kernel (evcxr + rust-analyzer) builds in its own target dir: sharing one would unify
# features across the workspace and rebuild the prelude's dependencies for every change of either.
KERNEL_TARGET := $(CACHE)/target-kernel
export PIVOT_KERNEL_BIN := $(KERNEL_TARGET)/debug/pivot-kernel
export PIVOT_CACHE_DIR ?= $(CACHE)

TORCH_STAMP  := $(VENV)/.torch-2.11.0
PYDEPS_STAMP := $(VENV)/.pydeps-$(shell sha1sum tests/requirements.txt | cut -c1-12)
FIXTURES     := $(PIVOT_FIXTURES)/.stamp

.PHONY: demo test build kernel venv pydeps fixtures rust-src clean-fixtures

venv: $(TORCH_STAMP)
$(TORCH_STAMP):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.11.0
	touch $@

pydeps: $(PYDEPS_STAMP)
$(PYDEPS_STAMP): tests/requirements.txt $(TORCH_STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	rm -f $(VENV)/.pydeps-*; touch $@

fixtures: $(FIXTURES)
$(FIXTURES): tests/python/make_parity_fixtures.py $(PYDEPS_STAMP)
	$(PY) tests/python/make_parity_fixtures.py $(PIVOT_FIXTURES)
	touch $@

# evcxr (kernel, REPL) runs rust-analyzer over std, which needs the std sources.
rust-src:
	@rustup component list --installed 2>/dev/null | grep -q '^rust-src' || rustup component add rust-src

build: venv rust-src
	cargo build -p pivot --all-targets
	CARGO_TARGET_DIR=$(KERNEL_TARGET) cargo build -p pivot-kernel

# The Jupyter kernel: build it, pre-build the prelude into build slot 0 (so the first notebook
# cell does not wait for tch and polars), and register "Rust (PIVOT)" in .venv's Jupyter.
kernel: venv rust-src
	cargo fetch --quiet
	CARGO_TARGET_DIR=$(KERNEL_TARGET) cargo build -p pivot-kernel
	$(PIVOT_KERNEL_BIN) warm
	$(PIVOT_KERNEL_BIN) install --sys-prefix

demo: venv
	cargo run --quiet -p pivot --example quickstart

test: pydeps fixtures rust-src kernel
	cargo test -p pivot --no-fail-fast
	CARGO_TARGET_DIR=$(KERNEL_TARGET) cargo test -p pivot-kernel --no-fail-fast
	$(PY) -m pytest -q tests/kernel tests/notebooks

clean-fixtures:
	rm -rf $(PIVOT_FIXTURES)

# Benchmarks against the Python stack (CPU size; prints a table, writes benches/results/*.json).
# They report and never fail on speed. GPU size: see benches/README.md.
.PHONY: bench
bench: pydeps
	benches/run.sh
