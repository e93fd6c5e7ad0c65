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

TORCH_STAMP  := $(VENV)/.torch-2.11.0
PYDEPS_STAMP := $(VENV)/.pydeps-$(shell sha1sum tests/requirements.txt | cut -c1-12)
FIXTURES     := $(PIVOT_FIXTURES)/.stamp

.PHONY: demo test build venv pydeps fixtures rust-src clean-fixtures

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
	cargo build --workspace --all-targets

demo: venv
	cargo run --quiet -p pivot --example quickstart

test: pydeps fixtures rust-src
	cargo test --workspace --no-fail-fast

clean-fixtures:
	rm -rf $(PIVOT_FIXTURES)
