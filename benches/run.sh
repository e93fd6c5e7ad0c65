#!/usr/bin/env bash
# Builds the Rust benchmark binary and runs every CPU benchmark (reference and ours back to back),
# printing a table and writing benches/results/*.json. Extra arguments go to benches/run.py.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1 PIVOT_PYTHON="$ROOT/.venv/bin/python"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pivot-lab/target}"
cargo build --quiet -p pivot --example bench_train
exec "$ROOT/.venv/bin/python" benches/run.py --bin "$CARGO_TARGET_DIR/debug/examples/bench_train" "$@"
