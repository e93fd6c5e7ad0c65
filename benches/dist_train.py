#!/usr/bin/env python3
"""Data-parallel step time: `pivot-train` DPO on the tiny MLLM at 1 rank (alone) and 2 ranks
(torchrun --standalone, c10d Gloo), plain data parallel and ZeRO-1 (`zero_stage = 1`), 1 thread
per rank, on the CPU; the same per-rank micro-batch, so 2 ranks do twice the work per step.
Reports the median step time of the steps after the first (from each run's log.csv) and the
payload bytes each rank all-reduces, reduce-scatters and all-gathers per step.

    benches/dist_train.py [--bin PATH] [--steps 12] [--batch 2] [--samples 64]

Writes benches/results/dist-train-<time>.json. Reports; never fails on speed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def default_bin() -> Path:
    host = re.search(r"^host: (\S+)", subprocess.run(["rustc", "-vV"], capture_output=True, text=True).stdout, re.M).group(1)
    cache = Path(os.environ.get("PIVOT_CACHE_DIR", Path.home() / ".cache/pivot-lab"))
    return cache / "slots/0/target" / host / "debug/pivot-train"


def config(tmp: Path, name: str, args, zero: int) -> Path:
    out = tmp / name
    path = tmp / f"{name}.toml"
    path.write_text(f"""stage = "dpo"
threads = 1
[model]
seed = 0
output = "{out}"
[data]
world = {{ seed = 0, samples = {args.samples} }}
[dpo.train]
lr = 1e-4
warmup_ratio = 0.0
batch_size = {args.batch}
grad_accum = {args.accum}
max_steps = {args.steps}
live = false
zero_stage = {zero}
""")
    return path


def step_seconds(out: Path) -> list[float]:
    lines = (out / "log.csv").read_text().splitlines()
    col = lines[0].split(",").index("step_seconds")
    return [float(l.split(",")[col]) for l in lines[1:]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--samples", type=int, default=64)
    args = ap.parse_args()
    binary = args.bin or default_bin()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "PIVOT_INJECT_NAN")} | {"OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for ranks, zero in ((1, 0), (2, 0), (2, 1)):
            name = f"r{ranks}z{zero}"
            cfg = config(tmp, name, args, zero)
            cmd = [str(binary), str(cfg)] if ranks == 1 else [str(torchrun), "--standalone", "--nproc-per-node", "2", "--no-python", str(binary), str(cfg)]
            t0 = time.time()
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode != 0:
                sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")
            steps = step_seconds(tmp / name)[1:]
            sent = lambda what: max([int(b) for b in re.findall(rf"(\d+) bytes {what}", p.stdout)] or [0])
            rows.append({
                "ranks": ranks,
                "zero_stage": zero,
                "pairs_per_step": args.batch * args.accum * ranks,
                "median_step_s": statistics.median(steps),
                "step_s": steps,
                "bytes_all_reduced_per_step_per_rank": sent("all-reduced"),
                "bytes_reduce_scattered_per_step_per_rank": sent("reduce-scattered"),
                "bytes_all_gathered_per_step_per_rank": sent("all-gathered"),
                "wall_s": time.time() - t0,
            })
    print(f"{'ranks':>5} {'zero':>4} {'pairs/step':>10} {'median step s':>13} {'pairs/s':>8} {'all-reduced B':>14} {'reduce-scat. B':>14} {'all-gath. B':>12}  (per step per rank)")
    for r in rows:
        print(
            f"{r['ranks']:>5} {r['zero_stage']:>4} {r['pairs_per_step']:>10} {r['median_step_s']:>13.4f} {r['pairs_per_step'] / r['median_step_s']:>8.1f} "
            f"{r['bytes_all_reduced_per_step_per_rank']:>14,} {r['bytes_reduce_scattered_per_step_per_rank']:>14,} {r['bytes_all_gathered_per_step_per_rank']:>12,}"
        )
    res = ROOT / "benches/results" / f"dist-train-{time.strftime('%Y%m%d-%H%M%S')}.json"
    machine = {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()}
    res.write_text(json.dumps({"args": vars(args) | {"bin": str(binary)}, "machine": machine, "runs": rows}, indent=1, default=str))
    print(f"wrote {res}")


if __name__ == "__main__":
    main()
