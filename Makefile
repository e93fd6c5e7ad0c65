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

# No wheel cache: torch and its CUDA wheels are ~4 GB, and a cached copy of each doubles the disk
# a fresh machine needs (a CI run once died of "No space left on device" inside this install).
PIP_FLAGS    := --quiet --disable-pip-version-check --no-cache-dir
TORCH_STAMP  := $(VENV)/.torch-2.11.0
PYDEPS_STAMP := $(VENV)/.pydeps-$(shell sha1sum tests/requirements.txt | cut -c1-12)
FIXTURES     := $(PIVOT_FIXTURES)/.stamp

.PHONY: demo test build kernel venv pydeps fixtures rust-src clean-fixtures

venv: $(TORCH_STAMP)
$(TORCH_STAMP):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) torch==2.11.0
	touch $@

pydeps: $(PYDEPS_STAMP)
$(PYDEPS_STAMP): tests/requirements.txt $(TORCH_STAMP)
	$(VENV)/bin/pip install $(PIP_FLAGS) -r tests/requirements.txt
	rm -f $(VENV)/.pydeps-*; touch $@

fixtures: $(FIXTURES)
$(FIXTURES): tests/python/make_parity_fixtures.py tests/python/make_encoder_fixtures.py tests/python/make_bert_fixtures.py tests/python/make_study_fixtures.py tools/convert_moco_v3.py $(PYDEPS_STAMP)
	$(PY) tests/python/make_parity_fixtures.py $(PIVOT_FIXTURES)
	$(PY) tests/python/make_encoder_fixtures.py $(PIVOT_FIXTURES)
	$(PY) tests/python/make_bert_fixtures.py $(PIVOT_FIXTURES)
	$(PY) tests/python/make_study_fixtures.py $(PIVOT_FIXTURES)/study
	touch $@

# evcxr (kernel, REPL) runs rust-analyzer over std, which needs the std sources.
rust-src:
	@rustup component list --installed 2>/dev/null | grep -q '^rust-src' || rustup component add rust-src

build: venv rust-src cuda-headers
	cargo build -p pivot --all-targets
	CARGO_TARGET_DIR=$(KERNEL_TARGET) cargo build -p pivot-kernel -p pivot-repl

# The Jupyter kernel: build it, pre-build the prelude into build slot 0 (so the first notebook
# cell does not wait for tch and polars), and register "Rust (PIVOT)" in .venv's Jupyter. `warm`
# is a whole engine start (~40 s); it does nothing when it last ran for this same binary, prelude
# and environment (`--force` makes it run).
kernel: venv rust-src
	cargo fetch --quiet
	CARGO_TARGET_DIR=$(KERNEL_TARGET) cargo build -p pivot-kernel -p pivot-repl
	$(PIVOT_KERNEL_BIN) warm
	$(PIVOT_KERNEL_BIN) install --sys-prefix

# The study: every notebooks/NN_*.ipynb in order on the "pivot" kernel, in one folder (OUT), sharing
# checkpoints through `out_dir`, then an HTML report (OUT/index.html). Re-running skips notebooks
# already done with the same source; STUDY_ARGS=--force runs them all (see tools/run_study.py).
# PIVOT_SPARE_ENGINE=1: run_study.py starts the first notebook's engine before it (`pivot-kernel
# spare --detach`), and each notebook's kernel, once its engine is up, starts a spare engine for the
# next notebook (engine/src/spare.rs), which adopts it instead of starting its own, waiting up to
# PIVOT_SPARE_WAIT_SECS for it when it is still warming up (run_study.py gives a kernel 1800 s to
# answer). PIVOT_SPARE_ENGINE=0 turns it off; the last spare exits after PIVOT_SPARE_IDLE_SECS
# (default 1200) unadopted.
PIVOT_SPARE_ENGINE ?= 1
PIVOT_SPARE_WAIT_SECS ?= 600
demo: papermill kernel train-bin
	PIVOT_SPARE_ENGINE=$(PIVOT_SPARE_ENGINE) PIVOT_SPARE_WAIT_SECS=$(PIVOT_SPARE_WAIT_SECS) $(PY) tools/run_study.py --out $(OUT) $(STUDY_ARGS)

# The prelude's tests build into the kernel's warm build slot 0 with the flags evcxr uses there
# (Cargo.toml's [profile.dev] is evcxr's; -Cprefer-dynamic and an explicit --target are added
# here), so tch, polars and the rest compile once for both: cargo finds the slot's artefacts fresh.
HOST         := $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')
SLOT0_TARGET := $(PIVOT_CACHE_DIR)/slots/0/target
PRELUDE_TEST := RUSTFLAGS=-Cprefer-dynamic CARGO_TARGET_DIR=$(SLOT0_TARGET) cargo test -p pivot --target $(HOST)

