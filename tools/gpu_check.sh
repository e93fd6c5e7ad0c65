#!/usr/bin/env bash
# The device check of issue 15 (NCCL and the paper pair's memory), prepared so that a session with a
# lent GPU runs it in one call. Two halves:
#
#   tools/gpu_check.sh prepare    here, on the CPU machine: builds pivot-train and bench_train with
#                                 the NCCL shim embedded, into benches/bin/ (ignored by git), with
#                                 Rust's libstd beside them (the GPU machine has no Rust toolchain)
#   tools/gpu_check.sh run OUT    on the GPU machine (carry benches/bin): writes OUT/gpu_check.log and
#                                 OUT/gpu_check.json
#
# The device call, e.g.:  run(command="tools/gpu_check.sh run $OUT", carry=["benches/bin"], timeout_s=540)
#
# What `run` does, each step under its own time limit, going on after a failure:
#  1. `pivot-train --check-dist nccl` under torchrun at W = 1: every collective over NCCL on CUDA
#     tensors, and CPU tensors staged through the GPU;
#  2. 3 DPO steps of the tiny MLLM over NCCL at W = 1 (device = "cuda", backend = "nccl");
#  3. the paper pair (SigLIP2-So400m/16-384 + Qwen2.5-0.5B, bf16, random weights) in DPO, 1 pair per
#     step, 512/448 text tokens, without and with activation checkpointing of tower and LM: the
#     per-process peak of nvidia-smi's used memory (docs/memory.md: "What a GPU run must measure";
#     its table's 0.5B W = 1 row is the estimate to compare with, 20.39 / 17.24 GiB, which counts
#     neither the CUDA context nor the allocator's slack).
# Nothing here asserts a number: it reports what it measured.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/benches/bin"

prepare() {
  set -e
  cd "$ROOT"
  export LIBTORCH_USE_PYTORCH=1 PATH="$ROOT/.venv/bin:$PATH" PIVOT_PYTHON="$ROOT/.venv/bin/python"
  make -s cuda-headers gloo
  # The prelude tests' build (Makefile PRELUDE_TEST: warm slot 0, -Cprefer-dynamic) builds
  # pivot-train; bench_train comes from the same build. Rust's std is then a shared library,
  # which travels beside them.
  local host target
  host="$(rustc -vV | sed -n 's/^host: //p')"
  target="${PIVOT_SLOT_TARGET:-${PIVOT_CACHE_DIR:-$HOME/.cache/pivot-lab}/slots/0/target}"
  touch prelude/src/lib.rs
  RUSTFLAGS=-Cprefer-dynamic CARGO_TARGET_DIR="$target" cargo test -p pivot --target "$host" --test train_launch --no-run
  RUSTFLAGS=-Cprefer-dynamic CARGO_TARGET_DIR="$target" cargo build -p pivot --target "$host" --example bench_train
  mkdir -p "$BIN"
  cp "$target/$host/debug/pivot-train" "$target/$host/debug/examples/bench_train" "$BIN/"
  cp "$(rustc --print sysroot)/lib/rustlib/$host/lib"/libstd-*.so "$BIN/"
  ls -la "$BIN"
}

# Peak nvidia-smi memory (MiB) of the processes of a command, polled every 0.2 s; prints JSON.
PEAK_PY='
import json, subprocess, sys, threading, time
cmd, peak, done = sys.argv[1:], [0.0], threading.Event()
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
def poll():
    while not done.is_set():
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            f = [x.strip() for x in line.split(",")]
            if len(f) == 2 and f[0] == str(p.pid) and f[1].isdigit():
                peak[0] = max(peak[0], float(f[1]))
        time.sleep(0.2)
t = threading.Thread(target=poll, daemon=True); t.start()
out, _ = p.communicate(); done.set(); t.join()
sys.stderr.write(out)
rows = [l for l in out.splitlines() if l.startswith("{")]
r = json.loads(rows[-1]) if rows else {}
r.update(rc=p.returncode, gpu_peak_mib_nvidia_smi=peak[0])
print(json.dumps(r))
'

run() {
  local out="$1"
  mkdir -p "$out"
  exec > >(tee "$out/gpu_check.log") 2>&1
  # The box's torch (the binaries' rpath names this machine's venv) and the carried libstd.
  export LD_LIBRARY_PATH="$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')/lib:$BIN:${LD_LIBRARY_PATH:-}"
  export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())'
  local torchrun=(python3 -m torch.distributed.run --standalone --nproc-per-node 1 --no-python)
  local results="$out/gpu_check.json" tmp
  tmp="$(mktemp -d)"
  echo "{" > "$results"

  echo "== 1. collectives over NCCL at W = 1"
  timeout 120 "${torchrun[@]}" "$BIN/pivot-train" --check-dist nccl
  echo "  \"check_dist_nccl_rc\": $?," >> "$results"

  echo "== 2. 3 DPO steps of the tiny MLLM over NCCL at W = 1"
  cat > "$tmp/dpo.toml" <<TOML
stage = "dpo"
device = "cuda"
backend = "nccl"
[model]
seed = 0
output = "$tmp/dpo"
[data]
world = { seed = 0, samples = 16 }
[dpo.train]
lr = 1e-3
batch_size = 2
max_steps = 3
live = false
TOML
  timeout 180 "${torchrun[@]}" "$BIN/pivot-train" "$tmp/dpo.toml"
  echo "  \"dpo_nccl_w1_rc\": $?," >> "$results"
  cat "$tmp/dpo/log.csv" 2>/dev/null

  for recompute in none both; do
    echo "== 3. paper pair, DPO, 1 pair per step, recompute = $recompute"
    local r
    r="$(timeout 200 python3 -c "$PEAK_PY" "$BIN/bench_train" dpo --size gpu --device cuda --batch 1 --steps 3 --warmup 1 --threads 4 --recompute "$recompute")"
    echo "$r"
    echo "  \"paper_pair_dpo_recompute_$recompute\": ${r:-null}," >> "$results"
  done
  echo "  \"done\": true" >> "$results"
  echo "}" >> "$results"
  rm -rf "$tmp"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run "${2:?usage: tools/gpu_check.sh run OUT}" ;;
  *) echo "usage: tools/gpu_check.sh prepare | run OUT" >&2; exit 2 ;;
esac