# pivot-train with Gloo, for 03's launch section (`pivot::train::launch` finds it through
# PIVOT_TRAIN_BIN, which reaches the kernel) and tests/dist. Built in slot 0 with the features the
# prelude's tests give it (cli, test-hooks: inert unless a PIVOT_INJECT_* variable is set), so
# `make test`'s cargo test and `make demo` share one build of it. Without Gloo's headers it builds
# without data parallelism and a launch of 2 ranks fails with a message saying so.
export PIVOT_TRAIN_BIN ?= $(SLOT0_TARGET)/$(HOST)/debug/pivot-train
.PHONY: train-bin
train-bin: venv gloo cuda-headers
	RUSTFLAGS=-Cprefer-dynamic CARGO_TARGET_DIR=$(SLOT0_TARGET) cargo build -p pivot --features cli,test-hooks --bin pivot-train --target $(HOST)

test: pydeps fixtures rust-src kernel gloo cuda-headers
	$(PRELUDE_TEST) --no-fail-fast
	$(PY) -m pytest -q tests/dist
	CARGO_TARGET_DIR=$(KERNEL_TARGET) cargo test -p pivot-markers -p pivot-engine -p pivot-kernel -p pivot-repl --no-fail-fast
	command -v tmux >/dev/null || { apt-get update -qq && apt-get install -y -qq tmux; }
	PIVOT_REPL_BIN=$(KERNEL_TARGET)/debug/pivot-repl $(PY) -m pytest -q tests/kernel tests/repl tests/notebooks
	$(PY) -m pytest -q tests/papermill tests/lab tests/study

# Gloo's headers for the c10d shim (prelude/csrc/c10d_gloo.cpp): torch's wheel lacks them; Debian
# packages them. Without them the prelude builds without data parallelism (a cargo warning says so).
GLOO_HEADER := /usr/include/gloo/algorithm.h
.PHONY: gloo
gloo: $(GLOO_HEADER)
$(GLOO_HEADER):
	apt-get update -qq && apt-get install -y -qq libgloo-dev

# CUDA headers for the c10d NCCL shim (prelude/csrc/c10d_nccl.cpp), so the pivot-train built here
# (a CPU machine) can run NCCL on a GPU machine. Without them the prelude builds without NCCL (a
# cargo warning says so; a run that asks for NCCL says why it cannot).
CUDAHDR_STAMP := $(VENV)/.cuda-headers-$(shell sha1sum prelude/requirements-cuda-headers.txt | cut -c1-12)
.PHONY: cuda-headers
cuda-headers: $(CUDAHDR_STAMP)
$(CUDAHDR_STAMP): prelude/requirements-cuda-headers.txt $(TORCH_STAMP)
	$(VENV)/bin/pip install $(PIP_FLAGS) -r prelude/requirements-cuda-headers.txt
	rm -f $(VENV)/.cuda-headers-*; touch $@

clean-fixtures:
	rm -rf $(PIVOT_FIXTURES)

# Study and UI-test Python deps, each with its own idempotent stamp (like pydeps).
OUT             ?= out/study
STUDYDEPS_STAMP := $(VENV)/.studydeps-$(shell sha1sum tools/requirements-study.txt | cut -c1-12)
PAPERMILL_SRC   := tools/papermill_rust/pyproject.toml $(wildcard tools/papermill_rust/papermill_rust/*.py)
PAPERMILL_STAMP := $(VENV)/.papermill-rust-$(shell cat $(PAPERMILL_SRC) | sha1sum | cut -c1-12)
LABDEPS_STAMP   := $(VENV)/.labdeps-$(shell sha1sum tests/requirements-lab.txt | cut -c1-12)
.PHONY: studydeps papermill labdeps

studydeps: $(STUDYDEPS_STAMP)
$(STUDYDEPS_STAMP): tools/requirements-study.txt $(TORCH_STAMP)
	$(VENV)/bin/pip install $(PIP_FLAGS) -r tools/requirements-study.txt
	rm -f $(VENV)/.studydeps-*; touch $@

# papermill's Rust translator (tools/papermill_rust), reinstalled whenever its source changes.
papermill: $(PAPERMILL_STAMP)
$(PAPERMILL_STAMP): $(PAPERMILL_SRC) $(STUDYDEPS_STAMP)
	rm -rf tools/papermill_rust/build tools/papermill_rust/*.egg-info
	$(VENV)/bin/pip install $(PIP_FLAGS) --force-reinstall --no-deps ./tools/papermill_rust
	rm -rf tools/papermill_rust/build tools/papermill_rust/*.egg-info
	rm -f $(VENV)/.papermill-rust-*; touch $@

labdeps: $(LABDEPS_STAMP)
$(LABDEPS_STAMP): tests/requirements-lab.txt $(STUDYDEPS_STAMP)
	$(VENV)/bin/pip install $(PIP_FLAGS) -r tests/requirements-lab.txt
	rm -f $(VENV)/.labdeps-*; touch $@

# tests/papermill and tests/lab (the `test` recipe runs them); Chromium is installed by tests/lab,
# which leaves a screenshot of JupyterLab with the rendered figure here:
export PIVOT_LAB_SCREENSHOT ?= $(ROOT)/out/test/jupyterlab.png
test: papermill labdeps

# Benchmarks against the Python stack (CPU size; prints a table, writes benches/results/*.json).
# They report and never fail on speed. GPU size: see benches/README.md.
.PHONY: bench
bench: pydeps
	benches/run.sh
